"""The training loop of both jobs, written once: when to log, evaluate, checkpoint and stop
(`Cadence`), the restore-then-close sequence, the run record (manifest.json, flags.txt),
the steps themselves with SIGTERM and --stop_at_step, and the verdict on a run whose
updates were mostly skipped.

Each job keeps what is its own and hands it in: pretraining its corpus stream and held-out
evaluation, fine-tuning its task files, evaluation set and predictions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any, Callable

import jax
from absl import logging

from bert_jax import checkpoint, options, paths, storage
from bert_jax.training import runlog, train


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When a run of `total` steps logs, evaluates and checkpoints (after 1-based step n):
    every `log_every` / `eval_every` / `checkpoint_every` steps (0: only at the end) and at
    the last step. At `stop_at_step` it checkpoints and stops."""
    total: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    stop_at_step: int | None = None

    def logs(self, n: int) -> bool:
        return _every(n, self.log_every) or n == self.total

    def evals(self, n: int) -> bool:
        return _every(n, self.eval_every) or n == self.total

    def saves(self, n: int) -> bool:
        return _every(n, self.checkpoint_every) or n == self.total

    def stops(self, n: int) -> bool:
        return self.stop_at_step is not None and n >= self.stop_at_step


def _every(n: int, k: int) -> bool:
    return bool(k) and n % k == 0


def restore(ckpt: checkpoint.Checkpointer, abstract, shardings):
    """ckpt.restore_latest(abstract, shardings); on an error the checkpointer is closed
    (orbax's threads stop) before the error propagates."""
    try:
        return ckpt.restore_latest(abstract, shardings)
    except Exception:
        ckpt.close()
        raise


def write_record(workdir, manifest: dict, resolved_flags: str | None) -> None:
    """The run record, by process 0: manifest.json (what ran: options, code, packages,
    model, devices, data) and flags.txt (the flags as given, a flag file to rerun it),
    each written whole or not at all (flags.txt is empty for a run not started from flags)."""
    if jax.process_index() != 0:
        return
    _write_text(storage.path(workdir) / "manifest.json", json.dumps(manifest, indent=1))
    _write_text(storage.path(workdir) / "flags.txt", resolved_flags or "")


def _write_text(path, text: str) -> None:
    if storage.is_remote(path):  # an object is replaced whole
        path.write_text(text)
    else:
        paths.write_atomically(path, lambda tmp: tmp.write_text(text))


@dataclasses.dataclass
class Evaluation:
    """What the loop evaluates at the cadence's steps: `run(params)` -> figures of the set
    `name`, logged as eval_<name>_<metric>; `best` chooses on them and `save_best(step,
    params)` writes <workdir>/best/ when they improve."""
    name: str
    run: Callable[[Any], dict]
    best: runlog.Best
    save_best: Callable[[int, Any], None]


@dataclasses.dataclass
class Outcome:
    state: Any
    step: int                    # the last step run
    last_saved: int              # the step of the newest checkpoint (the start if none was saved)
    last_trained: int | None     # the newest checkpoint whose params a finite update made
    stopped: bool                # SIGTERM or --stop_at_step stopped it (with a checkpoint)
    skipped: int                 # updates skipped (non-finite) by this run
    evaluated: dict | None       # the last evaluation's figures


def run(state, *, start: int, cadence: Cadence, batches, step_fn: Callable, log: runlog.RunLog,
        ckpt: checkpoint.Checkpointer, manifest: dict, evaluation: Evaluation | None,
        unlogged_transfers: str, mesh) -> Outcome:
    """Steps start+1 .. cadence.total of `step_fn(state, batch)` on `batches` (a
    loader.DevicePrefetcher: (batch, data state after it)), logging, evaluating and
    checkpointing (with `manifest` and the best score) as the cadence says. SIGTERM (all
    processes agree on the step) or --stop_at_step checkpoint and stop. `batches`, `ckpt`
    and `log` are closed at the end, also on an error (in-flight saves finish, threads stop)."""
    skipped_before = int(state.nonfinite_total)
    # A skipped update leaves the state as it was: the checkpoint to name on a non-finite stop.
    last_trained = start if start > skipped_before else None
    step, last_saved, in_flight, evaluated = start, start, None, None
    try:
        with train.StopOnSigterm() as stop, jax.set_mesh(mesh):
            while step < cadence.total:
                batch, data_state = next(batches)
                n = step + 1
                logs, evals = cadence.logs(n), evaluation is not None and cadence.evals(n)
                stop_here = stop.requested or cadence.stops(n)
                saves = cadence.saves(n) or stop_here
                # A step that logs, evaluates or saves nothing copies nothing to the host, so
                # dispatch runs ahead of the device (--unlogged_transfers=disallow checks it).
                quiet = not (logs or evals or saves)
                with (jax.transfer_guard_device_to_host(unlogged_transfers) if quiet
                      else contextlib.nullcontext()):
                    state, m = step_fn(state, batch)
                    if n == start + 1:  # the step is compiled: the compiler's working memory goes back
                        train.release_free_memory()
                    log.add(m, state.nonfinite_streak)
                    in_flight = train.wait_previous(in_flight, m["loss"])
                step = n
                if stop.reached(step):  # SIGTERM (all processes agree on this step): save here
                    stop_here = saves = True
                elif quiet:
                    continue
                log.check(step, str(ckpt.dir / str(last_trained)) if last_trained else None)
                if logs:
                    log.train(step, nonfinite_total=int(state.nonfinite_total))
                if evals:
                    evaluated = evaluation.run(state.params)
                    log.eval(step, evaluation.name, evaluated)
                    evaluation.best.offer(evaluated, lambda: evaluation.save_best(step, state.params))
                    train.release_free_memory()  # what compiling the evaluation widths used
                    logging.info("step %d %s: %s", step, evaluation.name, evaluated)
                if stop_here:  # also when SIGTERM came while this step logged or evaluated
                    stop.requested = True
                if stop.requested or saves:
                    best = evaluation.best.score if evaluation is not None else None
                    ckpt.save(step, state, data_state if data_state is not None else {},
                              dict(manifest, best=best), force=stop.requested)
                    last_saved = step
                    if step > int(state.nonfinite_total):
                        last_trained = step
                if stop.requested:
                    break
    finally:
        batches.close()
        ckpt.close()
        log.close()
    return Outcome(state, step, last_saved, last_trained, stop.requested,
                   int(state.nonfinite_total) - skipped_before, evaluated)


def check_trained(out: Outcome, start: int, ckpt: checkpoint.Checkpointer, error: type[Exception],
                  opt: options.OptimizerOptions, learning_rate: float) -> None:
    """A run most of whose updates were skipped (non-finite loss, gradient or updated
    params) did not train: an `error` naming the optimizer flags to check, never a success."""
    ran = out.step - start
    if ran and 2 * out.skipped > ran:
        raise error(
            f"{out.skipped} of the {ran} updates of this run were skipped (non-finite loss, gradient or updated "
            f"params): the model did not train. Check --adam_eps={opt.eps} (0 divides by zero where a gradient is "
            f"0), --learning_rate={learning_rate} and --max_grad_norm={opt.max_grad_norm}. Last checkpoint with "
            f"trained params: {ckpt.dir / str(out.last_trained) if out.last_trained else 'none'}")
