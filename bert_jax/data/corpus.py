"""Reading raw text corpora: globs to files, files to lines and documents.

Files are streamed in bounded memory. Undecodable bytes are replaced with U+FFFD, counted
per file and reported with the file's name; a file that is mostly undecodable (binary) is
refused by name. Over-long lines are cut (MAX_LINE_CHARS) and the cuts reported."""

from __future__ import annotations

import codecs
import logging
import pathlib
import re
from typing import Iterator, Sequence

from bert_jax import storage
from bert_jax.errors import BertJaxError

log = logging.getLogger(__name__)


class CorpusError(BertJaxError, ValueError):
    """The corpus is missing or empty; the message names the flag value or file."""


def expand(patterns: str | Sequence[str], flag: str = "--corpus") -> list[pathlib.Path]:
    """Files matched by comma-separated globs (or a list of them), sorted, deduplicated.
    Raises naming the pattern when one matches nothing and when all files are empty."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    if not patterns:
        raise CorpusError(f"{flag} is empty: give one or more files or globs")
    files: dict = {}
    for pat in patterns:
        pat = pat.strip()
        hits = [h for h in storage.glob(pat) if h.is_file()]  # local paths or object-store URIs
        if not hits:
            raise CorpusError(f"{flag}: {pat!r} matches no file")
        files.update((h, None) for h in hits)
    out = list(files)
    if all(storage.size_and_mtime(f)[0] == 0 for f in out):
        raise CorpusError(f"{flag}: every matched file is empty ({', '.join(map(str, out[:5]))})")
    return out


# Lines longer than this many characters are cut into pieces (at the last whitespace
# within the limit, else hard) before any tokenizer trainer or sentence splitter sees them:
# both are superlinear in the length of one line (a 200 MB one-line file took 5-12 GB in
# the vocab trainer; pysbd took 2.9 s for 100 KB and 20 s for 400 KB). Each cut is counted
# and reported per file. A paragraph is likewise cut once it exceeds this length.
MAX_LINE_CHARS = 10_000
# A file whose undecodable bytes exceed this share of its bytes is not text: refused.
MAX_BAD_BYTE_SHARE = 0.10  # binary data is far above (random bytes: ~50%); mis-encoded prose far below
_READ_BYTES = 1 << 20
_BAD_BYTE = re.compile("[\udc80-\udcff]")


class _FileStats:
    def __init__(self):
        self.bytes = self.bad = self.cuts = 0


def iter_raw_lines(path: pathlib.Path) -> Iterator[str]:
    """The file's lines as UTF-8 text, streamed in bounded memory: undecodable bytes are
    replaced with U+FFFD and counted, lines over MAX_LINE_CHARS are cut into pieces and
    counted; both counts are reported with the file's name at the end. Raises CorpusError
    naming the file when more than MAX_BAD_BYTE_SHARE of its bytes are undecodable
    (a binary file)."""
    stats = _FileStats()
    # surrogateescape maps each undecodable byte to one lone surrogate, which are then
    # counted and replaced in one pass of the regex engine.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    carry = ""
    with storage.path(path).open("rb") as f:
        while True:
            chunk = f.read(_READ_BYTES)
            stats.bytes += len(chunk)
            text, bad = _BAD_BYTE.subn("\ufffd", decoder.decode(chunk, final=not chunk))
            stats.bad += bad
            text = carry + text
            _check_binary(path, stats, final=not chunk)
            lines = text.replace("\r\n", "\n").split("\n")
            carry = lines.pop() if chunk else ""
            for line in lines + ([carry] if not chunk and carry else []):
                yield from _cut(line, stats)
            while len(carry) > MAX_LINE_CHARS:  # an endless line: emit its full pieces now
                piece, carry = _split_at_space(carry)
                stats.cuts += 1
                yield piece
            if not chunk:
                break
    if stats.bad:
        log.warning("%s: replaced %d undecodable byte(s) with U+FFFD", path, stats.bad)
    if stats.cuts:
        log.warning("%s: cut %d over-long line piece(s) at %d characters", path, stats.cuts, MAX_LINE_CHARS)


def _check_binary(path, stats: _FileStats, final: bool) -> None:
    if (final or stats.bytes >= 65536) and stats.bad > MAX_BAD_BYTE_SHARE * max(stats.bytes, 1):
        raise CorpusError(f"{path}: {stats.bad} of its first {stats.bytes} bytes are not UTF-8 text "
                          f"(over {MAX_BAD_BYTE_SHARE:.0%}); is it a binary file? Remove it from the corpus")


def _split_at_space(text: str) -> tuple[str, str]:
    cut = text.rfind(" ", MAX_LINE_CHARS // 2, MAX_LINE_CHARS)
    cut = cut if cut > 0 else MAX_LINE_CHARS
    return text[:cut], text[cut:].lstrip(" ")


def _cut(line: str, stats: _FileStats) -> Iterator[str]:
    while len(line) > MAX_LINE_CHARS:
        piece, line = _split_at_space(line)
        stats.cuts += 1
        yield piece
    yield line


def iter_lines(files: Sequence[pathlib.Path]) -> Iterator[str]:
    """Non-blank stripped lines of every file (over-long ones cut), streamed."""
    for f in files:
        for line in iter_raw_lines(f):
            line = line.strip()
            if line:
                yield line


def paragraphs(path: pathlib.Path) -> Iterator[str]:
    """The file's paragraphs (blocks separated by blank lines), each its lines joined by
    spaces; a paragraph that grows past MAX_LINE_CHARS is emitted in pieces."""
    parts: list[str] = []
    size = 0
    for line in iter_raw_lines(path):
        line = line.strip()
        if not line:
            if parts:
                yield " ".join(parts)
            parts, size = [], 0
            continue
        parts.append(line)
        size += len(line) + 1
        if size > MAX_LINE_CHARS:
            yield " ".join(parts)
            parts, size = [], 0
    if parts:
        yield " ".join(parts)
