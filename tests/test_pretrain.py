"""Pretraining end to end: exact resume (also after SIGKILL and SIGTERM), all three
families, bad input, bench."""

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
from absl import flags as absl_flags

from bert_jax import checkpoint, flags
from bert_jax.data.corpus import CorpusError
from bert_jax.interop import convert
from bert_jax.model.config import ConfigError
from bert_jax.options import PretrainOptions
from bert_jax.training import pretraining, runlog

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.flags"


@pytest.fixture(scope="module", autouse=True)
def tokenizer_dir(tmp_path_factory):
    """One tokenizer for every run here. (tokenizers' trainers break frequency ties in
    hash order, so two trainings on the same text can differ; a resumed run reuses its
    workdir's tokenizer, so that never affects resume.)"""
    from bert_jax.data import vocab
    global TOKENIZER
    TOKENIZER = tmp_path_factory.mktemp("tok") / "wordpiece"
    vocab.train("wordpiece", f"{REPO}/bert_jax/corpus/train/shakespeare-*.txt", 500, TOKENIZER)
    return TOKENIZER


def options(workdir, *extra):
    """PretrainOptions from experiments/tiny.flags plus overrides, through the real flag
    definitions (a private FlagValues); on one of the 8 test devices unless a test names its
    mesh (the sharded path is tested in test_sharding/test_cluster/test_finetune_resume)."""
    fv = absl_flags.FlagValues()
    flags.define(PretrainOptions, fv)
    fv([sys.argv[0], f"--flagfile={TINY}", f"--workdir={workdir}", f"--tokenizer={TOKENIZER}", "--mesh_data=1", *extra])
    os.chdir(REPO)  # flag files name corpus paths relative to the repo
    return flags.read(PretrainOptions, fv)


def losses(workdir) -> dict[int, float]:
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]  # a re-run step overwrites: the last word counts
    return out


def assert_same_params(a, b):
    fa, fb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run of 8 steps, logging every step."""
    wd = tmp_path_factory.mktemp("ref")
    pretraining.run(options(wd, "--log_every=1"))
    return wd


def test_exact_resume_in_process(reference, tmp_path):
    o = options(tmp_path, "--log_every=1", "--stop_at_step=4")
    s = pretraining.run(o)
    assert s["step"] == 4 and s["stopped_early"]
    pretraining.run(options(tmp_path, "--log_every=1"))
    ref, got = losses(reference), losses(tmp_path)
    assert sorted(got) == list(range(1, 9))
    assert got == ref  # the same loss at every step, bit for bit
    _, p_ref, _ = checkpoint.load_params(reference)
    _, p_got, step = checkpoint.load_params(tmp_path)
    assert step == 8
    assert_same_params(p_got, p_ref)
    # best/ was chosen the same way across the stop (its score is in the checkpoint)
    assert_same_params(convert.load(tmp_path / "best")[2], convert.load(reference / "best")[2])


@pytest.mark.parametrize("metric", ["mlm_accuracy", "mlm_loss"])
def test_best_heldout_params_are_kept(reference, metric, tmp_path):
    """Held-out evaluations (steps 4 and 8) choose <workdir>/best/ on --best_metric (a loss
    downwards): it holds that step's params and loads as a pretraining checkpoint."""
    wd = reference
    if metric != "mlm_accuracy":
        wd = tmp_path
        pretraining.run(options(wd, "--log_every=1", f"--best_metric={metric}"))
    evals = [r for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())
             if "eval_heldout_mlm_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8]
    pick = min if metric == "mlm_loss" else max  # the first of equal scores, as the run keeps it
    best_step = pick(evals, key=lambda r: r[f"eval_heldout_{metric}"])["step"]
    cfg, task, params, tok = convert.load(wd / "best")
    assert task == "pretraining" and tok is not None
    assert_same_params(params, checkpoint.load_params(wd, best_step)[1])
    with pytest.raises(pretraining.PretrainError, match="--best_metric='accuracy'"):
        pretraining.run(options(tmp_path / "bad", "--best_metric=accuracy"))


def _pretrain_cmd(workdir, *extra):
    return [sys.executable, "-m", "bert_jax.jobs.pretrain", f"--flagfile={TINY}", f"--workdir={workdir}",
            f"--tokenizer={TOKENIZER}", "--log_every=1", "--mesh_data=1", *extra]


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """A 24-step run in a subprocess (the same environment as the interrupted ones)."""
    wd = tmp_path_factory.mktemp("longref")
    subprocess.run(_pretrain_cmd(wd, "--train_steps=24", "--checkpoint_every=3"), cwd=REPO,
                   check=True, capture_output=True)
    return wd


@pytest.mark.slow
def test_resume_after_sigkill(long_reference, tmp_path):
    """Killed with SIGKILL at a random moment (checkpoints are async and every 3 steps,
    so saves are often in flight), the rerun continues from the last complete checkpoint
    with the same data and masks: every step's loss equals the uninterrupted run's."""
    cmd = _pretrain_cmd(tmp_path, "--train_steps=24", "--checkpoint_every=3")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 6):
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(tmp_path))
    assert killed_at < 24, "the run finished before it could be killed"
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    assert losses(tmp_path) == losses(long_reference)
    _, p_ref, _ = checkpoint.load_params(long_reference)
    _, p_got, _ = checkpoint.load_params(tmp_path)
    assert_same_params(p_got, p_ref)


@pytest.mark.slow
def test_sigterm_checkpoints_current_step(long_reference, tmp_path):
    cmd = _pretrain_cmd(tmp_path, "--train_steps=24", "--checkpoint_every=100")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = checkpoint.Checkpointer(tmp_path).latest_step()
    assert saved is not None and 4 <= saved < 24  # checkpoint_every=100: only SIGTERM saved it
    assert "SIGTERM" in err
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    assert losses(tmp_path) == losses(long_reference)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from bert_jax.data import vocab
    out = tmp_path_factory.mktemp("bpe") / "bpe"
    vocab.train("bpe", f"{REPO}/bert_jax/corpus/train/shakespeare-*.txt", 400, out)
    return out


@pytest.mark.parametrize("variant,extra", [
    ("albert-base", ["--embedding_size=24", "--num_hidden_groups=1", "--max_ngram=3"]),
    ("bert-base", ["--embedding_size=16"]),  # factorized embeddings on BERT
])
def test_albert_and_factorized_bert_pretrain_end_to_end(variant, extra, tmp_path):
    s = pretraining.run(options(tmp_path, f"--variant={variant}", "--train_steps=4",
                                "--max_position_embeddings=64", *extra))
    assert s["step"] == 4
    cfg, params, _ = checkpoint.load_params(tmp_path)
    assert cfg.family == variant.split("-")[0]
    emb = params["backbone"]["embeddings"]
    assert emb["word_embeddings"].shape[-1] == cfg.embedding_size != cfg.hidden_size
    if cfg.family == "albert":  # shared: one copy of the layer
        assert params["backbone"]["encoder"]["layer"]["attention"]["query"]["kernel"].ndim == 3
        assert "sentence_accuracy" in s["heldout"]  # SOP
    assert all(np.isfinite(v) for v in losses(tmp_path).values())


@pytest.mark.slow
def test_roberta_learns_with_byte_level_bpe_and_factorized_embeddings(bpe_dir, tmp_path):
    """RoBERTa as its paper trains it (byte-level BPE, MLM only, FULL-SENTENCES, packed
    rows, whole-word masking), with E != H: the training loss falls over 40 steps on the
    bundled books, and the held-out MLM accuracy beats chance."""
    fv = absl_flags.FlagValues()
    flags.define(PretrainOptions, fv)
    fv([sys.argv[0], f"--flagfile={TINY}", f"--workdir={tmp_path}", f"--tokenizer={bpe_dir}",
        "--variant=roberta-base", "--max_position_embeddings=64", "--embedding_size=16",
        "--max_examples_per_row=2", "--instances=prebuilt", "--whole_word_masking", "--train_steps=40", "--warmup_steps=4",
        "--learning_rate=3e-3", "--log_every=1", "--eval_every=40", "--checkpoint_every=40"])
    s = pretraining.run(flags.read(PretrainOptions, fv))
    cfg = checkpoint.read_config(tmp_path)
    assert cfg.family == "roberta" and cfg.embedding_size == 16 and cfg.pad_token_id == 1
    assert "sentence_accuracy" not in s["heldout"]
    curve = [losses(tmp_path)[k] for k in range(1, 41)]
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.5, curve
    assert s["heldout"]["mlm_accuracy"] > 2.0 / 400


def test_resume_checks_the_run_record(tmp_path):
    """Rerunning a workdir with a flag that changes the model, data or optimization is an
    error naming the flag, before any step and without touching the record; a flag that
    only changes how the run is observed (--log_every) resumes."""
    pretraining.run(options(tmp_path, "--stop_at_step=4"))
    record = (tmp_path / "manifest.json").read_text(), (tmp_path / "metrics.jsonl").read_text()
    for flag, name in (("--learning_rate=2e-3", "--learning_rate: checkpoint 0.001, now 0.002"),
                       ("--max_seq_length=24", "--max_seq_length: checkpoint 32, now 24"),
                       ("--whole_word_masking", "--whole_word_masking"),
                       ("--seed=1", "--seed: checkpoint 0, now 1")):
        with pytest.raises(pretraining.PretrainError, match=name):
            pretraining.run(options(tmp_path, flag))
        assert ((tmp_path / "manifest.json").read_text(), (tmp_path / "metrics.jsonl").read_text()) == record
    s = pretraining.run(options(tmp_path, "--log_every=3"))
    assert s["step"] == 8


def _options_trained_tokenizer(workdir, *extra):
    """Like options(), but the tokenizer is trained into the workdir (no --tokenizer)."""
    fv = absl_flags.FlagValues()
    flags.define(PretrainOptions, fv)
    fv([sys.argv[0], f"--flagfile={TINY}", f"--workdir={workdir}", "--train_steps=2", "--checkpoint_every=2",
        *extra])
    os.chdir(REPO)
    return flags.read(PretrainOptions, fv)


def test_a_failed_run_leaves_no_stale_tokenizer(tmp_path):
    """A first run on a corpus of blank lines fails naming it and writes no tokenizer; the
    next run with a good corpus builds a real one (before: it trained on the 5-token
    left-over and reported held-out accuracy 1.0). Changing --tokenizer_vocab_size once a
    checkpoint exists is refused by name instead of being ignored."""
    from bert_jax.data.tokenizer import Tokenizer, TokenizerError
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n\n")
    wd = tmp_path / "wd"
    with pytest.raises(TokenizerError, match="blank.txt: the corpus has no text"):
        pretraining.run(_options_trained_tokenizer(wd, f"--corpus={blank}"))
    assert not (wd / "tokenizer").exists() or not any((wd / "tokenizer").iterdir())
    (wd / "tokenizer").mkdir(exist_ok=True)  # and a left-over from a run killed before its first save
    Tokenizer.load(TOKENIZER).save(wd / "tokenizer")
    s = pretraining.run(_options_trained_tokenizer(wd, "--tokenizer_vocab_size=300"))
    assert Tokenizer.load(wd / "tokenizer").vocab_size == 300 and s["heldout"]["mlm_accuracy"] < 0.5
    with pytest.raises(pretraining.PretrainError, match="--tokenizer_vocab_size: checkpoint 300, now 400"):
        pretraining.run(_options_trained_tokenizer(wd, "--tokenizer_vocab_size=400"))
    assert Tokenizer.load(wd / "tokenizer").vocab_size == 300


def test_pretrain_workdir_in_use_is_refused(tmp_path):
    with checkpoint.WorkdirLock(tmp_path, "pretrain"):
        o = pretraining.PretrainOptions(workdir=str(tmp_path), corpus="unused.txt")
        with pytest.raises(checkpoint.CheckpointError, match=r"is in use by pretrain \(pid"):
            pretraining.run(o)
    assert not (tmp_path / "tokenizer").exists()


def test_bad_sizes_are_named_before_any_work(tmp_path):
    """A batch that does not split over the devices is named with the mesh before the
    tokenizer or cache is built (before: a JAX IndivisibleError after both); sizes out of
    range are named by their flag."""
    with pytest.raises(ConfigError, match=r"--batch_size=6 must divide .* 8 data-parallel devices .*multiple of 8"):
        pretraining.run(options(tmp_path, "--batch_size=6", "--mesh_data=-1"))
    with pytest.raises(ConfigError, match=r"--batch_size=12 must divide evenly into --grad_accum=3 .*multiple of 24"):
        pretraining.run(options(tmp_path, "--batch_size=12", "--grad_accum=3", "--mesh_data=-1"))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "tokenizer").exists()
    for bad, name in (("--batch_size=0", "batch_size"), ("--max_seq_length=2", "max_seq_length"),
                      ("--max_predictions_per_seq=0", "max_predictions_per_seq"),
                      ("--masked_lm_prob=1.5", "masked_lm_prob")):
        with pytest.raises(absl_flags.IllegalFlagValueError, match=name):
            options(tmp_path, bad)


def test_misspelled_flag_is_named():
    res = subprocess.run([sys.executable, "-m", "bert_jax.jobs.pretrain", f"--flagfile={TINY}",
                          "--workdir=/tmp/x", "--learning_rat=1e-3"], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "learning_rat" in res.stderr


def test_missing_corpus_is_named(tmp_path):
    with pytest.raises(CorpusError, match="--corpus: '.*nothing-here.txt' matches no file"):
        pretraining.run(options(tmp_path, f"--corpus={tmp_path}/nothing-here.txt"))


def test_tokenizer_larger_than_model_vocab(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size=100 is smaller than the tokenizer's 500"):
        pretraining.run(options(tmp_path, "--vocab_size=100"))


def test_other_architecture_is_named(reference, tmp_path):
    import shutil
    wd = tmp_path / "wd"
    shutil.copytree(reference, wd)
    before = sorted(str(p.relative_to(wd)) for p in wd.rglob("*"))
    with pytest.raises(checkpoint.CheckpointError, match="another architecture .*hidden_size: checkpoint 32 vs flags 48"):
        pretraining.run(options(wd, "--hidden_size=48"))
    assert sorted(str(p.relative_to(wd)) for p in wd.rglob("*")) == before


def _array_files(step_dir):
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def _flip(step_dir, f):
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + 1000, len(data))):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate(step_dir, f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


# Each array-file fault hits every array data file of the step: an OCDBT data file may
# hold regions no restore reads, so one chosen file is not certain to corrupt anything.
FAULTS = {"flip_bytes": lambda d: [_flip(d, f) for f in _array_files(d)],
          "truncate": lambda d: [_truncate(d, f) for f in _array_files(d)],
          "delete_array_files": lambda d: [f.unlink() for f in _array_files(d)],
          "delete_metadata": lambda d: (d / "state" / "_METADATA").unlink()}


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A straight 8-step run keeping checkpoints 4, 6 and 8."""
    wd = tmp_path_factory.mktemp("three")
    pretraining.run(options(wd, "--log_every=1", "--checkpoint_every=2", "--keep_checkpoints=3"))
    return wd


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_corrupt_latest_checkpoint_falls_back_to_a_verified_one(three_checkpoints, tmp_path, fault, caplog):
    """Each fault in the latest checkpoint: the rerun resumes from the newest checkpoint
    that verifies (saying so), trains the straight run's losses, keeps the corrupt one
    aside and deletes no verified checkpoint."""
    import shutil
    wd = tmp_path / "wd"
    shutil.copytree(three_checkpoints, wd)
    FAULTS[fault](wd / "checkpoints" / "8")
    s = pretraining.run(options(wd, "--log_every=1", "--checkpoint_every=2", "--keep_checkpoints=3"))
    assert s["step"] == 8
    assert "checkpoints.corrupt" in caplog.text and "resuming from the verified checkpoint 6" in caplog.text
    assert (wd / "checkpoints.corrupt" / "8").is_dir()
    assert {p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()} == {"4", "6", "8"}
    assert losses(wd) == losses(three_checkpoints)
    _, p_ref, _ = checkpoint.load_params(three_checkpoints)
    _, p_got, _ = checkpoint.load_params(wd)
    assert_same_params(p_got, p_ref)


def test_every_checkpoint_corrupt_refuses_and_keeps_them(three_checkpoints, tmp_path):
    import shutil
    wd = tmp_path / "wd"
    shutil.copytree(three_checkpoints, wd)
    for step in (4, 6, 8):  # every array file: ocdbt files may hold regions no read touches
        for f in _array_files(wd / "checkpoints" / str(step)):
            _flip(wd / "checkpoints" / str(step), f)
    before = sorted(str(p.relative_to(wd)) for p in wd.rglob("*"))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .* can be restored"):
        pretraining.run(options(wd, "--log_every=1", "--checkpoint_every=2", "--keep_checkpoints=3"))
    assert sorted(str(p.relative_to(wd)) for p in wd.rglob("*")) == before


def test_nonfinite_updates_stop_the_run_and_are_never_saved(tmp_path):
    """--adam_eps=0 makes Adam divide 0 by 0 on embedding rows with no gradient: finite
    loss and gradients, non-finite update. The run stops with an error naming the step;
    the checkpoint it saved before holds finite params. Every update so far was skipped, so
    that checkpoint holds the untrained init: the message names no checkpoint as the last
    good one (it used to name checkpoints/2)."""
    with pytest.raises(runlog.NonFiniteError, match=r"step 3: 3 non-finite .*Last good checkpoint: none"):
        pretraining.run(options(tmp_path, "--adam_eps=0", "--max_nonfinite_streak=3", "--checkpoint_every=2",
                                "--warmup_steps=1", "--log_every=1"))
    _, params, step = checkpoint.load_params(tmp_path)
    assert step == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_bench_counts_flops_and_times_real_steps(tmp_path):
    """bench's FLOP formula agrees with XLA's own count of the compiled train step (loop
    mode: XLA counts a scanned body once) within 10%, for BERT and factorized ALBERT; the
    timed steps really ran (the step counter advanced by warmup + steps and the loss on the
    repeated batch fell while timing). --peer=hf times transformers on the same config and
    batch right after each length: its first loss is chance on the same vocabulary and
    sentence labels, it changes while timing, and the speed-up is its step time over ours."""
    for extra in (["--hidden_size=128", "--num_attention_heads=4", "--intermediate_size=512", "--peer=hf"],
                  ["--variant=albert-base", "--hidden_size=128", "--num_attention_heads=4",
                   "--intermediate_size=512", "--embedding_size=64", "--seq_len=32"]):
        res = subprocess.run([sys.executable, "-m", "bert_jax.jobs.bench", f"--flagfile={TINY}", "--steps=3",
                              "--warmup=1", "--seq_len=32,64", "--vocab_size=1001", "--scan_layers=false",
                              "--num_hidden_layers=3", "--learning_rate=1e-2", "--batch_size=32", *extra],
                             cwd=REPO, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, XLA_FLAGS=""))  # one device: XLA counts its program

        assert res.returncode == 0, res.stderr[-2000:]
        lines = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
        peers = [l for l in lines if l["system"] != "bert_jax"]
        lines = [l for l in lines if l["system"] == "bert_jax"]
        assert [l["seq_len"] for l in lines] == ([32] if "--seq_len=32" in extra else [32, 64])
        if "--peer=hf" in extra:
            assert [p["seq_len"] for p in peers] == [32, 64] and "BertForPreTraining" in peers[0]["system"]
            for ours, peer in zip(lines, peers):
                assert peer["bert_jax_speedup"] == pytest.approx(peer["step_ms"] / ours["step_ms"], rel=1e-2)
                assert peer["first_loss"] == pytest.approx(np.log(1001) + np.log(2), abs=0.5), peer
                assert np.isfinite(peer["loss"]) and peer["loss"] != peer["first_loss"], peer  # it trained
        else:
            assert peers == []
        for l in lines:
            for k in ("compile_s", "step_ms", "real_tokens_per_s", "mfu", "peak_memory_gb", "device"):
                assert k in l
            tokens = 32 * l["seq_len"]
            assert l["step_ms"] > 0 and l["real_tokens_per_s"] == pytest.approx(tokens / l["step_ms"] * 1e3, rel=1e-3)
            assert l["flops_per_token"] * tokens == pytest.approx(l["xla_flops_per_step"], rel=0.10), l
            assert l["step"] == 1 + 3 and l["loss"] < l["loss_before_timing"], l


def test_report_writes_table_and_plot(reference, tmp_path):
    """A folder mixing a pretraining run and a fine-tuning run's log (written by the
    shared run log's schema) gives one row and one plot each."""
    import shutil

    from bert_jax.training import runlog
    runs = tmp_path / "runs"
    shutil.copytree(reference, runs / "pre")
    (runs / "ft").mkdir()
    for s in range(1, 5):
        runlog.append(runs / "ft" / "metrics.jsonl", {"step": s, "loss": 1.0 / s, "learning_rate": 1e-3})
        if s % 2 == 0:
            runlog.append(runs / "ft" / "metrics.jsonl", {"step": s, "eval_dev_accuracy": 0.5 + s / 10, "eval_dev_f1": 0.4})
    res = subprocess.run([sys.executable, "-m", "bert_jax.jobs.report", f"--runs={runs}",
                          f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| pre | pretrain | 8 |" in table and "| ft | finetune | 4 | 0.2500 |" in table
    assert "dev_accuracy" in table.splitlines()[0] and "0.9000" in table
    for name in ("pre", "ft"):
        assert (tmp_path / "out" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vocab_job_command_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "bert_jax.jobs.vocab", "--kind=sentencepiece",
                          f"--corpus={REPO}/bert_jax/corpus/train/shakespeare-*.txt",
                          "--vocab_size=300", f"--out={tmp_path}/sp"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "sp" / "spiece.model").exists()
    res = subprocess.run([sys.executable, "-m", "bert_jax.jobs.vocab", "--kind=wordpiece",
                          f"--corpus={tmp_path}/none*.txt", f"--out={tmp_path}/wp"], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "none*.txt' matches no file" in res.stderr


def test_checksums_catch_silent_changes(tmp_path):
    """Bytes that the storage layer reads back without complaint (OCDBT checks its b-tree
    nodes, not array chunks) are caught by the per-array checksums: one flipped bit in any
    array changes its checksum, and a restore whose data disagrees with the recorded
    checksums is refused naming the array."""
    import jax.numpy as jnp
    state = {"w": np.linspace(-1, 1, 4096, dtype=np.float32).reshape(64, 64),
             "b": np.arange(7, dtype=np.int32), "h": jnp.ones((3, 5), jnp.bfloat16)}
    base = checkpoint.checksums(state)
    for name in state:
        bits = np.asarray(state[name]).copy()
        flat = bits.view(np.uint8).reshape(-1)
        flat[len(flat) // 2] ^= 0x10
        assert checkpoint.checksums(dict(state, **{name: bits}))[name] != base[name]
    ck = checkpoint.Checkpointer(tmp_path, async_save=False)
    ck.save(1, state, {}, {})
    ck.close()
    meta = tmp_path / "checkpoints" / "1" / "manifest" / "metadata"
    m = json.loads(meta.read_text())
    m["checksums"]["w"] ^= 1
    meta.write_text(json.dumps(m))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ck = checkpoint.Checkpointer(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/1 is corrupt: 1 array\(s\) differ .*\(w\)"):
        ck.restore(1, abstract, jax.tree.map(lambda _: one, state))
    ck.close()


@pytest.mark.parametrize("variant,objective,hf_class", [
    ("bert-base", "mlm_sop", None),               # no transformers class holds SOP on BERT
    ("bert-base", "mlm", "BertForMaskedLM"),
    ("albert-base", "mlm", "AlbertForMaskedLM"),
    ("albert-base", "mlm_nsp", None),             # nor NSP on ALBERT
])
def test_objective_is_a_flag_of_any_family(variant, objective, hf_class, tmp_path):
    """--objective pretrains end to end on the bundled books whatever the family: the
    sentence head and its instances follow the objective; export picks the transformers
    class that holds the objective's heads (equal MLM logits) or refuses by name."""
    import torch
    import transformers

    from bert_jax.interop import convert
    from bert_jax.model.heads import build_model
    extra = ["--embedding_size=24", "--num_hidden_groups=1"] if variant.startswith("albert") else []
    s = pretraining.run(options(tmp_path / "run", f"--variant={variant}", f"--objective={objective}",
                                "--train_steps=3", "--max_position_embeddings=64", *extra))
    cfg, task, params, tok_dir = convert.load(tmp_path / "run")
    assert cfg.family == variant.split("-")[0] and cfg.objective == objective
    sentence = {"mlm": "none", "mlm_nsp": "nsp", "mlm_sop": "sop"}[objective]
    assert ("sentence" in params) == (sentence != "none")
    assert ("sentence_accuracy" in s["heldout"]) == (sentence != "none")
    assert all(np.isfinite(v) for v in losses(tmp_path / "run").values())
    if hf_class is None:
        with pytest.raises(convert.ConvertError, match=f"{objective}.*{cfg.family}.*{sentence.upper()} head"):
            convert.export(tmp_path / "run", tmp_path / "hf")
        assert not (tmp_path / "hf").exists()
        return
    convert.export(tmp_path / "run", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [hf_class]
    model, info = getattr(transformers, hf_class).from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    auto = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert type(auto).__name__ == hf_class
    ids, types, mask = (np.array([[2, 40, 41, 42, 3, 0]]), np.zeros((1, 6), np.int64),
                        np.array([[1, 1, 1, 1, 1, 0]]))
    ours = build_model(cfg, task).apply({"params": params}, ids, types, mask)["mlm_logits"]
    with torch.no_grad():
        theirs = model.eval()(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                              attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours)[0, :5], theirs[0, :5], atol=1e-4)


def test_unlogged_steps_copy_nothing_to_the_host(tmp_path, monkeypatch, guarded_host_copies):
    """Steps that log, evaluate and save nothing run under JAX's device-to-host transfer
    guard set to disallow: the run completes, so the loop never waits on a copy there.
    A copy slipped into such a step (float() of the loss) is caught."""
    s = pretraining.run(options(tmp_path / "run", "--train_steps=8", "--log_every=4", "--eval_every=100",
                                "--checkpoint_every=100", "--unlogged_transfers=disallow"))
    assert s["step"] == 8 and sorted(losses(tmp_path / "run")) == [4, 8]
    from bert_jax.training import train
    real = train.wait_previous
    monkeypatch.setattr(train, "wait_previous", lambda prev, cur: (float(cur), real(prev, cur))[1])
    with pytest.raises(Exception, match="[Dd]isallowed device-to-host transfer"):
        pretraining.run(options(tmp_path / "leak", "--train_steps=8", "--log_every=4", "--eval_every=100",
                                "--checkpoint_every=100", "--unlogged_transfers=disallow"))


def test_a_run_whose_updates_were_all_skipped_is_no_success(tmp_path):
    """--adam_eps=0: every update is non-finite and skipped; the run used to end with exit 0,
    stopped_early false and an untrained best/. Now it is an error naming the count, the
    flags to check and the last checkpoint with trained params (none here)."""
    with pytest.raises(pretraining.PretrainError,
                       match=r"8 of the 8 updates .* skipped.*--adam_eps=0.0.*trained params: none"):
        pretraining.run(options(tmp_path, "--adam_eps=0"))


def test_a_toy_vocabulary_is_refused(tmp_path):
    """A one-line corpus trained a 7-token vocab.txt (500 asked) and pretrained on it."""
    (tmp_path / "x.txt").write_text("x\n")
    fv = absl_flags.FlagValues()
    flags.define(PretrainOptions, fv)
    fv([sys.argv[0], f"--flagfile={TINY}", f"--workdir={tmp_path / 'wd'}", f"--corpus={tmp_path / 'x.txt'}"])
    with pytest.raises(pretraining.PretrainError, match=r"vocabulary of \d+ tokens, under a tenth of "
                                                        r"--tokenizer_vocab_size=500"):
        pretraining.run(flags.read(PretrainOptions, fv))
    assert not (tmp_path / "wd" / "tokenizer").exists() and not (tmp_path / "wd" / "checkpoints").exists()


def test_logged_learning_rate_is_the_rate_of_that_steps_update(reference):
    """Both loops log the rate the step's update applied (optax's count is the step - 1);
    pretraining used to log the next update's (fine-tuning the applied one)."""
    from bert_jax.training import optim
    lr = optim.schedule(optim.OptimConfig(learning_rate=1e-3, warmup_steps=2, train_steps=8))
    rows = [json.loads(l) for l in (reference / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r}
    assert got[1] == 0.0 and got == pytest.approx({s: float(lr(s - 1)) for s in range(1, 9)})
