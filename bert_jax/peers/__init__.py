"""Peer implementations used for side-by-side comparisons (need the `test` extra)."""
