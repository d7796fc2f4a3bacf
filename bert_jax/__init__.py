"""bert_jax: pretrain, fine-tune, evaluate and export BERT, RoBERTa and ALBERT in JAX/Flax."""

__version__ = "0.1.0"
