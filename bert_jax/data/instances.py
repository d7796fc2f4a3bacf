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

Two ways to get them:
  prebuilt    (`build`) BERT's create_pretraining_data walk over every document, once per
              (corpus, seed, options): the same pairs every epoch, reshuffled; memory and
              start-up time grow with the corpus (40 bytes per instance; minutes for GBs).
  on the fly  (`OnTheFly`) a pure function of (seed, epoch, slot), built when a row is read:
              slot r of an epoch starts at the sentence holding token r*D + j_epoch (D =
              tokens per row less the average part of a sentence that a row of whole
              sentences leaves out, j_epoch a seeded shift in [0, D)), so the slots cover the
              corpus about once per epoch and every epoch pairs it anew (the role of BERT's
              dupe_factor); nothing is held per instance, so memory does not grow with the
              corpus. The per-pair rules are those above; where a slot holds one sentence
              only, SOP splits it at a random token, NSP takes B from another document.
Masking is dynamic either way, so each epoch sees new masks.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from bert_jax.data.cache import TokenizedCorpus


@dataclasses.dataclass(frozen=True)
class InstanceConfig:
    max_seq_length: int = 128
    objective: str = "nsp"       # the instance kind (KINDS): nsp | sop | none
    short_seq_prob: float = 0.1

    @property
    def kind(self) -> Kind:
        try:
            return KINDS[self.objective]
        except KeyError:
            raise ValueError(f"objective={self.objective!r}: must be one of {tuple(KINDS)}") from None


def build(c: TokenizedCorpus, cfg: InstanceConfig, seed: int) -> np.ndarray:
    """int64 [N, 5] instances (a_start, a_end, b_start, b_end, label)."""
    kind = cfg.kind
    out = kind.build(c, cfg, np.random.default_rng(seed))
    if not len(out):
        raise ValueError("the corpus is too small to form one pretraining instance")
    return np.asarray(out, np.int64)


class OnTheFly:
    """Instances as a pure function of (seed, epoch, slot): see the module docstring.
    `len()` is the number of slots per epoch; calling it gives one instance. A label of
    -1 means the slot had too little text for a sentence task (a one-token document
    under SOP, or one document under NSP): the row carries no sentence label."""

    def __init__(self, c: TokenizedCorpus, cfg: InstanceConfig, seed: int):
        self.c, self.cfg, self.seed, self.kind = c, cfg, seed, cfg.kind
        self.window = cfg.max_seq_length - self.kind.specials
        self.num_tokens = len(c.tokens)
        if self.num_tokens == 0:
            raise ValueError("the corpus is too small to form one pretraining instance")
        # Slots are spaced by W less the part of a sentence a row of whole sentences leaves
        # out at its end on average (a boundary falls in a sentence with probability
        # proportional to its length: E[len^2] / 2 E[len], from the first 1M sentences), so
        # an epoch covers the text about once instead of skipping that part of every row.
        lens = np.diff(np.asarray(c.sentences[:1_000_001], np.int64)).clip(0, self.window).astype(np.float64)
        left_out = (lens ** 2).sum() / (2 * max(lens.sum(), 1.0))
        self.spacing = max(1, self.window - int(round(min(left_out, self.window / 2))))
        self.num_slots = -(-self.num_tokens // self.spacing)

    def __len__(self) -> int:
        return self.num_slots

    @functools.lru_cache(maxsize=4)
    def _shift(self, epoch: int) -> int:
        return int(np.random.default_rng([self.seed, 0x1A57, epoch]).integers(self.spacing))

    def __call__(self, epoch: int, slot: int) -> tuple[int, int, int, int, int]:
        c, W, T = self.c, self.window, self.num_tokens
        shift = self._shift(epoch)
        rng = np.random.default_rng([self.seed, 0x1A57, epoch, slot])
        start = (slot * self.spacing + shift) % T
        s = int(np.searchsorted(c.sentences, start, "right")) - 1  # the sentence holding `start`
        if int(c.sentences[s + 1]) - int(c.sentences[s]) <= W:
            start = int(c.sentences[s])  # rows start at a sentence, unless it is longer than a row
        return self.kind.on_the_fly(self, s, start, rng)


# ---------------------------------------------------------------------------------------
# The kinds of instance. An objective names its kind (model/objectives.py `instance_kind`);
# a new kind is one class here and its entry in KINDS.
# ---------------------------------------------------------------------------------------
class Kind:
    """How rows of one kind are cut from the corpus (a prebuilt walk over every document,
    or one row on the fly) and made into ids."""
    name: str
    specials: int  # special tokens per row
    needs_documents = False  # rows draw from other documents than their own (NSP's random next segments)

    def build(self, c: TokenizedCorpus, cfg: InstanceConfig, rng) -> list:
        raise NotImplementedError

    def on_the_fly(self, otf: OnTheFly, s: int, start: int, rng) -> tuple[int, int, int, int, int]:
        raise NotImplementedError

    def materialize(self, c: TokenizedCorpus, inst, specials: SpecialIds):
        raise NotImplementedError


class FullSentences(Kind):
    """RoBERTa's FULL-SENTENCES: <s> sentences </s>, a </s> at each document start inside."""
    name, specials = "none", 2

    def build(self, c, cfg, rng):
        """Greedy rows of whole sentences, one pass over the sentences: the next document
        start is tracked by a pointer, so the cost per row does not grow with the number of
        documents (it scanned every document once per sentence before)."""
        max_tokens = cfg.max_seq_length - self.specials
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
        return out

    def on_the_fly(self, otf, s, start, rng):
        c, W = otf.c, otf.window
        ends = np.asarray(c.sentences[s + 1:s + W + 2], np.int64)
        inside = c.document_starts_inside(start, start + W + 1)
        cost = (ends - start) + np.searchsorted(inside, ends, "left")  # a [SEP] per document start
        fit = int(np.count_nonzero(cost <= W))
        if fit == 0:  # one sentence longer than a row: its head
            return (start, min(start + W, otf.num_tokens), 0, 0, 0)
        return (start, int(ends[fit - 1]), 0, 0, 0)

    def materialize(self, c, inst, specials):
        a0, a1, _, _, label = (int(x) for x in inst)
        toks, words = c.tokens[a0:a1], c.word_start[a0:a1]
        cuts = c.document_starts_inside(a0, a1) - a0
        toks = np.insert(toks, cuts, specials.sep)
        words = np.insert(words, cuts, 1)
        ids = np.concatenate([[specials.cls], toks, [specials.sep]])
        word = np.concatenate([[1], words, [1]])
        return ids, np.zeros(len(ids), np.int32), word, label


class SentencePairs(Kind):
    """[CLS] A [SEP] B [SEP] with a sentence label: what NSP and SOP share."""
    specials = 3
    min_sentences: int         # a chunk of the prebuilt walk makes a pair from this many sentences
    splits_one_sentence: bool  # on the fly, a slot of one sentence is split into A and B

    def build(self, c, cfg, rng):
        out = []
        max_tokens = cfg.max_seq_length - self.specials
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
                    if len(chunk) >= self.min_sentences:
                        a_end_idx = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
                        a = (int(sent[chunk[0]]), int(sent[chunk[a_end_idx - 1] + 1]))
                        inst, unused = self.pair(c, chunk, a, a_end_idx, target, d, rng)
                        if inst is not None:
                            out.append(_truncate(inst, max_tokens, rng))
                        i -= unused
                    chunk, length = [], 0
                    target = max_tokens if rng.random() >= cfg.short_seq_prob else int(rng.integers(2, max_tokens + 1))
                i += 1
        return out

    def pair(self, c, chunk, a, a_end_idx, target, doc, rng):
        """The prebuilt walk's pair for a chunk whose A is `a`: (instance or None, number of
        chunk sentences to put back)."""
        raise NotImplementedError

    def on_the_fly(self, otf, s, start, rng):
        c, W, cfg = otf.c, otf.window, otf.cfg
        target = W if rng.random() >= cfg.short_seq_prob else int(rng.integers(2, W + 1))
        d = int(np.searchsorted(c.document_starts, start, "right")) - 1
        last = int(c.documents[d + 1])  # the document's end, in sentences
        ends = np.asarray(c.sentences[s + 1:min(last, s + W + 1) + 1], np.int64)
        # Sentences until the target is reached (the last may cross it; truncation trims), as BERT.
        fit = min(len(ends), int(np.count_nonzero(ends - start < target)) + 1)
        if fit >= 2:  # A = sentences [0, k), B = [k, fit)
            k = int(rng.integers(1, fit))
            a, cont = (start, int(ends[k - 1])), (int(ends[k - 1]), int(ends[fit - 1]))
        else:  # one sentence: the document's last, or longer than the target
            end = min(int(ends[0]), start + max(target, 2))
            a, cont = (start, end), None
            if self.splits_one_sentence and end - start >= 2:
                k = int(rng.integers(start + 1, end))
                a, cont = (start, k), (k, end)
        return self.slot_pair(c, W, a, cont, target, d, rng)

    def slot_pair(self, c, W, a, cont, target, doc, rng):
        """An on-the-fly slot's pair from its A and continuation (None: none in the slot)."""
        raise NotImplementedError

    def materialize(self, c, inst, specials):
        a0, a1, b0, b1, label = (int(x) for x in inst)
        ta, tb = c.tokens[a0:a1], c.tokens[b0:b1]
        ids = np.concatenate([[specials.cls], ta, [specials.sep], tb, [specials.sep]])
        word = np.concatenate([[1], c.word_start[a0:a1], [1], c.word_start[b0:b1], [1]])
        types = np.concatenate([np.zeros(len(ta) + 2, np.int32), np.ones(len(tb) + 1, np.int32)])
        return ids, types, word, label


class NextSentence(SentencePairs):
    """BERT's NSP: B is A's continuation (label 0) or a random segment of another document (1)."""
    name, min_sentences, splits_one_sentence = "nsp", 1, False
    needs_documents = True

    def pair(self, c, chunk, a, a_end_idx, target, doc, rng):
        if len(chunk) == 1 or rng.random() < 0.5:
            if c.num_documents < 2:
                return None, 0
            b = _random_segment(c, doc, max(1, target - (a[1] - a[0])), rng)
            return (a[0], a[1], b[0], b[1], 1), len(chunk) - a_end_idx  # put back unused
        b = (a[1], int(c.sentences[chunk[-1] + 1]))
        return (a[0], a[1], b[0], b[1], 0), 0

    def slot_pair(self, c, W, a, cont, target, doc, rng):
        if cont is None or rng.random() < 0.5:
            if c.num_documents < 2:
                inst = (a[0], a[1], a[1], a[1], -1) if cont is None else (a[0], a[1], cont[0], cont[1], 0)
                return _truncate(inst, W, rng)
            b0, b1 = _random_segment(c, doc, max(1, target - (a[1] - a[0])), rng, max_sentences=W + 1)
            return _truncate((a[0], a[1], b0, b1, 1), W, rng)
        return _truncate((a[0], a[1], cont[0], cont[1], 0), W, rng)


class SentenceOrder(SentencePairs):
    """ALBERT's SOP: two consecutive segments of one document, swapped (label 1) or not (0)."""
    name, min_sentences, splits_one_sentence = "sop", 2, True

    def pair(self, c, chunk, a, a_end_idx, target, doc, rng):
        b = (a[1], int(c.sentences[chunk[-1] + 1]))
        if b[1] <= b[0]:
            return None, 0
        if rng.random() < 0.5:
            return (b[0], b[1], a[0], a[1], 1), 0
        return (a[0], a[1], b[0], b[1], 0), 0

    def slot_pair(self, c, W, a, cont, target, doc, rng):
        if cont is None:
            return (a[0], a[1], a[1], a[1], -1)
        inst = (cont[0], cont[1], a[0], a[1], 1) if rng.random() < 0.5 else (a[0], a[1], cont[0], cont[1], 0)
        return _truncate(inst, W, rng)


KINDS: dict[str, Kind] = {k.name: k for k in (NextSentence(), SentenceOrder(), FullSentences())}


def _random_segment(c, doc: int, need: int, rng, max_sentences: int | None = None) -> tuple[int, int]:
    """NSP's random next segment: a document other than `doc` (BERT tries 10 draws), a
    random sentence of it, and the sentences from there until `need` tokens or the
    document's end (looking at most `max_sentences` ahead). Token range (b0, b1)."""
    other = doc
    for _ in range(10):
        other = int(rng.integers(0, c.num_documents))
        if other != doc:
            break
    o0, o1 = int(c.documents[other]), int(c.documents[other + 1])
    start = int(rng.integers(o0, o1))
    stop = o1 if max_sentences is None else min(o1, start + max_sentences)
    b0 = int(c.sentences[start])
    ends = np.asarray(c.sentences[start + 1:stop + 1], np.int64)
    return b0, int(ends[min(int(np.searchsorted(ends - b0, need, "left")), len(ends) - 1)])


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
    """(ids, token_types, word_start, special, label) for one instance of kind `objective`, unpadded."""
    ids, types, word, label = KINDS[objective].materialize(c, inst, specials)
    special = (ids == specials.cls) | (ids == specials.sep)
    return ids.astype(np.int32), types, word.astype(np.uint8), special, label
