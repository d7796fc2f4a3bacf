"""Corpus -> documents -> sentences -> token ids, computed once and cached on disk.

Cache layout (one folder per fingerprint of corpus files + tokenizer + splitting options,
so a second run or another process reuses it; each shard is written to a temporary name
and renamed, so concurrent writers are safe):

    <cache_dir>/<fingerprint>/shard-00000.npz ...   one per source file
        tokens      int32  [T]     token ids, no special tokens
        word_start  uint8  [T]     1 where a token starts a word (whole-word masking)
        sentences   int64  [S+1]   token offset of each sentence start
        documents   int64  [D+1]   sentence offset of each document start
    <cache_dir>/<fingerprint>/DONE
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import pathlib
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, Sequence

import numpy as np
from absl import logging

from bert_jax.data import corpus as corpus_lib
from bert_jax.data.tokenizer import Tokenizer

FORMAT_VERSION = 2  # 2: streamed reading, over-long lines cut, blank-ish lines split paragraphs
# Sentence splitters: pysbd (rule-based, handles abbreviations, quotes and decimals; about
# 0.1 MB/s per core, over 90% of corpus preparation) or blingfire (a compiled finite-state
# splitter, 60-190x faster; on the shared corpora it keeps 85-99% of pysbd's boundaries and
# adds more of its own, mostly in verse and dialogue: see experiments/results/perf.md).
SPLITTERS = ("pysbd", "blingfire")


@dataclasses.dataclass
class TokenizedCorpus:
    """All shards concatenated. Offsets index into `tokens` / `sentences`."""
    tokens: np.ndarray
    word_start: np.ndarray
    sentences: np.ndarray
    documents: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.documents) - 1

    @functools.cached_property
    def document_starts(self) -> np.ndarray:
        """Token offset of each document start, ascending (D+1, the last = len(tokens))."""
        return self.sentences[self.documents]

    def document_starts_inside(self, t0: int, t1: int) -> np.ndarray:
        """Token offsets of the document starts strictly inside (t0, t1), by binary
        search: the cost does not grow with the number of documents."""
        starts = self.document_starts
        return starts[np.searchsorted(starts, t0, "right"):np.searchsorted(starts, t1, "left")]

    def doc_token_range(self, d: int) -> tuple[int, int]:
        return int(self.sentences[self.documents[d]]), int(self.sentences[self.documents[d + 1]])


def fingerprint(files: Sequence[pathlib.Path], tokenizer: Tokenizer, document_boundary: str,
                splitter: str = "pysbd") -> str:
    h = hashlib.sha256()
    key = [FORMAT_VERSION, tokenizer.fingerprint(), document_boundary] + ([splitter] if splitter != "pysbd" else [])
    h.update(json.dumps(key).encode())
    for f in files:
        h.update(str(f.resolve()).encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())  # streamed
    return h.hexdigest()[:16]


def splitter_fn(name: str):
    """paragraph -> its sentences, by the splitter `name` (SPLITTERS)."""
    if name == "pysbd":
        import pysbd
        return pysbd.Segmenter(language="en", clean=False).segment
    if name == "blingfire":
        import blingfire
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


def _tokenize_file(args) -> dict[str, np.ndarray]:
    """One file's tokens, word starts, sentence and document offsets, built in batches of
    sentences as numpy arrays (memory stays a few bytes per token), with progress on
    stderr for large files."""
    path, tokenizer_dir, document_boundary, splitter = args
    tok = Tokenizer.load(tokenizer_dir)
    tokens, word_start, sent_lens, doc_lens = [], [], [], []
    pending: list[str] = []
    chars = next_report = 0

    def flush():  # one array per batch of sentences: no per-sentence objects are kept
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
        tokens.append(np.concatenate(ids_b))
        word_start.append(np.concatenate(starts_b))
        sent_lens.append(np.asarray(lens_b, np.int64))
        pending.clear()

    for sentences, new_doc in sentence_stream(pathlib.Path(path), document_boundary, splitter):
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
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
    return dict(tokens=cat(tokens, np.int32), word_start=cat(word_start, np.uint8),
                sentences=np.concatenate([[0], np.cumsum(cat(sent_lens, np.int64))]).astype(np.int64),
                documents=np.concatenate([[0], np.cumsum(doc_lens, dtype=np.int64)]).astype(np.int64))


def build(files: Sequence[pathlib.Path], tokenizer: Tokenizer, tokenizer_dir: str | pathlib.Path,
          cache_dir: str | pathlib.Path, document_boundary: str = "file",
          workers: int | None = None, splitter: str = "pysbd") -> TokenizedCorpus:
    """Tokenize `files` into the cache (if not there yet) and load it."""
    if document_boundary not in ("file", "blank_line"):
        raise ValueError(f"--document_boundary={document_boundary!r}: must be file or blank_line")
    splitter_fn(splitter)  # an unknown name fails before any work
    folder = pathlib.Path(cache_dir) / fingerprint(files, tokenizer, document_boundary, splitter)
    if not (folder / "DONE").exists():
        folder.mkdir(parents=True, exist_ok=True)
        todo = [(i, f) for i, f in enumerate(files) if not (folder / f"shard-{i:05d}.npz").exists()]
        logging.info("tokenizing %d file(s) into %s", len(todo), folder)
        jobs = [(str(f), str(tokenizer_dir), document_boundary, splitter) for _, f in todo]
        workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
        if workers > 1:
            # spawn, not fork: the parent runs JAX threads, which fork would deadlock.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                results = pool.map(_tokenize_file, jobs, chunksize=4)
                for (i, _), shard in zip(todo, results):
                    _write_shard(folder / f"shard-{i:05d}.npz", shard)
        else:
            for (i, _), job in zip(todo, jobs):
                _write_shard(folder / f"shard-{i:05d}.npz", _tokenize_file(job))
        (folder / "DONE").write_text(json.dumps([str(f) for f in files]))
    return load(folder, len(files))


def _write_shard(path: pathlib.Path, shard: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    np.savez(tmp, **shard)
    os.replace(tmp, path)


def load(folder: pathlib.Path, n_shards: int) -> TokenizedCorpus:
    tokens, word_start, sentences, documents = [], [], [np.zeros(1, np.int64)], [np.zeros(1, np.int64)]
    t_off = s_off = 0
    for i in range(n_shards):
        with np.load(folder / f"shard-{i:05d}.npz", allow_pickle=False) as z:
            tokens.append(z["tokens"])
            word_start.append(z["word_start"])
            sentences.append(z["sentences"][1:] + t_off)
            documents.append(z["documents"][1:] + s_off)
            t_off += len(z["tokens"])
            s_off += len(z["sentences"]) - 1
    if t_off == 0:
        raise corpus_lib.CorpusError(f"the corpus yields no tokens (cache {folder})")
    return TokenizedCorpus(np.concatenate(tokens), np.concatenate(word_start),
                           np.concatenate(sentences).astype(np.int64), np.concatenate(documents).astype(np.int64))
