"""The sweep job and the report over a sweep: a 2 x 2 grid x 2 seeds of tiny.flags end to
end, resumed without rerunning, a failing configuration listed while the others finish,
and bad input refused before any run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from bert_jax.jobs import sweep as sweep_lib
from bert_jax.options import SweepOptions

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.flags"
GRID = "num_hidden_layers=1,2;intermediate_size=37,48"
# The end-to-end sweep: two axes (one with a single value) x 2 seeds = 4 runs; the plan
# of the full 2 x 2 x 2 GRID (every crossing, seed-major) is tested without running it.
RUN_GRID = "num_hidden_layers=1,2;intermediate_size=48"


def run_sweep(out, *extra, own_cache=False):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if own_cache:  # not the test session's cache: the sweep's own
        env.pop("BERT_JAX_COMPILATION_CACHE", None)
    return subprocess.run([sys.executable, "-m", "bert_jax.jobs.sweep", "--job=pretrain", f"--base={TINY}",
                           f"--out={out}", "--parallel=2", *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    p = run_sweep(out, f"--grid={RUN_GRID}", "--seeds=0,1")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return out


@pytest.mark.slow
def test_grid_times_seeds_runs_once_and_reports_each_configuration(swept, tmp_path):
    runs = sorted(d.name for d in swept.iterdir() if d.is_dir())
    assert len(runs) == 4 and "num_hidden_layers=1,intermediate_size=48,seed=0" in runs
    assert all((swept / r / sweep_lib.DONE).exists() and (swept / r / "checkpoints").is_dir() for r in runs)
    again = run_sweep(swept, f"--grid={RUN_GRID}", "--seeds=0,1")
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["ran"] == 0, again.stdout
    p = subprocess.run([sys.executable, "-m", "bert_jax.jobs.report", f"--runs={swept}", f"--out={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    table = (tmp_path / "sweep.md").read_text().splitlines()
    rows = [l for l in table if l.startswith("| 1 ") or l.startswith("| 2 ")]
    assert len(rows) == 2 and all(" ± " in r for r in rows), table
    assert sum(r.rstrip(" |").endswith("*") for r in rows) == 1  # the best configuration
    assert table[0].startswith("| num_hidden_layers | intermediate_size | seeds | params |")
    csv = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(csv) == 3 and "heldout_mlm_accuracy_std" in csv[0]
    params = {l.split(",")[0] + "," + l.split(",")[1]: int(l.split(",")[3]) for l in csv[1:]}
    assert params["2,48"] > params["1,48"]  # a deeper model is bigger
    assert (tmp_path / "sweep_heldout.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_failing_configuration_is_listed_and_the_others_finish(tmp_path):
    # hidden_size=30 is not divisible by the 4 heads: that run fails at its start
    p = run_sweep(tmp_path / "s", "--grid=hidden_size=30,32", "--seeds=0", own_cache=True)
    assert p.returncode == 1
    assert list((tmp_path / "s" / sweep_lib.CACHE).glob("jit_*")), "the runs' shared compilation cache is empty"
    assert "failed runs" in p.stderr and "hidden_size=30,seed=0" in p.stderr.split("failed runs")[1]
    assert (tmp_path / "s/hidden_size=32,seed=0" / sweep_lib.DONE).exists()
    failed = json.loads((tmp_path / "s/hidden_size=30,seed=0" / sweep_lib.FAILED).read_text())
    assert failed["returncode"] != 0 and any("hidden_size" in l for l in failed["log_tail"])


def test_runs_go_seed_by_seed(tmp_path):
    runs, _ = sweep_lib.plan(SweepOptions(job="pretrain", base=str(TINY), grid=GRID, seeds=("0", "1"),
                                          out=str(tmp_path / "s")))
    names = [r.name for r in runs]
    assert [n.rsplit("seed=", 1)[1] for n in names] == ["0"] * 4 + ["1"] * 4
    assert names[:4] == [n.replace("seed=1", "seed=0") for n in names[4:]]


@pytest.mark.parametrize("grid,message", [
    ("hidden_sise=32,64", "'hidden_sise' is not a flag of pretrain"),
    ("hidden_size=32,,64", "has an empty value"),
    ("seed=1,2", "set by the sweep"),
    ("num_hidden_layers=1 2", "'1 2' is not a value of --num_hidden_layers"),
    ("objective=mlm,nsp", "'nsp' is not a value of --objective"),
    ("hidden_size=32,32", "names a value twice"),
])
def test_bad_grid_is_refused_before_any_run(grid, message, tmp_path):
    with pytest.raises(sweep_lib.SweepError, match=message):
        sweep_lib.plan(SweepOptions(job="pretrain", base=str(TINY), grid=grid, out=str(tmp_path / "s")))
    assert not (tmp_path / "s").exists()


def test_a_sweep_folder_of_another_base_is_refused(tmp_path):
    other = tmp_path / "other.flags"
    other.write_text(TINY.read_text() + "--train_steps=9\n")
    out = tmp_path / "s"
    out.mkdir()
    (out / sweep_lib.RECORD).write_text(json.dumps(dict(job="pretrain", base=str(TINY.resolve()),
                                                        base_sha256="0" * 64)))
    with pytest.raises(sweep_lib.SweepError, match="holds a sweep of pretrain on .*tiny.flags"):
        sweep_lib.plan(SweepOptions(job="pretrain", base=str(other), out=str(out)))


def test_a_sweep_folder_in_use_is_refused_before_any_run(tmp_path):
    """Two sweeps on one folder would start the same runs and mark each other's failed."""
    from bert_jax import checkpoint
    out = tmp_path / "s"
    o = SweepOptions(job="pretrain", base=str(TINY), grid="hidden_size=32,48", out=str(out))
    with checkpoint.WorkdirLock(out, "sweep", flag="--out", chief=True):
        with pytest.raises(checkpoint.CheckpointError, match=r"--out=.*/s is in use by sweep \(pid \d+"):
            sweep_lib.sweep(o)
    assert [p.name for p in out.iterdir()] == [".lock"]  # no record, no run folder
    assert len(sweep_lib.plan(o)[0]) == 2  # the lock a stopped sweep leaves does not block the next


def test_a_run_held_by_a_live_process_is_running_not_failed(tmp_path, capsys):
    """A rerun that finds a run's folder locked by a live process (a run started by hand, or
    a child its killed launcher left) reported it failed ("in use") and wrote
    sweep_failed.json: it is running; it is neither started again nor marked failed."""
    from bert_jax import checkpoint
    o = SweepOptions(job="pretrain", base=str(TINY), grid="hidden_size=32", out=str(tmp_path / "s"))
    (run,), record = sweep_lib.plan(o)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / sweep_lib.RECORD).write_text(json.dumps(record))  # the sweep that started it
    with checkpoint.WorkdirLock(run.workdir, "pretrain", chief=True):
        summary = sweep_lib.sweep(o)
    assert summary["running"] == [run.name] and summary["failed"] == [] and summary["ran"] == 0
    assert not (run.workdir / sweep_lib.FAILED).exists() and not (run.workdir / sweep_lib.LOG).exists()
    assert f"{run.name}: running in pretrain (pid" in capsys.readouterr().out


def test_the_launcher_starts_no_jax_backend(tmp_path):
    """The sweep process only launches runs: a JAX backend in it would hold the GPU memory
    its runs need (JAX preallocates most of a GPU's memory per process)."""
    code = ("import sys; from jax._src import xla_bridge; from bert_jax.jobs import sweep; "
            "from bert_jax.options import SweepOptions; "
            f"sweep.sweep(SweepOptions(job='pretrain', base={str(TINY)!r}, grid='hidden_size=30', "
            f"out={str(tmp_path / 's')!r})); "
            "print('backend', xla_bridge.backends_are_initialized())")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.stdout.strip().splitlines()[-1] == "backend False", p.stdout[-2000:] + p.stderr[-2000:]
    assert (tmp_path / "s/hidden_size=30,seed=0" / sweep_lib.FAILED).exists()  # the run itself did run


def test_a_finetuning_sweep_is_grouped_by_the_whole_pretraining_configuration(tmp_path):
    """Fine-tuning runs from a two-flag pretraining sweep (E x sharing, 2 pretraining seeds):
    one row per pretraining configuration, both flags kept (the report once grouped on the
    first flag alone and averaged shared with unshared models)."""
    from bert_jax.jobs import report
    runs = tmp_path / "ft"
    inits = [f"pre/embedding_size={e},share_scope={s},seed={k}/best" for e in (128, 256)
             for s in ("all", "none") for k in (0, 1)]
    runs.mkdir()
    (runs / sweep_lib.RECORD).write_text(json.dumps(dict(job="finetune", grid=[["init_checkpoint", inits]])))
    for i, init in enumerate(inits):
        d = runs / ("init=" + init.split("/")[1] + ",seed=0")
        d.mkdir()
        (d / "metrics.jsonl").write_text(json.dumps(dict(step=10, loss=0.5)) + "\n")
        (d / "results.json").write_text(json.dumps(dict(eval=dict(dev=dict(accuracy=i / 10)))))
        (d / sweep_lib.DONE).write_text(json.dumps(dict(values=dict(init_checkpoint=init, seed="0"))))
    table = report.sweep_report(runs, report.report(runs, tmp_path / "out"), tmp_path / "out")
    got = {r["init"]: (r["seeds"], round(r["dev_accuracy"], 6)) for r in table}
    assert got == {"embedding_size=128,share_scope=all": (2, 0.05), "embedding_size=128,share_scope=none": (2, 0.25),
                   "embedding_size=256,share_scope=all": (2, 0.45), "embedding_size=256,share_scope=none": (2, 0.65)}
    assert "| embedding_size=256,share_scope=none | 2 |" in (tmp_path / "out/sweep.md").read_text()


def test_configurations_never_share_a_folder(tmp_path):
    """x/y.txt and x_y.txt read the same once / becomes _: the second configuration used to
    'finish' by resuming the first's checkpoint and overwrite its sweep_done.json. Names
    that collide carry a hash of the exact values; a folder of other values is refused; an
    --out that is a file is named."""
    o = SweepOptions(job="pretrain", base=str(TINY), out=str(tmp_path / "s"),
                     grid=f"heldout_corpus={tmp_path}/x/y.txt,{tmp_path}/x_y.txt;hidden_size=32,48")
    runs, _ = sweep_lib.plan(o)
    assert len({r.workdir for r in runs}) == len(runs) == 4
    assert sum("#" in r.name for r in runs) == 4  # each pair collided, hidden_size apart
    assert all("#" not in r.name for r in sweep_lib.plan(SweepOptions(
        job="pretrain", base=str(TINY), out=str(tmp_path / "t"), grid="hidden_size=32,48"))[0])
    runs[0].workdir.mkdir(parents=True)
    (runs[0].workdir / sweep_lib.DONE).write_text(json.dumps(dict(values=dict(runs[1].values))))
    with pytest.raises(sweep_lib.SweepError, match="holds a run of other values"):
        sweep_lib.plan(o)
    (tmp_path / "f").write_text("")
    with pytest.raises(sweep_lib.SweepError, match="--out=.*/f is a file"):
        sweep_lib.plan(SweepOptions(job="pretrain", base=str(TINY), out=str(tmp_path / "f")))


def test_a_killed_sweep_takes_its_run_with_it(tmp_path):
    """SIGKILL to the sweep launcher used to leave its run training (and an immediate rerun
    found that run's workdir locked and marked it failed): the run now dies with it."""
    import signal
    import time
    launcher = subprocess.Popen([sys.executable, "-m", "bert_jax.jobs.sweep", "--job=pretrain", f"--base={TINY}",
                                 "--grid=train_steps=1000", f"--out={tmp_path / 's'}"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def children():
        out = []
        for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == launcher.pid:  # the parent's pid
                out.append(int(stat.parent.name))
        return out
    deadline = time.time() + 120
    while time.time() < deadline and not children():
        time.sleep(0.05)
    child = children()[0]
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 30
    while time.time() < deadline and pathlib.Path(f"/proc/{child}").exists():
        time.sleep(0.05)
    assert not pathlib.Path(f"/proc/{child}").exists(), "the run outlived its sweep"
