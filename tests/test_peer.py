"""Our fine-tuning equals the Hugging Face peer (transformers + torch AdamW) step for step.

Same tiny model on both sides (the fresh head copied across), dropout off: then every
difference in forward, loss, gradient (e.g. the [PAD] row, which torch's padding_idx
freezes), optimizer, weight-decay mask, clipping or schedule shows in the per-step losses
and the final weights. And the side_by_side driver runs both jobs and tabulates them."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from bert_jax.interop import convert
from bert_jax.interop import rename
from bert_jax.peers.hf_finetune import HFPeer
from bert_jax.training.finetuning import FinetuneOptions, Finetuner


@pytest.fixture(scope="module")
def tiny_hf(shared_data, tmp_path_factory):
    """A random tiny BERT saved as a Hugging Face folder, with the real uncased vocab."""
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                  intermediate_size=29, max_position_embeddings=160)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf") / "tiny"
    transformers.BertModel(cfg).save_pretrained(out)
    (out / "vocab.txt").write_bytes((shared_data / "vocab/bert-base-uncased/vocab.txt").read_bytes())
    return out


def lines(path, n, out):
    out.write_text("\n".join(path.read_text(encoding="utf-8-sig").splitlines()[:n]) + "\n", encoding="utf-8")
    return out


def squad_subset(shared_data, out):
    d = json.loads((shared_data / "qa/squad_v1.1_dev_rebuilt_minus_xquad.json").read_text())
    d["data"] = [dict(d["data"][0], paragraphs=d["data"][0]["paragraphs"][:3])]
    out.write_text(json.dumps(d))
    return out


TASKS = {  # task -> (train file maker, extra options)
    "qa": (squad_subset, dict(max_seq_length=96, doc_stride=32, max_query_length=24)),
    "ner": (lambda d, o: lines(d / "ner/conll2003/train.txt", 400, o), {}),
    "classification": (lambda d, o: lines(d / "pair/rte/train.tsv", 25, o),
                       dict(text_column="sentence1", pair_column="sentence2")),
    "regression": (lambda d, o: lines(d / "pair/stsb/train.tsv", 25, o),
                   dict(text_column="sentence1", pair_column="sentence2", label_column="score")),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_training_steps_equal_hugging_face(task, shared_data, tiny_hf, tmp_path):
    make, extra = TASKS[task]
    extra = {"max_seq_length": 48, **extra}
    o = FinetuneOptions(task=task, init_checkpoint=str(tiny_hf), train_file=str(make(shared_data, tmp_path / "train")),
                        workdir=str(tmp_path / "ours"), batch_size=8, learning_rate=2e-3, epochs=2,
                        warmup_proportion=0.3, dropout=0.0, mesh_data=1, progress_bar=False, log_every=1, **extra)
    ours = Finetuner(o)
    peer = HFPeer(dataclasses.replace(o, workdir=str(tmp_path / "hf")))
    state = {k: torch.from_numpy(np.array(v)) for k, v in rename.to_hf(ours.params, ours.cfg, ours.mtask).items()}
    missing, unexpected = peer.model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    s_ours, s_hf = ours.run(), peer.run()
    assert s_ours["steps"] == s_hf["steps"] >= 4
    loss = lambda side: [r["loss"] for r in map(json.loads, (tmp_path / side / "metrics.jsonl").read_text().splitlines())
                         if "loss" in r]
    np.testing.assert_allclose(loss("ours"), loss("hf"), rtol=2e-4)
    _, _, final, _ = convert.load(tmp_path / "ours/best")
    theirs = {k: v.detach().numpy() for k, v in peer.model.state_dict().items()}
    for name, value in rename.to_hf(final, ours.cfg, ours.mtask).items():
        # The span bias's true gradient is exactly 0 (softmax over positions): both sides
        # move it only by rounding noise, which Adam scales up.
        atol = 1e-3 if name == "qa_outputs.bias" else 2e-5
        np.testing.assert_allclose(value, theirs[name], atol=atol, err_msg=name)


@pytest.mark.slow
def test_side_by_side_runs_both_and_tabulates(shared_data, tiny_hf, tmp_path):
    out = tmp_path / "sbs"
    cmd = [sys.executable, "-m", "bert_jax.peers.side_by_side", f"--init_checkpoint={tiny_hf}", f"--out={out}",
           "--parallel=2", "rte:0,1", "--", "--max_train_examples=16", "--epochs=1", "--max_seq_length=32",
           "--mesh_data=1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())["rte"]
    assert set(summary["ours"]) == set(summary["hf"]) == {"0", "1"}  # JSON keys
    for side in ("ours", "hf"):
        accs = [r["accuracy"] for r in summary[side].values()]
        assert summary["mean"][side]["accuracy"] == pytest.approx(np.mean(accs))
        assert (out / "rte" / f"{side}_s1" / "eval" / "dev.json").exists()
    table = (out / "summary.md").read_text()
    assert "| rte | accuracy |" in table
    # --collect rebuilds the same table from the finished runs alone.
    (out / "summary.md").unlink()
    p = subprocess.run([sys.executable, "-m", "bert_jax.peers.side_by_side", "--collect", f"--out={out}"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and (out / "summary.md").read_text() == table, p.stderr[-2000:]


def test_side_by_side_rejects_unknown_task(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bert_jax.peers.side_by_side", "--init_checkpoint=x",
                        f"--out={tmp_path}", "nosuchtask"], capture_output=True, text=True)
    assert p.returncode != 0 and "no experiments/finetune/nosuchtask.flags" in p.stderr
