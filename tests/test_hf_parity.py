"""Numerical parity with Hugging Face transformers (PyTorch), float32, max |diff| <= 1e-4.

Random HF weights (every tensor perturbed, so LayerNorm scales and biases are not the
trivial 1/0) are loaded into our model through the rename table; both run a padded
pair batch in eval mode.
"""

import numpy as np
import pytest
import torch
import transformers

import jax.numpy as jnp

from bert_jax.interop import rename
from bert_jax.model.heads import abstract_params, build_model
from flax import linen as nn

import tiny

TOL = 1e-4

HF_CLASSES = {
    ("bert", "pretraining"): "BertForPreTraining",
    ("roberta", "pretraining"): "RobertaForMaskedLM",
    ("albert", "pretraining"): "AlbertForPreTraining",
    ("bert", "base"): "BertModel",
    ("roberta", "base"): "RobertaModel",
    ("albert", "base"): "AlbertModel",
}
for fam, Fam in (("bert", "Bert"), ("roberta", "Roberta"), ("albert", "Albert")):
    for task, suffix in (("sequence_classification", "ForSequenceClassification"),
                         ("token_classification", "ForTokenClassification"),
                         ("question_answering", "ForQuestionAnswering")):
        HF_CLASSES[(fam, task)] = Fam + suffix


def hf_model(cfg, task, seed=0):
    d = rename.hf_config_dict(cfg, task)
    hf_cfg = transformers.AutoConfig.for_model(**d)
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[(cfg.family, task)])(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def state_dict_np(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def ours_from_hf(model, cfg, task):
    params = rename.from_hf(state_dict_np(model), cfg, task)
    rename.check_shapes(params, nn.unbox(abstract_params(cfg, task)))
    return params


def run_both(cfg, task, params, model, ids, types, mask):
    ours = build_model(cfg, task).apply({"params": params}, jnp.asarray(ids), jnp.asarray(types),
                                        jnp.asarray(mask))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                       token_type_ids=torch.tensor(types, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long))
    return ours, theirs


def assert_close(a, b, what):
    a, b = np.asarray(a), b.detach().numpy()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = float(np.max(np.abs(a - b)))
    assert err <= TOL, f"{what}: max |diff| {err:.2e} > {TOL}"


ALBERT_GROUPED = dict(num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2)
CASES = [
    ("bert", {}),
    ("roberta", {}),
    ("albert", {}),
    ("albert", ALBERT_GROUPED),
]


@pytest.mark.parametrize("family,kw", CASES, ids=["bert", "roberta", "albert", "albert-grouped"])
@pytest.mark.parametrize("task", ["pretraining", "sequence_classification",
                                  "token_classification", "question_answering"])
def test_parity_with_hugging_face(family, kw, task):
    cfg = tiny.config(family, **kw)
    model = hf_model(cfg, task)
    params = ours_from_hf(model, cfg, task)
    ids, types, mask = tiny.batch(cfg)
    ours, theirs = run_both(cfg, task, params, model, ids, types, mask)
    if task == "pretraining":
        logits = theirs.logits if family == "roberta" else theirs.prediction_logits
        assert_close(ours["mlm_logits"], logits, "mlm logits")
        if family == "bert":
            assert_close(ours["sentence_logits"], theirs.seq_relationship_logits, "nsp logits")
        elif family == "albert":
            assert_close(ours["sentence_logits"], theirs.sop_logits, "sop logits")
        else:
            assert ours["sentence_logits"] is None
    elif task == "question_answering":
        assert_close(ours[0], theirs.start_logits, "start logits")
        assert_close(ours[1], theirs.end_logits, "end logits")
    else:
        assert_close(ours, theirs.logits, f"{task} logits")
    # And back: our params -> HF names reproduce HF's tensors exactly.
    back = rename.to_hf(params, cfg, task)
    sd = state_dict_np(model)
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_regression_head_matches_hugging_face():
    cfg = tiny.config("bert", num_labels=1)
    model = hf_model(cfg, "sequence_classification", seed=3)
    params = ours_from_hf(model, cfg, "sequence_classification")
    ids, types, mask = tiny.batch(cfg, seed=3)
    ours, theirs = run_both(cfg, "sequence_classification", params, model, ids, types, mask)
    assert ours.shape == (tiny.B, 1)
    assert_close(ours, theirs.logits, "regression output")


@pytest.mark.parametrize("family", ["bert", "roberta", "albert"])
def test_base_model_hidden_states_match(family):
    cfg = tiny.config(family)
    model = hf_model(cfg, "base", seed=1)
    params = ours_from_hf(model, cfg, "base")
    ids, types, mask = tiny.batch(cfg, seed=1)
    ours = build_model(cfg, "base").apply({"params": params}, jnp.asarray(ids), jnp.asarray(types),
                                          jnp.asarray(mask), output_hidden_states=True)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                       token_type_ids=torch.tensor(types, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long),
                       output_hidden_states=True)
    assert len(theirs.hidden_states) == ours["hidden_states"].shape[0]
    for i, h in enumerate(theirs.hidden_states):
        assert_close(ours["hidden_states"][i], h, f"hidden state {i}")
    assert_close(ours["pooled_output"], theirs.pooler_output, "pooler")


@pytest.mark.parametrize("family", ["bert", "roberta", "albert"])
def test_span_loss_gradients_match(family):
    """Gradients of the QA loss, which reads padded positions, equal torch's for every
    tensor: the padding embedding rows (torch's padding_idx) get none on either side."""
    import jax
    from bert_jax.tasks.finetune_tasks import SpanQA
    task = "question_answering"
    cfg = tiny.config(family)
    model = hf_model(cfg, task, seed=2)
    params = ours_from_hf(model, cfg, task)
    ids, types, mask = tiny.batch(cfg, seed=2)
    starts, ends = np.array([1, 2] + [0] * (len(ids) - 2)), np.array([3, 2] + [1] * (len(ids) - 2))
    batch = dict(input_ids=jnp.asarray(ids), token_type_ids=jnp.asarray(types), attention_mask=jnp.asarray(mask),
                 start_positions=jnp.asarray(starts), end_positions=jnp.asarray(ends))
    span_model = build_model(cfg, task)
    loss = lambda p: SpanQA(None).loss(span_model.apply({"params": p}, batch["input_ids"], batch["token_type_ids"],
                                                   batch["attention_mask"]), batch)
    grads = jax.grad(loss)(params)
    as_long = lambda x: torch.tensor(np.asarray(x), dtype=torch.long)
    model(input_ids=as_long(ids), token_type_ids=as_long(types), attention_mask=as_long(mask),
          start_positions=as_long(starts), end_positions=as_long(ends)).loss.backward()
    theirs = {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}
    ours = rename.to_hf(jax.tree.map(np.asarray, grads), cfg, task)
    assert (np.asarray(ids) == cfg.pad_token_id).any()
    for k, g in theirs.items():
        np.testing.assert_allclose(ours[k], g, atol=1e-5, err_msg=k)


def test_unrepresentable_sharing_is_named():
    with pytest.raises(rename.RenameError, match="share_scope"):
        rename.hf_entries(tiny.config("albert", share_scope="attention"), "base")
    with pytest.raises(rename.RenameError, match="embedding_size"):
        rename.hf_entries(tiny.config("bert", embedding_size=24), "base")


def test_missing_and_unexpected_tensors_are_named():
    cfg = tiny.config("bert")
    sd = state_dict_np(hf_model(cfg, "token_classification"))
    broken = dict(sd)
    del broken["bert.encoder.layer.1.attention.self.key.weight"]
    with pytest.raises(rename.RenameError, match=r"layer\.1\.attention\.self\.key\.weight"):
        rename.from_hf(broken, cfg, "token_classification")
    extra = dict(sd, **{"bert.encoder.layer.7.output.dense.weight": np.zeros(3)})
    with pytest.raises(rename.RenameError, match=r"layer\.7\.output"):
        rename.from_hf(extra, cfg, "token_classification")
