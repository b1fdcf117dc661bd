#!/usr/bin/env bash
# Local demo: a provider (sap-server) and a user (sap-client) as two processes on this machine.
# SmolLM2-135M split at block 6 (6 blocks here, 24 on the provider), LoRA, real movie snippets,
# d_chi noise on every token vector sent; then private evaluation from a new client process.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

TRAIN=${DEMO_TRAIN:-512}          # training snippets: rows 1..TRAIN of data/movie_snippets.csv
HELD=${DEMO_HELD:-500}            # held-out snippets: the next HELD rows
EPOCHS=${DEMO_EPOCHS:-1}
LR=${DEMO_LR:-1e-3}
NOISE_RATIO=${DEMO_NOISE_RATIO:-0.25}   # E||noise|| = 0.25 x mean||h||; see README "Accuracy cost of the noise"
RUN=${DEMO_RUN:-demo-run}
rm -rf "$RUN" && mkdir -p "$RUN"
head -n $((TRAIN + 1)) data/movie_snippets.csv >"$RUN/train.csv"
{ head -n 1 data/movie_snippets.csv; sed -n "$((TRAIN + 2)),$((TRAIN + HELD + 1))p" data/movie_snippets.csv; } \
    >"$RUN/heldout.csv"

echo "== starting sap-server (SmolLM2-135M, --split 6, LoRA); log: $RUN/server.log"
sap-server --split 6 --port 0 --state-dir "$RUN/server-state" >"$RUN/server.out" 2>"$RUN/server.log" &
server_pid=$!
stop_server() {
    if kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" && echo "== sap-server stopped (exit 0)" || echo "== sap-server exited with $?"
    fi
}
trap stop_server EXIT

address=$(python -m sap_server.launch wait "$RUN/server.out" --pid "$server_pid" --timeout 120) || {
    echo "sap-server failed to start:"; cat "$RUN/server.log"; exit 1
}
echo "== sap-server listening on $address"

echo "== sap-client train: $TRAIN real snippets, noise ratio $NOISE_RATIO, $EPOCHS epoch(s), lr $LR"
sap-client train "$RUN/train.csv" --eval "$RUN/heldout.csv" --server "$address" --epochs "$EPOCHS" --lr "$LR" \
    --noise-ratio "$NOISE_RATIO" --out "$RUN/run"

echo "== sap-client evaluate (a new process, reattaching to the kept adapter, same noise)"
sap-client evaluate "$RUN/heldout.csv" --run "$RUN/run" --server "$address"

python - "$RUN/run/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"== result: eval accuracy {m['eval_accuracy']:.3f} (majority class {m['eval_majority']:.3f}) on "
      f"{m['eval_examples']} held-out snippets; noise eta {m['eta']:.3g} (measured noise/signal "
      f"{m['noise_to_signal']:.2f}); {m['steps']} steps, {m['examples_per_second']:.1f} examples/s; "
      f"sent {m['bytes_sent'] / 1e6:.1f} MB")
PY
echo "== privacy statement of the run (what these settings protect, and what not): $RUN/run/privacy.md"
grep -E '^- \*\*(Formal guarantee|Labels)' "$RUN/run/privacy.md" | sed 's/^/   /'
echo "   measure what the strongest attacks recover: sap-client audit $RUN/train.csv --run $RUN/run --out $RUN/audit --server ADDRESS"
