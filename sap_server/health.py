"""The standard gRPC health service (grpc.health.v1) on every sap-server, and a probe for it.

A server answers SERVING for "" (the whole server) and for the sap.v2 service once its model is loaded and it
accepts calls; a stopping server stops answering. Load balancers, Kubernetes, Docker Compose (docker/compose.yaml)
and the cluster's router ask it; by hand:

    python -m sap_server.health 127.0.0.1:50051        # exit 0 and SERVING, or exit 1 saying why
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sap_common.proto import sap_pb2

SERVICE = sap_pb2.DESCRIPTOR.services_by_name["SplitLearning"].full_name  # sap.v2.SplitLearning


def add_health(server: grpc.Server) -> health.HealthServicer:
    """Register the health service on server, SERVING for the whole server and for sap.v2."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", SERVICE):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def check(address: str, *, service: str = "", timeout: float = 5.0) -> str:
    """The status name the server at address reports for service ("SERVING", "NOT_SERVING", ...); grpc.RpcError
    when it cannot be asked."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sap_server.health", description="Ask a sap-server's health.")
    parser.add_argument("address", help="HOST:PORT of the server")
    parser.add_argument("--service", default="", help=f'"" (the whole server, default) or {SERVICE}')
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    args = parser.parse_args(argv)
    try:
        status = check(args.address, service=args.service, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
