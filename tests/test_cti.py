"""Unit tests of contributing token identification: counts, importance, eta tables and per-token lookup."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sap_client.cti import CTI_MODES, CtiStatistics, eta_table, fit_cti, token_eta

PAD = 0
ETA = 10.0


def _corpus() -> tuple[list[list[int]], list[int]]:
    """Vocab 8. Tokens 1, 2 appear evenly in both classes; 4 only in class 0; 5 only in class 1; 6, 7 never."""
    texts = [[4, 4, 1, 2, PAD, PAD]] * 4 + [[5, 5, 1, 2, PAD]] * 4
    return texts, [0] * 4 + [1] * 4


def _stats() -> CtiStatistics:
    texts, labels = _corpus()
    return fit_cti(texts, labels, num_classes=2, vocab_size=8, ignore_ids={PAD})


def test_counts_skip_ignored_ids():
    counts = _stats().counts
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[0, 4, 4, 0, 8, 0, 0, 0], [0, 4, 4, 0, 0, 8, 0, 0]]


def test_class_only_token_is_above_floor_and_unlabeled_row_matches():
    table = eta_table(_stats(), ETA)
    assert table.shape == (3, 8) and table.dtype == torch.float64
    # freq = 8/16, 3 xi = 3/16: UI = ln(0.5 / 0.1875) = ln(8/3)
    assert table[1, 5].item() == pytest.approx(math.log(8 / 3) * ETA)
    assert table[1, 5].item() > 0.6 * ETA
    assert table[2, 5].item() == table[1, 5].item()
    assert table[0, 5].item() == pytest.approx(0.6 * ETA)  # unseen in class 0


def test_even_and_unseen_tokens_get_the_floor():
    table = eta_table(_stats(), ETA, floor=0.6)
    for token in (1, 2):  # seen evenly: UI = ln(0.25 / 0.4375) < 0
        assert table[:, token].tolist() == pytest.approx([0.6 * ETA] * 3)
    for token in (0, 3, 6, 7):  # never counted
        assert table[:, token].tolist() == pytest.approx([0.6 * ETA] * 3)


def test_importance_matches_hand_computation():
    # class 0: counts [6, 1, 1, 0], S0 = 8, freq [0.75, 0.125, 0.125, 0]
    # class 1: counts [0, 1, 1, 2], S1 = 4, freq [0, 0.25, 0.25, 0.5]
    # xi = 1 / max(8, 4) = 0.125, 3 xi = 0.375
    stats = CtiStatistics(counts=torch.tensor([[6, 1, 1, 0], [0, 1, 1, 2]]))
    expected = [
        [
            math.log(0.75 / (0 + 0.375)),  # ln 2
            math.log(0.125 / (0.25 + 0.375)),  # ln 0.2
            math.log(0.125 / (0.25 + 0.375)),  # ln 0.2
            0.0,
        ],  # unseen in class 0
        [
            0.0,  # unseen in class 1
            math.log(0.25 / (0.125 + 0.375)),  # ln 0.5
            math.log(0.25 / (0.125 + 0.375)),  # ln 0.5
            math.log(0.5 / (0 + 0.375)),
        ],  # ln 4/3
    ]
    ui = stats.importance()
    assert ui.dtype == torch.float64
    torch.testing.assert_close(ui, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    table = eta_table(stats, 2.0, floor=0.6)
    want = [
        [2 * math.log(2), 1.2, 1.2, 1.2],  # ln 2 > 0.6 keeps its UI; the rest hit the floor
        [1.2, 1.2, 1.2, 1.2],  # ln 4/3 = 0.288 < 0.6
        [2 * math.log(2), 1.2, 1.2, 1.2],
    ]
    torch.testing.assert_close(table, torch.tensor(want, dtype=torch.float64))


def test_three_classes_match_the_formula_and_unlabeled_row_is_the_max():
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 20, (3, 30), generator=gen) * (torch.rand(3, 30, generator=gen) < 0.6)
    stats = CtiStatistics(counts=counts)
    freq = counts.double() / counts.sum(1, keepdim=True)
    xi = 1 / counts.sum(1).max().item()
    ui = stats.importance()
    for c in range(3):
        for t in range(30):
            want = 0.0
            if counts[c, t] > 0:
                want = sum(math.log(freq[c, t] / (freq[k, t] + 3 * xi)) for k in range(3) if k != c)
            assert ui[c, t].item() == pytest.approx(want, abs=1e-12)
    table = eta_table(stats, ETA, floor=0.5)
    assert table.shape == (4, 30)
    assert torch.equal(table[:3], ui.clamp_min(0.5) * ETA)
    assert torch.equal(table[3], table[:3].max(0).values)


def test_exempt_mode_exempts_top_fraction_per_class_and_their_union():
    counts = torch.zeros(2, 12, dtype=torch.int64)
    counts[0, :10] = 1
    counts[0, 0], counts[0, 1] = 50, 40  # class 0 sees 10 tokens; 0 and 1 only there, most frequent
    counts[1, 5:12] = 1
    counts[1, 11] = 50  # class 1 sees 7 tokens; 11 only there, most frequent
    table = eta_table(CtiStatistics(counts=counts), ETA, mode="exempt", top=0.25)
    # max(1, floor(0.25 * 10)) = 2 in class 0; max(1, floor(0.25 * 7)) = 1 in class 1
    assert torch.isinf(table[0]).nonzero().flatten().tolist() == [0, 1]
    assert torch.isinf(table[1]).nonzero().flatten().tolist() == [11]
    assert torch.isinf(table[2]).nonzero().flatten().tolist() == [0, 1, 11]
    assert (table[~torch.isinf(table)] == ETA).all()


def test_exempt_mode_rounding_ties_and_full_fraction():
    counts = torch.zeros(2, 200, dtype=torch.int64)
    counts[0, :100] = 3  # 100 tokens of equal UI in class 0
    counts[1, 100:104] = 1
    stats = CtiStatistics(counts=counts)
    table = eta_table(stats, ETA, mode="exempt", top=0.29)  # 0.29 * 100 = 28.999... in floats -> 29
    assert torch.isinf(table[0]).nonzero().flatten().tolist() == list(range(29))  # ties: lowest ids
    table = eta_table(stats, ETA, mode="exempt", top=0.1)  # floor(0.4) = 0 -> at least 1
    assert torch.isinf(table[1]).nonzero().flatten().tolist() == [100]
    table = eta_table(stats, ETA, mode="exempt", top=1.0)
    assert torch.isinf(table[2]).nonzero().flatten().tolist() == list(range(104))


def test_save_load_round_trip(tmp_path: Path):
    stats = _stats()
    path = tmp_path / "cti.safetensors"
    stats.save(path)
    loaded = CtiStatistics.load(path)
    assert loaded.counts.dtype == torch.int64 and torch.equal(loaded.counts, stats.counts)
    assert torch.equal(eta_table(loaded, ETA), eta_table(stats, ETA))


def test_load_rejects_other_safetensors(tmp_path: Path):
    path = tmp_path / "other.safetensors"
    save_file({"counts": torch.ones(2, 3, dtype=torch.int64)}, str(path))
    with pytest.raises(ValueError, match="not a CTI statistics file"):
        CtiStatistics.load(path)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"eta_base": 0.0}, "eta_base.*0.0"),
        ({"eta_base": math.inf}, "eta_base.*inf"),
        ({"mode": "foo"}, "mode.*'foo'"),
        ({"top": 0.0}, "top.*0.0"),
        ({"top": 1.5}, "top.*1.5"),
        ({"floor": 0.0}, "floor.*0.0"),
    ],
)
def test_eta_table_rejects_bad_parameters(kwargs, needle):
    args = {"eta_base": ETA} | kwargs
    with pytest.raises(ValueError, match=needle):
        eta_table(_stats(), **args)


def test_fit_rejects_out_of_range_labels_and_ids():
    with pytest.raises(ValueError, match="label 2 "):
        fit_cti([[1], [2]], [0, 2], num_classes=2, vocab_size=8)
    with pytest.raises(ValueError, match="label -1 "):
        fit_cti([[1]], [-1], num_classes=2, vocab_size=8)
    with pytest.raises(ValueError, match="token id 8 "):
        fit_cti([[1, 8]], [0], num_classes=2, vocab_size=8)
    with pytest.raises(ValueError, match="token id -3 "):
        fit_cti([[-3]], [0], num_classes=2, vocab_size=8)
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        fit_cti([[1], [2]], [0], num_classes=2, vocab_size=8)
    with pytest.raises(ValueError, match="all zero"):
        fit_cti([[PAD]], [0], num_classes=2, vocab_size=8, ignore_ids={PAD})
    assert fit_cti([[1, -100]], [1], num_classes=2, vocab_size=8, ignore_ids={-100}).counts[1, 1] == 1


def test_token_eta_picks_class_rows_or_the_unlabeled_row():
    table = eta_table(_stats(), ETA)
    ids = torch.tensor([[4, 5, PAD], [5, 1, 4]])
    labelled = token_eta(table, ids, torch.tensor([1, 0]))
    assert labelled.shape == (2, 3)
    assert labelled.tolist() == [
        [table[1, 4].item(), table[1, 5].item(), table[1, PAD].item()],
        [table[0, 5].item(), table[0, 1].item(), table[0, 4].item()],
    ]
    unlabeled = token_eta(table, ids, None)
    assert unlabeled.tolist() == [[table[2, t].item() for t in row] for row in ids.tolist()]
    assert unlabeled[1, 0].item() > 0.6 * ETA and labelled[1, 0].item() == pytest.approx(0.6 * ETA)
    with pytest.raises(ValueError, match="label 2 "):
        token_eta(table, ids, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="token id 8 "):
        token_eta(table, torch.tensor([[8]]), None)


def test_modes_constant():
    assert CTI_MODES == ("scale", "exempt")
