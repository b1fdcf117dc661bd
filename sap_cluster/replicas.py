"""Provider replicas under Ray: each replica is a full sap-server running inside a Ray actor, which Ray starts on a
node with the resources asked for (one per GPU, or per machine with SPREAD) and starts again when its process dies
(max_restarts=-1). Every replica serves with the same --state-dir, a folder all of them read (a shared disk; an
object store mounted as one is the production option), so a session checkpointed by one can be loaded by another.

Ray decides where replicas run and keeps them alive; it never decides where a session runs: that is the router's
table (sap_cluster/router.py). Ray Serve's model multiplexing would be the wrong tool for it: it may load a busy
model on a second replica, which for a training session would fork its optimizer state.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import ray

log = logging.getLogger(__name__)

REFRESH_S = 0.5  # how often the supervisor asks each actor where its server listens
INFO_TIMEOUT_S = 1.0


class Replica:
    """One sap-server inside a Ray actor; started again by Ray, at a new port, when its process dies."""

    def __init__(self, name: str, server_args: list[str]):
        from sap_server.cli import configure_logging, parse_args, start  # after the OpenMP spin is set

        args = parse_args(server_args)
        configure_logging(args.verbose)
        self.name = name
        self.running = start(args)
        self.address = f"{args.host}:{self.running.port}"
        self.metrics = None if self.running.metrics_port is None else f"http://{args.host}:{self.running.metrics_port}"
        logging.getLogger("sap_server").info("replica %s serving on %s (pid %d)", name, self.address, os.getpid())

    def info(self) -> dict:
        return {"name": self.name, "address": self.address, "pid": os.getpid(), "metrics": self.metrics}

    def stop(self, grace: float = 5.0) -> None:
        """A graceful stop: finish the calls under way, checkpoint every loaded session, free the model."""
        self.running.server.stop(grace).wait()
        self.running.close()


# The actor class: Ray starts it again (a new process, the server at a new port) whenever its process dies.
RemoteReplica: Any = ray.remote(max_restarts=-1, max_task_retries=0)(Replica)


class RayReplicas:
    """Starts `count` replicas and keeps track of where each one listens (sap_cluster.router.Replicas)."""

    def __init__(
        self,
        count: int,
        server_args: list[str],
        *,
        cpus: float = 1.0,
        gpus: float = 0.0,
        start_timeout: float = 600.0,
    ):
        if count < 1:
            raise ValueError(f"a cluster needs at least one replica, got {count}")
        env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "GOMP_SPINCOUNT": "10000"}
        self.actors = {
            f"replica-{i}": RemoteReplica.options(
                name=f"sap-replica-{i}",
                num_cpus=cpus,
                num_gpus=gpus,
                scheduling_strategy="SPREAD",  # across nodes where there are several
                runtime_env={"env_vars": env},
            ).remote(f"replica-{i}", server_args)
            for i in range(count)
        }
        self._info: dict[str, dict] = {}  # the replicas up now
        self._pids: dict[str, int] = {}  # each replica's latest process, up or not
        self._lock = threading.Lock()
        deadline = time.monotonic() + start_timeout
        for name, actor in self.actors.items():  # every replica up before the router takes calls
            self._info[name] = ray.get(actor.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
            self._pids[name] = self._info[name]["pid"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="sap-replicas", daemon=True)
        self._thread.start()

    def addresses(self) -> dict[str, str]:
        with self._lock:
            return {name: info["address"] for name, info in self._info.items()}

    def info(self) -> dict[str, dict]:
        with self._lock:
            return {name: dict(info) for name, info in self._info.items()}

    def _refresh(self) -> None:
        """Ask each actor where its server listens. An actor that answers late (busy, or starting again after its
        process died) keeps its last address: whether that replica is gone is for its health service to say (the
        router asks it before it moves a session); one whose actor is dead for good is left out."""
        while not self._stop.wait(REFRESH_S):
            for name, actor in self.actors.items():
                ready, _ = ray.wait([actor.info.remote()], timeout=INFO_TIMEOUT_S)
                if not ready:
                    continue
                try:
                    info = ray.get(ready[0])
                except ray.exceptions.RayError:
                    with self._lock:
                        self._info.pop(name, None)
                    continue
                with self._lock:
                    if self._pids.get(name) != info["pid"]:
                        log.warning("replica %s started again: pid %d at %s", name, info["pid"], info["address"])
                        self._pids[name] = info["pid"]
                    self._info[name] = info

    def close(self, timeout: float = 60.0) -> None:
        """Stop every replica gracefully (each checkpoints its sessions), then end the actors."""
        self._stop.set()
        self._thread.join(timeout=5)
        stops = [actor.stop.remote() for actor in self.actors.values()]
        ray.wait(stops, num_returns=len(stops), timeout=timeout)
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
