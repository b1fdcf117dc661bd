"""Split generation on the provider's side: how many generations run at once, and how long one may wait.

A generation is one Generate call (sap.proto): its key/value cache is a local of the call, so it is freed when the
call ends. What ends a call the user abandoned without closing it is the idle timeout: the request stream is read
on a thread of its own, and a piece that does not arrive in time ends the call with IdleTimeoutError."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from sap_common.errors import IdleTimeoutError, ResourceLimitError

DEFAULT_MAX_GENERATIONS = 8  # sap-server --max-generations
DEFAULT_GENERATION_TIMEOUT = 60.0  # sap-server --generation-timeout (seconds a generation may wait for a piece)

_END = object()


class Generations:
    """The limits of one server's generations: at most max_running at once; each waits at most idle_timeout seconds
    for the user's next piece."""

    def __init__(self, max_running: int = DEFAULT_MAX_GENERATIONS, idle_timeout: float = DEFAULT_GENERATION_TIMEOUT):
        if max_running < 1 or not idle_timeout > 0:
            raise ValueError(f"max_running must be >= 1 and idle_timeout > 0, got {max_running}, {idle_timeout}")
        self.max_running = max_running
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._running = 0

    @property
    def running(self) -> int:
        """Generations in progress now (each holding a cache)."""
        with self._lock:
            return self._running

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the max_running places for a generation's whole call, or ResourceLimitError."""
        with self._lock:
            if self._running >= self.max_running:
                raise ResourceLimitError(
                    f"{self.max_running} generations are running on this server (--max-generations): try again later"
                )
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1

    def watched(self, frames: Iterable) -> Iterator:
        """frames as they arrive, read on a thread of their own; IdleTimeoutError when the next one takes longer
        than idle_timeout. The reader holds at most a few frames ahead (a client cannot queue unbounded data) and
        ends with the call: once the handler is done, gRPC ends the request stream."""
        arrived: queue.Queue = queue.Queue(maxsize=16)
        done = threading.Event()

        def hand_over(item) -> bool:
            while not done.is_set():
                try:
                    arrived.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for frame in frames:
                    if not hand_over(frame):
                        return
            except Exception as exc:  # noqa: BLE001 - the call ended (cancelled, or the handler is done)
                hand_over(exc)
                return
            hand_over(_END)

        threading.Thread(target=read, name="sap-generate-reader", daemon=True).start()
        try:
            while True:
                try:
                    item = arrived.get(timeout=self.idle_timeout)
                except queue.Empty:
                    raise IdleTimeoutError(
                        f"no piece of the generation arrived within {self.idle_timeout:g} s (--generation-timeout): "
                        "its cache is freed"
                    ) from None
                if item is _END or isinstance(item, Exception):
                    return  # the user closed its side, or went away: nothing more to answer
                yield item
        finally:
            done.set()
