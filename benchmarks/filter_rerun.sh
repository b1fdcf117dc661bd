#!/usr/bin/env bash
# Plain d_chi against --learned-filter as a user runs them (README, "Defence: the learned filter"): MiniLM split 4,
# noise ratio 2, 9,000 snippets x 3 epochs, the other 1,603 held out, lr 1e-3, batch 16, seed 0; a recording
# sap-server and sap-client in two processes, then the audit of the recording. Usage:
#   bash benchmarks/filter_rerun.sh plain & bash benchmarks/filter_rerun.sh filter   # about 35 min side by side
# Results under $WORK (default /tmp/sap-filter-rerun); the figures of 2026-12-07 are in results/filter_rerun.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
MODE=$1
work=${WORK:-/tmp/sap-filter-rerun}/$MODE
mkdir -p "$work"
head -n 9001 data/movie_snippets.csv >"$work/train.csv"
{ head -n 1 data/movie_snippets.csv; tail -n +9002 data/movie_snippets.csv; } >"$work/eval.csv"
.venv/bin/sap-server --model minilm-l6 --split 4 --port 0 --record "$work/record" >"$work/server.out" 2>"$work/server.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
address=$(.venv/bin/python -m sap_server.launch wait "$work/server.out" --pid $pid)
extra=()
[ "$MODE" = filter ] && extra=(--learned-filter)
start=$(date +%s)
.venv/bin/sap-client train "$work/train.csv" --eval "$work/eval.csv" --server "$address" --noise-ratio 2 \
    --epochs 3 --lr 1e-3 --batch-size 16 --seed 0 --out "$work/run" "${extra[@]}" 2>"$work/train.log"
echo "train seconds $(($(date +%s) - start))" >"$work/seconds.txt"
start=$(date +%s)
.venv/bin/sap-client audit "$work/train.csv" --run "$work/run" --recorded "$work/record" --server "$address" \
    --max-examples 24 --public "$work/eval.csv" --out "$work/audit" 2>"$work/audit.log"
echo "audit seconds $(($(date +%s) - start))" >>"$work/seconds.txt"
