"""Optimizers against NumPy references of the original BERT/ALBERT update rules, the
schedule, and the non-finite guard of the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from bert_jax import sharding
from bert_jax.training import optim, train

PARAMS = {"dense": {"kernel": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
                    "bias": np.array([0.5, -0.25, 0.0, 1.0], np.float32)},
          "norm": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}}
GRADS = {"dense": {"kernel": np.full((3, 4), 0.3, np.float32) * np.arange(1, 5, dtype=np.float32),
                   "bias": np.array([0.1, -0.2, 0.3, -0.4], np.float32)},
         "norm": {"scale": np.array([0.05, 0.0, -0.05, 0.1], np.float32),
                  "bias": np.array([-0.1, 0.2, 0.0, 0.05], np.float32)}}
CFG = dict(learning_rate=0.01, warmup_steps=0, train_steps=100, weight_decay=0.1,
           b1=0.9, b2=0.999, eps=1e-6, max_grad_norm=0.0)


def reference(kind, steps=3, lr_fn=None):
    """The google-research bert/albert update rules, written out in NumPy."""
    p = {k: {n: v.copy() for n, v in d.items()} for k, d in PARAMS.items()}
    m = {k: {n: np.zeros_like(v) for n, v in d.items()} for k, d in PARAMS.items()}
    v = {k: {n: np.zeros_like(x) for n, x in d.items()} for k, d in PARAMS.items()}
    for t in range(steps):
        lr = lr_fn(t) if lr_fn else CFG["learning_rate"] * (1 - t / CFG["train_steps"])
        for k in p:
            for n in p[k]:
                g = GRADS[k][n]
                m[k][n] = 0.9 * m[k][n] + 0.1 * g
                v[k][n] = 0.999 * v[k][n] + 0.001 * g * g
                upd = m[k][n] / (np.sqrt(v[k][n]) + 1e-6)
                decayed = not (n == "bias" or k == "norm")
                if decayed:
                    upd = upd + 0.1 * p[k][n]
                if kind == "lamb" and decayed:  # layer adaptation only where decayed
                    w, u = np.linalg.norm(p[k][n]), np.linalg.norm(upd)
                    upd = upd * (w / u if w > 0 and u > 0 else 1.0)
                p[k][n] = p[k][n] - lr * upd
    return p


@pytest.mark.parametrize("kind", ["adamw_bert", "lamb"])
def test_matches_original_update_rule(kind):
    tx = optim.make(optim.OptimConfig(optimizer=kind, **CFG))
    params = jax.tree.map(jnp.asarray, PARAMS)
    state = tx.init(params)
    for _ in range(3):
        upd, state = tx.update(jax.tree.map(jnp.asarray, GRADS), state, params)
        params = jax.tree.map(lambda a, b: a + b, params, upd)
    want = reference(kind)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), params, want)


def test_lamb_differs_from_optax_lamb_on_layernorm_and_bias():
    # optax.lamb adapts every parameter; ours leaves LayerNorm/bias unadapted and undecayed.
    import optax
    ours = optim.make(optim.OptimConfig(optimizer="lamb", **CFG))
    theirs = optax.lamb(optim.schedule(optim.OptimConfig(**CFG)), eps=1e-6, weight_decay=0.1)
    p = jax.tree.map(jnp.asarray, PARAMS)
    u1, _ = ours.update(jax.tree.map(jnp.asarray, GRADS), ours.init(p), p)
    u2, _ = theirs.update(jax.tree.map(jnp.asarray, GRADS), theirs.init(p), p)
    assert not np.allclose(u1["norm"]["bias"], u2["norm"]["bias"])


def test_schedule_warmup_then_linear_decay():
    s = optim.schedule(optim.OptimConfig(learning_rate=1.0, warmup_steps=10, train_steps=110))
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0) and float(s(60)) == pytest.approx(0.5)
    assert float(s(110)) == pytest.approx(0.0)


def bert_optimization_py_lr(init_lr, step, num_train_steps, num_warmup_steps, power=1.0):
    """google-research/bert optimization.py create_optimizer's learning rate, transcribed:
    tf.train.polynomial_decay (cycle=False, end 0) from step 0, overridden during warmup."""
    decayed = init_lr * (1.0 - min(step, num_train_steps) / num_train_steps) ** power
    if num_warmup_steps:
        is_warmup = float(int(step) < int(num_warmup_steps))
        warm = init_lr * (float(int(step)) / float(num_warmup_steps))
        return (1.0 - is_warmup) * decayed + is_warmup * warm
    return decayed


@pytest.mark.parametrize("kind", ["adamw_bert", "lamb"])
@pytest.mark.parametrize("warmup,total,power", [(10, 100, 1.0), (0, 50, 1.0), (7, 40, 2.0)])
def test_paper_optimizers_use_the_original_schedule(kind, warmup, total, power):
    s = optim.schedule(optim.OptimConfig(optimizer=kind, learning_rate=3e-4, warmup_steps=warmup,
                                         train_steps=total, decay_power=power))
    got = np.asarray(jax.vmap(s)(jnp.arange(total + 1)))
    want = np.array([bert_optimization_py_lr(3e-4, t, total, warmup, power) for t in range(total + 1)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)  # float32
    if warmup:  # right after warmup: decayed from step 0, not the peak
        assert got[warmup] == pytest.approx(3e-4 * (1 - warmup / total) ** power, rel=1e-6)


def test_adamw_bert_update_uses_the_original_schedule():
    """The rate applied at update t is the schedule at t (the TF global step before its
    increment): three updates with warmup 2 equal the NumPy rule with that rate."""
    c = dict(CFG, warmup_steps=2)
    tx = optim.make(optim.OptimConfig(optimizer="adamw_bert", **c))
    params = jax.tree.map(jnp.asarray, PARAMS)
    state = tx.init(params)
    for _ in range(3):
        upd, state = tx.update(jax.tree.map(jnp.asarray, GRADS), state, params)
        params = jax.tree.map(lambda a, b: a + b, params, upd)
    want = reference("adamw_bert", lr_fn=lambda t: bert_optimization_py_lr(0.01, t, 100, 2))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), params, want)


def test_decay_mask_excludes_layernorm_and_bias():
    m = optim.decay_mask(PARAMS)
    assert m["dense"]["kernel"] and not m["dense"]["bias"]
    assert not m["norm"]["scale"] and not m["norm"]["bias"]


def test_nonfinite_step_is_skipped_and_counted():
    cfg = tiny.config("bert")
    mesh = sharding.make_mesh()
    tx = optim.make(optim.OptimConfig(learning_rate=1e-3, warmup_steps=0, train_steps=10))
    state = train.create_state(cfg, tx, tiny.L, 0, mesh)
    _, state_sh = train.state_shardings(cfg, tx, tiny.L, mesh)
    ids, types, mask = (np.concatenate([x] * 4) for x in tiny.batch(cfg))
    B = ids.shape[0]
    batch = dict(input_ids=ids, token_type_ids=types, attention_mask=mask,
                 masked_positions=np.tile(np.arange(3, dtype=np.int32), (B, 1)),
                 masked_ids=ids[:, :3].copy(), masked_weights=np.ones((B, 3), np.float32),
                 sentence_positions=np.zeros((B, 1), np.int32),
                 sentence_labels=np.zeros((B, 1), np.int32), sentence_weights=np.ones((B, 1), np.float32))
    step = train.make_train_step(cfg, tx, 2, state_sh, lambda nd: sharding.data_sharding(mesh, nd),
                                 batch, mesh)
    before = jax.device_get(state.params)
    bad = dict(batch, masked_weights=np.full((B, 3), np.nan, np.float32))
    with jax.set_mesh(mesh):
        state, m = step(state, bad)
    assert not m["finite"] and int(state.nonfinite_total) == 1 and int(state.nonfinite_streak) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    with jax.set_mesh(mesh):
        state, m = step(state, batch)
    assert m["finite"] and int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 1
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params), before)
    assert any(jax.tree.leaves(changed))


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_gradient_accumulation_equals_the_big_batch(family):
    """grad_accum in {1, 2, 4} over one global batch whose microbatches hold unequal
    numbers of masked tokens and sentence labels: the same loss and, after one SGD step
    (which, unlike Adam's first step, keeps the gradient's scale), the same params."""
    import optax
    cfg = tiny.config(family, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    mesh = sharding.make_mesh()
    ids, types, mask = (np.concatenate([x] * 4) for x in tiny.batch(cfg))
    B, P = ids.shape[0], 4
    counts = np.array([4, 1, 3, 0, 2, 4, 1, 1])   # masked tokens per row: microbatches differ
    mw = (np.arange(P)[None, :] < counts[:, None]).astype(np.float32)
    sw = np.array([[1], [1], [0], [1], [1], [0], [0], [1]], np.float32)
    batch = dict(input_ids=ids, token_type_ids=types, attention_mask=mask,
                 masked_positions=np.tile(np.arange(1, P + 1, dtype=np.int32), (B, 1)),
                 masked_ids=ids[:, 1:P + 1].copy(), masked_weights=mw,
                 sentence_positions=np.zeros((B, 1), np.int32),
                 sentence_labels=(np.arange(B) % 2).astype(np.int32)[:, None], sentence_weights=sw)
    tx = optax.sgd(0.5)
    results = {}
    for accum in (1, 2, 4):
        state = train.create_state(cfg, tx, tiny.L, 0, mesh)
        _, state_sh = train.state_shardings(cfg, tx, tiny.L, mesh)
        step = train.make_train_step(cfg, tx, accum, state_sh, lambda nd: sharding.data_sharding(mesh, nd),
                                     batch, mesh)
        with jax.set_mesh(mesh):
            state, m = step(state, batch)
        results[accum] = (float(m["loss"]), float(m["grad_norm"]), jax.device_get(state.params))
    loss1, norm1, p1 = results[1]
    for accum in (2, 4):
        loss, norm, p = results[accum]
        assert loss == pytest.approx(loss1, rel=1e-6), accum
        assert norm == pytest.approx(norm1, rel=1e-5), accum
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, p1)
