"""Manual check (not collected by pytest): one text file of a single line, of SIZE MB,
through the vocab trainer and through tokenization into the corpus cache, each stage in
its own process under /usr/bin/time -v; prints wall seconds and peak RSS per stage.

    .venv/bin/python tests/checks/long_line.py 5 20 200:vocab   # sizes in MB; :vocab = that stage only
Target (issue: reliability): bounded memory (<= 2 GB RSS) and time linear in the size.
"""
import json
import pathlib
import re
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
BOOKS = sorted((REPO / "bert_jax/corpus/train").glob("*.txt"))


def make(path: pathlib.Path, mb: int) -> None:
    words = " ".join(p.read_text(encoding="latin-1") for p in BOOKS).split()
    block = " ".join(words) + " "
    with open(path, "w") as f:
        left = mb * 10**6
        while left > 0:
            f.write(block[:left])
            left -= len(block)


def timed(code: str, *args) -> dict:
    res = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, *map(str, args)],
                         capture_output=True, text=True, cwd=REPO, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", res.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    return {"seconds": round(secs, 1), "peak_rss_gb": round(rss / 2**20, 3)}


VOCAB = "import sys; from bert_jax.data import vocab; vocab.train('wordpiece', sys.argv[1], 8000, sys.argv[2])"
CACHE = ("import sys, pathlib; from bert_jax.data import cache; from bert_jax.data.tokenizer import Tokenizer; "
         "c = cache.build([pathlib.Path(sys.argv[1])], Tokenizer.load(sys.argv[2]), sys.argv[2], sys.argv[3], "
         "workers=1); print(len(c.tokens))")

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        for arg in sys.argv[1:] or ["20"]:
            mb, _, only = arg.partition(":")  # "200:vocab" runs the vocab stage alone
            mb = int(mb)
            f = d / f"one_line_{mb}mb.txt"
            make(f, mb)
            out = {"mb": mb, "vocab": timed(VOCAB, f, d / f"tok{mb}")}
            if only != "vocab":
                out["tokenize"] = timed(CACHE, f, d / f"tok{mb}", d / f"cache{mb}")
            print(json.dumps(out), flush=True)
            f.unlink()
