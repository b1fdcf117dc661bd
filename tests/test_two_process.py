"""Two real processes through the console scripts: sap-server on port 0, sap-client train, SIGTERM, exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sap_server.launch import ServerProcess
from tiny_models import build_tiny_model, learnable_rows, write_csv

BIN = Path(sys.executable).parent
METRIC_KEYS = (
    "eval_accuracy",
    "train_loss",
    "steps",
    "examples",
    "bytes_sent",
    "bytes_received",
    "seconds",
    "examples_per_second",
    "split",
    "peft",
    "model",
)
ROWS, EPOCHS, LR, BATCH, EVAL_FRACTION = 800, 10, 3e-3, 32, 0.25


def _script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"console script {path} is missing; install the package (pip install -e .)")
    return str(path)


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2", "qwen3", "mistral"])
def test_train_through_two_processes(family, tiny_bert, tiny_llama, tmp_path):
    """Every family the README lists learns a separable task through the CLIs (a tiny Qwen2 folder once stayed at
    loss ln 2: transformers rebuilt its word-level tokenizer as Qwen2Tokenizer, which dropped every word)."""
    folder = {"bert": tiny_bert, "llama": tiny_llama}.get(family) or build_tiny_model(tmp_path / family, family)
    data = write_csv(tmp_path / "data.csv", learnable_rows(ROWS, seed=0))
    run = tmp_path / "run"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        SAP_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
        OMP_NUM_THREADS="1",
    )  # one thread each: the two processes share the cores
    server = ServerProcess(
        ["--model", str(folder), "--split", "1", "--port", "0"], env=env, cwd=tmp_path, command=[_script("sap-server")]
    )
    try:
        address = server.wait_listening(timeout=60)
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        client = subprocess.run(
            [
                _script("sap-client"),
                "train",
                str(data),
                "--server",
                address,
                "--out",
                str(run),
                "--epochs",
                str(EPOCHS),
                "--lr",
                str(LR),
                "--batch-size",
                str(BATCH),
                "--eval-fraction",
                str(EVAL_FRACTION),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert client.returncode == 0, client.stderr[-3000:]
        assert "eval accuracy" in client.stdout

        metrics = json.loads((run / "metrics.json").read_text())
        missing = [key for key in METRIC_KEYS if key not in metrics]
        assert not missing, f"metrics.json lacks {missing}"
        assert metrics["eval_accuracy"] >= 0.9, metrics
        assert metrics["split"] == 1 and metrics["peft"] == "lora" and metrics["model"] == folder.name
        train_rows = ROWS - round(ROWS * EVAL_FRACTION)  # two balanced classes: the split is exact
        assert metrics["examples"] == train_rows * EPOCHS
        assert metrics["steps"] == EPOCHS * -(-train_rows // BATCH)
        assert metrics["bytes_sent"] > 0 and metrics["bytes_received"] > 0
        assert metrics["seconds"] > 0 and metrics["examples_per_second"] > 0
        assert (run / "run.json").is_file()
        statement = (run / "privacy.md").read_text()  # every run says what its settings protect, and what not
        assert "every training label is readable by the provider" in statement and "no noise" in statement
        assert json.loads((run / "metrics.json").read_text())["privacy"]["mechanism"] == "none"
        assert any((tmp_path / "cache" / "bottoms").iterdir()), "the bottom was not cached under SAP_CACHE_DIR"

        code = server.stop()
        assert code == 0, server.stderr()[-3000:]
    finally:
        server.close()


def test_a_script_waits_for_its_server_with_the_launch_helper(tiny_llama, tmp_path):
    """What scripts/demo.sh does: `sap-server ... > FILE &`, then `python -m sap_server.launch wait FILE --pid PID`
    prints the address once the server listens, and says so when the server dies first."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", SAP_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    out = tmp_path / "server.out"
    with out.open("w") as stdout:
        server = subprocess.Popen(
            [_script("sap-server"), "--model", str(tiny_llama), "--split", "1", "--port", "0"],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    try:
        waited = subprocess.run(
            [sys.executable, "-m", "sap_server.launch", "wait", str(out), "--pid", str(server.pid), "--timeout", "60"],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert waited.returncode == 0, waited.stderr
        address = waited.stdout.strip()
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        assert f"sap-server listening on {address}" in out.read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)

    dead = tmp_path / "dead.out"
    with dead.open("w") as stdout:
        failing = subprocess.Popen(
            [_script("sap-server"), "--model", str(tmp_path / "no-such-model"), "--split", "1", "--port", "0"],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    failing.wait(timeout=60)
    waited = subprocess.run(
        [sys.executable, "-m", "sap_server.launch", "wait", str(dead), "--pid", str(failing.pid), "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert waited.returncode == 1 and "exited before listening" in waited.stderr, waited.stderr
