"""Build, start and gracefully stop the gRPC server around a Provider."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from sap_common import codec
from sap_server.auth import ApiKeys, ServerTls
from sap_server.compute import ComputeThread
from sap_server.generation import Generations
from sap_server.health import add_health
from sap_server.metrics import ServerMetrics
from sap_server.provider import Provider
from sap_server.servicer import AuthInterceptor, SplitLearningServicer, add_to_server

log = logging.getLogger(__name__)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Explicit message caps (the 4 MiB gRPC default is too small for hidden states)."""
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with a client CA (mutual TLS) every client must present a
    certificate that CA signed, or the handshake fails before any RPC."""
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.cert_chain)], root_certificates=tls.client_ca, require_client_auth=tls.mutual
    )


def start_server(
    provider: Provider,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    workers: int = 8,
    chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
    max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
    api_keys: ApiKeys | None = None,
    tls: ServerTls | None = None,
    compute: ComputeThread | None = None,
    generations: Generations | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    metrics: ServerMetrics | None = None,
) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the port it really listens on (port 0 picks a free one).

    api_keys gate GetServerInfo, DownloadBottom and OpenSession; tls switches the port to TLS (mutual TLS
    when it has a client CA); generations: the limits of split generation (sap_server/generation.py);
    interceptors are for tests that simulate a flaky network; metrics (sap_server/metrics.py) count what the server
    does. Every server also answers the standard health service (sap_server/health.py)."""
    if chunk_bytes >= max_message_bytes:
        raise ValueError(f"chunk_bytes ({chunk_bytes}) must be below max_message_bytes ({max_message_bytes})")
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sap-rpc"),
        options=channel_options(max_message_bytes),
        interceptors=[*interceptors, AuthInterceptor(api_keys)],  # a simulated network failure comes first
    )
    servicer = SplitLearningServicer(
        provider,
        chunk_bytes=chunk_bytes,
        max_message_bytes=max_message_bytes,
        compute=compute,
        generations=generations,
        metrics=metrics,
    )
    add_to_server(servicer, server)
    add_health(server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = (
        server.add_secure_port(address, server_credentials(tls))
        if tls is not None
        else server.add_insecure_port(address)
    )
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, bound


def serve_until_signal(server: grpc.Server, *, grace: float = 5.0, on_ready: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM or SIGINT, then stop accepting calls and let running ones finish.

    on_ready runs once the handlers are installed, so a signal right after it is handled gracefully.
    """
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_ready is not None:
            on_ready()
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        server.stop(grace).wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
