"""Unit tests of the privacy-audit attacks (embedding inversion, attribute inference) on tiny models (no gRPC)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from sap_client.audit import (
    attribute_inference,
    average_observations,
    bottom_from_embeddings,
    mean_pool,
    nearest_neighbour_inversion,
    optimization_inversion,
    position_aware_inversion,
    token_recovery,
)
from sap_common.dchi import eta_for_noise_ratio, sample_dchi_noise
from sap_common.models.registry import load_model
from sap_common.models.split import BottomModel, split_base
from tiny_models import SPECIALS, WORDS, learnable_rows

VOCAB = len(SPECIALS) + len(WORDS)  # chance of a blind guess: 1 / VOCAB, about 0.011


pytestmark = pytest.mark.usefixtures("one_thread")


def _bottom_and_batch(
    folder: Path, k: int, texts: list[str]
) -> tuple[BottomModel, torch.Tensor, torch.Tensor, list[int]]:
    """The tiny model's bottom at split k and the right-padded batch (ids, mask) of texts."""
    loaded = load_model(str(folder))
    loaded.tokenizer.padding_side = "right"
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    bottom, _ = split_base(loaded.base, k)
    bottom.eval()
    return bottom, batch["input_ids"], batch["attention_mask"], list(loaded.tokenizer.all_special_ids)


def _texts(n: int, seed: int = 1) -> list[str]:
    return [text for text, _ in learnable_rows(n, seed=seed)]


def _observe(
    bottom: BottomModel, ids: torch.Tensor, mask: torch.Tensor, noise_ratio: float | None = None, seed: int = 0
) -> torch.Tensor:
    """What the provider receives: bottom output, plus d_chi noise with E||n|| = ratio * mean||h||."""
    with torch.no_grad():
        hidden = bottom(ids, mask)  # (B, T, H)
    if noise_ratio is None:
        return hidden
    mean_norm = hidden[mask.bool()].norm(dim=-1).mean().item()
    eta = eta_for_noise_ratio(noise_ratio, mean_norm, hidden.shape[-1])
    return hidden + sample_dchi_noise(tuple(hidden.shape), eta, generator=torch.Generator().manual_seed(seed))


# --- embedding inversion ------------------------------------------------------------------------------


def test_nearest_neighbour_recovers_every_token_at_k0_without_noise(tiny_llama):
    bottom, ids, mask, specials = _bottom_and_batch(tiny_llama, 0, _texts(8))
    assert (mask == 0).any(), "the batch should be padded"
    guesses = nearest_neighbour_inversion(_observe(bottom, ids, mask), bottom.input_embedding_matrix())
    result = token_recovery(guesses, ids, mask, specials)
    assert guesses.shape == ids.shape
    assert result["recovery"] >= 0.99 and result["recovery_without_special"] >= 0.99
    assert result["tokens"] == int(mask.sum()) > result["tokens_without_special"]


def test_nearest_neighbour_fails_under_heavy_noise(tiny_llama):
    bottom, ids, mask, _ = _bottom_and_batch(tiny_llama, 0, _texts(8))
    observed = _observe(bottom, ids, mask, noise_ratio=10.0)
    result = token_recovery(nearest_neighbour_inversion(observed, bottom.input_embedding_matrix()), ids, mask)
    assert result["recovery"] < 0.3


def test_position_aware_inversion_is_exact_at_k0_for_every_family(tiny_model):
    """BERT's k = 0 output is LayerNorm(word + position + type): plain nearest neighbour over the word table
    would miss; the position-aware candidates recover every token."""
    bottom, ids, mask, specials = _bottom_and_batch(tiny_model, 0, _texts(8))
    guesses = position_aware_inversion(_observe(bottom, ids, mask), mask, bottom)
    result = token_recovery(guesses, ids, mask, specials)
    assert result["recovery"] >= 0.99 and result["recovery_without_special"] >= 0.99
    noisy = token_recovery(
        position_aware_inversion(_observe(bottom, ids, mask, noise_ratio=10.0), mask, bottom), ids, mask
    )
    assert noisy["recovery"] < 0.3


def test_position_aware_inversion_needs_k0(tiny_bert):
    bottom, ids, mask, _ = _bottom_and_batch(tiny_bert, 1, _texts(2))
    with pytest.raises(ValueError, match="k = 0"):
        position_aware_inversion(_observe(bottom, ids, mask), mask, bottom)


def test_nearest_neighbour_chunks_agree_with_cdist():
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(37, 16, generator=generator)  # (V, H)
    observed = torch.randn(3, 11, 16, generator=generator)  # (B, T, H)
    expected = torch.cdist(observed.reshape(-1, 16), table).argmin(-1).reshape(3, 11)
    assert torch.equal(nearest_neighbour_inversion(observed, table, chunk_size=5), expected)
    assert torch.equal(nearest_neighbour_inversion(observed, table), expected)


def test_bottom_from_embeddings_matches_the_bottom_on_ids(tiny_model):
    bottom, ids, mask, _ = _bottom_and_batch(tiny_model, 2, _texts(4))
    table = bottom.input_embedding_matrix()
    with torch.no_grad():
        from_ids = bottom(ids, mask)
        from_embeddings = bottom_from_embeddings(bottom, table[ids], mask)
    real = mask.bool()
    torch.testing.assert_close(from_embeddings[real], from_ids[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_optimization_inversion_recovers_tokens_at_k1(tiny_model, distance):
    bottom, ids, mask, _ = _bottom_and_batch(tiny_model, 1, _texts(4))
    bottom.train()  # the attack must switch to eval itself and switch back
    bottom.requires_grad_(True)  # ... and freeze the weights only while it runs
    before = {name: p.detach().clone() for name, p in bottom.named_parameters()}
    guesses = optimization_inversion(
        _observe(bottom, ids, mask), mask, bottom, steps=100, distance=distance, batch_size=3
    )
    assert guesses.shape == ids.shape and guesses.dtype == torch.long
    assert token_recovery(guesses, ids, mask)["recovery"] >= 0.5  # chance is about 0.011
    assert bottom.training
    for name, p in bottom.named_parameters():
        assert p.requires_grad, name
        assert torch.equal(p.detach(), before[name]), name


def test_optimization_inversion_fails_under_heavy_noise(tiny_llama):
    bottom, ids, mask, _ = _bottom_and_batch(tiny_llama, 1, _texts(4))
    observed = _observe(bottom, ids, mask, noise_ratio=10.0)
    guesses = optimization_inversion(observed, mask, bottom, steps=100)
    assert token_recovery(guesses, ids, mask)["recovery"] < 0.3


def test_optimization_inversion_is_seeded(tiny_llama):
    bottom, ids, mask, _ = _bottom_and_batch(tiny_llama, 1, _texts(2))
    observed = _observe(bottom, ids, mask)
    first = optimization_inversion(observed, mask, bottom, steps=5, seed=7)
    assert torch.equal(first, optimization_inversion(observed, mask, bottom, steps=5, seed=7))


def test_token_recovery_counts_real_tokens_with_and_without_specials():
    actual = torch.tensor([[2, 10, 11, 3], [2, 12, 0, 0]])
    predicted = torch.tensor([[2, 10, 99, 3], [5, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # Real tokens: 6, guessed: 2, 10, 3, 12 -> 4/6. Without specials {2, 3}: 10, 11, 12 -> 2/3.
    result = token_recovery(predicted, actual, mask, special_ids={2, 3})
    assert result == {"recovery": 4 / 6, "recovery_without_special": 2 / 3, "tokens": 6, "tokens_without_special": 3}
    assert token_recovery(predicted, actual, mask)["recovery_without_special"] == 4 / 6


def test_averaging_observations_shrinks_noise_like_one_over_sqrt_n():
    generator = torch.Generator().manual_seed(0)
    signal = torch.randn(2000, 32, generator=generator)
    single = sample_dchi_noise((2000, 32), 4.0, generator=generator).pow(2).sum(-1).mean().sqrt()
    for n in (4, 16):
        copies = [signal + sample_dchi_noise((2000, 32), 4.0, generator=generator) for _ in range(n)]
        residual = (average_observations(copies) - signal).pow(2).sum(-1).mean().sqrt()
        assert residual / single == pytest.approx(n**-0.5, rel=0.05)


# --- attribute inference ------------------------------------------------------------------------------


def _pooled_features(folder: Path, rows: list[tuple[str, str]]) -> torch.Tensor:
    bottom, ids, mask, _ = _bottom_and_batch(folder, 1, [text for text, _ in rows])
    return mean_pool(_observe(bottom, ids, mask), mask)  # (N, H)


def test_attribute_inference_reads_an_attribute_written_in_the_text(tiny_model):
    rows = learnable_rows(800, seed=3)
    features = _pooled_features(tiny_model, rows)
    labels = torch.tensor([int(label == "pos") for _, label in rows])
    result = attribute_inference(features[:400], labels[:400], features[400:], labels[400:])
    assert result["accuracy"] >= result["baseline"] + 0.3
    assert result["privacy"] == pytest.approx(1 - result["accuracy"])
    assert result["victims"] == 400


def test_attribute_inference_finds_nothing_in_a_random_attribute(tiny_model):
    rows = learnable_rows(800, seed=3)
    features = _pooled_features(tiny_model, rows)
    labels = torch.tensor(random.Random(5).choices([0, 1], k=len(rows)))  # unrelated to the text
    result = attribute_inference(features[:400], labels[:400], features[400:], labels[400:])
    assert result["accuracy"] <= result["baseline"] + 0.1


def test_attribute_baseline_is_the_auxiliary_majority_class():
    features = torch.zeros(6, 2)
    aux_labels = torch.tensor([7, 7, 9])  # majority 7
    victim_labels = torch.tensor([9, 9, 7])  # victim majority would be 9
    result = attribute_inference(features[:3], aux_labels, features[3:], victim_labels, epochs=1)
    assert result["baseline"] == pytest.approx(1 / 3)


def test_mean_pool_averages_real_tokens_only():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


# --- validation ---------------------------------------------------------------------------------------

_E = torch.zeros(5, 4)
_H = torch.zeros(2, 3, 4)
_M = torch.ones(2, 3)
_F = torch.zeros(4, 4)
_Y = torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: nearest_neighbour_inversion(torch.zeros(3, 5), _E), "H = 4"),
        (lambda: nearest_neighbour_inversion(_H, torch.zeros(5)), "embedding"),
        (lambda: nearest_neighbour_inversion(_H, _E, chunk_size=0), "chunk_size"),
        (lambda: token_recovery(torch.zeros(2), torch.zeros(3), torch.ones(3)), "same shape"),
        (lambda: token_recovery(torch.zeros(3), torch.zeros(3), torch.zeros(3)), "no real tokens"),
        (lambda: average_observations([]), "at least one"),
        (lambda: average_observations([torch.zeros(2), torch.zeros(3)]), "same shape"),
        (lambda: mean_pool(torch.zeros(2, 4), _M), "hidden"),
        (lambda: mean_pool(_H, torch.ones(2, 4)), "attention_mask"),
        (lambda: attribute_inference(_F, _Y[:3], _F, _Y), "aux_labels"),
        (lambda: attribute_inference(_F, _Y, torch.zeros(4, 3), _Y), "width"),
        (lambda: attribute_inference(_F, _Y.float(), _F, _Y), "integer"),
        (lambda: attribute_inference(_F, _Y, _F, _Y, hidden=0), "hidden"),
        (lambda: attribute_inference(_F, _Y, _F, _Y, epochs=0), "epochs"),
        (lambda: attribute_inference(_F, _Y, _F, _Y, lr=-1.0), "lr"),
        (lambda: attribute_inference(_F, _Y, _F, _Y, weight_decay=float("nan")), "weight_decay"),
        (lambda: attribute_inference(_F, _Y, _F, _Y, batch_size=0), "batch_size"),
    ],
)
def test_attacks_reject_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"temperature": float("inf")}, "temperature"),
        ({"distance": "manhattan"}, "distance"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_optimization_inversion_rejects_bad_settings(tiny_llama, kwargs, message):
    bottom, ids, mask, _ = _bottom_and_batch(tiny_llama, 1, _texts(2))
    observed = _observe(bottom, ids, mask)
    with pytest.raises(ValueError, match=message):
        optimization_inversion(observed, mask, bottom, **kwargs)


def test_optimization_inversion_rejects_mismatched_shapes(tiny_llama):
    bottom, ids, mask, _ = _bottom_and_batch(tiny_llama, 1, _texts(2))
    observed = _observe(bottom, ids, mask)
    with pytest.raises(ValueError, match="must be \\(B, T, H\\)"):
        optimization_inversion(observed[0], mask, bottom)
    with pytest.raises(ValueError, match="attention_mask"):
        optimization_inversion(observed, mask[:, :-1], bottom)
    with pytest.raises(ValueError, match="hidden_size"):
        optimization_inversion(observed[..., :-1], mask, bottom)


def test_undoing_the_rescaling_gives_nearest_neighbour_back_its_strength():
    """--rescale-noised shortens the noisy vectors to the clean mean norm; an L2 nearest-neighbour attack fed
    them as they are understates the leak, and the audit's undo_rescaling (the attacker's first move) restores
    it to what the same attack gets on h + n."""
    from sap_client.audit.runner import undo_rescaling
    from sap_client.privacy import Privatizer

    g = torch.Generator().manual_seed(0)
    vocab, width, length = 300, 64, 400
    table = torch.randn(vocab, width, generator=g) * (0.5 + torch.rand(vocab, 1, generator=g))  # norms vary
    ids = torch.randint(0, vocab, (1, length), generator=g)
    hidden, mask = table[ids], torch.ones(1, length, dtype=torch.long)  # a k = 0 decoder sends embedding rows
    norm = hidden.norm(dim=-1).mean().item()
    eta = eta_for_noise_ratio(2.0, norm, width)  # measured: 25% recovered as sent, 71% undone and unscaled
    plain = Privatizer(eta, key=b"k")(hidden, mask, ids, None, [b"text"])
    privatizer = Privatizer(eta, key=b"k", rescale_norm=norm)
    rescaled = privatizer(hidden, mask, ids, None, [b"text"])

    def recovery(sent):
        return (nearest_neighbour_inversion(sent, table) == ids).float().mean().item()

    as_sent, undone, unscaled = recovery(rescaled), recovery(undo_rescaling(rescaled, privatizer)), recovery(plain)
    assert as_sent < unscaled - 0.25, (as_sent, unscaled)
    assert abs(undone - unscaled) <= 0.05, (undone, unscaled)
    assert torch.equal(undo_rescaling(plain, Privatizer(eta, key=b"k")), plain)  # nothing to undo without rescaling
