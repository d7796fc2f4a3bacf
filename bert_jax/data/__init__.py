"""Data: corpus reading, pretraining instances, masking, loaders, task readers."""
