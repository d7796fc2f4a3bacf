"""What a CPU can check of performance: the compiled train step does not grow with depth
(layers run under nn.scan), so BERT-large compiles about as fast as BERT-base."""

import jax
import pytest

from bert_jax.jobs import bench
from bert_jax.model.config import variant
from bert_jax.training import optim, sharding, train


def lowered_size(name: str, seq: int = 128, batch: int = 8) -> int:
    """Characters of the lowered (StableHLO) train step of variant `name`, traced on
    abstract values: nothing is allocated, nothing compiled."""
    cfg = variant(name)
    tx = optim.make(optim.OptimConfig())
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    abstract, state_sh = train.state_shardings(cfg, tx, seq, mesh)
    host = bench.random_batch(cfg.replace(vocab_size=100), batch, seq, 20)
    bsh = lambda nd: sharding.data_sharding(mesh, nd)
    step = train.make_train_step(cfg, tx, 1, state_sh, bsh, host, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh(v.ndim)) for k, v in host.items()}
    with jax.set_mesh(mesh):
        return len(step.lower(state, batch).as_text())


@pytest.mark.parametrize("small,big", [("bert-base", "bert-large"), ("albert-base", "albert-xxlarge")])
def test_step_program_does_not_grow_with_depth(small, big):
    a, b = lowered_size(small), lowered_size(big)
    assert variant(big).depth >= variant(small).depth
    assert b / a == pytest.approx(1.0, abs=0.05), (a, b)
