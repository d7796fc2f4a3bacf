"""Every flag file in experiments/ parses through the real flag definitions, gives valid
options and a valid model config, and carries the §9 header (purpose, command,
hardware, expected result)."""

import pathlib
import sys

import pytest
from absl import flags as absl_flags

from bert_jax import flags
from bert_jax.config import variant

REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN_FILES = sorted((REPO / "experiments").glob("*.flags"))


def test_there_are_flag_files():
    names = {p.stem for p in PRETRAIN_FILES}
    assert {"tiny", "quickstart", "bert_base_phase1", "bert_base_phase2", "bert_large_phase1",
            "bert_large_phase2", "roberta_base", "roberta_large", "albert_base", "albert_large",
            "albert_xlarge", "albert_xxlarge"} <= names


@pytest.mark.parametrize("path", PRETRAIN_FILES, ids=lambda p: p.name)
def test_pretrain_flag_file_parses_and_validates(path):
    header = [l for l in path.read_text().splitlines() if l.startswith("#")]
    text = "\n".join(header)
    for field in ("Purpose:", "Command:", "Hardware:", "Expected:"):
        assert field in text, f"{path.name}: header lacks {field}"
    assert path.name in text, f"{path.name}: the Command line should run this file"
    fv = absl_flags.FlagValues()
    flags.define_pretrain_flags(fv, required=False)
    fv([sys.argv[0], f"--flagfile={path}", "--workdir=/tmp/unused"])
    opts = flags.pretrain_options(None, fv)
    assert opts.corpus, f"{path.name}: no --corpus"
    cfg = variant(opts.variant).replace(**dict(opts.model_overrides))
    cfg.check_sequence_length(opts.max_seq_length)
    assert opts.batch_size % opts.grad_accum == 0
    assert opts.optim.warmup_steps <= opts.train_steps


def test_misspelled_flag_in_a_flag_file_is_named(tmp_path):
    bad = tmp_path / "bad.flags"
    bad.write_text("--variant=bert-base\n--learnig_rate=1e-4\n")
    fv = absl_flags.FlagValues()
    flags.define_pretrain_flags(fv, required=False)
    with pytest.raises(absl_flags.Error, match="learnig_rate"):
        fv([sys.argv[0], f"--flagfile={bad}"])
