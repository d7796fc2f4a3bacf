"""No job writes over one of its inputs, and outputs appear whole (issue: `predict
--output=` its `--input` replaced the input by predictions, exit 0)."""


import pytest

from bert_jax import paths
from bert_jax.jobs import encode, heldout, predict
from bert_jax.options import EncodeOptions, HeldoutOptions, PredictOptions


@pytest.fixture
def inputs(tmp_path):
    text = tmp_path / "in.tsv"
    text.write_text("sentence\nA fine day.\n")
    ckpt = tmp_path / "best"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    return text, ckpt


def test_predict_encode_heldout_refuse_to_write_over_an_input(inputs, tmp_path):
    text, ckpt = inputs
    before = text.read_bytes()
    for output in (text, tmp_path / "." / "in.tsv", ckpt / "config.json", ckpt / "preds.tsv"):
        with pytest.raises(paths.OverwritesInputError, match="--output=.* would write over --(input|checkpoint)="):
            predict.predict(PredictOptions(checkpoint=str(ckpt), input=str(text), output=str(output)))
        with pytest.raises(paths.OverwritesInputError, match="would write over"):
            encode.main(EncodeOptions(checkpoint=str(ckpt), input=str(text), output=str(output)))
    link = tmp_path / "link.tsv"
    link.symlink_to(text)
    with pytest.raises(paths.OverwritesInputError, match="--out=.* would write over --text="):
        heldout.main(HeldoutOptions(checkpoint=str(ckpt), text=str(text), out=str(link)))
    assert text.read_bytes() == before


def test_write_atomically_keeps_the_old_file_on_an_error(tmp_path):
    out = tmp_path / "preds.tsv"
    out.write_text("old\n")

    def half(tmp):
        tmp.write_text("half a fi")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        paths.write_atomically(out, half)
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["preds.tsv"]
    paths.write_atomically(out, lambda tmp: tmp.write_text("new\n"))
    assert out.read_text() == "new\n"
