"""Private inference across processes: train with noise and CTI, then predict and evaluate from new client
processes, through a restarted server that keeps adapters in its --state-dir."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import running_server
from sap_client.cli import main as client_main
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_server.launch import ServerProcess
from sap_server.provider import Provider
from tiny_models import learnable_rows, write_csv

BIN = Path(sys.executable).parent
TRAIN_ROWS, EVAL_ROWS = 400, 100
# Measured on the tiny llama at k = 1 (mean ||h|| about 0.12, d = 32): eta 500 with CTI sends noise about
# 0.8 times the signal; 4 epochs at lr 3e-3 then reach 0.75-0.91 eval accuracy over 24 random noise keys
# (no noise: 0.96). lr 1e-2 oscillated (0.54-0.90), too unstable for a threshold.
ETA, EPOCHS, LR = 500.0, 4, 3e-3


def _script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"console script {path} is missing; install the package (pip install -e .)")
    return str(path)


def Server(folder: Path, env: dict, cwd: Path, log: Path, state_dir: Path | None) -> ServerProcess:
    """A sap-server subprocess (split 1, with the state dir when given); its stderr goes to log."""
    args = ["--model", str(folder), "--split", "1", "--port", "0"]
    if state_dir is not None:
        args += ["--state-dir", str(state_dir)]
    return ServerProcess(args, env=env, cwd=cwd, log=log, command=[_script("sap-server")])


def _client(env: dict, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [_script("sap-client"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )


def _finish(process: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{process.args[:2]} ran past {timeout} s; stderr: {stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args[1:3]} exited {result.returncode}: {result.stderr[-3000:]}"
    return result


def test_evaluate_refuses_a_missing_run_folder(tmp_path, capsys):
    data = write_csv(tmp_path / "eval.csv", learnable_rows(4))
    code = client_main(["evaluate", str(data), "--run", str(tmp_path / "no-such-run"), "--server", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "no-such-run is not a run folder" in err and "run.json is missing" in err
    assert "Traceback" not in err


def test_noisy_cti_run_predicts_and_evaluates_from_new_processes_across_restart(tiny_llama, tmp_path, capsys):
    rows = learnable_rows(TRAIN_ROWS + EVAL_ROWS, seed=0)
    train_csv = write_csv(tmp_path / "train.csv", rows[:TRAIN_ROWS])
    eval_csv = write_csv(tmp_path / "eval.csv", rows[TRAIN_ROWS:])
    eval_labels = [label for _, label in rows[TRAIN_ROWS:]]
    run, state, preds = tmp_path / "run", tmp_path / "state", tmp_path / "preds.csv"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        SAP_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
        OMP_NUM_THREADS="1",
    )
    env.pop("SAP_SERVER", None)
    env.pop("SAP_STATE_DIR", None)
    servers: list[Server] = []
    try:
        servers.append(Server(tiny_llama, env, tmp_path, tmp_path / "server1.log", state))
        address = servers[0].wait_listening(60)
        _ok(
            _finish(
                _client(
                    env,
                    tmp_path,
                    "train",
                    str(train_csv),
                    "--eval",
                    str(eval_csv),
                    "--server",
                    address,
                    "--out",
                    str(run),
                    "--epochs",
                    str(EPOCHS),
                    "--lr",
                    str(LR),
                    "--eta",
                    str(ETA),
                    "--cti",
                )
            )
        )
        metrics = json.loads((run / "metrics.json").read_text())
        settings = json.loads((run / "run.json").read_text())
        assert metrics["eta"] == ETA and metrics["cti"] is True
        assert 0.3 < metrics["noise_to_signal"] < 2.0, metrics["noise_to_signal"]  # moderate noise
        assert metrics["eval_accuracy"] >= 0.65, metrics["history"]  # learns despite the noise (majority 0.5)
        assert (run / "cti_counts.safetensors").is_file() and (run / "noise.key").is_file()
        names = settings["label_names"]
        assert sorted(names) == ["neg", "pos"]

        # The replacement server (same state dir) starts now, to save time; it is used only after the
        # first one has exited, and it has never seen the adapter in memory.
        servers.append(Server(tiny_llama, env, tmp_path, tmp_path / "server2.log", state))

        # Predict and evaluate, each from a new process, against the server that trained.
        predict = _client(
            env, tmp_path, "predict", str(eval_csv), "--run", str(run), "--server", address, "--out", str(preds)
        )
        evaluate = _client(env, tmp_path, "evaluate", str(eval_csv), "--run", str(run), "--server", address)
        _ok(_finish(predict))
        _ok(_finish(evaluate))

        with preds.open(newline="") as handle:
            table = list(csv.DictReader(handle))
        assert list(table[0].keys()) == ["row", "label", *(f"p_{name}" for name in names)]
        assert [int(r["row"]) for r in table] == list(range(EVAL_ROWS))
        assert {r["label"] for r in table} <= set(names)
        for r in table:
            probs = [float(r[f"p_{name}"]) for name in names]
            assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) == pytest.approx(1.0, abs=1e-5)
            assert r["label"] == names[probs.index(max(probs))]

        figures = json.loads((run / "evaluation.json").read_text())
        assert figures["examples"] == EVAL_ROWS
        assert figures["accuracy"] == metrics["eval_accuracy"]  # same adapter, split, noise key and CTI table
        assert figures["accuracy"] == sum(r["label"] == y for r, y in zip(table, eval_labels)) / EVAL_ROWS
        assert 0.0 < figures["macro_f1"] <= 1.0

        assert servers[0].stop() == 0, servers[0].stderr()[-3000:]

        # A new server process on the same state dir knows the adapter.
        (run / "evaluation.json").unlink()
        again = _client(
            env, tmp_path, "evaluate", str(eval_csv), "--run", str(run), "--server", servers[1].wait_listening(60)
        )

        # Meanwhile: a server without the state dir (same model and split, in this process) does not.
        provider = Provider.from_loaded(load_model(str(tiny_llama)), split=1, peft=PeftConfig())
        try:
            with running_server(provider) as stateless:
                capsys.readouterr()
                code = client_main(
                    [
                        "evaluate",
                        str(eval_csv),
                        "--run",
                        str(run),
                        "--server",
                        stateless,
                        "--out",
                        str(tmp_path / "unknown.json"),
                    ]
                )
        finally:
            provider.close()
        err = capsys.readouterr().err
        assert code == 1, err
        assert "adapter" in err and "unknown to this server" in err, err
        assert "Traceback" not in err and not (tmp_path / "unknown.json").exists()

        _ok(_finish(again))
        assert json.loads((run / "evaluation.json").read_text())["accuracy"] == metrics["eval_accuracy"]
        assert servers[1].stop() == 0, servers[1].stderr()[-3000:]
    finally:
        for server in servers:
            server.close()
