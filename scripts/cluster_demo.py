"""make cluster-demo: a local Ray cluster with two provider replicas behind the router, four users training at once,
one replica killed (SIGKILL) in the middle; every run finishes, and its weights equal an uninterrupted run's.

    python scripts/cluster_demo.py [--model minilm-l6] [--split 2] [--runs 4] [--kill-after 12]

1. `sap-cluster --replicas 2 --state-dir STATE -- --model M --split K --checkpoint-every 5`;
2. `sap-client train` x runs against the router at once (each its own seed, 2 epochs of real snippets);
3. --kill-after seconds after every user opened its session, SIGKILL the replica that holds the most sessions;
4. a run cut short continues with `sap-client resume RUN_DIR` (as after a server restart);
5. the same runs again against one plain sap-server, uninterrupted; the kept adapters are compared tensor by tensor.

Prints one JSON line: runs_completed, lost_steps (steps the provider's kept adapter lacks or has twice, against the
uninterrupted run), weights_equal_to_uninterrupted, redone_steps (steps repeated after a resume: allowed),
resume_seconds (per cut run: from the kill until its `sap-client resume` is back at its checkpoint), and more.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_file  # noqa: E402

from sap_server.launch import ServerProcess  # noqa: E402

BIN = Path(sys.executable).parent
REPLICA = re.compile(r"^replica (\S+) pid (\d+) at (\S+)$")


def client(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "sap-client"), *args], stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env, cwd=ROOT
    )


def train_args(data: Path, server: str, out: Path, seed: int) -> list[str]:
    """The run's flags; its noise key is written first, the same for a run and its uninterrupted twin (a real
    client draws a random one)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise.key").write_text(f"{seed + 1:064x}\n")
    return [
        "train",
        str(data),
        "--server",
        server,
        "--out",
        str(out),
        "--seed",
        str(seed),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--eval-fraction",
        "0.1",
        "--noise-ratio",
        "0.5",
    ]


def kept_adapter(state: Path, run: Path) -> tuple[dict, dict]:
    """(the provider's kept adapter's weights, its metadata) of a finished run."""
    adapter_id = json.loads((run / "run.json").read_text())["adapter_id"]
    folder = state / "adapters" / adapter_id
    return load_file(str(folder / "adapter.safetensors")), json.loads((folder / "adapter.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--split", type=int, default=2)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--examples", type=int, default=320, help="the first rows of data/movie_snippets.csv")
    parser.add_argument(
        "--kill-after", type=float, default=15.0, help="seconds after every user opened its session (default 15)"
    )
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--work", type=Path, help="keep everything here (default: a temporary folder)")
    settings = parser.parse_args(argv)
    work = settings.work or Path(tempfile.mkdtemp(prefix="sap-cluster-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "SAP_CACHE_DIR": str(work / "cache")}
    data = work / "data.csv"
    lines = (ROOT / "data" / "movie_snippets.csv").read_text().splitlines(keepends=True)
    data.write_text("".join(lines[: settings.examples + 1]))
    server_args = ["--model", settings.model, "--split", str(settings.split)]
    server_args += ["--checkpoint-every", str(settings.checkpoint_every)]
    started = time.monotonic()

    # 1-4: the cluster, the users, the kill, the resumes
    state = work / "cluster-state"
    cluster = ServerProcess.start(
        ["--replicas", "2", "--state-dir", str(state), "--port", "0", "--", *server_args],
        command=[str(BIN / "sap-cluster")],
        env=env,
        log=work / "cluster.log",
        timeout=600,
    )
    try:
        replicas = {m.group(1): int(m.group(2)) for m in map(REPLICA.match, cluster.output) if m}
        runs = [work / f"run-{i}" for i in range(settings.runs)]
        users = [
            client(train_args(data, cluster.address, run, i), work / f"run-{i}.log", env) for i, run in enumerate(runs)
        ]
        table_file = state / "router" / "sessions.json"
        deadline = time.monotonic() + 600
        while not table_file.is_file() or len(json.loads(table_file.read_text())) < settings.runs:
            if time.monotonic() > deadline or any(user.poll() is not None for user in users):
                raise SystemExit(f"the users did not all open their sessions: see {work}/run-*.log")
            time.sleep(0.2)
        time.sleep(settings.kill_after)  # every run is training now
        table = json.loads(table_file.read_text())
        victim = max(sorted(replicas), key=lambda name: sum(owner == name for owner in table.values()))
        os.kill(replicas[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        held = sum(owner == victim for owner in table.values())
        # a user whose run is cut short resumes it at once, as after a server restart
        resumes: dict[int, subprocess.Popen] = {}
        resume_seconds: dict[int, float] = {}
        redone = 0
        while any(user.poll() is None for user in users) or any(r.poll() is None for r in resumes.values()):
            for i, user in enumerate(users):
                if user.poll() not in (None, 0) and i not in resumes:
                    said = (work / f"run-{i}.log").read_text()
                    at = re.search(r"from its checkpoint at step (\d+)", said)
                    reached = re.search(r"for step (\d+)", said)
                    if at and reached:  # the steps it had applied past its checkpoint, done again after resuming
                        redone += int(reached.group(1)) - 1 - int(at.group(1))
                    log = work / f"run-{i}.resume.log"
                    resumes[i] = client(["resume", str(runs[i]), "--server", cluster.address], log, env)
            for i, resume in resumes.items():  # the kill's cost to a user: until its run trains again
                said = (work / f"run-{i}.resume.log").read_text()
                if i not in resume_seconds and (resume.poll() is not None or "resuming" in said):
                    resume_seconds[i] = round(time.monotonic() - killed_at, 1)
            time.sleep(0.1)
        cut = sorted(resumes)
        for i in cut:
            if resumes[i].returncode != 0:
                print((work / f"run-{i}.resume.log").read_text()[-3000:], file=sys.stderr)
        moved = cluster.stderr().count("moved to")
    finally:
        cluster.stop(timeout=120)
    completed = [run for run in runs if (run / "metrics.json").is_file()]

    # 5: the same runs, uninterrupted, on one plain sap-server
    reference_state = work / "reference-state"
    # with one OpenMP thread, as Ray runs each replica (num_cpus 1): another thread count sums in another order
    reference = ServerProcess.start(
        [*server_args, "--port", "0", "--state-dir", str(reference_state)],
        env={**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        log=work / "reference.log",
    )
    try:
        references = [work / f"reference-{i}" for i in range(settings.runs)]
        for i, run in enumerate(references):  # one at a time: the uninterrupted baseline
            if client(train_args(data, reference.address, run, i), work / f"{run.name}.log", env).wait():
                raise SystemExit(f"the uninterrupted run {i} failed: see {work / run.name}.log")
    finally:
        reference.stop()

    lost, equal = 0, len(completed) == settings.runs
    for run, ref in zip(runs, references):
        if not (run / "metrics.json").is_file():
            equal = False
            continue
        weights, meta = kept_adapter(state, run)
        ref_weights, ref_meta = kept_adapter(reference_state, ref)
        lost += abs(ref_meta["steps_applied"] - meta["steps_applied"])
        same = weights.keys() == ref_weights.keys() and all(weights[k].equal(ref_weights[k]) for k in weights)
        history = json.loads((run / "metrics.json").read_text())["history"]
        equal = equal and same and history == json.loads((ref / "metrics.json").read_text())["history"]
    print(
        json.dumps(
            {
                "runs_completed": len(completed),
                "runs": settings.runs,
                "lost_steps": lost,
                "weights_equal_to_uninterrupted": equal,
                "killed_replica": victim,
                "sessions_on_killed_replica": held,
                "sessions_moved": moved,
                "runs_cut_and_resumed": len(cut),
                "redone_steps": redone,
                "resume_seconds": [resume_seconds[i] for i in cut],
                "steps_per_run": json.loads((completed[0] / "metrics.json").read_text())["steps"] if completed else 0,
                "model": settings.model,
                "split": settings.split,
                "seconds": round(time.monotonic() - started, 1),
                "work": str(work),
            }
        )
    )
    return 0 if len(completed) == settings.runs and lost == 0 and equal else 1


if __name__ == "__main__":
    sys.exit(main())
