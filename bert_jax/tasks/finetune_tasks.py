"""Fine-tuning task types, one object each, so that the training loop, evaluation and
`predict` never branch on the task:

  classification  single texts or pairs -> label   (SST-2, MRPC, RTE, any TSV/CSV/JSONL)
  regression      pairs -> score                    (STS-B)
  ner             CoNLL words -> tags; label on each word's first sub-token; decoding
                  by Viterbi under the output scheme's valid transitions
  qa              SQuAD v1.1/v2.0 extractive QA over sliding windows

A task object knows, for its options `o` (the fine-tuning options, or those a fine-tuned
checkpoint recorded):
  read(path, labeled)          the examples of a file; errors name file and line
  label_set(examples)          the label names a model predicts, from training examples
  check(examples, labels)      every gold label of a file is one of them (before training)
  features(tok, ex, labels)    model inputs, plus training targets when labeled
  loss(out, batch)             the training loss from the model's outputs
  decode(out, feats, ex)       predictions from the model's outputs (NumPy)
  score(ex, preds)             metrics against the gold labels
  write(path, ex, preds)       the predictions file: row id, input, gold when known, and
                               per-class probabilities where there are classes
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bert_jax.data import textfile
from bert_jax.data.tokenizer import Tokenizer, pad_batch
from bert_jax.tasks import metrics, readers, squad, tagging

INPUTS = ("input_ids", "token_type_ids", "attention_mask")


@dataclasses.dataclass
class Features:
    arrays: dict[str, np.ndarray]   # INPUTS, plus the training targets when labeled
    extra: Any = None               # what decoding needs beyond the logits

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class Task:
    name: str
    model_task: str               # heads.TASKS entry
    metrics: tuple[str, ...]
    default_metric: str
    prediction_suffix: str

    def __init__(self, o):
        self.o = o

    @property
    def max_chars(self) -> int:
        """What the readers keep of one text: the tokenizer cuts there too (textfile.cut)."""
        return textfile.CHARS_PER_TOKEN * self.o.max_seq_length

    def label_set(self, examples) -> list[str]:
        return []

    def num_labels(self, labels) -> int:
        return len(labels)

    def check(self, examples, labels) -> None:
        """Raise naming file and line when a gold label is not in `labels`."""

    def output_file(self, folder: pathlib.Path, name: str) -> pathlib.Path:
        return folder / f"{name}.predictions.{self.prediction_suffix}"

    def write_predictions(self, path: pathlib.Path, input_path, examples, preds, labels) -> None:
        """`predict`'s output for the unlabeled `input_path` (default: as the evaluation writes)."""
        self.write(path, examples, preds, labels)


# ------------------------------------------------------------------ text tasks ----
class _TextTask(Task):
    prediction_suffix = "tsv"
    regression = False

    def read(self, path, labeled: bool = True, training: bool = False):
        o = self.o
        return readers.read_text_examples(path, o.text_column, o.label_column if labeled else None,
                                        o.pair_column, regression=self.regression,
                                        encoding=o.encoding, header=o.header,
                                        max_chars=self.max_chars)

    def _targets(self, examples, labels):
        raise NotImplementedError

    def features(self, tok: Tokenizer, examples, labels, labeled: bool = True) -> Features:
        pairs = [e.pair for e in examples] if self.o.pair_column else None
        encs = tok.encode_batch([e.text for e in examples], pairs, max_length=self.o.max_seq_length)
        f = pad_batch(encs, tok.pad_id, self.o.max_seq_length)
        if labeled:
            f["labels"] = self._targets(examples, labels)
        return Features(f)

    def write(self, path: pathlib.Path, examples, preds, labels) -> None:
        """One row per input row, in input order: id, text(s), gold (labeled files),
        prediction, and one probability column per class (classification)."""
        o = self.o
        head = ["id", o.text_column] + ([o.pair_column] if o.pair_column else [])
        labeled = examples[0].label is not None
        head += (["gold"] if labeled else []) + ["prediction"]
        if not self.regression:
            head += [f"p_{l}" for l in labels]
        clean = lambda t: str(t).replace("\t", " ").replace("\n", " ")
        lines = ["\t".join(head)]
        for e, p in zip(examples, preds):
            row = [e.id, e.text] + ([e.pair] if o.pair_column else []) + ([e.label] if labeled else [])
            if self.regression:
                row.append(repr(float(p)))
            else:
                row += [p[0]] + [f"{q:.6f}" for q in p[1]]
            lines.append("\t".join(map(clean, row)))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class Classification(_TextTask):
    name, model_task = "classification", "sequence_classification"
    metrics, default_metric = ("accuracy", "f1", "mcc"), "accuracy"

    def label_set(self, examples):
        return list(self.o.labels) or sorted({e.label for e in examples})

    def check(self, examples, labels):
        readers.label_ids(examples, labels)

    def _targets(self, examples, labels):
        return np.asarray(readers.label_ids(examples, labels), np.int32)

    def loss(self, out, batch):
        return optax.softmax_cross_entropy_with_integer_labels(out, batch["labels"]).mean()

    def decode(self, out, feats, examples, labels):
        """(label, probabilities) per row."""
        probs = _softmax(np.asarray(out, np.float64))
        return [(labels[i], p) for i, p in zip(probs.argmax(-1), probs)]

    def score(self, examples, preds, labels):
        index = {l: i for i, l in enumerate(labels)}
        return metrics.classification(readers.label_ids(examples, labels), [index[p[0]] for p in preds])


class Regression(_TextTask):
    name, model_task = "regression", "sequence_classification"
    metrics, default_metric = ("pearson", "spearman"), "spearman"
    regression = True

    def num_labels(self, labels) -> int:
        return 1

    def _targets(self, examples, labels):
        return np.asarray([float(e.label) for e in examples], np.float32)

    def loss(self, out, batch):
        return jnp.mean((out[:, 0] - batch["labels"]) ** 2)

    def decode(self, out, feats, examples, labels):
        return [float(x) for x in np.asarray(out)[:, 0]]

    def score(self, examples, preds, labels):
        return metrics.regression([float(e.label) for e in examples], preds)


# ------------------------------------------------------------------------- NER ----
class Tagging(Task):
    name, model_task = "ner", "token_classification"
    metrics, default_metric = ("precision", "recall", "f1"), "f1"
    prediction_suffix = "conll"

    def read(self, path, labeled: bool = True, training: bool = False):
        o = self.o
        sents = readers.read_conll(path, o.tag_scheme, labeled=labeled, encoding=o.encoding,
                                 max_chars=self.max_chars)
        for s in sents:  # held in IOB2; the model learns o.output_scheme
            s.tags = tagging.convert(s.tags, o.tag_scheme, "IOB2") if labeled else []
        return sents

    def label_set(self, sents):
        types = sorted({t[2:] for s in sents for t in s.tags if t != "O"})
        return list(self.o.labels) or tagging.labels_for(types, self.o.output_scheme)

    def check(self, sents, labels):
        known = set(labels)
        for s in sents:
            for t in tagging.convert(s.tags, "IOB2", self.o.output_scheme):
                if t not in known:
                    raise readers.TaskDataError(f"{s.where}: unknown tag {t!r} (labels: {labels})")

    def features(self, tok, sents, labels, labeled: bool = True) -> Features:
        """Targets on each word's first sub-token (-1 elsewhere); `extra` holds, per
        sentence, each word's first token (-1 where truncated away)."""
        max_len = self.o.max_seq_length
        index = {l: i for i, l in enumerate(labels)}
        encs, targets, first = [], [], []
        for s in sents:
            e = tok.encode_words(s.words, max_length=max_len)
            tags = tagging.convert(s.tags, "IOB2", self.o.output_scheme) if labeled else None
            lab = np.full(max_len, -1, np.int32)
            firsts = np.full(len(s.words), -1, np.int32)
            prev = None
            for j, w in enumerate(e.word_ids):
                if w is not None and w != prev:
                    firsts[w] = j
                    if labeled:
                        if tags[w] not in index:
                            raise readers.TaskDataError(f"{s.where}: unknown tag {tags[w]!r} (labels: {labels})")
                        lab[j] = index[tags[w]]
                prev = w
            encs.append(e)
            targets.append(lab)
            first.append(firsts)
        f = pad_batch(encs, tok.pad_id, max_len)
        if labeled:
            f["labels"] = np.stack(targets)
        return Features(f, first)

    def loss(self, out, batch):
        w = (batch["labels"] >= 0).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(out, jnp.maximum(batch["labels"], 0))
        return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)

    def decode(self, out, feats, sents, labels):
        """IOB2 tags per word: Viterbi over the first sub-tokens' log-probabilities under
        the output scheme; a word truncated away gets 'O'."""
        logp = np.asarray(jax.nn.log_softmax(jnp.asarray(out), -1))
        no_tag = np.log(np.eye(len(labels))[0] + 1e-9)
        preds = []
        for i, _ in enumerate(sents):
            scores = np.stack([logp[i, j] if j >= 0 else no_tag for j in feats.extra[i]])
            tags = tagging.viterbi(scores, labels, self.o.output_scheme)
            preds.append(tagging.convert(tags, self.o.output_scheme, "IOB2"))
        return preds

    def score(self, sents, preds, labels):
        return metrics.entities([s.tags for s in sents], preds, "IOB2")

    def write(self, path, sents, preds, labels) -> None:
        """CoNLL: `word gold prediction` (unlabeled: `word prediction`) in the files' tag
        scheme, a blank line after each sentence."""
        scheme = self.o.tag_scheme
        lines = []
        for s, pred in zip(sents, preds):
            out_pred = tagging.convert(pred, "IOB2", scheme)
            if s.tags:
                out_gold = tagging.convert(s.tags, "IOB2", scheme)
                lines += [f"{w} {g} {p}" for w, g, p in zip(s.words, out_gold, out_pred)]
            else:
                lines += [f"{w} {p}" for w, p in zip(s.words, out_pred)]
            lines.append("")
        path.write_text("\n".join(lines), encoding="utf-8")

    def write_predictions(self, path, input_path, sents, preds, labels) -> None:
        """Line for line with the input: `word prediction` for each word line, and its
        blank and -DOCSTART- lines as they are (reading drops them, so writing the sentences
        alone moved every line after the first of them)."""
        tags = iter(t for pred in preds for t in tagging.convert(pred, "IOB2", self.o.tag_scheme))
        with open(path, "w", encoding="utf-8") as f:
            for _, (line,) in textfile.rows(input_path, self.max_chars, max_fields=1, encoding=self.o.encoding):
                if not line.strip() or line.startswith("-DOCSTART-"):
                    f.write(line + "\n")
                else:
                    f.write(f"{line.split()[0]} {next(tags)}\n")


# ------------------------------------------------------------------------- QA ----
class SpanQA(Task):
    name, model_task = "qa", "question_answering"
    metrics, default_metric = ("exact_match", "f1"), "f1"
    prediction_suffix = "json"

    def num_labels(self, labels) -> int:
        return 2

    def read(self, path, labeled: bool = True, training: bool = False):
        return readers.read_squad(path, training=training, encoding=self.o.encoding)

    def features(self, tok, examples, labels, labeled: bool = True) -> Features:
        o = self.o
        feats = squad.make_features(tok, examples, o.max_seq_length, o.doc_stride, o.max_query_length)
        f = {k: getattr(feats, k) for k in INPUTS}
        if labeled:
            f.update(start_positions=feats.start_positions, end_positions=feats.end_positions)
        return Features(f, feats)

    def loss(self, out, batch):
        start, end = out
        ce = optax.softmax_cross_entropy_with_integer_labels
        return (ce(start, batch["start_positions"]).mean() + ce(end, batch["end_positions"]).mean()) / 2

    def decode(self, out, feats, examples, labels):
        """The official {id: answer} dict."""
        o = self.o
        start, end = out
        return squad.predict_answers(examples, feats.extra, start, end, o.n_best,
                                     o.max_answer_length, o.null_threshold)

    def score(self, examples, preds, labels):
        return metrics.squad(preds, {e.id: e.answers for e in examples})

    def write(self, path, examples, preds, labels) -> None:
        path.write_text(json.dumps(preds, indent=1), encoding="utf-8")


TASKS = {t.name: t for t in (Classification, Regression, Tagging, SpanQA)}


def make(o) -> Task:
    if o.task not in TASKS:
        raise ValueError(f"--task={o.task!r}: must be one of {tuple(TASKS)}")
    return TASKS[o.task](o)
