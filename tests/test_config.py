"""Variants: parameter counts equal Hugging Face's and the papers'; bad configs name the
field; ALBERT sharing stores one copy."""

import math

import jax
import pytest
import torch
import transformers
from flax import linen as nn

from bert_jax.interop import rename
from bert_jax.model import config as C
from bert_jax.model.heads import abstract_params

import tiny


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))


def hf_count(cfg) -> int:
    hf_cfg = transformers.AutoConfig.for_model(**rename.hf_config_dict(cfg))
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(C.VARIANTS))
def test_param_count_equals_hugging_face(name):
    cfg = C.variant(name)
    assert count(abstract_params(cfg, "base")) == hf_count(cfg)


# The papers round: BERT-base 110M (109.5M exact), BERT-large 340M (335.1M), RoBERTa-base
# 125M (124.6M), ALBERT-base 12M (11.7M), -large 18M (17.7M), -xlarge 60M (58.7M). For
# ALBERT-xxlarge the paper's Table 1 says 235M, but its own sizes (H 4096, FFN 16384, 12
# layers, E 128) give 222.6M, which is also what the released albert-xxlarge-v2 holds.
PAPER_TOLERANCE = {"albert-xxlarge": 0.06}


@pytest.mark.parametrize("name", sorted(C.PAPER_PARAM_COUNTS))
def test_param_count_matches_paper(name):
    n = count(abstract_params(C.variant(name), "base"))
    paper = C.PAPER_PARAM_COUNTS[name]
    assert abs(n - paper) / paper <= PAPER_TOLERANCE.get(name, 0.03), (name, n, paper)


def test_exact_known_counts():
    # Counts of the released checkpoints' encoders (with pooler).
    assert count(abstract_params(C.variant("bert-base"), "base")) == 109_482_240
    assert count(abstract_params(C.variant("roberta-base"), "base")) == 124_645_632
    assert count(abstract_params(C.variant("albert-base"), "base")) == 11_683_584


def test_albert_sharing_stores_one_layer():
    shared = abstract_params(tiny.config("albert", num_hidden_layers=6), "base")
    layer = nn.unbox(shared)["backbone"]["encoder"]["layer"]
    assert layer["attention"]["query"]["kernel"].shape == (32, 4, 8)  # no layers axis
    unshared = abstract_params(tiny.config("albert", num_hidden_layers=6, share_scope="none"), "base")
    enc = lambda t: count(nn.unbox(t)["backbone"]["encoder"])
    assert enc(unshared) == 6 * enc(shared)
    # Attention-only sharing (ALBERT Table 4): one attention block, six FFN blocks.
    part = nn.unbox(abstract_params(tiny.config("albert", num_hidden_layers=6,
                                                share_scope="attention"), "base"))
    layer = part["backbone"]["encoder"]["layer"]
    assert layer["attention"]["key"]["kernel"].shape == (32, 4, 8)
    assert layer["ffn"]["intermediate"]["kernel"].shape == (6, 32, 37)
    # Groups x inner layers: G * I copies, depth L * I.
    grouped = C.ModelConfig(**{**tiny.config("albert").__dict__, "num_hidden_layers": 4,
                               "num_hidden_groups": 2, "inner_group_num": 3})
    assert grouped.depth == 12
    layer = nn.unbox(abstract_params(grouped, "base"))["backbone"]["encoder"]["layer"]
    assert layer["ffn"]["output"]["kernel"].shape == (6, 37, 32)


def test_layer_copy_maps_follow_albert_layout():
    cfg = tiny.config("albert", num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2)
    attn, ffn = C.layer_copy_maps(cfg)
    # Iterations 0,1 use group 0 (copies 0,1 each time), iterations 2,3 group 1 (2,3).
    assert attn == ffn == (0, 1, 0, 1, 2, 3, 2, 3)
    bert = tiny.config("bert")
    assert C.layer_copy_maps(bert) == ((0, 1, 2), (0, 1, 2))


@pytest.mark.parametrize("field,value,pattern", [
    ("hidden_size", 30, "hidden_size=30.*num_attention_heads"),
    ("num_hidden_groups", 2, "num_hidden_groups=2.*divide num_hidden_layers=3"),
    ("family", "gpt", "family='gpt'"),
    ("share_scope", "everything", "share_scope='everything'"),
    ("hidden_act", "swish", "hidden_act='swish'"),
    ("dtype", "float16", "dtype='float16'"),
    ("remat_policy", "some", "remat_policy='some'"),
    ("vocab_size", 0, "vocab_size=0"),
    ("hidden_dropout_prob", 1.5, "hidden_dropout_prob=1.5"),
    ("pad_token_id", 99, "pad_token_id=99"),
])
def test_bad_config_names_the_field(field, value, pattern):
    with pytest.raises(C.ConfigError, match=pattern):
        tiny.config(value if field == "family" else "bert", **({} if field == "family" else {field: value}))


def test_sequence_longer_than_position_table():
    with pytest.raises(C.ConfigError, match=r"max_seq_length=41 .*max_position_embeddings=40"):
        tiny.config("bert").check_sequence_length(41)
    roberta = tiny.config("roberta")  # 42 positions minus offset 2
    roberta.check_sequence_length(40)
    with pytest.raises(C.ConfigError, match="offset 2"):
        roberta.check_sequence_length(41)


def test_unknown_variant():
    with pytest.raises(C.ConfigError, match="variant='bert-huge'"):
        C.variant("bert-huge")
    assert C.variant("bert-base", num_hidden_layers=6).num_hidden_groups == 6


def test_objective_defaults_to_the_family_and_is_checked():
    from bert_jax.model.config import ConfigError, ModelConfig
    assert [ModelConfig(family=f).objective for f in ("bert", "roberta", "albert")] == ["mlm_nsp", "mlm", "mlm_sop"]
    assert ModelConfig(family="albert", objective="mlm").pretraining_objective.instance_kind == "none"
    assert ModelConfig(family="bert", objective="mlm_sop").pretraining_objective.instance_kind == "sop"
    # Changing the family keeps a chosen objective and re-derives a default one.
    assert ModelConfig(family="bert").replace(family="albert").objective == "mlm_sop"
    assert ModelConfig(family="bert", objective="mlm").replace(family="albert").objective == "mlm"
    with pytest.raises(ConfigError, match="objective='nsp'"):
        ModelConfig(objective="nsp")
