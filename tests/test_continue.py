"""Pretraining that starts from a model: --init_checkpoint (Hugging Face folders of the
three families, our folders) and the phases of one run (BERT's length 128 -> 512); and
the folder a run may start in.

The exactness tests compare the first step's loss with the loss transformers computes for
the same batch and labels, so a head loaded into the wrong place, a tied decoder left
random or a tokenizer other than the checkpoint's cannot pass."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags as absl_flags

from bert_jax import checkpoint, flags, sharding
from bert_jax.data import loader, vocab
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.options import PretrainOptions
from bert_jax.training import pretraining

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.flags"
BOOKS = REPO / "bert_jax" / "corpus"
# Two held-out files: NSP and the heldout job's FULL-SENTENCES rows see the same documents.
HELD = f"{BOOKS}/heldout/carroll-alice.txt,{BOOKS}/train/chesterton-brown.txt"
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=72, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def options(workdir, *extra, flagfile=TINY):
    """Options from `flagfile` (tiny.flags; None: the run flags of tiny.flags without its
    model flags, which a run from a checkpoint takes from the checkpoint) plus `extra`."""
    fv = absl_flags.FlagValues()
    flags.define(PretrainOptions, fv)
    base = [f"--flagfile={flagfile}"] if flagfile else [
        l for l in TINY.read_text().splitlines() if l.startswith("--") and not l.startswith(MODEL_FLAGS)]
    fv([sys.argv[0], *base, f"--workdir={workdir}", "--mesh_data=1", *extra])
    os.chdir(REPO)
    return flags.read(PretrainOptions, fv)


MODEL_FLAGS = ("--variant", "--hidden_size", "--num_hidden_layers", "--num_attention_heads", "--intermediate_size",
               "--tokenizer_vocab_size")


def init_options(workdir, *extra):
    return options(workdir, *extra, flagfile=None)


def metrics(workdir) -> list[dict]:
    return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Small random transformers models with pretraining heads, saved by save_pretrained
    beside tokenizers trained on the bundled books: BertForPreTraining (MLM + NSP),
    RobertaForMaskedLM (MLM), AlbertForPreTraining (MLM + SOP)."""
    import torch
    import transformers
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for fam, kind, cls, conf, extra in (
            ("bert", "wordpiece", transformers.BertForPreTraining, transformers.BertConfig, {}),
            ("roberta", "bpe", transformers.RobertaForMaskedLM, transformers.RobertaConfig,
             dict(type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)),
            ("albert", "sentencepiece", transformers.AlbertForPreTraining, transformers.AlbertConfig,
             dict(embedding_size=24, hidden_act="gelu_new", classifier_dropout_prob=0.0))):
        folder = root / fam
        tok = vocab.train(kind, f"{BOOKS}/train/shakespeare-*.txt", 600, folder)
        torch.manual_seed(0)
        sizes = dict(SIZES, max_position_embeddings=74 if fam == "roberta" else 72)
        model = cls(conf(vocab_size=tok.vocab_size, **{**sizes, **extra, "pad_token_id": tok.pad_id}))
        model.save_pretrained(folder)
        out[fam] = folder
    return out


def hf_loss(folder, batch) -> float:
    """transformers' pretraining loss of `batch` (our pipeline's arrays): MLM labels at the
    weighted masked positions, the sentence label where the model has a sentence head."""
    import torch
    import transformers
    model = transformers.AutoModelForPreTraining.from_pretrained(folder).eval()
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    labels = torch.full(ids.shape, -100, dtype=torch.long)
    for b in range(ids.shape[0]):
        for pos, tgt, w in zip(batch["masked_positions"][b], batch["masked_ids"][b], batch["masked_weights"][b]):
            if w > 0:
                labels[b, int(pos)] = int(tgt)
    kw = dict(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long), labels=labels)
    if model.config.model_type != "roberta":
        kw["token_type_ids"] = torch.tensor(batch["token_type_ids"], dtype=torch.long)
        sent = torch.tensor(np.asarray(batch["sentence_labels"]).reshape(-1), dtype=torch.long)
        kw["next_sentence_label" if model.config.model_type == "bert" else "sentence_order_label"] = sent
    with torch.no_grad():
        return float(model(**kw).loss)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "roberta", "albert"])
def test_first_step_loss_equals_transformers(family, hf_models, tmp_path):
    """The first step's loss of `pretrain --init_checkpoint=<HF folder>` (dropout 0) is the
    loss transformers computes for the same batch and labels, heads included."""
    o = init_options(tmp_path / "wd", f"--init_checkpoint={hf_models[family]}", "--train_steps=1", "--warmup_steps=0",
                "--log_every=1", f"--max_seq_length=48", "--max_predictions_per_seq=7", "--heldout_corpus=")
    s = pretraining.run(o)
    assert s["step"] == 1
    first = metrics(tmp_path / "wd")[0]
    # the same batch, made by the run's own pipeline
    cfg = checkpoint.read_config(tmp_path / "wd")
    tok_dir = tmp_path / "wd" / "tokenizer"
    tok = Tokenizer.load(tok_dir)
    assert tok.fingerprint() == Tokenizer.load(hf_models[family]).fingerprint()
    src = pretraining.make_source(o, cfg, tok, tok_dir, o.corpus, o.seed, tmp_path / "wd" / "cache", "--corpus")
    it = loader.make_iterator(src)
    batch = next(it)
    loader.close_iterator(it)
    assert first["loss"] == pytest.approx(hf_loss(hf_models[family], batch), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("held", [HELD, f"{BOOKS}/heldout/carroll-alice.txt"], ids=["two_files", "one_document"])
def test_heldout_before_training_equals_heldout_job(hf_models, tmp_path, held):
    """The held-out evaluation that a run from --init_checkpoint logs at step 0 scores the
    checkpoint itself: on FULL-SENTENCES rows (RoBERTa, --instances=prebuilt) it equals
    the `heldout` job's figure on the Hugging Face folder; also on a one-document text,
    where the job used to take paragraphs as documents for its MLM rows too (one source
    function for both now)."""
    from bert_jax.jobs import heldout
    from bert_jax.options import HeldoutOptions
    o = init_options(tmp_path / "wd", f"--init_checkpoint={hf_models['roberta']}", "--train_steps=1",
                "--warmup_steps=0", "--instances=prebuilt", f"--heldout_corpus={held}", "--eval_batches=2",
                "--max_seq_length=48", "--max_predictions_per_seq=7")
    s = pretraining.run(o)
    step0 = metrics(tmp_path / "wd")[0]
    assert step0["step"] == 0 and step0["eval_heldout_mlm_loss"] == s["heldout_at_init"]["mlm_loss"]
    theirs = heldout.evaluate(HeldoutOptions(checkpoint=str(hf_models["roberta"]), text=held, max_seq_length=48,
                                             max_predictions_per_seq=7, batch_size=8, batches=2,
                                             sentence_splitter=o.sentence_splitter))
    assert step0["eval_heldout_mlm_loss"] == pytest.approx(theirs["mlm_loss"], rel=1e-5)
    assert step0["eval_heldout_mlm_accuracy"] == pytest.approx(theirs["mlm_accuracy"])


@pytest.mark.slow
def test_init_checkpoint_checks(hf_models, tmp_path, caplog):
    """Each bad --init_checkpoint is named before any step; a checkpoint without the heads
    of --objective starts them fresh with a warning naming them."""
    hf = hf_models["bert"]
    bad = [(["--init_checkpoint=" + str(tmp_path / "nope")], "no such folder"),
           ([f"--init_checkpoint={hf}", "--variant=roberta-base"], "--variant=roberta-base is a roberta model"),
           ([f"--init_checkpoint={hf}", "--variant=bert-base"], "--variant=bert-base has hidden_size=768"),
           ([f"--init_checkpoint={hf}", "--hidden_size=64"], "--hidden_size=64: --init_checkpoint"),
           ([f"--init_checkpoint={hf}", f"--tokenizer={hf_models['roberta']}"], "is not the tokenizer of")]
    for i, (extra, msg) in enumerate(bad):
        with pytest.raises(pretraining.PretrainError, match=msg):
            pretraining.run(init_options(tmp_path / f"bad{i}", *extra))
        assert not (tmp_path / f"bad{i}" / "checkpoints").exists()
    # the same sizes as the checkpoint's are accepted; a RoBERTa folder has no NSP head
    caplog.set_level("WARNING")
    s = pretraining.run(init_options(tmp_path / "nsp", f"--init_checkpoint={hf_models['roberta']}", "--objective=mlm_nsp",
                                "--hidden_size=32", "--train_steps=1", "--warmup_steps=0", "--heldout_corpus="))
    assert s["step"] == 1
    assert any("has no pooler, NSP head" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def classifier_folder(hf_models, tmp_path_factory):
    """A fine-tuned-style folder without an MLM head: BertForSequenceClassification."""
    import torch
    import transformers
    folder = tmp_path_factory.mktemp("cls") / "bert_cls"
    torch.manual_seed(1)
    conf = transformers.BertConfig.from_pretrained(hf_models["bert"])
    transformers.BertForSequenceClassification(conf).save_pretrained(folder)
    for f in pathlib.Path(hf_models["bert"]).iterdir():
        if not f.name.startswith(("model", "config")):
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.mark.slow
def test_classifier_folder_gets_a_fresh_mlm_head(classifier_folder, tmp_path, caplog):
    """A folder with no MLM head (a classifier) continues with the encoder loaded and the
    MLM and NSP heads fresh (warned); the encoder's weights are the folder's."""
    from bert_jax.interop import convert
    caplog.set_level("WARNING")
    s = pretraining.run(init_options(tmp_path / "wd", f"--init_checkpoint={classifier_folder}", "--train_steps=1",
                                "--warmup_steps=0", "--learning_rate=0", "--heldout_corpus="))
    assert s["step"] == 1
    assert any("has no MLM head, NSP head" in r.getMessage() for r in caplog.records)
    theirs = convert.load(classifier_folder)[2]
    _, ours, _ = checkpoint.load_params(tmp_path / "wd")
    for part in ("embeddings", "encoder", "pooler"):  # lr 0: the loaded weights, unchanged
        jax.tree.map(np.testing.assert_array_equal, ours["backbone"][part], theirs["backbone"][part])


# ------------------------------------------------------------------ phases ----
PHASE2 = ["--max_seq_length=64", "--max_predictions_per_seq=10", "--phase=2", "--train_steps=12"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "wordpiece"
    vocab.train("wordpiece", f"{BOOKS}/train/shakespeare-*.txt", 500, out)
    return out


@pytest.fixture(scope="module")
def phase1(tok_dir, tmp_path_factory):
    """Phase 1 (length 32) of a 12-step run, stopped at step 6 as phase 1's flag file does."""
    wd = tmp_path_factory.mktemp("phase1") / "wd"
    pretraining.run(options(wd, f"--tokenizer={tok_dir}", "--train_steps=12", "--stop_at_step=6", "--log_every=1",
                            "--checkpoint_every=6"))
    return wd


def _copy(src, dst):
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


@pytest.mark.slow
def test_phase2_carries_state_and_schedule(phase1, tok_dir, tmp_path):
    """Phase 2 on phase 1's workdir: its first step starts from phase 1's params and
    optimizer moments bit for bit, the learning rate follows the one schedule over all
    steps, and the manifest records both phases."""
    from bert_jax.training import optim, train
    wd = _copy(phase1, tmp_path / "wd")
    o2 = options(wd, f"--tokenizer={tok_dir}", *PHASE2, "--log_every=1", "--stop_at_step=7")
    # what phase 1 left: the state phase 2 must start from
    cfg = checkpoint.read_config(wd)
    tx = optim.make(optim.OptimConfig(learning_rate=1e-3, warmup_steps=2, train_steps=12))
    abstract, shard = train.state_shardings(cfg, tx, 32, sharding.make_mesh(1))
    ck = checkpoint.Checkpointer(wd, async_save=False)
    _, before, _, _ = ck.restore_latest(abstract, shard)
    ck.close()
    pretraining.run(o2)
    m = json.loads((wd / "manifest.json").read_text())
    assert m["phase"] == 2
    assert [(p["phase"], p["start_step"], p.get("end_step"), p["options"]["max_seq_length"])
            for p in m["phases"]] == [(1, 0, 6, 32), (2, 6, None, 64)]
    # step 7 = phase 1's state + one update at length 64: replay it from `before`
    src = pretraining.make_source(o2, cfg, Tokenizer.load(wd / "tokenizer"), wd / "tokenizer", o2.corpus,
                                  pretraining.phase_seed(o2.seed, 2), wd / "cache", "--corpus")
    it = loader.make_iterator(src)
    batch = next(it)
    loader.close_iterator(it)
    assert batch["input_ids"].shape == (8, 64)
    mesh = sharding.make_mesh(1)
    step = train.make_train_step(cfg, tx, 1, shard, lambda n: sharding.data_sharding(mesh, n),
                                 batch, mesh)
    with jax.set_mesh(mesh):
        expect, m7 = step(before, batch)
    lines = {r["step"]: r for r in metrics(wd) if "loss" in r}
    assert lines[7]["loss"] == float(m7["loss"])
    assert lines[7]["learning_rate"] == pytest.approx(float(optim.schedule(  # update 7: optax count 6
        optim.OptimConfig(learning_rate=1e-3, warmup_steps=2, train_steps=12))(6)))
    _, got, _ = checkpoint.load_params(wd, 7)
    jax.tree.map(np.testing.assert_array_equal, got, jax.device_get(expect.params))


@pytest.mark.slow
def test_phase2_resumes_exactly_after_sigkill(phase1, tok_dir, tmp_path):
    """SIGKILL in phase 2 and the same command again: the losses and params of an
    uninterrupted phase 2 (both in subprocesses, the environment of a real rerun)."""
    def cmd(wd):
        return [sys.executable, "-m", "bert_jax.jobs.pretrain", f"--flagfile={TINY}", f"--workdir={wd}",
                f"--tokenizer={tok_dir}", "--mesh_data=1", "--log_every=1", "--checkpoint_every=2", *PHASE2]
    ref, wd = _copy(phase1, tmp_path / "ref"), _copy(phase1, tmp_path / "wd")
    subprocess.run(cmd(ref), cwd=REPO, check=True, capture_output=True)
    proc = subprocess.Popen(cmd(wd), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and max([r["step"] for r in metrics(wd)], default=0) < 9:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(r["step"] for r in metrics(wd)) < 12, "the run finished before it could be killed"
    subprocess.run(cmd(wd), cwd=REPO, check=True, capture_output=True)
    losses = lambda w: {r["step"]: r["loss"] for r in metrics(w) if "loss" in r}
    assert losses(wd) == losses(ref) and sorted(losses(wd)) == list(range(1, 13))
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(wd)[1], checkpoint.load_params(ref)[1])


@pytest.mark.slow
def test_phase_boundary_refuses_other_changes(phase1, tok_dir, tmp_path):
    """At the boundary only phase options change; a plain resume still refuses a phase
    option; --phase=2 on an empty workdir, or going back to phase 1, is refused."""
    wd = _copy(phase1, tmp_path / "wd")
    cases = [([*PHASE2, "--hidden_size=48"], "another architecture \\(hidden_size: checkpoint 32 vs flags 48"),
             ([*PHASE2, f"--tokenizer={tmp_path / 'other'}"], "--tokenizer"),
             (["--max_seq_length=64", "--train_steps=12"], "holds a run with other options.*--max_seq_length")]
    vocab.train("wordpiece", f"{BOOKS}/train/shakespeare-caesar.txt", 400, tmp_path / "other")
    for extra, msg in cases:
        tok = [] if any(a.startswith("--tokenizer") for a in extra) else [f"--tokenizer={tok_dir}"]
        with pytest.raises((pretraining.PretrainError, checkpoint.CheckpointError), match=msg):
            pretraining.run(options(wd, *tok, *extra))
    with pytest.raises(pretraining.PretrainError, match="holds no checkpoint"):
        pretraining.run(options(tmp_path / "empty", f"--tokenizer={tok_dir}", *PHASE2))
    pretraining.run(options(wd, f"--tokenizer={tok_dir}", *PHASE2, "--stop_at_step=7"))
    with pytest.raises(pretraining.PretrainError, match="--phase=1: .* is in phase 2"):
        pretraining.run(options(wd, f"--tokenizer={tok_dir}", "--train_steps=12"))


def test_restart_schedule_starts_at_the_phase():
    """--phase_schedule=restart: the phase's own warmup and peak from its first step."""
    from bert_jax.training import optim
    c = optim.OptimConfig(learning_rate=4e-3, warmup_steps=10, train_steps=110, schedule_start=10)
    lr = optim.schedule(c)
    whole = optim.schedule(optim.OptimConfig(learning_rate=4e-3, warmup_steps=10, train_steps=100))
    for step in (10, 15, 20, 60, 110):
        assert float(lr(step)) == pytest.approx(float(whole(step - 10)))
    assert float(lr(10)) == 0.0 and float(lr(20)) == pytest.approx(4e-3)


@pytest.mark.parametrize("foreign", [["config.json"], ["flags.txt", "metrics.jsonl"], ["manifest.json"]])
def test_a_folder_of_someone_else_is_refused_before_anything_is_written(foreign, tmp_path):
    """A --workdir holding other files gave a TypeError after writing tokenizer/ (someone's
    config.json), or had its flags.txt overwritten and metrics.jsonl appended to."""
    wd = tmp_path / "theirs"
    wd.mkdir()
    for name in foreign:
        (wd / name).write_text('{"architectures": ["Theirs"]}\n')
    before = {p.name: p.read_bytes() for p in wd.iterdir()}
    with pytest.raises(pretraining.PretrainError, match="holds no pretraining run of bert_jax.*" + foreign[0]):
        pretraining.run(options(wd))
    assert {p.name: p.read_bytes() for p in wd.iterdir()} == before


def test_a_resumed_run_refuses_a_changed_corpus(tok_dir, tmp_path):
    """Another book under the same path, or a same-size edit (mtime not restored), or a
    file gone from the glob: a resumed run used to build a new cache and train on the new
    text with exit 0. Each is named before anything is prepared; a file only touched (same
    bytes, new mtime) resumes; a new --phase may change the corpus."""
    books = tmp_path / "books"
    books.mkdir()
    for name in ("shakespeare-macbeth.txt", "shakespeare-caesar.txt"):
        (books / name).write_bytes((BOOKS / "train" / name).read_bytes())
    run = lambda *extra: pretraining.run(options(tmp_path / "wd", f"--tokenizer={tok_dir}",
                                                 f"--corpus={books}/*.txt", "--train_steps=12", *extra))
    run("--stop_at_step=4")
    macbeth = books / "shakespeare-macbeth.txt"
    good = macbeth.read_bytes()
    macbeth.write_bytes((BOOKS / "train" / "chesterton-brown.txt").read_bytes())
    with pytest.raises(pretraining.PretrainError, match=r"not the text its run started with: .*macbeth.txt changed"):
        run("--stop_at_step=6")
    macbeth.write_bytes(good.replace(b"Macbeth", b"Macduff"))  # the same size
    with pytest.raises(pretraining.PretrainError, match=r"macbeth.txt changed \(\d+ -> \d+ bytes"):
        run("--stop_at_step=6")
    macbeth.write_bytes(good)  # the same bytes, a new mtime: the same run
    assert run("--stop_at_step=6")["step"] == 6
    (books / "extra.txt").write_text("More text.\n")
    with pytest.raises(pretraining.PretrainError, match="extra.txt was added"):
        run("--stop_at_step=8")
    assert run("--stop_at_step=8", "--phase=2")["step"] == 8  # a new phase may read new text
