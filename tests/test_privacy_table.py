"""The privacy table's report logic (benchmarks/privacy_table.py) on synthetic cells: which operating point
it names, how CTI is compared at equal privacy, and that the files are written. The grid itself runs on
real models (`make privacy-table`), far too long for the test suite."""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# on sys.path, so that the worker processes it spawns (which get this sys.path) can import it too
sys.path.insert(0, str(ROOT / "benchmarks"))
import privacy_table  # noqa: E402
from sap_client.audit.learned import LearnedConfig  # noqa: E402


def _cell(split: int, ratio: float | None, cti: bool, accuracy: float, privacy: float, **extra) -> dict:
    row = {
        "model": "m",
        "split": split,
        "total_blocks": 6,
        "peft": "lora",
        "train_bottom": False,
        "noise_ratio": ratio,
        "cti": cti,
        "eta": None if ratio is None else 10.0 / ratio,
        "noise_to_signal": ratio or 0.0,
        "accuracy": accuracy,
        "eval_majority": 0.5,
        "eia_attack": "nn",
        "eia_recovery": 1 - privacy,
        "eia_recovery_without_special": 1 - privacy,
        "eia_privacy": privacy,
        "eia_tokens": 100,
        "aia_accuracy": 0.6,
        "aia_baseline": 0.5,
        "aia_privacy": 0.4,
        "train_seconds": 1.0,
        "attack_seconds": 1.0,
    }
    row.update(extra)
    return row


ROWS = [
    _cell(0, None, False, 0.80, 0.00),
    _cell(0, 1, False, 0.79, 0.10),
    _cell(0, 4, False, 0.60, 0.80),
    _cell(0, 1, True, 0.78, 0.65),
    _cell(0, 4, True, 0.55, 0.95),
    _cell(2, None, False, 0.80, 0.30),
    _cell(2, 1, False, 0.75, 0.90),
    _cell(2, 1, True, 0.70, 0.95, cti_rows="max"),
]


def test_interpolation_reads_the_cti_off_curve_at_equal_privacy():
    off = privacy_table.frontier(ROWS, "m", 0, "off")
    assert [r["noise_ratio"] for r in off] == [None, 1, 4]
    assert privacy_table.accuracy_at_privacy(off, 0.45) == pytest.approx(0.79 + (0.60 - 0.79) * 0.5)
    assert privacy_table.accuracy_at_privacy(off, 0.99) is None  # beyond the curve: no comparison invented


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
    privacy_table.write_report(
        privacy_table.QUICK,
        ROWS,
        tmp_path,
        "python benchmarks/privacy_table.py",
        {"seconds": 3725, "cells": 2, "finished": "2026-12-02 14:38"},
    )
    table = (tmp_path / "privacy_table.md").read_text()
    assert table.count("\n| m |") == len(ROWS) and "62 min 05 s" in table
    with (tmp_path / "privacy_table.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(ROWS)
    assert (tmp_path / "privacy_table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cti_study_compares_each_seed_with_its_own_off_curve_and_the_means():
    study = privacy_table.CtiStudy("m", 4, seeds=(0, 1), off_ratios=(1, 2), cti_ratios=(1,), cti_rows=("max",))
    cells = [
        _cell(4, 1, False, 0.70, 0.20, seed=0),
        _cell(4, 2, False, 0.60, 0.60, seed=0),
        _cell(4, 1, False, 0.72, 0.30, seed=1),
        _cell(4, 2, False, 0.56, 0.70, seed=1),
        _cell(4, 1, True, 0.66, 0.40, seed=0, cti_rows="max"),
        _cell(4, 1, True, 0.60, 0.80, seed=1, cti_rows="max"),
    ]  # beyond seed 1's own off curve
    text = "\n".join(privacy_table.study_findings(study, cells))
    assert "| off | 1 | 1.00 | 0.700 / 0.720 | 0.710 | 0.20 / 0.30 | 0.25 |" in text
    # seed 0: off curve at privacy 0.40 is 0.70 + (0.60 - 0.70) * 0.5 = 0.65, so +0.010; seed 1 has no comparison
    # means: CTI (0.60, 0.63) against the mean off curve (0.25, 0.71)-(0.65, 0.58), read at 0.60
    assert (
        "max rows, R 1: mean privacy 0.60, mean accuracy 0.630; off curve there "
        f"{0.71 + (0.58 - 0.71) * (0.60 - 0.25) / 0.40:.3f}"
    ) in text
    assert "per seed +0.010, outside (mean +0.010, 1 of 1 above)" in text


# --- running cells: the schedule, and the worker processes on a tiny model ---------------------------------


def _tiny_grid(model: Path, data: Path):
    words = ["good", "great", "fine", "bad", "dull", "poor", "film", "plot", "actor", "scene"]
    with (data / "snippets.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(40):
            text = " ".join(words[(i * 7 + j) % len(words)] for j in range(6)) + f" w{i}"  # every text distinct
            writer.writerow([text, "pos" if i % 2 else "neg"])
    with (data / "paragraphs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "party"])
        for i in range(24):
            writer.writerow([" ".join(words[(i * 3 + j) % len(words)] for j in range(8)), "a" if i % 3 else "b"])
    spec = privacy_table.ModelGrid(
        str(model),
        (0, 1),
        (4,),
        train_examples=16,
        eval_examples=8,
        learning_rate=1e-3,
        eia_examples=2,
        eia_steps=3,
        eia_lr=0.03,
        nn_examples=4,
        eia_length=8,
    )
    return privacy_table.Grid(
        models=[spec],
        extras_at=("none", 0, 0.0),
        aia_examples=16,
        aia_length=16,
        batch_size=8,
        max_length=16,
        snippets=str(data / "snippets.csv"),
        paragraphs=str(data / "paragraphs.csv"),
        public_start=16,
        public_examples=16,
        inverter=LearnedConfig(width=16, layers=1, epochs=1),
    )


def test_schedule_skips_finished_cells_and_starts_the_slowest_model(tmp_path):
    grid = privacy_table.FULL
    tasks = privacy_table.grid_tasks(grid, tmp_path / "cells")
    study = privacy_table.study_tasks(privacy_table.FULL_CTI_STUDY, tmp_path / "study")
    # per MiniLM split: none + 3 R x CTI off/on (+ trained bottom, BitFit, Adapter at k 2); SmolLM2 the same
    assert len(tasks) == 4 * 7 + 3 + 7 and len({t.name for t in tasks}) == len(tasks)
    # per seed: off at R 1.5, 2, 2.5, 3, 4, label rows at R 1 and 2, exempt at R 2; the grid's k = 4 row (seed 0)
    # holds three of them
    assert len(study) == 3 * 8
    shared = privacy_table.study_tasks(privacy_table.FULL_CTI_STUDY, tmp_path / "study", shared=tasks)
    assert [t.name for t in study if t not in shared] == [
        "minilm-l6_k4_s0_R2_off",
        "minilm-l6_k4_s0_R4_off",
        "minilm-l6_k4_s0_R2_cti-label",
    ]
    (tmp_path / "cells").mkdir()
    tasks[0].path.write_text("{}")
    order = privacy_table.schedule(grid, tasks + shared)
    assert tasks[0] not in order and len(order) == len(tasks) + len(shared) - 1
    assert {t.model for t in order[:7]} == {"smollm2-135m"} and {t.model for t in order[7:]} == {"minilm-l6"}
    assert [t.name for t in order[7:]] == [t.name for t in tasks[1:] + shared if t.model == "minilm-l6"]


@pytest.mark.parametrize("workers", [1, 2])
def test_cells_run_in_worker_processes_and_resume(tiny_bert, tmp_path, workers):
    grid = _tiny_grid(tiny_bert, tmp_path)
    tasks = privacy_table.grid_tasks(grid, tmp_path / "cells")
    assert len(tasks) == 2 * 3  # k 0 and 1: no noise, R 4 with CTI off and on
    privacy_table.run_tasks(grid, privacy_table.schedule(grid, tasks), workers=workers)
    rows = privacy_table.load_cells(tmp_path / "cells")
    assert sorted(r["split"] for r in rows) == [0, 0, 0, 1, 1, 1]
    for row in rows:
        assert row["train_examples"] == 16 and row["eval_examples"] == 8 and 0 <= row["accuracy"] <= 1
        # every attack that applies (an encoder: no sequential decoding), the strongest one's figure
        assert set(row["eia_attacks"]) == {"nn" if row["split"] == 0 else "optimization", "learned"}
        assert row["eia_recovery"] == max(row["eia_attacks"].values()) == pytest.approx(1 - row["eia_privacy"])
        assert row["eia_attack"] in row["eia_attacks"] and row["public_examples"] == 16
        assert 0 <= row["eia_privacy"] <= 1 and row["aia_victims"] > 0
        assert (row["eta"] is None) == (row["noise_ratio"] is None)
    # no noise at k = 0: the nearest-neighbour attack reads every token back
    assert next(r for r in rows if r["split"] == 0 and r["noise_ratio"] is None)["eia_privacy"] == 0.0
    assert not list((tmp_path / "cells").glob("*.partial"))
    assert privacy_table.schedule(grid, tasks) == []  # a second run has nothing left to do


def test_study_takes_its_planned_cells_from_the_grid():
    study = privacy_table.CtiStudy("m", 4, seeds=(0, 1), off_ratios=(1, 2), cti_ratios=(1,), cti_rows=("label",))
    own = [_cell(4, 1, False, 0.70, 0.20, seed=1)]
    grid = [
        _cell(4, 1, False, 0.71, 0.21, seed=0),
        _cell(4, 4, False, 0.50, 0.90, seed=0),  # R 4: not planned
        _cell(4, 1, True, 0.68, 0.50, seed=0, cti_rows="label", cti_mode="scale"),
        _cell(2, 1, False, 0.75, 0.10, seed=0),  # another split
        _cell(4, 1, False, 0.69, 0.22, seed=1),
    ]  # the study has its own seed-1 cell
    rows = privacy_table.study_rows(study, own, grid)
    assert rows == own + [grid[0], grid[2]]


def test_a_study_with_more_passes_has_its_own_cells_and_the_same_sent_vectors(tiny_bert, tmp_path):
    grid = _tiny_grid(tiny_bert, tmp_path)
    one = privacy_table.CtiStudy(str(tiny_bert), 1, seeds=(0,), off_ratios=(4,), cti_ratios=(), cti_rows=())
    two = replace(one, epochs=2, folder="two")
    rescaled = replace(one, rescale=True, folder="rescaled")
    first, second, third = (privacy_table.study_tasks(s, tmp_path / s.folder) for s in (one, two, rescaled))
    assert [t.settings["epochs"] for t in first + second] == [1, 2]
    assert first[0].signature != second[0].signature and second[0].name.endswith("_R4_off_e2")
    assert privacy_table.study_tasks(two, tmp_path / "two", shared=first) == second  # nothing shared across passes
    assert third[0].name.endswith("_R4_off_rescaled") and third[0].signature not in {
        first[0].signature,
        second[0].signature,
    }
    privacy_table.run_tasks(grid, first + second + third, workers=1)
    (a,), (b,), (c,) = (privacy_table.load_cells(tmp_path / s.folder) for s in (one, two, rescaled))
    assert (a["epochs"], b["epochs"], c["epochs"]) == (1, 2, 1) and (a["rescale"], c["rescale"]) == (False, True)
    assert c["eta"] == a["eta"]  # the same d_chi noise; only what is done with it before sending differs
    # a frozen bottom sends each example once, whatever the passes: the attacks see the same vectors
    assert a["eia_recovery"] == b["eia_recovery"] and a["aia_accuracy"] == b["aia_accuracy"]
