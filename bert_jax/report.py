"""`report` job: collect runs under a folder into a table and plots.

    ./launch.sh report --runs=runs --out=runs/report

For every folder holding a metrics.jsonl: one row of report.md (last step, last train
loss, best and last held-out MLM accuracy, NSP/SOP accuracy) and <run>.png with the
training loss and the held-out MLM loss/accuracy against steps.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags

_RUNS = flags.DEFINE_string("runs", None, "Folder holding run folders (or one run).", required=True)
_OUT = flags.DEFINE_string("out", None, "Folder to write report.md and PNGs to.", required=True)


def read_metrics(path: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """(train records, held-out records), the last record per step winning (a resumed
    run re-logs the steps after its checkpoint)."""
    train, held = {}, {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        (held if "heldout_mlm_loss" in r else train)[r["step"]] = r
    return [train[k] for k in sorted(train)], [held[k] for k in sorted(held)]


def plot(name: str, train: list[dict], held: list[dict], out: pathlib.Path) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["step"] for r in train], [r["mlm_loss"] for r in train], label="train MLM loss")
    if held:
        a.plot([r["step"] for r in held], [r["heldout_mlm_loss"] for r in held], "o-", label="held-out MLM loss")
        b.plot([r["step"] for r in held], [r["heldout_mlm_accuracy"] for r in held], "o-", label="held-out MLM accuracy")
        if "heldout_sentence_accuracy" in held[0]:
            b.plot([r["step"] for r in held], [r["heldout_sentence_accuracy"] for r in held], "s--",
                   label="held-out NSP/SOP accuracy")
    b.plot([r["step"] for r in train], [r["mlm_accuracy"] for r in train], alpha=0.5, label="train MLM accuracy")
    for ax, t in ((a, "loss"), (b, "accuracy")):
        ax.set_xlabel("step")
        ax.set_title(f"{name}: {t}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv):
    del argv
    runs, out = pathlib.Path(_RUNS.value), pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    rows = ["| run | steps | train MLM loss | held-out MLM loss | held-out MLM acc (last / best) | held-out NSP/SOP acc |",
            "|---|---|---|---|---|---|"]
    for m in sorted(runs.rglob("metrics.jsonl")):
        name = m.parent.name
        train, held = read_metrics(m)
        if not train:
            continue
        last = held[-1] if held else {}
        best = max((r["heldout_mlm_accuracy"] for r in held), default=float("nan"))
        rows.append(f"| {name} | {train[-1]['step']} | {train[-1]['mlm_loss']:.3f} | "
                    f"{last.get('heldout_mlm_loss', float('nan')):.3f} | "
                    f"{last.get('heldout_mlm_accuracy', float('nan')):.4f} / {best:.4f} | "
                    f"{last.get('heldout_sentence_accuracy', float('nan')):.4f} |")
        plot(name, train, held, out)
    (out / "report.md").write_text("\n".join(rows) + "\n")
    print(f"report: wrote {out / 'report.md'}")


if __name__ == "__main__":
    app.run(main)
