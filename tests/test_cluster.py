"""The router in front of replicas (sap_cluster/router.py), on two real in-process sap-servers that share one state
dir: sessions spread over the replicas and stay on theirs; when a replica dies, its sessions move to the live one,
which loads their latest checkpoint, and their steps go on exactly once (the weights equal a run with no death); a
restarted router routes as before. Without Ray: the engine only starts the replicas and starts them again."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from sap_client.remote import RemoteTopService
from sap_cluster.router import Router, StaticReplicas, start_router
from sap_common.errors import ServerUnavailableError, StepOrderError
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_common.service import SessionSpec
from sap_server.app import start_server
from sap_server.health import check
from sap_server.provider import Provider
from session_steps import NUM_LABELS, step

STEPS = 6


class Replica:
    """A sap-server on loopback over the shared state dir, which the test can kill."""

    def __init__(self, folder: Path, state: Path, checkpoint_every: int):
        self.provider = Provider.from_loaded(
            load_model(str(folder)), split=1, peft=PeftConfig(), state_dir=state, checkpoint_every=checkpoint_every
        )
        self.server, port = start_server(self.provider, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{port}"

    def kill(self) -> None:
        """Gone at once, nothing checkpointed: as a process killed with SIGKILL."""
        self.server.stop(None).wait()
        self.provider.close()


def _open(service: RemoteTopService, seed: int) -> str:
    return service.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=seed))


def _weights(replica: Replica, session_id: str) -> dict[str, torch.Tensor]:
    return replica.provider.sessions.get(session_id).trainable_state()


def _solo(folder: Path, state: Path, seeds: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Each seed's weights after STEPS steps on one replica that never dies."""
    replica = Replica(folder, state, checkpoint_every=100)
    try:
        with RemoteTopService(replica.address) as service:
            out = {}
            for seed in seeds:
                sid = _open(service, seed)
                for n in range(1, STEPS + 1):
                    step(service, sid, seed, n)
                out[seed] = _weights(replica, sid)
            return out
    finally:
        replica.kill()


@pytest.fixture
def two(tiny_llama, tmp_path):
    state = tmp_path / "state"
    replicas = {name: Replica(tiny_llama, state, checkpoint_every=2) for name in ("a", "b")}
    router = Router(StaticReplicas({n: r.address for n, r in replicas.items()}), table=state / "router.json")
    server, port = start_router(router)
    yield replicas, router, f"127.0.0.1:{port}", state
    server.stop(None).wait()
    router.close()
    for replica in replicas.values():
        if replica.server is not None:
            replica.kill()


def test_sessions_spread_stay_put_and_move_with_no_step_lost_or_applied_twice(two, tiny_llama, tmp_path):
    replicas, router, address, state = two
    assert check(address) == "SERVING"  # the router answers the health service itself
    with RemoteTopService(address, tries=1) as service:
        assert service.server_info().split == 1  # any replica answers what is not a session's
        sids = {seed: _open(service, seed) for seed in (1, 2)}
        owner = {seed: router.table.get(sid) for seed, sid in sids.items()}
        assert sorted(owner.values()) == ["a", "b"]  # the least loaded replica takes each new session
        for n in range(1, 4):
            for seed, sid in sids.items():
                step(service, sid, seed, n)
        for seed, sid in sids.items():  # strong stickiness: only its own replica ever held it
            mine, other = replicas[owner[seed]], replicas["b" if owner[seed] == "a" else "a"]
            assert mine.provider.sessions.get(sid).steps_applied == 3 and sid not in other.provider.sessions

        # replica a dies after step 3; its session's last checkpoint is step 2 (every 2 steps)
        dead_seed = next(seed for seed, name in owner.items() if name == "a")
        live_seed = next(seed for seed, name in owner.items() if name == "b")
        replicas["a"].kill()
        router.replicas = StaticReplicas({"b": replicas["b"].address})  # the engine no longer lists it
        # the next step of the moved session is refused by step order (step 3 died with the replica) ...
        with pytest.raises(StepOrderError, match="next step is 3"):
            step(service, sids[dead_seed], dead_seed, 4)
        assert router.table.get(sids[dead_seed]) == "b" and router.moves == 1
        # ... and the client resumes from its own checkpoint (step 2), as after a server restart
        assert service.resume_session(sids[dead_seed], 2) == 2
        for n in range(3, STEPS + 1):
            step(service, sids[dead_seed], dead_seed, n)
        for n in range(4, STEPS + 1):
            step(service, sids[live_seed], live_seed, n)
        trained = {seed: _weights(replicas["b"], sid) for seed, sid in sids.items()}
    expected = _solo(tiny_llama, tmp_path / "solo-state", [1, 2])
    for seed in (1, 2):
        assert trained[seed].keys() == expected[seed].keys()
        assert all(torch.equal(trained[seed][k], expected[seed][k]) for k in expected[seed]), seed

    # a router started again reads its table: every session goes where it went
    again = Router(StaticReplicas({"b": replicas["b"].address}), table=state / "router.json")
    assert {again.table.get(sid) for sid in sids.values()} == {"b"}


def test_a_session_call_without_its_id_is_refused_and_a_dead_cluster_says_unavailable(two):
    replicas, router, address, _ = two
    with RemoteTopService(address, tries=1) as service:
        sid = _open(service, 3)
    with grpc.insecure_channel(address) as channel:
        resume = channel.unary_unary("/sap.v2.SplitLearning/ResumeSession")
        with pytest.raises(grpc.RpcError) as refused:
            resume(b"", metadata=[("sap-session-secret", "0" * 64)], timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sap-session-id" in refused.value.details()
    for replica in replicas.values():
        replica.kill()
        replica.server = None
    with RemoteTopService(address, tries=1) as service:
        service.use_session(sid, "0" * 64)
        with pytest.raises(ServerUnavailableError, match="no replica is up|is gone"):
            service.resume_session(sid, 0)
