"""Pretraining objectives: each one object naming its heads, the instances it trains on,
its loss, its logged figures and the Hugging Face class that holds its heads.

  mlm      masked LM alone (RoBERTa §4.2 FULL-SENTENCES rows)
  mlm_nsp  masked LM + next-sentence prediction (BERT §3.1, Devlin et al. A.2)
  mlm_sop  masked LM + sentence-order prediction (ALBERT §4.1)

Any family takes any objective (`ModelConfig.objective` holds the name). The model, the
train step, evaluation, instance building and export ask the objective, never the family,
so adding an objective is one new entry here (and its test).

Losses return sums and counts: microbatches and hosts add them up, and `figures` turns the
sums into the logged figures (mlm_loss, mlm_accuracy, and sentence_loss/_accuracy when the
objective has a sentence task).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    # The sentence-level task trained beside masked LM, which is also the kind of
    # instance built (data/instances.py): "nsp", "sop", or None (FULL-SENTENCES rows).
    sentence_task: str | None
    # family -> (transformers class holding these heads, HF prefix of the sentence head).
    # A family missing here has no such class: export refuses by name.
    hf: Mapping[str, tuple[str, str | None]]
    # HF's AlbertSOPHead applies dropout to the pooled output before its classifier;
    # BERT's NSP head does not.
    sentence_dropout: bool = False

    @property
    def instance_kind(self) -> str:
        """The instances this objective trains on: nsp, sop or none (no sentence pairs)."""
        return self.sentence_task or "none"

    @property
    def logged(self) -> tuple[str, ...]:
        """The figures `figures` returns, in order."""
        sent = ("sentence_loss", "sentence_accuracy") if self.sentence_task else ()
        return ("mlm_loss", "mlm_accuracy") + sent

    def hf_class(self, family: str) -> str | None:
        return self.hf.get(family, (None, None))[0]

    def denominators(self, batch) -> tuple[jax.Array, jax.Array]:
        """(masked-token count, sentence-label count) of a whole batch, at least 1 each: the
        loss of every microbatch is divided by the global counts, so that accumulating
        microbatches gives exactly the loss (and gradient) of the big batch."""
        mlm = jnp.maximum(batch["masked_weights"].sum(), 1.0)
        sent = (jnp.maximum(batch["sentence_weights"].sum(), 1.0) if self.sentence_task
                else jnp.ones(()))
        return mlm, sent

    def loss(self, out: dict, batch, denominators=None) -> tuple[jax.Array, dict]:
        """Masked-LM cross-entropy summed over masked positions / the masked-token count,
        plus the sentence task's cross-entropy summed / the sentence count. The counts are
        `denominators` (the whole batch's, when `batch` is one microbatch) or this batch's.
        `out`: the pretraining model's outputs. Returns (loss, metrics of sums and counts)."""
        mlm_n, s_n = denominators if denominators is not None else self.denominators(batch)
        logits, w = out["mlm_logits"], batch["masked_weights"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["masked_ids"])
        correct = (jnp.argmax(logits, -1) == batch["masked_ids"]) * w
        metrics = {"mlm_nll_sum": (nll * w).sum(), "mlm_correct": correct.sum(), "mlm_count": w.sum(),
                   "real_tokens": batch["attention_mask"].sum().astype(jnp.float32)}
        loss = metrics["mlm_nll_sum"] / mlm_n
        if self.sentence_task:
            s_logits, sw = out["sentence_logits"], batch["sentence_weights"]
            s_nll = optax.softmax_cross_entropy_with_integer_labels(s_logits, batch["sentence_labels"])
            s_correct = (jnp.argmax(s_logits, -1) == batch["sentence_labels"]) * sw
            metrics.update(sentence_nll_sum=(s_nll * sw).sum(), sentence_correct=s_correct.sum(),
                           sentence_count=sw.sum())
            loss = loss + metrics["sentence_nll_sum"] / s_n
        return loss, metrics

    def figures(self, sums: Mapping) -> dict[str, float]:
        """Summed metrics -> the logged figures (`logged`)."""
        ratio = lambda a, b: float(sums[a]) / max(float(sums[b]), 1.0)
        out = {"mlm_loss": ratio("mlm_nll_sum", "mlm_count"), "mlm_accuracy": ratio("mlm_correct", "mlm_count")}
        if self.sentence_task:
            out.update(sentence_loss=ratio("sentence_nll_sum", "sentence_count"),
                       sentence_accuracy=ratio("sentence_correct", "sentence_count"))
        return out


_MLM_CLASSES = {fam: (f"{Fam}ForMaskedLM", None)
                for fam, Fam in (("bert", "Bert"), ("roberta", "Roberta"), ("albert", "Albert"))}

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("mlm", None, _MLM_CLASSES),
    Objective("mlm_nsp", "nsp", {"bert": ("BertForPreTraining", "cls.seq_relationship")}),
    Objective("mlm_sop", "sop", {"albert": ("AlbertForPreTraining", "sop_classifier.classifier")},
              sentence_dropout=True),
)}


def get(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"objective={name!r}: must be one of {tuple(OBJECTIVES)}") from None
