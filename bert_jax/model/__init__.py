"""The model: configuration and variants (config), the encoder, the task heads."""
