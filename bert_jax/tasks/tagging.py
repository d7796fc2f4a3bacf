"""Tag schemes for token classification and decoding that only emits valid sequences.

Schemes: IOB1 (CoNLL-2003's original: I- everywhere, B- only between two adjacent
entities of one type), IOB2 (every entity starts with B-), BIOES (B-egin, I-nside,
E-nd, S-ingle, O). Conversions go through IOB2. `viterbi` decodes per-token scores
under the scheme's allowed transitions, so e.g. I-PER never follows O in IOB2 and E-LOC
never follows B-PER in BIOES.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SCHEMES = ("IOB1", "IOB2", "BIOES")


def _split(tag: str) -> tuple[str, str | None]:
    return ("O", None) if tag == "O" else (tag[0], tag[2:])


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    out, prev = [], "O"
    for t in tags:
        p, typ = _split(t)
        pp, ptyp = _split(prev)
        if p == "I" and (pp == "O" or ptyp != typ):
            t = f"B-{typ}"
        out.append(t)
        prev = t
    return out


def iob2_to_iob1(tags: Sequence[str]) -> list[str]:
    out, prev = [], "O"
    for t in tags:
        p, typ = _split(t)
        pp, ptyp = _split(prev)
        if p == "B" and not (pp in ("B", "I") and ptyp == typ):
            out.append(f"I-{typ}")
        else:
            out.append(t)
        prev = t
    return out


def iob2_to_bioes(tags: Sequence[str]) -> list[str]:
    out = []
    for i, t in enumerate(tags):
        p, typ = _split(t)
        nxt = _split(tags[i + 1]) if i + 1 < len(tags) else ("O", None)
        continues = nxt == ("I", typ)
        if p == "B":
            out.append(f"B-{typ}" if continues else f"S-{typ}")
        elif p == "I":
            out.append(f"I-{typ}" if continues else f"E-{typ}")
        else:
            out.append(t)
    return out


def bioes_to_iob2(tags: Sequence[str]) -> list[str]:
    out = []
    for t in tags:
        p, typ = _split(t)
        out.append({"S": f"B-{typ}", "E": f"I-{typ}"}.get(p, t))
    return out


def convert(tags: Sequence[str], src: str, dst: str) -> list[str]:
    if src not in SCHEMES or dst not in SCHEMES:
        raise ValueError(f"tag scheme must be one of {SCHEMES}, got {src!r} -> {dst!r}")
    iob2 = {"IOB1": iob1_to_iob2, "IOB2": list, "BIOES": bioes_to_iob2}[src](tags)
    return {"IOB1": iob2_to_iob1, "IOB2": list, "BIOES": iob2_to_bioes}[dst](iob2)


def labels_for(types: Sequence[str], scheme: str) -> list[str]:
    """The label set of a scheme over entity types, O first."""
    prefixes = {"IOB1": "BI", "IOB2": "BI", "BIOES": "BIES"}[scheme]
    return ["O"] + [f"{p}-{t}" for t in sorted(types) for p in prefixes]


def allowed(prev: str | None, cur: str | None, scheme: str) -> bool:
    """Is `prev` -> `cur` a valid transition? None stands for the sequence start/end."""
    pp, ptyp = _split(prev) if prev else ("O", None)
    cp, ctyp = _split(cur) if cur else ("O", None)
    if scheme == "BIOES":
        inside = pp in ("B", "I")
        if cur is None:
            return not inside
        if cp in ("I", "E"):
            return inside and ptyp == ctyp
        return not inside
    if scheme == "IOB2":
        if cp == "I":
            return pp in ("B", "I") and ptyp == ctyp
        return True
    # IOB1: B-X only directly after an X token.
    if cp == "B":
        return pp in ("B", "I") and ptyp == ctyp
    return True


def viterbi(scores_TxK: np.ndarray, labels: Sequence[str], scheme: str) -> list[str]:
    """Highest-scoring tag sequence among the valid ones (scores: per-token log-probs or
    logits)."""
    T, K = scores_TxK.shape
    if T == 0:
        return []
    neg = -1e30
    trans = np.array([[0.0 if allowed(a, b, scheme) else neg for b in labels] for a in labels])
    start = np.array([0.0 if allowed(None, b, scheme) else neg for b in labels])
    end = np.array([0.0 if allowed(a, None, scheme) else neg for a in labels])
    score = start + scores_TxK[0]
    back = np.zeros((T, K), np.int64)
    for t in range(1, T):
        cand = score[:, None] + trans
        back[t] = cand.argmax(0)
        score = cand.max(0) + scores_TxK[t]
    score = score + end
    best = [int(score.argmax())]
    for t in range(T - 1, 0, -1):
        best.append(int(back[t, best[-1]]))
    return [labels[i] for i in reversed(best)]


def is_valid(tags: Sequence[str], scheme: str) -> bool:
    prev = None
    for t in tags:
        if not allowed(prev, t, scheme):
            return False
        prev = t
    return allowed(prev, None, scheme)
