"""Label privacy through the CLIs with two real processes: the user-kept head (--private-head) trains, its Backward
traffic carries dL/dpooled (B, H) and nothing of shape (B, num_labels), predict reads the run's own head, and the
audit's label inference still reads the labels from the recorded gradients (which the run's privacy.md says)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import running_server
from sap_client import cli as client_cli
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_common.recording import read_records
from sap_server.launch import ServerProcess
from sap_server.provider import Provider
from tiny_models import learnable_rows, write_csv

SCRIPTS = Path(sys.executable).parent
HIDDEN = 32  # tests/tiny_models.py's hidden size
ROWS, EVAL_FRACTION, BATCH = 800, 0.25, 32


@pytest.fixture
def env(tmp_path):
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SAP_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }


def _client(args: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([str(SCRIPTS / "sap-client"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("tail", [0, 1], ids=["head", "head+tail1"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_bert"])
def test_private_head_trains_and_hides_the_logits_but_not_the_labels(model, tail, request, tmp_path, env, capsys):
    """tail 1 (--user-tail 1): the user also runs the model's last block; the provider returns, and receives the
    gradient of, packed hidden states (N_real, H)."""
    folder = request.getfixturevalue(model)
    mode = ["--private-head"] if not tail else ["--user-tail", str(tail)]
    data = write_csv(tmp_path / "data.csv", learnable_rows(ROWS, seed=0))
    record, run = tmp_path / "recording", tmp_path / "run"
    server = ServerProcess.start(
        ["--model", str(folder), "--split", "1", "--port", "0", "--record", str(record)], env=env
    )
    try:
        address = server.address
        _client(
            [
                "train",
                str(data),
                "--server",
                address,
                "--out",
                str(run),
                *mode,
                "--epochs",
                "10",
                "--lr",
                "3e-3",
                "--batch-size",
                str(BATCH),
                "--eval-fraction",
                str(EVAL_FRACTION),
            ],
            env,
        )
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["eval_accuracy"] >= 0.9, metrics
        assert (run / "head.safetensors").is_file() and json.loads((run / "run.json").read_text())["config"][
            "private_head"
        ]

        assert (run / "tail").is_dir() == bool(tail)

        # What the provider received in Backward: dL/dpooled (B, H), or with a tail dL/dhidden (N_real, H), only;
        # no tensor of shape (B, num_labels)
        records = read_records(record)
        forwards = {(r.session, r.step): r for r in records if r.kind == "forward"}
        backward = [r for r in records if r.kind == "backward"]
        train_rows = ROWS - round(ROWS * EVAL_FRACTION)
        assert len(backward) == metrics["steps"] == 10 * -(-train_rows // BATCH)
        name = "grad_hidden" if tail else "grad_pooled"
        for r in backward:
            assert set(r.tensors) == {name}, r.tensors.keys()
            mask = forwards[(r.session, r.step)].tensors["attention_mask"]
            rows = int(mask.sum()) if tail else mask.shape[0]  # every real token, or one row per example
            assert tuple(r.tensors[name].shape) == (rows, HIDDEN)
            assert all(t.dim() != 2 or t.shape[1] != 2 for t in r.tensors.values())

        # predict in a new process reads the run's head (the provider's adapter has none)
        out = tmp_path / "predictions.csv"
        _client(["predict", str(data), "--run", str(run), "--server", address, "--out", str(out)], env)
        with out.open() as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == ROWS
        truth = [label for _, label in learnable_rows(ROWS, seed=0)]
        predicted = [row["label"] for row in rows]  # the predicted label
        assert sum(p == t for p, t in zip(predicted, truth)) / ROWS >= 0.9

        # the audit reads the labels back from the recorded dL/dpooled anyway
        audit = tmp_path / "audit"
        code = client_cli.main(
            [
                "audit",
                str(data),
                "--server",
                address,
                "--run",
                str(run),
                "--recorded",
                str(record),
                "--out",
                str(audit),
                "--max-examples",
                "16",
                "--attack",
                "nn",
            ]
        )
        assert code == 0, capsys.readouterr().err
    finally:
        assert server.stop() == 0
    report = json.loads((audit / "report.json").read_text())
    # the head's gradients lie on one line per step; a tail bends each example's, and clustering reads them once
    # each example's ten epochs are linked by the identical vectors it sent (alone: 90-99.9% over nine runs)
    assert report["label_attack"].split(", ")[0] in (
        ("clustering", "linked clustering") if tail else ("tracked direction",)
    ), report
    assert report["label_inference_accuracy"] >= (0.99 if tail else 0.95), report
    assert report["label_inference_examples"] == 10 * train_rows
    assert 0.4 <= report["label_inference_baseline"] <= 0.6
    statement = (run / "privacy.md").read_text()
    if tail:
        assert "--user-tail 1" in statement and "the training labels are readable" in statement
        assert (
            "Labels read from the recorded gradients" in statement and f"attack: {report['label_attack']}" in statement
        )
    else:
        assert "--private-head" in statement and "every training label of a two-class task is readable" in statement
        assert "Labels read from the recorded gradients" in statement and "tracked direction" in statement


@pytest.mark.parametrize("private_head", [False, True], ids=["logits", "private-head"])
def test_label_epsilon_bounds_what_the_gradients_tell(private_head, tiny_llama, tmp_path, env, capsys):
    """--label-epsilon 1: the provider reads the label training used (exactly), but that is randomized response's,
    so on the true labels its accuracy is what RR allows, e/(e + 1) = 0.731, within sampling noise."""
    rows, epsilon = 600, 1.0
    data = write_csv(tmp_path / "data.csv", learnable_rows(rows, seed=5))
    record, run = tmp_path / "recording", tmp_path / "run"
    server = ServerProcess.start(
        ["--model", str(tiny_llama), "--split", "1", "--port", "0", "--record", str(record)], env=env
    )
    try:
        _client(
            [
                "train",
                str(data),
                "--server",
                server.address,
                "--out",
                str(run),
                "--label-epsilon",
                str(epsilon),
                "--eval-fraction",
                str(EVAL_FRACTION),
                "--lr",
                "3e-3",
                *(["--private-head"] if private_head else []),
            ],
            env,
        )
        audit = tmp_path / "audit"
        args = ["audit", str(data), "--server", server.address, "--run", str(run), "--recorded", str(record)]
        code = client_cli.main([*args, "--out", str(audit), "--max-examples", "8", "--attack", "nn"])
        assert code == 0, capsys.readouterr().err
    finally:
        assert server.stop() == 0
    metrics = json.loads((run / "metrics.json").read_text())
    train_rows = rows - round(rows * EVAL_FRACTION)
    keep = math.e / (math.e + 1)
    assert metrics["label_dp"]["keep_probability"] == pytest.approx(keep)
    assert metrics["label_dp"]["examples"] == train_rows
    flipped = metrics["label_dp"]["flipped"] / train_rows
    sigma = math.sqrt(keep * (1 - keep) / train_rows)
    assert abs((1 - flipped) - keep) < 4 * sigma, flipped
    report = json.loads((audit / "report.json").read_text())
    assert report["label_inference_examples"] == train_rows  # one epoch
    # the attack reads the randomized labels: on the true ones it gets what was kept, never more than RR allows
    assert report["label_inference_accuracy"] == pytest.approx(1 - flipped, abs=0.02), report
    assert report["label_inference_accuracy"] <= keep + 4 * sigma
    statement = (run / "privacy.md").read_text()
    assert "label differential privacy, epsilon = 1" in statement and "0.731" in statement


@pytest.mark.parametrize("tail", [2, 5])
def test_a_user_tail_that_leaves_the_server_no_block_is_refused(tail, tiny_llama, tmp_path, capsys):
    """tiny_llama has 3 blocks; at split 1 the server runs two and keeps at least one: --user-tail 2 or more is
    refused with the range it can serve, before anything is trained."""
    data = write_csv(tmp_path / "data.csv", learnable_rows(40, seed=2))
    provider = Provider.from_loaded(load_model(str(tiny_llama)), split=1, peft=PeftConfig())
    try:
        with running_server(provider) as address:
            args = ["train", str(data), "--server", address, "--out", str(tmp_path / "run"), "--user-tail", str(tail)]
            assert client_cli.main(args) != 0
    finally:
        provider.close()
    err = capsys.readouterr().err
    assert "tail_blocks must be in 1..1" in err and "runs blocks 1..2" in err and f"got {tail}" in err, err
    assert not (tmp_path / "run" / "metrics.json").exists()
