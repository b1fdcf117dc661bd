"""Operations of a running sap-server process: the standard gRPC health service answers SERVING (to the grpc health
client and to `python -m sap_server.health`), and --metrics-port serves the listed Prometheus metrics, which move
as a client trains."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sap_server.health import SERVICE, check
from sap_server.launch import ServerProcess
from tiny_models import learnable_rows, write_csv

SCRIPTS = Path(sys.executable).parent


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_health_and_metrics_of_a_serving_server(tiny_llama, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAP_CACHE_DIR": str(tmp_path / "cache"), "TQDM_DISABLE": "1"}
    args = ["--model", str(tiny_llama), "--split", "1", "--port", "0", "--metrics-port", "0"]
    server = ServerProcess.start([*args, "--state-dir", str(tmp_path / "state"), "--checkpoint-every", "2"], env=env)
    try:
        assert check(server.address) == "SERVING" and check(server.address, service=SERVICE) == "SERVING"
        probe = [sys.executable, "-m", "sap_server.health", server.address]
        done = subprocess.run(probe, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0 and done.stdout.strip() == "SERVING", done
        with pytest.raises(grpc.RpcError) as refused:
            check(server.address, service="no.such.Service")
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND

        url = server.metrics_url()
        before = _scrape(url)
        assert before["sap_sessions_loaded"] == 0 and before["sap_steps_total"] == 0
        assert before["sap_compute_queue_depth"] == 0 and before["sap_steps_per_second"] == 0
        data = write_csv(tmp_path / "data.csv", learnable_rows(80, seed=1))
        train = [
            str(SCRIPTS / "sap-client"),
            "train",
            str(data),
            "--server",
            server.address,
            "--out",
            str(tmp_path / "run"),
        ]
        trained = subprocess.run(
            [*train, "--batch-size", "8", "--eval-fraction", "0.1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert trained.returncode == 0, trained.stderr[-2000:]
        after = _scrape(url)
    finally:
        assert server.stop() == 0
    steps = 72 // 8  # 80 rows, 8 held out, batch 8, one epoch
    assert after["sap_steps_total"] == steps and after["sap_steps_per_second"] == pytest.approx(steps / 60)
    assert after["sap_sessions_loaded"] == 0  # the run closed its session (its adapter is kept)
    assert after["sap_bytes_received_total"] > 72 * 32 * 4  # at least every training example's vectors once
    assert after["sap_bytes_sent_total"] > before.get("sap_bytes_sent_total", 0)
    # checkpoints: when the session opened, every 2 steps, and when it closed
    assert after["sap_checkpoint_seconds_count"] >= 1 + steps // 2 and after["sap_checkpoint_seconds_sum"] > 0
    assert after["sap_compute_queue_depth"] == 0
