"""sap-cluster as a process: two sap-server replicas in Ray actors behind the router. A session's replica is killed
with SIGKILL after step 3 (its last checkpoint: step 2); the session moves to the other replica, the client resumes
from step 2 and finishes, and the kept adapter equals that of a run on a single server that never died. Ray starts
the killed replica again on its own."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sap_client.remote import RemoteTopService
from sap_common.errors import StepOrderError
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_common.service import SessionSpec
from sap_server.health import check
from sap_server.launch import ServerProcess
from sap_server.local import LocalTopService
from sap_server.provider import Provider
from session_steps import NUM_LABELS, step

pytest.importorskip("ray")
SCRIPTS = Path(sys.executable).parent
REPLICA = re.compile(r"^replica (\S+) pid (\d+) at (\S+)$")
STEPS, SEED = 6, 4


def _solo(folder: Path) -> dict[str, torch.Tensor]:
    provider = Provider.from_loaded(load_model(str(folder)), split=1, peft=PeftConfig())
    try:
        service = LocalTopService(provider)
        sid = service.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=SEED))
        for n in range(1, STEPS + 1):
            step(service, sid, SEED, n)
        return provider.sessions.get(sid).trainable_state()
    finally:
        provider.close()


def test_a_killed_replicas_session_finishes_on_the_other_with_the_same_weights(tiny_llama, tmp_path, one_thread):
    state = tmp_path / "state"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--replicas", "2", "--state-dir", str(state), "--port", "0", "--replica-cpus", "0.5"]
    server_args = ["--", "--model", str(tiny_llama), "--split", "1", "--checkpoint-every", "2"]
    cluster = ServerProcess.start([*args, *server_args], command=[str(SCRIPTS / "sap-cluster")], env=env, timeout=300)
    try:
        pids = {m.group(1): int(m.group(2)) for m in map(REPLICA.match, cluster.output) if m}
        assert sorted(pids) == ["replica-0", "replica-1"] and check(cluster.address) == "SERVING"
        with RemoteTopService(cluster.address, tries=1) as service:
            sid = service.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=SEED))
            for n in range(1, 4):
                step(service, sid, SEED, n)
            owner = next(name for name in pids if f"opened on {name}" in cluster.stderr())
            os.kill(pids[owner], signal.SIGKILL)
            with pytest.raises(StepOrderError, match="next step is 3"):  # step 3 died with its replica
                step(service, sid, SEED, 4)
            assert "moved to" in cluster.stderr()
            assert service.resume_session(sid, 2) == 2  # the client's checkpoint, as after a server restart
            for n in range(3, STEPS + 1):
                step(service, sid, SEED, n)
            adapter = service.finish_session(sid)
        deadline = time.monotonic() + 120
        while f"replica {owner} started again" not in cluster.stderr():  # Ray, not the router, restarts it
            assert time.monotonic() < deadline, cluster.stderr()[-3000:]
            time.sleep(0.5)
    finally:
        assert cluster.stop(timeout=120) == 0
    kept = load_file(str(state / "adapters" / adapter / "adapter.safetensors"))
    expected = _solo(tiny_llama)
    assert kept.keys() == expected.keys()
    assert all(torch.equal(kept[k], expected[k]) for k in expected)
