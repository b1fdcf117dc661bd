"""Label leakage per mode, measured on recorded real traffic (`make label-table`).

For each model and mode: a real `sap-server --record` and a real `sap-client train` (two processes, loopback), on
real movie snippets (data/movie_snippets.csv, rows 1..TRAIN for training, the next HELD rows held out), no
hidden-state noise (the label leakage is the question here); then `sap-client audit --recorded` reads the labels
back from the recorded Backward gradients (sign rule on dL/dlogits; tracked direction, norm scoring and clustering
on dL/dpooled, and on dL/dh below a user-kept tail at the position the head reads) and scores them against the
true labels. Reported per cell: label-inference accuracy and its majority baseline, the attack that got it, eval
accuracy (true labels), wire bytes per training example.

    python benchmarks/label_table.py [--models smollm2-135m:6 minilm-l6:4] [--train 1000] [--held 500]
                                     [--modes standard private-head ...] [--out benchmarks/results]

Each finished cell is kept in OUT/label_cells/<cell>.json, so an interrupted run resumes where it stopped; the
table (label_table.md, label_table.csv) is rebuilt from every cell at the end.
"""

from __future__ import annotations

import argparse
import csv
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

# mode name -> sap-client train flags
MODES: dict[str, list[str]] = {
    "standard": [],
    "private-head": ["--private-head"],
    "label-eps 1": ["--label-epsilon", "1"],
    "label-eps 2": ["--label-epsilon", "2"],
    "label-eps 4": ["--label-epsilon", "4"],
    "private-head, label-eps 1": ["--private-head", "--label-epsilon", "1"],
    "private-head, label-eps 2": ["--private-head", "--label-epsilon", "2"],
    "private-head, label-eps 4": ["--private-head", "--label-epsilon", "4"],
    "user-tail 1": ["--user-tail", "1"],
    "user-tail 1, label-eps 1": ["--user-tail", "1", "--label-epsilon", "1"],
    "user-tail 1, label-eps 2": ["--user-tail", "1", "--label-epsilon", "2"],
    "user-tail 1, label-eps 4": ["--user-tail", "1", "--label-epsilon", "4"],
}
DEFAULT_MODELS = ("smollm2-135m:6", "minilm-l6:4")
SEED, LR, BATCH, EPOCHS = 0, "1e-3", "16", "1"


def _cell_name(model: str, split: int, mode: str) -> str:
    return f"{model}-k{split}-{mode.replace(', ', '+').replace(' ', '')}"


def _client(args: list[str], env: dict, log: Path) -> None:
    with log.open("a") as handle:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "sap-client"), *args], env=env, stdout=handle, stderr=handle
        )
    if done.returncode != 0:
        raise RuntimeError(f"sap-client {args[0]} failed ({done.returncode}); see {log}")


def run_cell(model: str, split: int, mode: str, train: Path, held: Path, work: Path) -> dict:
    """One mode on one model: train through a recording server, then read the labels from the recording."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    record, run, audit, log = work / "recording", work / "run", work / "audit", work / "client.log"
    started = time.time()
    server = ServerProcess.start(
        ["--model", model, "--split", str(split), "--port", "0", "--record", str(record)],
        env=env,
        log=work / "server.log",
        timeout=600,
    )
    try:
        flags = ["--server", server.address]
        _client(
            [
                "train",
                str(train),
                "--eval",
                str(held),
                "--out",
                str(run),
                "--epochs",
                EPOCHS,
                "--lr",
                LR,
                "--batch-size",
                BATCH,
                "--seed",
                str(SEED),
                *flags,
                *MODES[mode],
            ],
            env,
            log,
        )
        # the inversion part of the audit is cut to two texts: this table is about the labels, which are read
        # from every recorded gradient of the whole training file
        _client(
            [
                "audit",
                str(train),
                "--run",
                str(run),
                "--recorded",
                str(record),
                "--out",
                str(audit),
                "--max-examples",
                "2",
                "--attack",
                "nn",
                *flags,
            ],
            env,
            log,
        )
    finally:
        server.stop(timeout=60)
    metrics = json.loads((run / "metrics.json").read_text())
    report = json.loads((audit / "report.json").read_text())
    return {
        "model": model,
        "split": split,
        "mode": mode,
        "label_inference_accuracy": report.get("label_inference_accuracy"),
        "label_inference_baseline": report.get("label_inference_baseline"),
        "label_inference_examples": report.get("label_inference_examples"),
        "label_attack": report.get("label_attack"),
        "label_attacks": report.get("label_attacks"),
        "label_keep_probability": (metrics.get("label_dp") or {}).get("keep_probability"),
        # the share of training labels this run's randomized response happened to keep (its own draw)
        "label_kept_fraction": 1 - metrics["label_dp"]["flipped"] / metrics["label_dp"]["examples"]
        if metrics.get("label_dp")
        else None,
        "eval_accuracy": metrics["eval_accuracy"],
        "eval_majority": metrics["eval_majority"],
        "train_examples": metrics["train_examples"],
        "wire_bytes_per_example": (metrics["bytes_sent"] + metrics["bytes_received"]) / metrics["examples"],
        "seconds": round(time.time() - started, 1),
    }


def _slice(source: Path, start: int, count: int, target: Path) -> Path:
    """Rows start..start+count-1 (1-based, after the header) of a CSV, with the header."""
    with source.open(newline="") as handle:
        rows = list(csv.reader(handle))
    with target.open("w", newline="") as handle:
        csv.writer(handle).writerows([rows[0], *rows[start : start + count]])
    return target


def markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| model | k | mode | labels read (attack) | baseline | RR allows | RR kept in this run | eval accuracy "
        "| wire bytes / example |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        keep, kept = r["label_keep_probability"], r.get("label_kept_fraction")
        lines.append(
            f"| {r['model']} | {r['split']} | {r['mode']} | {r['label_inference_accuracy']:.3f} ({r['label_attack']}) "
            f"| {r['label_inference_baseline']:.3f} | {'-' if keep is None else f'{keep:.3f}'} "
            f"| {'-' if kept is None else f'{kept:.3f}'} | {r['eval_accuracy']:.3f} "
            f"| {r['wire_bytes_per_example']:,.0f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="MODEL:SPLIT pairs")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--train", type=int, default=1000, help="training snippets (default %(default)s)")
    parser.add_argument("--held", type=int, default=500, help="held-out snippets (default %(default)s)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "movie_snippets.csv")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    cells = args.out / "label_cells"
    cells.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sap-label-table-") as scratch:
        train = _slice(args.data, 1, args.train, Path(scratch) / "train.csv")
        held = _slice(args.data, 1 + args.train, args.held, Path(scratch) / "held.csv")
        for pair in args.models:
            model, split = pair.rsplit(":", 1)
            for mode in args.modes:
                path = cells / f"{_cell_name(model, int(split), mode)}.json"
                if path.exists():
                    continue
                work = Path(scratch) / path.stem
                work.mkdir()
                print(f"[label-table] {model} k={split} {mode} ...", flush=True)
                try:
                    row = run_cell(model, int(split), mode, train, held, work)
                except Exception:
                    shutil.copytree(work, args.out / "label_failed" / path.stem, dirs_exist_ok=True)
                    raise
                path.write_text(json.dumps(row, indent=2) + "\n")
                print(f"[label-table]   {json.dumps(row)}", flush=True)
    order = {m: i for i, m in enumerate(MODES)}
    rows = sorted(
        (json.loads(p.read_text()) for p in cells.glob("*.json")), key=lambda r: (r["model"], order[r["mode"]])
    )
    seconds = time.time() - started
    total = sum(r["seconds"] for r in rows)
    cell_times = ", ".join(f"{r['model']} {r['mode']} {r['seconds']:.0f} s" for r in rows)
    with (args.out / "label_table.csv").open("w", newline="") as handle:
        fields = list(dict.fromkeys(k for r in rows for k in r if k != "label_attacks"))  # not every mode has all
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k != "label_attacks"} for r in rows)
    import torch
    import transformers

    text = [
        "# Label leakage per mode (recorded real traffic)",
        "",
        f"`python benchmarks/label_table.py {' '.join(argv or sys.argv[1:])}` (make label-table); "
        f"{args.train} training / {args.held} held-out movie snippets (data/movie_snippets.csv rows 1..{args.train}, "
        f"then the next {args.held}), 1 epoch, lr {LR}, batch {BATCH}, seed {SEED}, LoRA, no hidden-state noise. "
        f"Labels read: `sap-client audit --recorded` on every recorded Backward gradient of the run, scored against "
        f"the true labels (sign rule on dL/dlogits; the strongest of tracked direction scoring and clustering, each "
        f"named by the prior or 31 known labels, and norm scoring, on dL/dpooled, or with a user-kept tail on the "
        f"rows of dL/dh at the position the head reads). RR allows: the probability randomized response keeps "
        f"a label; the gradients carry the randomized label, so an attack that reads it exactly (the sign rule does) "
        f"scores the fraction kept in the run. That is the bound for a provider with no other clue: one who also "
        f"classifies the text it receives (here un-noised hidden states) starts from about the eval accuracy, and "
        f"label DP only bounds how far the gradients move it from there (posterior odds at most e^eps times the "
        f"prior odds). Wire bytes: sent + received per training "
        f"example, bottom (and tail) download excluded.",
        "",
        *markdown(rows),
        "",
        f"Wall time: {total / 60:.0f} min over all cells, each its own measure ({cell_times}); this invocation "
        f"{seconds:.0f} s (finished cells are reused); python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs.",
        "",
    ]
    (args.out / "label_table.md").write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
