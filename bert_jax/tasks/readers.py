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
from typing import Iterator, Sequence

from bert_jax.data import textfile
from bert_jax.errors import BertJaxError
from bert_jax.tasks import tagging

log = logging.getLogger(__name__)


class TaskDataError(BertJaxError, ValueError):
    """A task file is malformed; the message names the file and line."""


@dataclasses.dataclass
class TextExample:
    text: str
    pair: str | None
    label: str | float | None   # None: an unlabeled file (predict)
    where: str                  # "file:line", for error messages
    id: str = ""                # the row's id/idx/index column, else its line number


ID_COLUMNS = ("id", "idx", "index", "guid")


def read_text(path: pathlib.Path, encoding: str = "utf-8") -> str:
    """The file's text; a byte that is not `encoding` is an error naming file, line and
    byte, and the --encoding flag. A UTF-8 byte-order mark is dropped."""
    data = path.read_bytes()
    try:
        return data.decode(textfile.codec(encoding))
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise TaskDataError(f"{path}:{line}: byte 0x{data[e.start]:02x} at column {col} is not "
                            f"{encoding} text; give the file's encoding with --encoding (e.g. "
                            "--encoding=latin-1)") from None
    except LookupError:
        raise TaskDataError(f"--encoding={encoding}: unknown encoding") from None


def _column(name: str, header: list[str] | None, where: str) -> int | str:
    """A column given by name, or by 0-based index (headerless files, or digits that are
    no header's name)."""
    if header is not None and name in header:
        return name
    if name.isdigit():
        return int(name)
    have = f"have {header}" if header is not None else "a file without header takes column numbers from 0"
    raise TaskDataError(f"{where}: no column {name!r} ({have})")


def read_text_examples(path: str | pathlib.Path, text_column: str, label_column: str | None,
                       pair_column: str | None = None, regression: bool = False, *,
                       encoding: str = "utf-8", header: bool = True,
                       max_chars: int | None = None) -> list[TextExample]:
    """Rows of a TSV, CSV or JSONL file. `label_column=None` reads an unlabeled file.
    Columns are header names, or 0-based numbers (`header=False`: the first row is data).
    The file is read row by row; `max_chars` cuts the text fields (a TSV is streamed with
    every field capped, so a huge line costs `max_chars`, not its length)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise TaskDataError(f"{path}: no such file")
    try:
        names, rows = _rows(path, encoding, header, max_chars)
    except (UnicodeDecodeError, LookupError):
        read_text(path, encoding)  # raises the error naming line, column and --encoding
        raise
    if not rows:
        raise TaskDataError(f"{path}: no examples")
    wanted = [c for c in (text_column, label_column, pair_column) if c is not None]
    out = []
    for i, r in rows:
        where = f"{path}:{i}"
        keys = list(r) if isinstance(r, dict) else None
        cols = {c: _column(c, keys, where) for c in wanted}
        get = {}
        for c, k in cols.items():
            if isinstance(r, dict) and isinstance(k, int):
                raise TaskDataError(f"{where}: no column {c!r} (have {sorted(r)})")
            if isinstance(r, list) and k >= len(r):
                raise TaskDataError(f"{where}: no column {k} (the row has {len(r)} columns, numbered from 0)")
            get[c] = r[k]
        label = None
        if label_column is not None:
            label = get[label_column]
            if regression:
                try:
                    label = float(label)
                except (TypeError, ValueError):
                    raise TaskDataError(f"{where}: label {label!r} is not a number") from None
            else:
                label = str(label).strip()
        ident = next((str(r[c]) for c in ID_COLUMNS if isinstance(r, dict) and c in r), str(i))
        out.append(TextExample(str(get[text_column]).strip(),
                               str(get[pair_column]).strip() if pair_column else None, label, where, ident))
    return out


def _csv_rows(path: pathlib.Path, reader) -> Iterator[tuple[int, list[str]]]:
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # a field over the csv module's limit, a NUL byte, ...
            raise TaskDataError(f"{path}:{reader.line_num}: {e} (a TSV or JSONL file has no limit on "
                                "a field's length)") from None
        yield reader.line_num, row


def _rows(path: pathlib.Path, encoding: str, header: bool, max_chars: int | None
          ) -> tuple[list[str] | None, list[tuple[int, dict | list]]]:
    """(header names or None, [(line, row)]): JSONL objects, or CSV/TSV rows as dicts by
    header name (lists without one); every string field cut to `max_chars` as it is read."""
    rows: list[tuple[int, dict | list]] = []
    if path.suffix == ".jsonl":
        with open(path, encoding=textfile.codec(encoding)) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise TaskDataError(f"{path}:{i}: not JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise TaskDataError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
                    rows.append((i, {k: textfile.cut(v, max_chars) if isinstance(v, str) else v
                                     for k, v in row.items()}))
        return None, rows
    if path.suffix == ".csv":
        f = open(path, encoding=textfile.codec(encoding), newline="")
        reader = csv.reader(f)
        lines = _csv_rows(path, reader)
    else:  # TSV: no quoting, so every field is capped as it streams
        f = None
        lines = ((i, [] if r == [""] else r) for i, r in textfile.rows(path, max_chars, breaks=textfile.CSV_LINES,
                                                                       encoding=encoding))
    try:
        names = None
        for i, r in lines:
            if names is None and header:
                names = [h.strip() for h in r]
                continue
            if not r:
                continue
            if names is not None and len(r) != len(names):
                raise TaskDataError(f"{path}:{i}: {len(r)} columns, the header has {len(names)}")
            if max_chars:
                r = [textfile.cut(v, max_chars) for v in r]  # what rows keep is short
            rows.append((i, dict(zip(names, r)) if names is not None else r))
        if header and names is None:
            raise TaskDataError(f"{path}: empty file")
    finally:
        if f is not None:
            f.close()
    return names, rows


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


def read_conll(path: str | pathlib.Path, scheme: str = "IOB2", tag_column: int = -1, *,
               labeled: bool = True, encoding: str = "utf-8", max_chars: int | None = None) -> list[TaggedSentence]:
    """CoNLL sentences: the word in the first column, the tag in `tag_column`. Unlabeled
    (predict): one word per line, further columns ignored, tags empty. Streamed, each line
    kept up to `max_chars` characters."""
    path = pathlib.Path(path)
    if not path.exists():
        raise TaskDataError(f"{path}: no such file")
    out, words, tags, start = [], [], [], 1

    def flush():
        if words:
            if labeled and not tagging.is_valid(tags, scheme):
                raise TaskDataError(f"{path}:{start}: tag sequence {tags} is not valid {scheme}")
            out.append(TaggedSentence(list(words), list(tags), f"{path}:{start}"))
        words.clear()
        tags.clear()

    try:
        lines = [(i, textfile.cut(line, max_chars)) for i, (line,) in
                 textfile.rows(path, max_chars, max_fields=1, encoding=encoding)]
    except (UnicodeDecodeError, LookupError):
        read_text(path, encoding)  # raises the error naming line, column and --encoding
        raise
    for i, line in lines:
        if not line.strip() or line.startswith("-DOCSTART-"):
            flush()
            start = i + 1
            continue
        cols = line.split()
        if not labeled:
            if "\t" in line and any(" " in c.strip() for c in line.split("\t")):
                raise TaskDataError(f"{path}:{i}: expected one word per line (CoNLL), got a row "
                                    f"of tab-separated text {line[:60]!r}")
            words.append(cols[0])
            continue
        if len(cols) < 2:
            raise TaskDataError(f"{path}:{i}: expected 'token ... tag', got {line!r}")
        tag = cols[tag_column]
        if tag != "O" and (len(tag) < 3 or tag[1] != "-" or tag[0] not in "BIES"):
            raise TaskDataError(f"{path}:{i}: {tag!r} is not a tag")
        words.append(cols[0])
        tags.append(tag)
    flush()
    if not out:
        raise TaskDataError(f"{path}: no sentences")
    return out


# -------------------------------------------------------------------------- SQuAD ----
@dataclasses.dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]             # all ground-truth texts ([] = unanswerable)
    answer_start: int | None       # char offset of the first answer (training)


def read_squad(path: str | pathlib.Path, training: bool = False, *,
               encoding: str = "utf-8") -> list[QAExample]:
    """SQuAD v1.1/v2.0 JSON (answers may be absent: predict). With `training`, questions
    whose first answer is not at its answer_start in the context are skipped, counted and
    logged with their id, and an answer_start inside a word moves to an occurrence on word
    boundaries (counted)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    try:
        data = json.loads(read_text(path, encoding))["data"]
        if not isinstance(data, list):
            raise KeyError("'data' is not a list")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TaskDataError(f"{path}: not SQuAD JSON ({e})") from None
    out, skipped, realigned = [], 0, 0
    for a_i, article in enumerate(data):
        for p_i, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            where = f"{path}: data[{a_i}].paragraphs[{p_i}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str):
                raise TaskDataError(f"{where}: no 'context' string (SQuAD paragraphs are "
                                    '{"context": ..., "qas": [...]})')
            ctx = para["context"]
            for q_i, qa in enumerate(para.get("qas", [])):
                if not isinstance(qa, dict) or not all(isinstance(qa.get(k), str) for k in ("id", "question")):
                    raise TaskDataError(f"{where}.qas[{q_i}]: needs an 'id' and a 'question' string")
                try:
                    answers = [a["text"] for a in qa.get("answers", [])]
                    start = int(qa["answers"][0]["answer_start"]) if answers else None
                except (KeyError, TypeError, ValueError) as e:
                    raise TaskDataError(f"{where}.qas[{q_i}] (id {qa['id']}): answers need 'text' and "
                                        f"'answer_start' ({type(e).__name__}: {e})") from None
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
    if not out and not skipped:
        raise TaskDataError(f"{path}: no questions (SQuAD JSON: data[].paragraphs[].qas[])")
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
