"""Fine-tuning task readers. Every malformed row is an error (or, where the task allows
it, a counted and logged skip) that names the file and line.

  classification / pair / regression: TSV, CSV or JSONL with named text, optional second
      text, and label columns (GLUE files, MRPC's original file with its BOM, ...)
  token classification: CoNLL-2003 columns (token ... tag), blank lines between
      sentences, -DOCSTART- lines ignored; tags validated against the scheme
  extractive QA: SQuAD v1.1 / v2.0 JSON
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
from typing import Sequence

from bert_jax import tagging

log = logging.getLogger(__name__)


class TaskDataError(ValueError):
    """A task file is malformed; the message names the file and line."""


@dataclasses.dataclass
class TextExample:
    text: str
    pair: str | None
    label: str | float
    where: str          # "file:line", for error messages


def read_text_examples(path: str | pathlib.Path, text_column: str, label_column: str,
                       pair_column: str | None = None, regression: bool = False) -> list[TextExample]:
    path = pathlib.Path(path)
    if not path.exists():
        raise TaskDataError(f"{path}: no such file")
    rows: list[tuple[int, dict]] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{path}:{i}: not JSON ({e})") from None
    else:
        delim = "," if path.suffix == ".csv" else "\t"
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: MRPC has a BOM
            reader = csv.reader(f, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL)
            header = next(reader, None)
            if header is None:
                raise TaskDataError(f"{path}: empty file")
            header = [h.strip() for h in header]
            for i, r in enumerate(reader, 2):
                if not r:
                    continue
                if len(r) != len(header):
                    raise TaskDataError(f"{path}:{i}: {len(r)} columns, the header has {len(header)}")
                rows.append((i, dict(zip(header, r))))
    out = []
    for i, r in rows:
        for col in (text_column, label_column) + ((pair_column,) if pair_column else ()):
            if col not in r:
                raise TaskDataError(f"{path}:{i}: no column {col!r} (have {sorted(r)})")
        label = r[label_column]
        if regression:
            try:
                label = float(label)
            except ValueError:
                raise TaskDataError(f"{path}:{i}: label {label!r} is not a number") from None
        out.append(TextExample(str(r[text_column]).strip(), str(r[pair_column]).strip() if pair_column else None,
                               label if regression else str(label).strip(), f"{path}:{i}"))
    if not out:
        raise TaskDataError(f"{path}: no examples")
    return out


def label_ids(examples: Sequence[TextExample], labels: Sequence[str]) -> list[int]:
    index = {l: i for i, l in enumerate(labels)}
    out = []
    for e in examples:
        if e.label not in index:
            raise TaskDataError(f"{e.where}: unknown label {e.label!r} (labels: {list(labels)})")
        out.append(index[e.label])
    return out


# -------------------------------------------------------------------------- CoNLL ----
@dataclasses.dataclass
class TaggedSentence:
    words: list[str]
    tags: list[str]
    where: str


def read_conll(path: str | pathlib.Path, scheme: str = "IOB2", tag_column: int = -1) -> list[TaggedSentence]:
    path = pathlib.Path(path)
    if not path.exists():
        raise TaskDataError(f"{path}: no such file")
    out, words, tags, start = [], [], [], 1

    def flush():
        if words:
            if not tagging.is_valid(tags, scheme):
                raise TaskDataError(f"{path}:{start}: tag sequence {tags} is not valid {scheme}")
            out.append(TaggedSentence(list(words), list(tags), f"{path}:{start}"))
        words.clear()
        tags.clear()

    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("-DOCSTART-"):
            flush()
            start = i + 1
            continue
        cols = line.split()
        if len(cols) < 2:
            raise TaskDataError(f"{path}:{i}: expected 'token ... tag', got {line!r}")
        tag = cols[tag_column]
        if tag != "O" and (len(tag) < 3 or tag[1] != "-" or tag[0] not in "BIES"):
            raise TaskDataError(f"{path}:{i}: {tag!r} is not a tag")
        words.append(cols[0])
        tags.append(tag)
    flush()
    return out


# -------------------------------------------------------------------------- SQuAD ----
@dataclasses.dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]             # all ground-truth texts ([] = unanswerable)
    answer_start: int | None       # char offset of the first answer (training)


def read_squad(path: str | pathlib.Path, training: bool = False) -> list[QAExample]:
    """SQuAD v1.1/v2.0 JSON. With `training`, questions whose first answer is not at its
    answer_start in the context are skipped, counted and logged with their id, and an
    answer_start inside a word moves to an occurrence on word boundaries (counted)."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except FileNotFoundError:
        raise TaskDataError(f"{path}: no such file") from None
    except (json.JSONDecodeError, KeyError) as e:
        raise TaskDataError(f"{path}: not SQuAD JSON ({e})") from None
    out, skipped, realigned = [], 0, 0
    for article in data:
        for para in article["paragraphs"]:
            ctx = para["context"]
            for qa in para["qas"]:
                answers = [a["text"] for a in qa.get("answers", [])]
                start = qa["answers"][0]["answer_start"] if answers else None
                if qa.get("is_impossible"):
                    answers, start = [], None
                if training and answers and ctx[start:start + len(answers[0])] != answers[0]:
                    skipped += 1
                    log.warning("%s: question %s: answer %r is not at answer_start %d; skipped",
                                path, qa["id"], answers[0], start)
                    continue
                if training and answers and not _on_word_boundaries(ctx, start, len(answers[0])):
                    better = _aligned_occurrence(ctx, answers[0])
                    if better is not None:
                        realigned += 1
                        start = better
                out.append(QAExample(qa["id"], qa["question"], ctx, answers, start))
    if skipped:
        log.warning("%s: skipped %d question(s) whose answer is not in the context", path, skipped)
    if realigned:
        log.warning("%s: moved %d answer_start(s) from inside a word to an occurrence of the "
                    "same text on word boundaries", path, realigned)
    return out


def _on_word_boundaries(ctx: str, start: int, n: int) -> bool:
    end = start + n
    return (start == 0 or not ctx[start - 1].isalnum()) and (end == len(ctx) or not ctx[end].isalnum())


def _aligned_occurrence(ctx: str, answer: str) -> int | None:
    """Offset of an occurrence of `answer` that starts and ends on word boundaries.
    (Recovered answer offsets, like ../shared/data's rebuilt SQuAD dev, sometimes point
    at a match inside a longer word: '5' inside 'Bowl 50'.)"""
    i = ctx.find(answer)
    while i != -1:
        if _on_word_boundaries(ctx, i, len(answer)):
            return i
        i = ctx.find(answer, i + 1)
    return None
