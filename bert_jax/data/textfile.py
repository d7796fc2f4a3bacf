"""Reading text files whose lines may be of any length: rows of tab-separated fields,
streamed in 1 MB reads, each field kept up to a number of characters and the rest skipped
unread into memory; and the cut of one text to what a tokenizer truncating at a number of
tokens can use. Every job that tokenizes user text to a fixed length goes through `cut`
(Tokenizer.encode_batch / encode_words), so a 50 MB line costs what its first
max_length x CHARS_PER_TOKEN characters cost, not 9 GB of tokens."""

from __future__ import annotations

import codecs
import pathlib
import re
from typing import Iterator

# Characters kept of one text per token of a length limit: far more than any token spans
# (WordPiece maps a word over 100 characters to one [UNK]), so the kept part tokenizes past
# the limit and the truncated encoding is that of the whole text.
CHARS_PER_TOKEN = 1000

# Where a line ends: str.splitlines' breaks (plain text), or the csv module's (TSV files).
SPLITLINES = "\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]"
CSV_LINES = "\r\n|[\n\r]"


def codec(encoding: str) -> str:
    """The codec that reads `encoding`, a UTF-8 byte-order mark dropped."""
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def cut(text: str, max_chars: int | None) -> str:
    """`text` up to `max_chars` characters, at a space where one is in the second half."""
    if not max_chars or len(text) <= max_chars:
        return text
    text = text[:max_chars]
    space = text.rfind(" ")
    return text[:space] if space > max_chars // 2 else text


def rows(path: str | pathlib.Path, max_chars: int | None = None, *, max_fields: int | None = None,
         breaks: str = SPLITLINES, encoding: str = "utf-8", errors: str = "strict",
         ) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) per line, fields split at TABs (at the first `max_fields - 1`
    of them: the last field keeps later TABs). Each field keeps its first `max_chars` + 1
    characters (one more than `max_chars`, so a caller can tell a cut). A UTF-8 byte-order
    mark is dropped; with errors="strict" an undecodable byte raises UnicodeDecodeError."""
    cap = max_chars + 1 if max_chars else None
    split = re.compile(f"({breaks}|\t)")
    is_break = re.compile(breaks)
    decoder = codecs.getincrementaldecoder(codec(encoding))(errors=errors)
    fields, line = [""], 0
    with open(path, "rb") as f:
        held = ""  # a trailing \r waits for the next read: \r\n is one break
        while True:
            chunk = f.read(1 << 20)
            text = held + decoder.decode(chunk, final=not chunk)
            held = ""
            if chunk and text.endswith("\r"):
                text, held = text[:-1], "\r"
            for piece in split.split(text):
                if not piece:
                    continue
                if piece == "\t" and (max_fields is None or len(fields) < max_fields):
                    fields.append("")
                elif piece != "\t" and is_break.fullmatch(piece):
                    line += 1
                    yield line, fields
                    fields = [""]
                else:
                    room = len(piece) if cap is None else max(cap - len(fields[-1]), 0)
                    fields[-1] += piece[:room]
            if not chunk:
                break
    if fields != [""]:  # a last line without a line break
        yield line + 1, fields
