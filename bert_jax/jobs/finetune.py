"""`finetune` job: fine-tune a checkpoint on a task and evaluate it.

    ./launch.sh finetune --flagfile=experiments/finetune/sst2.flags --init_checkpoint=DIR --workdir=DIR
"""

import json

from bert_jax import flags
from bert_jax.options import FinetuneOptions


def main(opts: FinetuneOptions):
    from bert_jax.training.finetuning import Finetuner
    summary = Finetuner(opts).run()
    if summary.get("stopped_early"):
        print(f"finetune: stopped at step {summary['step']} of {summary['steps']}; rerun to resume")
    for name, res in summary.get("eval", {}).items():
        print(f"finetune: {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
    print(json.dumps(summary))


if __name__ == "__main__":
    flags.run_job(main, FinetuneOptions)
