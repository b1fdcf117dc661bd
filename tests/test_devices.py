"""--device and --dtype: a bfloat16 top on the CPU trains, bad values exit 2, a missing GPU exits 1.

The CUDA tests run only where torch sees a GPU (never in CI); everything else runs on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_two_process import _script

from sap_client import cli as client_cli
from sap_client.bottom import load_server_bottom
from sap_client.data import TextDataset
from sap_client.trainer import SplitTrainer, TrainConfig
from sap_common.devices import DeviceUnavailableError, parse_max_memory, plan_blocks, resolve_device
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_common.recording import read_recording
from sap_server import cli as server_cli
from sap_server.launch import ServerProcess
from sap_server.local import LocalTopService
from sap_server.provider import Provider
from tiny_models import learnable_rows, write_csv

CUDA = torch.cuda.is_available()
NAMES = ["neg", "pos"]
ROWS, EPOCHS, LR, BATCH = 400, 8, 3e-3, 16  # chance is 0.5; float32 and bfloat16 both reach ~0.85 here


def _dataset(rows: list[tuple[str, str]]) -> TextDataset:
    return TextDataset([text for text, _ in rows], [NAMES.index(label) for _, label in rows], NAMES)


# --- parsing and resolving ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cpu:0", "tpu", ""])
def test_server_rejects_a_bad_device_with_exit_2(value, capsys):
    with pytest.raises(SystemExit) as info:
        server_cli.main(["--device", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and "auto|cpu|cuda" in err


@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "audit"])
def test_client_commands_reject_a_bad_device_with_exit_2(command, tmp_path, capsys):
    extra = {
        "train": [],
        "predict": ["--run", str(tmp_path), "--out", str(tmp_path / "p.csv")],
        "evaluate": ["--run", str(tmp_path)],
        "audit": ["--out", str(tmp_path / "audit")],
    }[command]
    with pytest.raises(SystemExit) as info:
        client_cli.main([command, str(tmp_path / "data.csv"), *extra, "--device", "gpu0"])
    assert info.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_server_rejects_a_bad_dtype_with_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        server_cli.main(["--dtype", "float8"])
    assert info.value.code == 2
    assert "bfloat16" in capsys.readouterr().err


def test_auto_follows_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("CPU") == torch.device("cpu")


def test_cuda_index_beyond_the_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceUnavailableError, match="cuda:3.*1 CUDA device"):
        resolve_device("cuda:3")


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_server_asked_for_cuda_without_one_exits_1(device, capsys):
    # fails before loading any model: the default model need not be installed for this
    assert server_cli.main(["--device", device, "--port", "0"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "error" in err[0] and "CUDA is not available" in err[0] and device in err[0], err


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["train", "audit"])
def test_client_asked_for_cuda_without_one_exits_1(command, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv", learnable_rows(20))
    extra = ["--out", str(tmp_path / "out")]
    assert client_cli.main([command, str(data), *extra, "--device", "cuda", "--server", "127.0.0.1:1"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "CUDA is not available" in err[0], err
    assert not (tmp_path / "out").exists(), "the device is checked before anything is written"


def test_environment_gives_the_defaults(monkeypatch, tmp_path):
    for name, value in {
        "SAP_MODEL": "minilm-l6",
        "SAP_SPLIT": "2",
        "SAP_PEFT": "bitfit",
        "SAP_HOST": "0.0.0.0",
        "SAP_PORT": "6000",
        "SAP_DEVICE": "cpu",
        "SAP_DTYPE": "bfloat16",
        "SAP_STATE_DIR": str(tmp_path),
        "SAP_SERVER": "provider:7000",
        "SAP_DEVICE_MAP": "balanced",
        "SAP_MAX_MEMORY": "cpu=1GiB",
    }.items():
        monkeypatch.setenv(name, value)
    args = server_cli.build_parser().parse_args([])
    assert (args.model, args.split, args.peft, args.host, args.port, args.device, args.dtype, args.state_dir) == (
        "minilm-l6",
        2,
        "bitfit",
        "0.0.0.0",
        6000,
        "cpu",
        "bfloat16",
        tmp_path,
    )
    assert (args.device_map, args.max_memory) == ("balanced", "cpu=1GiB")
    assert server_cli.build_parser().parse_args(["--split", "3"]).split == 3  # a flag beats the environment
    args = client_cli.build_parser().parse_args(["train", "data.csv"])
    assert (args.server, args.device) == ("provider:7000", "cpu")


def test_a_bad_environment_value_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("SAP_SPLIT", "six")
    with pytest.raises(SystemExit) as info:
        server_cli.main([])
    assert info.value.code == 2
    assert "--split" in capsys.readouterr().err


# --- a reduced-precision top, in-process ---------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_session_weights_are_created_in_the_top_dtype(method, dtype, tiny_llama, tmp_path, one_thread):
    provider = Provider.from_loaded(load_model(str(tiny_llama)), split=1, peft=PeftConfig(method=method), dtype=dtype)
    try:
        service = LocalTopService(provider)
        bottom, tokenizer, _ = load_server_bottom(service, service.server_info(), cache_root=tmp_path)
        assert {p.dtype for p in bottom.parameters()} == {torch.float32}, "users' bottoms stay float32"
        trainer = SplitTrainer(bottom, tokenizer, service, TrainConfig(batch_size=4, learning_rate=1e-2))
        trainer.open(2)
        top = provider.sessions.get(trainer.session_id).top
        trainable = {name: p for name, p in top.named_parameters() if p.requires_grad}
        assert any(name.startswith("head.") for name in trainable) and len(trainable) > 1
        assert {p.dtype for p in top.parameters()} == {dtype}, "frozen, PEFT and head weights share the dtype"
        texts, labels = [t for t, _ in learnable_rows(4)], torch.tensor([0, 1, 0, 1])
        ids, mask = trainer.encode(texts)
        sent = trainer.to_send(trainer.bottom_outputs(ids, mask), mask, ids, labels, trainer.noise_keys(texts))
        logits = service.forward(trainer.session_id, 1, sent, mask)
        assert logits.dtype == torch.float32 and logits.device.type == "cpu" and torch.isfinite(logits).all()
        result = service.backward(trainer.session_id, 1, torch.full_like(logits, 0.1))
        assert result.applied_step == 1
        state = provider.sessions.get(trainer.session_id).trainable_state()
        assert all(t.device.type == "cpu" and t.dtype == dtype for t in state.values())
    finally:
        provider.close()


def test_bfloat16_top_learns_and_records_what_arrived(tiny_llama, tmp_path, one_thread):
    record = tmp_path / "record"
    provider = Provider.from_loaded(
        load_model(str(tiny_llama)), split=1, peft=PeftConfig(), dtype=torch.bfloat16, record_dir=record
    )
    try:
        service = LocalTopService(provider)
        bottom, tokenizer, _ = load_server_bottom(service, service.server_info(), cache_root=tmp_path / "cache")
        config = TrainConfig(epochs=EPOCHS, batch_size=BATCH, learning_rate=LR, train_bottom=True)
        trainer = SplitTrainer(bottom, tokenizer, service, config)
        rows = learnable_rows(ROWS, seed=0)
        first_bottom = next(bottom.parameters()).detach().clone()
        metrics = trainer.fit(_dataset(rows[:300]), _dataset(rows[300:]))
    finally:
        provider.close()
    assert metrics["eval_accuracy"] >= 0.75, metrics["history"]
    assert not torch.equal(first_bottom, next(bottom.parameters())), "dL/dhidden came back in float32 and trained"
    hidden, _ = read_recording(record)[0]
    assert hidden.dtype == torch.float32
    assert not torch.equal(hidden, hidden.to(torch.bfloat16).float()), "recorded as received, not as cast"


# --- two processes --------------------------------------------------------------------------------


def _two_process_run(
    tmp_path: Path, folder: Path, server_flags: list[str], client_flags: list[str]
) -> tuple[dict, str]:
    data = write_csv(tmp_path / "data.csv", learnable_rows(ROWS, seed=0))
    run = tmp_path / "run"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        SAP_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
        OMP_NUM_THREADS="1",
    )
    server = ServerProcess(
        ["--model", str(folder), "--split", "1", "--port", "0", *server_flags],
        env=env,
        cwd=tmp_path,
        command=[_script("sap-server")],
    )
    try:
        address = server.wait_listening(timeout=120)
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
                "0.25",
                *client_flags,
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert client.returncode == 0, client.stderr[-3000:]
        code = server.stop(timeout=30)
        log = server.stderr()
        assert code == 0, log[-3000:]
    finally:
        server.close()
    return json.loads((run / "metrics.json").read_text()), log


def test_bfloat16_cpu_server_trains_a_client_over_two_processes(tiny_llama, tmp_path):
    metrics, log = _two_process_run(
        tmp_path, tiny_llama, ["--device", "cpu", "--dtype", "bfloat16"], ["--device", "cpu"]
    )
    assert "top on cpu in bfloat16" in log, log[-2000:]
    assert metrics["eval_accuracy"] >= 0.75, metrics["history"]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_server_and_client_over_two_processes(dtype, tiny_llama, tmp_path):
    metrics, log = _two_process_run(
        tmp_path, tiny_llama, ["--device", "cuda", "--dtype", dtype], ["--device", "cuda", "--train-bottom"]
    )
    assert f"top on cuda in {dtype}" in log, log[-2000:]
    assert metrics["eval_accuracy"] >= 0.75, metrics["history"]
    print(f"\ncuda {dtype}: {json.dumps({k: metrics[k] for k in ('eval_accuracy', 'seconds', 'examples_per_second')})}")


# --- a top spread over several devices (--device-map balanced) -------------------------------------------

CPU, GPU0, GPU1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


def test_plan_blocks_gives_contiguous_balanced_shares():
    assert plan_blocks([10] * 6, {GPU0: 100, GPU1: 100}) == [GPU0] * 3 + [GPU1] * 3
    assert plan_blocks([10] * 5, {GPU0: 100, GPU1: 100, CPU: 100}) == [GPU0] * 2 + [GPU1] * 2 + [CPU]
    assert plan_blocks([10] * 6, {GPU0: 25, GPU1: 100}) == [GPU0] * 2 + [GPU1] * 4, "a full device hands over"
    assert plan_blocks([10] * 4, {CPU: 2**62}) == [CPU] * 4
    with pytest.raises(ValueError, match="do not fit"):
        plan_blocks([10] * 6, {GPU0: 25, GPU1: 25})


def test_parse_max_memory():
    assert parse_max_memory("cuda:0=20GiB, cuda:1=1.5GB,cpu=64GiB") == {
        GPU0: 20 * 2**30,
        GPU1: 1_500_000_000,
        CPU: 64 * 2**30,
    }
    assert parse_max_memory("cuda=1KiB") == {GPU0: 1024}
    for bad, message in (
        ("cuda:0", "DEVICE=SIZE"),
        ("gpu0=1GiB", "device"),
        ("cuda:0=1GiB,cuda:0=2GiB", "twice"),
        ("", "empty"),
        ("cpu=lots", "DEVICE=SIZE"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_max_memory(bad)


def test_max_memory_without_device_map_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        server_cli.main(["--max-memory", "cpu=1GiB"])
    assert exit_info.value.code == 2
    assert "--device-map balanced" in capsys.readouterr().err


def _spread_run(folder: Path, tmp_path: Path, max_memory: dict | None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A short training run on a frozen bottom (CPU) and a top placed by max_memory (or all on device);
    the session's trained weights."""
    provider = Provider.from_loaded(
        load_model(str(folder)), split=1, peft=PeftConfig(), device=device, max_memory=max_memory
    )
    try:
        service = LocalTopService(provider)
        bottom, tokenizer, _ = load_server_bottom(service, service.server_info(), cache_root=tmp_path / "cache")
        trainer = SplitTrainer(bottom, tokenizer, service, TrainConfig(batch_size=8, learning_rate=1e-2, seed=3))
        trainer.open(2)
        data = _dataset(learnable_rows(32, seed=5))
        trainer.train_batches(data, [list(range(i, i + 8)) for i in range(0, 32, 8)])
        session = provider.sessions.get(trainer.session_id)
        devices = [next(block.parameters()).device for block in session.top.blocks]
        assert next(session.top.head.parameters()).device == devices[-1], "the head follows the last block"
        return {"devices": devices, **session.trainable_state()}
    finally:
        provider.close()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_balanced_map_on_the_cpu_trains_as_the_plain_top(family, tiny_bert, tiny_llama, tmp_path, one_thread):
    folder = tiny_bert if family == "bert" else tiny_llama
    spread = _spread_run(folder, tmp_path / "spread", {CPU: 2**40})
    plain = _spread_run(folder, tmp_path / "plain", None)
    assert spread.pop("devices") == plain.pop("devices")
    assert spread.keys() == plain.keys() and all(torch.equal(spread[k], plain[k]) for k in plain)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_top_spread_over_a_gpu_and_the_cpu_trains_as_on_one_device(family, tiny_bert, tiny_llama, tmp_path):
    """Blocks on cuda:0 and the CPU (one GPU here; two GPUs take the same code path): the hidden states,
    masks and rotary positions cross devices inside the top, dropout is seeded on both."""
    folder = tiny_bert if family == "bert" else tiny_llama
    spread = _spread_run(folder, tmp_path / "spread", {GPU0: 2**40, CPU: 2**40})  # 2 top blocks: one each
    plain = _spread_run(folder, tmp_path / "plain", None, device="cpu")
    devices = spread.pop("devices")
    assert GPU0 in devices and CPU in devices, devices
    plain.pop("devices")
    for name, weight in plain.items():
        assert torch.allclose(spread[name].cpu(), weight, atol=1e-4, rtol=1e-3), name


def test_cli_device_map_on_the_cpu_serves_a_client(tiny_llama, tmp_path):
    metrics, log = _two_process_run(
        tmp_path, tiny_llama, ["--device-map", "balanced", "--max-memory", "cpu=4GiB"], ["--device", "cpu"]
    )
    assert "top blocks 1..2 over cpu: 2" in log, log[-2000:]
    assert metrics["eval_accuracy"] >= 0.75, metrics["history"]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cli_device_map_spreads_the_top_over_a_gpu_and_the_cpu(tiny_llama, tmp_path):
    metrics, log = _two_process_run(
        tmp_path, tiny_llama, ["--device-map", "balanced", "--max-memory", "cuda:0=1GiB,cpu=4GiB"], ["--device", "cpu"]
    )
    assert "top blocks 1..2 over cuda:0: 1, cpu: 1" in log, log[-2000:]
    assert metrics["eval_accuracy"] >= 0.75, metrics["history"]
    print(f"\ncuda:0 + cpu: {json.dumps({k: metrics[k] for k in ('eval_accuracy', 'seconds', 'examples_per_second')})}")
