#!/usr/bin/env bash
# The issue table's runs with and without --learned-filter, as a user runs them (README, "Defence: the learned
# filter"): MiniLM split 4, noise ratio 2, the first ROWS snippets x EPOCHS epochs (default 9,000 x 3), the last
# 1,603 held out, lr 1e-3, batch 16, seed 0; a recording sap-server and sap-client in two processes, then the audit
# of the recording. Usage:
#   bash benchmarks/filter_rerun.sh MODE [ROWS EPOCHS]
#   MODE: plain | filter | filter-rescale (with --rescale-noised) | filter-fresh (with --fresh-noise)
#   bash benchmarks/filter_rerun.sh plain & bash benchmarks/filter_rerun.sh filter   # about 35 min side by side
# Results under $WORK (default /tmp/sap-filter-rerun)/MODE-ROWSxEPOCHS, the figures in its summary.json; those
# of 2026-12-07 are in results/filter_rerun.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
MODE=$1
ROWS=${2:-9000}
EPOCHS=${3:-3}
case $MODE in
    plain) extra=() ;;
    filter) extra=(--learned-filter) ;;
    filter-rescale) extra=(--learned-filter --rescale-noised) ;;
    filter-fresh) extra=(--learned-filter --fresh-noise) ;;
    *) echo "MODE must be plain, filter, filter-rescale or filter-fresh, got $MODE" >&2; exit 2 ;;
esac
work=${WORK:-/tmp/sap-filter-rerun}/$MODE-${ROWS}x$EPOCHS
mkdir -p "$work"
head -n $((ROWS + 1)) data/movie_snippets.csv >"$work/train.csv"
{ head -n 1 data/movie_snippets.csv; tail -n 1603 data/movie_snippets.csv; } >"$work/eval.csv"
.venv/bin/sap-server --model minilm-l6 --split 4 --port 0 --record "$work/record" >"$work/server.out" 2>"$work/server.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
address=$(.venv/bin/python -m sap_server.launch wait "$work/server.out" --pid $pid)
start=$(date +%s)
.venv/bin/sap-client train "$work/train.csv" --eval "$work/eval.csv" --server "$address" --noise-ratio 2 \
    --epochs "$EPOCHS" --lr 1e-3 --batch-size 16 --seed 0 --out "$work/run" "${extra[@]}" 2>"$work/train.log"
train_seconds=$(($(date +%s) - start))
start=$(date +%s)
.venv/bin/sap-client audit "$work/train.csv" --run "$work/run" --recorded "$work/record" --server "$address" \
    --max-examples 24 --public "$work/eval.csv" --out "$work/audit" 2>"$work/audit.log"
audit_seconds=$(($(date +%s) - start))
.venv/bin/python - "$work" "$train_seconds" "$audit_seconds" <<'PY'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
metrics = json.loads((work / "run" / "metrics.json").read_text())
report = json.loads((work / "audit" / "report.json").read_text())
summary = {
    "eval_accuracy": metrics["eval_accuracy"],
    "per_epoch": [entry["eval_accuracy"] for entry in metrics["history"]],
    "noise_to_signal": metrics.get("noise_to_signal"),
    "learned_filter": metrics.get("learned_filter"),
    "eia_token_recovery": report["eia_token_recovery"],
    "eia_attack": report["attack"],
    "eia_attacks": {kind: attack["recovery"] for kind, attack in report["eia_attacks"].items()},
    "eia_token_recovery_content": report["eia_token_recovery_content"],
    "label_inference_accuracy": report.get("label_inference_accuracy"),
    "train_seconds": int(sys.argv[2]),
    "audit_seconds": int(sys.argv[3]),
}
(work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
PY
