"""Reading raw text corpora: globs to files, files to lines and documents.

Undecodable bytes never crash a run: they are replaced with U+FFFD, counted per file,
and reported with the file's name."""

from __future__ import annotations

import glob
import logging
import pathlib
from typing import Iterator, Sequence

log = logging.getLogger(__name__)


class CorpusError(ValueError):
    """The corpus is missing or empty; the message names the flag value or file."""


def expand(patterns: str | Sequence[str], flag: str = "--corpus") -> list[pathlib.Path]:
    """Files matched by comma-separated globs (or a list of them), sorted, deduplicated.
    Raises naming the pattern when one matches nothing and when all files are empty."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    if not patterns:
        raise CorpusError(f"{flag} is empty: give one or more files or globs")
    files: dict[pathlib.Path, None] = {}
    for pat in patterns:
        pat = pat.strip()
        hits = sorted(glob.glob(pat, recursive=True))
        hits = [h for h in hits if pathlib.Path(h).is_file()]
        if not hits:
            raise CorpusError(f"{flag}: {pat!r} matches no file")
        files.update((pathlib.Path(h), None) for h in hits)
    out = list(files)
    if all(f.stat().st_size == 0 for f in out):
        raise CorpusError(f"{flag}: every matched file is empty ({', '.join(map(str, out[:5]))})")
    return out


def read_text(path: pathlib.Path) -> str:
    """The file's text as UTF-8, undecodable bytes replaced (and reported)."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if bad:
        log.warning("%s: replaced %d undecodable byte sequence(s) with U+FFFD", path, bad)
    return text


def iter_lines(files: Sequence[pathlib.Path]) -> Iterator[str]:
    """Non-blank stripped lines of every file, streamed file by file."""
    for f in files:
        for line in read_text(f).splitlines():
            line = line.strip()
            if line:
                yield line


def documents(path: pathlib.Path) -> list[str]:
    """A file's documents: blocks separated by blank lines when the file has several
    such blocks of prose, else the whole file as one document. Each document is its
    lines joined by spaces."""
    text = read_text(path)
    blocks = [" ".join(l.strip() for l in b.splitlines() if l.strip())
              for b in text.replace("\r\n", "\n").split("\n\n")]
    return [b for b in blocks if b]
