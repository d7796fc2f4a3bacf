"""Manual soak check (not collected by pytest): N consecutive tiny pretraining runs with a
checkpoint every step, every third one SIGKILLed at a random moment and rerun; every run
must end with exit 0 and exactly the straight run's per-step losses. Half the runs save
synchronously (--async_checkpoint=false), where a fatal error was once seen under load.

    .venv/bin/python tests/checks/soak.py [N=50]
Prints one JSON line per run and a summary; exits 1 on any failure (its stderr is kept
under the printed folder).
"""
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 8


def cmd(workdir, tok, sync):
    return [sys.executable, "-m", "bert_jax.jobs.pretrain", f"--flagfile={REPO}/experiments/tiny.flags",
            f"--workdir={workdir}", f"--tokenizer={tok}", f"--train_steps={STEPS}", "--checkpoint_every=1",
            "--log_every=1", f"--async_checkpoint={'false' if sync else 'true'}"]


def losses(workdir):
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def run(c, log):
    with open(log, "a") as f:
        return subprocess.run(c, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode


def main(n):
    rng = random.Random(0)
    root = pathlib.Path(tempfile.mkdtemp(prefix="soak_"))
    env_ok = dict(os.environ, JAX_PLATFORMS="cpu")
    os.environ.update(env_ok)
    tok = root / "tok"
    subprocess.run([sys.executable, "-m", "bert_jax.jobs.vocab", "--kind=wordpiece",
                    f"--corpus={REPO}/bert_jax/corpus/train/shakespeare-*.txt", "--vocab_size=500", f"--out={tok}"],
                   cwd=REPO, check=True, capture_output=True)
    ref = root / "ref"
    assert run(cmd(ref, tok, False), root / "ref.log") == 0
    want = losses(ref)
    failures, t0 = [], time.time()
    for i in range(n):
        wd, log, sync = root / f"run{i:02d}", root / f"run{i:02d}.log", i % 2 == 1
        killed_at = None
        if i % 3 == 0:
            p = subprocess.Popen(cmd(wd, tok, sync), cwd=REPO, stdout=open(log, "a"), stderr=subprocess.STDOUT)
            target = rng.randint(1, STEPS - 1)
            while p.poll() is None and not ((wd / "metrics.jsonl").exists()
                                            and len((wd / "metrics.jsonl").read_text().splitlines()) >= target):
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                killed_at = max(losses(wd), default=0)
            p.wait()
        rc = run(cmd(wd, tok, sync), log)
        same = rc == 0 and losses(wd) == want
        rec = dict(run=i, sync_checkpoints=sync, killed_after_step=killed_at, exit=rc, same_losses=same)
        print(json.dumps(rec), flush=True)
        if not same:
            failures.append(rec)
    print(json.dumps(dict(runs=n, killed=sum(1 for i in range(n) if i % 3 == 0), failures=len(failures),
                          minutes=round((time.time() - t0) / 60, 1), folder=str(root))))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50))
