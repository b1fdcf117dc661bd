"""The benchmark machinery (benchmarks/bench.py, benchmarks/slow_link.py) in a reduced form on the tiny
models: every figure is produced and sane. No wall-clock thresholds: timings here mean nothing."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import sys
import threading
from dataclasses import replace

import pytest

from conftest import REPO
from sap_client.data import TextDataset
from tiny_models import learnable_rows

sys.path.insert(0, str(REPO / "benchmarks"))
import bench  # noqa: E402
import slow_link  # noqa: E402

REDUCED = bench.Settings(
    batch_size=4,
    max_length=32,
    warmup_steps=1,
    rounds=2,
    steps_per_round=2,
    predict_warmup=1,
    predict_reps={1: 2, 32: 2},
    wire_steps=2,
    sessions=3,
    slow_steps=2,
    threads=1,
)


def _data() -> TextDataset:
    rows = learnable_rows(120, seed=7)
    return TextDataset([t for t, _ in rows], [int(label == "pos") for _, label in rows], ["neg", "pos"])


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_core(result: dict, settings: bench.Settings) -> None:
    training = result["training"]
    assert training["timed_steps"] == settings.rounds * settings.steps_per_round
    for key in (
        "throughput_ratio",
        "split_examples_per_s",
        "single_examples_per_s",
        "bytes_sent_per_example",
        "naive_bytes_per_example",
        "wire_bytes_ratio",
        "real_tokens_per_example",
        "split_cpu_seconds_per_example",
        "single_cpu_seconds_per_example",
        "cpu_ratio",
    ):
        assert _positive(training[key]), (key, training[key])
    # the chunks behind the ratio: one entry per round and side, adding up to the totals
    for side in ("split", "single"):
        per_step = training[f"{side}_seconds_per_step_by_chunk"]
        assert len(per_step) == settings.rounds and all(_positive(v) for v in per_step)
        rounding = settings.rounds * settings.steps_per_round * 5e-5  # each entry is rounded to 0.1 ms
        assert sum(per_step) * settings.steps_per_round == pytest.approx(training[f"{side}_seconds"], abs=rounding)
    # packing drops the padding (texts are far shorter than max_length) and bfloat16 halves the rest
    assert training["wire_bytes_ratio"] < 1
    assert training["naive_bytes_per_example"] == settings.max_length * (result["hidden_size"] * 4 + 8)
    wire = result["wire"]
    assert set(wire) == set(bench.WIRE_NAMES)
    assert all(0 < wire[name]["wire_bytes_ratio"] < 1 for name in wire)
    assert wire["bfloat16"]["bytes_sent_per_example"] < wire["float32"]["bytes_sent_per_example"]
    for batch in (1, 32):
        figures = result["predict"][f"batch_{batch}"]
        for key in ("split_p50_ms", "split_p95_ms", "single_p50_ms", "single_p95_ms", "p50_ratio", "p95_ratio"):
            assert _positive(figures[key]), (batch, key, figures[key])
    assert result["noise_to_signal"] == pytest.approx(settings.noise_ratio, rel=0.3), "noise is on"
    # both ways of running the split were timed, and the bench ran the faster one
    modes = result["split_seconds_per_step_by_mode"]
    assert set(modes) == set(bench.SPLIT_MODES) and all(_positive(v) for v in modes.values())
    assert result["split_mode"] == min(modes, key=modes.get)


def test_full_bench_on_tiny_bert(tiny_bert):
    settings = replace(REDUCED, memory=True, slow_link=True, second_epoch=True, mbit=200.0, rtt_ms=10.0)
    report = bench.run([(str(tiny_bert), 1)], settings, _data(), log=lambda _line: None)
    result = report["results"][0]
    _check_core(result, settings)
    assert _positive(result["training"]["second_epoch_throughput_ratio"])
    memory = result["client_memory"]
    assert _positive(memory["client_rss_mib"]) and _positive(memory["client_rss_ratio"])
    assert _positive(memory["client_peak_rss_mib"]) and _positive(memory["full_model_peak_rss_mib"])
    assert _positive(memory["client_memory_ratio"])
    sessions = result["server_sessions"]
    assert sessions["sessions"] == 3 and math.isfinite(sessions["mib_per_extra_session"])
    assert math.isfinite(sessions["mib_per_extra_session_opened"])
    assert sessions["trainable_parameters"] > 0 and _positive(sessions["expected_mib_per_session"])
    link = result["slow_link"]
    for name in bench.WIRE_NAMES:
        figures = link[name]
        assert _positive(figures["step_seconds_slow_link"]) and _positive(figures["compute_seconds"])
        assert math.isfinite(figures["transfer_seconds"]) and _positive(figures["bytes_sent_per_step"])
        assert _positive(figures["expected_transfer_seconds"])
        assert figures["transfer_seconds"] == pytest.approx(
            figures["step_seconds_slow_link"] - figures["step_seconds_loopback"]
        )
    headline = report["headline"]
    for key in ("throughput_ratio", "wire_bytes_ratio", "predict_p50_ratio"):
        assert _positive(headline[key]), (key, headline)
    json.dumps(report)  # the report is plain JSON
    assert "Mbit/s" in bench.table(result) and "examples/s" in bench.table(result)


def test_quick_bench_on_tiny_llama(tiny_llama):
    report = bench.run([(str(tiny_llama), 1)], REDUCED, _data(), log=lambda _line: None)
    result = report["results"][0]
    _check_core(result, REDUCED)
    assert "client_memory" not in result and "slow_link" not in result
    assert set(report["headline"]) >= {"throughput_ratio", "wire_bytes_ratio", "predict_p50_ratio"}


def test_parse_models():
    assert bench.parse_models("minilm-l6:2,smollm2-135m:6") == [("minilm-l6", 2), ("smollm2-135m", 6)]
    with pytest.raises(Exception, match="MODEL:SPLIT"):
        bench.parse_models("minilm-l6")


def test_percentile_interpolates():
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)


# --- the slow link --------------------------------------------------------------------------------


def test_direction_serialises_chunks_then_adds_the_delay():
    """100 Mbit/s = 12.5 MB/s; 20 ms one way. Times are synthetic (no clock involved)."""
    direction = slow_link._Direction(12.5e6, 0.020)
    assert direction.delivery_time(125_000, now=1.0) == pytest.approx(1.0 + 0.010 + 0.020)
    # a chunk arriving while the pipe is still busy waits for it
    assert direction.delivery_time(125_000, now=1.001) == pytest.approx(1.0 + 0.020 + 0.020)
    # an idle pipe starts at once
    assert direction.delivery_time(0, now=5.0) == pytest.approx(5.020)
    assert direction.bytes == 250_000


def _echo_server() -> socket.socket:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        connection, _ = listener.accept()
        with connection:
            while data := connection.recv(65536):
                connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_slow_link_carries_every_byte_in_order():
    listener = _echo_server()
    proxy = slow_link.run_in_thread(f"127.0.0.1:{listener.getsockname()[1]}", mbit=800.0, rtt_ms=2.0)
    payload = bytes(range(256)) * 2000  # 512,000 bytes
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            sender = threading.Thread(target=client.sendall, args=(payload,))
            sender.start()
            received = bytearray()
            while len(received) < len(payload):
                received += client.recv(1 << 20)
            sender.join()
    finally:
        proxy.close()
        listener.close()
    assert bytes(received) == payload
    assert proxy.link.uplink_bytes == proxy.link.downlink_bytes == len(payload)


def test_slow_link_refuses_bad_settings():
    with pytest.raises(ValueError):
        slow_link.SlowLink("127.0.0.1", 1, mbit=0)
    assert slow_link.parse_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert asyncio.iscoroutinefunction(slow_link.SlowLink.start)
