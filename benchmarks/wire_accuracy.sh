#!/usr/bin/env bash
# Accuracy with --wire-dtype bfloat16 against float32 on the real snippets (README "Wire").
# A paired design: one sap-server per model; for every seed a float32 and a bfloat16 client run with the
# same seed (data order, adapter initialisation, dropout) and the same noise key (written into both run
# folders before they start), so the wire dtype is the only thing that differs between the two runs of a
# pair. Noise ratio 0.25, one epoch, lr 1e-3, the same held-out snippets for every run.
# Prints one line per run (model dtype seed accuracy eval_examples steps bytes_sent seconds), then per model
# the mean of each dtype and the mean, smallest and largest paired difference (bfloat16 - float32).
#   bash benchmarks/wire_accuracy.sh     # MiniLM split 2 (4,000 snippets, 1,000 held out, seeds 0-2),
#                                        # SmolLM2 split 6 (512 snippets, 1,000 held out, seeds 0-2)
#   WIRE_MODELS=minilm-l6 WIRE_SEEDS="0 1" bash benchmarks/wire_accuracy.sh   # a subset
# About 25 min (MiniLM: about 4 min a run) + 20 min (SmolLM2: about 3.5 min a run) on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1
W=${WIRE_RUNS:-$(mktemp -d -t sap-wire-XXXXXX)}
MODELS=${WIRE_MODELS:-"minilm-l6 smollm2-135m"}
run_model() {  # model split train held lr seeds...
  local model=$1 split=$2 train=$3 held=$4 lr=$5; shift 5
  local d=$W/$model; mkdir -p "$d"
  head -n $((train + 1)) data/movie_snippets.csv >"$d/train.csv"
  { head -n 1 data/movie_snippets.csv; sed -n "$((train + 2)),$((train + held + 1))p" data/movie_snippets.csv; } >"$d/held.csv"
  sap-server --model "$model" --split "$split" --port 0 >"$d/server.out" 2>"$d/server.log" &
  local pid=$!
  for _ in $(seq 240); do grep -q "listening on" "$d/server.out" 2>/dev/null && break; sleep 0.5; done
  local addr; addr=$(sed -n 's/^sap-server listening on //p' "$d/server.out")
  for seed in "$@"; do
    local key; key=$(python -c "import secrets; print(secrets.token_hex(32))")
    for dt in float32 bfloat16; do
      local run=$d/run-$dt-s$seed
      rm -rf "$run"; mkdir -p "$run"; (umask 077; echo "$key" >"$run/noise.key")
      sap-client train "$d/train.csv" --eval "$d/held.csv" --server "$addr" --lr "$lr" --noise-ratio 0.25 \
        --wire-dtype "$dt" --seed "$seed" --out "$run" 2>"$d/client-$dt-s$seed.log"
      python -c "import json; m=json.load(open('$run/metrics.json')); print('$model', '$dt', 'seed', $seed, m['eval_accuracy'], m['eval_examples'], m['steps'], m.get('bytes_sent'), round(m['seconds'], 1))"
    done
  done
  kill "$pid"; wait "$pid" || true
  python - "$d" "$@" <<'EOF'
import json, statistics, sys
from pathlib import Path
d, seeds = Path(sys.argv[1]), sys.argv[2:]
acc = {dt: [json.loads((d / f"run-{dt}-s{s}" / "metrics.json").read_text())["eval_accuracy"] for s in seeds]
       for dt in ("float32", "bfloat16")}
diff = [b - f for f, b in zip(acc["float32"], acc["bfloat16"])]
print(f"{d.name}: {len(seeds)} pairs; float32 mean {statistics.mean(acc['float32']):.4f}, bfloat16 mean "
      f"{statistics.mean(acc['bfloat16']):.4f}; paired difference (bfloat16 - float32) mean {statistics.mean(diff):+.4f}, "
      f"min {min(diff):+.4f}, max {max(diff):+.4f}")
EOF
}
for model in $MODELS; do
  case $model in
    minilm-l6) run_model minilm-l6 2 4000 1000 1e-3 ${WIRE_SEEDS:-0 1 2} ;;
    smollm2-135m) run_model smollm2-135m 6 512 1000 1e-3 ${WIRE_SEEDS:-0 1 2} ;;
    *) echo "unknown model $model" >&2; exit 2 ;;
  esac
done
echo "runs in $W"
