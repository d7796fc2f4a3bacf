#!/usr/bin/env bash
# The device-machine script of the performance issue: everything to measure on one GPU in
# one run, bert_jax's bench and the peers side by side on the same card.
#   cp ../shared/bench/peer_bench.py .devbench/   (git-ignored; it travels with `carry`)
#   run: bash experiments/gpu/h200.sh   (results under $OUT, default ./runs/gpu)
# Rows (the issue's targets): BERT-base 128x256 and 512x64, BERT-large 512x32, ALBERT-base
# 512x64; bf16; each with the paper's attention-probability dropout 0.1 and with 0 (the
# fused cuDNN kernel). Then the peer script on the same rows, then the GPU tests.
# CPU dry run (tiny shapes, no peers): DRY=1 bash experiments/gpu/h200.sh
# PRINT=1: print each bench command line instead of running anything (a test parses them).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-runs/gpu}; [[ -n ${PRINT:-} ]] || mkdir -p "$OUT"; export OUT
py=${PYTHON:-python3}
log="$OUT/bench.jsonl"
rows=("bert-base 128 256" "bert-base 512 64" "bert-large 512 32" "albert-base 512 64")
extra=(--dtype=bfloat16 --steps=10 --warmup=3 --compilation_cache="$OUT/xla_cache")
if [[ -n ${DRY:-} ]]; then
  rows=("bert-base 16 4" "albert-base 16 4")
  extra=(--num_hidden_layers=2 --hidden_size=64 --num_attention_heads=2 --intermediate_size=128 --steps=1 --warmup=1)
fi
[[ -n ${PRINT:-} ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
for row in "${rows[@]}"; do
  read -r model seq batch <<< "$row"
  for drop in 0.1 0.0; do
    args=(--variant="$model" --seq_len="$seq" --batch_size="$batch" --attention_probs_dropout_prob="$drop" "${extra[@]}")
    if [[ -n ${PRINT:-} ]]; then echo "${args[*]}"; continue; fi
    echo "== bench $model seq $seq batch $batch attention dropout $drop" >&2
    timeout 300 "$py" -m bert_jax.jobs.bench "${args[@]}" 2>>"$OUT/bench.stderr" \
      | sed "s/^{/{\"attention_dropout\": $drop, /" | tee -a "$log"
  done
done
[[ -n ${PRINT:-} ]] && exit 0
if [[ -z ${DRY:-} && -f .devbench/peer_bench.py ]]; then
  for model in bert-base bert-large albert-base; do
    echo "== peers $model" >&2
    timeout 600 "$py" .devbench/peer_bench.py --model="$model" --only=torch_eager --only=torch_compile \
      --only=ref_jax --all-shapes 2>>"$OUT/peer.stderr" | tee -a "$OUT/peer.stdout"
  done
fi
[[ -z ${DRY:-} ]] && timeout 300 "$py" -m pytest -q tests/test_gpu.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
echo "results: $log $OUT/peer_bench.jsonl" >&2
