"""The sharded path on a 2x2x2 (data, fsdp, tensor) mesh of 8 fake CPU devices gives the
single-device results; every param has a logical name and every name a rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from flax import linen as nn
from jax.sharding import NamedSharding

from bert_jax import sharding
from bert_jax.model.heads import abstract_params, build_model, init_params


def mesh():
    assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
    return sharding.make_mesh(data=2, fsdp=2, tensor=2)


@pytest.mark.parametrize("family,kw", [("bert", {}), ("roberta", {}),
                                       ("albert", dict(num_hidden_layers=4, num_hidden_groups=2))])
def test_sharded_init_forward_and_grad_equal_single_device(family, kw):
    # Vocab and FFN widths even here so that tensor parallelism really splits them.
    cfg = tiny.config(family, vocab_size=98, intermediate_size=38, **kw)
    task = "pretraining"
    m = mesh()
    boxed = abstract_params(cfg, task)
    shardings = sharding.mesh_shardings(boxed, m)
    model = build_model(cfg, task)
    ids, types, mask = (np.concatenate([x, x]) for x in tiny.batch(cfg))  # batch 4 over data*fsdp

    def init(rng):
        return nn.unbox(model.init(rng, jnp.zeros((1, tiny.L), jnp.int32))["params"])

    def loss(p, ids, types, mask):
        out = model.apply({"params": p}, ids, types, mask)
        sentence = 0.0 if out["sentence_logits"] is None else jnp.mean(out["sentence_logits"] ** 2)
        return jnp.mean(out["mlm_logits"] ** 2) + sentence

    with jax.set_mesh(m):
        sharded_params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        ds = sharding.data_sharding(m)
        batch = [jax.device_put(x, ds) for x in (ids, types, mask)]
        step = jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings))
        l_sh, g_sh = step(sharded_params, *batch)
    # Params really are split: the vocab table over tensor, the width over fsdp.
    word = sharded_params["backbone"]["embeddings"]["word_embeddings"]
    assert word.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len({s.device for s in word.addressable_shards}) == 8

    single = nn.unbox(init_params(cfg, task, jax.random.key(0)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6),
                 sharded_params, single)
    l1, g1 = jax.jit(jax.value_and_grad(loss))(single, ids, types, mask)
    np.testing.assert_allclose(l_sh, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6),
                 g_sh, g1)
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))


@pytest.mark.parametrize("task", ["pretraining", "sequence_classification",
                                  "token_classification", "question_answering", "base"])
@pytest.mark.parametrize("family", ["bert", "roberta", "albert"])
def test_every_param_has_a_logical_name_with_a_rule(family, task):
    boxed = abstract_params(tiny.config(family, share_scope="ffn") if family == "albert"
                            else tiny.config(family), task)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for box in leaves:
        assert len(box.names) == len(box.value.shape)
        assert all(n in sharding.LOGICAL_NAMES for n in box.names), box.names
        sharding.spec_for(box.names)  # raises on a name without a rule


def test_uneven_dimensions_fall_back_to_replication():
    m = mesh()
    boxed = abstract_params(tiny.config("bert"), "base")  # vocab 99, ffn 37: odd
    sh = nn.unbox(sharding.mesh_shardings(boxed, m))
    assert sh["backbone"]["embeddings"]["word_embeddings"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert sh["backbone"]["encoder"]["layer"]["ffn"]["intermediate"]["kernel"].spec == \
        jax.sharding.PartitionSpec(None, "fsdp", None)
    assert sh["backbone"]["encoder"]["layer"]["attention"]["query"]["kernel"].spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_mesh_errors_name_the_sizes():
    with pytest.raises(ValueError, match="uses 12 devices"):
        sharding.make_mesh(data=3, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.make_mesh(data=-1, fsdp=3, tensor=1)
    assert sharding.make_mesh(data=-1, fsdp=2, tensor=2).shape == {"data": 2, "fsdp": 2, "tensor": 2}
