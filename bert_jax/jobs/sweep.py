"""`sweep` job: a grid of flag values x seeds, each run its own workdir.

    ./launch.sh sweep --job=pretrain --base=experiments/tiny.flags \\
        --grid="embedding_size=64,128;share_scope=all,none" --seeds=0,1,2 --out=runs/e_sweep --parallel=2

A sweep file is a flag file of these flags (experiments/ablations/*.flags). Every run is
`python -m bert_jax.jobs.<job> --flagfile=BASE --FLAG=VALUE ... --seed=S --workdir=OUT/NAME`,
NAME naming the varied values (`embedding_size=64,share_scope=all,seed=0`), its output in
OUT/NAME/sweep.log. Everything is checked before the first run: every grid flag is one of
the job's, no value is empty, and OUT holds no runs of another sweep (OUT/sweep.json records
the job, base file and its sha256, grid and seeds). Runs already finished
(OUT/NAME/sweep_done.json) are skipped, so rerunning the sweep resumes it; a failed run is
recorded (sweep_failed.json, with its exit status and last lines) and the others go on;
the failures are listed at the end and the sweep exits 1. `report --runs=OUT` then compares
the configurations over seeds.

Fine-tuning sweeps take `--init_sweep=PRETRAIN_SWEEP`: every finished run of that sweep is a
value of --init_checkpoint (its best/ when kept), a grid dimension named `init`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time

from absl import flags as absl_flags

from bert_jax import flags
from bert_jax.errors import BertJaxError
from bert_jax.options import FinetuneOptions, PretrainOptions, SweepOptions

JOB_OPTIONS = {"pretrain": PretrainOptions, "finetune": FinetuneOptions}
RECORD, DONE, FAILED, LOG = "sweep.json", "sweep_done.json", "sweep_failed.json", "sweep.log"


class SweepError(BertJaxError, ValueError):
    """The sweep cannot start; the message names the flag, value or folder."""


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    values: tuple[tuple[str, str], ...]  # (flag, value) varied, seed last
    workdir: pathlib.Path

    def command(self, job: str, base: str) -> list[str]:
        return [sys.executable, "-m", f"bert_jax.jobs.{job}", f"--flagfile={base}",
                *(f"--{k}={v}" for k, v in self.values), f"--workdir={self.workdir}"]


def parse_grid(grid: str, job: str) -> list[tuple[str, list[str]]]:
    """[(flag, values)] of "FLAG=a,b;FLAG2=x,y", each flag checked against the job's."""
    fv = absl_flags.FlagValues()
    flags.define(JOB_OPTIONS[job], fv)
    known = set(fv)
    out = []
    for part in filter(None, (p.strip() for p in grid.split(";"))):
        name, sep, values = part.partition("=")
        name = name.strip().lstrip("-")
        if not sep or not name:
            raise SweepError(f"--grid: {part!r} is not FLAG=value,value")
        if name not in known:
            raise SweepError(f"--grid: {name!r} is not a flag of {job}")
        if name in ("seed", "workdir"):
            raise SweepError(f"--grid: {name!r} is set by the sweep (use --seeds)")
        vals = [v.strip() for v in values.split(",")]
        if any(not v for v in vals):
            raise SweepError(f"--grid: {name}={values!r} has an empty value")
        if any(n == name for n, _ in out):
            raise SweepError(f"--grid: {name!r} appears twice")
        out.append((name, vals))
    return out


def init_values(sweep: pathlib.Path) -> list[str]:
    """--init_checkpoint values from a pretraining sweep: its finished runs (best/ if kept)."""
    if not (sweep / RECORD).exists():
        raise SweepError(f"--init_sweep={sweep}: no {RECORD} (not a sweep folder)")
    runs = sorted(d for d in sweep.iterdir() if (d / DONE).exists())
    if not runs:
        raise SweepError(f"--init_sweep={sweep}: no finished run")
    return [str(d / "best" if (d / "best").is_dir() else d) for d in runs]


def plan(o: SweepOptions) -> tuple[list[Run], dict]:
    """The runs and the sweep record, after every check."""
    base = pathlib.Path(o.base)
    if not base.is_file():
        raise SweepError(f"--base={o.base}: no such flag file")
    grid = parse_grid(o.grid, o.job)
    if o.init_sweep:
        if o.job != "finetune":
            raise SweepError("--init_sweep is for --job=finetune")
        if any(n == "init_checkpoint" for n, _ in grid):
            raise SweepError("--init_sweep and an init_checkpoint grid: give one")
        grid.append(("init_checkpoint", init_values(pathlib.Path(o.init_sweep))))
    seeds = [s.strip() for s in o.seeds]
    if not seeds or any(not s.lstrip("-").isdigit() for s in seeds):
        raise SweepError(f"--seeds={','.join(o.seeds)}: integers, e.g. 0,1,2")
    out = pathlib.Path(o.out)
    runs = []
    for combo in itertools.product(*(v for _, v in grid)):
        values = [(n, v) for (n, _), v in zip(grid, combo)]
        for seed in seeds:
            shown = [(n, pathlib.Path(v).parent.name if n == "init_checkpoint" and pathlib.Path(v).name == "best"
                      else pathlib.Path(v).name if n == "init_checkpoint" else v) for n, v in values]
            name = ",".join(f"{'init' if n == 'init_checkpoint' else n}={v}" for n, v in shown + [("seed", seed)])
            runs.append(Run(name.replace("/", "_"), tuple(values) + (("seed", seed),), out / name.replace("/", "_")))
    record = dict(job=o.job, base=str(base.resolve()), base_sha256=hashlib.sha256(base.read_bytes()).hexdigest(),
                  grid=[[n, v] for n, v in grid], seeds=seeds)
    old = out / RECORD
    if old.exists():
        prev = json.loads(old.read_text())
        if (prev.get("job"), prev.get("base"), prev.get("base_sha256")) != (o.job, record["base"], record["base_sha256"]):
            raise SweepError(f"--out={out} holds a sweep of {prev.get('job')} on {prev.get('base')} "
                             f"(sha256 {str(prev.get('base_sha256'))[:12]}); this one is {o.job} on {record['base']} "
                             f"(sha256 {record['base_sha256'][:12]}): use another --out")
    elif out.exists() and any(p.name != ".lock" for p in out.iterdir()):  # the lock of a sweep that stopped
        raise SweepError(f"--out={out} is not empty and holds no {RECORD}: use another --out")
    return runs, record


def execute(run: Run, job: str, base: str) -> tuple[Run, int, float]:
    run.workdir.mkdir(parents=True, exist_ok=True)
    (run.workdir / FAILED).unlink(missing_ok=True)
    t0 = time.time()
    with open(run.workdir / LOG, "a") as log:
        rc = subprocess.run(run.command(job, base), stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ)).returncode
    wall = time.time() - t0
    if rc == 0:
        (run.workdir / DONE).write_text(json.dumps(dict(values=dict(run.values), wall_s=round(wall, 1))))
    else:
        tail = (run.workdir / LOG).read_text(errors="replace").splitlines()[-20:]
        (run.workdir / FAILED).write_text(json.dumps(dict(values=dict(run.values), returncode=rc, log_tail=tail)))
    return run, rc, wall


def sweep(o: SweepOptions) -> dict:
    from bert_jax.training import checkpoint  # the lock; imported here, not by plan()'s users (jax, orbax)
    runs, record = plan(o)
    out = pathlib.Path(o.out)
    # A second sweep on the same folder would start the same unfinished runs: each would
    # find the other's workdir locked and mark it failed. One sweep per folder at a time.
    # (chief=True: asking JAX for the process index would start a backend here, which on a
    # GPU would take the memory the runs need.)
    with checkpoint.WorkdirLock(out, "sweep", flag="--out", chief=True):
        return _sweep(o, runs, record, out)


def _sweep(o: SweepOptions, runs: list[Run], record: dict, out: pathlib.Path) -> dict:
    (out / RECORD).write_text(json.dumps(record, indent=1))
    todo = [r for r in runs if not (r.workdir / DONE).exists()]
    print(f"sweep: {len(runs)} runs ({len(runs) - len(todo)} already finished), {o.parallel} at a time", flush=True)
    failed = []
    with concurrent.futures.ThreadPoolExecutor(o.parallel) as pool:
        for run, rc, wall in pool.map(lambda r: execute(r, o.job, record["base"]), todo):
            print(f"sweep: {run.name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {wall:.0f} s", flush=True)
            if rc:
                failed.append(run.name)
    summary = dict(runs=len(runs), ran=len(todo), skipped=len(runs) - len(todo), failed=failed, out=str(out))
    if failed:
        print("sweep: failed runs (see their sweep.log):\n  " + "\n  ".join(failed), file=sys.stderr)
    return summary


def main(o: SweepOptions):
    summary = sweep(o)
    print(json.dumps(summary))
    if summary["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    flags.run_job(main, SweepOptions)
