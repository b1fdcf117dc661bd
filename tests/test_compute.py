"""The server's compute thread (sap_server/compute.py): order, errors, nesting, and that a real server's
steps run on it rather than on the gRPC workers."""

from __future__ import annotations

import threading

import pytest

from conftest import running_server
from sap_client.bottom import load_server_bottom
from sap_client.data import TextDataset
from sap_client.remote import RemoteTopService
from sap_client.trainer import SplitTrainer, TrainConfig
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_server.compute import ComputeThread, compute_thread
from sap_server.provider import Provider
from sap_server.session import Session
from tiny_models import learnable_rows


def test_runs_in_order_on_one_thread_and_reraises():
    compute = ComputeThread(name="test-compute")
    try:
        seen: list[tuple[int, str]] = []
        callers = [
            threading.Thread(target=lambda i=i: compute.run(lambda: seen.append((i, threading.current_thread().name))))
            for i in range(16)
        ]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        assert sorted(i for i, _ in seen) == list(range(16))
        assert {name for _, name in seen} == {"test-compute"}
        assert compute.run(lambda a, b=0: a + b, 2, b=3) == 5
        with pytest.raises(ZeroDivisionError):
            compute.run(lambda: 1 / 0)
        assert compute.run(lambda: compute.run(lambda: "inline")) == "inline"  # a job may run another
    finally:
        compute.close()
    with pytest.raises(RuntimeError, match="closed"):
        compute.run(lambda: None)


def test_one_compute_thread_per_process():
    assert compute_thread() is compute_thread()


def test_server_steps_run_on_the_compute_thread(tiny_bert, monkeypatch):
    """Forward, Backward and Evaluate of a real loopback server run on the process's compute thread."""
    threads: dict[str, set[str]] = {"forward": set(), "backward": set(), "evaluate": set()}
    for name in threads:
        original = getattr(Session, name)

        def recording(self, *args, _name=name, _original=original, **kwargs):
            threads[_name].add(threading.current_thread().name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Session, name, recording)
    provider = Provider.from_loaded(load_model(str(tiny_bert)), split=1, peft=PeftConfig())
    rows = learnable_rows(16, seed=3)
    data = TextDataset([t for t, _ in rows], [int(label == "pos") for _, label in rows], ["neg", "pos"])
    try:
        with running_server(provider) as address:
            service = RemoteTopService(address)
            try:
                bottom, tokenizer, _ = load_server_bottom(service, service.server_info())
                trainer = SplitTrainer(bottom, tokenizer, service, TrainConfig(batch_size=4, max_length=16))
                trainer.open(2)
                trainer.train_batches(data, [[0, 1, 2, 3], [4, 5, 6, 7]])
                trainer.predict(data.texts[:4])
            finally:
                service.close()
    finally:
        provider.close()
    name = compute_thread()._thread.name
    assert threads == {"forward": {name}, "backward": {name}, "evaluate": {name}}
