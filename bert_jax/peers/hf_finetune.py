"""The same fine-tuning as `finetune`, in Hugging Face transformers (PyTorch), for a
side-by-side comparison: same init folder, same (seeded) training subsample read by the
same reader, same sequence length, batch size, learning rate, warmup, linear decay,
weight decay (not on LayerNorm/bias), clipping, epochs and dropout. Text classification
and regression only. Needs the `test` extra (torch, transformers).

    python -m bert_jax.peers.hf_finetune --flagfile=experiments/finetune/sst2.flags \\
        --init_checkpoint=HF_DIR --workdir=runs/sst2_hf --max_train_examples=4000
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from absl import app

from bert_jax import flags, metrics
from bert_jax.data import tasks
from bert_jax.finetuning import subsample


def main(argv):
    import torch
    import transformers
    o = flags.finetune_options(argv)
    torch.manual_seed(o.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    reg = o.task == "regression"
    ex = tasks.read_text_examples(o.train_file, o.text_column, o.label_column, o.pair_column, regression=reg)
    ex = subsample(ex, o.max_train_examples, np.random.default_rng(o.seed))
    labels = None if reg else (list(o.labels) or sorted({e.label for e in ex}))
    tok = transformers.AutoTokenizer.from_pretrained(o.init_checkpoint)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        o.init_checkpoint, num_labels=1 if reg else len(labels),
        problem_type="regression" if reg else "single_label_classification")
    if o.dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = o.dropout

    def encode(examples):
        pairs = [e.pair for e in examples] if examples[0].pair is not None else None
        enc = tok([e.text for e in examples], pairs, truncation=True, max_length=o.max_seq_length,
                  padding="max_length", return_tensors="pt")
        y = (torch.tensor([float(e.label) for e in examples]) if reg
             else torch.tensor(tasks.label_ids(examples, labels)))
        return enc, y

    enc, y = encode(ex)
    n = len(ex)
    total = max(int(round(o.epochs * max(n // o.batch_size, 1))), 1)
    warm = int(o.warmup_proportion * total)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.learning_rate, eps=1e-6)
    sched = transformers.get_linear_schedule_with_warmup(opt, warm, total)
    order = np.random.default_rng(o.seed)
    perm = np.array([], np.int64)
    model.train()
    wd = pathlib.Path(o.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    for s in range(1, total + 1):
        if len(perm) < o.batch_size:
            perm = np.concatenate([perm, order.permutation(n)])
        idx, perm = torch.tensor(perm[:o.batch_size]), perm[o.batch_size:]
        out = model(**{k: v[idx] for k, v in enc.items()}, labels=y[idx])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        with open(wd / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": s, "loss": float(out.loss)}) + "\n")
    model.eval()
    results = {}
    for name, path in o.eval_files:
        dev = tasks.read_text_examples(path, o.text_column, o.label_column, o.pair_column, regression=reg)
        denc, dy = encode(dev)
        logits = []
        with torch.no_grad():
            for i in range(0, len(dev), 64):
                logits.append(model(**{k: v[i:i + 64] for k, v in denc.items()}).logits)
        logits = torch.cat(logits).numpy()
        res = (metrics.regression(dy.numpy(), logits[:, 0]) if reg
               else metrics.classification(dy.numpy(), logits.argmax(-1)))
        results[name] = res
        print(f"hf_finetune: {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
    (wd / "results.json").write_text(json.dumps({"steps": total, "eval": results}, indent=1))


if __name__ == "__main__":
    flags.define_finetune_flags()
    app.run(main)
