"""Training: the sharded step and state (train), optimizers, mesh sharding, checkpoints, and the pretraining and fine-tuning loops."""
