"""Every flag file in experiments/ actually runs: 2 steps each, with the file's own
options (optimizer, dtype, mesh, grad_accum, sequence length, objective), its real
tokenizer kind and files, the model shrunk by flags and the data pointed at the bundled
books / the shared data. (Parsing alone missed that the RoBERTa files could not start.)"""

import json
import pathlib
import sys

import numpy as np
import pytest
from absl import flags as absl_flags

from bert_jax import checkpoint, flags
from bert_jax.data import vocab
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.interop import convert
from bert_jax.jobs import split
from bert_jax.options import FinetuneOptions, PretrainOptions
from bert_jax.training import pretraining
from bert_jax.training.finetuning import Finetuner

REPO = pathlib.Path(__file__).resolve().parents[1]
BOOKS = REPO / "bert_jax" / "corpus"
PRETRAIN_FILES = sorted((REPO / "experiments").glob("*.flags"))
FINETUNE_FILES = sorted((REPO / "experiments" / "finetune").glob("*.flags"))
SHRINK = ["--hidden_size=32", "--num_hidden_layers=2", "--num_attention_heads=4", "--intermediate_size=37"]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """ALBERT's released spiece.model is not available offline: the ALBERT files run with
    a SentencePiece model trained by the vocab job (the same kind and files)."""
    out = tmp_path_factory.mktemp("sp") / "spiece"
    vocab.train("sentencepiece", f"{BOOKS}/train/shakespeare-*.txt", 800, out)
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One corpus cache for every run here: keyed by files + tokenizer, so the runs that
    share a tokenizer tokenize the books once."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
@pytest.mark.parametrize("path", PRETRAIN_FILES, ids=lambda p: p.stem)
def test_pretrain_flag_file_runs(path, tmp_path, spiece, cache_dir, shared_data, tiny_bert, monkeypatch):
    monkeypatch.chdir(REPO)
    fv = absl_flags.FlagValues()
    flags.define(PretrainOptions, fv)
    extra = [f"--workdir={tmp_path / 'wd'}", *SHRINK, "--train_steps=2", "--warmup_steps=1",
             f"--corpus={BOOKS}/train/shakespeare-macbeth.txt,{BOOKS}/train/shakespeare-caesar.txt",
             f"--heldout_corpus={BOOKS}/heldout/carroll-alice.txt", "--eval_every=2", "--eval_batches=1",
             "--batch_size=8", "--log_every=1", "--progress_bar=false",
             # rows of 512 only cost CI time here: 128 keeps every other option of the file
             "--max_seq_length=128", "--max_predictions_per_seq=20", f"--cache_dir={cache_dir}"]
    if path.stem.endswith("_phase2"):  # as its header says: on the workdir of phase 1, stopped there
        phase1 = absl_flags.FlagValues()
        flags.define(PretrainOptions, phase1)
        phase1([sys.argv[0], f"--flagfile={path.with_name(path.name.replace('phase2', 'phase1'))}", *extra,
                "--train_steps=4", "--stop_at_step=2", "--max_seq_length=64", "--max_predictions_per_seq=10"])
        as_tested(phase1)
        assert pretraining.run(flags.read(PretrainOptions, phase1))["step"] == 2
        extra.append("--train_steps=4")
    fv([sys.argv[0], f"--flagfile={path}", *extra])
    as_tested(fv)
    if (fv.variant or "").startswith("albert"):
        assert fv.tokenizer.startswith("/data/")  # a placeholder for the released model
        fv.tokenizer = str(spiece)
        fv.embedding_size = 16
    if fv.init_checkpoint:  # a model the file's header makes first (continued pretraining)
        fv.init_checkpoint = str(tiny_bert)
    o = flags.read(PretrainOptions, fv)
    s = pretraining.run(o)
    assert s["step"] == fv.train_steps and np.isfinite(s["heldout"]["mlm_loss"]), s
    cfg = checkpoint.read_config(tmp_path / "wd")
    tok = Tokenizer.load(tmp_path / "wd" / "tokenizer")
    assert cfg.pad_token_id == tok.pad_id and cfg.vocab_size >= tok.vocab_size
    if path.stem == "roberta_base":  # GPT-2's files in RoBERTa's layout; the export reads the same
        assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3) and cfg.position_offset == 2
        import transformers
        convert.export(tmp_path / "wd", tmp_path / "hf")
        theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
        text = "The quick brown fox, naïvely — jumps."
        assert theirs(text, "and a pair")["input_ids"] == tok.encode(text, "and a pair").input_ids
        model = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "hf"))
        assert model.config.pad_token_id == 1


def as_tested(fv) -> None:
    """What is not the subject here is made cheap where the file leaves it to a default: a
    file that names no mesh runs on one of the 8 test devices (the files that set
    --mesh_fsdp run on their mesh), and a pretraining file that names no splitter splits
    the books with blingfire (2 s less per corpus than pysbd)."""
    if not any(fv[f].present for f in ("mesh_data", "mesh_fsdp", "mesh_tensor")):
        fv.mesh_data = 1
    if "sentence_splitter" in fv and not fv["sentence_splitter"].present:
        fv.sentence_splitter = "blingfire"


@pytest.fixture(scope="module")
def tiny_bert(shared_data, tmp_path_factory):
    import jax
    from flax import linen as nn

    from bert_jax.model.config import ModelConfig
    from bert_jax.model.heads import init_params
    cfg = ModelConfig(family="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=37, max_position_embeddings=512)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    convert.save_ours(out, cfg, "base", jax.device_get(nn.unbox(init_params(cfg, "base", jax.random.key(0)))),
                      shared_data / "vocab/bert-base-uncased")
    return out


def squad_v2_shaped(v1: dict, seed: int = 0) -> dict:
    """SQuAD v2.0-shaped data from v1.1: every third question moves to a paragraph of
    another article, where it has no answer (is_impossible, no answers)."""
    rng = np.random.default_rng(seed)
    data = json.loads(json.dumps(v1))
    arts = data["data"]
    for a_i, art in enumerate(arts):
        for para in art["paragraphs"]:
            moved, kept = [], []
            for q_i, qa in enumerate(para["qas"]):
                (moved if q_i % 3 == 2 else kept).append(qa)
            para["qas"] = kept
            for qa in moved:
                other = arts[(a_i + 1 + int(rng.integers(len(arts) - 1))) % len(arts)]
                target = other["paragraphs"][int(rng.integers(len(other["paragraphs"])))]
                target.setdefault("_incoming", []).append(dict(qa, answers=[], is_impossible=True))
    for art in arts:
        for para in art["paragraphs"]:
            para["qas"] += para.pop("_incoming", [])
    return data


def small_squad(shared_data, out: pathlib.Path, articles: int, v2: bool) -> pathlib.Path:
    d = json.loads((shared_data / "qa/squad_v1.1_dev_rebuilt_minus_xquad.json").read_text(encoding="utf-8"))
    d["data"] = [dict(a, paragraphs=a["paragraphs"][:2]) for a in d["data"][:articles]]
    if v2:
        d = squad_v2_shaped(d)
    out.write_text(json.dumps(d))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", FINETUNE_FILES, ids=lambda p: p.stem)
def test_finetune_flag_file_runs(path, tmp_path, tiny_bert, shared_data, monkeypatch):
    monkeypatch.chdir(REPO)
    fv = absl_flags.FlagValues()
    flags.define(FinetuneOptions, fv)
    extra = [f"--init_checkpoint={tiny_bert}", f"--workdir={tmp_path / 'wd'}", "--max_train_examples=16",
             "--batch_size=8", "--epochs=1"]
    if path.stem == "mrpc":  # its flag file reads the split tool's output
        split.split_rows(shared_data / "pair/mrpc/msr_paraphrase_train.txt", tmp_path / "mrpc", 408)
        extra += [f"--train_file={tmp_path}/mrpc/train.tsv", f"--eval_files=dev={tmp_path}/mrpc/dev.tsv"]
    if path.stem.startswith("squad"):
        f = small_squad(shared_data, tmp_path / "squad.json", 3, v2=path.stem == "squad_v2")
        extra += [f"--train_file={f}", f"--eval_files=dev={f}"]
    if path.stem == "conll2003":  # the full valid set is 3,250 sentences of Viterbi
        lines = (shared_data / "ner/conll2003/valid.txt").read_text().split("\n\n")[:200]
        (tmp_path / "valid.txt").write_text("\n\n".join(lines) + "\n")
        extra.append(f"--eval_files=valid={tmp_path}/valid.txt")
    fv([sys.argv[0], f"--flagfile={path}", *extra])
    as_tested(fv)
    o = flags.read(FinetuneOptions, fv)
    s = Finetuner(o).run()
    assert s["steps"] == 2, s
    name = o.eval_files[0][0]
    res = json.loads((tmp_path / "wd" / "eval" / f"{name}.json").read_text())
    assert res and all(np.isfinite(v) for v in res.values()), res


@pytest.mark.slow
def test_squad_v2_no_answer_decoding(tiny_bert, shared_data, tmp_path):
    """On v2-shaped data (a third of the questions moved to another article's context,
    unanswerable there), a null threshold of -inf predicts no answer everywhere, which
    scores exactly the unanswerable share; +inf never predicts no answer, which scores 0
    on the unanswerable ones."""
    from bert_jax.tasks import readers
    from bert_jax.training.finetuning import FinetuneOptions
    f = small_squad(shared_data, tmp_path / "v2.json", 4, v2=True)
    ex = readers.read_squad(f)
    impossible = {e.id for e in ex if not e.answers}
    assert 0.25 < len(impossible) / len(ex) < 0.45
    scores = {}
    for thr in (-1e30, 1e30):
        o = FinetuneOptions(task="qa", init_checkpoint=str(tiny_bert), train_file=str(f),
                            workdir=str(tmp_path / f"wd{thr > 0}"), eval_files=(("dev", str(f)),),
                            batch_size=8, epochs=1, max_train_examples=8, max_seq_length=128,
                            doc_stride=64, null_threshold=thr, mesh_data=1)
        Finetuner(o).run()
        preds = json.loads((tmp_path / f"wd{thr > 0}/eval/dev.predictions.json").read_text())
        scores[thr] = json.loads((tmp_path / f"wd{thr > 0}/eval/dev.json").read_text())
        assert set(preds) == {e.id for e in ex}
        if thr < 0:
            assert all(p == "" for p in preds.values())
        else:
            assert all(preds[q] != "" for q in impossible)
    assert scores[-1e30]["exact_match"] == pytest.approx(100 * len(impossible) / len(ex))
    assert scores[-1e30]["f1"] == pytest.approx(100 * len(impossible) / len(ex))
