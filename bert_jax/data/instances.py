"""Pretraining instances from a TokenizedCorpus, and their materialization into rows.

An instance is five integers, token ranges into the corpus:
    a_start, a_end, b_start, b_end, label
  nsp   (BERT, Devlin et al. A.2 / create_pretraining_data.py): A is a run of sentences;
        B is the actual continuation (label 0) or, with probability 1/2 or when A uses the
        whole chunk, a run from a random other document (label 1). With probability
        `short_seq_prob` the target length is drawn shorter, to reduce the train/test
        mismatch. The pair is truncated like truncate_seq_pair (longer side, random end).
  sop   (ALBERT §4.1): A and B are consecutive runs of the same document; swapped with
        probability 1/2 (label 1 = swapped).
  none  (RoBERTa FULL-SENTENCES, Liu et al. §4.2): one range of contiguous sentences that
        may cross document boundaries, where an extra [SEP] is inserted; label unused.

Instances are built once per (corpus, seed, options); training epochs reshuffle them and
masking is dynamic, so each epoch sees new masks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bert_jax.data.cache import TokenizedCorpus


@dataclasses.dataclass(frozen=True)
class InstanceConfig:
    max_seq_length: int = 128
    objective: str = "nsp"       # nsp | sop | none
    short_seq_prob: float = 0.1


def build(c: TokenizedCorpus, cfg: InstanceConfig, seed: int) -> np.ndarray:
    """int64 [N, 5] instances (a_start, a_end, b_start, b_end, label)."""
    rng = np.random.default_rng(seed)
    if cfg.objective == "none":
        return _full_sentences(c, cfg, rng)
    if cfg.objective not in ("nsp", "sop"):
        raise ValueError(f"objective={cfg.objective!r}: must be nsp, sop or none")
    out = []
    max_tokens = cfg.max_seq_length - 3  # [CLS] A [SEP] B [SEP]
    sent = c.sentences
    for d in range(c.num_documents):
        s0, s1 = int(c.documents[d]), int(c.documents[d + 1])
        target = max_tokens if rng.random() >= cfg.short_seq_prob else int(rng.integers(2, max_tokens + 1))
        chunk: list[int] = []  # sentence indices
        length = 0
        i = s0
        while i < s1:
            chunk.append(i)
            length += int(sent[i + 1] - sent[i])
            if i == s1 - 1 or length >= target:
                if len(chunk) >= 2 or cfg.objective == "nsp":
                    inst, unused = _pair(c, chunk, target, cfg.objective, d, rng)
                    if inst is not None:
                        out.append(_truncate(inst, max_tokens, rng))
                    i -= unused
                chunk, length = [], 0
                target = max_tokens if rng.random() >= cfg.short_seq_prob else int(rng.integers(2, max_tokens + 1))
            i += 1
    if not out:
        raise ValueError("the corpus is too small to form one pretraining instance")
    return np.asarray(out, np.int64)


def _pair(c, chunk, target, objective, doc, rng):
    """(instance, number of chunk sentences to put back)."""
    sent = c.sentences
    a_end_idx = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
    a = (int(sent[chunk[0]]), int(sent[chunk[a_end_idx - 1] + 1]))
    if objective == "sop":
        b = (a[1], int(sent[chunk[-1] + 1]))
        if b[1] <= b[0]:
            return None, 0
        if rng.random() < 0.5:
            return (b[0], b[1], a[0], a[1], 1), 0
        return (a[0], a[1], b[0], b[1], 0), 0
    # NSP
    if len(chunk) == 1 or rng.random() < 0.5:
        if c.num_documents < 2:
            return None, 0
        target_b = max(1, target - (a[1] - a[0]))
        other = doc
        for _ in range(10):  # BERT tries 10 times to draw a different document
            other = int(rng.integers(0, c.num_documents))
            if other != doc:
                break
        o0, o1 = int(c.documents[other]), int(c.documents[other + 1])
        start = int(rng.integers(o0, o1))
        end = start
        while end < o1 and sent[end] - sent[start] < target_b:
            end += 1
        b = (int(sent[start]), int(sent[end]))
        return (a[0], a[1], b[0], b[1], 1), len(chunk) - a_end_idx  # put back unused
    b = (a[1], int(sent[chunk[-1] + 1]))
    return (a[0], a[1], b[0], b[1], 0), 0


def _truncate(inst, max_tokens, rng):
    a0, a1, b0, b1, label = inst
    while (a1 - a0) + (b1 - b0) > max_tokens:
        if (a1 - a0) > (b1 - b0):
            if rng.random() < 0.5:
                a0 += 1
            else:
                a1 -= 1
        else:
            if rng.random() < 0.5:
                b0 += 1
            else:
                b1 -= 1
    return (a0, a1, b0, b1, label)


def _full_sentences(c: TokenizedCorpus, cfg: InstanceConfig, rng) -> np.ndarray:
    """Greedy rows of whole sentences, one pass over the sentences: the next document
    start is tracked by a pointer, so the cost per row does not grow with the number of
    documents (it scanned every document once per sentence before)."""
    max_tokens = cfg.max_seq_length - 2  # <s> ... </s>
    out, sent = [], c.sentences
    starts = c.document_starts
    n_sent = len(sent) - 1
    i = 0
    d = 0  # index of the first document start after the row's start
    while i < n_sent:
        start, j = int(sent[i]), i
        while d < len(starts) and starts[d] <= start:
            d += 1
        # Extra separators at document boundaries count against the length.
        inside, k = 0, d
        while j < n_sent:
            end = int(sent[j + 1])
            while k < len(starts) and starts[k] < end:
                k += 1
            inside = k - d  # document starts strictly inside (start, end)
            if (end - start) + inside > max_tokens:
                break
            j += 1
        if j == i:  # one sentence longer than the row: take its head
            out.append((start, start + max_tokens, 0, 0, 0))
            j = i + 1
        else:
            out.append((start, int(sent[j]), 0, 0, 0))
        i = j
    return np.asarray(out, np.int64)


# ---------------------------------------------------------------------------------------
# Materialization: instance -> one row of ids, types, words, specials.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int
    mask: int


def materialize(c: TokenizedCorpus, inst: np.ndarray, objective: str, specials: SpecialIds):
    """(ids, token_types, word_start, special, label) for one instance, unpadded."""
    a0, a1, b0, b1, label = (int(x) for x in inst)
    if objective == "none":
        toks, words = c.tokens[a0:a1], c.word_start[a0:a1]
        cuts = c.document_starts_inside(a0, a1) - a0
        toks = np.insert(toks, cuts, specials.sep)
        words = np.insert(words, cuts, 1)
        ids = np.concatenate([[specials.cls], toks, [specials.sep]])
        word = np.concatenate([[1], words, [1]])
        types = np.zeros(len(ids), np.int32)
    else:
        ta, tb = c.tokens[a0:a1], c.tokens[b0:b1]
        ids = np.concatenate([[specials.cls], ta, [specials.sep], tb, [specials.sep]])
        word = np.concatenate([[1], c.word_start[a0:a1], [1], c.word_start[b0:b1], [1]])
        types = np.concatenate([np.zeros(len(ta) + 2, np.int32), np.ones(len(tb) + 1, np.int32)])
    special = (ids == specials.cls) | (ids == specials.sep)
    return ids.astype(np.int32), types, word.astype(np.uint8), special, label
