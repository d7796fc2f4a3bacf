"""`convert` job: Hugging Face <-> bert_jax checkpoints, for every family and head.

    ./launch.sh convert --from_hf=HF_DIR --out=OUR_DIR
    ./launch.sh convert --checkpoint=OUR_DIR --to_hf=HF_DIR [--hf_dtype=bfloat16]
"""

from bert_jax import flags
from bert_jax.interop.convert import export, hf_architecture, load_hf, read_labels, save_ours
from bert_jax.options import ConvertOptions


def main(o: ConvertOptions):
    if o.from_hf:
        cfg, task, params, _ = load_hf(o.from_hf)
        save_ours(o.out, cfg, task, params, o.from_hf, source=str(o.from_hf),
                  labels=read_labels(o.from_hf))
        print(f"convert: {o.from_hf} ({cfg.family}, {task}) -> {o.out}")
    else:
        cfg, task = export(o.checkpoint, o.to_hf, o.hf_dtype)
        print(f"convert: {o.checkpoint} ({cfg.family}, {task}) -> {o.to_hf} [{hf_architecture(cfg, task)}]")


if __name__ == "__main__":
    flags.run_job(main, ConvertOptions)
