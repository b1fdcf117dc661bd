"""The privacy table's report logic (benchmarks/privacy_table.py) on synthetic cells: which operating point
it names, how CTI is compared at equal privacy, and that the files are written. The grid itself runs on
real models (`make privacy-table`), far too long for the test suite."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("privacy_table", ROOT / "benchmarks" / "privacy_table.py")
privacy_table = importlib.util.module_from_spec(spec)
sys.modules["privacy_table"] = privacy_table  # dataclasses look their module up by name
spec.loader.exec_module(privacy_table)


def _cell(split: int, ratio: float | None, cti: bool, accuracy: float, privacy: float, **extra) -> dict:
    row = {"model": "m", "split": split, "total_blocks": 6, "peft": "lora", "train_bottom": False,
           "noise_ratio": ratio, "cti": cti, "eta": None if ratio is None else 10.0 / ratio,
           "noise_to_signal": ratio or 0.0, "accuracy": accuracy, "eval_majority": 0.5, "eia_attack": "nn",
           "eia_recovery": 1 - privacy, "eia_recovery_without_special": 1 - privacy, "eia_privacy": privacy,
           "eia_tokens": 100, "aia_accuracy": 0.6, "aia_baseline": 0.5, "aia_privacy": 0.4,
           "train_seconds": 1.0, "attack_seconds": 1.0}
    row.update(extra)
    return row


ROWS = [
    _cell(0, None, False, 0.80, 0.00), _cell(0, 1, False, 0.79, 0.10), _cell(0, 4, False, 0.60, 0.80),
    _cell(0, 1, True, 0.78, 0.65), _cell(0, 4, True, 0.55, 0.95),
    _cell(2, None, False, 0.80, 0.30), _cell(2, 1, False, 0.75, 0.90),
    _cell(2, 1, True, 0.70, 0.95, cti_rows="max"),
]


def test_interpolation_reads_the_cti_off_curve_at_equal_privacy():
    off = privacy_table._frontier(ROWS, "m", 0, "off")
    assert [r["noise_ratio"] for r in off] == [None, 1, 4]
    assert privacy_table._interpolate(off, 0.45) == pytest.approx(0.79 + (0.60 - 0.79) * 0.5)
    assert privacy_table._interpolate(off, 0.99) is None  # beyond the curve: no comparison invented


def test_findings_name_the_nearest_operating_point_and_compare_cti():
    text = "\n".join(privacy_table.findings(ROWS))
    # k = 0, R 1, CTI on: +0.65 privacy for 2 points of accuracy is the nearest to (+0.62, -0.01)
    assert "Nearest to the paper's operating point" in text
    assert "m k = 0, lora, frozen bottom, R 1, CTI label: EIA privacy 0.00 -> 0.65 (+0.65)" in text
    # the CTI-on cell at privacy 0.65 against the CTI-off curve there (0.79 -> 0.60 between 0.10 and 0.80)
    reference = 0.79 + (0.60 - 0.79) * (0.65 - 0.10) / (0.80 - 0.10)
    assert f"CTI off at that privacy: {reference:.3f} ({0.78 - reference:+.3f})" in text
    assert "m k = 2, R 1, max rows: privacy 0.95, accuracy 0.700; outside the CTI-off curve" in text
    assert "R = none: 0.00 / 0.30" in text and "R = 1: 0.10 / 0.90" in text


def test_report_files(tmp_path):
    privacy_table.write_report(privacy_table.QUICK, ROWS, tmp_path, "python benchmarks/privacy_table.py", 60.0)
    table = (tmp_path / "privacy_table.md").read_text()
    assert table.count("\n| m |") == len(ROWS)
    with (tmp_path / "privacy_table.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(ROWS)
    assert (tmp_path / "privacy_table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cti_study_compares_each_seed_with_its_own_off_curve_and_the_means():
    study = privacy_table.CtiStudy("m", 4, seeds=(0, 1), off_ratios=(1, 2), cti_ratios=(1,), cti_rows=("max",))
    cells = [_cell(4, 1, False, 0.70, 0.20, seed=0), _cell(4, 2, False, 0.60, 0.60, seed=0),
             _cell(4, 1, False, 0.72, 0.30, seed=1), _cell(4, 2, False, 0.56, 0.70, seed=1),
             _cell(4, 1, True, 0.66, 0.40, seed=0, cti_rows="max"),
             _cell(4, 1, True, 0.60, 0.80, seed=1, cti_rows="max")]  # beyond seed 1's own off curve
    text = "\n".join(privacy_table.study_findings(study, cells))
    assert "| off | 1 | 1.00 | 0.700 / 0.720 | 0.710 | 0.20 / 0.30 | 0.25 |" in text
    # seed 0: off curve at privacy 0.40 is 0.70 + (0.60 - 0.70) * 0.5 = 0.65, so +0.010; seed 1 has no comparison
    # means: CTI (0.60, 0.63) against the mean off curve (0.25, 0.71)-(0.65, 0.58), read at 0.60
    assert ("max rows, R 1: mean privacy 0.60, mean accuracy 0.630; off curve there "
            f"{0.71 + (0.58 - 0.71) * (0.60 - 0.25) / 0.40:.3f}") in text
    assert "per seed +0.010, outside (mean +0.010, 1 of 1 above)" in text
