"""Run the same fine-tuning with `finetune` (ours, JAX) and `bert_jax.peers.hf_finetune`
(Hugging Face transformers, PyTorch) from one flag file per task, over seeds, and put
the results side by side.

    python -m bert_jax.peers.side_by_side --init_checkpoint=HF_DIR --out=runs/side_by_side \\
        --parallel=4 sst2 mrpc:0,1,2 rte:0,1,2 stsb conll2003 squad_v1 -- --max_train_examples=4000

A run is NAME[:SEEDS] for experiments/finetune/NAME.flags (default seed 0); flags after
`--` (as --flag=value) go to every run. Runs start in the order given (first seeds of
every task, then the further seeds), up to --parallel at a time; with --deadline_s
nothing starts after the deadline and what still runs then is stopped and marked so.
Writes per run OUT/NAME/{ours,hf}_sSEED/ (the job's workdir) and its log, and after every
finished run OUT/summary.json and OUT/summary.md (mean over seeds; diff = ours - HF).
--collect tabulates finished runs already under OUT without running anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

from bert_jax import flags
from bert_jax.options import SideBySideOptions

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "finetune"
SIDES = {"ours": "bert_jax.jobs.finetune", "hf": "bert_jax.peers.hf_finetune"}


@dataclasses.dataclass
class Run:
    task: str
    seed: int
    side: str
    workdir: pathlib.Path
    status: str = "pending"       # pending, running, done, failed, timeout, skipped
    seconds: float | None = None
    result: dict | None = None
    proc: subprocess.Popen | None = None
    log: Any = None
    started: float = 0.0


def parse_runs(specs: list[str], out: pathlib.Path) -> list[Run]:
    levels: dict[int, list[Run]] = {}
    for spec in specs:
        name, _, seeds = spec.partition(":")
        if not (EXPERIMENTS / f"{name}.flags").exists():
            raise SystemExit(f"side_by_side: {spec!r}: no experiments/finetune/{name}.flags")
        try:
            seed_list = [int(s) for s in seeds.split(",")] if seeds else [0]
        except ValueError:
            raise SystemExit(f"side_by_side: {spec!r}: seeds must be integers, e.g. {name}:0,1,2") from None
        for level, seed in enumerate(seed_list):
            levels.setdefault(level, []).extend(
                Run(name, seed, side, out / name / f"{side}_s{seed}") for side in SIDES)
    return [r for level in sorted(levels) for r in levels[level]]


def collect(out: pathlib.Path) -> list[Run]:
    """The finished runs under `out` (OUT/NAME/SIDE_sSEED/results.json)."""
    runs = []
    for res in sorted(out.glob("*/*_s*/results.json")):
        side, _, seed = res.parent.name.rpartition("_s")
        if side in SIDES and seed.isdigit():
            runs.append(Run(res.parent.parent.name, int(seed), side, res.parent, "done",
                            result=json.loads(res.read_text())))
    if not runs:
        raise SystemExit(f"side_by_side: no finished runs (NAME/ours_sSEED/results.json) under {out}")
    return runs


def command(r: Run, init: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", SIDES[r.side], f"--flagfile={EXPERIMENTS / f'{r.task}.flags'}",
            f"--init_checkpoint={init}", f"--workdir={r.workdir}", f"--seed={r.seed}", *extra]


def summarize(runs: list[Run]) -> dict:
    tasks: dict[str, dict] = {}
    for r in runs:
        t = tasks.setdefault(r.task, {"ours": {}, "hf": {}, "seconds": {"ours": {}, "hf": {}}, "status": {}})
        t["status"][f"{r.side}_s{r.seed}"] = r.status
        if r.result:
            first_eval = next(iter(r.result["eval"].values()), {})
            t[r.side][r.seed] = first_eval
            t["seconds"][r.side][r.seed] = r.seconds
    for t in tasks.values():
        names = sorted({k for side in ("ours", "hf") for res in t[side].values() for k in res})
        t["mean"] = {side: {k: _mean([res[k] for res in t[side].values() if k in res]) for k in names}
                     for side in ("ours", "hf")}
    return tasks


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def markdown(tasks: dict) -> str:
    lines = ["| task | metric | bert_jax (per seed) | HF PyTorch (per seed) | mean bert_jax | mean HF | diff |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    for name, t in tasks.items():
        for k, ours in t["mean"]["ours"].items():
            hf = t["mean"]["hf"].get(k)
            per = lambda side: " / ".join(fmt(res.get(k)) for _, res in sorted(t[side].items())) or "-"
            diff = None if ours is None or hf is None else ours - hf
            lines.append(f"| {name} | {k} | {per('ours')} | {per('hf')} | {fmt(ours)} | {fmt(hf)} | {fmt(diff)} |")
    return "\n".join(lines) + "\n"


def main(a: SideBySideOptions, argv) -> int:
    """`argv` after absl: positional NAME[:SEEDS] runs, then (after `--`) --flag=value
    flags for every run."""
    rest = list(argv[1:])
    a = dataclasses.replace(a, runs=tuple(x for x in rest if not x.startswith("-")),
                            extra=tuple(x for x in rest if x.startswith("-")))
    if a.collect and a.runs:
        raise flags.FlagError(f"--collect runs nothing; drop the runs {list(a.runs)}")
    if not a.collect and not (a.runs and a.init_checkpoint):
        raise flags.FlagError("give --init_checkpoint=HF_DIR and at least one run (e.g. sst2 mrpc:0,1,2), or --collect")
    out = pathlib.Path(a.out)
    if a.collect:
        runs = collect(out)
        write_summary(runs, out)
        print((out / "summary.md").read_text())
        return 0
    runs = parse_runs(list(a.runs), out)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    t0 = time.time()
    pending, running = list(runs), []
    while pending or running:
        late = a.deadline_s is not None and time.time() - t0 > a.deadline_s
        while pending and len(running) < a.parallel and not late:
            r = pending.pop(0)
            r.workdir.mkdir(parents=True, exist_ok=True)
            r.log = open(r.workdir.parent / f"{r.side}_s{r.seed}.log", "w")
            r.proc = subprocess.Popen(command(r, a.init_checkpoint, list(a.extra)), stdout=r.log,
                                      stderr=subprocess.STDOUT, env=env)
            r.status, r.started = "running", time.time()
            running.append(r)
        if late:
            for r in pending:
                r.status = "skipped"
            pending = []
            for r in running:
                r.proc.kill()
        time.sleep(0.5)
        for r in [r for r in running if r.proc.poll() is not None]:
            running.remove(r)
            r.log.close()
            r.seconds = round(time.time() - r.started, 1)
            res = r.workdir / "results.json"
            if r.proc.returncode == 0 and res.exists():
                r.status, r.result = "done", json.loads(res.read_text())
            else:
                r.status = "timeout" if late else "failed"
            print(f"side_by_side: {r.task} {r.side} seed {r.seed}: {r.status} in {r.seconds} s "
                  f"{json.dumps(r.result['eval']) if r.result else ''}", flush=True)
            write_summary(runs, out)
    write_summary(runs, out)
    print((out / "summary.md").read_text())
    return 0 if all(r.status == "done" for r in runs) else 1


def write_summary(runs: list[Run], out: pathlib.Path) -> None:
    tasks = summarize(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(tasks, indent=1))
    (out / "summary.md").write_text(markdown(tasks))


if __name__ == "__main__":
    flags.run_job(lambda o, argv: sys.exit(main(o, argv)), SideBySideOptions, positional=True)
