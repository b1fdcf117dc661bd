"""ServerProcess: `sap-server ARGS` in a child process, and its address once it listens.

The one way the tests, the benchmarks and anyone scripting a provider start a server and wait for it: the server
prints `sap-server listening on HOST:PORT` on stdout when it accepts calls (with `--port 0`, the port it got).
A shell script that starts `sap-server ... > FILE &` itself waits with `python -m sap_server.launch wait FILE --pid
PID`, which prints the address (scripts/demo.sh).
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

# sap-cluster (sap_cluster/cli.py) prints the same line for its router, so one launcher starts either
LISTENING = re.compile(r"^sap-(?:server|cluster) listening on (\S+)$")
METRICS = re.compile(r"^sap-server metrics on (\S+)$")  # with --metrics-port, printed right after LISTENING


class ServerStartError(RuntimeError):
    """The server exited, or printed no 'listening' line in time; the message has its output."""


def server_command() -> list[str]:
    """The `sap-server` console script of this environment (python -m sap_server.cli where it is not installed)."""
    script = Path(sys.executable).parent / "sap-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sap_server.cli"]


class ServerProcess:
    """A sap-server child process. Its stdout is drained by a thread (kept in `output`), its stderr goes to `log`
    (a file path) or a temporary file, so that a server that fails to start can say why."""

    def __init__(
        self,
        args: list[str],
        *,
        env: dict | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
        command: list[str] | None = None,
    ):
        self.log_path = log
        self._log: IO[str] = log.open("w") if log is not None else tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [*(command or server_command()), *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._address: str | None = None
        self._final_stderr = ""
        threading.Thread(target=self._pump, name="sap-server-stdout", daemon=True).start()

    @classmethod
    def start(cls, args: list[str], *, timeout: float = 120.0, **kwargs) -> ServerProcess:
        """Start the server and wait until it listens (ServerStartError, with its output, when it does not)."""
        server = cls(args, **kwargs)
        try:
            server.wait_listening(timeout)
        except BaseException:
            server.close()
            raise
        return server

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_listening(self, timeout: float = 120.0) -> str:
        """The server's address HOST:PORT, once it printed its 'listening' line."""
        while self._address is None:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise ServerStartError(
                    f"sap-server printed no 'listening' line within {timeout} s; {self._said()}"
                ) from None
            if line is None:
                raise ServerStartError(f"sap-server exited ({self.process.wait()}) before listening; {self._said()}")
            match = LISTENING.match(line)
            if match:
                self._address = match.group(1)
        return self._address

    @property
    def address(self) -> str:
        if self._address is None:
            raise RuntimeError("the server has not said it listens yet: call wait_listening() first")
        return self._address

    def metrics_url(self, timeout: float = 10.0) -> str:
        """The URL of the server's Prometheus metrics (it runs with --metrics-port), once it printed it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((m.group(1) for m in map(METRICS.match, list(self.output)) if m), None)
            if found:
                return found
            time.sleep(0.05)
        raise ServerStartError(f"sap-server printed no metrics line within {timeout} s (no --metrics-port?)")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (a graceful stop: sessions are checkpointed), wait, close; its exit code. SIGKILL after timeout."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                    raise ServerStartError(f"sap-server did not exit within {timeout} s of SIGTERM; {self._said()}")
            return self.process.returncode
        finally:
            self.close()

    def kill(self) -> None:
        """SIGKILL (no graceful stop), e.g. to test a crash."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def close(self) -> None:
        """Kill it if it still runs; close its pipes (idempotent)."""
        self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if not self._log.closed:
            self._final_stderr = self.stderr()  # a temporary log is gone once closed
            self._log.close()

    def stderr(self) -> str:
        """What the server wrote on stderr so far (its log)."""
        if self.log_path is not None:
            return self.log_path.read_text()
        if self._log.closed:
            return self._final_stderr
        self._log.flush()
        self._log.seek(0)
        text = self._log.read()
        self._log.seek(0, 2)
        return text

    def _said(self) -> str:
        return f"stdout: {self.output[-20:]}; stderr: {self.stderr()[-2000:]}"

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_for_address(stdout: Path, pid: int | None = None, *, timeout: float = 120.0, poll: float = 0.2) -> str:
    """The address a server started elsewhere printed into the file its stdout goes to (ServerStartError when the
    process `pid` exits first, or nothing is printed within timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        text = stdout.read_text() if stdout.exists() else ""
        found = next((m.group(1) for m in map(LISTENING.match, text.splitlines()) if m), None)
        if found:
            return found
        if pid is not None and not _alive(pid):
            raise ServerStartError(f"sap-server (pid {pid}) exited before listening; stdout: {text[-2000:]!r}")
        if time.monotonic() > deadline:
            raise ServerStartError(f"sap-server printed no 'listening' line into {stdout} within {timeout} s")
        time.sleep(poll)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    # a child that exited but was not reaped yet is a zombie: it will never listen
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sap_server.launch",
        description="Wait for a sap-server started by a script: print its address once it listens.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    wait = commands.add_parser("wait", help="wait for the 'listening' line in FILE (the server's stdout)")
    wait.add_argument("stdout", type=Path, metavar="FILE", help="the file the server's stdout is written to")
    wait.add_argument("--pid", type=int, help="the server's process id: stop waiting when it exits")
    wait.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    args = parser.parse_args(argv)
    try:
        print(wait_for_address(args.stdout, args.pid, timeout=args.timeout))
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
