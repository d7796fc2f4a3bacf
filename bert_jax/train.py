"""Pretraining state and the jitted, sharded train step.

The state is created already sharded: `jax.eval_shape` of the init gives the logical
names, `sharding.mesh_shardings` turns them into NamedShardings, and the init is jitted
with those as out_shardings. The step is jitted with explicit in/out shardings and donates
the old state. Gradient accumulation scans over microbatches inside the step. A step
whose loss, gradients or updated params are not finite leaves params and optimizer state
unchanged and is counted. Microbatch losses are sums divided by the whole batch's counts, so
accumulation gives the big batch's loss and gradient exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from bert_jax import sharding
from bert_jax.config import ModelConfig
from bert_jax.heads import PreTrainingModel


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_total: jax.Array     # updates skipped so far
    nonfinite_streak: jax.Array    # consecutive skipped updates


def _init_boxed(cfg: ModelConfig, tx: optax.GradientTransformation, seq_len: int, rng):
    model = PreTrainingModel(cfg)
    init_rng, run_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(run_rng), nonfinite_total=jnp.zeros((), jnp.int32),
                      nonfinite_streak=jnp.zeros((), jnp.int32))


def state_shardings(cfg: ModelConfig, tx, seq_len: int, mesh) -> tuple[Any, Any]:
    """(abstract unboxed state, its NamedShardings)."""
    boxed = jax.eval_shape(lambda r: _init_boxed(cfg, tx, seq_len, r), jax.random.key(0))
    return nn.unbox(boxed), nn.unbox(sharding.mesh_shardings(boxed, mesh))


def create_state(cfg: ModelConfig, tx, seq_len: int, seed: int, mesh, shard=None) -> TrainState:
    """The initial state, born sharded (`shard`: state_shardings' second result, if the
    caller has it already)."""
    if shard is None:
        _, shard = state_shardings(cfg, tx, seq_len, mesh)
    init = jax.jit(lambda r: nn.unbox(_init_boxed(cfg, tx, seq_len, r)), out_shardings=shard)
    with jax.set_mesh(mesh):
        return init(jax.random.key(seed))


# ---------------------------------------------------------------------------- loss ----
def loss_denominators(batch) -> tuple[jax.Array, jax.Array]:
    """(masked-token count, sentence-label count) of a whole batch, at least 1 each: the
    loss of every microbatch is divided by the global counts, so that accumulating
    microbatches gives exactly the loss (and gradient) of the big batch."""
    mlm = jnp.maximum(batch["masked_weights"].sum(), 1.0)
    sent = jnp.maximum(batch["sentence_weights"].sum(), 1.0) if "sentence_weights" in batch else jnp.ones(())
    return mlm, sent


def pretraining_loss(cfg: ModelConfig, params, batch, dropout_rng, deterministic=False,
                     denominators=None):
    """MLM cross-entropy summed over masked positions / the masked-token count, plus
    NSP/SOP cross-entropy summed / the sentence count. The counts are `denominators`
    (those of the whole batch, when `batch` is one microbatch of it) or this batch's.
    Returns (loss, metrics); metrics are sums and counts, so microbatches and hosts add up."""
    mlm_n, s_n = denominators if denominators is not None else loss_denominators(batch)
    out = PreTrainingModel(cfg).apply(
        {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
        batch["masked_positions"], batch.get("position_ids"), batch.get("segment_ids"),
        sentence_positions_BxK=batch["sentence_positions"], deterministic=deterministic,
        rngs=None if deterministic else {"dropout": dropout_rng})
    logits = out["mlm_logits"]
    w = batch["masked_weights"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["masked_ids"])
    mlm_loss = (nll * w).sum() / mlm_n
    correct = (jnp.argmax(logits, -1) == batch["masked_ids"]) * w
    metrics = {"mlm_nll_sum": (nll * w).sum(), "mlm_correct": correct.sum(), "mlm_count": w.sum(),
               "real_tokens": batch["attention_mask"].sum().astype(jnp.float32)}
    loss = mlm_loss
    if out["sentence_logits"] is not None:
        sw = batch["sentence_weights"]
        s_nll = optax.softmax_cross_entropy_with_integer_labels(out["sentence_logits"], batch["sentence_labels"])
        loss = loss + (s_nll * sw).sum() / s_n
        s_correct = (jnp.argmax(out["sentence_logits"], -1) == batch["sentence_labels"]) * sw
        metrics.update(sentence_nll_sum=(s_nll * sw).sum(), sentence_correct=s_correct.sum(),
                       sentence_count=sw.sum())
    return loss, metrics


def summarize(m: dict) -> dict:
    """Sums/counts -> the logged figures."""
    out = {"mlm_loss": m["mlm_nll_sum"] / max(float(m["mlm_count"]), 1.0),
           "mlm_accuracy": m["mlm_correct"] / max(float(m["mlm_count"]), 1.0)}
    if "sentence_count" in m:
        out["sentence_loss"] = m["sentence_nll_sum"] / max(float(m["sentence_count"]), 1.0)
        out["sentence_accuracy"] = m["sentence_correct"] / max(float(m["sentence_count"]), 1.0)
    return {k: float(v) for k, v in out.items()}


# ---------------------------------------------------------------------------- step ----
def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, grad_accum: int,
                    state_sharding, batch_sharding_fn: Callable[[int], NamedSharding],
                    example_batch: dict, mesh):
    """jit(step)(state, batch) -> (state, metrics). `batch` leading dim is the global
    batch; with grad_accum = A it is split into A microbatches scanned in order."""

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def micro(carry, mb_and_i):
            g_acc, m_acc = carry
            mb, i = mb_and_i
            grad_fn = jax.value_and_grad(pretraining_loss, argnums=1, has_aux=True)
            (loss, m), g = grad_fn(cfg, state.params, mb, jax.random.fold_in(rng, i),
                                   denominators=denominators)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            m = dict(m, loss=loss)
            m_acc = jax.tree.map(jnp.add, m_acc, m)
            return (g_acc, m_acc), None

        denominators = loss_denominators(batch)  # global counts: sums divided once
        split = lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:])
        micro_batches = jax.tree.map(split, batch)
        zeros_g = jax.tree.map(jnp.zeros_like, state.params)
        m_shape = jax.eval_shape(lambda: pretraining_loss(
            cfg, state.params, jax.tree.map(lambda x: x[0], micro_batches), rng)[1])
        zeros_m = {k: jnp.zeros((), jnp.float32) for k in list(m_shape) + ["loss"]}
        (grads, metrics), _ = jax.lax.scan(micro, (zeros_g, zeros_m),
                                           (micro_batches, jnp.arange(grad_accum)))
        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # What is applied is checked, not only its inputs: a finite gradient can still give
        # a non-finite update (e.g. Adam with eps=0 on a row whose gradient is 0).
        params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)]))
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & params_finite
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        skipped = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite_total=state.nonfinite_total + skipped,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
        metrics.update(grad_norm=grad_norm, finite=finite.astype(jnp.float32))
        return new_state, metrics

    batch_sh = {k: batch_sharding_fn(v.ndim) for k, v in example_batch.items()}
    rep = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_sharding, batch_sh), out_shardings=(state_sharding, rep),
                   donate_argnums=0)


def make_eval_step(cfg: ModelConfig):
    def step(params, batch):
        return pretraining_loss(cfg, params, batch, None, deterministic=True)[1]
    return jax.jit(step)
