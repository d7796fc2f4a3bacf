"""Fine-tuning's run machinery: exact resume (stop and rerun, SIGKILL at a random moment),
the (data, fsdp, tensor) mesh, two processes, and no host copies on unlogged steps."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bert_jax.interop import convert
from bert_jax.options import FinetuneOptions
from bert_jax.training import finetuning
from bert_jax.training.finetuning import Finetuner

from test_finetune import head

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ resume and mesh ----
def _resume_options(ckpt, train, wd, **kw):
    return FinetuneOptions(task="classification", init_checkpoint=str(ckpt), train_file=str(train),
                           workdir=str(wd), batch_size=16, learning_rate=1e-3, epochs=2,
                           warmup_proportion=0.25, dropout=0.1, max_seq_length=48, progress_bar=False,
                           **{"mesh_data": 1, "log_every": 1, **kw})


def _losses(wd):
    return {r["step"]: r["loss"] for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def _assert_bit_identical(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(k)


@pytest.fixture(scope="module")
def straight(shared_data, tiny_checkpoint, tmp_path_factory):
    """8 steps (64 rows, batch 16, 2 epochs, dropout on) without a stop."""
    tmp = tmp_path_factory.mktemp("straight")
    train = head(shared_data / "classification/sst2/train.tsv", 64, tmp, "train.tsv")
    Finetuner(_resume_options(tiny_checkpoint, train, tmp / "wd")).run()
    return train, tmp / "wd"


def test_finetune_resumes_exactly(tiny_checkpoint, straight, tmp_path):
    """4 steps, stop (as on SIGTERM: a checkpoint at the current step), 4 more on the same
    workdir: the same losses and bit-identical params as 8 steps straight (data order and
    dropout continue where they stopped)."""
    train, ref = straight
    s = Finetuner(_resume_options(tiny_checkpoint, train, tmp_path / "wd", stop_at_step=4)).run()
    assert s["stopped_early"] and s["step"] == 4 and sorted(_losses(tmp_path / "wd")) == [1, 2, 3, 4]
    assert not (tmp_path / "wd/results.json").exists()
    # The train file replaced under the same path (labels flipped, rows dropped): used to
    # resume with exit 0 on the new data and a new schedule; now named before any step.
    good = train.read_bytes()
    rows = good.decode().splitlines()
    flipped = [rows[0]] + [r[:-1] + str(1 - int(r[-1])) for r in rows[1:40]]
    train.write_text("\n".join(flipped) + "\n")
    try:
        with pytest.raises(finetuning.FinetuneError, match=f"--train_file={train} changed since this run started"):
            Finetuner(_resume_options(tiny_checkpoint, train, tmp_path / "wd")).run()
    finally:
        train.write_bytes(good)
    Finetuner(_resume_options(tiny_checkpoint, train, tmp_path / "wd")).run()
    assert _losses(tmp_path / "wd") == _losses(ref) and len(_losses(ref)) == 8
    _assert_bit_identical(convert.load(tmp_path / "wd/best")[2], convert.load(ref / "best")[2])


def test_finetune_on_a_2x2x2_mesh_equals_one_device(tiny_checkpoint, straight, tmp_path):
    train, ref = straight
    Finetuner(_resume_options(tiny_checkpoint, train, tmp_path / "wd", mesh_data=2, mesh_fsdp=2,
                              mesh_tensor=2)).run()
    got, want = _losses(tmp_path / "wd"), _losses(ref)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 convert.load(tmp_path / "wd/best")[2], convert.load(ref / "best")[2])


def _finetune_cmd(ckpt, train, wd, *extra):
    return [sys.executable, "-m", "bert_jax.jobs.finetune", "--task=classification", f"--init_checkpoint={ckpt}",
            f"--train_file={train}", f"--workdir={wd}", "--batch_size=8", "--learning_rate=1e-3",
            "--epochs=2", "--warmup_proportion=0.25", "--dropout=0.1", "--max_seq_length=48",
            "--noprogress_bar", "--mesh_data=1", "--log_every=1", *extra]


@pytest.mark.slow
def test_finetune_resumes_exactly_after_sigkill(shared_data, tiny_checkpoint, tmp_path):
    """Killed with SIGKILL at a random moment with --checkpoint_every=2 (async saves often
    in flight), the rerun gives every step's loss and the final params of a run that was
    never killed, bit for bit."""
    train = head(shared_data / "classification/sst2/train.tsv", 96, tmp_path, "train.tsv")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    subprocess.run(_finetune_cmd(tiny_checkpoint, train, tmp_path / "ref"), env=env, check=True,
                   capture_output=True)
    cmd = _finetune_cmd(tiny_checkpoint, train, tmp_path / "wd", "--checkpoint_every=2")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "wd/metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_losses(tmp_path / "wd")) < 24, "the run finished before it could be killed"
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert _losses(tmp_path / "wd") == _losses(tmp_path / "ref")
    _assert_bit_identical(convert.load(tmp_path / "wd/best")[2], convert.load(tmp_path / "ref/best")[2])


@pytest.mark.slow
def test_finetune_in_two_processes_equals_one(shared_data, tiny_checkpoint, tmp_path):
    """`./launch.sh --procs=2 finetune`: two processes joined by jax.distributed (one CPU
    device each) fine-tune like one process with two devices: same losses, same params,
    files written once."""
    train = head(shared_data / "classification/sst2/train.tsv", 64, tmp_path, "train.tsv")
    extra = [f"--eval_files=train={train}", "--select_on=train", "--mesh_data=-1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               BERT_JAX_VENV=sys.prefix)
    job = _finetune_cmd(tiny_checkpoint, train, tmp_path / "multi", *extra)[3:]  # after `python -m bert_jax.jobs.finetune`
    p = subprocess.run([str(REPO / "launch.sh"), "--procs=2", "finetune", *job], env=env, capture_output=True,
                       text=True, timeout=400)
    why = "\n".join(l for l in (p.stdout + p.stderr).splitlines() if "rror" in l or "Fatal" in l or "F1" in l[:3])
    assert p.returncode == 0, why[-4000:]
    assert "--num_processes=2" in p.stderr  # launch.sh started two processes
    env2 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    subprocess.run(_finetune_cmd(tiny_checkpoint, train, tmp_path / "single", *extra), env=env2, check=True,
                   capture_output=True)
    multi, single = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
    assert sorted(multi) == sorted(single) == list(range(1, 17))
    np.testing.assert_allclose([multi[k] for k in multi], [single[k] for k in multi], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 convert.load(tmp_path / "multi/best")[2], convert.load(tmp_path / "single/best")[2])
    res = lambda d: json.loads((tmp_path / d / "results.json").read_text())["eval"]
    assert res("multi")["train"] == pytest.approx(res("single")["train"])


def test_unlogged_finetune_steps_copy_nothing_to_the_host(tiny_checkpoint, straight, tmp_path, monkeypatch,
                                                         guarded_host_copies):
    """Logging every 4th step (lines are means over those steps), the 6 quiet steps run
    under the transfer guard; the run equals the straight one."""
    train, ref = straight
    Finetuner(_resume_options(tiny_checkpoint, train, tmp_path / "wd", unlogged_transfers="disallow",
                              checkpoint_every=0, log_every=4)).run()
    got, want = _losses(tmp_path / "wd"), _losses(ref)
    assert sorted(got) == [4, 8]
    assert got[4] == pytest.approx(np.mean([want[s] for s in range(1, 5)]), rel=1e-6)
    assert got[8] == pytest.approx(np.mean([want[s] for s in range(5, 9)]), rel=1e-6)
    _assert_bit_identical(convert.load(tmp_path / "wd/best")[2], convert.load(ref / "best")[2])
    from bert_jax.training import train as train_lib
    real = train_lib.wait_previous
    monkeypatch.setattr(train_lib, "wait_previous", lambda prev, cur: (float(cur), real(prev, cur))[1])
    with pytest.raises(Exception, match="[Dd]isallowed device-to-host transfer"):
        Finetuner(_resume_options(tiny_checkpoint, train, tmp_path / "leak", unlogged_transfers="disallow",
                                  checkpoint_every=0, log_every=4)).run()


def test_rerun_on_other_processes_is_the_same_run(tmp_path):
    """A multi-process run resumes after a preemption although launch.sh (a new port) or
    SLURM (new nodes) gives it another coordinator: the processes are not the run, as the
    mesh is not (options.resume_rules), also for a run.json that recorded them."""
    from bert_jax.training import finetuning
    o = FinetuneOptions(task="classification", init_checkpoint="ck", train_file="t.tsv", workdir=str(tmp_path),
                        coordinator_address="localhost:21234", num_processes=2, process_id=0, mesh_data=2)
    assert finetuning.check_workdir(tmp_path, o) is None
    assert "coordinator_address" not in json.loads((tmp_path / finetuning.RUN_RECORD).read_text())
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)  # a checkpoint to resume from
    rerun = FinetuneOptions(**{**o.__dict__, "coordinator_address": "localhost:35678", "mesh_data": 4})
    assert finetuning.check_workdir(tmp_path, rerun) is None
    record = json.loads((tmp_path / finetuning.RUN_RECORD).read_text())  # as older versions wrote it
    (tmp_path / finetuning.RUN_RECORD).write_text(json.dumps(dict(record, coordinator_address="localhost:21234")))
    assert finetuning.check_workdir(tmp_path, rerun) is None
    with pytest.raises(finetuning.FinetuneError, match="--learning_rate: 2e-05 there, 0.001 now"):
        finetuning.check_workdir(tmp_path, FinetuneOptions(**{**o.__dict__, "learning_rate": 1e-3}))


def test_a_finetuning_run_that_did_not_train_is_an_error(tiny_checkpoint, straight, tmp_path):
    """--adam_eps=0: Adam divides 0 by 0 on the embedding rows no batch uses, so every
    update is non-finite and skipped. With a streak limit above the run's length, fine-tuning
    used to end with exit 0 and results of the untrained model (pretraining refused it: the
    two loops had drifted); the shared loop refuses it for both."""
    train, _ = straight
    with pytest.raises(finetuning.FinetuneError,
                       match=r"8 of the 8 updates .* skipped.*--adam_eps=0.0.*trained params: none"):
        Finetuner(_resume_options(tiny_checkpoint, train, tmp_path / "wd", eps=0.0, max_nonfinite_streak=100)).run()
    assert not (tmp_path / "wd/best").exists() and not (tmp_path / "wd/results.json").exists()


def test_finetuning_takes_the_optimizer_flags():
    """Fine-tuning hard-coded AdamW and a clipping norm of 1: --optimizer, --adam_eps,
    --adam_b1/b2, --max_grad_norm and --decay_power (pretraining's flags) were ignored."""
    import sys
    from absl import flags as absl_flags
    from bert_jax import flags
    from bert_jax.training import finetuning, optim
    fv = absl_flags.FlagValues()
    flags.define(FinetuneOptions, fv, required=False)
    fv([sys.argv[0], "--optimizer=lamb", "--adam_eps=1e-8", "--adam_b2=0.98", "--max_grad_norm=0.5",
        "--decay_power=2", "--learning_rate=3e-5", "--epochs=2", "--batch_size=10", "--warmup_proportion=0.25"])
    c = finetuning.optim_config(flags.read(FinetuneOptions, fv), 100)
    assert (c.optimizer, c.eps, c.b1, c.b2, c.max_grad_norm, c.decay_power) == ("lamb", 1e-8, 0.9, 0.98, 0.5, 2.0)
    assert (c.learning_rate, c.warmup_steps, c.train_steps) == (3e-5, 5, 20)
    default = finetuning.optim_config(FinetuneOptions(), 100)  # as before: AdamW, clipping at 1
    assert (default.optimizer, default.max_grad_norm, default.eps, default.weight_decay) == ("adamw", 1.0, 1e-6, 0.01)
    assert optim.make(c) is not None


def test_a_run_recorded_before_the_optimizer_flags_resumes(tmp_path):
    """A run.json written before fine-tuning took the optimizer flags holds none of them:
    it is the run of their values then (AdamW, eps 1e-6, clipping at 1)."""
    from bert_jax.training import finetuning
    o = FinetuneOptions(task="classification", init_checkpoint="ck", train_file="t.tsv", workdir=str(tmp_path))
    finetuning.check_workdir(tmp_path, o)
    record = json.loads((tmp_path / finetuning.RUN_RECORD).read_text())
    old = {k: v for k, v in record.items() if k not in finetuning.OPTIONS_BEFORE_THEY_EXISTED}
    (tmp_path / finetuning.RUN_RECORD).write_text(json.dumps(old))
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    assert finetuning.check_workdir(tmp_path, o) is None
    with pytest.raises(finetuning.FinetuneError, match="--adam_eps: 1e-06 there, 1e-08 now"):
        finetuning.check_workdir(tmp_path, FinetuneOptions(**{**o.__dict__, "eps": 1e-8}))
