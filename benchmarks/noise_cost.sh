#!/usr/bin/env bash
# Accuracy cost of privacy noise on the default model (SmolLM2-135M, split 6, LoRA) and real snippets:
# 512 training snippets (rows 1-512 of data/movie_snippets.csv), 500 held-out (rows 513-1012), 1 epoch,
# lr 1e-3, seed 0; no noise, then each noise ratio without and with CTI. Results: benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
RATIOS=${RATIOS:-"1 2 4"}
work=$(mktemp -d)
out=benchmarks/results/noise_cost
mkdir -p "$out"
head -n 513 data/movie_snippets.csv >"$work/train.csv"
{ head -n 1 data/movie_snippets.csv; sed -n '514,1013p' data/movie_snippets.csv; } >"$work/eval.csv"

sap-server --split 6 --port 0 >"$work/server.out" 2>"$work/server.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 240); do grep -q "listening on" "$work/server.out" && break; sleep 0.5; done
address=$(sed -n 's/^sap-server listening on //p' "$work/server.out")

run() {  # name, extra flags...  (a finished run is kept, not repeated)
    local name=$1; shift
    [ -f "$out/$name/metrics.json" ] && return 0
    sap-client train "$work/train.csv" --eval "$work/eval.csv" --server "$address" --lr 1e-3 --epochs 1 \
        --seed 0 --out "$out/$name" "$@"
}
run no-noise
for r in $RATIOS; do
    run "ratio-$r" --noise-ratio "$r"
    run "ratio-$r-cti" --noise-ratio "$r" --cti
done
python - "$out" <<'PY'
import json, sys, pathlib
rows = []
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    m = json.loads((d / "metrics.json").read_text())
    rows.append(f"| {d.name} | {m['noise_ratio'] or '-'} | {m['eta'] or '-'} | {'yes' if m['cti'] else 'no'} | "
                f"{m['noise_to_signal']:.2f} | {m['eval_accuracy']:.3f} |")
print("| run | noise ratio | eta | CTI | measured noise/signal | eval accuracy (500) |")
print("|---|---|---|---|---|---|")
print("\n".join(rows))
PY
