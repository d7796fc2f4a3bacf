"""Tiny, pairwise-distinct sizes shared by the tests, so that a swapped axis cannot pass:
batch 2, length 13, hidden 32, heads 4 (head dim 8), ffn 37, vocab 99, embedding 24,
3 layers, 5 labels, 40 positions."""

import numpy as np

from bert_jax.model.config import ModelConfig

B, L = 2, 13


def config(family: str = "bert", **kw) -> ModelConfig:
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=40, num_labels=5)
    if family == "roberta":
        base.update(type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
                    max_position_embeddings=42)
    if family == "albert":
        base.update(embedding_size=24, hidden_act="gelu_new")
    base.update(kw)
    return ModelConfig(family=family, **base)


def batch(cfg: ModelConfig, seed: int = 0, pair: bool = True, pad: int = 4):
    """A right-padded batch of B rows: row 0 full length, row 1 with `pad` padding tokens;
    with `pair`, token types mark a second segment in each row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, (B, L)).astype(np.int32)
    mask = np.ones((B, L), np.int32)
    if pad:
        mask[1, L - pad:] = 0
        ids[1, L - pad:] = cfg.pad_token_id
    types = np.zeros((B, L), np.int32)
    if pair and cfg.type_vocab_size > 1:
        types[0, 7:] = 1
        types[1, 5:L - pad] = 1
    return ids, types, mask
