"""Pretraining state and the jitted, sharded train step.

The state is created already sharded: `jax.eval_shape` of the init gives the logical
names, `sharding.mesh_shardings` turns them into NamedShardings, and the init is jitted
with those as out_shardings. The step is jitted with explicit in/out shardings and donates
the old state. Gradient accumulation scans over microbatches inside the step. A step
whose loss, gradients or updated params are not finite leaves params and optimizer state
unchanged and is counted. Microbatch losses are sums divided by the whole batch's counts, so
accumulation gives the big batch's loss and gradient exactly.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import signal
import sys
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from bert_jax import options, sharding, storage
from bert_jax.interop import rename
from bert_jax.model.config import ConfigError, ModelConfig
from bert_jax.model.heads import PreTrainingModel, build_model


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_total: jax.Array     # updates skipped so far
    nonfinite_streak: jax.Array    # consecutive skipped updates


def _init_boxed(cfg: ModelConfig, tx: optax.GradientTransformation, seq_len: int, rng,
                task: str = "pretraining"):
    model = build_model(cfg, task)
    init_rng, run_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return new_state(params, tx, run_rng)


def new_state(params, tx: optax.GradientTransformation, run_rng) -> TrainState:
    """The state at step 0 around `params`; `run_rng` keys dropout."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(run_rng), nonfinite_total=jnp.zeros((), jnp.int32),
                      nonfinite_streak=jnp.zeros((), jnp.int32))


def state_shardings(cfg: ModelConfig, tx, seq_len: int, mesh, task: str = "pretraining") -> tuple[Any, Any]:
    """(abstract unboxed state, its NamedShardings) of the `task` model (heads.TASKS)."""
    boxed = jax.eval_shape(lambda r: _init_boxed(cfg, tx, seq_len, r, task), jax.random.key(0))
    return nn.unbox(boxed), nn.unbox(sharding.mesh_shardings(boxed, mesh))


def create_state(cfg: ModelConfig, tx, seq_len: int, seed: int, mesh, shard=None,
                 task: str = "pretraining") -> TrainState:
    """The initial state, born sharded (`shard`: state_shardings' second result, if the
    caller has it already)."""
    if shard is None:
        _, shard = state_shardings(cfg, tx, seq_len, mesh, task)
    init = jax.jit(lambda r: nn.unbox(_init_boxed(cfg, tx, seq_len, r, task)), out_shardings=shard)
    with jax.set_mesh(mesh):
        return init(jax.random.key(seed))


def place(x, sharding):
    """Host array `x` (every process holds it whole) as an array laid out by `sharding`:
    each device gets its slice, converted once here, not once per device."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def state_around(params, tx, seed: int, shard, mesh) -> TrainState:
    """The step-0 state around `params` (arrays already placed as `shard.params`): a fresh
    optimizer, and the dropout key that create_state gives a run of `seed`."""
    run_rng = jax.random.split(jax.random.key(seed))[1]
    with jax.set_mesh(mesh):
        return jax.jit(lambda p: new_state(p, tx, run_rng), out_shardings=shard)(params)


def check_batch(batch_size: int, grad_accum: int, mesh) -> None:
    """The global batch is placed split over the data-parallel devices (data x fsdp) and
    the processes, and cut into `grad_accum` microbatches: checked before any data is
    read. Microbatches that do not split evenly over the devices still run (XLA reshards
    them) but leave devices idle: a warning."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    need = math.lcm(shards, jax.process_count(), grad_accum)
    if batch_size % need:
        raise ConfigError(
            f"--batch_size={batch_size} must divide evenly into --grad_accum={grad_accum} microbatches, "
            f"over the {shards} data-parallel devices (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}, "
            f"tensor={mesh.shape['tensor']}) and over the {jax.process_count()} process(es): "
            f"use a multiple of {need}")
    if (batch_size // grad_accum) % shards:
        logging.warning("microbatches of %d rows do not split over the %d data-parallel devices: "
                        "XLA reshards them and some devices idle", batch_size // grad_accum, shards)


def take_backbone(fresh: dict, source: dict, where: str, take: Callable, error: type[Exception]) -> tuple[dict, bool]:
    """The `fresh` backbone (its parts: embeddings, encoder, pooler) with each part taken
    from `source`'s backbone by `take(source_part, fresh_part)` after its shapes are checked;
    a pooler the source lacks (RoBERTa pretraining) stays fresh. Returns (backbone, whether
    the pooler is fresh). Errors are `error`s naming --init_checkpoint=`where` and the param:
    both loops start from a checkpoint through here."""
    src = source.get("backbone")
    if src is None:
        raise error(f"--init_checkpoint={where}: no backbone params")
    merged, pooler_fresh = {}, False
    for k, v in fresh.items():
        if k not in src:
            if k != "pooler":
                raise error(f"--init_checkpoint={where}: param backbone/{k} is missing")
            merged[k], pooler_fresh = v, True
            continue
        check_init_part(src[k], v, where, f"backbone/{k}", error)
        merged[k] = take(src[k], v)
    return merged, pooler_fresh


def check_init_part(src, like, where: str, name: str, error: type[Exception]) -> None:
    """Raise `error` naming --init_checkpoint=`where` and the param when the part `name` of
    the checkpoint (`src`) is not shaped as the model's (`like`)."""
    try:
        rename.check_shapes(src, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like))
    except rename.RenameError as e:
        raise error(f"--init_checkpoint={where}: {e} (under {name})") from None


def global_batch(arrays: dict, rows, batch_sharding_fn: Callable[[int], NamedSharding]) -> dict:
    """The global batch of `rows` (indices into `arrays`, which every process holds
    whole) as sharded arrays; each process places only its own contiguous share."""
    n, p, i = len(rows), jax.process_count(), jax.process_index()
    mine = rows[i * n // p:(i + 1) * n // p]
    return {k: jax.make_array_from_process_local_data(batch_sharding_fn(v.ndim), v[mine], (n,) + v.shape[1:])
            for k, v in arrays.items()}


# ---------------------------------------------------------------------------- loss ----
def pretraining_loss(cfg: ModelConfig, params, batch, dropout_rng, deterministic=False,
                     denominators=None):
    """The pretraining model on `batch`, scored by cfg's objective (objectives.py):
    (loss, metrics of sums and counts, so microbatches and hosts add up)."""
    out = PreTrainingModel(cfg).apply(
        {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
        batch["masked_positions"], batch.get("position_ids"), batch.get("segment_ids"),
        sentence_positions_BxK=batch["sentence_positions"], deterministic=deterministic,
        rngs=None if deterministic else {"dropout": dropout_rng})
    return cfg.pretraining_objective.loss(out, batch, denominators)


# ---------------------------------------------------------------------------- step ----
def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, grad_accum: int,
                    state_sharding, batch_sharding_fn: Callable[[int], NamedSharding],
                    example_batch: dict, mesh):
    """The pretraining step: make_step with pretraining_loss."""
    return make_step(lambda params, mb, rng, den: pretraining_loss(cfg, params, mb, rng, denominators=den),
                     tx, grad_accum, state_sharding, batch_sharding_fn, example_batch, mesh,
                     cfg.pretraining_objective.denominators)


def make_step(loss_fn: Callable, tx: optax.GradientTransformation, grad_accum: int, state_sharding,
              batch_sharding_fn: Callable[[int], NamedSharding], example_batch: dict, mesh,
              denominators_fn: Callable | None = None):
    """jit(step)(state, batch) -> (state, metrics), for any loss:
    `loss_fn(params, microbatch, dropout_rng, denominators) -> (loss, metrics of sums)`,
    with `denominators_fn(batch)` the whole batch's counts (None: each microbatch's loss
    is a mean and is averaged over the microbatches). `batch` leading dim is the global
    batch; with grad_accum = A it is split into A microbatches scanned in order."""
    def step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        scale = 1.0 if denominators_fn else 1.0 / grad_accum

        def micro(carry, mb_and_i):
            g_acc, m_acc = carry
            mb, i = mb_and_i
            grad_fn = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)
            (loss, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), denominators)
            g_acc = jax.tree.map(lambda a, b: a + b * scale, g_acc, g)
            m = dict(m, loss=loss * scale)
            m_acc = jax.tree.map(jnp.add, m_acc, m)
            return (g_acc, m_acc), None

        # global counts: sums divided once
        denominators = denominators_fn(batch) if denominators_fn else None
        split = lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:])
        micro_batches = jax.tree.map(split, batch)
        zeros_g = jax.tree.map(jnp.zeros_like, state.params)
        m_shape = jax.eval_shape(lambda: loss_fn(
            state.params, jax.tree.map(lambda x: x[0], micro_batches), rng, denominators)[1])
        zeros_m = {k: jnp.zeros((), jnp.float32) for k in list(m_shape) + ["loss"]}
        (grads, metrics), _ = jax.lax.scan(micro, (zeros_g, zeros_m),
                                           (micro_batches, jnp.arange(grad_accum)))
        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # What is applied is checked, not only its inputs: a finite gradient can still give
        # a non-finite update (e.g. Adam with eps=0 on a row whose gradient is 0).
        params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)]))
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & params_finite
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        skipped = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite_total=state.nonfinite_total + skipped,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
        metrics.update(grad_norm=grad_norm, finite=finite.astype(jnp.float32))
        return new_state, metrics

    batch_sh = {k: batch_sharding_fn(v.ndim) for k, v in example_batch.items()}
    rep = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_sharding, batch_sh), out_shardings=(state_sharding, rep),
                   donate_argnums=0)


def release_free_memory() -> None:
    """Give the heap's free memory back to the OS (glibc's malloc_trim; a no-op elsewhere).
    Compiling a train step frees hundreds of MB that glibc keeps in the process's heap, and
    the step's own temporaries then come on top of it: trimming once the step is compiled
    lowers a fine-tuning run's peak RSS by ~0.35 GB (MiniLM, SST-2: 2.84 -> 2.49 GB)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def wait_previous(previous, current):
    """Wait for the previous step's result (a wait, not a copy) and return the current one:
    at most two steps are queued. XLA's CPU collectives can deadlock when many steps of a
    multi-device mesh are queued, and a bounded queue loses nothing on accelerators."""
    if previous is not None:
        previous.block_until_ready()
    return current


@jax.jit
def _accumulate(acc, m, streak):
    out = {k: acc[k] + v for k, v in m.items()}
    out.update(steps=acc["steps"] + 1, worst_streak=jnp.maximum(acc["worst_streak"], streak))
    return out


def accumulate(acc: dict | None, m: dict, streak) -> dict:
    """Step metrics summed on the device (no host copy), with the number of steps and the
    longest run of non-finite updates seen; `acc` None starts a new sum."""
    if acc is None:
        acc = jax.tree.map(jnp.zeros_like, dict(m, steps=jnp.zeros((), jnp.float32),
                                                worst_streak=jnp.zeros((), jnp.int32)))
    return _accumulate(acc, m, streak)


def make_eval_step(cfg: ModelConfig):
    def step(params, batch):
        return pretraining_loss(cfg, params, batch, None, deterministic=True)[1]
    return jax.jit(step)


# ------------------------------------------------------------ run plumbing ----
class StopOnSigterm:
    """SIGTERM (a scheduler's preemption notice, e.g. SLURM's before the time limit) stops
    the loop at one step where it checkpoints and exits 0.

    One process: a Python handler sets a flag; the loop stops after the current step.
    Several processes (jax.distributed): JAX's preemption sync manager takes SIGTERM on any
    process, tells the others through the coordination service, and every process learns
    the same safe step from `reached(step)` (multihost_utils.reached_preemption_sync_point,
    called once per step), so all save the same checkpoint, however far apart the signals
    arrive. No Python handler is installed then: it would replace JAX's."""

    def __init__(self):
        self.requested = False
        self._old = None
        self._synced = False

    def __enter__(self):
        # jax.distributed.initialize starts the preemption sync service unless it is turned off
        self._synced = (jax.process_count() > 1 and jax.distributed.is_initialized()
                        and jax.config.jax_enable_preemption_service)
        if self._synced:
            return self
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread (e.g. called from a test thread)
            self._old = None
        return self

    def _handler(self, signum, frame):
        logging.warning("SIGTERM: checkpointing at the current step, then exiting")
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step` (call once per step, in order)."""
        if self._synced and not self.requested:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                logging.warning("preemption notice (SIGTERM): all %d processes checkpoint at step %d, then exit",
                                jax.process_count(), step)
                self.requested = True
        return self.requested

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def use_compilation_cache(setting: str, workdir) -> str | None:
    """Point JAX's persistent compilation cache at `setting` ('' = $BERT_JAX_COMPILATION_CACHE
    if set, else <workdir>/compilation_cache; 'off' = none; see the compilation_cache
    option, for the jobs without a workdir: None); returns the folder. Programs that take
    over 0.2 s to compile are stored there, so a rerun loads them instead."""
    setting = setting or os.environ.get(options.COMPILATION_CACHE_ENV, "")
    if setting == "off" or (not setting and workdir is None):
        return None
    if not setting and storage.is_remote(workdir):
        logging.info("--workdir=%s is on an object store: no compilation cache unless "
                     "--compilation_cache names a folder", workdir)
        return None
    folder = storage.path(setting) if setting else storage.path(workdir) / "compilation_cache"
    path = os.fspath(folder if storage.is_remote(folder) else folder.absolute())
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX's default (1 s) leaves out the evaluation widths and prediction batches (0.2-0.4 s each on CPU)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    if jax.config.jax_compilation_cache_dir != path:
        from jax.experimental.compilation_cache import compilation_cache
        compilation_cache.reset_cache()  # a process that already used another folder (tests)
        jax.config.update("jax_compilation_cache_dir", path)
    return path


def tensorboard_writer(workdir):
    """A TensorBoard writer on <workdir>/tensorboard (process 0; None elsewhere)."""
    if jax.process_index() != 0:
        return None
    SummaryWriter = _tensorboardx().SummaryWriter
    storage.register_tensorboard()
    return SummaryWriter(os.fspath(storage.path(workdir) / "tensorboard"))


def _tensorboardx():
    """tensorboardX, imported with torch hidden unless torch is loaded already: where torch
    is installed, tensorboardX's writer imports it at its top (to accept torch tensors),
    0.9 s and 180 MB of peak memory for a job that logs floats."""
    if "torch" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # an import of torch now raises ImportError, which tensorboardX expects
    try:
        import tensorboardX
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tensorboardX


def file_fingerprint(paths) -> dict[str, str]:
    """{path: sha256 of its bytes}: which data a run read."""
    out = {}
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[str(path)] = h.hexdigest()
    return out
