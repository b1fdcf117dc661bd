"""Router: one address in front of several sap-server replicas that share one state dir.

Strong stickiness: OpenSession goes to the live replica with the fewest sessions, and every later call of that
session goes to the same replica (the client names its session in `sap-session-id` metadata, so no body is read).
The session -> replica table is written to STATE_DIR/router/sessions.json on every change, so a restarted router
routes as before. When a call finds its replica gone (UNAVAILABLE, and the replica's health service no longer
answers), the session moves to the live replica with the fewest sessions, which loads the session's latest
checkpoint from the shared state dir, and the call is sent there. What the session applied after that checkpoint
is lost with the replica: the call is refused by step order, and the client resumes from its own checkpoint, as
after a server restart (exactly-once steps, ResumeSession). A session is never served by two replicas at once as
long as a replica that stops answering its health service is really gone (true for a killed process; across
machines, a partitioned replica needs fencing this router does not do).

Calls pass through as bytes (no parsing) except OpenSession's reply, read for the new session's id. Unary calls
and the Forward / Backward / Evaluate streams (one request, one reply) can move to another replica; Generate and
DownloadBottom stream through and end with UNAVAILABLE when their replica dies.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import grpc

from sap_common.checkpoint import atomic_write
from sap_common.proto import sap_pb2
from sap_common.service import SESSION_ID_METADATA
from sap_server.app import channel_options
from sap_server.health import add_health, check

log = logging.getLogger(__name__)

SERVICE = sap_pb2.DESCRIPTOR.services_by_name["SplitLearning"]
# Calls of a session (routed by sap-session-id) and calls any replica answers.
SESSION_METHODS = frozenset(
    {"Forward", "Backward", "Evaluate", "EvaluateSmall", "CloseSession", "ResumeSession", "Generate"}
)
LIVE_STREAMS = frozenset({"Generate", "DownloadBottom"})  # passed through as they come, never moved
# A replica is taken for gone only when its health service does not answer in this time: moving a session off a
# replica that is alive would fork it (a dead process refuses the connection at once).
HEALTH_TIMEOUT_S = 5.0


class Replicas(Protocol):
    """Who keeps the replicas (sap_cluster.replicas): their names and current addresses."""

    def addresses(self) -> dict[str, str]:
        """Replica name -> HOST:PORT of each replica that is up now."""
        ...


class StaticReplicas:
    """A fixed set of replicas (already running sap-servers), for a router without an engine, and for tests."""

    def __init__(self, addresses: dict[str, str]):
        self._addresses = dict(addresses)

    def addresses(self) -> dict[str, str]:
        return dict(self._addresses)


class NoReplica(Exception):
    """No replica is up to take a call."""


class SessionTable:
    """session id -> replica name, written to a JSON file on every change (atomically) when it has a path."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._owner: dict[str, str] = {}
        if path is not None and path.is_file():
            self._owner = dict(json.loads(path.read_text()))
            log.info("routing table %s: %d sessions", path, len(self._owner))

    def get(self, session_id: str) -> str | None:
        with self._lock:
            return self._owner.get(session_id)

    def set(self, session_id: str, replica: str) -> None:
        with self._lock:
            self._owner[session_id] = replica
            self._write()

    def counts(self, names: list[str]) -> dict[str, int]:
        with self._lock:
            return {name: sum(owner == name for owner in self._owner.values()) for name in names}

    def sessions_of(self, replica: str) -> list[str]:
        with self._lock:
            return [session for session, owner in self._owner.items() if owner == replica]

    def _write(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, (json.dumps(self._owner, indent=1) + "\n").encode())


class Router:
    """Routes sap.v2 calls to replicas (see the module docstring)."""

    def __init__(
        self,
        replicas: Replicas,
        *,
        table: Path | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        is_gone: Callable[[str], bool] | None = None,
    ):
        self.replicas = replicas
        self.table = SessionTable(table)
        self.max_message_bytes = max_message_bytes
        self.is_gone = is_gone or _health_gone
        self.moves = 0  # sessions moved off a dead replica (for the demo and the benchmarks)
        self._channels: dict[str, grpc.Channel] = {}
        self._known: dict[str, str] = {}  # each replica's last listed address
        self._lock = threading.Lock()
        self._next = 0

    # --- choosing a replica ----------------------------------------------------------------------------------

    def _live(self, tried: Collection[str] = ()) -> dict[str, str]:
        """The replicas the engine lists as up, less those this call found gone."""
        listed = self.replicas.addresses()
        with self._lock:
            self._known.update(listed)
        live = {name: address for name, address in listed.items() if name not in tried}
        if not live:
            raise NoReplica("no replica is up" + (f": {', '.join(sorted(tried))} gone" if tried else ""))
        return live

    def _least_loaded(self, live: dict[str, str]) -> str:
        counts = self.table.counts(sorted(live))
        return min(sorted(live), key=lambda name: (counts[name], name))

    def _any(self, tried: Collection[str]) -> tuple[str, str]:
        live = self._live(tried)
        names = sorted(live)
        with self._lock:
            self._next += 1
            name = names[self._next % len(names)]
        return name, live[name]

    def _owner(self, session_id: str, tried: Collection[str]) -> tuple[str, str]:
        """The replica that serves this session. A session moves only off a replica found gone: by this call
        (tried), or, when the engine does not list its replica (a slow answer is not a death), by the replica's own
        health service. A session the table does not know goes to the least loaded live replica, which keeps it."""
        name = self.table.get(session_id)
        live = self._live(tried)
        if name is not None and name in live:
            return name, live[name]
        if name is not None and name not in tried:
            with self._lock:
                last = self._known.get(name)
            if last is not None and not self.is_gone(last):
                return name, last  # alive, though the engine did not list it just now
        target = self._least_loaded(live)
        self.table.set(session_id, target)
        if name is not None:
            self.moves += 1
            log.warning("session %s…: replica %s is gone; moved to %s", session_id[:8], name, target)
        return target, live[target]

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = grpc.insecure_channel(
                    address, options=channel_options(self.max_message_bytes)
                )
            return self._channels[address]

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    # --- calls -----------------------------------------------------------------------------------------------

    def call(self, method: str, request, context, invoke: Callable) -> object:
        """A call that can move: invoke(channel, request, metadata, timeout) on the session's replica (or any
        replica), again on another one when that replica turns out to be gone."""
        metadata = _forwarded(context)
        session_id = _first(metadata, SESSION_ID_METADATA) if method in SESSION_METHODS else None
        if method in SESSION_METHODS and session_id is None:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a session call through the router needs {SESSION_ID_METADATA} metadata (sap-client sends it)",
            )
        tried: set[str] = set()
        while True:
            try:
                if session_id is not None:
                    name, address = self._owner(session_id, tried)
                elif method == "OpenSession":
                    live = self._live(tried)
                    name = self._least_loaded(live)
                    address = live[name]
                else:
                    name, address = self._any(tried)
            except NoReplica as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            try:
                reply = invoke(self.channel(address), request, metadata, context.time_remaining())
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or not self.is_gone(address):
                    context.abort(exc.code(), exc.details() or "")
                tried.add(name)
                log.warning("replica %s at %s is gone (%s)", name, address, exc.details())
                continue
            if method == "OpenSession":
                opened = sap_pb2.OpenSessionReply.FromString(reply)
                self.table.set(opened.session_id, name)
                log.info("session %s… opened on %s", opened.session_id[:8], name)
            return reply

    def stream(self, method: str, request, context, invoke: Callable) -> Iterator:
        """A call streamed through as it comes (Generate, DownloadBottom): no move."""
        metadata = _forwarded(context)
        session_id = _first(metadata, SESSION_ID_METADATA) if method in SESSION_METHODS else None
        try:
            _, address = self._owner(session_id, ()) if session_id is not None else self._any(())
        except NoReplica as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        try:
            yield from invoke(self.channel(address), request, metadata, context.time_remaining())
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")


def _health_gone(address: str) -> bool:
    """A replica is gone when its health service does not answer SERVING."""
    try:
        return check(address, timeout=HEALTH_TIMEOUT_S) != "SERVING"
    except grpc.RpcError:
        return True


def _forwarded(context) -> list[tuple[str, str]]:
    """The caller's metadata to pass on (not the transport's own keys)."""
    return [
        (key, value)
        for key, value in (context.invocation_metadata() or ())
        if not key.startswith((":", "grpc-")) and key not in ("user-agent", "content-type", "te")
    ]


def _first(metadata, key: str) -> str | None:
    return next((value for k, value in metadata if k == key), None)


def _handlers(router: Router) -> dict[str, grpc.RpcMethodHandler]:
    """A pass-through handler (bytes in, bytes out) for every method of sap.v2.SplitLearning."""
    handlers = {}
    for method in SERVICE.methods:
        name, path = method.name, f"/{SERVICE.full_name}/{method.name}"
        streaming_in, streaming_out = method.client_streaming, method.server_streaming
        if name in LIVE_STREAMS:
            if streaming_in:

                def live_stream(requests, context, name=name, path=path):
                    return router.stream(
                        name,
                        requests,
                        context,
                        lambda ch, req, md, t: ch.stream_stream(path)(req, metadata=md, timeout=t),
                    )

                handlers[name] = grpc.stream_stream_rpc_method_handler(live_stream)
            else:

                def live_reply(request, context, name=name, path=path):
                    return router.stream(
                        name,
                        request,
                        context,
                        lambda ch, req, md, t: ch.unary_stream(path)(req, metadata=md, timeout=t),
                    )

                handlers[name] = grpc.unary_stream_rpc_method_handler(live_reply)
        elif streaming_in and streaming_out:  # Forward, Backward, Evaluate: one request, one reply, as frames

            def frames(requests, context, name=name, path=path):
                request = list(requests)  # kept whole, so that the call can be sent again elsewhere
                return iter(
                    router.call(
                        name,
                        request,
                        context,
                        lambda ch, req, md, t: list(ch.stream_stream(path)(iter(req), metadata=md, timeout=t)),
                    )
                )

            handlers[name] = grpc.stream_stream_rpc_method_handler(frames)
        elif not streaming_in and not streaming_out:

            def unary(request, context, name=name, path=path):
                return router.call(
                    name, request, context, lambda ch, req, md, t: ch.unary_unary(path)(req, metadata=md, timeout=t)
                )

            handlers[name] = grpc.unary_unary_rpc_method_handler(unary)
        else:
            raise RuntimeError(f"the router does not know how to pass {name} on")  # a new kind of call in sap.proto
    return handlers


def start_router(
    router: Router, host: str = "127.0.0.1", port: int = 0, *, workers: int = 32
) -> tuple[grpc.Server, int]:
    """Serve the router (and a health service of its own) on host:port; (server, the port it got)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sap-router"),
        options=channel_options(router.max_message_bytes),
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, _handlers(router)),))
    add_health(server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, bound
