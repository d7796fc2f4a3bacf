#!/usr/bin/env bash
# The device-machine script of the performance issue: everything to measure on one GPU in
# one run, bert_jax's bench and the peers side by side on the same card.
#   cp ../shared/bench/peer_bench.py .devbench/   (git-ignored; it travels with `carry`)
#   run: bash experiments/gpu/h200.sh   (results under $OUT, default ./runs/gpu)
# Rows (the issue's targets): BERT-base 128x256 and 512x64, BERT-large 512x32, ALBERT-base
# 512x64; bf16; each with the paper's attention-probability dropout 0.1 and with 0 (the
# fused cuDNN kernel). Most important first, each result appended the moment it is
# measured, so a timeout still returns the rows done:
#   1. ours, BERT-base 512x64 and 128x256, dropout 0 and 0.1
#   2. the peers on those rows (torch eager, plain JAX, torch.compile)
#   3. ours, BERT-large 512x32 and ALBERT-base 512x64, dropout 0 and 0.1
#   4. the peers on those; 5. the GPU tests
# The whole run stops starting work after BUDGET_S seconds (default 540: 9 minutes, the
# machine's start excluded); every command's timeout is cut to what is left.
# CPU dry run (tiny shapes, no peers): DRY=1 bash experiments/gpu/h200.sh
# PRINT=1: print each bench command line instead of running anything (a test parses them).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-runs/gpu}; [[ -n ${PRINT:-} ]] || mkdir -p "$OUT"; export OUT
py=${PYTHON:-python3}
log="$OUT/bench.jsonl"
budget=${BUDGET_S:-540}
first=("bert-base 512 64" "bert-base 128 256")
second=("bert-large 512 32" "albert-base 512 64")
extra=(--dtype=bfloat16 --steps=10 --warmup=3 --compilation_cache="$OUT/xla_cache")
if [[ -n ${DRY:-} ]]; then
  first=("bert-base 16 4"); second=("albert-base 16 4")
  extra=(--num_hidden_layers=2 --hidden_size=64 --num_attention_heads=2 --intermediate_size=128 --steps=1 --warmup=1)
fi

left() { echo $(( budget - SECONDS )); }
# run LIMIT_S CMD...: CMD with a timeout of LIMIT_S or what is left, skipped under 20 s left
run() {
  local limit=$1; shift
  local l; l=$(left)
  (( l < limit )) && limit=$l
  if (( limit < 20 )); then echo "== skipped (budget spent): $*" >&2; return 0; fi
  timeout "$limit" "$@"
}

bench_rows() {
  for row in "$@"; do
    read -r model seq batch <<< "$row"
    for drop in 0.0 0.1; do
      args=(--variant="$model" --seq_len="$seq" --batch_size="$batch" --attention_probs_dropout_prob="$drop" "${extra[@]}")
      if [[ -n ${PRINT:-} ]]; then echo "${args[*]}"; continue; fi
      echo "== bench $model seq $seq batch $batch attention dropout $drop ($(left) s left)" >&2
      run 180 "$py" -m bert_jax.jobs.bench "${args[@]}" 2>>"$OUT/bench.stderr" \
        | sed -u "s/^{/{\"attention_dropout\": $drop, /" | tee -a "$log"
    done
  done
}

peers() {  # peer_bench.py appends each measurement to $OUT/peer_bench.jsonl as it is made
  [[ -z ${DRY:-} && -z ${PRINT:-} && -f .devbench/peer_bench.py ]] || return 0
  local model=$1
  for system in torch_eager ref_jax torch_compile; do
    echo "== peer $system $model ($(left) s left)" >&2
    run 150 "$py" .devbench/peer_bench.py --model="$model" --only="$system" --all-shapes \
      2>>"$OUT/peer.stderr" | tee -a "$OUT/peer.stdout"
  done
}

[[ -n ${PRINT:-} ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
bench_rows "${first[@]}"
peers bert-base
bench_rows "${second[@]}"
[[ -n ${PRINT:-} ]] && exit 0
peers bert-large
peers albert-base
[[ -z ${DRY:-} ]] && run 120 "$py" -m pytest -q tests/test_gpu.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
echo "results: $log $OUT/peer_bench.jsonl (${SECONDS} s)" >&2
