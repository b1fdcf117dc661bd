"""The frontier benchmark's comparison (benchmarks/frontier.py) on synthetic cells: a defence is set against plain
d_chi of its own model, split and seed at the same EIA privacy, and the files are written. The cells themselves are
real runs (`make frontier`), far too long for the test suite; `--quick` runs the pipeline end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import frontier  # noqa: E402


def _cell(defence: str, ratio: float | None, seed: int, accuracy: float, privacy: float, split: int = 2) -> dict:
    return {
        "model": "m",
        "split": split,
        "defence": defence,
        "ratio": ratio,
        "seed": seed,
        "budget": frontier.asdict(frontier.Budget(train=10, epochs=1)),
        "bottom_learning_rate": 1e-4 if defence == "trained-bottom" else None,
        "noise_to_signal": ratio or 0.0,
        "accuracy": accuracy,
        "history": [{"eval_accuracy": accuracy}],
        "eia_privacy": privacy,
        "eia_recovery": 1 - privacy,
        "eia_attack": "learned",
        "train_seconds": 1.0,
        "attack_seconds": 1.0,
    }


PLAIN = [_cell("plain", None, 0, 0.80, 0.0), _cell("plain", 2.0, 0, 0.70, 0.4), _cell("plain", 4.0, 0, 0.50, 0.8)]


def test_plain_accuracy_is_interpolated_at_the_defences_privacy():
    assert frontier.plain_accuracy_at(PLAIN, 0.6) == (pytest.approx(0.60), "interpolated")
    assert frontier.plain_accuracy_at(PLAIN, 0.9) == (None, "beyond the plain curve")
    assert frontier.plain_accuracy_at(PLAIN[1:], 0.2)[0] == 0.70  # below: the least private plain cell


def test_a_defence_is_compared_with_its_own_seed_and_split_only():
    other_seed = [_cell("plain", 2.0, 1, 0.99, 0.6)]  # would flatter the defence if it were used
    other_split = [_cell("plain", 2.0, 0, 0.10, 0.6, split=4)]
    defence = _cell("trained-bottom", 2.0, 0, 0.74, 0.6)
    (row,) = frontier.comparisons([*PLAIN, *other_seed, *other_split, defence])
    assert row["plain_accuracy"] == pytest.approx(0.60) and row["gain"] == pytest.approx(0.14)


def test_the_report_and_plot_are_written(tmp_path):
    cells = [*PLAIN, _cell("trained-bottom", 2.0, 0, 0.74, 0.6)]
    text = frontier.markdown(cells, "python benchmarks/frontier.py", 120.0)
    assert "| m | 2 | trained-bottom | 2.00 | 0 | 0.600 | 0.740 | 0.600 (interpolated) | +14.0 |" in text
    assert "The trainable bottom's learning rate (AdamW, every bottom weight): 0.0001." in text
    frontier.plot(cells, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_the_report_names_missing_cells_and_cells_outside_the_grid():
    planned = [frontier.Cell("m", 2, "plain", r, 0).name for r in (None, 2.0, 3.0)]
    text = frontier.markdown(PLAIN, "python benchmarks/frontier.py", 120.0, planned)
    assert "**Partial: 2 of the grid's 3 cells are done**" in text and "missing: 1 of m_k2." in text
    assert "Also here, outside the grid: m_k2_plain_R4_s0." in text


def test_a_defence_only_run_is_compared_with_another_runs_plain_cells():
    defence = _cell("trained-bottom", 3.0, 0, 0.74, 0.6)
    second = _cell("learned-filter", 1.0, 0, 0.64, 0.8)  # a second defence cell: the plain curve is found again
    other_budget = {**_cell("plain", 2.0, 0, 0.99, 0.6), "budget": frontier.asdict(frontier.Budget(train=99))}
    row, row2 = frontier.comparisons([defence, second], [*PLAIN, other_budget])  # not the other budget's cell
    assert row["plain_accuracy"] == pytest.approx(0.60) and row["gain"] == pytest.approx(0.14)
    assert row2["plain_accuracy"] == pytest.approx(0.50) and row2["gain"] == pytest.approx(0.14)
    own = [_cell("plain", 2.0, 0, 0.65, 0.5), _cell("plain", 4.0, 0, 0.45, 0.7)]
    (row,) = frontier.comparisons([*own, defence], PLAIN)  # the run's own plain curve comes first
    assert row["plain_accuracy"] == pytest.approx(0.55)
    text = frontier.markdown([defence], "python benchmarks/frontier.py", 1.0, plain_from=PLAIN, plain_from_name="grid")
    assert "(its plain cells from grid where this run has none)" in text and "| +14.0 |" in text
