"""sap-cluster: provider replicas under Ray behind one router address.

    sap-cluster --replicas 2 --state-dir /shared/sap --port 50051 -- --model minilm-l6 --split 2

starts (or joins, with --ray-address) a Ray cluster, runs each replica as a full sap-server in a Ray actor with
the arguments after `--` (every replica gets the same --state-dir and listens on --replica-host, a free port),
and serves the router on --host:--port. Users point `sap-client --server` at the router. When it takes calls it
prints one `replica NAME pid PID at ADDRESS` line each (and, with `-- --metrics-port 0`, where each replica serves
its Prometheus metrics), then `sap-cluster listening on HOST:PORT` last: whoever waits for that line has the others
already. The replicas' own logs go to Ray's (/tmp/ray/session_latest/logs); the router's to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("sap_cluster")

LOCAL_RAY_ENV = {
    # a cluster on this machine alone talks over loopback only (Ray otherwise uses the machine's network address)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray starts its workers at niceness 15; a replica serves training steps and must not yield to everything else
    "RAY_worker_niceness": "0",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sap-cluster",
        description="Run sap-server replicas under Ray behind one router: each session stays on its replica and "
        "moves to a live one, from its latest checkpoint, when its replica dies.",
        epilog="Arguments after -- go to every replica's sap-server (model, split, PEFT, limits).",
    )
    parser.add_argument("--replicas", type=int, default=2, help="sap-server replicas (default 2)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="the folder every replica checkpoints sessions and keeps adapters in; all replicas must read it (on "
        "several machines: a shared disk); the router keeps its session table there too",
    )
    parser.add_argument("--host", default="127.0.0.1", help="the router's address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="the router's port (default 50051; 0 = a free one)")
    parser.add_argument(
        "--ray-address",
        help="join this Ray cluster (HOST:PORT, or auto for the one `ray start` began on this machine); "
        "default: start a Ray cluster on this machine alone, on loopback",
    )
    parser.add_argument(
        "--replica-host",
        default="127.0.0.1",
        help="where each replica listens (default 127.0.0.1; on several "
        "machines, the address the router reaches it at, e.g. 0.0.0.0 on a private network)",
    )
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    parser.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (default 0; 1 = one each)")
    parser.add_argument("--workers", type=int, default=32, help="the router's RPC threads (default 32)")
    parser.add_argument("server_args", nargs=argparse.REMAINDER, help="-- then sap-server's arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    if args.replicas < 1:
        parser.error(f"--replicas must be >= 1, got {args.replicas}")
    for flag in ("--state-dir", "--port", "--host"):
        if any(a == flag or a.startswith(flag + "=") for a in server_args):
            parser.error(f"{flag} is the cluster's to set (every replica gets the shared state dir and a free port)")
    replica_args = [
        *server_args,
        "--state-dir",
        str(args.state_dir.resolve()),
        "--host",
        args.replica_host,
        "--port",
        "0",
    ]
    from sap_server.cli import parse_args

    parse_args(replica_args)  # a bad replica argument fails here, with sap-server's own message, exit 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ray_address is None:
        os.environ.update(LOCAL_RAY_ENV)
    import ray

    from sap_cluster.replicas import RayReplicas
    from sap_cluster.router import Router, start_router
    from sap_server.app import serve_until_signal

    args.state_dir.mkdir(parents=True, exist_ok=True)
    if args.ray_address is None:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=args.ray_address, log_to_driver=False, configure_logging=False)
    replicas = None
    try:
        replicas = RayReplicas(args.replicas, replica_args, cpus=args.replica_cpus, gpus=args.replica_gpus)
        router = Router(replicas, table=args.state_dir / "router" / "sessions.json")
        server, port = start_router(router, args.host, args.port, workers=args.workers)
        lines = []
        for name, info in sorted(replicas.info().items()):
            lines.append(f"replica {name} pid {info['pid']} at {info['address']}")
            if info["metrics"]:  # sap-server's --metrics-port among the replica arguments
                lines.append(f"replica {name} metrics on {info['metrics']}/metrics")
        # last: a reader that returns on this line (sap_server.launch) has read the replica lines already
        lines.append(f"sap-cluster listening on {args.host}:{port}")
        serve_until_signal(server, on_ready=lambda: print("\n".join(lines), flush=True))
        router.close()
    except (OSError, ray.exceptions.RayError) as exc:
        print(f"sap-cluster: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if replicas is not None:
            replicas.close()
        ray.shutdown()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
