"""Build a large corpus of real text for the corpus-preparation benchmark (#13): the .txt
files of the shared corpora (../shared/data/corpus: 145 files, 20 MB of public-domain and
NLTK text) repeated as often as --gb asks (99 copies for 2 GB), each copy with its own seeded order of the source files, written as
FILES_PER_COPY files per copy. Paragraphs (blank-line separated) stay intact, so prepare it
with --document_boundary=blank_line.

    python experiments/cluster/big_corpus.py --out=/tmp/big --gb=2
"""

import argparse
import pathlib
import random


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="../shared/data/corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--files_per_copy", type=int, default=8)
    a = p.parse_args()
    docs = [f.read_text(encoding="utf-8", errors="replace")
            for f in sorted(pathlib.Path(a.source).rglob("*.txt"))]
    size = sum(len(d.encode()) for d in docs)
    copies = max(1, round(a.gb * 1e9 / size))
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(copies):
        order = list(range(len(docs)))
        random.Random(k).shuffle(order)
        per = -(-len(order) // a.files_per_copy)
        for j in range(a.files_per_copy):
            text = "\n\n".join(docs[i].strip() for i in order[j * per:(j + 1) * per])
            (out / f"copy{k:03d}-{j}.txt").write_text(text + "\n", encoding="utf-8")
    total = sum(f.stat().st_size for f in out.glob("*.txt"))
    print(f"{copies} copies x {a.files_per_copy} files of {len(docs)} source files: {total / 1e9:.2f} GB in {out}")


if __name__ == "__main__":
    main()
