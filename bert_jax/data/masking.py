"""Dynamic MLM masking as a pure function of (seed, stream position).

The stream position of an example is step * global_batch + its index in the global batch,
so the masks of a run are fixed by its seed whatever the process count or restarts
(fairseq keys its masks on (seed, epoch, index) in the same spirit).

BERT (Devlin et al. §3.1, A.1): 15% of tokens, of which 80% -> [MASK], 10% -> random
token, 10% unchanged; never special tokens or padding. Whole-word masking masks all
sub-tokens of a chosen word. ALBERT n-gram masking (Lan et al. §4.1) chooses spans of
n <= max_ngram words with p(n) proportional to 1/n.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    mask_prob: float = 0.15
    max_predictions_per_seq: int = 20
    whole_word: bool = False
    max_ngram: int = 1          # 3 = ALBERT n-gram masking
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1

    def __post_init__(self):
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"mask_prob={self.mask_prob}: must be in (0, 1)")
        if self.max_predictions_per_seq < 1:
            raise ValueError(f"max_predictions_per_seq={self.max_predictions_per_seq}: must be >= 1")
        if self.max_ngram < 1:
            raise ValueError(f"max_ngram={self.max_ngram}: must be >= 1")


def example_rng(seed: int, position: int) -> np.random.Generator:
    """The generator for the example at stream `position` of a run with `seed`."""
    return np.random.Generator(np.random.Philox(key=[seed & 0xFFFFFFFFFFFFFFFF, position]))


def mask_tokens(ids: np.ndarray, special: np.ndarray, word_start: np.ndarray,
                rng: np.random.Generator, cfg: MaskingConfig, vocab_size: int, mask_id: int):
    """Returns (input_ids, positions[P], label_ids[P], weights[P]); positions sorted,
    unused slots have weight 0. `special` marks tokens never to mask (specials, padding)."""
    L, P = len(ids), cfg.max_predictions_per_seq
    candidates = np.flatnonzero(~special.astype(bool))
    # Units: words (whole-word / n-gram masking) or single tokens.
    if cfg.whole_word or cfg.max_ngram > 1:
        starts = candidates[(word_start[candidates] == 1) | (candidates == candidates[0])] \
            if len(candidates) else candidates
        bounds = np.searchsorted(candidates, starts)
        units = np.split(candidates, bounds[1:])
    else:
        units = [candidates[i:i + 1] for i in range(len(candidates))]
    n_predict = min(P, max(1, int(round(len(candidates) * cfg.mask_prob)))) if len(candidates) else 0

    covered = np.zeros(L, bool)
    chosen: list[int] = []
    ngram_p = 1.0 / np.arange(1, cfg.max_ngram + 1)
    ngram_p /= ngram_p.sum()
    for u in rng.permutation(len(units)):
        if len(chosen) >= n_predict:
            break
        n = 1 if cfg.max_ngram == 1 else int(rng.choice(cfg.max_ngram, p=ngram_p)) + 1
        span = np.concatenate(units[u:u + n])
        if len(chosen) + len(span) > n_predict or covered[span].any():
            if n == 1:
                continue
            span = units[u]  # fall back to the single word, as ALBERT does
            if len(chosen) + len(span) > n_predict or covered[span].any():
                continue
        covered[span] = True
        chosen.extend(span.tolist())

    positions = np.sort(np.asarray(chosen, np.int64))
    out = ids.copy()
    r = rng.random(len(positions))
    to_mask = r < cfg.mask_token_frac
    to_random = (r >= cfg.mask_token_frac) & (r < cfg.mask_token_frac + cfg.random_token_frac)
    out[positions[to_mask]] = mask_id
    out[positions[to_random]] = rng.integers(0, vocab_size, int(to_random.sum()))
    pos = np.zeros(P, np.int32)
    labels = np.zeros(P, np.int32)
    weights = np.zeros(P, np.float32)
    k = len(positions)
    pos[:k], labels[:k], weights[:k] = positions, ids[positions], 1.0
    return out, pos, labels, weights
