"""What a CPU can check of performance: the compiled train step does not grow with depth
(layers run under nn.scan), so BERT-large compiles about as fast as BERT-base."""

import jax
import pytest

from bert_jax import sharding
from bert_jax.jobs import bench
from bert_jax.model.config import variant
from bert_jax.training import optim, train


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


def test_gpu_script_bench_lines_parse():
    """Every bench command of experiments/gpu/h200.sh parses through the real flags: the
    four rows of the issue, each with attention dropout 0.1 and 0, in bfloat16; BERT-base
    first (a short GPU allowance measures what matters most), within a 9-minute budget."""
    import pathlib
    import subprocess
    import sys

    from absl import flags as absl_flags

    from bert_jax import flags
    from bert_jax.options import BenchOptions
    repo = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", str(repo / "experiments/gpu/h200.sh")], env={"PRINT": "1", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout.split("\n")
    rows, order = set(), []
    for line in filter(None, out):
        fv = absl_flags.FlagValues()
        flags.define(BenchOptions, fv)
        fv([sys.argv[0], *line.split()])
        o = flags.read(BenchOptions, fv)
        assert o.model.dtype == "bfloat16" and o.steps >= 10
        rows.add((o.model.variant, o.seq_len, o.batch_size, o.model.attention_probs_dropout_prob))
        order.append(o.model.variant)
    want = {(v, (str(s),), b) for v, s, b in (("bert-base", 128, 256), ("bert-base", 512, 64),
                                                ("bert-large", 512, 32), ("albert-base", 512, 64))}
    assert rows == {w + (d,) for w in want for d in (0.1, 0.0)}
    assert order[:4] == ["bert-base"] * 4
    assert "budget=${BUDGET_S:-540}" in (repo / "experiments/gpu/h200.sh").read_text()
