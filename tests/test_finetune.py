"""Fine-tuning end to end: a tiny model overfits 64 real training examples of each task
type (classification, sentence pairs, regression, NER, extractive QA); checkpoint
mismatches are named."""

import json

import jax
import pytest
from flax import linen as nn

from bert_jax.interop import convert
from bert_jax.model.config import ModelConfig
from bert_jax.model.heads import init_params
from bert_jax.training.finetuning import FinetuneError, FinetuneOptions, Finetuner


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
@pytest.mark.usefixtures("optimized_xla")
def test_overfits_sentence_classification(shared_data, tiny_checkpoint, tmp_path):
    train = head(shared_data / "classification/sst2/train.tsv", 64, tmp_path, "sst2.tsv")
    s = run(tiny_checkpoint, tmp_path, "classification", train)
    assert s["eval"]["train"]["accuracy"] >= 0.98, s
    assert (tmp_path / "wd/eval/train.json").exists()
    assert (tmp_path / "wd/eval/train.predictions.tsv").read_text().count("\n") == 65
    cfg, task, _, tok = convert.load(tmp_path / "wd/best")  # the best checkpoint is a real folder
    assert task == "sequence_classification" and cfg.num_labels == 2 and tok is not None


@pytest.mark.slow
@pytest.mark.usefixtures("optimized_xla")
def test_overfits_sentence_pairs(shared_data, tiny_checkpoint, tmp_path):
    train = head(shared_data / "pair/rte/train.tsv", 64, tmp_path, "rte.tsv")
    s = run(tiny_checkpoint, tmp_path, "classification", train, text_column="sentence1",
            pair_column="sentence2", max_seq_length=128)
    assert s["eval"]["train"]["accuracy"] >= 0.98, s


@pytest.mark.slow
@pytest.mark.usefixtures("optimized_xla")
def test_overfits_regression(shared_data, tiny_checkpoint, tmp_path):
    train = head(shared_data / "pair/stsb/train.tsv", 64, tmp_path, "stsb.tsv")
    s = run(tiny_checkpoint, tmp_path, "regression", train, text_column="sentence1",
            pair_column="sentence2", label_column="score", epochs=80)
    assert s["eval"]["train"]["pearson"] >= 0.95, s


@pytest.mark.slow
@pytest.mark.usefixtures("optimized_xla")
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
@pytest.mark.usefixtures("optimized_xla")
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


def test_from_scratch_takes_the_architecture_and_tokenizer_but_no_weights(shared_data, tiny_checkpoint, tmp_path):
    """The no-pretraining baseline of a downstream study: --from_scratch keeps the checkpoint's
    config and tokenizer and starts every backbone param from the seeded init, the same init
    the task params get; without it every backbone param is the checkpoint's."""
    _, _, src, _ = convert.load(tiny_checkpoint)
    train = head(shared_data / "classification/sst2/train.tsv", 8, tmp_path, "s.tsv")
    make = lambda scratch, seed: Finetuner(FinetuneOptions(
        task="classification", init_checkpoint=str(tiny_checkpoint), train_file=str(train),
        workdir=str(tmp_path / "wd"), from_scratch=scratch, seed=seed))
    leaves = lambda tree: jax.tree.leaves(tree)
    loaded, scratch, scratch_again, other = make(False, 1), make(True, 1), make(True, 2), make(True, 1)
    fresh = nn.unbox(init_params(scratch.cfg, scratch.mtask, jax.random.key(1)))
    assert all((a == b).all() for a, b in zip(leaves(loaded.params["backbone"]), leaves(src["backbone"])))
    assert all((a == b).all() for a, b in zip(leaves(scratch.params), leaves(fresh)))
    assert not any((a == b).all() for a, b in zip(leaves(scratch.params["backbone"]), leaves(src["backbone"]))
                   if b.std() > 0)   # every random param is new (biases and LayerNorms start constant)
    word = lambda f: f.params["backbone"]["embeddings"]["word_embeddings"]
    assert not (word(scratch_again) == word(scratch)).any()   # the seed is used
    assert all((a == b).all() for a, b in zip(leaves(other.params), leaves(scratch.params)))
    assert scratch.cfg == loaded.cfg and scratch.tok_dir == loaded.tok_dir
    # A loaded run initialises only what the checkpoint lacks (the head): bit for bit the
    # full init's head, the one --from_scratch gets
    head_of = lambda p: {k: v for k, v in p.items() if k != "backbone"}
    assert head_of(loaded.params) and jax.tree.all(jax.tree.map(
        lambda a, b: a.dtype == b.dtype and (a == b).all(), head_of(loaded.params), head_of(fresh)))


def test_unknown_best_metric_is_named(tiny_checkpoint, tmp_path):
    with pytest.raises(FinetuneError, match=r"--best_metric='pearson': classification reports"):
        Finetuner(FinetuneOptions(task="classification", init_checkpoint=str(tiny_checkpoint),
                                  train_file="unused.tsv", workdir=str(tmp_path), best_metric="pearson"))


def test_best_selection_counts_the_first_eval_and_never_prefers_nan():
    from bert_jax.training.runlog import Best
    improves = lambda score, best: Best("accuracy", best).improves(score)
    nan = float("nan")
    assert improves(nan, None) and improves(0.1, None)   # the first evaluation always saves
    assert improves(0.2, nan) and not improves(nan, 0.2)  # constant predictions: Pearson NaN
    assert improves(0.3, 0.2) and not improves(0.2, 0.2) and not improves(nan, nan)
    assert Best("mlm_loss", 2.0).improves(1.5) and not Best("mlm_loss", 2.0).improves(2.5)  # losses: lower


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
    from bert_jax import checkpoint
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
