"""Fine-tuning end to end: a tiny model overfits 64 real training examples of each task
type (classification, sentence pairs, regression, NER, extractive QA); checkpoint
mismatches are named."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import linen as nn

from bert_jax.interop import convert
from bert_jax.model.config import ModelConfig
from bert_jax.model.heads import init_params
from bert_jax.training.finetuning import FinetuneError, FinetuneOptions, Finetuner


@pytest.fixture(scope="module")
def tiny_checkpoint(shared_data, tmp_path_factory):
    """A randomly initialised tiny BERT with the real uncased vocabulary."""
    cfg = ModelConfig(family="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=37, max_position_embeddings=200)
    params = nn.unbox(init_params(cfg, "base", jax.random.key(0)))
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    convert.save_ours(out, cfg, "base", jax.device_get(params), shared_data / "vocab/bert-base-uncased")
    return out


def head(path, n, tmp_path, name):
    """The header and first n rows of a TSV file."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    out = tmp_path / name
    out.write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return out


def run(ckpt, tmp_path, task, train, **kw):
    o = FinetuneOptions(task=task, init_checkpoint=str(ckpt), train_file=str(train),
                        workdir=str(tmp_path / "wd"), eval_files=(("train", str(train)),),
                        batch_size=16, learning_rate=3e-3, epochs=kw.pop("epochs", 40),
                        warmup_proportion=0.05, dropout=0.0, max_seq_length=kw.pop("max_seq_length", 64),
                        mesh_data=kw.pop("mesh_data", 1), progress_bar=False, **kw)
    return Finetuner(o).run()


@pytest.mark.slow
def test_overfits_sentence_classification(shared_data, tiny_checkpoint, tmp_path):
    train = head(shared_data / "classification/sst2/train.tsv", 64, tmp_path, "sst2.tsv")
    s = run(tiny_checkpoint, tmp_path, "classification", train)
    assert s["eval"]["train"]["accuracy"] >= 0.98, s
    assert (tmp_path / "wd/eval/train.json").exists()
    assert (tmp_path / "wd/eval/train.predictions.tsv").read_text().count("\n") == 65
    cfg, task, _, tok = convert.load(tmp_path / "wd/best")  # the best checkpoint is a real folder
    assert task == "sequence_classification" and cfg.num_labels == 2 and tok is not None


@pytest.mark.slow
def test_overfits_sentence_pairs(shared_data, tiny_checkpoint, tmp_path):
    train = head(shared_data / "pair/rte/train.tsv", 64, tmp_path, "rte.tsv")
    s = run(tiny_checkpoint, tmp_path, "classification", train, text_column="sentence1",
            pair_column="sentence2", max_seq_length=128)
    assert s["eval"]["train"]["accuracy"] >= 0.98, s


@pytest.mark.slow
def test_overfits_regression(shared_data, tiny_checkpoint, tmp_path):
    train = head(shared_data / "pair/stsb/train.tsv", 64, tmp_path, "stsb.tsv")
    s = run(tiny_checkpoint, tmp_path, "regression", train, text_column="sentence1",
            pair_column="sentence2", label_column="score", epochs=80)
    assert s["eval"]["train"]["pearson"] >= 0.95, s


@pytest.mark.slow
def test_overfits_ner_with_bioes(shared_data, tiny_checkpoint, tmp_path):
    lines = (shared_data / "ner/conll2003/train.txt").read_text().splitlines()
    out, n = [], 0
    for line in lines:
        out.append(line)
        if not line.strip() and len(out) > 2 and not out[-2].startswith("-DOCSTART-"):
            n += 1
            if n == 64:
                break
    train = tmp_path / "conll.txt"
    train.write_text("\n".join(out) + "\n")
    s = run(tiny_checkpoint, tmp_path, "ner", train, output_scheme="BIOES", epochs=60)
    assert s["eval"]["train"]["f1"] >= 0.95, s
    pred = (tmp_path / "wd/eval/train.predictions.conll").read_text()
    assert pred.splitlines()[0].count(" ") == 2  # word gold predicted


@pytest.mark.slow
def test_overfits_extractive_qa(shared_data, tiny_checkpoint, tmp_path):
    data = json.loads((shared_data / "qa/squad_v1.1_dev_rebuilt_minus_xquad.json").read_text())
    para = data["data"][0]["paragraphs"][:12]
    qs = 0
    kept = []
    for p in para:
        p = dict(p, qas=p["qas"][: max(0, 64 - qs)])
        qs += len(p["qas"])
        kept.append(p)
    train = tmp_path / "squad.json"
    train.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": kept}]}))
    s = run(tiny_checkpoint, tmp_path, "qa", train, max_seq_length=160, doc_stride=96, epochs=120)
    assert s["eval"]["train"]["f1"] >= 90.0, s
    preds = json.loads((tmp_path / "wd/eval/train.predictions.json").read_text())
    assert len(preds) == qs


def test_checkpoint_mismatch_names_the_param(shared_data, tiny_checkpoint, tmp_path):
    cfg, task, params, _ = convert.load(tiny_checkpoint)
    params["backbone"]["encoder"]["layer"]["ffn"]["intermediate"]["kernel"] = \
        params["backbone"]["encoder"]["layer"]["ffn"]["intermediate"]["kernel"][..., :30]
    bad = tmp_path / "bad"
    convert.save_ours(bad, cfg, task, params, shared_data / "vocab/bert-base-uncased")
    train = head(shared_data / "classification/sst2/train.tsv", 8, tmp_path, "s.tsv")
    with pytest.raises(FinetuneError, match="ffn/intermediate/kernel: shape"):
        Finetuner(FinetuneOptions(task="classification", init_checkpoint=str(bad), train_file=str(train),
                                  workdir=str(tmp_path / "wd")))


def test_unknown_best_metric_is_named(tiny_checkpoint, tmp_path):
    with pytest.raises(FinetuneError, match=r"--best_metric='pearson': classification reports"):
        Finetuner(FinetuneOptions(task="classification", init_checkpoint=str(tiny_checkpoint),
                                  train_file="unused.tsv", workdir=str(tmp_path), best_metric="pearson"))


def test_best_selection_counts_the_first_eval_and_never_prefers_nan():
    from bert_jax.training.finetuning import improves
    nan = float("nan")
    assert improves(nan, None) and improves(0.1, None)   # the first evaluation always saves
    assert improves(0.2, nan) and not improves(nan, 0.2)  # constant predictions: Pearson NaN
    assert improves(0.3, 0.2) and not improves(0.2, 0.2) and not improves(nan, nan)


def test_export_keeps_label_names_and_report_reads_every_run(shared_data, tiny_checkpoint, tmp_path):
    """A fine-tuned classifier and tagger exported to Hugging Face: config.json carries
    id2label/label2id, and transformers' pipelines print the real names (NER: the tags of
    the scheme the model was trained in). `report` then tabulates the fine-tuning runs."""
    import subprocess
    import sys
    import transformers
    rows = (shared_data / "classification/sst2/train.tsv").read_text(encoding="utf-8").splitlines()[1:33]
    named = tmp_path / "named.tsv"
    named.write_text("sentence\tlabel\n" + "".join(
        f"{r.split(chr(9))[0]}\t{'positive' if r.split(chr(9))[1] == '1' else 'negative'}\n" for r in rows))
    run(tiny_checkpoint, tmp_path / "cls", "classification", named, epochs=1)
    conll = (shared_data / "ner/conll2003/train.txt").read_text().split("\n\n")[1:17]
    ner_file = tmp_path / "ner.txt"
    ner_file.write_text("\n\n".join(conll) + "\n")
    run(tiny_checkpoint, tmp_path / "ner", "ner", ner_file, epochs=1)

    convert.export(tmp_path / "cls/wd/best", tmp_path / "hf_cls")
    cfg = json.loads((tmp_path / "hf_cls/config.json").read_text())
    assert cfg["id2label"] == {"0": "negative", "1": "positive"}
    assert cfg["label2id"] == {"negative": 0, "positive": 1}
    clf = transformers.pipeline("text-classification", model=str(tmp_path / "hf_cls"), device="cpu")
    assert clf("a gorgeous, witty film")[0]["label"] in {"negative", "positive"}

    convert.export(tmp_path / "ner/wd/best", tmp_path / "hf_ner")
    tags = json.loads((tmp_path / "ner/wd/best/labels.json").read_text())
    assert "S-PER" in tags and "B-LOC" in tags  # BIOES, the default output scheme
    cfg = json.loads((tmp_path / "hf_ner/config.json").read_text())
    assert [cfg["id2label"][str(i)] for i in range(len(tags))] == tags
    tagger = transformers.pipeline("token-classification", model=str(tmp_path / "hf_ner"), device="cpu",
                                   ignore_labels=[])
    out = tagger("EU rejects German call to boycott British lamb .")
    assert out and all(t["entity"] in tags for t in out)

    res = subprocess.run([sys.executable, "-m", "bert_jax.jobs.report", f"--runs={tmp_path}",
                          f"--out={tmp_path / 'report'}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    table = (tmp_path / "report/report.md").read_text()
    assert table.count("| wd | finetune |") == 2 and "train_accuracy" in table and "train_f1" in table
    assert (tmp_path / "report/report.csv").read_text().count("finetune") == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", ["roberta", "albert"])
def test_roberta_and_albert_fine_tune_end_to_end(family, shared_data, tmp_path):
    """The other two families fine-tune with their own tokenizers (GPT-2's BPE in
    RoBERTa's layout; a SentencePiece model from the vocab job) and heads (RoBERTa's
    classification head, ALBERT's shared layers): they overfit 48 real SST-2 rows."""
    import pathlib
    from bert_jax.data import vocab
    from bert_jax.data.tokenizer import Tokenizer
    repo = pathlib.Path(__file__).resolve().parents[1]
    if family == "roberta":
        tok_dir = shared_data / "vocab/gpt2-bpe"
    else:
        tok_dir = tmp_path / "spiece"
        vocab.train("sentencepiece", f"{repo}/bert_jax/corpus/train/*.txt", 2000, tok_dir)
    tok = Tokenizer.load(tok_dir)
    extra = dict(type_vocab_size=1, layer_norm_eps=1e-5) if family == "roberta" else dict(embedding_size=24)
    cfg = ModelConfig(family=family, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, hidden_size=32,
                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                      max_position_embeddings=80, **extra)
    ckpt = tmp_path / "ckpt"
    convert.save_ours(ckpt, cfg, "base", jax.device_get(nn.unbox(init_params(cfg, "base", jax.random.key(0)))),
                      tok_dir)
    train = head(shared_data / "classification/sst2/train.tsv", 48, tmp_path, "sst2.tsv")
    s = run(ckpt, tmp_path, "classification", train, epochs=30)
    assert s["eval"]["train"]["accuracy"] >= 0.95, s
    best_cfg, task, _, _ = convert.load(tmp_path / "wd/best")
    assert best_cfg.family == family and task == "sequence_classification"


def test_one_run_per_workdir(shared_data, tiny_checkpoint, tmp_path):
    """A workdir in use is refused naming its holder; a workdir of another run (other
    options) is refused naming the options; the same run again returns its results, and
    an unfinished one resumes from its checkpoint without repeating lines of metrics.jsonl."""
    from bert_jax.training import checkpoint
    train = head(shared_data / "classification/sst2/train.tsv", 16, tmp_path, "sst2.tsv")
    s = run(tiny_checkpoint, tmp_path, "classification", train, epochs=1)
    wd = tmp_path / "wd"
    manifest = json.loads((wd / "manifest.json").read_text())  # the run record, as pretraining's
    assert {"options", "git_revision", "packages", "model_config", "data"} <= set(manifest)
    assert list(manifest["data"]) == [str(train)] and len(manifest["data"][str(train)]) == 64
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
    with checkpoint.WorkdirLock(wd, "finetune"):
        with pytest.raises(checkpoint.CheckpointError, match=r"in use by finetune \(pid \d+ on "):
            run(tiny_checkpoint, tmp_path, "classification", train, epochs=1)
    with pytest.raises(FinetuneError, match="holds another fine-tuning run .*--learning_rate: 0.003 there, 0.001 now"):
        Finetuner(FinetuneOptions(task="classification", init_checkpoint=str(tiny_checkpoint), train_file=str(train),
                                  workdir=str(wd), eval_files=(("train", str(train)),), batch_size=16,
                                  learning_rate=1e-3, epochs=1, warmup_proportion=0.05, dropout=0.0,
                                  max_seq_length=64)).run()
    lines = (wd / "metrics.jsonl").read_text()
    assert run(tiny_checkpoint, tmp_path, "classification", train, epochs=1) == s
    (wd / "results.json").unlink()  # as if killed before the end
    assert run(tiny_checkpoint, tmp_path, "classification", train, epochs=1)["eval"] == s["eval"]
    assert (wd / "metrics.jsonl").read_text() == lines



def test_missing_inputs_and_unusable_training_data_are_named(shared_data, tiny_checkpoint, tmp_path):
    train = head(shared_data / "classification/sst2/train.tsv", 8, tmp_path, "s.tsv")
    opts = dict(task="classification", init_checkpoint=str(tiny_checkpoint), train_file=str(train),
                workdir=str(tmp_path / "wd"))
    with pytest.raises(FinetuneError, match=r"--init_checkpoint=.*/nowhere: no such folder"):
        Finetuner(FinetuneOptions(**dict(opts, init_checkpoint=str(tmp_path / "nowhere"))))
    with pytest.raises(FinetuneError, match=r"--eval_files=dev=.*/missing.tsv: no such file"):
        Finetuner(FinetuneOptions(**opts, eval_files=(("dev", str(tmp_path / "missing.tsv")),)))
    # SQuAD whose every answer is not at its answer_start: all skipped -> named, not a crash
    data = json.loads((shared_data / "qa/squad_v1.1_dev_rebuilt_minus_xquad.json").read_text())
    para = dict(data["data"][0]["paragraphs"][0])
    para["qas"] = [dict(q, answers=[dict(a, answer_start=a["answer_start"] + 1) for a in q["answers"]])
                   for q in para["qas"][:5]]
    bad = tmp_path / "bad_squad.json"
    bad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [para]}]}))
    with pytest.raises(FinetuneError, match=r"--train_file=.*bad_squad.json: no usable training example"):
        Finetuner(FinetuneOptions(**dict(opts, task="qa", train_file=str(bad))))
    assert not (tmp_path / "wd").exists()


# ------------------------------------------------------------ resume and mesh ----
def _resume_options(ckpt, train, wd, **kw):
    return FinetuneOptions(task="classification", init_checkpoint=str(ckpt), train_file=str(train),
                           workdir=str(wd), batch_size=16, learning_rate=1e-3, epochs=2,
                           warmup_proportion=0.25, dropout=0.1, max_seq_length=48, progress_bar=False,
                           **{"mesh_data": 1, **kw})


def _losses(wd):
    return {r["step"]: r["loss"] for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())}


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
            "--noprogress_bar", "--mesh_data=1", *extra]


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


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_finetune_in_two_processes_equals_one(shared_data, tiny_checkpoint, tmp_path):
    """Two processes joined by jax.distributed (one CPU device each) fine-tune like one
    process with two devices: same losses, same params, files written once."""
    train = head(shared_data / "classification/sst2/train.tsv", 64, tmp_path, "train.tsv")
    extra = [f"--eval_files=train={train}", "--select_on=train", "--mesh_data=-1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    port = _free_port()
    procs = [subprocess.Popen(_finetune_cmd(tiny_checkpoint, train, tmp_path / "multi", *extra,
                                            f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                            f"--process_id={i}"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    why = lambda out: "\n".join(l for l in out.splitlines() if "rror" in l or "Fatal" in l or "F1" in l[:3])
    assert all(p.returncode == 0 for p in procs), why(outs[0])[-3000:] + "\n---\n" + why(outs[1])[-3000:]
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
    train, ref = straight
    Finetuner(_resume_options(tiny_checkpoint, train, tmp_path / "wd", unlogged_transfers="disallow",
                              checkpoint_every=0)).run()
    assert _losses(tmp_path / "wd") == _losses(ref)
    from bert_jax.training import train as train_lib
    real = train_lib.wait_previous
    monkeypatch.setattr(train_lib, "wait_previous", lambda prev, cur: (float(cur), real(prev, cur))[1])
    with pytest.raises(Exception, match="[Dd]isallowed device-to-host transfer"):
        Finetuner(_resume_options(tiny_checkpoint, train, tmp_path / "leak", unlogged_transfers="disallow",
                                  checkpoint_every=0)).run()
