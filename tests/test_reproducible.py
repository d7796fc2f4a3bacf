"""Same flags and seed => the same run, bit for bit: two separate processes, each in its
own workdirs, train the tokenizer (WordPiece, byte-level BPE, SentencePiece), pretrain
BERT, RoBERTa and ALBERT on it, and fine-tune the BERT run. Tokenizer files, metrics and
final params must be identical. The one field allowed to differ is the wall-clock
throughput `tokens_per_s` in pretraining's metrics.jsonl."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from bert_jax import checkpoint
from bert_jax.interop import convert

REPO = pathlib.Path(__file__).resolve().parents[1]
WALL_CLOCK_FIELDS = {"tokens_per_s"}
RUNS = {"bert": "wordpiece", "roberta": "bpe", "albert": "sentencepiece"}

DRIVER = r'''
import os, sys
os.chdir(sys.argv[2])
from absl import flags as absl_flags
from bert_jax import flags
from bert_jax.options import FinetuneOptions, PretrainOptions
from bert_jax.training import pretraining
from bert_jax.training.finetuning import Finetuner
out, sst2 = sys.argv[1], sys.argv[3]
for family in ("bert", "roberta", "albert"):
    fv = absl_flags.FlagValues()
    flags.define(PretrainOptions, fv)
    fv(["x", "--flagfile=experiments/tiny.flags", f"--workdir={out}/{family}", f"--variant={family}-base",
        "--hidden_size=32", "--num_hidden_layers=2", "--num_attention_heads=4", "--intermediate_size=37",
        "--embedding_size=24", "--max_position_embeddings=40", "--train_steps=4", "--log_every=1",
        "--tokenizer_vocab_size=400", "--seed=7"])
    pretraining.run(flags.read(PretrainOptions, fv))
Finetuner(FinetuneOptions(task="classification", init_checkpoint=f"{out}/bert", train_file=sst2,
                          workdir=f"{out}/ft", eval_files=(("dev", sst2),), batch_size=8, epochs=1,
                          max_seq_length=32, seed=7)).run()
'''


def records(path, drop=()):
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_same_flags_same_seed_same_everything(shared_data, tmp_path):
    rows = (shared_data / "classification/sst2/train.tsv").read_text(encoding="utf-8").splitlines()[:41]
    sst2 = tmp_path / "sst2.tsv"
    sst2.write_text("\n".join(rows) + "\n", encoding="utf-8")
    # 2 devices each: the sharded (data-parallel) path, without the 8 fake devices' overhead
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / f"run{i}"), str(REPO), str(sst2)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    a, b = tmp_path / "run0", tmp_path / "run1"
    for family, kind in RUNS.items():
        tok_files = sorted(p.name for p in (a / family / "tokenizer").iterdir())
        assert tok_files == sorted(p.name for p in (b / family / "tokenizer").iterdir())
        native = {"wordpiece": "vocab.txt", "bpe": "merges.txt", "sentencepiece": "spiece.model"}[kind]
        assert native in tok_files
        for name in tok_files:
            assert (a / family / "tokenizer" / name).read_bytes() == (b / family / "tokenizer" / name).read_bytes(), \
                (family, name)
        ra = records(a / family / "metrics.jsonl", WALL_CLOCK_FIELDS)
        assert len(ra) >= 4 and ra == records(b / family / "metrics.jsonl", WALL_CLOCK_FIELDS), family
        _, pa, _ = checkpoint.load_params(a / family)
        _, pb, _ = checkpoint.load_params(b / family)
        jax.tree.map(np.testing.assert_array_equal, pa, pb)
    assert records(a / "ft" / "metrics.jsonl") == records(b / "ft" / "metrics.jsonl")
    assert (a / "ft" / "eval" / "dev.json").read_text() == (b / "ft" / "eval" / "dev.json").read_text()
    jax.tree.map(np.testing.assert_array_equal, convert.load(a / "ft" / "best")[2], convert.load(b / "ft" / "best")[2])
