"""Times batch tokenization of a corpus (WordPiece by default): the figure issue #3 asks
for. Prints one JSON line.

    python -m bert_jax.jobs.tokenizer_bench --vocab=../shared/data/vocab/bert-base-uncased \\
        --corpus='../shared/data/corpus/**/*'
"""

import json
import time

from bert_jax.data import corpus
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.options import TokenizerBenchOptions


def main(o: TokenizerBenchOptions):
    tok = Tokenizer.load(o.vocab)
    files = corpus.expand(o.corpus)
    t0 = time.perf_counter()
    n_bytes = sum(f.stat().st_size for f in files)
    n_lines = n_tokens = 0
    batch = []
    for line in corpus.iter_lines(files):
        batch.append(line)
        if len(batch) == o.batch_lines:
            n_tokens += sum(len(ids) for ids, _ in tok.tokenize_batch(batch))
            n_lines += len(batch)
            batch = []
    if batch:
        n_tokens += sum(len(ids) for ids, _ in tok.tokenize_batch(batch))
        n_lines += len(batch)
    dt = time.perf_counter() - t0
    print(json.dumps(dict(files=len(files), mb=round(n_bytes / 1e6, 1), lines=n_lines,
                          tokens=n_tokens, seconds=round(dt, 2),
                          tokens_per_s=round(n_tokens / dt), kind=tok.kind)))


if __name__ == "__main__":
    from bert_jax import flags
    flags.run_job(main, TokenizerBenchOptions)
