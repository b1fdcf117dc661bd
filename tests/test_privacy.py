"""Pure units for sap_client.privacy: d_chi noise statistics, eta validation, NoiseConfig and Privatizer."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from sap_client.privacy import NoiseConfig, Privatizer
from sap_common.dchi import eta_for_noise_ratio, sample_dchi_noise

DRAWS = 5000
DIMS = (32, 64, 384, 576)


def _draws(d: int, eta: float, seed: int = 0) -> torch.Tensor:
    return sample_dchi_noise((DRAWS, d), eta, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- sample_dchi_noise: distribution ------------------------------------------------------------


@pytest.mark.parametrize("d", DIMS)
def test_norms_follow_gamma_d_scale_one_over_eta(d):
    eta = 7.5
    norms = _draws(d, eta).norm(dim=-1).numpy()
    assert stats.kstest(norms, "gamma", args=(d, 0, 1 / eta)).pvalue > 0.01
    # The test has power: the other common parameterisation slip (scale off by 10%) is rejected.
    assert stats.kstest(norms, "gamma", args=(d, 0, 1 / (1.1 * eta))).pvalue < 1e-6
    # E||n|| = d / eta; the sample mean's relative sd is 1/sqrt(d N) <= 0.25%, so 3% is >= 12 sd.
    assert norms.mean() == pytest.approx(d / eta, rel=0.03)


@pytest.mark.parametrize("d", DIMS)
def test_directions_are_uniform_on_the_sphere(d):
    noise = _draws(d, eta=2.0, seed=1)
    unit = noise / noise.norm(dim=-1, keepdim=True)  # (N, d)
    # Each coordinate u_i has mean 0 and variance 1/d, so its sample mean has sd 1/sqrt(d N):
    # 5 sd over all d coordinates is exceeded with probability < d * 6e-7.
    assert unit.mean(dim=0).abs().max().item() < 5 / math.sqrt(d * DRAWS)
    second = unit.T @ unit / DRAWS * d  # (d, d); its expectation is the identity
    # d * u_i^2 has variance 3d/(d+2) - 1 < 2; d * u_i u_j (i != j) has variance d/(d+2) < 1.
    # 6 sd bounds over d and d(d-1)/2 entries fail with probability < 2e-9 per entry.
    diagonal = second.diagonal()
    assert (diagonal - 1).abs().max().item() < 6 * math.sqrt(2 / DRAWS)
    off = second - torch.diag(diagonal)
    assert off.abs().max().item() < 6 / math.sqrt(DRAWS)


def test_direction_check_has_power():
    """The bounds above reject a direction that is not isotropic (all-positive first coordinate)."""
    d = 32
    noise = _draws(d, eta=2.0, seed=1)
    noise[:, 0] = noise[:, 0].abs()
    unit = noise / noise.norm(dim=-1, keepdim=True)
    assert unit.mean(dim=0).abs().max().item() > 5 / math.sqrt(d * DRAWS)


def test_fixed_generator_reproduces_draws_and_other_seed_does_not():
    a = sample_dchi_noise((40, 16), 3.0, generator=torch.Generator().manual_seed(123))
    b = sample_dchi_noise((40, 16), 3.0, generator=torch.Generator().manual_seed(123))
    c = sample_dchi_noise((40, 16), 3.0, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - c).norm(dim=-1).min().item() > 0  # not a single vector shared


def test_generator_draws_do_not_touch_the_global_generator():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    sample_dchi_noise((10, 8), 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


def test_dtype_and_shape():
    noise = sample_dchi_noise((2, 3, 8), 1.0, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (2, 3, 8) and noise.dtype == torch.float32
    assert sample_dchi_noise((4, 8), 1.0, dtype=torch.float64).dtype == torch.float64
    assert sample_dchi_noise((0, 8), 1.0).shape == (0, 8)
    assert torch.isfinite(noise).all() and (noise.norm(dim=-1) > 0).all()


def test_per_token_eta_scales_each_vector():
    d, n = 32, 4000
    etas = torch.tensor([1.0, 10.0]).repeat(n // 2)  # (n,) alternating
    norms = sample_dchi_noise((n, d), etas, generator=torch.Generator().manual_seed(0)).norm(dim=-1)
    assert norms[0::2].mean().item() == pytest.approx(d / 1.0, rel=0.03)
    assert norms[1::2].mean().item() == pytest.approx(d / 10.0, rel=0.03)


def test_per_token_eta_broadcasts_over_batch_shape():
    d, t = 16, 3000
    etas = torch.tensor([[2.0], [20.0]])  # (2, 1) broadcast to (2, t)
    norms = sample_dchi_noise((2, t, d), etas, generator=torch.Generator().manual_seed(0)).norm(dim=-1)
    assert norms.shape == (2, t)
    assert norms[0].mean().item() == pytest.approx(d / 2.0, rel=0.03)
    assert norms[1].mean().item() == pytest.approx(d / 20.0, rel=0.03)


@pytest.mark.parametrize(
    "eta, shown",
    [
        (0, "0"),
        (0.0, "0.0"),
        (-1, "-1"),
        (-1.5, "-1.5"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        ("abc", "'abc'"),
        (None, "None"),
        (True, "True"),
        (torch.tensor([1.0, 0.0]), "0.0"),
        (torch.tensor([1.0, float("inf")]), "inf"),
        (torch.tensor([2.0, -3.0]), "-3.0"),
        (torch.tensor([float("nan")]), "nan"),
    ],
)
def test_invalid_eta_is_refused_by_name(eta, shown):
    with pytest.raises(ValueError, match=re.escape(shown)):
        sample_dchi_noise((2, 4), eta)


def test_non_broadcastable_eta_tensor_is_refused():
    with pytest.raises(ValueError, match=re.escape("(3,)")):
        sample_dchi_noise((2, 4), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="broadcast"):
        sample_dchi_noise((2, 5, 4), torch.ones(5, 2))


@pytest.mark.parametrize("shape, eta_shape", [((4, 8), (3, 4)), ((4, 8), (3, 1)), ((8,), (5,))])
def test_eta_tensor_must_broadcast_to_the_batch_shape(shape, eta_shape):
    """An eta that only broadcasts *with* shape[:-1] would grow extra dimensions of correlated noise."""
    with pytest.raises(ValueError, match="broadcast"):
        sample_dchi_noise(shape, torch.ones(eta_shape))


@pytest.mark.parametrize("shape", [(), (4, 0), (0,), (-1, 4), (3, -2)])
def test_invalid_shape_is_refused(shape):
    with pytest.raises(ValueError, match="shape"):
        sample_dchi_noise(shape, 1.0)


# --- eta_for_noise_ratio and NoiseConfig ----------------------------------------------------------


def test_eta_for_noise_ratio_formula():
    assert eta_for_noise_ratio(2.0, 4.0, 384) == pytest.approx(384 / 8.0)
    assert eta_for_noise_ratio(0.5, 10.0, 32) == pytest.approx(32 / 5.0)
    # The eta it gives produces noise of R times the norm on average.
    eta = eta_for_noise_ratio(3.0, 0.5, 64)
    norms = _draws(64, eta).norm(dim=-1)
    assert norms.mean().item() == pytest.approx(3.0 * 0.5, rel=0.03)


@pytest.mark.parametrize(
    "ratio, norm",
    [(0, 1.0), (-1, 1.0), (float("nan"), 1.0), (float("inf"), 1.0), (1.0, 0.0), (1.0, -2.0), (1.0, float("nan"))],
)
def test_eta_for_noise_ratio_refuses_bad_inputs(ratio, norm):
    with pytest.raises(ValueError):
        eta_for_noise_ratio(ratio, norm, 32)


def test_noise_config_validation():
    assert not NoiseConfig().enabled
    assert NoiseConfig(eta=5.0).enabled and NoiseConfig(noise_ratio=2.0).enabled
    assert NoiseConfig(eta=5.0, cti=True).cti
    with pytest.raises(ValueError, match="either eta or noise_ratio"):
        NoiseConfig(eta=5.0, noise_ratio=2.0)
    with pytest.raises(ValueError, match="CTI"):
        NoiseConfig(cti=True)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            NoiseConfig(eta=bad)
        with pytest.raises(ValueError):
            NoiseConfig(noise_ratio=bad)


# --- Privatizer -----------------------------------------------------------------------------------

B, T, H, V = 3, 6, 16, 50
LENGTHS = (6, 4, 2)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)  # padding rows are non-zero, as at k >= 1
    mask = (torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).long()  # (B, T)
    input_ids = torch.randint(1, V, (B, T), generator=g) * mask
    return hidden, mask, input_ids


KEYS = [b"first", b"second", b"third"]


def test_padding_is_exactly_zero_with_and_without_noise():
    hidden, mask, ids = _batch()
    for eta in (None, 4.0):
        sent = Privatizer(eta, key=b"secret")(hidden, mask, ids, None, KEYS)
        assert sent.shape == hidden.shape
        assert (sent[mask == 0] == 0).all()


def test_without_eta_only_padding_changes():
    hidden, mask, ids = _batch()
    privatizer = Privatizer(None, key=b"secret")
    sent = privatizer(hidden, mask, ids, None, KEYS)
    assert torch.equal(sent[mask == 1], hidden[mask == 1])
    assert privatizer.noise_to_signal == 0.0


def test_noise_is_added_to_every_real_token():
    hidden, mask, ids = _batch()
    sent = Privatizer(4.0, key=b"secret")(hidden, mask, ids, None, KEYS)
    assert ((sent - hidden)[mask == 1].norm(dim=-1) > 1e-3).all()
    assert not hidden.requires_grad and sent.data_ptr() != hidden.data_ptr()


def test_same_example_key_gives_same_noise_in_any_batch():
    hidden, mask, ids = _batch()
    first = Privatizer(4.0, key=b"secret")(hidden, mask, ids, None, KEYS)
    again = Privatizer(4.0, key=b"secret")(hidden, mask, ids, None, KEYS)
    assert torch.equal(first, again)
    # Example "second" alone in a batch of its own (shorter padding) gets the same noisy rows.
    alone = Privatizer(4.0, key=b"secret")(hidden[1:2, :4], mask[1:2, :4], ids[1:2, :4], None, [b"second"])
    assert torch.equal(alone[0, :4], first[1, :4])


def test_different_keys_give_different_noise():
    hidden, mask, ids = _batch()
    base = Privatizer(4.0, key=b"secret")(hidden, mask, ids, None, KEYS)
    other_example = Privatizer(4.0, key=b"secret")(hidden, mask, ids, None, [b"x", b"y", b"z"])
    other_secret = Privatizer(4.0, key=b"another")(hidden, mask, ids, None, KEYS)
    real = mask == 1
    for other in (other_example, other_secret):
        assert ((other - base)[real].norm(dim=-1) > 1e-3).all()
    # Two examples with the same hidden states but different keys get different noise too.
    twin = hidden.clone()
    twin[1] = twin[0]
    twin_mask = torch.ones_like(mask)
    sent = Privatizer(4.0, key=b"secret")(twin, twin_mask, ids, None, KEYS)
    assert not torch.equal(sent[0], sent[1])


def test_cti_exempt_token_is_sent_clean_and_others_perturbed():
    hidden, mask, ids = _batch()
    exempt_id = int(ids[0, 0])
    table = torch.full((3, V), 4.0, dtype=torch.float64)  # 2 classes + the unlabeled row
    table[:, exempt_id] = math.inf
    privatizer = Privatizer(4.0, key=b"secret", eta_table=table)
    for labels in (torch.tensor([0, 1, 0]), None):
        sent = privatizer(hidden, mask, ids, labels, KEYS)
        exempt = (ids == exempt_id) & (mask == 1)
        perturbed = (ids != exempt_id) & (mask == 1)
        assert exempt.any() and perturbed.any()
        assert torch.equal(sent[exempt], hidden[exempt])
        assert ((sent - hidden)[perturbed].norm(dim=-1) > 1e-3).all()
        assert (sent[mask == 0] == 0).all()


def test_cti_table_row_follows_the_label():
    """A token noised for class 0 only: exempt under label 1, perturbed under label 0."""
    hidden, mask, ids = _batch()
    token = int(ids[0, 0])
    table = torch.full((3, V), math.inf, dtype=torch.float64)
    table[0, token] = 4.0
    privatizer = Privatizer(4.0, key=b"secret", eta_table=table)
    as_zero = privatizer(hidden[:1], mask[:1], ids[:1], torch.tensor([0]), KEYS[:1])
    as_one = privatizer(hidden[:1], mask[:1], ids[:1], torch.tensor([1]), KEYS[:1])
    hit = (ids[0] == token) & (mask[0] == 1)
    assert not torch.equal(as_zero[0][hit], hidden[0][hit])
    assert torch.equal(as_one[0][hit], hidden[0][hit])


def test_cti_max_rows_make_the_noise_independent_of_the_label():
    """label_rows=False (--cti-rows max): a training text gets the unlabeled (max) row whatever its label,
    so the noise level a provider sees on a token says nothing about the label."""
    hidden, mask, ids = _batch()
    token = int(ids[0, 0])
    table = torch.full((3, V), 4.0, dtype=torch.float64)
    table[1, token] = 40.0  # important for class 1 only
    table[2] = table[:2].max(dim=0).values
    privatizer = Privatizer(4.0, key=b"secret", eta_table=table, label_rows=False)
    unlabeled = privatizer(hidden[:1], mask[:1], ids[:1], None, KEYS[:1])
    for label in (0, 1):
        assert torch.equal(privatizer(hidden[:1], mask[:1], ids[:1], torch.tensor([label]), KEYS[:1]), unlabeled)
    by_label = Privatizer(4.0, key=b"secret", eta_table=table)
    assert not torch.equal(by_label(hidden[:1], mask[:1], ids[:1], torch.tensor([0]), KEYS[:1]), unlabeled)
    with pytest.raises(ValueError, match="cti_rows"):
        NoiseConfig(eta=1.0, cti=True, cti_rows="mean")


def test_rescaling_sets_the_norm_of_noised_vectors_only():
    """rescale_norm (--rescale-noised): every noised vector is sent with that norm and the direction of h + n;
    exempt vectors stay clean, padding zero, and the noise figures are the d_chi noise's own."""
    hidden, mask, ids = _batch()
    hidden = hidden * 3
    exempt_id = int(ids[0, 1])
    table = torch.full((3, V), 0.5, dtype=torch.float64)
    table[:, exempt_id] = math.inf
    plain = Privatizer(0.5, key=b"secret", eta_table=table, label_rows=False)
    rescaled = Privatizer(0.5, key=b"secret", eta_table=table, label_rows=False, rescale_norm=4.0)
    unscaled, sent = plain(hidden, mask, ids, None, KEYS), rescaled(hidden, mask, ids, None, KEYS)
    noised = (mask == 1) & (ids != exempt_id)
    exempt = (mask == 1) & (ids == exempt_id)
    assert noised.any() and exempt.any()
    assert torch.allclose(sent[noised].norm(dim=-1), torch.full((int(noised.sum()),), 4.0))
    assert torch.allclose(
        F.cosine_similarity(sent[noised], unscaled[noised], dim=-1), torch.ones(int(noised.sum())), atol=1e-5
    )
    assert not torch.allclose(unscaled[noised].norm(dim=-1), torch.full((int(noised.sum()),), 4.0), rtol=0.05)
    assert torch.equal(sent[exempt], hidden[exempt])
    assert (sent[mask == 0] == 0).all()
    assert rescaled.noise_to_signal == plain.noise_to_signal > 1  # measured before rescaling
    # the same keyed draw every time: a provider that sees a text twice still sees one observation
    assert torch.equal(rescaled(hidden, mask, ids, None, KEYS), sent)


def test_rescaling_is_validated():
    with pytest.raises(ValueError, match="base eta"):
        Privatizer(None, key=b"k", rescale_norm=1.0)
    for bad in (0.0, -2.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="rescale norm"):
            Privatizer(4.0, key=b"k", rescale_norm=bad)
    with pytest.raises(ValueError, match="needs noise"):
        NoiseConfig(rescale_noised=True)
    assert NoiseConfig(noise_ratio=2.0, rescale_noised=True).rescale_noised


def test_eta_table_needs_a_base_eta():
    with pytest.raises(ValueError, match="base eta"):
        Privatizer(None, key=b"k", eta_table=torch.ones(3, V))
    with pytest.raises(ValueError):
        Privatizer(0.0, key=b"k")


def test_noise_to_signal_is_the_measured_ratio():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(8, 20, 32, generator=g, dtype=torch.float64)
    mask = torch.ones(8, 20, dtype=torch.long)
    mask[:, 15:] = 0
    ids = torch.randint(1, V, (8, 20), generator=g)
    privatizer = Privatizer(10.0, key=b"secret")
    keys = [str(i).encode() for i in range(8)]
    total_noise = total_signal = 0.0
    for _ in range(2):  # accumulates over calls
        sent = privatizer(hidden, mask, ids, None, keys)
        real = mask == 1
        total_noise += (sent - hidden)[real].norm(dim=-1).sum().item()
        total_signal += hidden[real].norm(dim=-1).sum().item()
    assert privatizer.tokens == 2 * int(mask.sum())
    assert privatizer.noise_to_signal == pytest.approx(total_noise / total_signal, rel=1e-9)
    # and it is what eta predicts: (d / eta) / mean ||h||
    expected = (32 / 10.0) / hidden[mask == 1].norm(dim=-1).mean().item()
    assert privatizer.noise_to_signal == pytest.approx(expected, rel=0.1)
