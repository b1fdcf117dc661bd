"""The privacy statement of a run: the formal part per split, the label exposure, the audit figures (no gRPC)."""

from __future__ import annotations

import math

import pytest

from sap_client.statement import audit_summary, median_token_distance, privacy_statement, render_statement
from sap_common.models.registry import load_model
from sap_common.models.split import split_base


def _statement(**changes):
    settings = dict(
        model="tiny",
        split=0,
        eta=2.0,
        eta_max=None,
        cti=None,
        rescale_norm=None,
        noise_observations="one per example",
        epochs=3,
        median_distance=1.5,
    )
    return privacy_statement(**{**settings, **changes})


def test_k0_gives_the_metric_dp_statement_and_fresh_noise_composes():
    once = _statement()
    assert once["epsilon_per_unit_distance"] == 2.0 and once["epsilon_median_pair"] == pytest.approx(3.0)
    assert once["observations"] == 1
    fresh = _statement(noise_observations="fresh noise every epoch")
    assert fresh["observations"] == 3 and fresh["epsilon_median_pair"] == pytest.approx(9.0)  # 3 draws: 3 x eta x d
    cti = _statement(cti="scale", eta_max=5.0)
    assert cti["epsilon_per_unit_distance"] == 5.0  # the weakest noise a token gets sets the bound


def test_a_trainable_bottom_under_keyed_noise_gets_no_bound_across_its_epochs():
    """The same noise on each epoch's moved bottom: the difference of two sendings has no noise, so no epsilon."""
    moved = _statement(noise_observations="one per step (trainable bottom)")
    assert "no formal per-token guarantee" in moved["formal"] and "epsilon_median_pair" not in moved
    assert "noise cancelled" in moved["observations_why"]


def test_deeper_splits_and_no_noise_say_there_is_no_formal_guarantee():
    assert "no formal per-token guarantee" in _statement(split=4)["formal"]
    assert "epsilon_median_pair" not in _statement(split=4)
    assert _statement(eta=None)["mechanism"] == "none"
    assert "not protected at all" in _statement(split=2, cti="exempt")["formal"]


def test_the_markdown_names_the_label_exposure_and_quotes_an_audit(tmp_path):
    text = render_statement(_statement(split=6))
    assert "every training label is readable by the provider" in text
    assert "number of tokens of every text" in text and "No audit has been run" in text
    report = {
        "source": "simulated",
        "attack": "sequential",
        "eia_token_recovery": 0.9,
        "eia_tokens": 100,
        "eia_token_recovery_content": 0.8,
        "eia_privacy": 0.1,
        "examples": 8,
        "eia_attacks": {"optimization": {"recovery": 0.5}, "sequential": {"recovery": 0.9}},
    }
    with_audit = render_statement(_statement(split=6, audit=audit_summary(report)))
    assert "sequential) recovered 90.0% of 100 tokens" in with_audit and "optimization 50.0%" in with_audit


def test_a_generative_statement_quotes_its_audit_with_the_targets_read():
    """sap-client audit on a generative run adds its figures to privacy.md, the target tokens read from the
    recorded gradients among them; before that, the statement says how to run it on the run's JSONL."""
    plain = render_statement(_statement(split=6, generative=True))
    assert "sap-client audit DATA.jsonl --run RUN_DIR" in plain and "**Targets**" in plain
    assert "**Generation**" in plain and "Prediction queries" not in plain and "**Labels**" not in plain
    report = {
        "source": "recorded traffic",
        "attack": "sequential",
        "eia_token_recovery": 0.99,
        "eia_tokens": 300,
        "eia_privacy": 0.01,
        "eia_attacks": {"sequential": {"recovery": 0.99}},
        "targets_read": 0.72,
        "target_tokens": 1189,
    }
    audited = render_statement(_statement(split=6, generative=True, audit=audit_summary(report)))
    assert "sequential) recovered 99.0% of 300 tokens" in audited
    assert "Target tokens read from the recorded gradients: 72.0% of 1189." in audited
    assert "No audit has been run" not in audited


def test_median_token_distance_of_a_tiny_model(tiny_model):
    bottom, _ = split_base(load_model(str(tiny_model)).base, 0)
    distance = median_token_distance(bottom)
    assert math.isfinite(distance) and distance > 0
