"""Deterministic held-out splits for data that ship without one.

    python -m bert_jax.data.split --kind=rows --input=msr_paraphrase_train.txt --dev_size=408 --out=DIR
    python -m bert_jax.data.split --kind=squad_articles --input=squad.json --dev_fraction=0.25 --out=DIR

rows: a TSV with a header -> train.tsv / dev.tsv, dev = `dev_size` rows drawn with the
seed (GLUE's MRPC dev has 408 rows; its id list is not available offline).
squad_articles: SQuAD JSON -> train.json / dev.json, whole articles on each side, so no
paragraph is seen in both.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from absl import app, flags

_KIND = flags.DEFINE_enum("kind", "rows", ["rows", "squad_articles"], "What to split.")
_INPUT = flags.DEFINE_string("input", None, "File to split.", required=True)
_OUT = flags.DEFINE_string("out", None, "Folder for the two parts.", required=True)
_DEV_SIZE = flags.DEFINE_integer("dev_size", 408, "rows: dev rows.")
_DEV_FRACTION = flags.DEFINE_float("dev_fraction", 0.25, "squad_articles: share of articles for dev.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the draw.")


def split_rows(path, out, dev_size: int, seed: int = 0) -> tuple[int, int]:
    lines = pathlib.Path(path).read_text(encoding="utf-8-sig").splitlines()
    header, rows = lines[0], [l for l in lines[1:] if l.strip()]
    if dev_size >= len(rows):
        raise ValueError(f"--dev_size={dev_size}: {path} has only {len(rows)} rows")
    dev = set(np.random.default_rng(seed).choice(len(rows), dev_size, replace=False).tolist())
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.tsv").write_text("\n".join([header] + [r for i, r in enumerate(rows) if i not in dev]) + "\n")
    (out / "dev.tsv").write_text("\n".join([header] + [r for i, r in enumerate(rows) if i in dev]) + "\n")
    return len(rows) - dev_size, dev_size


def split_squad(path, out, dev_fraction: float, seed: int = 0) -> tuple[int, int]:
    d = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    n = len(d["data"])
    k = max(1, int(round(n * dev_fraction)))
    dev = set(np.random.default_rng(seed).choice(n, k, replace=False).tolist())
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train", lambda i: i not in dev), ("dev", lambda i: i in dev)):
        part = dict(d, data=[a for i, a in enumerate(d["data"]) if keep(i)])
        (out / f"{name}.json").write_text(json.dumps(part))
    return n - k, k


def main(argv):
    del argv
    if _KIND.value == "rows":
        a, b = split_rows(_INPUT.value, _OUT.value, _DEV_SIZE.value, _SEED.value)
    else:
        a, b = split_squad(_INPUT.value, _OUT.value, _DEV_FRACTION.value, _SEED.value)
    print(f"split: {a} train / {b} dev -> {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
