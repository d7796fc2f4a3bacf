"""Model configuration: one frozen dataclass and the VARIANTS table of published sizes.

Every module takes a `ModelConfig` as its one constructor argument. Validation happens
when the config is built, and every error names the offending field.

Cross-layer sharing (ALBERT, Lan et al. 2019) is described by three fields that apply to
every family:
  * `num_hidden_groups` (G) groups of `inner_group_num` (I) distinct layers each; the
    `num_hidden_layers` (L) iterations walk through the groups in order, L/G iterations
    per group, and each iteration applies all I layers of its group. Depth is L * I.
  * `share_scope` says which sub-blocks follow that grouping: `all` (ALBERT default),
    `attention` or `ffn` (ALBERT paper Table 4 ablations), or `none` (every applied layer
    has its own parameters; then G and I only set the depth).
BERT and RoBERTa default to G = L, I = 1, which is plain unshared stacking.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from bert_jax.errors import BertJaxError
from bert_jax.model import objectives

FAMILIES = ("bert", "roberta", "albert")
ACTIVATIONS = ("gelu", "gelu_new", "relu")
SHARE_SCOPES = ("all", "attention", "ffn", "none")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# Pretraining objectives (objectives.py): any family takes any of them.
OBJECTIVES = tuple(objectives.OBJECTIVES)
FAMILY_OBJECTIVE = {"bert": "mlm_nsp", "roberta": "mlm", "albert": "mlm_sop"}


class ConfigError(BertJaxError, ValueError):
    """A configuration value is impossible; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Literal["bert", "roberta", "albert"] = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Factorized embedding parameterization (ALBERT §3.1): embeddings live in E and are
    # projected to H. None means E = H and no projection.
    embedding_size: int | None = None
    # Cross-layer sharing (see module docstring). None means "the family default".
    num_hidden_groups: int | None = None
    inner_group_num: int = 1
    share_scope: str = "all"
    # Task heads.
    num_labels: int = 2
    classifier_dropout: float | None = None
    # Pretraining objective (OBJECTIVES); None means the family's (FAMILY_OBJECTIVE).
    objective: str | None = None
    # Execution.
    dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.num_hidden_groups is None:
            groups = 1 if self.family == "albert" else self.num_hidden_layers
            object.__setattr__(self, "num_hidden_groups", groups)
        if self.objective is None and self.family in FAMILY_OBJECTIVE:
            object.__setattr__(self, "objective", FAMILY_OBJECTIVE[self.family])
        _validate(self)

    # Derived sizes -----------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embed_dim(self) -> int:
        """E: width of the embedding tables (H unless factorized)."""
        return self.embedding_size or self.hidden_size

    @property
    def depth(self) -> int:
        """Number of transformer layers applied: L * I."""
        return self.num_hidden_layers * self.inner_group_num

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers real positions from pad_token_id + 1 (fairseq convention)."""
        return self.pad_token_id + 1 if self.family == "roberta" else 0

    @property
    def max_sequence_length(self) -> int:
        """Longest input the position table supports."""
        return self.max_position_embeddings - self.position_offset

    @property
    def pretraining_objective(self) -> objectives.Objective:
        """The `objective` named: its heads, instances, loss and export class."""
        return objectives.get(self.objective)

    @property
    def head_dropout(self) -> float:
        if self.classifier_dropout is not None:
            return self.classifier_dropout
        return self.hidden_dropout_prob

    def replace(self, **changes) -> "ModelConfig":
        """A copy with `changes`; resets derived defaults when the depth changes."""
        if "num_hidden_layers" in changes and "num_hidden_groups" not in changes:
            if self.num_hidden_groups == self.num_hidden_layers:
                changes["num_hidden_groups"] = None
        if "family" in changes and "objective" not in changes:
            if self.objective == FAMILY_OBJECTIVE.get(self.family):
                changes["objective"] = None
        return dataclasses.replace(self, **changes)

    def check_sequence_length(self, seq_len: int, field: str = "max_seq_length") -> None:
        if seq_len > self.max_sequence_length:
            raise ConfigError(
                f"{field}={seq_len} is longer than the position table allows "
                f"(max_position_embeddings={self.max_position_embeddings}"
                + (f" minus RoBERTa's offset {self.position_offset}" if self.position_offset else "")
                + f" = {self.max_sequence_length})")


def _validate(c: ModelConfig) -> None:
    def need(ok: bool, field: str, msg: str):
        if not ok:
            raise ConfigError(f"{field}={getattr(c, field)!r}: {msg}")

    need(c.family in FAMILIES, "family", f"must be one of {FAMILIES}")
    need(c.objective in objectives.OBJECTIVES, "objective", f"must be one of {tuple(objectives.OBJECTIVES)}")
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "type_vocab_size",
              "inner_group_num", "num_hidden_groups", "num_labels"):
        need(isinstance(getattr(c, f), int) and getattr(c, f) > 0, f, "must be a positive integer")
    need(c.hidden_size % c.num_attention_heads == 0, "hidden_size",
         f"must be divisible by num_attention_heads={c.num_attention_heads}")
    need(c.embedding_size is None or (isinstance(c.embedding_size, int) and c.embedding_size > 0),
         "embedding_size", "must be a positive integer or None")
    need(c.num_hidden_layers % c.num_hidden_groups == 0, "num_hidden_groups",
         f"must divide num_hidden_layers={c.num_hidden_layers}")
    need(c.hidden_act in ACTIVATIONS, "hidden_act", f"must be one of {ACTIVATIONS}")
    need(c.share_scope in SHARE_SCOPES, "share_scope", f"must be one of {SHARE_SCOPES}")
    need(c.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
    need(c.remat_policy in REMAT_POLICIES, "remat_policy", f"must be one of {REMAT_POLICIES}")
    need(c.attention_impl in ATTENTION_IMPLS, "attention_impl", f"must be one of {ATTENTION_IMPLS}")
    for f in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        need(0.0 <= getattr(c, f) < 1.0, f, "must be in [0, 1)")
    need(c.layer_norm_eps > 0, "layer_norm_eps", "must be positive")
    need(0 <= c.pad_token_id < c.vocab_size, "pad_token_id", f"must be in [0, vocab_size={c.vocab_size})")
    if c.family == "roberta":
        need(c.max_position_embeddings > c.position_offset, "max_position_embeddings",
             f"must exceed RoBERTa's position offset {c.position_offset}")


# --------------------------------------------------------------------------------------
# Published variants. Sizes from:
#   BERT:   Devlin et al. 2019, §3 (base L12 H768 A12; large L24 H1024 A16), FFN = 4H.
#   BERT mini family: Turc et al. 2019 "Well-Read Students Learn Better", Table 7
#           (tiny L2 H128, mini L4 H256, small L4 H512, medium L8 H512; A = H/64).
#   RoBERTa: Liu et al. 2019, §4.1/Appendix (same shapes as BERT; BPE vocab 50K,
#           fairseq dictionary 50265, 514 positions = 512 + padding offset 2, 1 segment).
#   ALBERT: Lan et al. 2020, Table 1 (base L12 H768 E128; large L24 H1024; xlarge L24
#           H2048; xxlarge L12 H4096), FFN = 4H, vocab 30000; dropout removed (§4.8).
# --------------------------------------------------------------------------------------
def _bert(layers, hidden, **kw):
    return ModelConfig(family="bert", num_hidden_layers=layers, hidden_size=hidden,
                       num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden, **kw)


def _roberta(layers, hidden, heads):
    return ModelConfig(family="roberta", vocab_size=50265, num_hidden_layers=layers,
                       hidden_size=hidden, num_attention_heads=heads,
                       intermediate_size=4 * hidden, max_position_embeddings=514,
                       type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)


def _albert(layers, hidden, heads):
    return ModelConfig(family="albert", vocab_size=30000, num_hidden_layers=layers,
                       hidden_size=hidden, num_attention_heads=heads,
                       intermediate_size=4 * hidden, embedding_size=128,
                       hidden_act="gelu_new", hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)


VARIANTS: dict[str, ModelConfig] = {
    "bert-tiny": _bert(2, 128),
    "bert-mini": _bert(4, 256),
    "bert-small": _bert(4, 512),
    "bert-medium": _bert(8, 512),
    "bert-base": _bert(12, 768),
    "bert-large": _bert(24, 1024),
    "roberta-base": _roberta(12, 768, 12),
    "roberta-large": _roberta(24, 1024, 16),
    "albert-base": _albert(12, 768, 12),
    "albert-large": _albert(24, 1024, 16),
    "albert-xlarge": _albert(24, 2048, 16),
    "albert-xxlarge": _albert(12, 4096, 64),
}

# Parameter counts of the encoder (embeddings + layers + pooler) as the papers state them.
PAPER_PARAM_COUNTS = {
    "bert-base": 110e6, "bert-large": 340e6, "roberta-base": 125e6, "roberta-large": 355e6,
    "albert-base": 12e6, "albert-large": 18e6, "albert-xlarge": 60e6, "albert-xxlarge": 235e6,
}


def variant(name: str, **overrides) -> ModelConfig:
    """The published config `name`, with field overrides applied (and validated)."""
    if name not in VARIANTS:
        raise ConfigError(f"variant={name!r}: unknown; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name].replace(**overrides) if overrides else VARIANTS[name]


def layer_copy_maps(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For each applied layer d in [0, L*I): which copy of the attention block and of the
    feed-forward block it uses. Copies are numbered g * I + j when shared (group g, inner
    layer j, the ALBERT layout) and d when not."""
    L, G, I = cfg.num_hidden_layers, cfg.num_hidden_groups, cfg.inner_group_num
    per_group = L // G
    attn, ffn = [], []
    for i in range(L):
        g = i // per_group
        for j in range(I):
            shared, own = g * I + j, i * I + j
            attn.append(shared if cfg.share_scope in ("all", "attention") else own)
            ffn.append(shared if cfg.share_scope in ("all", "ffn") else own)
    return tuple(attn), tuple(ffn)
