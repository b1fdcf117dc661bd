"""Overlap: with a frozen bottom the client prepares batch i+1 in a background thread while batch i is on
the server. It must not change results, must surface a failing worker, and must not leak its thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from conftest import running_server
from sap_client.bottom import load_server_bottom
from sap_client.data import TextDataset
from sap_client.privacy import Privatizer
from sap_client.remote import RemoteTopService
from sap_client.trainer import Prefetcher, SplitTrainer, TrainConfig
from sap_common.dchi import eta_for_noise_ratio
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_server.provider import Provider
from tiny_models import learnable_rows

BATCH = 4
ROWS = 24  # 6 steps per epoch
KEY = b"prefetch-test-noise-key"

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n: int = ROWS) -> TextDataset:
    rows = learnable_rows(n, seed=5)
    return TextDataset([t for t, _ in rows], [int(label == "pos") for _, label in rows], ["neg", "pos"])


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sap-prefetch"]


@pytest.fixture(scope="module")
def served(tiny_llama) -> Iterator[tuple[Provider, str]]:
    provider = Provider.from_loaded(load_model(str(tiny_llama)), split=1, peft=PeftConfig())
    with running_server(provider) as address:
        yield provider, address
    provider.close()


@contextmanager
def _trainer(served, tmp_path, *, prefetch: bool, train_bottom: bool = False) -> Iterator[SplitTrainer]:
    """A SplitTrainer with noise on (noise/signal 0.5), over a fresh session of the loopback server."""
    _, address = served
    with RemoteTopService(address) as service:
        bottom, tokenizer, _ = load_server_bottom(service, service.server_info(), cache_root=tmp_path / "bottoms")
        config = TrainConfig(batch_size=BATCH, learning_rate=1e-2, seed=0, train_bottom=train_bottom, prefetch=prefetch)
        trainer = SplitTrainer(bottom, tokenizer, service, config)
        eta = eta_for_noise_ratio(0.5, trainer.mean_hidden_norm(_dataset().texts), bottom.config.hidden_size)
        trainer.privatizer = Privatizer(eta, key=KEY)
        trainer.open(2)
        try:
            yield trainer
        finally:
            service.close_session(trainer.session_id)


def _session_weights(provider: Provider, session_id: str) -> dict[str, torch.Tensor]:
    return provider.sessions.get(session_id).trainable_state()


def _train(served, tmp_path, *, prefetch: bool) -> tuple[list[float], dict[str, torch.Tensor], set[str], float]:
    """Two epochs (the second re-sends the cached noisy tensors): losses, final top weights, the threads
    that prepared batches, and the measured noise/signal."""
    provider, _ = served
    data = _dataset()
    with _trainer(served, tmp_path, prefetch=prefetch) as trainer:
        threads: set[str] = set()
        send = trainer.to_send

        def recording(*args, **kwargs):
            threads.add(threading.current_thread().name)
            return send(*args, **kwargs)

        trainer.to_send = recording  # the send function: called where each batch is prepared
        generator = torch.Generator().manual_seed(0)
        losses = [trainer.train_epoch(data, generator, epoch=epoch) for epoch in (1, 2)]
        weights = _session_weights(provider, trainer.session_id)
        assert trainer.steps == 2 * ROWS // BATCH
        return losses, weights, threads, trainer.privatizer.noise_to_signal


def test_prefetch_gives_identical_losses_and_weights(served, tmp_path):
    on_losses, on_weights, on_threads, on_noise = _train(served, tmp_path, prefetch=True)
    off_losses, off_weights, off_threads, off_noise = _train(served, tmp_path, prefetch=False)
    assert on_threads == {"sap-prefetch"}, "with prefetch every batch is prepared in the worker"
    assert off_threads == {"MainThread"}
    assert on_noise == pytest.approx(0.5, rel=0.2) and on_noise == off_noise, "noise is on, and the same"
    assert on_losses == off_losses  # exactly: same batches, same keyed noise, same order of steps
    assert on_weights.keys() == off_weights.keys()
    for name, tensor in on_weights.items():
        assert torch.equal(tensor, off_weights[name]), f"{name} differs with prefetch"
    assert not _prefetch_threads(), "the prefetch thread outlived the epoch"


def test_prefetch_is_off_for_a_trainable_bottom(served, tmp_path):
    with _trainer(served, tmp_path, prefetch=True, train_bottom=True) as trainer:
        assert not trainer.prefetch  # the bottom changes every step: batch i+1 needs step i's update
    with _trainer(served, tmp_path, prefetch=True) as trainer:
        assert trainer.prefetch


class _FailingPrivatizer:
    """Wraps a Privatizer and raises on its `fail_on`-th call (1-based)."""

    def __init__(self, inner: Privatizer, fail_on: int):
        self.inner, self.fail_on, self.calls = inner, fail_on, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise ValueError(f"privatizer failed on batch {self.calls}")
        return self.inner(*args, **kwargs)


def test_a_failing_worker_raises_in_the_training_loop(served, tmp_path):
    with _trainer(served, tmp_path, prefetch=True) as trainer:
        trainer.privatizer = _FailingPrivatizer(trainer.privatizer, fail_on=3)
        with pytest.raises(ValueError, match="failed on batch 3"):
            trainer.train_epoch(_dataset(), torch.Generator().manual_seed(0))
        assert trainer.steps == 2, "the batches prepared before the failure were trained, in order"
        assert not _prefetch_threads()


def test_a_failing_rpc_stops_the_worker(served, tmp_path):
    with _trainer(served, tmp_path, prefetch=True) as trainer:
        forward = trainer.service.forward
        calls = []

        def failing_forward(*args, **options):
            calls.append(1)
            if len(calls) == 2:
                raise ConnectionError("link dropped")
            return forward(*args, **options)

        trainer.service.forward = failing_forward
        with pytest.raises(ConnectionError, match="link dropped"):
            trainer.train_epoch(_dataset(), torch.Generator().manual_seed(0))
        trainer.service.forward = forward
        assert trainer.steps == 1
        assert not _prefetch_threads(), "the worker must be stopped and joined when the loop fails"


# --- the Prefetcher on its own ---------------------------------------------------------------------


def test_prefetcher_keeps_order_and_stays_within_its_depth():
    consumed = []
    ahead = []

    def work(item: int) -> int:
        ahead.append(item - len(consumed))  # how far the worker is ahead of the consumer
        return item * item

    with Prefetcher(work, range(20), depth=1) as prefetched:
        for value in prefetched:
            consumed.append(value)
    assert consumed == [i * i for i in range(20)]
    assert max(ahead) <= 2  # one waiting in the queue, one in the worker's hands
    assert not _prefetch_threads()


def test_prefetcher_stops_when_the_consumer_leaves_early():
    with Prefetcher(lambda item: item, range(1000), depth=2) as prefetched:
        for value in prefetched:
            if value == 3:
                break
    assert not _prefetch_threads()
