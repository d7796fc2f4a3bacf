"""The heldout job: the same checkpoint scores the same twice, its Hugging Face export (and
that export converted back) scores the same, NSP and SOP pairs are both scored with the
model's one sentence head, and a model without an MLM head is refused."""

import json
import pathlib
import subprocess
import sys

import pytest

from bert_jax.interop import convert
from bert_jax.jobs import heldout
from bert_jax.options import HeldoutOptions

REPO = pathlib.Path(__file__).resolve().parents[1]
HELD = str(REPO / "bert_jax/corpus/heldout/carroll-alice.txt")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny BERT (MLM + NSP) pretrained 8 steps from tiny.flags."""
    wd = tmp_path_factory.mktemp("pre") / "run"
    subprocess.run([sys.executable, "-m", "bert_jax.jobs.pretrain", f"--flagfile={REPO / 'experiments/tiny.flags'}",
                    f"--workdir={wd}", "--mesh_data=1"], cwd=REPO, check=True, capture_output=True)
    return wd


def score(folder, tmp_path, **kw):
    return heldout.evaluate(HeldoutOptions(checkpoint=str(folder), text=HELD, max_seq_length=32, batch_size=8,
                                           batches=3, cache_dir=str(tmp_path / "cache"), **kw))


def test_same_figures_twice_and_through_hugging_face(pretrained, tmp_path):
    a, b = score(pretrained, tmp_path), score(pretrained / "best", tmp_path)
    assert score(pretrained, tmp_path) == a
    assert set(a) >= {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "sop_loss", "sop_accuracy"}
    assert 0.0 <= a["nsp_accuracy"] <= 1.0 and a["mlm_loss"] > 0
    convert.export(pretrained, tmp_path / "hf")
    assert json.loads((tmp_path / "hf/config.json").read_text())["architectures"] == ["BertForPreTraining"]
    hf = score(tmp_path / "hf", tmp_path)
    cfg, task, params, _ = convert.load(tmp_path / "hf")
    convert.save_ours(tmp_path / "back", cfg, task, params, tmp_path / "hf")
    back = score(tmp_path / "back", tmp_path)
    for k in ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "sop_loss", "sop_accuracy"):
        assert hf[k] == pytest.approx(a[k], rel=1e-6) and back[k] == pytest.approx(a[k], rel=1e-6), k
    assert b["mlm_loss"] > 0  # best/ is a pretraining checkpoint too
    # another seed: other rows and masks
    assert score(pretrained, tmp_path, seed=1)["mlm_loss"] != a["mlm_loss"]


def test_without_cache_dir_the_prepared_text_is_removed(pretrained, tmp_path, monkeypatch):
    """A job run again and again must not fill the temporary folder."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a = heldout.evaluate(HeldoutOptions(checkpoint=str(pretrained), text=HELD, max_seq_length=32,
                                        batch_size=8, batches=3))
    assert a == score(pretrained, tmp_path)  # the same figures as with a kept --cache_dir
    assert not list(tmp_path.glob("heldout_cache_*"))


def test_a_model_without_mlm_head_is_refused(tiny_checkpoint, tmp_path):
    cfg, _, params, tok = convert.load(tiny_checkpoint)
    from bert_jax.model.heads import init_params
    import jax
    from flax import linen as nn
    fresh = nn.unbox(init_params(cfg, "sequence_classification", jax.random.key(0)))
    convert.save_ours(tmp_path / "clf", cfg, "sequence_classification", fresh, tok)
    with pytest.raises(heldout.HeldoutError, match="sequence_classification model: held-out evaluation needs the MLM head"):
        score(tmp_path / "clf", tmp_path)
