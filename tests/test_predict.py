"""The predict job: on unlabeled copies of labeled files it gives exactly the predictions
the evaluation wrote for them (SST-2 dev, CoNLL-2003 valid, SQuAD); bad input is named
and nothing is written. Also the fine-tuning inputs a new user met: eval labels checked
before training, Latin-1 files, headerless files, the selection set."""

import csv
import json
import pathlib
import subprocess
import sys

import pytest

from bert_jax.jobs.predict import PredictError, PredictOptions, predict
from bert_jax.training.finetuning import FinetuneError, FinetuneOptions, Finetuner

REPO = pathlib.Path(__file__).resolve().parents[1]


def finetune(ckpt, wd, task, train, evals, **kw):
    o = FinetuneOptions(task=task, init_checkpoint=str(ckpt), train_file=str(train), workdir=str(wd),
                        eval_files=tuple((k, str(v)) for k, v in evals.items()), select_on=next(iter(evals)), batch_size=16,
                        learning_rate=3e-3, epochs=kw.pop("epochs", 2), warmup_proportion=0.1,
                        progress_bar=False, mesh_data=1, **kw)
    return Finetuner(o).run()


def tsv_head(path, n, out):
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    out.write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return out


def conll_head(path, n, out):
    lines, kept, sents = path.read_text().splitlines(), [], 0
    for line in lines:
        kept.append(line)
        if not line.strip() and len(kept) > 1 and not kept[-2].startswith("-DOCSTART-"):
            sents += 1
            if sents == n:
                break
    out.write_text("\n".join(kept) + "\n")
    return out


def squad_head(path, n_paragraphs, out):
    d = json.loads(path.read_text())
    d["data"] = [dict(d["data"][0], paragraphs=d["data"][0]["paragraphs"][:n_paragraphs])]
    out.write_text(json.dumps(d))
    return out


def read_tsv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_predict_equals_evaluation_on_sst2_dev(shared_data, tiny_checkpoint, tmp_path):
    train = tsv_head(shared_data / "classification/sst2/train.tsv", 64, tmp_path / "train.tsv")
    dev = tsv_head(shared_data / "classification/sst2/dev.tsv", 120, tmp_path / "dev.tsv")
    finetune(tiny_checkpoint, tmp_path / "wd", "classification", train, {"dev": dev})
    unlabeled = tmp_path / "dev_sentences.tsv"
    unlabeled.write_text("sentence\n" + "".join(r["sentence"] + "\n" for r in read_tsv(dev)))
    summary = predict(PredictOptions(str(tmp_path / "wd/best"), str(unlabeled), str(tmp_path / "out.tsv"),
                                     batch_size=7))
    assert summary["rows"] == 120
    evaluated, predicted = read_tsv(tmp_path / "wd/eval/dev.predictions.tsv"), read_tsv(tmp_path / "out.tsv")
    assert list(evaluated[0]) == ["id", "sentence", "gold", "prediction", "p_0", "p_1"]
    assert list(predicted[0]) == ["id", "sentence", "prediction", "p_0", "p_1"]
    gold = [r["label"] for r in read_tsv(dev)]
    assert [r["gold"] for r in evaluated] == gold
    for e, p in zip(evaluated, predicted):
        assert (e["sentence"], e["prediction"], e["p_0"], e["p_1"]) == (p["sentence"], p["prediction"], p["p_0"], p["p_1"])
    assert abs(float(predicted[0]["p_0"]) + float(predicted[0]["p_1"]) - 1) < 1e-5


def test_predict_equals_evaluation_on_conll_valid_words(shared_data, tiny_checkpoint, tmp_path):
    train = conll_head(shared_data / "ner/conll2003/train.txt", 48, tmp_path / "train.txt")
    valid = conll_head(shared_data / "ner/conll2003/valid.txt", 40, tmp_path / "valid.txt")
    finetune(tiny_checkpoint, tmp_path / "wd", "ner", train, {"valid": valid}, max_seq_length=64)
    words = tmp_path / "words.txt"
    lines = [l.split()[0] if l.strip() and not l.startswith("-DOCSTART-") else l.strip()
             for l in valid.read_text().splitlines()]
    lines = ["-DOCSTART-", "", ""] + lines  # as CoNLL files open; and an empty sentence
    words.write_text("\n".join(lines) + "\n")
    predict(PredictOptions(str(tmp_path / "wd/best"), str(words), str(tmp_path / "out.conll")))
    evaluated = [l.split() for l in (tmp_path / "wd/eval/valid.predictions.conll").read_text().splitlines() if l]
    out = (tmp_path / "out.conll").read_text().splitlines()
    # line for line with the input: blank and -DOCSTART- lines kept (they were dropped)
    assert len(out) == len(lines) and out[:3] == lines[:3]
    word = lambda l: l and not l.startswith("-DOCSTART-")
    assert [o.split()[0] for o, i in zip(out, lines) if word(i)] == [i for i in lines if word(i)]
    assert [o for o, i in zip(out, lines) if not word(i)] == [i for i in lines if not word(i)]
    predicted = [l.split() for l in out if word(l)]
    assert len(evaluated) == len(predicted) > 300
    assert [(w, p) for w, _, p in evaluated] == [tuple(x) for x in predicted]


def test_predict_equals_evaluation_on_squad_questions(shared_data, tiny_checkpoint, tmp_path):
    data = squad_head(shared_data / "qa/squad_v1.1_dev_rebuilt_minus_xquad.json", 4, tmp_path / "squad.json")
    finetune(tiny_checkpoint, tmp_path / "wd", "qa", data, {"dev": data}, max_seq_length=96,
             doc_stride=48, max_query_length=24, epochs=1)
    d = json.loads(data.read_text())
    for para in d["data"][0]["paragraphs"]:
        para["qas"] = [{"id": q["id"], "question": q["question"]} for q in para["qas"]]
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(d))
    predict(PredictOptions(str(tmp_path / "wd/best"), str(questions), str(tmp_path / "answers.json")))
    ours = json.loads((tmp_path / "answers.json").read_text())
    assert ours == json.loads((tmp_path / "wd/eval/dev.predictions.json").read_text())
    assert len(ours) == sum(len(p["qas"]) for p in d["data"][0]["paragraphs"])


def test_predict_bad_input_is_named_and_writes_nothing(shared_data, tiny_checkpoint, tmp_path):
    train = tsv_head(shared_data / "classification/sst2/train.tsv", 16, tmp_path / "train.tsv")
    finetune(tiny_checkpoint, tmp_path / "cls", "classification", train, {"train": train}, epochs=1)
    out = tmp_path / "out.tsv"
    run = lambda ckpt, inp: predict(PredictOptions(str(ckpt), str(inp), str(out)))
    with pytest.raises(PredictError, match="no finetune.json, so no trained task head"):
        run(tiny_checkpoint, train)
    conll = shared_data / "ner/conll2003/valid.txt"
    with pytest.raises(PredictError, match=r"valid.txt:3: no column 'sentence'"):
        run(tmp_path / "cls/best", conll)
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(PredictError, match="empty.tsv: empty file"):
        run(tmp_path / "cls/best", empty)
    (tmp_path / "header_only.tsv").write_text("sentence\n")
    with pytest.raises(PredictError, match="header_only.tsv: no examples"):
        run(tmp_path / "cls/best", tmp_path / "header_only.tsv")
    # A tagger given rows of text, not one word per line.
    ner_train = conll_head(conll, 8, tmp_path / "ner.txt")
    finetune(tiny_checkpoint, tmp_path / "ner", "ner", ner_train, {"train": ner_train}, epochs=1,
             max_seq_length=64)
    with pytest.raises(PredictError, match=r"train.tsv:2: expected one word per line"):
        run(tmp_path / "ner/best", train)
    assert not out.exists() and not list(tmp_path.glob(".out.tsv.*"))


def test_predict_command_line(shared_data, tiny_checkpoint, tmp_path):
    train = tsv_head(shared_data / "classification/sst2/train.tsv", 16, tmp_path / "train.tsv")
    finetune(tiny_checkpoint, tmp_path / "wd", "classification", train, {"train": train}, epochs=1)
    outputs = []
    for out in ("p.tsv", "again.tsv"):  # the second run loads its compiled programs from --compilation_cache
        r = subprocess.run([sys.executable, "-m", "bert_jax.jobs.predict", f"--checkpoint={tmp_path}/wd/best",
                            f"--input={train}", f"--output={tmp_path}/{out}", f"--compilation_cache={tmp_path}/cc"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "predict: 16 classification inputs" in r.stdout
        assert "orbax" not in r.stderr  # library INFO logs are quiet by default
        outputs.append((tmp_path / out).read_bytes())
        assert list((tmp_path / "cc").glob("jit_*")), "nothing in the compilation cache"
    assert len(read_tsv(tmp_path / "p.tsv")) == 16 and outputs[0] == outputs[1]
    h = subprocess.run([sys.executable, "-m", "bert_jax.jobs.finetune", "--help"], capture_output=True, text=True)
    assert "--select_on" in h.stdout and "--encoding" in h.stdout and "--train_file" in h.stdout


def test_eval_labels_are_checked_before_training(shared_data, tiny_checkpoint, tmp_path):
    """An eval label the training subsample lacks fails before the first step, naming the
    file and line; nothing is trained or written."""
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\na fine film\tpos\na dull film\tneg\n")
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\nfine\tpos\nso so\tmixed\n")
    with pytest.raises(Exception, match=r"dev.tsv:3: unknown label 'mixed'"):
        finetune(tiny_checkpoint, tmp_path / "wd", "classification", train, {"dev": dev})
    assert not (tmp_path / "wd").exists()


def test_latin1_and_headerless_inputs(shared_data, tiny_checkpoint, tmp_path):
    """A Latin-1 file read as UTF-8 names file, line and --encoding; with --encoding it
    reads. A headerless file takes its columns by number."""
    from bert_jax.tasks.readers import TaskDataError, read_text_examples
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("sentence\tlabel\nnice\t1\ncaf\u00e9 cr\u00e8me\t0\n".encode("latin-1"))
    with pytest.raises(TaskDataError, match=r"latin.tsv:3: byte 0xe9 at column 4 is not utf-8 text.*--encoding"):
        read_text_examples(latin, "sentence", "label")
    assert read_text_examples(latin, "sentence", "label", encoding="latin-1")[1].text == "caf\u00e9 cr\u00e8me"
    bare = tmp_path / "bare.tsv"
    bare.write_text("7\tgood movie\tpos\n8\tbad one\tneg\n")
    ex = read_text_examples(bare, "1", "2", header=False)
    assert [(e.text, e.label, e.where.split(":")[-1]) for e in ex] == [("good movie", "pos", "1"), ("bad one", "neg", "2")]
    with pytest.raises(TaskDataError, match=r"bare.tsv:1: no column 5 \(the row has 3 columns"):
        read_text_examples(bare, "5", "2", header=False)


def test_selection_set_is_explicit_and_a_test_set_is_warned_about(tmp_path, caplog):
    from bert_jax.training.finetuning import selection_set
    base = dict(task="classification", init_checkpoint="x", train_file="t", workdir="w")
    files = (("test", "data/test.tsv"), ("dev", "data/dev.tsv"))
    assert selection_set(FinetuneOptions(**base, eval_files=files, select_on="dev")) == "dev"
    assert not [r for r in caplog.records if "test set" in r.getMessage()]
    assert selection_set(FinetuneOptions(**base, eval_files=files)) == "test"
    assert any("looks like a test set" in r.getMessage() for r in caplog.records)
    with pytest.raises(FinetuneError, match=r"--select_on=valid: not one of the --eval_files names \['test', 'dev'\]"):
        selection_set(FinetuneOptions(**base, eval_files=files, select_on="valid"))
