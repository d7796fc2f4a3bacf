"""The pretraining input pipeline: a grain random-access source over stream positions,
this process's share of every global batch, and device placement.

Stream position p of a run: epoch p // R, row perm_epoch[p % R] (R rows; a row is one
instance, or several packed ones). With instances made on the fly (instances.OnTheFly)
the row is the instance of slot perm_epoch[p % R] of epoch p // R, and perm_epoch is
grain's index_shuffle, a permutation computed per index: nothing grows with the corpus.
Process i of n reads, for global step s, positions
s*G + i*G/n ... s*G + (i+1)*G/n - 1 (G = global batch): no host builds the global batch,
the shares are disjoint and together equal the single-process batch. Masks are keyed on
(seed, p) (masking.example_rng), so the data of a step does not depend on n or restarts.
The grain iterator state goes into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading

import grain
import jax
import numpy as np

from bert_jax.data import instances as inst_lib
from bert_jax.data import masking
from bert_jax.data.cache import TokenizedCorpus

STREAM_LENGTH = 2**50  # positions are unbounded in practice; grain wants a length


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    max_seq_length: int
    objective: str                 # the instance kind (instances.KINDS): nsp | sop | none
    global_batch_size: int
    seed: int
    position_offset: int = 0       # first real position (RoBERTa: pad_id + 1)
    type_vocab_size: int = 2       # 1 (RoBERTa): no segment-B type; pairs are told apart by </s></s>
    max_examples_per_row: int = 1  # > 1 packs several instances per row
    static_masks: int = 0          # K >= 1: masks keyed on (row, epoch % K), not the position
    num_threads: int = 4
    prefetch: int = 64


def pack_rows(lengths: np.ndarray, max_len: int, max_per_row: int, seed: int,
              window: int = 64) -> np.ndarray:
    """First-fit packing of instances (in a seeded random order) into rows of at most
    `max_len` tokens and `max_per_row` instances, looking at the `window` most recent
    open rows. int64 [R, max_per_row], -1 pad."""
    order = np.random.default_rng([seed, 7]).permutation(len(lengths))
    done: list[list[int]] = []
    open_rows: list[tuple[list[int], int]] = []  # (members, tokens used)
    for i in order:
        n = int(lengths[i])
        for j, (members, used) in enumerate(open_rows):
            if used + n <= max_len and len(members) < max_per_row:
                members.append(int(i))
                open_rows[j] = (members, used + n)
                break
        else:
            open_rows.append(([int(i)], n))
            if len(open_rows) > window:
                done.append(open_rows.pop(0)[0])
    done += [m for m, _ in open_rows]
    out = np.full((len(done), max_per_row), -1, np.int64)
    for r, row in enumerate(done):
        out[r, :len(row)] = row
    return out


class PretrainSource:
    """grain RandomAccessDataSource: local index k -> one padded, masked row."""

    def __init__(self, corpus: TokenizedCorpus, instances: np.ndarray, cfg: PipelineConfig,
                 mcfg: masking.MaskingConfig, specials: inst_lib.SpecialIds, vocab_size: int,
                 process_index: int = 0, process_count: int = 1):
        if cfg.global_batch_size % process_count:
            raise ValueError(f"--batch_size={cfg.global_batch_size} is not divisible by the "
                             f"{process_count} processes")
        self.corpus, self.instances, self.cfg, self.mcfg = corpus, instances, cfg, mcfg
        self.specials, self.vocab_size = specials, vocab_size
        self.local_batch = cfg.global_batch_size // process_count
        self.process_index = process_index
        self.on_the_fly = isinstance(instances, inst_lib.OnTheFly)
        if self.on_the_fly:
            if cfg.static_masks:
                raise ValueError(f"--static_masks={cfg.static_masks} needs --instances=prebuilt")
            if cfg.max_examples_per_row > 1:
                raise ValueError(f"--max_examples_per_row={cfg.max_examples_per_row} packs prebuilt instances "
                                 "(their lengths are known ahead): use it with --instances=prebuilt")
            self.rows = None
            self.num_rows = len(instances)
        elif cfg.max_examples_per_row > 1:
            lengths = self._lengths()
            self.rows = pack_rows(lengths, cfg.max_seq_length, cfg.max_examples_per_row, cfg.seed)
        else:
            self.rows = np.arange(len(instances), dtype=np.int64)[:, None]
        if self.rows is not None:
            self.num_rows = len(self.rows)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _lengths(self) -> np.ndarray:
        i = self.instances
        return (i[:, 1] - i[:, 0]) + (i[:, 3] - i[:, 2]) + inst_lib.KINDS[self.cfg.objective].specials

    def __len__(self) -> int:
        return STREAM_LENGTH

    def global_position(self, k: int) -> int:
        step, j = divmod(int(k), self.local_batch)
        return step * self.cfg.global_batch_size + self.process_index * self.local_batch + j

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) > 2:
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.rows))
            return self._perms[epoch]

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        return self.example(self.global_position(k))

    def example(self, pos: int) -> dict[str, np.ndarray]:
        """The row at stream position `pos` (a pure function of seed and pos)."""
        c, L, K = self.cfg, self.cfg.max_seq_length, self.cfg.max_examples_per_row
        epoch, r = divmod(pos, self.num_rows)
        if self.on_the_fly:
            slot = grain.experimental.index_shuffle(r, max_index=self.num_rows - 1, seed=_epoch_seed(c.seed, epoch),
                                                    rounds=4)
            chosen = [self.instances(epoch, slot)]
        else:
            row_id = int(self._perm(epoch)[r])
            chosen = [self.instances[i] for i in self.rows[row_id] if i >= 0]
        parts = [inst_lib.materialize(self.corpus, x, c.objective, self.specials) for x in chosen]
        ids = np.full(L, self.specials.pad, np.int32)
        types = np.zeros(L, np.int32)
        words = np.zeros(L, np.uint8)
        special = np.ones(L, bool)  # padding counts as special: never masked
        seg = np.zeros(L, np.int32)
        positions = np.full(L, max(c.position_offset - 1, 0), np.int32)  # RoBERTa: pad id
        cls_pos = np.zeros(K, np.int32)
        labels = np.zeros(K, np.int32)
        label_w = np.zeros(K, np.float32)
        t = 0
        for e, (p_ids, p_types, p_words, p_special, label) in enumerate(parts):
            n = min(len(p_ids), L - t)
            sl = slice(t, t + n)
            ids[sl], types[sl], words[sl], special[sl] = p_ids[:n], p_types[:n], p_words[:n], p_special[:n]
            seg[sl] = e + 1
            positions[sl] = np.arange(n) + c.position_offset
            cls_pos[e], labels[e], label_w[e] = t, max(label, 0), float(label >= 0)  # -1: no label
            t += n
        if c.type_vocab_size < 2:  # type id 1 would index past a one-row table (NaN, the update skipped)
            types[:] = 0
        if c.static_masks:  # the same K masks of this row whatever the epoch (BERT's static masking)
            rng = masking.example_rng(c.seed, row_id * c.static_masks + epoch % c.static_masks)
        else:
            rng = masking.example_rng(c.seed, pos)
        masked, mpos, mids, mw = masking.mask_tokens(ids, special, words, rng, self.mcfg,
                                                     self.vocab_size, self.specials.mask)
        out = dict(input_ids=masked, token_type_ids=types, attention_mask=(seg > 0).astype(np.int32),
                   masked_positions=mpos, masked_ids=mids, masked_weights=mw,
                   sentence_positions=cls_pos, sentence_labels=labels, sentence_weights=label_w)
        if K > 1:
            out.update(segment_ids=seg, position_ids=positions)
        return out


@functools.lru_cache(maxsize=8)
def _epoch_seed(seed: int, epoch: int) -> int:
    """The 32-bit seed of epoch `epoch`'s order (index_shuffle takes 32 bits)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def make_iterator(source: PretrainSource, state: dict | None = None):
    """A grain iterator of this process's batches (numpy dicts), resumed from `state`."""
    cfg = source.cfg
    ds = grain.MapDataset.source(source).batch(source.local_batch, drop_remainder=True)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                   prefetch_buffer_size=cfg.prefetch)))
    if state is not None:
        it.set_state(state)
    return it


class DevicePrefetcher:
    """Pulls host batches (this process's rows) in a background thread and places them on
    the devices as global jax.Arrays with the data sharding, `depth` steps ahead; or, with
    `place`, whatever the iterator yields through place(item). Each item carries the
    iterator's state *after* its batch (a grain iterator's: what a checkpoint at that step
    saves; None for an iterator without state)."""

    def __init__(self, it, sharding=None, global_batch: int | None = None, depth: int = 2, place=None):
        self._it, self._sharding, self._global_batch = it, sharding, global_batch
        if place is not None:
            self._place = place
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _place(self, batch):
        def one(x):
            shape = (self._global_batch,) + x.shape[1:]
            return jax.make_array_from_process_local_data(self._sharding(x.ndim), x, shape)
        return {k: one(v) for k, v in batch.items()}

    def _run(self):
        try:
            while not self._stop.is_set():
                batch = next(self._it)
                state = self._it.get_state() if hasattr(self._it, "get_state") else None
                item = (self._place(batch), state)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surface errors to the consumer
            self._q.put(e)

    def __next__(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout: float = 60.0):
        """Stop the thread and wait for it (a blocked put gives up within 0.1 s once
        stopped), then close the grain iterator (its worker threads). No thread of ours may
        still run in JAX or grain native code when the interpreter exits: a daemon thread
        there is torn down by pthread_exit, which aborts the process ("FATAL: exception not
        rethrown") after a run that succeeded."""
        self._stop.set()
        self._thread.join(timeout)
        close_iterator(self._it)


def close_iterator(it) -> None:
    """Shut down a grain iterator's prefetch threads (a no-op for iterators without)."""
    close = getattr(it, "close", None)
    if close is not None:
        close()
