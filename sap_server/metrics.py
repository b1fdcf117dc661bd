"""ServerMetrics: what an operator scrapes from a sap-server (`--metrics-port`), in Prometheus' text format.

sap_sessions_loaded            sessions in memory now (gauge)
sap_steps_total                optimizer steps applied (counter; a replayed Backward is not a step)
sap_steps_per_second           steps applied over the last STEP_WINDOW_S seconds, per second (gauge)
sap_bytes_received_total       bytes of the hot calls' requests and of every request message (counter)
sap_bytes_sent_total           bytes of their replies, the bottom's download included (counter)
sap_compute_queue_depth        tensor jobs queued or running on the compute thread (gauge)
sap_checkpoint_seconds         time to write one session checkpoint (histogram)

Each server has its own registry, so several servers in one process (tests) do not share figures.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STEP_WINDOW_S = 60.0


class ServerMetrics:
    def __init__(self, sessions_loaded: Callable[[], int], queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        Gauge("sap_sessions_loaded", "Sessions in memory", registry=self.registry).set_function(sessions_loaded)
        self._steps = Counter("sap_steps", "Optimizer steps applied", registry=self.registry)
        Gauge(
            "sap_steps_per_second",
            f"Steps applied per second over the last {STEP_WINDOW_S:g} s",
            registry=self.registry,
        ).set_function(self.steps_per_second)
        self._received = Counter("sap_bytes_received", "Request bytes received", registry=self.registry)
        self._sent = Counter("sap_bytes_sent", "Reply bytes sent", registry=self.registry)
        Gauge(
            "sap_compute_queue_depth", "Tensor jobs queued or running on the compute thread", registry=self.registry
        ).set_function(queue_depth)
        self._checkpoint = Histogram(
            "sap_checkpoint_seconds",
            "Time to write one session checkpoint",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self._recent: deque[float] = deque()  # monotonic times of the steps in the window
        self._lock = threading.Lock()
        self._http: WSGIServer | None = None

    def step(self) -> None:
        self._steps.inc()
        now = time.monotonic()
        with self._lock:
            self._recent.append(now)
            self._trim(now)

    def steps_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return len(self._recent) / STEP_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0] < now - STEP_WINDOW_S:
            self._recent.popleft()

    def received(self, nbytes: int) -> None:
        self._received.inc(nbytes)

    def sent(self, nbytes: int) -> None:
        self._sent.inc(nbytes)

    def checkpoint_written(self, seconds: float) -> None:
        self._checkpoint.observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on a thread of its own; the port it listens on (port 0 picks a free one)."""
        http, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = http
        return http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
