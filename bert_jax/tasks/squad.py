"""Extractive QA: SQuAD examples -> sliding-window features, and logits -> answer texts.

Windows follow the BERT reference (run_squad.py): the question is cut to
`max_query_length` tokens; the context is split into windows of what is left of
`max_seq_length`, whose starts are `doc_stride` tokens apart. A window's label is the
answer's first and last token when the whole answer lies inside it, else [CLS] (0, 0).
Answers are read back through the tokenizer's character offsets, so the predicted text
is a span of the original context.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bert_jax.data.tokenizer import Tokenizer
from bert_jax.tasks.readers import QAExample


@dataclasses.dataclass
class QAFeatures:
    input_ids: np.ndarray          # [F, L]
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    start_positions: np.ndarray    # [F] answer token labels (0 = [CLS] / no answer here)
    end_positions: np.ndarray
    example_index: np.ndarray      # [F] which example each window came from
    offsets: list[list[tuple[int, int] | None]]  # per window: context char span per token


def make_features(tok: Tokenizer, examples: list[QAExample], max_seq_length: int = 384,
                  doc_stride: int = 128, max_query_length: int = 64) -> QAFeatures:
    ids, types, masks, starts, ends, ex_idx, offsets = [], [], [], [], [], [], []
    for i, ex in enumerate(examples):
        question = ex.question
        q = tok.backend.encode(question, add_special_tokens=False)
        if len(q.ids) > max_query_length:
            question = question[: q.offsets[max_query_length - 1][1]]
            q_len = max_query_length
        else:
            q_len = len(q.ids)
        window = max_seq_length - q_len - 3
        if window <= 0:
            raise ValueError(f"max_seq_length={max_seq_length} leaves no room for the context "
                             f"after a {q_len}-token question")
        overlap = max(window - doc_stride, 0)
        for enc in tok.encode_windows(question, ex.context, max_seq_length, overlap):
            ctx = [o if s == 1 else None for o, s in zip(enc.offsets, enc.sequence_ids)]
            start = end = 0
            if ex.answers and ex.answer_start is not None:
                a0, a1 = ex.answer_start, ex.answer_start + len(ex.answers[0])
                inside = [j for j, o in enumerate(ctx) if o is not None]
                if inside and ctx[inside[0]][0] <= a0 and ctx[inside[-1]][1] >= a1:
                    start = next(j for j in inside if ctx[j][1] > a0)
                    end = next(j for j in reversed(inside) if ctx[j][0] < a1)
            n = len(enc)
            pad = max_seq_length - n
            ids.append(enc.input_ids + [tok.pad_id] * pad)
            types.append(enc.token_type_ids + [0] * pad)
            masks.append(enc.attention_mask + [0] * pad)
            starts.append(start)
            ends.append(end)
            ex_idx.append(i)
            offsets.append(ctx + [None] * pad)
    as_i32 = lambda x: np.asarray(x, np.int32)
    return QAFeatures(as_i32(ids), as_i32(types), as_i32(masks), as_i32(starts), as_i32(ends),
                      as_i32(ex_idx), offsets)


def predict_answers(examples: list[QAExample], feats: QAFeatures, start_logits: np.ndarray,
                    end_logits: np.ndarray, n_best: int = 20, max_answer_length: int = 30,
                    null_threshold: float | None = None) -> dict[str, str]:
    """{question id: answer text}. With `null_threshold` (SQuAD v2.0) the answer is ""
    when the best [CLS] score beats the best span by more than the threshold."""
    by_example: dict[int, list[int]] = {}
    for f, e in enumerate(feats.example_index):
        by_example.setdefault(int(e), []).append(f)
    out = {}
    for e, ex in enumerate(examples):
        best, best_score, null_score = "", -np.inf, np.inf
        for f in by_example.get(e, []):
            s, t, offs = start_logits[f], end_logits[f], feats.offsets[f]
            null_score = min(null_score, float(s[0] + t[0]))
            for i in np.argsort(s)[::-1][:n_best]:
                if offs[i] is None:
                    continue
                for j in np.argsort(t)[::-1][:n_best]:
                    if offs[j] is None or j < i or j - i + 1 > max_answer_length:
                        continue
                    score = float(s[i] + t[j])
                    if score > best_score:
                        best_score, best = score, ex.context[offs[i][0]:offs[j][1]]
        if null_threshold is not None and null_score - best_score > null_threshold:
            best = ""
        out[ex.id] = best
    return out
