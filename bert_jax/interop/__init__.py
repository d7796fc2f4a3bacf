"""Hugging Face interop: checkpoint conversion both ways (convert) and the rename table (rename)."""
