"""The privacy audit end to end: a real recording of a two-process run, attacked two ways, must agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sap_client import cli as client_cli
from sap_server.launch import ServerProcess
from tiny_models import learnable_rows, write_csv

SCRIPTS = Path(sys.executable).parent


def _start_server(args: list[str], env: dict) -> tuple[ServerProcess, str]:
    server = ServerProcess.start([*args, "--port", "0"], env=env)
    return server, server.address


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SAP_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("rescale", [False, True], ids=["h+n", "rescaled"])
def test_recorded_and_simulated_audits_agree(rescale, tiny_llama, tmp_path, env, capsys):
    data = write_csv(tmp_path / "data.csv", learnable_rows(120, seed=3))
    record, run = tmp_path / "recording", tmp_path / "run"
    server, address = _start_server(["--model", str(tiny_llama), "--split", "0", "--record", str(record)], env)
    try:
        trained = subprocess.run(
            [
                str(SCRIPTS / "sap-client"),
                "train",
                str(data),
                "--server",
                address,
                "--out",
                str(run),
                "--epochs",
                "2",
                "--noise-ratio",
                "2.5",
                "--eval-fraction",
                "0.25",
                *(["--rescale-noised"] if rescale else []),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert trained.returncode == 0, trained.stderr
        assert len(list(record.glob("*-forward.safetensors"))) > 0
        assert len(list(record.glob("*-evaluate.safetensors"))) > 0

        reports = {}
        for name, extra, texts in (
            ("simulated", [], 120),
            ("recorded", ["--recorded", str(record)], 120),
            ("recorded-first-30", ["--recorded", str(record)], 30),
        ):
            out = tmp_path / name
            code = client_cli.main(
                [
                    "audit",
                    str(data),
                    "--server",
                    address,
                    "--run",
                    str(run),
                    "--out",
                    str(out),
                    "--max-examples",
                    str(texts),
                    "--observations",
                    "1",
                    *extra,
                ]
            )
            assert code == 0, capsys.readouterr().err
            reports[name] = json.loads((out / "report.json").read_text())
            assert (out / "report.md").read_text().startswith("# SAP privacy audit")
    finally:
        assert server.stop() == 0

    simulated, recorded = reports["simulated"], reports["recorded"]
    print(
        f"token recovery: simulated {simulated['eia_token_recovery']:.4f}, "
        f"recorded {recorded['eia_token_recovery']:.4f}"
    )
    assert simulated["attack"] == recorded["attack"] == "nn"
    # every distinct example the server received was matched to its text (2 epochs collapse to one copy)
    assert recorded["recorded_examples"] == 120 and recorded["unmatched_examples"] == 0
    assert recorded["examples"] == simulated["examples"] == 120
    # audited on its first 30 texts, the recording's other 90 examples are left out, not paired with wrong texts
    first = reports["recorded-first-30"]
    assert (first["examples"], first["recorded_examples"], first["unmatched_examples"]) == (30, 120, 90)
    assert first["eia_tokens"] < recorded["eia_tokens"]
    assert 0.1 < simulated["eia_token_recovery"] < 0.9, simulated  # a noise level where the figure is informative
    assert abs(simulated["eia_token_recovery"] - recorded["eia_token_recovery"]) <= 0.02, (simulated, recorded)
    for key in ("split", "eta", "cti", "eia_token_recovery", "eia_privacy"):
        assert key in simulated and key in recorded
    norm = json.loads((run / "run.json").read_text())["rescale_norm"]
    assert (norm is not None) == rescale and simulated["rescale_norm"] == recorded["rescale_norm"] == norm
    # the labels: the sign rule reads every training label from the recorded Backward gradients (90 training
    # examples, 2 epochs: 180 gradient rows), against a majority baseline printed beside it
    assert recorded["label_inference_accuracy"] == 1.0
    assert recorded["label_inference_examples"] == 180 and 0.4 <= recorded["label_inference_baseline"] <= 0.6
    # the labels of the whole file are read, though only its first 30 texts are inverted
    assert first["label_inference_examples"] == 180 and first["label_inference_accuracy"] == 1.0
    assert "label_inference_accuracy" not in simulated  # nothing recorded, nothing to read labels from
    # the run's privacy statement names the label exposure, and the audits of its settings were added to it
    statement = (run / "privacy.md").read_text()
    assert "every training label is readable by the provider" in statement
    assert "## Audit of these settings" in statement and "Labels read from the recorded gradients" in statement
    privacy = json.loads((run / "metrics.json").read_text())["privacy"]
    assert privacy["split"] == 0 and privacy["audit"]["eia_token_recovery"] == first["eia_token_recovery"]
    assert "epsilon_median_pair" in privacy  # k = 0: the metric-DP statement


def test_a_fresh_noise_runs_audit_figure_averages_the_copies_the_provider_holds(tiny_llama, tmp_path, env, capsys):
    """--fresh-noise for 3 epochs hands the provider 3 noisy copies of each text: the simulated audit's figure is the
    one with 3 averaged, even when only 1 was asked for; a recorded audit links each text's copies (one per epoch) and
    averages them."""
    data = write_csv(tmp_path / "data.csv", learnable_rows(60, seed=3))
    run, record = tmp_path / "run", tmp_path / "recording"
    server, address = _start_server(["--model", str(tiny_llama), "--split", "0", "--record", str(record)], env)
    reports = {}
    try:
        train = ["train", str(data), "--server", address, "--out", str(run), "--epochs", "3", "--fresh-noise"]
        assert client_cli.main([*train, "--noise-ratio", "2", "--eval-fraction", "0.25"]) == 0
        for name, extra in (("simulated", []), ("recorded", ["--recorded", str(record)])):
            audit = ["audit", str(data), "--server", address, "--run", str(run), "--out", str(tmp_path / name)]
            assert client_cli.main([*audit, "--max-examples", "45", "--observations", "1", *extra]) == 0, capsys
            reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    finally:
        assert server.stop() == 0
    simulated, recorded = reports["simulated"], reports["recorded"]
    by_n = {o["observations"]: o for o in simulated["observations"]}
    assert sorted(by_n) == [1, 3] and simulated["headline_observations"] == 3
    assert simulated["eia_token_recovery"] == by_n[3]["recovery"] > by_n[1]["recovery"], by_n
    text = (tmp_path / "simulated" / "report.md").read_text()
    assert "3 noisy copies of each example the provider holds averaged" in text
    quoted = json.loads((run / "metrics.json").read_text())["privacy"]["audit"]  # the last audit's
    assert quoted["eia_token_recovery"] == recorded["eia_token_recovery"]
    attacks = recorded["eia_attacks"]
    print(
        f"fresh noise x 3: simulated {by_n[1]['recovery']:.3f} / {by_n[3]['recovery']:.3f} (1 / 3 copies), "
        f"recorded {attacks['nn']['recovery']:.3f} / {attacks['nn, copies averaged']['recovery']:.3f} "
        f"({recorded['copies_linked']} of {recorded['recorded_examples']} received linked)"
    )
    assert recorded["copies_per_text"] == 3 and recorded["attack"] == "nn, copies averaged"
    # 35 runs: one copy 0.56-0.66, linked copies averaged 0.78-0.87, a gain of 0.16-0.27 (132 of 148 linked);
    # perfect averaging (simulated) 0.92-0.97. Pairwise nearest-first linking to epoch 1's copy gained 0.06-0.21
    assert attacks["nn, copies averaged"]["recovery"] > attacks["nn"]["recovery"] + 0.12, attacks
    assert recorded["eia_token_recovery"] <= simulated["eia_token_recovery"] + 0.05, (recorded, simulated)
    linked = f"linked {recorded['copies_linked']} of the {recorded['recorded_examples']} received examples"
    assert linked in (tmp_path / "recorded" / "report.md").read_text()
    assert recorded["copies_linked"] >= 0.8 * 45 * 3  # 45 training texts, 3 copies each


def test_audit_without_noise_recovers_everything_and_noise_protects(tiny_llama, tmp_path, env, capsys):
    # the attribute ("party") is written into the text, so the attribute attack has something to find
    with_party = write_csv(tmp_path / "party.csv", learnable_rows(60, seed=4), ("text", "party"))
    server, address = _start_server(["--model", str(tiny_llama), "--split", "0"], env)
    try:
        figures = {}
        for name, flags in (("clean", []), ("noisy", ["--noise-ratio", "10"])):
            out = tmp_path / name
            assert (
                client_cli.main(
                    [
                        "audit",
                        str(with_party),
                        "--server",
                        address,
                        "--out",
                        str(out),
                        "--max-examples",
                        "60",
                        "--observations",
                        "1,16",
                        "--attribute-column",
                        "party",
                        *flags,
                    ]
                )
                == 0
            ), capsys.readouterr().err
            figures[name] = json.loads((out / "report.json").read_text())
    finally:
        assert server.stop() == 0
    clean, noisy = figures["clean"], figures["noisy"]
    assert clean["eia_token_recovery"] >= 0.99 and clean["eia_privacy"] <= 0.01
    assert noisy["eia_token_recovery"] < 0.2
    by_n = {o["observations"]: o["recovery"] for o in noisy["observations"]}
    assert by_n[16] > by_n[1] + 0.2, by_n  # averaging 16 copies cuts the noise 4x: it strips the privacy
    for report in (clean, noisy):
        assert {"aia_accuracy", "aia_baseline", "aia_privacy"} <= report.keys()


def test_the_audit_measures_what_the_trainers_send_function_sends(tiny_llama, tmp_path, env, capsys, monkeypatch):
    """The audit builds no send path of its own: change SplitTrainer.to_send (what training sends) and the audit's
    figure follows it."""
    from sap_client.trainer import SplitTrainer

    data = write_csv(tmp_path / "data.csv", learnable_rows(24, seed=5))
    server, address = _start_server(["--model", str(tiny_llama), "--split", "0"], env)
    original, calls = SplitTrainer.to_send, []

    def swamped(self, hidden, mask, *args, **kwargs):
        sent = original(self, hidden, mask, *args, **kwargs)
        calls.append(sent.shape)
        noise = torch.randn(sent.shape, generator=torch.Generator().manual_seed(len(calls)))
        return sent + 100 * sent.norm(dim=-1, keepdim=True).mean() * noise * mask.unsqueeze(-1)

    def recovery(name: str) -> float:
        out = tmp_path / name
        argv = ["audit", str(data), "--server", address, "--out", str(out), "--max-examples", "24"]
        assert client_cli.main([*argv, "--observations", "1", "--public-examples", "0"]) == 0, capsys.readouterr()
        return json.loads((out / "report.json").read_text())["eia_token_recovery"]

    try:
        clean = recovery("as-trained")
        monkeypatch.setattr(SplitTrainer, "to_send", swamped)
        changed = recovery("changed-send-path")
    finally:
        assert server.stop() == 0
    print(f"audit token recovery: send path as trained {clean:.3f}, changed {changed:.3f}")
    assert calls, "the audit never called the trainer's send function"
    assert clean >= 0.99 and changed < 0.3
