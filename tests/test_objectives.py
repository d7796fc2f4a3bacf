"""Pretraining objectives (model/objectives.py): each object's loss against a plain NumPy
computation, accumulation exactness through the denominators, and the registry's
agreement with the flags, the model's heads and the Hugging Face classes."""

import numpy as np
import pytest

from bert_jax import options
from bert_jax.interop import convert
from bert_jax.model import objectives
from bert_jax.model.config import FAMILIES, ModelConfig


def _batch(rng, B=4, P=5, V=11, sentence=True):
    b = {"masked_ids": rng.integers(0, V, (B, P)), "masked_weights": (rng.random((B, P)) < 0.7).astype(np.float32),
         "attention_mask": np.ones((B, 9), np.int32)}
    out = {"mlm_logits": rng.normal(size=(B, P, V)).astype(np.float32), "sentence_logits": None}
    if sentence:
        b.update(sentence_labels=rng.integers(0, 2, (B,)), sentence_weights=np.array([1, 1, 0, 1], np.float32))
        out["sentence_logits"] = rng.normal(size=(B, 2)).astype(np.float32)
    return b, out


def _nll(logits, labels):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


@pytest.mark.parametrize("name", list(objectives.OBJECTIVES))
def test_loss_is_the_masked_cross_entropy_plus_the_sentence_task(name):
    obj = objectives.get(name)
    b, out = _batch(np.random.default_rng(0), sentence=obj.sentence_task is not None)
    loss, m = obj.loss(out, b)
    w = b["masked_weights"]
    want = (_nll(out["mlm_logits"], b["masked_ids"]) * w).sum() / w.sum()
    if obj.sentence_task:
        sw = b["sentence_weights"]
        want += (_nll(out["sentence_logits"], b["sentence_labels"]) * sw).sum() / sw.sum()
    assert float(loss) == pytest.approx(want, rel=1e-5)
    figures = obj.figures(m)
    assert tuple(figures) == obj.logged
    assert figures["mlm_accuracy"] == pytest.approx(
        ((out["mlm_logits"].argmax(-1) == b["masked_ids"]) * w).sum() / w.sum())
    # Two halves scored with the whole batch's denominators add up to the whole batch.
    den = obj.denominators(b)
    halves = [obj.loss({k: (v[s] if v is not None else None) for k, v in out.items()},
                       {k: v[s] for k, v in b.items()}, den)[0] for s in (slice(0, 2), slice(2, 4))]
    assert float(sum(halves)) == pytest.approx(float(loss), rel=1e-5)


def test_registry_agrees_with_flags_heads_and_export():
    assert options.OBJECTIVES == tuple(objectives.OBJECTIVES)
    for name, obj in objectives.OBJECTIVES.items():
        for family, (cls, head) in obj.hf.items():
            # import maps the class back to this objective; a sentence head has an HF name
            assert convert.ARCHITECTURES[cls] == (family, "pretraining", name)
            assert (head is None) == (obj.sentence_task is None)
        for family in FAMILIES:
            cfg = ModelConfig(family=family, objective=name)
            if family in obj.hf:
                assert convert.hf_architecture(cfg, "pretraining") == obj.hf_class(family)
            else:  # refused by name: the head no class holds
                with pytest.raises(convert.ConvertError, match=obj.sentence_task.upper()):
                    convert.hf_architecture(cfg, "pretraining")
    with pytest.raises(ValueError, match="objective='nsp'"):
        objectives.get("nsp")
