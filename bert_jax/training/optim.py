"""Optimizers and schedules, composed from optax parts.

  adamw        AdamW with decoupled weight decay (optax), bias-corrected.
  adamw_bert   BERT's original AdamWeightDecayOptimizer: Adam without bias correction
               (google-research/bert optimization.py).
  lamb         ALBERT's LAMB (google-research/albert lamb_optimizer.py): Adam moments
               without bias correction, weight decay, then the layer-wise trust ratio;
               LayerNorm and bias parameters are excluded from BOTH decay and layer
               adaptation. optax.lamb excludes them from neither, so it is built here.
All: global-norm clipping first. Schedules:
  adamw              linear warmup, then linear (or polynomial) decay to 0 over the steps
                     after warmup (Hugging Face's get_linear_schedule_with_warmup).
  adamw_bert, lamb   the original code's (google-research/bert and albert
                     optimization.py): polynomial decay from step 0 over ALL train steps,
                     lr * (1 - step / train_steps) ** power, with warmup overriding it on
                     the first steps: lr * step / warmup_steps. So the rate right after
                     warmup is lr * (1 - warmup / train_steps), not lr.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bert_jax.options import OptimConfig


def schedule(c: OptimConfig) -> optax.Schedule:
    """The learning rate at each optimizer step. With `schedule_start` (a pretraining phase
    with its own schedule), the schedule of the steps from there to `train_steps`, shifted
    to begin at that step."""
    if c.schedule_start:
        start = c.schedule_start
        shifted = schedule(dataclasses.replace(c, train_steps=c.train_steps - start, schedule_start=0))
        return lambda step: shifted(step - start)
    if c.optimizer in PAPER_CODE_SCHEDULE:
        return _paper_code_schedule(c)
    warm = optax.linear_schedule(0.0, c.learning_rate, max(c.warmup_steps, 1))
    decay = optax.polynomial_schedule(c.learning_rate, 0.0, c.decay_power,
                                      max(c.train_steps - c.warmup_steps, 1))
    return optax.join_schedules([warm, decay], [c.warmup_steps])


# Optimizers whose schedule is the original TF code's (see the module docstring).
PAPER_CODE_SCHEDULE = ("adamw_bert", "lamb")


def _paper_code_schedule(c: OptimConfig) -> optax.Schedule:
    """tf.train.polynomial_decay(lr, step, train_steps, 0, power) overridden by
    lr * step / warmup while step < warmup_steps (optimization.py, create_optimizer)."""
    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        frac = jnp.clip(step, 0.0, c.train_steps) / c.train_steps
        decayed = c.learning_rate * (1.0 - frac) ** c.decay_power
        if c.warmup_steps <= 0:
            return decayed
        warm = c.learning_rate * step / c.warmup_steps
        return jnp.where(step < c.warmup_steps, warm, decayed)
    return fn


def decay_mask(params):
    """True for params that get weight decay / layer adaptation: not LayerNorm, not bias."""
    def keep(path, _):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        return not ("bias" in names or "norm" in names or "scale" in names)
    return jax.tree_util.tree_map_with_path(keep, params)


class _AdamState(NamedTuple):
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_no_bias_correction(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """m / (sqrt(v) + eps) with raw (uncorrected) moments, as BERT and ALBERT do."""
    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return _AdamState(zeros(), zeros())

    def update(g, state, params=None):
        mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, state.mu, g)
        nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x * x, state.nu, g)
        return jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu), _AdamState(mu, nu)
    return optax.GradientTransformation(init, update)


def make(c: OptimConfig) -> optax.GradientTransformation:
    lr = schedule(c)
    clip = optax.clip_by_global_norm(c.max_grad_norm) if c.max_grad_norm > 0 else optax.identity()
    if c.optimizer == "adamw":
        return optax.chain(clip, optax.adamw(lr, c.b1, c.b2, c.eps, weight_decay=c.weight_decay,
                                             mask=decay_mask))
    if c.optimizer == "adamw_bert":
        return optax.chain(clip, scale_by_adam_no_bias_correction(c.b1, c.b2, c.eps),
                           optax.add_decayed_weights(c.weight_decay, decay_mask),
                           optax.scale_by_learning_rate(lr))
    return optax.chain(clip, scale_by_adam_no_bias_correction(c.b1, c.b2, c.eps),
                       optax.add_decayed_weights(c.weight_decay, decay_mask),
                       optax.masked(optax.scale_by_trust_ratio(), decay_mask),
                       optax.scale_by_learning_rate(lr))
