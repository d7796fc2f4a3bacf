"""What both training loops log and keep, written once: the logger (metrics.jsonl in one
schema, TensorBoard, the progress bar, the non-finite stop) and best-checkpoint
selection.

metrics.jsonl, one JSON object per line, pretraining and fine-tuning alike:
  training   {"step", "loss", "learning_rate", "grad_norm", "tokens_per_s"?, "nonfinite_total",
              <the loop's figures: mlm_loss, mlm_accuracy, sentence_loss, ...>}
             means over the steps since the previous line; learning_rate is the rate that
             step's update applied (the schedule at the optimizer's count step - 1);
  evaluation {"step", "eval_<set>_<metric>", ...}: pretraining's set is `heldout`,
             fine-tuning's are the --eval_files names.
TensorBoard gets the same figures as train/<name> and eval/<set>/<metric>.

Step metrics stay on the device (summed by train.accumulate) until a step that logs,
evaluates or saves reads them, so a quiet step copies nothing to the host.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Callable

import jax
from absl import logging
from tqdm import tqdm

from bert_jax import storage
from bert_jax.errors import BertJaxError
from bert_jax.training import train

METRICS_FILE = "metrics.jsonl"
REWRITE_S = 30.0  # metrics.jsonl on an object store: rewritten at most this often (and at evals, close)


class NonFiniteError(BertJaxError, RuntimeError):
    """Too many non-finite steps in a row; the message names the step and the last good checkpoint."""


class RunLog:
    """metrics.jsonl, TensorBoard and the tqdm bar of one run. Only process 0 writes; every
    process runs the same checks. On a resumed run (`start` > 0) lines after the
    checkpoint's step (written before the run was stopped) are dropped first, so every
    step appears once."""

    def __init__(self, workdir: pathlib.Path, *, total: int, start: int, desc: str, progress_bar: bool,
                 max_nonfinite_streak: int, lr_fn: Callable, figures: Callable[[dict], dict] = lambda sums: {}):
        self.chief = jax.process_index() == 0
        self.path = storage.path(workdir) / METRICS_FILE
        self.max_streak, self.figures, self.lr_fn = max_nonfinite_streak, figures, lr_fn
        if self.chief and start:
            keep_until(self.path, start)
        self.bar = None
        if self.chief and progress_bar:
            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", mininterval=1.0)
        self.writer = train.tensorboard_writer(workdir)
        self.acc, self.host, self.t_last = None, None, time.perf_counter()
        # An object store has no append: the lines are kept here and the object rewritten at
        # most every REWRITE_S seconds, at each evaluation and at close (not per line, which
        # would upload O(lines^2) bytes over a run).
        self.lines = None
        if self.chief and storage.is_remote(self.path):
            self.lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        self.rewritten = time.monotonic()

    def add(self, metrics: dict, nonfinite_streak) -> None:
        """One step's metrics, summed on the device (no host copy)."""
        self.acc = train.accumulate(self.acc, metrics, nonfinite_streak)
        self.host = None
        if self.bar is not None:
            self.bar.update(1)

    def check(self, step: int, last_checkpoint: str | None) -> None:
        """Copy the sums to the host (a step that logs, evaluates or saves) and stop on
        `max_nonfinite_streak` non-finite steps in a row; warn about skipped updates."""
        if self.acc is None or self.host is not None:
            return
        self.host = {k: float(v) for k, v in jax.device_get(self.acc).items()}
        if self.host["worst_streak"] >= self.max_streak:
            raise NonFiniteError(
                f"step {step}: {self.max_streak} non-finite losses, gradients or updated params in a row "
                f"(updates skipped, nothing non-finite saved); stopping (lower --learning_rate?). "
                f"Last good checkpoint: {last_checkpoint or 'none'}")

    def train(self, step: int, **extra) -> dict:
        """Write the training line for the steps since the last one (1-based `step`) and
        start a new sum."""
        self.check(step, None)
        h, now = self.host, time.perf_counter()
        n = h["steps"]
        skipped = int(round(n - h["finite"]))
        if skipped:
            logging.warning("steps %d-%d: %d non-finite loss(es), gradient(s) or updated params; "
                            "those updates were skipped", step - int(n) + 1, step, skipped)
        rec = dict(step=step, loss=h["loss"] / n, learning_rate=float(self.lr_fn(step - 1)),  # optax counts from 0
                   grad_norm=h["grad_norm"] / n, **extra)
        if "real_tokens" in h:
            rec["tokens_per_s"] = h["real_tokens"] / max(now - self.t_last, 1e-9)
        rec.update(self.figures(h))
        self._write(rec, "train")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['learning_rate']:.2e}", refresh=False)
        self.acc, self.host, self.t_last = None, None, now
        return rec

    def eval(self, step: int, name: str, results: dict) -> None:
        self._write(dict(step=step, **{f"eval_{name}_{k}": v for k, v in results.items()}), "eval")

    def _write(self, rec: dict, group: str) -> None:
        if not self.chief:
            return
        if self.lines is None:
            append(self.path, rec)
        else:
            self.lines.append(json.dumps(rec) + "\n")
            if group == "eval" or time.monotonic() - self.rewritten > REWRITE_S:
                self._rewrite()
        if self.writer is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    tag = f"train/{k}" if group == "train" else "eval/" + k[len("eval_"):].replace("_", "/", 1)
                    self.writer.add_scalar(tag, v, rec["step"])

    def _rewrite(self) -> None:
        self.path.write_text("".join(self.lines))
        self.rewritten = time.monotonic()

    def close(self) -> None:
        if self.lines is not None:
            self._rewrite()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def append(path, rec: dict) -> None:
    """One line on a local file (RunLog keeps the lines of a file on an object store)."""
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def keep_until(path: pathlib.Path, step: int) -> None:
    """Drop metrics.jsonl lines after `step` (written after the checkpoint a run resumes
    from)."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in lines))


# ------------------------------------------------------------- best selection ----
class Best:
    """Best-checkpoint selection on one metric of one evaluation set: `offer` a score
    after each evaluation; when it improves, `save` is called (it writes <workdir>/best/).
    Metrics named *loss* improve downwards, all others upwards. A NaN score (e.g. the
    correlation of constant predictions) never beats a number; the first evaluation always
    counts. `score` goes into each checkpoint, so a resumed run keeps comparing."""

    def __init__(self, metric: str, score: float | None = None):
        self.metric, self.score = metric, score
        self.lower_is_better = "loss" in metric

    def improves(self, score: float) -> bool:
        if self.score is None:
            return True
        if math.isnan(score):
            return False
        if math.isnan(self.score):
            return True
        return score < self.score if self.lower_is_better else score > self.score

    def offer(self, results: dict, save: Callable[[], None]) -> bool:
        score = float(results[self.metric])
        if not self.improves(score):
            return False
        self.score = score
        save()
        return True


def publish(dest: pathlib.Path, params, write: Callable[[pathlib.Path, dict], None]) -> None:
    """Replace folder `dest` with what `write(folder, host_params)` writes: params gathered
    from every process, written by process 0 into dest.tmp, then renamed over dest (a crash
    leaves the old folder or the new one, never half of one; on an object store, see
    storage.replace_tree)."""
    from jax.experimental import multihost_utils
    host = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() != 0:
        return
    storage.replace_tree(dest, lambda folder: write(folder, host))
