"""Every flag file in experiments/ parses through the real flag definitions, gives valid
options and a valid model config, and carries the §9 header (purpose, command,
hardware, expected result)."""

import json
import math
import pathlib
import sys

import pytest
from absl import flags as absl_flags

from bert_jax import flags
from bert_jax.model.config import variant
from bert_jax.options import FinetuneOptions, PretrainOptions

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
    flags.define(PretrainOptions, fv, required=False)
    fv([sys.argv[0], f"--flagfile={path}", "--workdir=/tmp/unused"])
    opts = flags.read(PretrainOptions, fv)
    assert opts.corpus, f"{path.name}: no --corpus"
    if not opts.init_checkpoint:  # else the checkpoint's config (checked when the run starts)
        cfg = variant(opts.model.base_variant).replace(**opts.model.overrides())
        cfg.check_sequence_length(opts.max_seq_length)
    assert opts.batch_size % opts.grad_accum == 0
    assert opts.optim.warmup_steps <= opts.train_steps


def test_misspelled_flag_in_a_flag_file_is_named(tmp_path):
    bad = tmp_path / "bad.flags"
    bad.write_text("--variant=bert-base\n--learnig_rate=1e-4\n")
    fv = absl_flags.FlagValues()
    flags.define(PretrainOptions, fv, required=False)
    with pytest.raises(absl_flags.Error, match="learnig_rate"):
        fv([sys.argv[0], f"--flagfile={bad}"])


FINETUNE_FILES = sorted((REPO / "experiments" / "finetune").glob("*.flags"))


def test_there_are_finetune_flag_files():
    assert {p.stem for p in FINETUNE_FILES} >= {"sst2", "mrpc", "rte", "stsb", "conll2003", "squad_v1", "squad_v2"}


@pytest.mark.parametrize("path", FINETUNE_FILES, ids=lambda p: p.name)
def test_finetune_flag_file_parses(path, monkeypatch):
    text = "\n".join(l for l in path.read_text().splitlines() if l.startswith("#"))
    for field in ("Purpose:", "Command:", "Hardware:", "Expected:"):
        assert field in text, f"{path.name}: header lacks {field}"
    monkeypatch.chdir(REPO)  # nested --flagfile paths are relative to the repo
    fv = absl_flags.FlagValues()
    flags.define(FinetuneOptions, fv)
    fv([sys.argv[0], f"--flagfile={path}", "--init_checkpoint=/ckpt", "--workdir=/tmp/unused"])
    o = flags.read(FinetuneOptions, fv)
    assert o.eval_files and o.task in ("classification", "regression", "ner", "qa")
    if path.stem == "mrpc":
        assert o.text_column == "#1 String" and o.pair_column == "#2 String"


def test_split_tool(shared_data, tmp_path):
    from bert_jax.jobs import split
    from bert_jax.tasks import readers
    a, b = split.split_rows(shared_data / "pair/mrpc/msr_paraphrase_train.txt", tmp_path / "m", 408)
    assert (a, b) == (3668, 408)  # GLUE's MRPC train/dev sizes
    tr = readers.read_text_examples(tmp_path / "m/train.tsv", "#1 String", "Quality", "#2 String")
    dv = readers.read_text_examples(tmp_path / "m/dev.tsv", "#1 String", "Quality", "#2 String")
    assert len(tr) == 3668 and len(dv) == 408
    a, b = split.split_squad(shared_data / "qa/squad_v1.1_dev_rebuilt_minus_xquad.json", tmp_path / "s", 0.25)
    assert a + b == 48
    titles = lambda p: {x["title"] for x in json.loads(p.read_text())["data"]}  # noqa: E731
    assert not titles(tmp_path / "s/train.json") & titles(tmp_path / "s/dev.json")


def test_split_never_writes_over_its_input(tmp_path):
    from bert_jax import paths
    from bert_jax.jobs import split
    src = tmp_path / "train.tsv"
    src.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(10)))
    before = src.read_text()
    with pytest.raises(paths.OverwritesInputError, match="--out="):
        split.split_rows(src, tmp_path, 3)  # its train.tsv would be the input
    assert src.read_text() == before and not (tmp_path / "dev.tsv").exists()
    with pytest.raises(split.SplitError, match="--dev_size=10: .* has only 10 rows"):
        split.split_rows(src, tmp_path / "out", 10)


def expanded(path: pathlib.Path) -> str:
    """A flag file's text with the flag files it names (--flagfile=, relative to the repo) inlined."""
    return "\n".join(expanded(REPO / l.split("=", 1)[1]) if l.startswith("--flagfile=") else l
                     for l in path.read_text().splitlines())


ABLATION_FILES = sorted((REPO / "experiments" / "ablations").glob("*.flags"))


@pytest.mark.parametrize("path", ABLATION_FILES, ids=lambda p: p.name)
def test_ablation_files_parse_and_plan(path, tmp_path, monkeypatch):
    """Sweep files (flags of the sweep job) plan their runs: every grid flag is the job's
    and the base file parses; base files parse as pretraining flag files."""
    from bert_jax.jobs import sweep
    from bert_jax.options import SweepOptions
    header = "\n".join(l for l in path.read_text().splitlines() if l.startswith("#"))
    for field in ("Purpose:", "Command:", "Hardware:", "Expected:"):
        assert field in header, f"{path.name}: header lacks {field}"
    monkeypatch.chdir(REPO)  # the files name paths relative to the repo, as launch.sh runs them
    text = path.read_text()
    if "--job=" not in text:
        if "--task=" in expanded(path):  # the base of fine-tuning sweeps
            test_finetune_flag_file_parses(path, monkeypatch)
        else:
            test_pretrain_flag_file_parses_and_validates(path)
        return
    extra = []
    if "--init_sweep=" in text:  # a pretraining sweep's folder (not in a fresh clone): 3 finished runs
        init = tmp_path / "init_sweep"
        (init / "sweep.json").parent.mkdir()
        (init / "sweep.json").write_text("{}")
        for seed in range(3):
            (init / f"objective=mlm,seed={seed}").mkdir()
            (init / f"objective=mlm,seed={seed}" / sweep.DONE).write_text("{}")
        extra.append(f"--init_sweep={init}")
    fv = absl_flags.FlagValues()
    flags.define(SweepOptions, fv, required=False)
    fv([sys.argv[0], f"--flagfile={path}", f"--out={tmp_path / 'sweep'}", *extra])
    o = flags.read(SweepOptions, fv)
    runs, record = sweep.plan(o)
    sizes = [len(v) for _, v in record["grid"]]
    assert len(runs) == len(o.seeds) * math.prod(sizes) >= 3
    if o.job == "finetune":  # every run has a model to start from
        assert ({n for n, _ in record["grid"]} >= {"init_checkpoint"} if o.init_sweep
                else "--init_checkpoint=" in expanded(pathlib.Path(o.base)))
        test_finetune_flag_file_parses(pathlib.Path(o.base), monkeypatch)
    else:
        test_pretrain_flag_file_parses_and_validates(pathlib.Path(o.base))
