"""Cluster machinery on CPU processes: a SLURM job through launch.sh with fake
sbatch/srun (the real SLURM detection and jax.distributed start-up), preemption that all
processes agree on, a process that dies, restore on another topology, and FSDP/tensor
sharding sizes of the big variants."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bert_jax import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.flags"
STEPS = 16
RUN = ["--train_steps=16", "--checkpoint_every=4", "--keep_checkpoints=10", "--log_every=1"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from bert_jax.data import vocab
    out = tmp_path_factory.mktemp("tok") / "wordpiece"
    vocab.train("wordpiece", f"{REPO}/bert_jax/corpus/train/shakespeare-*.txt", 500, out)
    return out


def env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                BERT_JAX_VENV=sys.prefix)


def job_args(tok, workdir, *extra) -> list[str]:
    return [f"--flagfile={TINY}", f"--workdir={workdir}", f"--tokenizer={tok}", *RUN, *extra]


def losses(workdir) -> dict[int, float]:
    rows = map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def start_two(tok, workdir, *extra) -> list[subprocess.Popen]:
    """Two processes (2 CPU devices each) joined by jax.distributed, as `launch.sh --procs=2`
    starts them (here directly, to signal each one)."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen([sys.executable, "-m", "bert_jax.jobs.pretrain", *job_args(tok, workdir, *extra),
                              f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
                             cwd=REPO, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def wait_for_steps(workdir, n: int, procs, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(losses(workdir) if (workdir / "metrics.jsonl").exists() else {}) < n:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the run ended or stalled"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def slurm_run(tok, tmp_path_factory):
    """A 2-node SLURM job (1 process x 2 CPU devices per node) submitted by
    `launch.sh --slurm`, run by the fake sbatch/srun; and its script."""
    wd = tmp_path_factory.mktemp("slurm") / "run"
    e = dict(env(2), PATH=f"{REPO / 'tests' / 'fake_slurm'}:{os.environ['PATH']}",
             FAKE_SLURM_JOB_ID=str(os.getpid() % 4096))
    p = subprocess.run([str(REPO / "launch.sh"), "--slurm", "--nodes=2", "--time=00:30:00", "--partition=cpu",
                        "pretrain", *job_args(tok, wd)], cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    logs = "".join(f.read_text() for f in (wd / "slurm").glob("*.out"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:] + logs[-4000:]
    return wd, (wd / "slurm" / "pretrain.sbatch").read_text(), logs


@pytest.mark.slow
def test_slurm_job_trains_like_one_process(slurm_run, tok, tmp_path):
    """The generated sbatch script asks for the nodes, requeue and an early SIGTERM; inside
    the job jax.distributed starts from SLURM's variables alone (2 processes x 2 devices),
    and the run equals one process with 4 devices."""
    wd, script, logs = slurm_run
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=00:30:00",
                 "#SBATCH --partition=cpu", "#SBATCH --requeue", "#SBATCH --signal=TERM@120"):
        assert line in script
    assert "srun --kill-on-bad-exit=1" in script and "--coordinator_address" not in script
    manifest = json.loads((wd / "manifest.json").read_text())
    assert manifest["process_count"] == 2
    subprocess.run([sys.executable, "-m", "bert_jax.jobs.pretrain", *job_args(tok, tmp_path / "one")],
                   cwd=REPO, env=env(4), check=True, capture_output=True)
    multi, one = losses(wd), losses(tmp_path / "one")
    assert sorted(multi) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([multi[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_to_each_process_saves_one_agreed_step(slurm_run, tok, tmp_path):
    """SIGTERM to the two processes one second apart: both exit 0 having saved the same
    step; rerunning resumes and gives the uninterrupted run's losses."""
    ref, _, _ = slurm_run
    wd = tmp_path / "run"
    procs = start_two(tok, wd)
    wait_for_steps(wd, 3, procs)
    procs[0].send_signal(signal.SIGTERM)
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    agreed = [[l for l in out.splitlines() if "checkpoint at step" in l] for out in outs]
    steps = {int(l.split("checkpoint at step ")[1].split(",")[0]) for a in agreed for l in a}
    assert len(steps) == 1 and all(agreed), agreed
    step = steps.pop()
    assert step < STEPS and checkpoint.Checkpointer(wd, async_save=False).latest_step() == step
    assert max(losses(wd)) == step
    procs = start_two(tok, wd)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:]
    assert losses(wd) == losses(ref)


@pytest.mark.slow
def test_a_killed_process_stops_the_other_and_the_rerun_resumes(slurm_run, tok, tmp_path):
    """SIGKILL to one process mid-run: the other exits non-zero within 60 s saying a peer
    was lost; the last complete checkpoint restores and the rerun matches the uninterrupted
    run."""
    ref, _, _ = slurm_run
    wd = tmp_path / "run"
    procs = start_two(tok, wd, "--checkpoint_every=2")
    wait_for_steps(wd, 5, procs)
    procs[1].kill()
    t0 = time.time()
    out = procs[0].communicate(timeout=90)[0]
    assert procs[0].returncode != 0 and time.time() - t0 < 60
    # Our message when the error reaches Python (a collective fails), JAX's when the
    # coordination service finds the peer gone first (e.g. during a checkpoint barrier).
    assert ("lost contact with another process" in out or "another task died" in out), out[-3000:]
    procs[1].wait()
    assert max(losses(wd)) < STEPS, "the run finished before it could be killed"
    procs = start_two(tok, wd, "--checkpoint_every=2")
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
    assert losses(wd) == losses(ref)


@pytest.mark.slow
@pytest.mark.parametrize("devices,mesh", [(4, []), (1, []), (4, ["--mesh_fsdp=2"])],
                         ids=["1x4", "1x1", "1x4-fsdp2"])
def test_checkpoint_of_two_processes_resumes_on_another_topology(slurm_run, tok, devices, mesh, tmp_path):
    """The 2 x 2-device run's step-8 checkpoint resumes in one process on 4 devices, on 1,
    and on 4 with FSDP: steps 9-16 give the straight run's losses (rtol 1e-4: only the
    reduction order differs) and end near its params."""
    ref, _, _ = slurm_run
    wd = tmp_path / "run"
    shutil.copytree(ref, wd, ignore=shutil.ignore_patterns("slurm", "tensorboard", "best"))
    for s in (12, 16):
        shutil.rmtree(wd / "checkpoints" / str(s))
    p = subprocess.run([sys.executable, "-m", "bert_jax.jobs.pretrain", *job_args(tok, wd, *mesh)],
                       cwd=REPO, env=env(devices), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    got, want = losses(wd), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in range(9, 17)], [want[s] for s in range(9, 17)], rtol=1e-4)
    _, a, _ = checkpoint.load_params(wd)
    _, b, _ = checkpoint.load_params(ref)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5), a, b)


@pytest.mark.slow
def test_two_processes_start_from_a_checkpoint_of_any_topology(slurm_run, tok, tmp_path):
    """--init_checkpoint on a workdir that 2 processes x 2 devices wrote, read by 2 other
    processes (2 devices each: its saved sharding names devices process 1 does not have)
    and by one process on 4 devices: the same held-out figures before training and the
    same first losses (the restore path fine-tuning's --init_checkpoint takes too)."""
    ref, _, _ = slurm_run
    init = ["--train_steps=2", "--log_every=1", f"--init_checkpoint={ref}"]
    procs = start_two(tok, tmp_path / "two", *init)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    p = subprocess.run([sys.executable, "-m", "bert_jax.jobs.pretrain", *job_args(tok, tmp_path / "one", *init)],
                       cwd=REPO, env=env(4), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = lambda w: [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
    two, one = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert two[0]["step"] == one[0]["step"] == 0
    np.testing.assert_allclose(two[0]["eval_heldout_mlm_loss"], one[0]["eval_heldout_mlm_loss"], rtol=1e-5)
    np.testing.assert_allclose([losses(tmp_path / "two")[s] for s in (1, 2)],
                               [losses(tmp_path / "one")[s] for s in (1, 2)], rtol=1e-5)


@pytest.mark.parametrize("variant", ["bert-large", "albert-xxlarge"])
def test_fsdp_splits_params_and_optimizer_state_eight_ways(variant):
    """On 8 devices with --mesh_fsdp=8, each device holds 1/8 of the params and Adam
    state (within 5%: only small vectors are replicated); with --mesh_tensor=2 the
    attention heads and the MLP are split over `tensor`."""
    from bert_jax import sharding
    from bert_jax.model.config import variant as get_variant
    from bert_jax.training import optim, train
    cfg = get_variant(variant)
    tx = optim.make(optim.OptimConfig())
    abstract, shardings = train.state_shardings(cfg, tx, 128, sharding.make_mesh(data=1, fsdp=8, tensor=1))
    leaves = [(a, s) for a, s in zip(jax.tree.leaves((abstract.params, abstract.opt_state)),
                                     jax.tree.leaves((shardings.params, shardings.opt_state)))]
    total = sum(a.size * a.dtype.itemsize for a, _ in leaves)
    per_device = sum(np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in leaves)
    assert total > 1e9 if variant == "bert-large" else total > 2e9  # fp32 params + 2 Adam moments
    assert per_device <= 1.05 * total / 8, (per_device, total / 8)
    _, tp = train.state_shardings(cfg, tx, 128, sharding.make_mesh(data=1, fsdp=4, tensor=2))
    layer = tp.params["backbone"]["encoder"]["layer"]
    specs = {name: layer[block][part]["kernel"].spec for name, block, part in
             (("query", "attention", "query"), ("mlp_in", "ffn", "intermediate"), ("mlp_out", "ffn", "output"))}
    assert all("tensor" in spec for spec in specs.values()), specs
