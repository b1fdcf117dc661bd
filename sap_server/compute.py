"""ComputeThread: the one thread that runs the server's tensor work (model load, Forward, Backward, ...).

Why one thread: torch's CPU build parallelizes each operator with OpenMP (libgomp), and every thread that
runs a parallel region gets its own OpenMP team. Once a process has more OpenMP-managed threads than
cores (the loading thread's team plus a team per gRPC worker that ran a step), libgomp stops spin-waiting
between parallel regions and parks its threads on a futex after each one, so every one of the thousands of
small regions in a step pays a wake-up. Measured on a 2-core machine (MiniLM top, batch 16 x 64 tokens):
the top's forward and backward took 40-60 % longer in a gRPC worker thread than on the thread that loaded
the model; with all of it on one thread they run as fast as in a plain script. It also makes the server's
steps run one at a time, which is what the cores (or the GPU) do with them anyway; requests still arrive,
authenticate and stream in parallel on the gRPC workers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

_shared: ComputeThread | None = None
_shared_lock = threading.Lock()


class ComputeThread:
    """Runs submitted calls one at a time, in order, on one daemon thread; run() waits for the result."""

    def __init__(self, name: str = "sap-compute"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._closed = False
        self._depth = 0  # jobs submitted and not yet finished (sap_compute_queue_depth)
        self._depth_lock = threading.Lock()
        self._thread.start()

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) on the compute thread; its return value, or its exception re-raised here.
        Called from the compute thread itself (a job that runs another), it runs inline."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        if self._closed:
            raise RuntimeError("the compute thread is closed")
        future: Future = Future()
        with self._depth_lock:
            self._depth += 1
        try:
            self._jobs.put((future, fn, args, kwargs))
            return future.result()
        finally:
            with self._depth_lock:
                self._depth -= 1

    def depth(self) -> int:
        """Jobs queued or running (submitted from other threads, not yet finished)."""
        return self._depth

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread (idempotent)."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
                future.set_exception(exc)


def compute_thread() -> ComputeThread:
    """The process's compute thread (created on first use): one per process, so that one OpenMP team
    does all of its tensor work, whatever servers, sessions and background jobs it runs."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ComputeThread()
        return _shared
