"""Fine-tuning task types (finetune_tasks), tag schemes and decoding (tagging), metrics."""
