#!/usr/bin/env bash
# Local demo: a provider (sap-server) and a user (sap-client) as two processes on this machine.
# SmolLM2-135M split at block 6 (6 blocks here, 24 on the provider), LoRA, real movie snippets.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

EXAMPLES=${DEMO_EXAMPLES:-640}      # 80% train (512), 20% held out, stratified
EPOCHS=${DEMO_EPOCHS:-1}
LR=${DEMO_LR:-1e-3}
RUN=${DEMO_RUN:-demo-run}
mkdir -p "$RUN"
server_log="$RUN/server.log"

echo "== starting sap-server (SmolLM2-135M, --split 6, LoRA); log: $server_log"
sap-server --split 6 --port 0 >"$RUN/server.out" 2>"$server_log" &
server_pid=$!
stop_server() {
    if kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" && echo "== sap-server stopped (exit 0)" || echo "== sap-server exited with $?"
    fi
}
trap stop_server EXIT

for _ in $(seq 240); do
    grep -q "listening on" "$RUN/server.out" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { echo "sap-server failed to start:"; cat "$server_log"; exit 1; }
    sleep 0.5
done
address=$(sed -n 's/^sap-server listening on //p' "$RUN/server.out")
[ -n "$address" ] || { echo "sap-server did not report its address"; exit 1; }
echo "== sap-server listening on $address"

echo "== sap-client train: $EXAMPLES real movie snippets, $EPOCHS epoch(s), lr $LR"
sap-client train data/movie_snippets.csv --server "$address" --max-examples "$EXAMPLES" \
    --eval-fraction 0.2 --epochs "$EPOCHS" --lr "$LR" --out "$RUN"

python - "$RUN/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"== result: eval accuracy {m['eval_accuracy']:.3f} (majority class {m['eval_majority']:.3f}) "
      f"on {m['eval_examples']} held-out snippets; train loss {m['train_loss']:.3f}; {m['steps']} steps, "
      f"{m['examples_per_second']:.1f} examples/s; sent {m['bytes_sent'] / 1e6:.1f} MB, "
      f"received {m['bytes_received'] / 1e3:.1f} kB")
PY
