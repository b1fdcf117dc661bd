"""What the provider really receives: a real gRPC server whose Session records every decoded tensor."""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from conftest import running_server
from sap_client.bottom import load_server_bottom
from sap_client.commands import predict, train
from sap_client.privacy import NoiseConfig, Privatizer
from sap_client.remote import RemoteTopService
from sap_client.trainer import SplitTrainer, TrainConfig
from sap_common.dchi import eta_for_noise_ratio
from sap_common.models.bundle import load_bottom
from sap_common.models.registry import load_model
from sap_common.packing import unpack_hidden
from sap_common.peft import PeftConfig
from sap_server.provider import Provider
from sap_server.session import Session
from tiny_models import learnable_rows, write_csv

BATCH = 16


@pytest.fixture
def received(monkeypatch) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every batch that Session.forward / .evaluate got, as decoded from the wire (packed real rows + lengths),
    unpacked to (hidden (B, T, H) with zero padding, attention_mask (B, T))."""
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"forward": [], "evaluate": []}
    original_forward, original_evaluate = Session.forward, Session.evaluate

    def forward(self, step, packed, lengths, output=None):
        calls["forward"].append(unpack_hidden(packed.detach().clone(), list(lengths)))
        return original_forward(self, step, packed, lengths, output)

    def evaluate(self, packed, lengths, output=None):
        calls["evaluate"].append(unpack_hidden(packed.detach().clone(), list(lengths)))
        return original_evaluate(self, packed, lengths, output)

    monkeypatch.setattr(Session, "forward", forward)
    monkeypatch.setattr(Session, "evaluate", evaluate)
    return calls


@contextmanager
def recording_server(folder, split: int):
    """(provider, address): the provider's bundle is what the client downloads."""
    provider = Provider.from_loaded(load_model(str(folder)), split=split, peft=PeftConfig())
    try:
        with running_server(provider) as address:
            yield provider, address
    finally:
        provider.close()


def clean_batches(provider: Provider, texts: list[str], batch_size: int = BATCH):
    """The bottom's noise-free output for texts, batched as the trainer batches them: [(hidden, mask, ids)]."""
    bottom, tokenizer, _ = load_bottom(provider.bundle_dir)
    tokenizer.padding_side = "right"
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        with torch.no_grad():
            hidden = bottom(batch["input_ids"], batch["attention_mask"])  # (B, T, H)
        out.append((hidden, batch["attention_mask"], batch["input_ids"]))
    return out


def real_rows(records) -> torch.Tensor:
    """All non-padding vectors of a list of (hidden, mask), stacked: (N, H)."""
    return torch.cat([hidden[mask.bool()] for hidden, mask, *_ in records])


def run_train(address, tmp_path, rows, eval_rows, config: TrainConfig, noise: NoiseConfig) -> dict:
    data = write_csv(tmp_path / "train.csv", rows)
    held = write_csv(tmp_path / "eval.csv", eval_rows)
    return train(
        data,
        server=address,
        out=tmp_path / "run",
        config=config,
        noise=noise,
        text_column="text",
        label_column="label",
        eval_path=held,
        eval_fraction=0.1,
        max_examples=None,
    )


# --- noise at k = 1: nothing received equals a clean bottom output ----------------------------------


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_noisy_training_sends_no_clean_vector_and_zero_padding(family, tiny_llama, tiny_bert, received, tmp_path):
    folder = tiny_llama if family == "llama" else tiny_bert
    rows, eval_rows = learnable_rows(48, seed=1), learnable_rows(20, seed=2)
    texts, eval_texts = [t for t, _ in rows], [t for t, _ in eval_rows]
    with recording_server(folder, split=1) as (provider, address):
        train_clean = clean_batches(provider, texts)
        eval_clean = clean_batches(provider, eval_texts)
        hidden_size = provider.info.hidden_size
        norm = real_rows(train_clean).norm(dim=-1).mean().item()
        eta = eta_for_noise_ratio(1.0, norm, hidden_size)
        metrics = run_train(
            address, tmp_path, rows, eval_rows, TrainConfig(epochs=2, batch_size=BATCH), NoiseConfig(eta=eta)
        )
    assert metrics["eta"] == eta
    assert metrics["noise_to_signal"] == pytest.approx(1.0, rel=0.15)
    assert len(received["forward"]) == 2 * math.ceil(len(rows) / BATCH)
    assert len(received["evaluate"]) == 2 * math.ceil(len(eval_rows) / BATCH)

    records = received["forward"] + received["evaluate"]
    for hidden, mask in records:
        assert hidden.shape[-1] == hidden_size and hidden.dtype == torch.float32
        assert (hidden[mask == 0] == 0).all(), "padding must arrive as exact zeros"
    assert any((mask == 0).any() for _, mask in records), "the data should exercise padding"

    # No received real-token vector is (within 1e-6) any clean vector of the whole data set.
    sent = real_rows(records)  # (N, H)
    clean = torch.cat([real_rows(train_clean), real_rows(eval_clean)])  # (M, H)
    nearest = torch.cdist(sent.double(), clean.double()).min(dim=1).values
    assert nearest.min().item() > 1e-6
    # Most are far from every clean vector: the noise norm d/eta is the clean mean norm here.
    assert nearest.median().item() > 0.3 * hidden_size / eta

    # Evaluate calls come in order, so each received vector pairs with its clean vector at the same position.
    epoch_calls = len(eval_clean)
    for epoch in range(2):
        got = received["evaluate"][epoch * epoch_calls : (epoch + 1) * epoch_calls]
        distances = []
        for (hidden, mask), (clean_hidden, clean_mask, _) in zip(got, eval_clean):
            assert torch.equal(mask.long(), clean_mask.long())
            real = clean_mask.bool()
            distances.append((hidden[real] - clean_hidden[real]).norm(dim=-1))
        distances = torch.cat(distances)
        assert distances.min().item() > 1e-6
        assert distances.mean().item() == pytest.approx(hidden_size / eta, rel=0.1)  # E||n|| = d / eta


def test_without_noise_the_recording_sees_the_clean_vectors(tiny_llama, received, tmp_path):
    """Control for the harness above: with eta none, the same comparison finds every clean vector."""
    rows, eval_rows = learnable_rows(24, seed=1), learnable_rows(20, seed=2)
    with recording_server(tiny_llama, split=1) as (provider, address):
        eval_clean = clean_batches(provider, [t for t, _ in eval_rows])
        metrics = run_train(address, tmp_path, rows, eval_rows, TrainConfig(epochs=1, batch_size=BATCH), NoiseConfig())
    assert metrics["eta"] is None and metrics["noise_to_signal"] == 0.0
    for (hidden, mask), (clean_hidden, clean_mask, _) in zip(received["evaluate"], eval_clean):
        real = clean_mask.bool()
        assert torch.allclose(hidden[real], clean_hidden[real], atol=1e-6)
        assert (hidden[~real] == 0).all()  # padding is zeroed even without noise


# --- k = 0: nearest-embedding inversion gets harder as eta falls -----------------------------------


def test_embedding_inversion_rate_falls_with_eta(tiny_llama, received):
    """At k = 0 on the tiny llama, the bottom output is exactly the embedding row of each token."""
    texts = [t for t, _ in learnable_rows(64, seed=3)]
    with recording_server(tiny_llama, split=0) as (_, address), RemoteTopService(address) as service:
        bottom, tokenizer, _ = load_server_bottom(service, service.server_info())
        embeddings = bottom.input_embedding_matrix().detach()  # (V, H)
        trainer = SplitTrainer(bottom, tokenizer, service, TrainConfig(batch_size=BATCH))
        trainer.open(num_labels=2)
        norm = trainer.mean_hidden_norm(texts)
        token_ids = [
            ids[mask.bool()]
            for ids, mask in (trainer.encode(texts[s : s + BATCH]) for s in range(0, len(texts), BATCH))
        ]
        truth = torch.cat(token_ids)
        rates = {}
        for ratio in (None, 1.0, 2.5, 10.0):
            eta = None if ratio is None else eta_for_noise_ratio(ratio, norm, bottom.config.hidden_size)
            trainer.privatizer = Privatizer(eta, key=b"fixed test key")
            received["evaluate"].clear()
            trainer.predict(texts)
            sent = real_rows(received["evaluate"])  # (N, H), in the order of texts
            assert sent.shape[0] == truth.shape[0]
            if ratio is None:
                assert torch.equal(sent, embeddings[truth])
            guess = torch.cdist(sent, embeddings).argmin(dim=1)
            rates[ratio] = (guess == truth).float().mean().item()
    assert rates[None] >= 0.99, rates  # noise off: the inversion is exact
    assert rates[1.0] >= 0.8, rates  # noise as large as the signal barely hides a token in 32 dims
    assert 0.15 <= rates[2.5] <= 0.7, rates
    assert rates[10.0] <= 0.15, rates  # chance is 1/88
    assert rates[None] > rates[1.0] > rates[2.5] > rates[10.0], rates


# --- frozen bottom: one noisy observation per example, unless --fresh-noise -------------------------


def _examples_by_epoch(forwards, per_epoch: int, epochs: int) -> list[Counter]:
    """Per epoch, a multiset of each received example's real-token rows (as exact bytes)."""
    assert len(forwards) == per_epoch * epochs
    out = []
    for epoch in range(epochs):
        seen: Counter = Counter()
        for hidden, mask in forwards[epoch * per_epoch : (epoch + 1) * per_epoch]:
            for b in range(hidden.shape[0]):
                rows = hidden[b][mask[b].bool()]  # (len, H)
                seen[(tuple(rows.shape), rows.numpy().tobytes())] += 1
        out.append(seen)
    return out


@pytest.mark.parametrize("fresh", [False, True])
def test_frozen_bottom_resends_identical_noise_unless_fresh(fresh, tiny_llama, received, tmp_path):
    rows, eval_rows, epochs = learnable_rows(40, seed=4), learnable_rows(8, seed=5), 3
    with recording_server(tiny_llama, split=1) as (_, address):
        metrics = run_train(
            address,
            tmp_path,
            rows,
            eval_rows,
            TrainConfig(epochs=epochs, batch_size=BATCH),
            NoiseConfig(eta=300.0, fresh_noise=fresh),
        )
    per_epoch = math.ceil(len(rows) / BATCH)  # 3 steps: 16, 16, 8
    assert metrics["steps"] == per_epoch * epochs
    by_epoch = _examples_by_epoch(received["forward"], per_epoch, epochs)
    for seen in by_epoch:
        assert sum(seen.values()) == len(rows)
        assert len(seen) == len(rows), "two examples were sent with identical rows"
    lengths = [sorted(shape for (shape, _), n in seen.items() for _ in range(n)) for seen in by_epoch]
    assert lengths[0] == lengths[1] == lengths[2]  # the same examples every epoch
    for hidden, mask in received["forward"]:
        assert (hidden[mask == 0] == 0).all()
    # How many of epoch a's examples arrive again, bit-exact, in epoch b.
    resent = {(a, b): len(set(by_epoch[a]) & set(by_epoch[b])) for a, b in ((0, 1), (0, 2), (1, 2))}
    if fresh:
        assert resent == {pair: 0 for pair in resent}, resent
        assert metrics["noise_observations"] == "fresh noise every epoch"
    else:
        assert resent == {pair: len(rows) for pair in resent}, resent
        assert by_epoch[0] == by_epoch[1] == by_epoch[2]  # bit-exact re-sends, every example once per epoch
        assert metrics["noise_observations"] == "one per example"


# --- --rescale-noised: what arrives is h + n rescaled to the run's norm; CTI-exempt vectors clean --------


def test_rescaled_noise_arrives_at_the_run_norm_in_training_and_prediction(tiny_bert, received, tmp_path):
    rows, eval_rows = learnable_rows(48, seed=1), learnable_rows(20, seed=2)
    texts, eval_texts = [t for t, _ in rows], [t for t, _ in eval_rows]
    noise = NoiseConfig(noise_ratio=2.0, cti=True, cti_mode="exempt", cti_top=0.2, rescale_noised=True)
    with recording_server(tiny_bert, split=1) as (provider, address):
        clean = torch.cat([real_rows(clean_batches(provider, some)) for some in (texts, eval_texts)])  # (M, H)
        train_norm = real_rows(clean_batches(provider, texts)).norm(dim=-1).mean().item()
        metrics = run_train(address, tmp_path, rows, eval_rows, TrainConfig(epochs=1, batch_size=BATCH), noise)
        settings = json.loads((tmp_path / "run" / "run.json").read_text())
        training = list(received["forward"] + received["evaluate"])
        received["evaluate"].clear()
        predict(
            tmp_path / "eval.csv",
            run_path=tmp_path / "run",
            server=address,
            out=tmp_path / "preds.csv",
            text_column=None,
        )
        predicting = list(received["evaluate"])
    # the norm is the training data's mean hidden-state norm, kept in run.json for predict and audit
    assert settings["rescale_norm"] == pytest.approx(train_norm, rel=1e-5)
    assert metrics["rescale_norm"] == settings["rescale_norm"] and settings["noise"]["rescale_noised"]
    # the d_chi noise's own figure, before rescaling (exempt tokens count with no noise, so below R = 2)
    assert 0.5 < metrics["noise_to_signal"] < 2.0 * 1.15
    assert predicting, "predict sent nothing"
    for records in (training, predicting):
        sent = real_rows(records)  # (N, H)
        is_clean = torch.cdist(sent.double(), clean.double()).min(dim=1).values < 1e-4
        assert is_clean.any() and (~is_clean).any(), "the data should exercise both exempt and noised tokens"
        norms = sent[~is_clean].norm(dim=-1)
        assert torch.allclose(norms, torch.full_like(norms, settings["rescale_norm"]), rtol=1e-4)
        for hidden, mask in records:
            assert (hidden[mask == 0] == 0).all()
    # without rescaling, the noised vectors are about sqrt(1 + R^2) times longer: rescaling changed them
    assert settings["rescale_norm"] < 0.6 * math.sqrt(1 + 2.0**2) * train_norm
