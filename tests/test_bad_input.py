"""Clear errors instead of tracebacks, each before any work and naming the flag, file or
line (the hostile-tester probes of the reliability issue, round 3)."""

import json
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_report_skips_a_truncated_line_and_refuses_an_empty_folder(tmp_path, caplog):
    """A crashed run's metrics.jsonl often ends in half a line: it killed the whole report
    with a JSONDecodeError. A missing --runs folder reported '0 runs' with exit 0."""
    from bert_jax.jobs import report
    from bert_jax.options import ReportOptions
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    lines = [dict(step=1, loss=2.0, learning_rate=1e-3, grad_norm=1.0), dict(step=2, loss=1.5, learning_rate=1e-3,
                                                                              grad_norm=1.0)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "lo')
    caplog.set_level("WARNING")
    report.main(ReportOptions(runs=str(tmp_path / "runs"), out=str(tmp_path / "out")))
    assert any("metrics.jsonl:3: not a metrics record" in r.getMessage() for r in caplog.records)
    assert "| a |" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(report.ReportError, match="--runs=.*nope: no such folder"):
        report.main(ReportOptions(runs=str(tmp_path / "nope"), out=str(tmp_path / "out2")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="holds no run"):
        report.main(ReportOptions(runs=str(tmp_path / "empty"), out=str(tmp_path / "out3")))


def test_squad_without_context_and_too_little_heldout_text_are_named(tmp_path):
    """SQuAD JSON without `context` gave KeyError: 'context'; `heldout` on a text too small
    for one row gave a ValueError traceback."""
    import jax
    from flax import linen as nn
    from tiny import config

    from bert_jax.data import vocab
    from bert_jax.interop import convert
    from bert_jax.jobs import heldout
    from bert_jax.model.heads import init_params
    from bert_jax.options import HeldoutOptions
    from bert_jax.tasks import readers
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"paragraphs": [{"qas": [{"id": "q", "question": "?"}]}]}]}))
    with pytest.raises(readers.TaskDataError, match=r"squad.json: data\[0\].paragraphs\[0\]: no 'context' string"):
        readers.read_squad(squad)
    tok = vocab.train("wordpiece", f"{REPO}/bert_jax/corpus/train/shakespeare-caesar.txt", 99, tmp_path / "tok")
    cfg = config(vocab_size=tok.vocab_size)
    convert.save_ours(tmp_path / "ck", cfg, "pretraining",
                      jax.device_get(nn.unbox(init_params(cfg, "pretraining", jax.random.key(0)))), tmp_path / "tok")
    (tmp_path / "tiny.txt").write_text("Hello there.\n")
    with pytest.raises(heldout.HeldoutError, match="--text=.*tiny.txt: too little text to build .* rows"):
        heldout.evaluate(HeldoutOptions(checkpoint=str(tmp_path / "ck"), text=str(tmp_path / "tiny.txt"),
                                        max_seq_length=32))


def test_launch_sh_names_bad_options(tmp_path):
    """--procs=abc died on 'unbound variable'; a --time with a newline was written into the
    sbatch script as a line of its own."""
    def launch(*args):
        return subprocess.run([str(REPO / "launch.sh"), *args], cwd=REPO, capture_output=True, text=True)
    p = launch("--procs=abc", "pretrain")
    assert p.returncode == 2 and "--procs=abc: a positive number" in p.stderr
    p = launch("--slurm", "--time=01:00:00\nrm -rf ~", "--dry_run", "pretrain", f"--workdir={tmp_path}")
    assert p.returncode == 2 and "SLURM's [D-]HH:MM:SS" in p.stderr and "rm -rf" not in p.stdout
    p = launch("--slurm", "--partition=gpu --exclusive", "--dry_run", "pretrain", f"--workdir={tmp_path}")
    assert p.returncode == 2 and "--partition=gpu --exclusive" in p.stderr
    p = launch("--slurm", "--time=1-02:00:00", "--partition=gpu", "--dry_run", "pretrain", f"--workdir={tmp_path}")
    assert p.returncode == 0 and "#SBATCH --time=1-02:00:00" in p.stdout


@pytest.mark.slow
def test_bad_input_in_two_processes_prints_no_traceback(tmp_path):
    """A multi-process job's bad-input error printed a Python traceback before its
    `job: error:` line; it now reads as in one process."""
    import os
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               BERT_JAX_VENV=sys.prefix)
    p = subprocess.run([str(REPO / "launch.sh"), "--procs=2", "pretrain", f"--flagfile={REPO}/experiments/tiny.flags",
                        f"--workdir={tmp_path / 'wd'}", f"--corpus={tmp_path}/missing.txt"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "pretrain: error: --corpus: " in p.stderr and "missing.txt" in p.stderr
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
