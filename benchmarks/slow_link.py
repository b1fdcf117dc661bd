"""A slow link on loopback: a TCP proxy that shapes each direction to a bandwidth and adds one-way latency.

    python benchmarks/slow_link.py --listen 127.0.0.1:0 --target 127.0.0.1:50051 --mbit 100 --rtt-ms 40

prints `slow-link listening on HOST:PORT` once ready; point the client there instead of at the server.
Each direction is modelled as a serial pipe of `mbit` Mbit/s followed by rtt/2 of propagation delay: a
chunk that arrives at time t leaves the pipe at max(t, pipe free) + bytes * 8 / rate and is delivered
rtt/2 later. Bytes are never reordered or dropped. (No `tc netem` needed: it works unprivileged.)

Importable: `SlowLink(target_host, target_port, mbit=..., rtt_ms=...)` with `await link.start(host, port)`,
or `run_in_thread(...)` for a proxy on a background event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
import time

READ_BYTES = 64 * 1024  # most bytes read per chunk; smaller chunks are forwarded as they come


class _Direction:
    """One direction of the link: a serial pipe of `rate` bytes/s, then `delay` seconds in flight."""

    def __init__(self, rate_bytes_per_s: float, delay_s: float):
        self.rate = rate_bytes_per_s
        self.delay = delay_s
        self.pipe_free_at = 0.0  # monotonic time when the pipe has sent everything queued so far
        self.bytes = 0

    def delivery_time(self, size: int, now: float) -> float:
        """When a chunk of `size` bytes that arrives now reaches the far end."""
        start = max(now, self.pipe_free_at)
        self.pipe_free_at = start + size / self.rate
        self.bytes += size
        return self.pipe_free_at + self.delay


class SlowLink:
    """Proxies every connection to target through two shaped directions (client->server, server->client)."""

    def __init__(self, target_host: str, target_port: int, *, mbit: float = 100.0, rtt_ms: float = 40.0):
        if mbit <= 0 or rtt_ms < 0:
            raise ValueError(f"need mbit > 0 and rtt_ms >= 0, got mbit={mbit}, rtt_ms={rtt_ms}")
        self.target = (target_host, target_port)
        self.mbit = mbit
        self.rtt_ms = rtt_ms
        self._directions: list[tuple[_Direction, _Direction]] = []  # (up, down) per connection
        self._connections: set[asyncio.Task] = set()
        self._server: asyncio.base_events.Server | None = None

    @property
    def uplink_bytes(self) -> int:
        """Bytes carried client -> server so far, over every connection."""
        return sum(up.bytes for up, _ in self._directions)

    @property
    def downlink_bytes(self) -> int:
        return sum(down.bytes for _, down in self._directions)

    @property
    def rate_bytes_per_s(self) -> float:
        return self.mbit * 1e6 / 8

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; returns the port (port 0 picks a free one)."""
        self._server = await asyncio.start_server(self._handle, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        delay = self.rtt_ms / 2000.0  # one way, in seconds
        up, down = _Direction(self.rate_bytes_per_s, delay), _Direction(self.rate_bytes_per_s, delay)
        self._directions.append((up, down))
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await asyncio.gather(_pump(client_reader, server_writer, up), _pump(server_reader, client_writer, down))
        except asyncio.CancelledError:
            pass  # close() cut the connection; end quietly (streams log a cancelled handler as an error)
        finally:
            self._connections.discard(task)
            for writer in (client_writer, server_writer):
                writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: _Direction) -> None:
    """Read chunks as they come, stamp each with its delivery time, and write it then (in order)."""
    in_flight: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def deliver() -> None:
        while (item := await in_flight.get()) is not None:
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(READ_BYTES):
            in_flight.put_nowait((direction.delivery_time(len(data), time.monotonic()), data))
        in_flight.put_nowait(None)  # end of stream: deliver what is in flight, then pass the EOF on
        await delivering
    except (ConnectionError, OSError):
        pass
    finally:
        delivering.cancel()


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class ProxyThread:
    """A SlowLink on its own event loop in a daemon thread (for use from synchronous code)."""

    def __init__(self, link: SlowLink, host: str = "127.0.0.1", port: int = 0):
        self.link = link
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="slow-link", daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(link.start(host, port), self._loop).result(timeout=10)
        self.address = f"{host}:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.link.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def run_in_thread(
    target: str, *, listen: str = "127.0.0.1:0", mbit: float = 100.0, rtt_ms: float = 40.0
) -> ProxyThread:
    """Start a slow link to target (HOST:PORT) in a background thread; .address is where to connect."""
    host, port = parse_address(listen)
    return ProxyThread(SlowLink(*parse_address(target), mbit=mbit, rtt_ms=rtt_ms), host, port)


async def _serve(args: argparse.Namespace) -> None:
    link = SlowLink(*args.target, mbit=args.mbit, rtt_ms=args.rtt_ms)
    port = await link.start(*args.listen)
    print(
        f"slow-link listening on {args.listen[0]}:{port} -> {args.target[0]}:{args.target[1]} "
        f"({args.mbit:g} Mbit/s each way, {args.rtt_ms:g} ms round trip)",
        flush=True,
    )
    try:
        await asyncio.Event().wait()  # until cancelled (Ctrl-C / SIGTERM)
    finally:
        await link.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bandwidth- and latency-limited TCP proxy on loopback.")
    parser.add_argument(
        "--listen",
        type=parse_address,
        default=("127.0.0.1", 0),
        help="HOST:PORT to listen on (default 127.0.0.1:0, a free port)",
    )
    parser.add_argument("--target", type=parse_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--mbit", type=float, default=100.0, help="bandwidth per direction in Mbit/s (default 100)")
    parser.add_argument(
        "--rtt-ms", type=float, default=40.0, help="round-trip time added in ms, half each way (default 40)"
    )
    args = parser.parse_args(argv)
    if args.mbit <= 0 or args.rtt_ms < 0:
        parser.error("--mbit must be > 0 and --rtt-ms >= 0")
    import signal

    loop = asyncio.new_event_loop()
    task = loop.create_task(_serve(args))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
