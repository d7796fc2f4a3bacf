"""Corpus -> documents -> sentences -> token ids, prepared once into memory-mapped files.

Layout of one prepared corpus (one folder per fingerprint of the corpus files' paths,
sizes and modification times + tokenizer + splitting options, so a start neither
re-reads nor re-hashes the text):

    <cache_dir>/<fingerprint>/parts/<i>/...    one per source file, while preparing
    <cache_dir>/<fingerprint>/tokens.bin       uint16 (vocab <= 65536) or int32 [T]
                              word_start.bin   uint8 [T]   1 where a token starts a word
                              sentences.bin    int64 [S+1] token offset of each sentence
                              documents.bin    int64 [D+1] sentence offset of each document
                              doc_starts.bin   int64 [D+1] token offset of each document
                              index.json       counts, dtypes, the files; written last

Preparation scales out: each of n processes (hosts) tokenizes the files i with
i % n == its index, with a pool of worker processes; a worker streams its file and
appends to its part's files in batches of sentences, so memory stays bounded whatever the
file's size. Parts are written to a temporary name and renamed, so a preparation that is
stopped and started again skips the finished ones. One process then concatenates the
parts (streamed) into the arrays above; training reads them by slices (tokens) or
memory-mapped (offsets), so host memory does not grow with the corpus.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import mmap
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Sequence

import blingfire
import numpy as np
import pysbd
from absl import logging

from bert_jax import storage
from bert_jax.data import corpus as corpus_lib
from bert_jax.data.tokenizer import Tokenizer

# 3: memory-mapped arrays, parts per file, stat-based fingerprint (2: one .npz per file)
FORMAT_VERSION = 3
# Sentence splitters: pysbd (rule-based, handles abbreviations, quotes and decimals; about
# 0.1 MB/s per core, over 90% of corpus preparation) or blingfire (a compiled finite-state
# splitter, 60-190x faster; on the shared corpora it keeps 85-99% of pysbd's boundaries and
# adds more of its own, mostly in verse and dialogue: see experiments/results/perf.md).
SPLITTERS = ("pysbd", "blingfire")
_ARRAYS = ("tokens", "word_start", "sentences", "documents", "doc_starts")


@dataclasses.dataclass
class TokenizedCorpus:
    """A prepared corpus (memory-mapped when loaded from the cache). Offsets index into
    `tokens` / `sentences`."""
    tokens: np.ndarray
    word_start: np.ndarray
    sentences: np.ndarray
    documents: np.ndarray
    doc_starts: np.ndarray | None = None
    # What was read: {path, size, mtime_ns, sha256} per file (None: prepared before they were kept).
    sources: list[dict] | None = None

    @property
    def num_documents(self) -> int:
        return len(self.documents) - 1

    @functools.cached_property
    def document_starts(self) -> np.ndarray:
        """Token offset of each document start, ascending (D+1, the last = len(tokens))."""
        return self.doc_starts if self.doc_starts is not None else self.sentences[self.documents]

    def document_starts_inside(self, t0: int, t1: int) -> np.ndarray:
        """Token offsets of the document starts strictly inside (t0, t1), by binary
        search: the cost does not grow with the number of documents."""
        starts = self.document_starts
        return starts[np.searchsorted(starts, t0, "right"):np.searchsorted(starts, t1, "left")]

    def doc_token_range(self, d: int) -> tuple[int, int]:
        return int(self.sentences[self.documents[d]]), int(self.sentences[self.documents[d + 1]])


def fingerprint(files: Sequence[pathlib.Path], tokenizer: Tokenizer, document_boundary: str,
                splitter: str = "pysbd") -> str:
    """Of the options and of each file's resolved path, size and modification time: a
    changed file gets a new preparation, and a start reads no text to know it."""
    h = hashlib.sha256()
    key = [FORMAT_VERSION, tokenizer.fingerprint(), document_boundary, splitter]
    for f in files:
        key.append([os.fspath(storage.resolve(f)), *storage.size_and_mtime(f)])
    h.update(json.dumps(key).encode())
    return h.hexdigest()[:16]


def splitter_fn(name: str):
    """paragraph -> its sentences, by the splitter `name` (SPLITTERS)."""
    if name == "pysbd":
        return pysbd.Segmenter(language="en", clean=False).segment
    if name == "blingfire":
        return lambda p: blingfire.text_to_sentences(p).split("\n")
    raise ValueError(f"--sentence_splitter={name!r}: must be one of {SPLITTERS}")


def sentence_stream(path: pathlib.Path, document_boundary: str,
                    splitter: str = "pysbd") -> Iterator[tuple[list[str], bool]]:
    """(sentences of one paragraph, whether they start a new document), streamed: the
    splitter (SPLITTERS) splits each paragraph; over-long paragraphs are cut first
    (corpus.MAX_LINE_CHARS). Documents are the file, or each paragraph with
    document_boundary=blank_line."""
    split = splitter_fn(splitter)
    first = True
    for p in corpus_lib.paragraphs(path):
        sentences = [s.strip() for s in split(p) if s.strip()]
        if sentences:
            yield sentences, first or document_boundary == "blank_line"
            first = False


def split_documents(path: pathlib.Path, document_boundary: str) -> list[list[str]]:
    """A file's documents, each a list of sentences (sentence_stream, collected)."""
    docs: list[list[str]] = []
    for sentences, new_doc in sentence_stream(path, document_boundary):
        if new_doc:
            docs.append([])
        docs[-1].extend(sentences)
    return docs


_BATCH_SENTENCES = 4096
_PROGRESS_EVERY_CHARS = 20_000_000
# A part: the file's tokens and word starts, its sentences' token lengths and its
# documents' sentence counts, appended as raw arrays; meta.json holds the counts.
_PART_FILES = dict(tokens=np.int32, word_start=np.uint8, sentence_lengths=np.int64, document_sentences=np.int64)


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_dir: str) -> Tokenizer:  # once per worker process, not per file
    return Tokenizer.load(tokenizer_dir)


def _tokenize_file(args) -> dict:
    """Tokenize one file into the part folder `out`, streamed: batches of sentences are
    appended to the part's files, so memory stays bounded; progress on stderr for large
    files. Written to a temporary folder and renamed when complete. Returns its counts."""
    path, tokenizer_dir, document_boundary, splitter, out = args
    out = pathlib.Path(out)
    source = file_record(path)  # in the parallel pass: a resumed run compares it, never rehashing all
    tok = _tokenizer(tokenizer_dir)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    fh = {k: open(tmp / f"{k}.bin", "wb") for k in _PART_FILES}
    counts = dict.fromkeys(_PART_FILES, 0)
    pending: list[str] = []
    doc_lens: list[int] = []
    chars = next_report = 0

    def write(k, a):
        fh[k].write(np.ascontiguousarray(a, _PART_FILES[k]).tobytes())
        counts[k] += len(a)

    def flush():
        if not pending:
            return
        ids_b, starts_b, lens_b = [], [], []
        for ids, words in tok.tokenize_batch(pending):
            w = np.asarray([-1 if x is None else x for x in words], np.int64)
            starts = np.ones(len(ids), np.uint8)
            starts[1:] = w[1:] != w[:-1]
            ids_b.append(np.asarray(ids, np.int32))
            starts_b.append(starts)
            lens_b.append(len(ids))
        write("tokens", np.concatenate(ids_b))
        write("word_start", np.concatenate(starts_b))
        write("sentence_lengths", np.asarray(lens_b))
        pending.clear()
        if len(doc_lens) > 1:  # finished documents
            write("document_sentences", np.asarray(doc_lens[:-1]))
            del doc_lens[:-1]

    try:
        for sentences, new_doc in sentence_stream(storage.path(path), document_boundary, splitter):
            if new_doc:
                doc_lens.append(0)
            doc_lens[-1] += len(sentences)
            pending.extend(sentences)
            chars += sum(map(len, sentences))
            if len(pending) >= _BATCH_SENTENCES:
                flush()
            if chars >= next_report + _PROGRESS_EVERY_CHARS:
                next_report = chars
                print(f"tokenizing {path}: {chars / 1e6:.0f}M characters so far", file=sys.stderr, flush=True)
        flush()
        if doc_lens:
            write("document_sentences", np.asarray(doc_lens))
    finally:
        for f in fh.values():
            f.close()
    counts["chars"] = chars
    (tmp / "meta.json").write_text(json.dumps(dict(file=str(path), source=source, **counts)))
    try:
        os.replace(tmp, out)  # atomic; a concurrent writer of the same part may have won
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _part_files(files, process_index: int, process_count: int):
    return [(i, f) for i, f in enumerate(files) if i % process_count == process_index]


def prepare_parts(files: Sequence[pathlib.Path], tokenizer_dir, folder: pathlib.Path, document_boundary: str,
                  splitter: str, workers: int | None = None, process_index: int = 0,
                  process_count: int = 1) -> None:
    """Tokenize this process's share of `files` (i % process_count == process_index) into
    parts under `folder`, skipping finished parts, with `workers` worker processes."""
    parts = folder / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    todo = [(i, f) for i, f in _part_files(files, process_index, process_count)
            if not (parts / f"{i:05d}").exists()]
    if not todo:
        return
    logging.info("process %d/%d: tokenizing %d file(s) into %s", process_index, process_count, len(todo), folder)
    jobs = [(str(f), str(tokenizer_dir), document_boundary, splitter, str(parts / f"{i:05d}")) for i, f in todo]
    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    t = time.perf_counter()
    if workers > 1:
        # spawn, not fork: the parent runs JAX threads, which fork would deadlock.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            chars = sum(c["chars"] for c in pool.map(_tokenize_file, jobs))
    else:
        chars = sum(_tokenize_file(job)["chars"] for job in jobs)
    dt = time.perf_counter() - t
    logging.info("process %d/%d: %d file(s), %.1f MB of text in %.1f s (%.2f MB/s with %d worker(s))",
                 process_index, process_count, len(jobs), chars / 1e6, dt, chars / 1e6 / max(dt, 1e-9), workers)


_COPY_ITEMS = 1 << 20  # items per copy when merging parts: 4 MB of int32, whatever the corpus


def merge_parts(files: Sequence[pathlib.Path], folder: pathlib.Path, vocab_size: int) -> None:
    """Concatenate the parts of every file, streamed in bounded memory, into the corpus
    arrays; index.json is written last (a folder without it is not a prepared corpus)."""
    metas = []
    for i in range(len(files)):
        meta = folder / "parts" / f"{i:05d}" / "meta.json"
        if not meta.exists():
            raise corpus_lib.CorpusError(f"{files[i]}: not prepared (no {meta}); was a process stopped?")
        metas.append(json.loads(meta.read_text()))
    token_dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    # Into a private folder, then renamed into place: another job preparing the same corpus
    # (a sweep's parallel runs share a cache) may merge at the same time; both write the
    # same bytes, and index.json, renamed last, says the arrays are complete.
    tmp_dir = pathlib.Path(tempfile.mkdtemp(dir=folder, prefix=".merge"))
    out = {k: open(tmp_dir / f"{k}.bin", "wb") for k in _ARRAYS}
    t_off = s_off = 0
    try:
        out["sentences"].write(np.zeros(1, np.int64).tobytes())
        out["documents"].write(np.zeros(1, np.int64).tobytes())
        out["doc_starts"].write(np.zeros(1, np.int64).tobytes())
        for i, m in enumerate(metas):
            part = folder / "parts" / f"{i:05d}"
            for k, dt in (("tokens", token_dtype), ("word_start", np.uint8)):
                for chunk in _chunks(part / f"{k}.bin", _PART_FILES[k], m[k]):
                    out[k].write(chunk.astype(dt).tobytes())
            sent_ends = np.cumsum(np.fromfile(part / "sentence_lengths.bin", np.int64)) + t_off
            out["sentences"].write(sent_ends.astype(np.int64).tobytes())
            doc_ends = np.cumsum(np.fromfile(part / "document_sentences.bin", np.int64)) + s_off
            out["documents"].write(doc_ends.tobytes())
            sent_starts = np.concatenate([[t_off], sent_ends])
            out["doc_starts"].write(sent_starts[doc_ends - s_off].astype(np.int64).tobytes())
            t_off += m["tokens"]
            s_off += m["sentence_lengths"]
    finally:
        for f in out.values():
            f.close()
    if t_off == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise corpus_lib.CorpusError(f"the corpus yields no tokens ({', '.join(map(str, files[:5]))})")
    for k in _ARRAYS:
        os.replace(tmp_dir / f"{k}.bin", folder / f"{k}.bin")
    index = dict(format=FORMAT_VERSION, tokens=t_off, sentences=s_off,
                 documents=sum(m["document_sentences"] for m in metas), token_dtype=np.dtype(token_dtype).name,
                 files=[str(f) for f in files], chars=sum(m["chars"] for m in metas),
                 sources=[m.get("source") for m in metas])
    (tmp_dir / "index.json").write_text(json.dumps(index))
    os.replace(tmp_dir / "index.json", folder / "index.json")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    shutil.rmtree(folder / "parts", ignore_errors=True)


def _chunks(path: pathlib.Path, dtype, n: int) -> Iterator[np.ndarray]:
    """The `n` items of a part file in reads of _COPY_ITEMS (read, not memory-mapped: mapped
    pages stay resident, so a mapping grew the process by the size of the corpus)."""
    size = np.dtype(dtype).itemsize
    for s in range(0, n, _COPY_ITEMS):
        yield np.fromfile(path, dtype, count=min(_COPY_ITEMS, n - s), offset=s * size)


def folder_for(files: Sequence[pathlib.Path], tokenizer: Tokenizer, cache_dir, document_boundary: str,
               splitter: str) -> pathlib.Path:
    if document_boundary not in ("file", "blank_line"):
        raise ValueError(f"--document_boundary={document_boundary!r}: must be file or blank_line")
    splitter_fn(splitter)  # an unknown name fails before any work
    return pathlib.Path(cache_dir) / fingerprint(files, tokenizer, document_boundary, splitter)


def is_prepared(folder: pathlib.Path) -> bool:
    return (folder / "index.json").exists()


def build(files: Sequence[pathlib.Path], tokenizer: Tokenizer, tokenizer_dir: str | pathlib.Path,
          cache_dir: str | pathlib.Path, document_boundary: str = "file",
          workers: int | None = None, splitter: str = "pysbd", process_index: int = 0, process_count: int = 1,
          barrier: Callable[[str], None] | None = None) -> TokenizedCorpus:
    """Prepare `files` into the cache (if not there yet) and load it memory-mapped. With
    several processes each prepares its share, `barrier(name)` waits for all of them, and
    process 0 merges."""
    folder = folder_for(files, tokenizer, cache_dir, document_boundary, splitter)
    # Every process passes both barriers whatever it finds: another job may finish the same
    # preparation at any moment, and processes that decided differently would wait forever.
    if not is_prepared(folder):
        _unless_prepared_meanwhile(folder, lambda: prepare_parts(
            files, tokenizer_dir, folder, document_boundary, splitter, workers, process_index, process_count))
    if barrier:
        barrier(f"parts:{folder.name}")
    if process_index == 0 and not is_prepared(folder):
        _unless_prepared_meanwhile(folder, lambda: merge_parts(files, folder, tokenizer.vocab_size))
    if barrier:
        barrier(f"merged:{folder.name}")
    return load(folder)


def _unless_prepared_meanwhile(folder: pathlib.Path, fn) -> None:
    """Run a preparation step; if it fails because another job finished the same
    preparation meanwhile (and removed its parts), the corpus is there: go on."""
    try:
        fn()
    except (OSError, corpus_lib.CorpusError):
        if not is_prepared(folder):
            raise
        logging.info("%s was prepared meanwhile by another job", folder)


class FileArray:
    """A read-only 1-D array in a file, read by slices with os.pread (thread-safe, no shared
    file position): the pages read stay in the OS page cache, not in this process, so the
    token arrays (the bulk of a corpus) add nothing to its resident memory however long a
    run reads them. Supports len(), slicing, integer indexing and np.asarray."""

    def __init__(self, path: pathlib.Path, dtype, n: int):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), (n,)
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("FileArray: only contiguous slices")
            n = max(stop - start, 0)
            size = self.dtype.itemsize
            return np.frombuffer(os.pread(self._fd, n * size, start * size), self.dtype) if n else \
                np.zeros(0, self.dtype)
        i = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"index {key} out of range for {len(self)}")
        return self[i:i + 1][0]

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a.astype(dtype) if dtype is not None else a

    def __del__(self):
        try:
            os.close(self._fd)
        except (OSError, AttributeError):
            pass


def load(folder: pathlib.Path) -> TokenizedCorpus:
    """The prepared corpus in `folder`: tokens and word starts read by slices (FileArray),
    the offset arrays memory-mapped (binary searches touch a few pages each; readahead is
    turned off, as access is random)."""
    index = json.loads((folder / "index.json").read_text())
    if index.get("format") != FORMAT_VERSION:
        raise corpus_lib.CorpusError(f"{folder}: prepared by another format ({index.get('format')})")
    n = dict(tokens=index["tokens"], word_start=index["tokens"], sentences=index["sentences"] + 1,
             documents=index["documents"] + 1, doc_starts=index["documents"] + 1)
    dtypes = dict(tokens=index["token_dtype"], word_start="uint8", sentences="int64",
                  documents="int64", doc_starts="int64")
    arrays = {}
    for k in _ARRAYS:
        path = folder / f"{k}.bin"
        if path.stat().st_size != n[k] * np.dtype(dtypes[k]).itemsize:
            raise corpus_lib.CorpusError(f"{path}: {path.stat().st_size} bytes, expected "
                                         f"{n[k]} x {dtypes[k]}; the prepared corpus is damaged: delete {folder}")
        if k in ("tokens", "word_start"):
            arrays[k] = FileArray(path, dtypes[k], n[k])
        else:
            arrays[k] = np.memmap(path, dtypes[k], "r", shape=(n[k],))
            arrays[k]._mmap.madvise(mmap.MADV_RANDOM)
    sources = index.get("sources")
    return TokenizedCorpus(**arrays, sources=sources if sources and all(sources) else None)


def file_record(path) -> dict:
    """{path, size, mtime_ns, sha256} of a corpus file: what a run read (sha256 of its bytes,
    streamed)."""
    size, mtime = storage.size_and_mtime(path)
    h = hashlib.sha256()
    with storage.path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return dict(path=os.fspath(storage.resolve(path)), size=size, mtime_ns=mtime, sha256=h.hexdigest())


def changed_sources(saved: list[dict], files: Sequence[pathlib.Path]) -> list[str]:
    """How `files` differ from the `saved` records (file_record): files added or gone, and
    files whose size or modification time changed and whose bytes (hashed now) are not
    the recorded ones. A file edited in place to the same size with its modification time
    set back is not seen: that would need every start to hash the whole corpus."""
    now = {os.fspath(storage.resolve(f)): f for f in files}
    old = {r["path"]: r for r in saved}
    out = [f"{p} was added" for p in sorted(set(now) - set(old))]
    out += [f"{p} is gone" for p in sorted(set(old) - set(now))]
    for p in sorted(set(now) & set(old)):
        size, mtime = storage.size_and_mtime(now[p])
        if (size, mtime) == (old[p]["size"], old[p]["mtime_ns"]):
            continue
        sha = file_record(now[p])["sha256"]  # touched but the same bytes is no change
        if sha != old[p]["sha256"]:
            out.append(f"{p} changed ({old[p]['size']} -> {size} bytes, sha256 {old[p]['sha256'][:12]} -> {sha[:12]})")
    return out
