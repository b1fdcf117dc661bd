#!/usr/bin/env bash
# Generative fine-tuning demo: SmolLM2-135M-Instruct, split at block 6, learns to reply like a film script
# (data/movie_dialog.jsonl, one-turn chats, the loss on the replies only). The provider returns its last
# block's output; the user runs the last block (--user-tail 1, its own LoRA), the final norm and the tied
# output layer. Held-out perplexity before and after is the result.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

TRAIN=${SFT_TRAIN:-1000}           # training chats: lines 1..TRAIN of data/movie_dialog.jsonl
HELD=${SFT_HELD:-200}              # held-out chats: the next HELD lines
EPOCHS=${SFT_EPOCHS:-1}
LR=${SFT_LR:-1e-3}
TAIL=${SFT_USER_TAIL:-1}
NOISE=${SFT_NOISE:-}               # e.g. "--noise-ratio 0.25"; empty: no noise (the privacy statement says so)
RUN=${SFT_RUN:-sft-demo-run}
rm -rf "$RUN" && mkdir -p "$RUN"
head -n "$TRAIN" data/movie_dialog.jsonl >"$RUN/train.jsonl"
sed -n "$((TRAIN + 1)),$((TRAIN + HELD))p" data/movie_dialog.jsonl >"$RUN/heldout.jsonl"

echo "== starting sap-server (SmolLM2-135M-Instruct, --split 6, LoRA); log: $RUN/server.log"
sap-server --split 6 --port 0 >"$RUN/server.out" 2>"$RUN/server.log" &
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

echo "== sap-client train: $TRAIN chats, --user-tail $TAIL, $EPOCHS epoch(s), lr $LR ${NOISE:-(no noise)}"
# shellcheck disable=SC2086
sap-client train "$RUN/train.jsonl" --eval "$RUN/heldout.jsonl" --server "$address" --epochs "$EPOCHS" \
    --lr "$LR" --user-tail "$TAIL" --batch-size 16 --max-length 96 $NOISE --out "$RUN/run"

python - "$RUN/run/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"== result: held-out perplexity {m['eval_perplexity_before']:.2f} before, {m['eval_perplexity']:.2f} after "
      f"({m['eval_examples']} chats, loss on the replies); {m['steps']} steps in {m['seconds']:.0f} s, "
      f"{m['tokens_per_second']:.0f} training tokens/s; {m['bytes_per_train_token']:.0f} wire bytes per token")
PY
echo "== privacy statement of the run: $RUN/run/privacy.md"
grep -E '^- \*\*(Formal guarantee|Targets)' "$RUN/run/privacy.md" | sed 's/^/   /'

prompt=$(python - "$RUN/heldout.jsonl" <<'PY'
import json, sys
print(json.loads(open(sys.argv[1]).readline())["messages"][0]["content"])
PY
)
echo "== sap-client generate (split generation, the run's adapter, tail and noise): a held-out line"
echo "   user: $prompt"
echo -n "   model: "
sap-client generate --run "$RUN/run" --server "$address" --prompt "$prompt" --max-new-tokens 48 --greedy
