"""`sweep` job: a grid of flag values x seeds, each run its own workdir.

    ./launch.sh sweep --job=pretrain --base=experiments/tiny.flags \\
        --grid="embedding_size=64,128;share_scope=all,none" --seeds=0,1,2 --out=runs/e_sweep --parallel=2

A sweep file is a flag file of these flags (experiments/ablations/*.flags). Every run is
`python -m bert_jax.jobs.<job> --flagfile=BASE --FLAG=VALUE ... --seed=S --workdir=OUT/NAME`,
NAME naming the varied values (`embedding_size=64,share_scope=all,seed=0`; where two
configurations would read the same, e.g. paths x/y.txt and x_y.txt, each name ends in `#`
and a hash of its exact values), its output in OUT/NAME/sweep.log; a run dies with the
sweep that started it. Everything is checked before the first run: every grid flag is one
of the job's and every value parses as that flag's (bounds and choices included), no value
is empty or repeated, no run folder holds a run of other values, and OUT holds no runs of
another sweep (OUT/sweep.json records
the job, base file and its sha256, grid and seeds). Runs already finished
(OUT/NAME/sweep_done.json) are skipped, so rerunning the sweep resumes it; a failed run is
recorded (sweep_failed.json, with its exit status and last lines) and the others go on;
the failures are listed at the end and the sweep exits 1. A run whose folder a live process
holds (a run started by hand, or one its killed launcher could not take with it) is
reported as running, not started again and not marked failed; the sweep exits 1. `report --runs=OUT` then compares
the configurations over seeds.

Runs go seed by seed (every configuration's first seed, then every second seed, ...), so
a first look at the whole grid comes early, and the runs share one compilation cache,
OUT/.compilation_cache (unless $BERT_JAX_COMPILATION_CACHE or the flags name one): the
second seed of a configuration loads the programs its first compiled.

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
from bert_jax.options import COMPILATION_CACHE_ENV, FinetuneOptions, PretrainOptions, SweepOptions

JOB_OPTIONS = {"pretrain": PretrainOptions, "finetune": FinetuneOptions}
RECORD, DONE, FAILED, LOG = "sweep.json", "sweep_done.json", "sweep_failed.json", "sweep.log"
CACHE = ".compilation_cache"  # in OUT: the runs' shared compilation cache


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
        for v in vals:  # every value as the job's own flag parser reads it, before any run
            try:
                fv[name].parser.parse(v)
            except (ValueError, absl_flags.Error) as e:
                raise SweepError(f"--grid: {name}={v!r} is not a value of --{name} ({e})") from None
        if len(set(vals)) < len(vals):
            raise SweepError(f"--grid: {name}={values!r} names a value twice")
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
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out={out} is a file: give a folder")
    configs = []  # seed by seed: every configuration's first run comes first (see the module docstring)
    for seed in seeds:
        for combo in itertools.product(*(v for _, v in grid)):
            values = [(n, v) for (n, _), v in zip(grid, combo)]
            shown = [(n, pathlib.Path(v).parent.name if n == "init_checkpoint" and pathlib.Path(v).name == "best"
                      else pathlib.Path(v).name if n == "init_checkpoint" else v) for n, v in values]
            name = ",".join(f"{'init' if n == 'init_checkpoint' else n}={v}" for n, v in shown + [("seed", seed)])
            configs.append((name.replace("/", "_"), tuple(values) + (("seed", seed),)))
    runs = [Run(name, values, out / name) for name, values in unique_names(configs)]
    for run in runs:
        check_run_folder(run)
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


def unique_names(configs: list[tuple[str, tuple]]) -> list[tuple[str, tuple]]:
    """Each configuration's folder name: the readable one, plus a short hash of the exact
    values where two configurations read the same (paths x/y.txt and x_y.txt both read
    x_y.txt: they used to share one workdir, the second resuming the first's checkpoint)."""
    count: dict[str, int] = {}
    for name, _ in configs:
        count[name] = count.get(name, 0) + 1
    out = [(name if count[name] == 1 else
            f"{name}#{hashlib.sha256(json.dumps(values).encode()).hexdigest()[:8]}", values)
           for name, values in configs]
    assert len({n for n, _ in out}) == len(out), "configurations are distinct: their hashes are"
    return out


def check_run_folder(run: Run) -> None:
    """A run's folder holds this configuration's run or none: one that recorded other values
    (a sweep of an older naming, a folder made by hand) is refused before any run."""
    for record in (DONE, FAILED):
        path = run.workdir / record
        if path.exists():
            values = json.loads(path.read_text()).get("values")
            if values is not None and values != dict(run.values):
                raise SweepError(f"{run.workdir} holds a run of other values ({values}, in {record}), not "
                                 f"{dict(run.values)}: move it away or use another --out")


def _die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when the sweep launcher dies (a
    SIGKILLed sweep used to leave its run training, and its rerun found that run's
    workdir locked and marked it failed)."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        pass


def execute(run: Run, job: str, base: str) -> tuple[Run, int | str, float]:
    """(run, exit status, seconds); the status is the lock holder's description instead
    when a live process already holds the run's workdir (it is running, not failed)."""
    from bert_jax import checkpoint
    holder = checkpoint.WorkdirLock.holder(run.workdir)
    if holder is not None:
        return run, holder, 0.0
    run.workdir.mkdir(parents=True, exist_ok=True)
    (run.workdir / FAILED).unlink(missing_ok=True)
    t0 = time.time()
    with open(run.workdir / LOG, "a") as log:
        # One compilation cache for the sweep's runs (unless the user named one): the
        # seeds of a configuration compile the same programs.
        env = dict(os.environ)
        env.setdefault(COMPILATION_CACHE_ENV, str(run.workdir.parent / CACHE))
        rc = subprocess.run(run.command(job, base), stdout=log, stderr=subprocess.STDOUT,
                            env=env, preexec_fn=_die_with_parent).returncode
    wall = time.time() - t0
    if rc == 0:
        (run.workdir / DONE).write_text(json.dumps(dict(values=dict(run.values), wall_s=round(wall, 1))))
    else:
        tail = (run.workdir / LOG).read_text(errors="replace").splitlines()[-20:]
        (run.workdir / FAILED).write_text(json.dumps(dict(values=dict(run.values), returncode=rc, log_tail=tail)))
    return run, rc, wall


def sweep(o: SweepOptions) -> dict:
    from bert_jax import checkpoint  # the lock; imported here, not by plan()'s users (jax, orbax)
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
    failed, running = [], []
    with concurrent.futures.ThreadPoolExecutor(o.parallel) as pool:
        for run, rc, wall in pool.map(lambda r: execute(r, o.job, record["base"]), todo):
            if isinstance(rc, str):
                print(f"sweep: {run.name}: running in {rc}; not started again", flush=True)
                running.append(run.name)
                continue
            print(f"sweep: {run.name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {wall:.0f} s", flush=True)
            if rc:
                failed.append(run.name)
    summary = dict(runs=len(runs), ran=len(todo) - len(running), skipped=len(runs) - len(todo), failed=failed,
                   running=running, out=str(out))
    if failed:
        print("sweep: failed runs (see their sweep.log):\n  " + "\n  ".join(failed), file=sys.stderr)
    if running:
        print("sweep: runs still running in another process (rerun the sweep when they end to "
              "complete it):\n  " + "\n  ".join(running), file=sys.stderr)
    return summary


def main(o: SweepOptions):
    summary = sweep(o)
    print(json.dumps(summary))
    if summary["failed"] or summary["running"]:  # not complete: a script must not go on
        sys.exit(1)


if __name__ == "__main__":
    flags.run_job(main, SweepOptions)
