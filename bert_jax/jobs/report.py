"""`report` job: collect runs under a folder into a table and plots.

    ./launch.sh report --runs=runs --out=runs/report

Every folder holding a metrics.jsonl is a run, pretraining or fine-tuning, in any mix.
One row each in report.md and report.csv: kind, last step, last training loss, and
 - pretraining: held-out MLM loss, held-out MLM accuracy (last / best), NSP/SOP accuracy;
 - fine-tuning: the evaluation metrics of each eval file (results.json when the run
   finished, else the last evaluation logged).
And <run>.png: training loss with the held-out (or evaluation) curves against steps.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive back end)

from bert_jax.options import ReportOptions  # noqa: E402

NAN = float("nan")


def read_metrics(path: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """(train records, evaluation records), the last record per step winning (a resumed
    run re-logs the steps after its checkpoint). A record with a `loss` is a training
    step; evaluations are eval_<set>_<metric> (runlog.py; logs written before that schema
    named pretraining's held-out figures heldout_*, read as eval_heldout_*)."""
    train, evals = {}, {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
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


def main(o: ReportOptions):
    rows = report(pathlib.Path(o.runs), pathlib.Path(o.out))
    print(f"report: {len(rows)} runs -> {pathlib.Path(o.out) / 'report.md'}")


if __name__ == "__main__":
    from bert_jax import flags
    flags.run_job(main, ReportOptions)
