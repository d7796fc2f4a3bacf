"""`vocab` job: train a WordPiece, byte-level BPE or SentencePiece tokenizer on text files.

    ./launch.sh vocab --kind=wordpiece --corpus='corpus/*.txt' --vocab_size=8000 --out=DIR [--lowercase]
"""

from bert_jax import flags
from bert_jax.data.vocab import train
from bert_jax.options import VocabOptions


def main(o: VocabOptions):
    train(o.kind, o.corpus, o.vocab_size, o.out, o.lowercase, o.extra_special_tokens)
    print(f"vocab: wrote {o.kind} tokenizer to {o.out}")


if __name__ == "__main__":
    flags.run_job(main, VocabOptions)
