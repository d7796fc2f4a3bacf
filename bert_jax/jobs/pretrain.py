"""`pretrain` job: pretrain BERT / RoBERTa / ALBERT from scratch, or resume.

    ./launch.sh pretrain --flagfile=experiments/quickstart.flags [--flag=value ...]
"""

import json

from bert_jax import flags
from bert_jax.options import PretrainOptions


def main(opts: PretrainOptions):
    from bert_jax.training import pretraining
    summary = pretraining.run(opts)
    if "prepared" in summary:
        print(f"pretrain: --prepare_only: tokenizer and corpus prepared in {summary['prepared']}")
        return
    held = summary.get("heldout", {})
    line = f"pretrain: step {summary['step']}"
    if held:
        line += (f", held-out MLM accuracy {held['mlm_accuracy']:.4f} (loss {held['mlm_loss']:.3f})"
                 + (f", NSP/SOP accuracy {held['sentence_accuracy']:.4f}" if "sentence_accuracy" in held else ""))
    print(line)
    print(f"checkpoint: {summary['checkpoint']}\nmetrics: {summary['metrics']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    flags.run_job(main, PretrainOptions)
