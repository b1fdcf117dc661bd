"""What the provider can read of a generative fine-tuning run, per mode, from real recorded traffic
(`make generative-leakage`).

For each mode: a `sap-server --record` process (SmolLM2-135M split 6), `sap-client train chats.jsonl` with that
mode's flags (two real processes), then `sap-client audit chats.jsonl --run RUN --recorded REC`: the sequential
attack on the hidden states the provider received (the chats, prompts and replies alike: the strongest attack on
decoders, sap_client/audit/sequential.py) and the target tokens read from the Backward gradients it received
(sap_client/audit/targets.py, a lower bound). Every mode uses the same noise key, so modes with the same noise send
the same vectors; what differs is the gradient coming back.

    python benchmarks/generative_leakage.py [--examples 96] [--attacked 8] [--modes tail0 tail1 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sap_server.launch import ServerProcess  # noqa: E402

MODES = {
    "tail0": ("no user-kept block", ["--user-tail", "0"]),
    "tail1": ("--user-tail 1", ["--user-tail", "1"]),
    "tail2": ("--user-tail 2", ["--user-tail", "2"]),
    "tail0-noise": ("no user-kept block, --noise-ratio 0.25", ["--user-tail", "0", "--noise-ratio", "0.25"]),
    "tail1-noise": ("--user-tail 1, --noise-ratio 0.25", ["--user-tail", "1", "--noise-ratio", "0.25"]),
}
TRAIN_FLAGS = ["--epochs", "1", "--batch-size", "8", "--max-length", "64", "--lr", "1e-3", "--eval-fraction", "0.1"]
DATA = ROOT / "data" / "movie_dialog.jsonl"
PUBLIC_START, PUBLIC_COUNT = 10_000, 500  # the provider's own chats: far from the attacked ones
SCRIPTS = Path(sys.executable).parent


def _lines(first: int, count: int, out: Path) -> Path:
    with DATA.open(encoding="utf-8") as source, out.open("w", encoding="utf-8") as target:
        for number, line in enumerate(source, start=1):
            if number >= first + count:
                break
            if number >= first:
                target.write(line)
    return out


def run_mode(name: str, flags: list[str], chats: Path, public: Path, attacked: int, work: Path, env: dict) -> dict:
    started = time.time()
    record, run, report = work / "recording", work / "run", work / "report"
    run.mkdir(parents=True)
    (run / "noise.key").write_text("3c" * 32 + "\n")  # one key for every mode (see the module docstring)
    server = ServerProcess.start(["--split", "6", "--port", "0", "--record", str(record)], env=env)
    try:
        client = [str(SCRIPTS / "sap-client")]
        subprocess.run(
            [*client, "train", str(chats), "--server", server.address, "--out", str(run), *TRAIN_FLAGS, *flags],
            env=env,
            check=True,
            capture_output=True,
        )
        trained = time.time()
        audit = [
            *client,
            "audit",
            str(chats),
            "--run",
            str(run),
            "--recorded",
            str(record),
            "--server",
            server.address,
            "--out",
            str(report),
            "--attack",
            "sequential",
            "--max-examples",
            str(attacked),
            "--public",
            str(public),
            "--public-examples",
            str(PUBLIC_COUNT),
        ]
        subprocess.run(audit, env=env, check=True, capture_output=True)
    finally:
        server.stop()
    metrics = json.loads((run / "metrics.json").read_text())
    figures = json.loads((report / "report.json").read_text())
    return {
        "mode": name,
        "hidden_tokens_read": figures["eia_token_recovery"],
        "hidden_content_read": figures["eia_token_recovery_content"],
        "hidden_tokens": figures["eia_tokens"],
        "attacked_chats": figures["examples"],
        "targets_read": figures["targets_read"],
        "target_tokens": figures["target_tokens"],
        "noise_to_signal": metrics["noise_to_signal"],
        "perplexity_before": metrics["eval_perplexity_before"],
        "perplexity_after": metrics["eval_perplexity"],
        "train_seconds": round(trained - started, 1),
        "audit_seconds": round(time.time() - trained, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=96, help="chats trained on (the first of the data)")
    parser.add_argument("--attacked", type=int, default=8, help="chats the sequential attack inverts")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    work = Path(tempfile.mkdtemp(prefix="sap-generative-leakage-"))
    rows = []
    try:
        chats = _lines(1, args.examples, work / "chats.jsonl")
        public = _lines(PUBLIC_START, PUBLIC_COUNT, work / "public.jsonl")
        for key in args.modes:
            label, flags = MODES[key]
            row = run_mode(label, flags, chats, public, args.attacked, work / key, env)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch
    import transformers

    command = "python benchmarks/generative_leakage.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    lines = [
        "# What the provider reads of a generative fine-tuning run, per mode",
        "",
        f"`{command}` (make generative-leakage), {time.strftime('%Y-%m-%d')}: SmolLM2-135M-Instruct split 6, LoRA, "
        f"the first {args.examples} chats of data/movie_dialog.jsonl (one-turn movie dialogue, loss on the replies), "
        f"`sap-client train {' '.join(TRAIN_FLAGS)}` plus the mode's flags, against a `sap-server --record`; then "
        f"`sap-client audit --run RUN --recorded REC --attack sequential --max-examples {args.attacked}` with "
        f"{PUBLIC_COUNT} public chats (lines {PUBLIC_START}..) for the attack's probe. Hidden states: tokens of the "
        f"first {args.attacked} training chats (prompt and reply) recovered by the sequential attack from the "
        "recorded Forward tensors. Targets: reply tokens read from every recorded Backward gradient row that has "
        "one (the lowest <E_v, gamma * g>; the norm's Jacobian ignored, so a lower bound). Seed 0, one noise key.",
        "",
        "| mode | chat tokens read from the hidden states | content tokens | reply tokens read from the gradients "
        "| noise/signal | held-out perplexity before / after |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['mode']} | {r['hidden_tokens_read']:.1%} of {r['hidden_tokens']} | {r['hidden_content_read']:.1%} "
            f"| {r['targets_read']:.1%} of {r['target_tokens']} | {r['noise_to_signal']:.2f} "
            f"| {r['perplexity_before']:.1f} / {r['perplexity_after']:.1f} |"
            for r in rows
        ),
        "",
        f"Wall time {sum(r['train_seconds'] + r['audit_seconds'] for r in rows):.0f} s (train + audit per mode: "
        + ", ".join(f"{r['train_seconds']:.0f} + {r['audit_seconds']:.0f} s" for r in rows)
        + f"); python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {os.cpu_count()} CPUs.",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generative_leakage.md").write_text("\n".join(lines))
    (args.out / "generative_leakage.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
