"""What the cluster costs and buys (sap-cluster, sap_cluster/): MiniLM split 2, real snippets, noise ratio 0.25.

- routing overhead: a training step through the router against the same step sent straight to the replica behind
  it (one sap-cluster with one replica; two sessions on that one replica process, their steps alternating in
  chunks), so the only difference is the router's hop;
- aggregate steps per second with 1 and with 2 replicas: `--users` clients at once, each training --steps steps
  through the router, from a thread each;
- what a replica's death costs a user: its replica is killed (SIGKILL) between two steps; seconds until the
  user's next step is applied again (the call refused by step order, ResumeSession to its checkpoint, the moved
  session loaded on the other replica) and the steps it redoes.

    python benchmarks/cluster_bench.py [--steps 24] [--users 4]      # results/cluster_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/bench.py: SplitSide, batches, alternate)
import torch  # noqa: E402

from sap_client.data import load_labelled_csv  # noqa: E402
from sap_common.errors import StepOrderError  # noqa: E402
from sap_server.launch import ServerProcess  # noqa: E402

BIN = Path(sys.executable).parent
REPLICA = re.compile(r"^replica (\S+) pid (\d+) at (\S+)$")
RESULTS = Path(__file__).resolve().parent / "results" / "cluster_bench.json"


def cluster(replicas: int, work: Path, settings: argparse.Namespace, *extra: str) -> ServerProcess:
    """sap-cluster with `replicas` replicas of the model; extra: more sap-server arguments."""
    name = f"{replicas}-{len(list(work.glob('cluster-*.log')))}"
    args = ["--replicas", str(replicas), "--state-dir", str(work / f"state-{name}"), "--port", "0"]
    args += ["--replica-cpus", str(settings.replica_cpus), "--"]
    args += ["--model", settings.model, "--split", str(settings.split), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return ServerProcess.start(args, command=[str(BIN / "sap-cluster")], env=env, log=work / f"cluster-{name}.log")


def replicas_of(process: ServerProcess) -> dict[str, tuple[int, str]]:
    return {m.group(1): (int(m.group(2)), m.group(3)) for m in map(REPLICA.match, process.output) if m}


def routing_overhead(process: ServerProcess, data, settings, bench_settings) -> dict:
    """Steps through the router against steps straight to its one replica, alternating in chunks."""
    ((_, direct),) = replicas_of(process).values()
    steps = settings.steps
    batches = bench.batches_of(data, bench_settings, 2 * (steps + 2))
    routed = bench.SplitSide(process.address, data, bench_settings, threads=settings.client_threads)
    straight = bench.SplitSide(direct, data, bench_settings, shared=routed)
    routed.train(batches[:1]), straight.train(batches[1:2])  # untimed: the first steps warm both paths up
    mine = iter(batches[2:])
    chunks = [[next(mine) for _ in range(2)] for _ in range(steps // 2)]
    wall, _ = bench.alternate({"router": routed.train, "direct": straight.train}, chunks)
    routed.close(), straight.close()
    per_step = {name: seconds / steps for name, seconds in wall.items()}
    return {
        "steps_each": steps,
        "seconds_per_step": per_step,
        "overhead": per_step["router"] / per_step["direct"] - 1,
    }


def aggregate(process: ServerProcess, data, settings, bench_settings) -> dict:
    """Steps per second of `users` clients training at once through the router."""
    users, steps = settings.users, settings.steps
    batches = bench.batches_of(data, bench_settings, users * (steps + 1))
    sides = [bench.SplitSide(process.address, data, bench_settings, threads=1)]
    sides += [bench.SplitSide(process.address, data, bench_settings, shared=sides[0]) for _ in range(users - 1)]
    for i, side in enumerate(sides):
        side.train(batches[i * (steps + 1) : i * (steps + 1) + 1])  # untimed warm-up step each
    barrier = threading.Barrier(users + 1)

    def run(i: int) -> None:
        barrier.wait()
        sides[i].train(batches[i * (steps + 1) + 1 : (i + 1) * (steps + 1)])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(users)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for side in sides:
        side.close()
    return {"users": users, "steps_each": steps, "seconds": seconds, "steps_per_second": users * steps / seconds}


def failover(process: ServerProcess, data, settings, bench_settings) -> dict:
    """A user's replica killed between two steps: seconds until its next step is applied again."""
    side = bench.SplitSide(process.address, data, bench_settings, threads=settings.client_threads)
    trainer, service = side.trainer, side.service
    batches = bench.batches_of(data, bench_settings, 16)
    side.train(batches[:7])  # steps 1-7; the replicas checkpoint every 5 steps
    owner = replicas_of(process)[_owner(process, trainer.session_id)]
    checkpoint = 5
    os.kill(owner[0], signal.SIGKILL)
    killed = time.perf_counter()
    try:
        side.train(batches[7:8])
        raise AssertionError("the step after the kill was applied: its replica was not the session's")
    except StepOrderError:
        pass
    service.resume_session(trainer.session_id, checkpoint)
    trainer.steps = checkpoint
    side.train(batches[5:6])  # step 6 again, on the replica the session moved to
    seconds = time.perf_counter() - killed
    side.close()
    return {"seconds_to_next_step": seconds, "redone_steps": 7 - checkpoint, "checkpoint_every": checkpoint}


def _owner(process: ServerProcess, session_id: str) -> str:
    found = re.search(rf"session {session_id[:8]}… opened on (\S+)", process.stderr())
    if not found:
        raise AssertionError(f"the router did not log where session {session_id[:8]} opened")
    return found.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--split", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24, help="timed steps per side / per user")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--client-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    settings = parser.parse_args(argv)
    torch.set_num_threads(settings.client_threads)
    data = load_labelled_csv(bench.DATA)
    bench_settings = replace(bench.Settings(), wire_dtype="float32")
    result: dict = {
        "command": "python benchmarks/cluster_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": bench.machine(),
        "model": settings.model,
        "split": settings.split,
        "batch_size": bench_settings.batch_size,
        "noise_ratio": bench_settings.noise_ratio,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sap-cluster-bench-") as scratch:
        work = Path(scratch)
        one = cluster(1, work, settings)
        try:
            result["routing"] = routing_overhead(one, data, settings, bench_settings)
            print(f"routing overhead per step: {result['routing']['overhead']:+.1%}", flush=True)
            result["aggregate_1_replica"] = aggregate(one, data, settings, bench_settings)
        finally:
            one.stop(timeout=120)
        two = cluster(2, work, settings)
        try:
            result["aggregate_2_replicas"] = aggregate(two, data, settings, bench_settings)
        finally:
            two.stop(timeout=120)
        print(
            f"aggregate steps/s, {settings.users} users: 1 replica "
            f"{result['aggregate_1_replica']['steps_per_second']:.2f}, 2 replicas "
            f"{result['aggregate_2_replicas']['steps_per_second']:.2f}",
            flush=True,
        )
        three = cluster(2, work, settings, "--checkpoint-every", "5")
        try:
            result["failover"] = failover(three, data, settings, bench_settings)
        finally:
            three.stop(timeout=120)
        print(f"a replica's death: {result['failover']['seconds_to_next_step']:.2f} s to the user's next step")
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["platform"] = platform.platform()
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("routing", "aggregate_1_replica", "aggregate_2_replicas", "failover")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
