"""Workdirs, corpora and checkpoints on an object store: a pretraining run whose --workdir,
--corpus and --heldout_corpus are gs:// URIs equals the same run on local folders, resumes,
and leaves its files in the store; fine-tuning, held-out evaluation and predict read its
checkpoints from the store and give the local figures.

There is no bucket here: gs://bucket/ is served by a local folder through etils.epath's test
backend (epath.testing.mock_epath, the path type the code uses for URIs). A file the code
opened with the local-file API instead would land under the working directory as `gs:/...`
(pathlib collapses the `//`) or fail to open; the test checks that neither happened. orbax
writes its checkpoints to a URI with its own store drivers (tensorstore's); here its
CheckpointManager is pointed at the served folder, after checking it was given the URI."""

import contextlib
import json
import os
import pathlib
import shutil
import subprocess

import pytest
from etils import epath
from test_pretrain import REPO, assert_same_params, losses, options, tokenizer_dir

from bert_jax import checkpoint, storage
from bert_jax.data import cache
from bert_jax.jobs import heldout
from bert_jax.jobs.predict import predict
from bert_jax.options import HeldoutOptions, PredictOptions
from bert_jax.training import pretraining, runlog
from bert_jax.training.finetuning import FinetuneOptions, Finetuner

FIXTURES = (tokenizer_dir,)  # test_pretrain's autouse tokenizer, trained once for this module

BUCKET = "gs://bucket/"


@contextlib.contextmanager
def fake_bucket(root: pathlib.Path, monkeypatch):
    """gs://bucket/... is root/...; orbax's CheckpointManager gets the served folder."""
    local = lambda p: (str(root) + "/" + os.fspath(p)[len(BUCKET):]) if os.fspath(p).startswith(BUCKET) else p
    remote = lambda p: BUCKET + p[len(str(root)) + 1:] if p.startswith(str(root) + "/") else p

    def mapped(orig, p, *args, **kwargs):
        return orig(local(p), *[local(a) if isinstance(a, (str, os.PathLike)) else a for a in args], **kwargs)

    def opened(orig, p, mode="r", *args, **kwargs):
        writes.append(os.fspath(p)) if "w" in mode or "a" in mode else None
        return mapped(orig, p, mode, *args, **kwargs)

    def glob(orig, p):  # answers name the store when the question did
        on_store = os.fspath(p).startswith(BUCKET)
        return [remote(h) if on_store else h for h in orig(local(p))]

    def walk(orig, p, **kwargs):
        on_store = os.fspath(p).startswith(BUCKET)
        for top, dirs, files in orig(local(p), **kwargs):
            yield (remote(os.fspath(top)) if on_store else top), dirs, files

    fns = {k: mapped for k in ("copy", "rename", "replace", "exists", "isdir", "listdir",
                               "makedirs", "mkdir", "remove", "rmtree", "stat")}
    given = []
    manager = checkpoint.ocp.CheckpointManager

    def manager_on_served_folder(directory, *args, **kwargs):
        given.append(directory)
        return manager(epath.Path(local(directory)), *args, **kwargs)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", manager_on_served_folder)
    monkeypatch.setattr(cache.os, "cpu_count", lambda: 1)  # spawned workers would not see the fake
    writes = []
    with epath.testing.mock_epath(open=opened, glob=glob, walk=walk, **fns):
        yield given, writes


def finetune_options(init, workdir, train) -> FinetuneOptions:
    return FinetuneOptions(task="classification", init_checkpoint=str(init), train_file=str(train),
                           workdir=str(workdir), eval_files=(("train", str(train)),), batch_size=8,
                           learning_rate=1e-3, epochs=2, max_seq_length=32, progress_bar=False, mesh_data=1)


def test_paths_pick_their_type():
    assert isinstance(storage.path("gs://b/run"), epath.Path) and storage.is_remote("gs://b/run")
    assert os.fspath(storage.path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
    assert type(storage.path("runs/x")) is type(pathlib.Path("runs/x")) and not storage.is_remote("runs/x")
    assert not storage.is_remote(pathlib.Path("/tmp/gs://x"))
    with pytest.raises(storage.StorageError, match="--cache_dir=gs://b/c"):
        storage.require_local("gs://b/c", "--cache_dir", "memory-mapped")


def test_pretrain_and_finetune_on_gs_workdirs_equal_the_local_runs(shared_data, tmp_path, monkeypatch):
    root = tmp_path / "store"
    for name, sub in (("shakespeare-macbeth.txt", "train"), ("shakespeare-caesar.txt", "train"),
                      ("carroll-alice.txt", "heldout")):
        for top in (root / "corpus", tmp_path / "corpus"):
            (top / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / "bert_jax" / "corpus" / sub / name, top / sub / name)
    lines = (shared_data / "classification/sst2/train.tsv").read_text(encoding="utf-8-sig").splitlines()
    train = tmp_path / "sst2.tsv"
    train.write_text("\n".join(lines[:33]) + "\n")
    common = ("--log_every=1", "--eval_every=4")
    local_wd = tmp_path / "local"
    pretraining.run(options(local_wd, *common, f"--corpus={tmp_path}/corpus/train/*.txt",
                            f"--heldout_corpus={tmp_path}/corpus/heldout/*.txt",
                            f"--cache_dir={tmp_path}/cache_local"))

    remote = (*common, f"--corpus={BUCKET}corpus/train/*.txt", f"--heldout_corpus={BUCKET}corpus/heldout/*.txt",
              f"--cache_dir={tmp_path}/cache")
    monkeypatch.setattr(runlog, "REWRITE_S", 1e9)  # so the count below does not depend on speed
    with fake_bucket(root, monkeypatch) as (given, writes):
        first = pretraining.run(options(BUCKET + "run", *remote, "--stop_at_step=4"))
        assert first["step"] == 4 and first["workdir"] == BUCKET + "run"
        assert first["checkpoint"] == BUCKET + "run/checkpoints/4"
        second = pretraining.run(options(BUCKET + "run", *remote))  # resumes from the store
        assert second["step"] == 8
        # the run's checkpoints got the URI; best/ is written locally, then uploaded
        assert [os.fspath(d) for d in given if storage.is_remote(d)] == [BUCKET + "run/checkpoints"] * 2
        _, p_remote, step = checkpoint.load_params(BUCKET + "run")
        assert step == 8
        ft_remote = Finetuner(finetune_options(BUCKET + "run", BUCKET + "ft", train)).run()
        held = lambda ckpt, text: heldout.evaluate(HeldoutOptions(
            checkpoint=ckpt, text=text, max_seq_length=32, batch_size=8, batches=2,
            cache_dir=str(tmp_path / "held_cache")))
        held_remote = held(BUCKET + "run", BUCKET + "corpus/heldout/*.txt")
        predict(PredictOptions(BUCKET + "ft/best", str(train), str(tmp_path / "remote.tsv")))
    held_local = held(str(local_wd), f"{tmp_path}/corpus/heldout/*.txt")
    figures = lambda r: {k: v for k, v in r.items() if k not in ("checkpoint", "text")}
    assert figures(held_remote) == figures(held_local) and "mlm_accuracy" in figures(held_local)
    ft_local = Finetuner(finetune_options(local_wd, tmp_path / "ft", train)).run()
    assert ft_remote["eval"] == ft_local["eval"] and ft_remote["final_train_loss"] == ft_local["final_train_loss"]
    predict(PredictOptions(str(tmp_path / "ft/best"), str(train), str(tmp_path / "local.tsv")))
    assert (tmp_path / "remote.tsv").read_text() == (tmp_path / "local.tsv").read_text()
    for name in ("eval/train.json", "eval/train.predictions.tsv"):
        assert (root / "ft" / name).read_bytes() == (tmp_path / "ft" / name).read_bytes(), name
    for name in ("results.json", "run.json", "metrics.jsonl", "best/task.json", "best/config.json"):
        assert (root / "ft" / name).exists(), name
    run = root / "run"
    assert losses(run) == losses(local_wd) and sorted(losses(run)) == list(range(1, 9))
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "eval_" in l]
    assert [e["step"] for e in evals] == [4, 8]
    # no append on a store: metrics.jsonl (10 lines) was rewritten at each evaluation and close
    # of the two runs, and once when the resumed run cut the lines after its checkpoint
    assert writes.count(BUCKET + "run/metrics.jsonl") == 5
    _, p_local, _ = checkpoint.load_params(local_wd)
    assert_same_params(p_remote, p_local)
    for name in ("config.json", "manifest.json", "flags.txt", "tokenizer/vocab.txt", "best/config.json",
                 "checkpoints/8"):
        assert (run / name).exists(), name
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    # The corpus was read from the store (the cache records the URIs), nothing went to ./gs:
    index = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/index.json")]
    assert index and any(BUCKET in json.dumps(i) for i in index)
    assert not (REPO / "gs:").exists() and not pathlib.Path("gs:").exists()


def test_a_gs_workdir_needs_a_local_cache_dir(tmp_path, monkeypatch):
    with fake_bucket(tmp_path, monkeypatch):
        with pytest.raises(pretraining.PretrainError, match="--cache_dir"):
            pretraining.run(options(BUCKET + "run"))
        with pytest.raises(storage.StorageError, match="--cache_dir=gs://bucket/cache"):
            pretraining.run(options(BUCKET + "run", f"--cache_dir={BUCKET}cache"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_slurm_script_of_a_gs_workdir_goes_to_the_local_cache_dir(tmp_path):
    """`launch.sh --slurm` keeps its sbatch script and logs in the workdir; a URI workdir
    cannot hold them, so they go into --cache_dir (and without one it says so)."""
    args = [str(REPO / "launch.sh"), "--slurm", "--nodes=2", "--dry_run", "pretrain", "--workdir=gs://bucket/run"]
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "give --cache_dir" in p.stderr
    p = subprocess.run(args + [f"--cache_dir={tmp_path}/cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    script = (tmp_path / "cache" / "slurm" / "pretrain.sbatch").read_text()
    assert f"#SBATCH --output={tmp_path}/cache/slurm/" in script and "--workdir=gs://bucket/run" in script
    assert not (REPO / "gs:").exists()
