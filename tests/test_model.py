"""Model invariances: padding, packing, scan == loop, remat == no remat, shared-parameter
gradients, dropout, bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bert_jax.model.heads import build_model, init_params

import tiny

FAMILIES = ["bert", "roberta", "albert"]


def params_for(cfg, task="base", seed=0):
    return nn.unbox(init_params(cfg, task, jax.random.key(seed)))


def seq_out(cfg, params, ids, types=None, mask=None, position_ids=None, segment_ids=None):
    apply = jax.jit(build_model(cfg, "base").apply)
    asarr = lambda x: None if x is None else jnp.asarray(x)
    return apply({"params": params}, asarr(ids), asarr(types), asarr(mask), asarr(position_ids),
                 asarr(segment_ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_real_tokens(family):
    cfg = tiny.config(family)
    params = params_for(cfg)
    rng = np.random.default_rng(0)
    n = 9
    ids = rng.integers(3, cfg.vocab_size, (1, n)).astype(np.int32)
    alone = seq_out(cfg, params, ids, mask=np.ones((1, n), np.int32))["sequence_output"]
    for pad in (1, 4, 11):
        padded = np.concatenate([ids, np.full((1, pad), cfg.pad_token_id, np.int32)], 1)
        mask = (np.arange(n + pad) < n).astype(np.int32)[None]
        out = seq_out(cfg, params, padded, mask=mask)["sequence_output"][:, :n]
        np.testing.assert_allclose(out, alone, atol=1e-5, err_msg=f"pad={pad}")
    if family != "roberta":  # RoBERTa derives positions from pad ids, so keep them pads
        junk = padded.copy()
        junk[0, n:] = rng.integers(3, cfg.vocab_size, pad)
        out = seq_out(cfg, params, junk, mask=mask)["sequence_output"][:, :n]
        np.testing.assert_allclose(out, alone, atol=1e-5, err_msg="pad content")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_examples_do_not_see_each_other(family):
    cfg = tiny.config(family)
    params = params_for(cfg)
    rng = np.random.default_rng(1)
    a = rng.integers(3, cfg.vocab_size, 5).astype(np.int32)
    b = rng.integers(3, cfg.vocab_size, 6).astype(np.int32)
    types_a, types_b = np.array([0, 0, 0, 1, 1]), np.array([0, 0, 1, 1, 1, 1])
    if cfg.type_vocab_size == 1:
        types_a, types_b = types_a * 0, types_b * 0
    off = cfg.position_offset
    row = np.concatenate([a, b, [cfg.pad_token_id] * 2])[None].astype(np.int32)
    types = np.concatenate([types_a, types_b, [0, 0]])[None].astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 6 + [0, 0]], np.int32)
    pos = np.concatenate([np.arange(5) + off, np.arange(6) + off, [off, off]])[None].astype(np.int32)
    packed = seq_out(cfg, params, row, types, None, pos, seg)["sequence_output"]
    alone_a = seq_out(cfg, params, a[None], types_a[None])["sequence_output"]
    alone_b = seq_out(cfg, params, b[None], types_b[None])["sequence_output"]
    np.testing.assert_allclose(packed[:, :5], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[:, 5:11], alone_b, atol=1e-5)


SHARING = {
    "bert": dict(family="bert"),
    "albert": dict(family="albert"),
    "albert-grouped": dict(family="albert", num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2),
    "albert-attention-shared": dict(family="albert", share_scope="attention"),
    "bert-ffn-shared": dict(family="bert", num_hidden_groups=1, share_scope="ffn"),
}


def loss_and_grad(cfg, params, batch):
    ids, types, mask = (jnp.asarray(x) for x in batch)
    model = build_model(cfg, "pretraining")

    def loss(p):
        out = model.apply({"params": p}, ids, types, mask)
        return jnp.sum(out["mlm_logits"] ** 2) * 1e-3 + jnp.sum(out["sentence_logits"])
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("case", sorted(SHARING))
def test_scan_equals_loop(case):
    kw = dict(SHARING[case])
    cfg = tiny.config(kw.pop("family"), **kw)
    params = params_for(cfg, "pretraining")
    batch = tiny.batch(cfg)
    loop = cfg.replace(scan_layers=False)
    # Same param tree in both modes.
    loop_shapes = jax.eval_shape(lambda: params_for(loop, "pretraining"))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, loop_shapes)
    (l1, g1), (l2, g2) = loss_and_grad(cfg, params, batch), loss_and_grad(loop, params, batch)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_equals_no_remat(policy, scan):
    cfg = tiny.config("bert", scan_layers=scan)
    params = params_for(cfg, "pretraining")
    batch = tiny.batch(cfg)
    (l1, g1) = loss_and_grad(cfg, params, batch)
    (l2, g2) = loss_and_grad(cfg.replace(remat_policy=policy), params, batch)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_shared_gradient_is_the_sum_over_layers():
    """A fully shared ALBERT block gets the sum of the gradients that an unshared model
    with identical copies gives each of its layers."""
    shared = tiny.config("albert", num_hidden_layers=3)
    unshared = shared.replace(share_scope="none")
    p = params_for(shared, "pretraining")
    copies = jax.tree.map(lambda x: jnp.stack([x] * 3), p["backbone"]["encoder"]["layer"])
    p_un = {**p, "backbone": {**p["backbone"], "encoder": {"layer": copies}}}
    batch = tiny.batch(shared)
    l1, g1 = loss_and_grad(shared, p, batch)
    l2, g2 = loss_and_grad(unshared, p_un, batch)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    summed = jax.tree.map(lambda g: g.sum(0), g2["backbone"]["encoder"]["layer"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 g1["backbone"]["encoder"]["layer"], summed)


def test_dropout_is_active_only_in_training():
    cfg = tiny.config("bert")
    params = params_for(cfg)
    ids, types, mask = (jnp.asarray(x) for x in tiny.batch(cfg))
    model = build_model(cfg, "base")
    train = jax.jit(lambda rng: model.apply({"params": params}, ids, types, mask, deterministic=False,
                                            rngs={"dropout": rng})["sequence_output"])
    run = lambda seed: train(jax.random.key(seed))
    ev = seq_out(cfg, params, ids, types, mask)["sequence_output"]
    assert not np.allclose(run(0), ev)
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))


@pytest.mark.parametrize("rate, shape", [(0.1, (64, 4, 33, 32)), (0.37, (1000, 301))])
def test_dropout_masks_keep_the_asked_rate_and_the_expectation(rate, shape):
    """Dropout draws two 16-bit numbers per random word (half jax.random.bernoulli's
    threefry work): the kept share is 1 - rate to within sampling noise, the rate used is
    1 - rate to within 1/65536 (an odd last axis too), survivors are scaled by exactly it,
    and the first and second halves of each word are not the same draws."""
    from bert_jax.model.encoder import dropout, keep_mask
    keep, kept = keep_mask(jax.random.key(3), 1 - rate, shape)
    assert keep.shape == shape and abs(kept - (1 - rate)) <= 1 / 65536
    n = keep.size
    assert abs(float(keep.mean()) - kept) < 5 * np.sqrt(kept * (1 - kept) / n)
    half = -(-shape[-1] // 2)
    first, second = np.asarray(keep[..., :half]), np.asarray(keep[..., half:2 * half])
    assert 0.95 < np.mean(first[..., :second.shape[-1]] == second) / (kept ** 2 + (1 - kept) ** 2) < 1.05
    x = jnp.ones(shape, jnp.bfloat16)
    y = dropout(x, rate, jax.random.key(3))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32) != 0, keep)
    np.testing.assert_allclose(np.asarray(y[keep], np.float32), 1 / kept, rtol=2 ** -7)  # bfloat16 rounding
    assert not np.asarray(dropout(x, 1.0, jax.random.key(3))).any()


def test_bfloat16_compute_keeps_float32_params():
    cfg = tiny.config("bert")
    params = params_for(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    batch = tiny.batch(cfg)
    f32 = seq_out(cfg, params, *batch)["sequence_output"]
    bf16 = seq_out(cfg.replace(dtype="bfloat16"), params, *batch)["sequence_output"]
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), f32, atol=0.1)
