"""`split` job: deterministic held-out splits for data that ship without one.

    ./launch.sh split --kind=rows --input=msr_paraphrase_train.txt --dev_size=408 --out=DIR
    ./launch.sh split --kind=squad_articles --input=squad.json --dev_fraction=0.25 --out=DIR

rows: a TSV with a header -> train.tsv / dev.tsv, dev = `dev_size` rows drawn with the
seed (GLUE's MRPC dev has 408 rows; its id list is not available offline).
squad_articles: SQuAD JSON -> train.json / dev.json, whole articles on each side, so no
paragraph is seen in both. Both parts are written atomically, never over the input.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from bert_jax import flags, paths
from bert_jax.errors import BertJaxError
from bert_jax.options import SplitOptions


class SplitError(BertJaxError, ValueError):
    """The input cannot be split as asked; names the file and the flag."""


def _write_parts(out, parts: dict[str, str], source) -> None:
    out = paths.check_output("--out", out, input=source)
    for name in parts:  # every part checked before any is written
        paths.check_output("--out", out / name, input=source)
    for name, text in parts.items():
        paths.write_atomically(out / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))


def split_rows(path, out, dev_size: int, seed: int = 0) -> tuple[int, int]:
    lines = pathlib.Path(path).read_text(encoding="utf-8-sig").splitlines()
    if not lines:
        raise SplitError(f"--input={path}: the file is empty (a TSV with a header row is expected)")
    header, rows = lines[0], [l for l in lines[1:] if l.strip()]
    if dev_size >= len(rows):
        raise SplitError(f"--dev_size={dev_size}: {path} has only {len(rows)} rows")
    dev = set(np.random.default_rng(seed).choice(len(rows), dev_size, replace=False).tolist())
    _write_parts(out, {"train.tsv": "\n".join([header] + [r for i, r in enumerate(rows) if i not in dev]) + "\n",
                       "dev.tsv": "\n".join([header] + [r for i, r in enumerate(rows) if i in dev]) + "\n"}, path)
    return len(rows) - dev_size, dev_size


def split_squad(path, out, dev_fraction: float, seed: int = 0) -> tuple[int, int]:
    try:
        d = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        articles = d["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SplitError(f"--input={path}: not SQuAD JSON with a 'data' list ({type(e).__name__}: {e})") from None
    n = len(articles)
    k = max(1, int(round(n * dev_fraction)))
    if k >= n:
        raise SplitError(f"--dev_fraction={dev_fraction}: {path} has {n} articles, which leaves none for train")
    dev = set(np.random.default_rng(seed).choice(n, k, replace=False).tolist())
    _write_parts(out, {f"{name}.json": json.dumps(dict(d, data=[a for i, a in enumerate(articles) if keep(i)]))
                       for name, keep in (("train", lambda i: i not in dev), ("dev", lambda i: i in dev))}, path)
    return n - k, k


def main(o: SplitOptions):
    if o.kind == "rows":
        a, b = split_rows(o.input, o.out, o.dev_size, o.seed)
    else:
        a, b = split_squad(o.input, o.out, o.dev_fraction, o.seed)
    print(f"split: {a} train / {b} dev -> {o.out}")


if __name__ == "__main__":
    flags.run_job(main, SplitOptions)
