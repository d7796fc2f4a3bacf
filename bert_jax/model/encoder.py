"""The BERT-family encoder in Flax linen, in the order of the BERT paper's Figure 1/2.

    embeddings (token + position + segment, LayerNorm, dropout, optional E->H projection)
      -> D x [ self-attention -> add & LayerNorm -> feed-forward -> add & LayerNorm ]
      -> pooler (tanh dense on [CLS])

Shape legend:
    B batch, L sequence length, H hidden size, E embedding width, N attention heads,
    K head dim (H / N), F feed-forward width, V vocabulary, T token types,
    P position table size, C stored copies of a (possibly shared) block, D applied layers.

Cross-layer sharing. Each layer's two blocks (attention, feed-forward) are parameter
*banks*: C copies stacked on a leading `layers` axis (the axis is dropped when C = 1).
`config.layer_copy_maps` says which copy every applied layer uses, so BERT (C = D,
identity map), ALBERT (C = groups x inner layers) and the ALBERT Table 4 ablations
(only attention or only FFN shared) are one code path, and a shared block exists exactly
once in the param tree; its gradient sums over every layer that used it.

Execution. `scan_layers=True` runs the layers with `nn.scan` (compile time independent of
depth): with no sharing, params are scanned over their `layers` axis; with sharing, the
banks are broadcast into the loop and each step picks its copy by index. The Python-loop
mode (`scan_layers=False`) builds the same param tree and gives the same outputs.
`remat_policy` wraps each layer in `nn.remat`.

Precision: params are float32; matmuls run in `config.dtype`; LayerNorm statistics and
attention softmax run in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from bert_jax.model.config import ModelConfig, layer_copy_maps
from bert_jax.sharding import constrain

INIT_STD = 0.02  # BERT's initializer_range

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),   # BERT's erf GELU
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # ALBERT's tanh GELU
    "relu": jax.nn.relu,
}


def activation(name: str):
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------------------
# Banked primitives: a param with an optional leading `layers` axis of C copies.
# --------------------------------------------------------------------------------------
def bank_param(module: nn.Module, name: str, init, shape: tuple[int, ...],
               names: tuple[str, ...], copies: int):
    if copies > 1:
        shape, names = (copies,) + shape, ("layers",) + names
    return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


def pick(p: jax.Array, copy) -> jax.Array:
    """Copy `copy` (int, traced int, or None when the bank has one copy) of a bank."""
    return p if copy is None else jnp.asarray(p)[copy]


class Dense(nn.Module):
    """y = x . W + b, contracting the last `n_in` axes of x; W may be a bank of copies.

    Kernels are laid out (inputs..., outputs...) so that heads stay a separate axis
    (K x N rather than H), which is what tensor parallelism shards.
    """
    out_shape: tuple[int, ...]
    names: tuple[str, ...]        # logical names of (input axes..., output axes...)
    dtype: jnp.dtype = jnp.float32
    n_in: int = 1
    copies: int = 1

    @nn.compact
    def __call__(self, x, copy=None):
        in_shape = x.shape[x.ndim - self.n_in:]
        kernel = bank_param(self, "kernel", nn.initializers.normal(INIT_STD),
                            in_shape + self.out_shape, self.names, self.copies)
        bias = bank_param(self, "bias", nn.initializers.zeros, self.out_shape,
                          self.names[self.n_in:], self.copies)
        kernel, bias = pick(kernel, copy).astype(self.dtype), pick(bias, copy).astype(self.dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        return y + bias


class LayerNorm(nn.Module):
    """LayerNorm with float32 statistics; scale/bias may be a bank of copies."""
    eps: float
    dtype: jnp.dtype = jnp.float32
    copies: int = 1

    @nn.compact
    def __call__(self, x, copy=None):
        width = x.shape[-1]
        scale = pick(bank_param(self, "scale", nn.initializers.ones, (width,), ("norm",), self.copies), copy)
        bias = pick(bank_param(self, "bias", nn.initializers.zeros, (width,), ("norm",), self.copies), copy)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


# --------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------
def default_position_ids(cfg: ModelConfig, input_ids_BxL: jax.Array) -> jax.Array:
    """BERT/ALBERT: 0..L-1. RoBERTa (fairseq/HF): real tokens count from pad_id + 1 and
    padding tokens sit at pad_id."""
    B, L = input_ids_BxL.shape
    if cfg.position_offset == 0:
        return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    real = (input_ids_BxL != cfg.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + cfg.pad_token_id


def freeze_where(cond, x):
    """x, with no gradient flowing back where `cond` holds."""
    return jnp.where(cond, jax.lax.stop_gradient(x), x)


class Embeddings(nn.Module):
    """Token + position + segment embeddings of width E, LayerNorm, dropout, and the
    factorized E->H projection (ALBERT §3.1) when E != H; usable by every family."""
    cfg: ModelConfig

    def setup(self):
        c, E = self.cfg, self.cfg.embed_dim
        init = nn.initializers.normal(INIT_STD)
        self.word_embeddings = self.param(
            "word_embeddings", nn.with_logical_partitioning(init, ("vocab", "embed")), (c.vocab_size, E))
        self.position_embeddings = self.param(
            "position_embeddings", nn.with_logical_partitioning(init, ("positions", "embed")),
            (c.max_position_embeddings, E))
        self.token_type_embeddings = self.param(
            "token_type_embeddings", nn.with_logical_partitioning(init, ("types", "embed")),
            (c.type_vocab_size, E))
        self.norm = LayerNorm(c.layer_norm_eps, dtype=jnp.dtype(c.dtype))
        self.dropout = Dropout(c.hidden_dropout_prob)
        if E != c.hidden_size:
            self.projection = Dense((c.hidden_size,), ("embed", "embed_out"), jnp.dtype(c.dtype))

    def __call__(self, input_ids_BxL, token_type_ids_BxL, position_ids_BxL, deterministic: bool):
        # The padding rows get no gradient, as torch's Embedding(padding_idx=pad) in the HF
        # models: the word row [PAD] always, and RoBERTa's position row pad_token_id, which
        # only padding tokens use. It matters where a loss reads padded positions (the QA
        # span logits): there the padding row would otherwise drift from HF's.
        pad_BxLx1 = (input_ids_BxL == self.cfg.pad_token_id)[..., None]
        word_BxLxE = freeze_where(pad_BxLx1, jnp.take(self.word_embeddings, input_ids_BxL, axis=0))
        pos_BxLxE = jnp.take(self.position_embeddings, position_ids_BxL, axis=0)
        if self.cfg.position_offset:
            pos_BxLxE = freeze_where((position_ids_BxL == self.cfg.pad_token_id)[..., None], pos_BxLxE)
        x_BxLxE = word_BxLxE + pos_BxLxE + jnp.take(self.token_type_embeddings, token_type_ids_BxL, axis=0)
        x_BxLxE = self.dropout(self.norm(x_BxLxE), deterministic=deterministic)
        if self.cfg.embed_dim != self.cfg.hidden_size:
            return self.projection(x_BxLxE)
        return x_BxLxE


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------
class AttentionMask(NamedTuple):
    """Which keys each query may see. `mask` is boolean, broadcastable to BxNxLxL
    (Bx1x1xL for padding, Bx1xLxL for packed rows); `kv_lengths` (B,) is the number of
    leading real tokens, used by cuDNN's fused kernel instead of a mask when rows are
    right-padded and not packed."""
    mask: jax.Array | None
    kv_lengths: jax.Array | None


def make_attention_mask(attention_mask_BxL=None, segment_ids_BxL=None) -> AttentionMask:
    """Padding mask, or (for packed rows) a block-diagonal mask from segment ids where
    0 marks padding and 1, 2, ... number the examples packed in a row."""
    if segment_ids_BxL is not None:
        q, k = segment_ids_BxL[:, None, :, None], segment_ids_BxL[:, None, None, :]
        return AttentionMask(mask=(q == k) & (k > 0), kv_lengths=None)
    if attention_mask_BxL is not None:
        m = attention_mask_BxL.astype(bool)
        return AttentionMask(mask=m[:, None, None, :], kv_lengths=m.sum(-1).astype(jnp.int32))
    return AttentionMask(mask=None, kv_lengths=None)


def keep_mask(rng, keep: float, shape) -> tuple[jax.Array, float]:
    """A Bernoulli(keep) mask of `shape` and the rate it keeps at. Each 32-bit random word
    makes two 16-bit draws: half the threefry work of jax.random.bernoulli, whose bits were
    most of a CPU step's dropout cost (experiments/results/perf.md). `keep` is quantized to
    1/65536 (0.9 -> 0.899994); callers scale by the rate returned, so the expectation is
    exactly the input's."""
    threshold = round(keep * 65536)
    last = shape[-1]
    words = jax.random.bits(rng, tuple(shape[:-1]) + (-(-last // 2),), jnp.uint32)
    draws = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :last]
    return draws < threshold, threshold / 65536


def dropout(x: jax.Array, rate: float, rng) -> jax.Array:
    """Inverted dropout: each element zeroed with probability `rate`, the rest scaled up."""
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep, kept = keep_mask(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / kept, 0).astype(x.dtype)


class Dropout(nn.Module):
    """nn.Dropout's interface, drawing its mask with `keep_mask`."""
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


def attention_implementation(cfg: ModelConfig) -> str:
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and cfg.dtype == "bfloat16" else "xla"


def attend(q_BxLxNxK, k_BxLxNxK, v_BxLxNxK, mask: AttentionMask, cfg: ModelConfig,
           dropout_rng=None):
    """softmax(q k^T / sqrt(K)) v. Uses jax.nn.dot_product_attention (cuDNN flash or XLA)
    unless attention-probability dropout is active, which that API cannot apply: then an
    explicit float32 softmax with dropout (BERT's training-time behaviour)."""
    if dropout_rng is not None:
        logits = jnp.einsum("bqnk,bsnk->bnqs", q_BxLxNxK, k_BxLxNxK,
                            preferred_element_type=jnp.float32) / jnp.sqrt(q_BxLxNxK.shape[-1])
        if mask.mask is not None:
            logits = jnp.where(mask.mask, logits, jnp.finfo(jnp.float32).min)
        probs = dropout(jax.nn.softmax(logits, axis=-1), cfg.attention_probs_dropout_prob, dropout_rng)
        return jnp.einsum("bnqs,bsnk->bqnk", probs.astype(v_BxLxNxK.dtype), v_BxLxNxK)
    impl = attention_implementation(cfg)
    if impl == "cudnn" and mask.kv_lengths is not None:
        # Right-padded rows: the fused kernel skips padding from lengths, no LxL mask.
        return jax.nn.dot_product_attention(
            q_BxLxNxK, k_BxLxNxK, v_BxLxNxK, query_seq_lengths=mask.kv_lengths,
            key_value_seq_lengths=mask.kv_lengths, implementation="cudnn")
    return jax.nn.dot_product_attention(q_BxLxNxK, k_BxLxNxK, v_BxLxNxK, mask=mask.mask,
                                        implementation=impl)


class SelfAttention(nn.Module):
    """Multi-head self-attention, output projection, residual and LayerNorm (post-LN)."""
    cfg: ModelConfig
    copies: int = 1
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxLxH, mask: AttentionMask, copy=None):
        c = self.cfg
        dt, N, K = jnp.dtype(c.dtype), c.num_attention_heads, c.head_dim
        proj = lambda name: Dense((N, K), ("embed", "heads", "kv"), dt, copies=self.copies, name=name)
        q_BxLxNxK = proj("query")(x_BxLxH, copy)
        k_BxLxNxK = proj("key")(x_BxLxH, copy)
        v_BxLxNxK = proj("value")(x_BxLxH, copy)
        q_BxLxNxK = constrain(q_BxLxNxK, ("act_batch", "act_length", "act_heads", None))
        use_dropout = not self.deterministic and c.attention_probs_dropout_prob > 0
        rng = self.make_rng("dropout") if use_dropout else None
        ctx_BxLxNxK = attend(q_BxLxNxK, k_BxLxNxK, v_BxLxNxK, mask, c, rng)
        out_BxLxH = Dense((c.hidden_size,), ("heads", "kv", "embed"), dt, n_in=2,
                          copies=self.copies, name="output")(ctx_BxLxNxK, copy)
        out_BxLxH = Dropout(c.hidden_dropout_prob)(out_BxLxH, deterministic=self.deterministic)
        return LayerNorm(c.layer_norm_eps, dt, self.copies, name="norm")(x_BxLxH + out_BxLxH, copy)


class FeedForward(nn.Module):
    """Position-wise FFN H -> F -> H, residual and LayerNorm (post-LN)."""
    cfg: ModelConfig
    copies: int = 1
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxLxH, copy=None):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        h_BxLxF = Dense((c.intermediate_size,), ("embed", "mlp"), dt, copies=self.copies,
                        name="intermediate")(x_BxLxH, copy)
        h_BxLxF = constrain(activation(c.hidden_act)(h_BxLxF), ("act_batch", "act_length", "act_mlp"))
        h_BxLxH = Dense((c.hidden_size,), ("mlp", "embed"), dt, copies=self.copies,
                        name="output")(h_BxLxF, copy)
        h_BxLxH = Dropout(c.hidden_dropout_prob)(h_BxLxH, deterministic=self.deterministic)
        return LayerNorm(c.layer_norm_eps, dt, self.copies, name="norm")(x_BxLxH + h_BxLxH, copy)


class Layer(nn.Module):
    """One transformer layer whose two blocks are banks of `attn_copies` / `ffn_copies`.

    Called as the body of nn.scan: carry is the hidden state, `copy_ids` the per-step
    (attention copy, ffn copy) pair, `mask` is broadcast. Returns (x, x or None)."""
    cfg: ModelConfig
    attn_copies: int = 1
    ffn_copies: int = 1
    deterministic: bool = True
    emit_hidden: bool = False

    @nn.compact
    def __call__(self, x_BxLxH, mask: AttentionMask, copy_ids):
        a = copy_ids[0] if self.attn_copies > 1 else None
        f = copy_ids[1] if self.ffn_copies > 1 else None
        x_BxLxH = SelfAttention(self.cfg, self.attn_copies, self.deterministic,
                                name="attention")(x_BxLxH, mask, a)
        x_BxLxH = FeedForward(self.cfg, self.ffn_copies, self.deterministic, name="ffn")(x_BxLxH, f)
        x_BxLxH = constrain(x_BxLxH, ("act_batch", "act_length", "act_embed"))
        return x_BxLxH, (x_BxLxH if self.emit_hidden else None)


class Encoder(nn.Module):
    """D applied layers over shared or unshared parameter banks (see module docstring)."""
    cfg: ModelConfig
    deterministic: bool = True
    emit_hidden: bool = False

    @nn.compact
    def __call__(self, x_BxLxH, mask: AttentionMask):
        c = self.cfg
        attn_map, ffn_map = layer_copy_maps(c)
        n_attn, n_ffn, D = max(attn_map) + 1, max(ffn_map) + 1, c.depth
        unshared = D > 1 and attn_map == ffn_map == tuple(range(D))
        layer_cls = Layer
        if c.remat_policy != "none":
            layer_cls = nn.remat(Layer, policy=REMAT_POLICIES[c.remat_policy],
                                 prevent_cse=not c.scan_layers)
        kw = dict(deterministic=self.deterministic, emit_hidden=self.emit_hidden, name="layer")

        if not c.scan_layers:
            layer = layer_cls(c, n_attn, n_ffn, **kw)
            hidden = []
            for d in range(D):
                x_BxLxH, h = layer(x_BxLxH, mask, (attn_map[d], ffn_map[d]))
                hidden.append(h)
            return x_BxLxH, (jnp.stack(hidden) if self.emit_hidden else None)

        copy_ids = (jnp.asarray(attn_map, jnp.int32), jnp.asarray(ffn_map, jnp.int32))
        if unshared:
            # Plain stacking: each step's params are a slice of the scanned `layers` axis.
            scanned = nn.scan(layer_cls, variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast, 0), length=D,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            layer = scanned(c, 1, 1, **kw)
        else:
            # Shared banks enter the loop whole; each step indexes its copy.
            scanned = nn.scan(layer_cls, variable_broadcast="params",
                              split_rngs={"params": False, "dropout": True},
                              in_axes=(nn.broadcast, 0), length=D)
            layer = scanned(c, n_attn, n_ffn, **kw)
        return layer(x_BxLxH, mask, copy_ids)


class Backbone(nn.Module):
    """Embeddings -> encoder -> optional pooler. The part shared by every task model."""
    cfg: ModelConfig
    add_pooler: bool = True

    @nn.compact
    def __call__(self, input_ids_BxL, token_type_ids_BxL=None, attention_mask_BxL=None,
                 position_ids_BxL=None, segment_ids_BxL=None, *, deterministic: bool = True,
                 output_hidden_states: bool = False, pool_positions_BxK=None):
        """Returns a dict: `sequence_output` BxLxH, `pooled_output` BxH (if pooler; BxKxH
        at `pool_positions_BxK`, the [CLS] of each example in packed rows),
        `hidden_states` (D+1)xBxLxH (embedding output, then each layer; if asked).

        `segment_ids_BxL` marks packed rows (0 padding, 1.. examples): attention never
        crosses examples, and `position_ids_BxL` should restart per example."""
        c = self.cfg
        input_ids_BxL = constrain(input_ids_BxL, ("act_batch", "act_length"))
        if token_type_ids_BxL is None:
            token_type_ids_BxL = jnp.zeros_like(input_ids_BxL)
        if position_ids_BxL is None:
            position_ids_BxL = default_position_ids(c, input_ids_BxL)
        mask = make_attention_mask(attention_mask_BxL, segment_ids_BxL)

        x_BxLxH = Embeddings(c, name="embeddings")(input_ids_BxL, token_type_ids_BxL,
                                                   position_ids_BxL, deterministic)
        x0_BxLxH = x_BxLxH
        x_BxLxH, hidden_DxBxLxH = Encoder(c, deterministic, output_hidden_states,
                                          name="encoder")(x_BxLxH, mask)
        out = {"sequence_output": x_BxLxH}
        if output_hidden_states:
            out["hidden_states"] = jnp.concatenate([x0_BxLxH[None], hidden_DxBxLxH], axis=0)
        if self.add_pooler:
            if pool_positions_BxK is None:
                cls = x_BxLxH[:, 0]
            else:
                cls = jnp.take_along_axis(x_BxLxH, pool_positions_BxK[..., None], axis=1)
            pooled = Dense((c.hidden_size,), ("embed", "embed_out"), jnp.dtype(c.dtype),
                           name="pooler")(cls)
            out["pooled_output"] = jnp.tanh(pooled)
        return out

    def word_embeddings(self):
        """The VxE token table (for tying the MLM decoder)."""
        return nn.unbox(self.variables["params"]["embeddings"]["word_embeddings"])
