"""`report` job: collect runs under a folder into a table and plots.

    ./launch.sh report --runs=runs --out=runs/report

Every folder holding a metrics.jsonl is a run, pretraining or fine-tuning, in any mix.
One row each in report.md and report.csv: kind, last step, last training loss, and
 - pretraining: held-out MLM loss, held-out MLM accuracy (last / best), NSP/SOP accuracy;
 - fine-tuning: the evaluation metrics of each eval file (results.json when the run
   finished, else the last evaluation logged).
And <run>.png: training loss with the held-out (or evaluation) curves against steps.

Over a sweep (the folder holds sweep.json, written by the `sweep` job), also sweep.md and
sweep.csv: one row per configuration (the varied flags), with the number of seeds, the
parameter count, tokens seen, and every score as mean ± standard deviation over the seeds
(held-out MLM loss and accuracy, sentence-task accuracy, fine-tuning metrics), the best
configuration marked; and sweep_heldout.png, each configuration's held-out curve with a
band of one standard deviation over seeds.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive back end)
from absl import logging  # noqa: E402

from bert_jax.errors import BertJaxError  # noqa: E402
from bert_jax.options import ReportOptions  # noqa: E402

NAN = float("nan")


class ReportError(BertJaxError, ValueError):
    """--runs names nothing to report; the message says what."""


def read_metrics(path: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """(train records, evaluation records), the last record per step winning (a resumed
    run re-logs the steps after its checkpoint). A record with a `loss` is a training
    step; evaluations are eval_<set>_<metric> (runlog.py; logs written before that schema
    named pretraining's held-out figures heldout_*, read as eval_heldout_*)."""
    train, evals = {}, {}
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            r["step"]
        except (ValueError, KeyError, TypeError):  # a crashed run's log often ends in half a line
            logging.warning("%s:%d: not a metrics record (%r); skipped", path, i, line[:80])
            continue
        scores = {("eval_" + k if k.startswith("heldout_") else k): v for k, v in r.items()
                  if k.startswith(("heldout_", "eval_"))}
        if scores:
            evals[r["step"]] = dict(step=r["step"], **scores)
        if "loss" in r:
            train[r["step"]] = r
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def summarize(run: pathlib.Path) -> dict | None:
    """One row of the table for the run folder `run`, or None when it logged nothing."""
    train, evals = read_metrics(run / "metrics.jsonl")
    if not train:
        return None
    row = {"run": run.name, "steps": train[-1]["step"], "train_loss": train[-1]["loss"]}
    if any("mlm_loss" in r for r in train):
        row["kind"] = "pretrain"
        held = [r for r in evals if "eval_heldout_mlm_loss" in r]
        last = held[-1] if held else {}
        row.update(heldout_mlm_loss=last.get("eval_heldout_mlm_loss", NAN),
                   heldout_mlm_accuracy=last.get("eval_heldout_mlm_accuracy", NAN),
                   best_heldout_mlm_accuracy=max((r["eval_heldout_mlm_accuracy"] for r in held), default=NAN),
                   heldout_sentence_accuracy=last.get("eval_heldout_sentence_accuracy", NAN))
        return row
    row["kind"] = "finetune"
    results = run / "results.json"
    if results.exists():
        for name, scores in json.loads(results.read_text()).get("eval", {}).items():
            row.update({f"{name}_{k}": v for k, v in scores.items()})
    elif evals:
        row.update({k[len("eval_"):]: v for k, v in evals[-1].items() if k.startswith("eval_")})
    return row


def plot(name: str, train: list[dict], evals: list[dict], out: pathlib.Path) -> pathlib.Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if any("mlm_loss" in r for r in train):
        a.plot([r["step"] for r in train], [r.get("mlm_loss", NAN) for r in train], alpha=0.6, label="train MLM loss")
        b.plot([r["step"] for r in train], [r.get("mlm_accuracy", NAN) for r in train], alpha=0.5,
               label="train MLM accuracy")
    keys = sorted({k for r in evals for k in r if k != "step"})
    for k in keys:
        pts = [(r["step"], r[k]) for r in evals if k in r and isinstance(r[k], (int, float))]
        if not pts:
            continue
        ax = a if k.endswith("loss") else b
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k.replace("_", " "))
    for ax, t in ((a, "loss"), (b, "held-out / evaluation scores")):
        ax.set_xlabel("step")
        ax.set_title(f"{name}: {t}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def write(rows: list[dict], out: pathlib.Path) -> None:
    """report.md and report.csv with the union of the rows' columns (blank where absent)."""
    cols = ["run", "kind", "steps", "train_loss"]
    cols += sorted({k for r in rows for k in r} - set(cols))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows([{c: r.get(c, "") for c in cols} for r in rows])


def report(runs: pathlib.Path, out: pathlib.Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in sorted(runs.rglob("metrics.jsonl")):
        row = summarize(m.parent)
        if row is None:
            continue
        rows.append(row)
        plot(m.parent.name, *read_metrics(m), out)
    write(rows, out)
    return rows


# ------------------------------------------------------------------ sweeps ----
SWEEP_SCORES = ("heldout_mlm_loss", "heldout_mlm_accuracy", "heldout_sentence_accuracy")


def param_count(run: pathlib.Path) -> int | None:
    """Parameters of the run's model (its config.json: pretraining workdir or best/)."""
    import numpy as np

    from bert_jax import checkpoint
    from bert_jax.model.heads import abstract_params
    for folder, task in ((run, "pretraining"), (run / "best", None)):
        if (folder / "config.json").exists():
            if task is None:
                task_file = folder / "task.json"
                task = json.loads(task_file.read_text())["task"] if task_file.exists() else "pretraining"
            import jax
            from flax import linen as nn
            shapes = nn.unbox(abstract_params(checkpoint.read_config(folder), task))
            return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
    return None


def tokens_seen(run: pathlib.Path, steps: int) -> float:
    """Row tokens of the steps run (batch x sequence length x steps, from the run record)."""
    manifest = run / "manifest.json"
    if not manifest.exists():
        return NAN
    opts = json.loads(manifest.read_text()).get("options", {})
    return int(steps * opts.get("batch_size", 0) * opts.get("max_seq_length", 0)) or NAN


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return NAN, NAN
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def init_config(path: str) -> str:
    """The configuration of the pretraining run a fine-tuning run started from: the name of
    its folder (a sweep names runs flag=value,...,seed=N) without the seed, so the
    pretraining seeds of one configuration are one group."""
    p = pathlib.PurePath(path)
    name = p.parent.name if p.name == "best" else p.name
    return ",".join(x for x in name.split(",") if not x.startswith("seed=")) or name


def sweep_report(runs: pathlib.Path, rows: list[dict], out: pathlib.Path) -> list[dict]:
    """One row per configuration of the sweep in `runs` (see the module docstring)."""
    record = json.loads((runs / "sweep.json").read_text())
    varied = ["init" if n == "init_checkpoint" else n for n, _ in record["grid"]]
    by_run = {r["run"]: r for r in rows}
    groups: dict[tuple, list[dict]] = {}
    for d in sorted(runs.iterdir()):
        done = d / "sweep_done.json"
        if not done.exists() or d.name not in by_run:
            continue
        values = json.loads(done.read_text())["values"]
        if "init_checkpoint" in values:
            values["init"] = init_config(values["init_checkpoint"])
        row = dict(by_run[d.name], params=param_count(d))
        row["tokens_seen"] = tokens_seen(d, row["steps"])
        groups.setdefault(tuple(values.get(k, "") for k in varied), []).append(row)
    score_keys = [k for k in SWEEP_SCORES if any(k in r for g in groups.values() for r in g)]
    score_keys += sorted({k for g in groups.values() for r in g for k in r
                          if r.get("kind") == "finetune" and k not in ("run", "kind", "steps", "train_loss")
                          and isinstance(r[k], (int, float))} - {"params", "tokens_seen"})
    table = []
    for key, members in groups.items():
        row = dict(zip(varied, key), seeds=len(members), params=members[0]["params"],
                   tokens_seen=members[0]["tokens_seen"])
        for k in score_keys:
            row[k], row[k + "_std"] = mean_std([r.get(k, NAN) for r in members])
        table.append(row)
    target = next((k for k in ("heldout_mlm_accuracy",) + tuple(score_keys) if k in score_keys), None)
    if target and table:
        lower = target.endswith("loss")
        best = (min if lower else max)(table, key=lambda r: (-math.inf if math.isnan(r[target]) else
                                                              (-r[target] if lower else r[target])))
        for r in table:
            r["best"] = "*" if r is best else ""
    cols = varied + ["seeds", "params", "tokens_seen"] + score_keys + ["best"]
    head = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    cell = lambda r, c: (f"{r[c]:.4f} ± {r[c + '_std']:.4f}" if c in score_keys and not math.isnan(r[c])
                         else _fmt(r.get(c, "")))
    (out / "sweep.md").write_text("\n".join(head + ["| " + " | ".join(cell(r, c) for c in cols) + " |"
                                                    for r in table]) + f"\n\nbest: {target} (*), mean ± std over seeds\n")
    with open(out / "sweep.csv", "w", newline="") as f:
        csv_cols = varied + ["seeds", "params", "tokens_seen"] + [x for k in score_keys for x in (k, k + "_std")]
        w = csv.DictWriter(f, csv_cols)
        w.writeheader()
        w.writerows([{c: r.get(c, "") for c in csv_cols} for r in table])
    _plot_sweep(runs, groups, varied, out)
    return table


def _plot_sweep(runs: pathlib.Path, groups: dict, varied: list[str], out: pathlib.Path) -> None:
    import numpy as np
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, members in groups.items():
        curves = []
        for r in members:
            _, evals = read_metrics(runs / r["run"] / "metrics.jsonl")
            curves.append({e["step"]: e["eval_heldout_mlm_accuracy"] for e in evals if "eval_heldout_mlm_accuracy" in e})
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        y = np.array([[c[s] for s in steps] for c in curves])
        label = ", ".join(f"{k}={v}" for k, v in zip(varied, key)) or "base"
        ax.plot(steps, y.mean(0), "o-", label=label)
        ax.fill_between(steps, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out MLM accuracy")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep_heldout.png", dpi=110)
    plt.close(fig)


def main(o: ReportOptions):
    runs, out = pathlib.Path(o.runs), pathlib.Path(o.out)
    if not runs.is_dir():
        raise ReportError(f"--runs={runs}: no such folder")
    if not any(runs.rglob("metrics.jsonl")):
        raise ReportError(f"--runs={runs} holds no run (no metrics.jsonl under it)")
    rows = report(runs, out)
    print(f"report: {len(rows)} runs -> {out / 'report.md'}")
    if (runs / "sweep.json").exists():
        table = sweep_report(runs, rows, out)
        print(f"report: {len(table)} configurations -> {out / 'sweep.md'}")


if __name__ == "__main__":
    from bert_jax import flags
    flags.run_job(main, ReportOptions)
