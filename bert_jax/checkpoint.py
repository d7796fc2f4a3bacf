"""Checkpoints: an orbax CheckpointManager holding, at each saved step, the train state
(params, optimizer state, step, RNG, non-finite counters), the data iterator state and a
manifest. Saves are asynchronous; orbax writes into a temporary folder and renames it when
complete, so a process killed mid-save leaves the previous checkpoint as the latest.

A workdir is self-describing: `config.json` (model config), `tokenizer/`, `manifest.json`,
`checkpoints/<step>/`. No pickle anywhere: arrays go through orbax/tensorstore, the rest
is JSON.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import socket
import subprocess
import time
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bert_jax import storage
from bert_jax.errors import BertJaxError
from bert_jax.model.config import ModelConfig


class CheckpointError(BertJaxError, RuntimeError):
    """A checkpoint is partial, corrupt or of another architecture; names the path."""


def package_versions() -> dict[str, str]:
    out = {}
    for p in ("bert_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
              "tokenizers", "sentencepiece", "numpy"):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_revision() -> str | None:
    try:
        here = pathlib.Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class WorkdirLock:
    """An exclusive lock on a workdir for one job, held by process 0 (the process that
    writes its files) from start to end: a second job on the same workdir fails at once
    with an error naming the holder. The kernel drops the lock when its process dies, so a
    killed run never leaves a stale lock behind."""

    def __init__(self, workdir: pathlib.Path, job: str, flag: str = "--workdir", chief: bool | None = None):
        """`chief`: whether this process takes the lock (default: jax process 0; a process
        that must not start a JAX backend, such as the sweep launcher, says True)."""
        self.path, self.job, self.flag, self._f = storage.path(workdir) / ".lock", job, flag, None
        self.chief = chief

    def __enter__(self):
        if not (self.chief if self.chief is not None else jax.process_index() == 0):
            return self
        if storage.is_remote(self.path):
            from absl import logging
            logging.warning("%s=%s is on an object store, which has no file locks: nothing "
                            "stops a second job from using it at the same time", self.flag, self.path.parent)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise CheckpointError(f"{self.flag}={self.path.parent} is in use by {holder}; wait for it to "
                                  f"finish, or use another {self.flag}") from None
        f.seek(0)
        f.truncate()
        f.write(f"{self.job} (pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        self._f = f
        return self

    @staticmethod
    def holder(workdir: pathlib.Path) -> str | None:
        """Who holds the lock of `workdir` now (a live process: the kernel drops the lock of
        a dead one), or None."""
        path = storage.path(workdir) / ".lock"
        if storage.is_remote(path) or not path.is_file():
            return None
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return f.read().strip() or "another process"
            fcntl.flock(f, fcntl.LOCK_UN)
        return None

    def __exit__(self, *exc):
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None
        return False


def has_checkpoint(workdir: pathlib.Path) -> bool:
    """Whether <workdir>/checkpoints holds a finished (or in-progress) step folder."""
    d = storage.path(workdir) / "checkpoints"
    return d.is_dir() and any(p.name.split(".")[0].isdigit() for p in d.iterdir())


def write_config(workdir: pathlib.Path, cfg: ModelConfig) -> None:
    (storage.path(workdir) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))


def read_config(folder: pathlib.Path) -> ModelConfig:
    path = storage.path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {folder} is not a bert_jax checkpoint folder")
    return ModelConfig(**json.loads(path.read_text()))


def check_same_architecture(workdir: pathlib.Path, cfg: ModelConfig) -> None:
    """Resuming a workdir trained with another model is an error naming the fields."""
    if not (storage.path(workdir) / "config.json").exists():
        return
    old = dataclasses.asdict(read_config(workdir))
    new = dataclasses.asdict(cfg)
    shape_fields = ("family", "objective", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size",
                    "embedding_size", "num_hidden_groups", "inner_group_num", "share_scope")
    diff = [f"{k}: checkpoint {old.get(k)!r} vs flags {new[k]!r}" for k in shape_fields
            if old.get(k) != new[k]]
    if diff:
        raise CheckpointError(f"--workdir={workdir} holds a checkpoint of another architecture "
                              f"({'; '.join(diff)}); use a new --workdir or matching flags")


# ------------------------------------------------------------------- checksums ----
def _checksum(x):
    """A uint32 checksum of one array's bits: sum over elements of bits * (odd weight per
    position), wrapping. Any change of one element changes it; computed where the array
    lives, so a sharded array reduces across its devices."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    u = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, u).astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435762) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda xs: [_checksum(x) for x in xs])


def checksums(tree) -> dict[str, int]:
    """{path of each array: its checksum}, as saved beside every checkpoint."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    sums = _checksums_jit([jnp.asarray(x) for _, x in leaves])
    return {jax.tree_util.keystr(p, simple=True, separator="/"): int(np.asarray(v.addressable_data(0)))
            for (p, _), v in zip(leaves, sums)}


def verify(tree, saved: dict | None, where) -> None:
    """Raise CheckpointError naming the arrays of `tree` whose checksum is not the one
    recorded at save (`saved`; a checkpoint written before checksums has none)."""
    if saved is None:
        return
    got = checksums(tree)
    bad = [k for k in sorted(set(saved) | set(got)) if saved.get(k) != got.get(k)]
    if bad:
        raise CheckpointError(f"checkpoint {where} is corrupt: {len(bad)} array(s) differ from their "
                              f"checksums at save ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})")


class Checkpointer:
    """Checkpoints of a run in <workdir>/checkpoints, saved by every process together; with
    `this_process_only`, by this process alone (a host-side folder such as a fine-tuned
    best/, written by process 0 of a multi-process run)."""

    def __init__(self, workdir: pathlib.Path, keep: int = 3, async_save: bool = True,
                 this_process_only: bool = False):
        self.dir = storage.resolve(storage.path(workdir) / "checkpoints")
        self.quarantine = self.dir.parent / "checkpoints.corrupt"
        me = jax.process_index()
        alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        if this_process_only:  # orbax creates the folder only when every process saves
            self.dir.mkdir(parents=True, exist_ok=True)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not this_process_only,
                                            enable_async_checkpointing=async_save,
                                            cleanup_tmp_directories=True,
                                            **({"multiprocessing_options": alone} if this_process_only else {}))
        self.manager = ocp.CheckpointManager(self.dir, options=opts,
                                             item_names=("state", "data", "manifest"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, manifest: dict, force: bool = False) -> None:
        """Save (asynchronously) with a checksum of every array in the manifest item, so
        that a restore can tell a corrupt checkpoint from a good one."""
        manifest = dict(manifest, checksums=checksums(state))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            manifest=ocp.args.JsonSave(manifest)), force=force)

    def restore_latest(self, abstract_state, shardings) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data state, manifest) of the newest checkpoint that restores and
        matches its checksums, or None when there is none. Newer checkpoints that fail are
        moved to <workdir>/checkpoints.corrupt/<step> (kept, never deleted), each with a
        warning; when every checkpoint fails nothing is moved and CheckpointError lists them."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data, manifest = self.restore(step, abstract_state, shardings)
            except CheckpointError as e:
                failures.append((step, e))
                continue
            for bad, err in failures:
                self._set_aside(bad, err, step)
            return step, state, data, manifest
        if failures:
            raise CheckpointError("no checkpoint in {} can be restored: {}".format(
                self.dir, "; ".join(str(e) for _, e in failures)))
        return None

    def _set_aside(self, step: int, err: Exception, resumed: int) -> None:
        from absl import logging
        dest = self.quarantine / str(step)
        if jax.process_index() == 0:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest = self.quarantine / f"{step}.{int(time.time())}"
            storage.move_tree(self.dir / str(step), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self.manager.reload()
        logging.warning("%s; moved it to %s and resuming from the verified checkpoint %d", err, dest, resumed)

    def restore(self, step: int, abstract_state, shardings) -> tuple[Any, dict, dict]:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                manifest=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore raise many types; name the folder
            raise CheckpointError(f"checkpoint {self.dir / str(step)} cannot be restored "
                                  f"(partial or corrupt?): {type(e).__name__}: {e}") from e
        verify(out["state"], out["manifest"].get("checksums"), self.dir / str(step))
        return out["state"], out["data"], out["manifest"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_params(workdir: str | pathlib.Path, step: int | None = None) -> tuple[ModelConfig, Any, int]:
    """(model config, pretraining params as host arrays, step) of a pretrain workdir's
    latest (or given) checkpoint."""
    workdir = storage.path(workdir)
    cfg = read_config(workdir)
    directory = storage.resolve(workdir / "checkpoints")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} does not exist: {workdir} holds no checkpoint")
    # Every process reads the whole checkpoint by itself onto its first device, whatever
    # topology saved it. With several processes the sharding recorded at save names devices
    # this process may not address, so the target is the saved shapes on its one device (one
    # process restores through orbax's fallback: the metadata read hangs on some stores).
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, multiprocessing_options=alone), item_names=("state", "data", "manifest"))
    step = mngr.latest_step() if step is None else step
    if step is None:
        mngr.close()
        raise CheckpointError(f"{directory} holds no complete checkpoint")
    try:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if jax.process_count() > 1:
            reader = ocp.StandardCheckpointer(multiprocessing_options=alone)
            try:
                saved = reader.metadata(directory / str(step) / "state").item_metadata
            finally:
                reader.close()
            state = ocp.args.StandardRestore(jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), saved))
        else:
            state = ocp.args.StandardRestore(fallback_sharding=one)
        out = mngr.restore(step, args=ocp.args.Composite(state=state, manifest=ocp.args.JsonRestore()))
    except Exception as e:
        raise CheckpointError(f"checkpoint {directory / str(step)} cannot be restored: "
                              f"{type(e).__name__}: {e}") from e
    finally:
        mngr.close()
    verify(out["state"], (out["manifest"] or {}).get("checksums"), directory / str(step))
    return cfg, jax.device_get(out["state"]["params"]), step
