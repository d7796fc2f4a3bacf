"""The same fine-tuning as `finetune`, in Hugging Face transformers (PyTorch), for a
side-by-side comparison. Everything but the model and optimizer is shared with ours:
the same init folder, the same (seeded) training subsample and features (our tokenizer,
whose ids equal the transformers fast tokenizer's on these data sets -- tests/test_tokenizer
checks it), the same batch order, step count, sequence length, learning rate, warmup,
linear decay, weight decay (not on LayerNorm/bias), Adam betas and epsilon, clipping and
dropout, and the same
evaluation (Viterbi tag decoding, SQuAD n-best search, metrics). Every task type:
classification, regression, ner, qa. Needs the `test` extra (torch, transformers); runs
on the GPU when torch sees one.

    python -m bert_jax.peers.hf_finetune --flagfile=experiments/finetune/sst2.flags \\
        --init_checkpoint=HF_DIR --workdir=runs/sst2_hf --max_train_examples=4000
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from bert_jax import flags
from bert_jax.tasks import finetune_tasks
from bert_jax.training.finetuning import (FinetuneError, FinetuneOptions, batch_order, evaluate,
                                 plan, read_inputs, write_eval)
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.training import runlog

HF_CLASS = {"sequence_classification": "AutoModelForSequenceClassification",
            "token_classification": "AutoModelForTokenClassification",
            "question_answering": "AutoModelForQuestionAnswering"}


class HFPeer:
    """The fine-tuning run with a transformers + torch model and training loop; the task
    object, inputs, batch order, evaluation and output files are the job's own."""

    def __init__(self, o: FinetuneOptions):
        import torch
        import transformers
        if not (pathlib.Path(o.init_checkpoint) / "config.json").exists():
            raise FinetuneError(f"--init_checkpoint={o.init_checkpoint}: the peer needs a Hugging Face folder")
        if o.optimizer != "adamw" or o.decay_power != 1.0:  # torch AdamW with transformers' linear schedule
            raise FinetuneError(f"--optimizer={o.optimizer} --decay_power={o.decay_power}: the peer runs AdamW "
                                "with linear decay only (--optimizer=adamw --decay_power=1)")
        self.o, self.task = o, finetune_tasks.make(o)
        self.tok = Tokenizer.load(o.init_checkpoint)
        self.inputs = read_inputs(o, self.task, self.tok)
        self.labels, self.num_labels, self.train = self.inputs.labels, self.inputs.num_labels, self.inputs.train
        torch.manual_seed(o.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        kw = {"num_labels": self.num_labels}
        if o.task == "regression":
            kw["problem_type"] = "regression"
        if o.dropout is not None:
            kw.update(hidden_dropout_prob=o.dropout, attention_probs_dropout_prob=o.dropout)
        cls = getattr(transformers, HF_CLASS[self.task.model_task])
        self.model = cls.from_pretrained(o.init_checkpoint, **kw).to(self.device)

    def _tensors(self, feats: dict, idx=None) -> dict:
        import torch
        out = {}
        for k, v in feats.items():
            v = np.asarray(v if idx is None else v[idx])
            if k == "labels" and self.o.task == "ner":
                v = np.where(v < 0, -100, v)  # torch's ignore_index
            out[k] = torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "i" else v).to(self.device)
        return out

    def run(self) -> dict:
        import torch
        import transformers
        o = self.o
        wd = pathlib.Path(o.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        n = len(self.train["input_ids"])
        warmup, total = plan(o, n)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=o.learning_rate,
                                betas=(o.b1, o.b2), eps=o.eps)
        sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
        self.model.train()
        path, losses = wd / runlog.METRICS_FILE, []
        for s, idx in enumerate(batch_order(n, o.batch_size, total, o.seed), start=1):
            lr = sched.get_last_lr()[0]
            loss = self.model(**self._tensors(self.train, idx)).loss
            loss.backward()
            if o.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.detach())
            if s % o.log_every == 0 or s == total:  # the job's schema: means since the last line
                last = float(torch.stack(losses).mean())
                runlog.append(path, {"step": s, "loss": last, "learning_rate": lr})
                losses = []
        self.model.eval()
        results = {}
        for name, (ex, feats) in self.inputs.evals.items():
            res, preds = evaluate(self.task, self.apply, ex, feats, self.labels)
            results[name] = res
            write_eval(self.task, wd / "eval", name, res, ex, preds, self.labels)
            print(f"hf_finetune: {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
        summary = {"steps": total, "eval": results, "final_train_loss": last, "workdir": str(wd)}
        (wd / "results.json").write_text(json.dumps(summary, indent=1))
        return summary

    def apply(self, ids, types, mask):
        """The model's outputs on one batch, as NumPy (span QA: start and end logits)."""
        import torch
        with torch.no_grad():
            out = self.model(**self._tensors(dict(input_ids=ids, token_type_ids=types, attention_mask=mask)))
        if self.task.model_task == "question_answering":
            return out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
        return out.logits.float().cpu().numpy()


def main(o: FinetuneOptions):
    print(json.dumps(HFPeer(o).run()))


if __name__ == "__main__":
    flags.run_job(main, FinetuneOptions)
