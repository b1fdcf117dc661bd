#!/usr/bin/env bash
# Accuracy with --wire-dtype bfloat16 against float32 on the real snippets (README "Wire"): one sap-server
# per model, float32 and bfloat16 client runs with the same seeds, noise ratio 0.25, one epoch, lr 1e-3,
# 500 held-out snippets. Prints one line per run: model dtype seed accuracy eval_examples steps bytes_sent s.
#   bash benchmarks/wire_accuracy.sh            # MiniLM split 2 (2,000 snippets, seeds 0-2), SmolLM2 split 6 (512, seeds 0-1)
# About 10 min (MiniLM) + 12 min (SmolLM2) on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1
W=${WIRE_RUNS:-$(mktemp -d -t sap-wire-XXXXXX)}
run_model() {  # model split train held lr seeds...
  local model=$1 split=$2 train=$3 held=$4 lr=$5; shift 5
  local d=$W/$model; mkdir -p "$d"
  head -n $((train + 1)) data/movie_snippets.csv >"$d/train.csv"
  { head -n 1 data/movie_snippets.csv; sed -n "$((train + 2)),$((train + held + 1))p" data/movie_snippets.csv; } >"$d/held.csv"
  sap-server --model "$model" --split "$split" --port 0 >"$d/server.out" 2>"$d/server.log" &
  local pid=$!
  for _ in $(seq 240); do grep -q "listening on" "$d/server.out" 2>/dev/null && break; sleep 0.5; done
  local addr; addr=$(sed -n 's/^sap-server listening on //p' "$d/server.out")
  for seed in "$@"; do for dt in float32 bfloat16; do
    rm -rf "$d/run-$dt-s$seed"
    sap-client train "$d/train.csv" --eval "$d/held.csv" --server "$addr" --lr "$lr" --noise-ratio 0.25 \
      --wire-dtype "$dt" --seed "$seed" --out "$d/run-$dt-s$seed" 2>"$d/client-$dt-s$seed.log"
    python -c "import json; m=json.load(open('$d/run-$dt-s$seed/metrics.json')); print('$model', '$dt', 'seed', $seed, m['eval_accuracy'], m['eval_examples'], m['steps'], m.get('bytes_sent'), round(m['seconds'], 1))"
  done; done
  kill "$pid"; wait "$pid" || true
}
run_model minilm-l6 2 2000 500 1e-3 0 1 2
run_model smollm2-135m 6 512 500 1e-3 0 1
echo "runs in $W"
