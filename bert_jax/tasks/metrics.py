"""Evaluation metrics as the official scripts define them.

GLUE: accuracy, F1 (positive class 1), Matthews correlation (sklearn), Pearson and
Spearman correlation (scipy). SQuAD v1.1/v2.0: exact match and token F1 after the
official answer normalisation, maximised over the ground truths (the evaluate-v1.1.py
and evaluate-v2.0.py definitions). NER: entity-level exact-match precision/recall/F1 as
conlleval counts them (seqeval; strict mode for BIOES).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from seqeval import metrics as seqeval_metrics
from seqeval.scheme import IOB2, IOBES
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def classification(labels: Sequence[int], preds: Sequence[int]) -> dict[str, float]:
    labels, preds = np.asarray(labels), np.asarray(preds)
    out = {"accuracy": float(accuracy_score(labels, preds)),
           "mcc": float(matthews_corrcoef(labels, preds))}
    if set(np.unique(labels)) | set(np.unique(preds)) <= {0, 1}:
        out["f1"] = float(f1_score(labels, preds, zero_division=0))
    else:
        out["macro_f1"] = float(f1_score(labels, preds, average="macro", zero_division=0))
    return out


def regression(labels: Sequence[float], preds: Sequence[float]) -> dict[str, float]:
    labels, preds = np.asarray(labels, float), np.asarray(preds, float)
    if np.std(preds) == 0 or np.std(labels) == 0:  # correlation undefined: report 0
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(preds, labels)[0]), "spearman": float(spearmanr(preds, labels)[0])}


# ------------------------------------------------------------------------ SQuAD ----
def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: str, truth: str) -> float:
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not p or not t:  # v2.0: no-answer is right only against no-answer
        return float(p == t)
    common = collections.Counter(p) & collections.Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: dict[str, str], answers: dict[str, list[str]]) -> dict[str, float]:
    """EM and F1 in percent over the questions in `answers` (id -> ground-truth texts;
    an empty list means unanswerable, matched by the empty prediction)."""
    em = f1 = 0.0
    for qid, truths in answers.items():
        pred = predictions.get(qid, "")
        truths = truths or [""]
        em += max(float(normalize_answer(pred) == normalize_answer(t)) for t in truths)
        f1 += max(_f1(pred, t) for t in truths)
    n = max(len(answers), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


# -------------------------------------------------------------------------- NER ----
def entities(labels: Sequence[Sequence[str]], preds: Sequence[Sequence[str]], scheme: str = "IOB2") -> dict:
    """Entity-level exact-match precision/recall/F1 (conlleval's definition)."""
    if scheme == "BIOES":
        kw = dict(mode="strict", scheme=IOBES)
    elif scheme == "IOB2":
        kw = dict(mode="strict", scheme=IOB2)
    else:  # IOB1: conlleval's default (lenient) chunking
        kw = {}
    labels, preds = [list(x) for x in labels], [list(x) for x in preds]
    return {"precision": float(seqeval_metrics.precision_score(labels, preds, **kw)),
            "recall": float(seqeval_metrics.recall_score(labels, preds, **kw)),
            "f1": float(seqeval_metrics.f1_score(labels, preds, **kw))}
