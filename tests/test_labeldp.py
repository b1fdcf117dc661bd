"""Randomized response on training labels (sap_client/labeldp.py): the kept fraction is what the mechanism says, the
draws are keyed by the run's secret, and RRWithPrior keeps more of a skewed task's labels at the same epsilon."""

from __future__ import annotations

import math

import pytest

from sap_client.labeldp import keep_probability, prior_classes, randomize_labels

N = 20000


def _texts(n: int) -> list[str]:
    return [f"text {i}" for i in range(n)]


@pytest.mark.parametrize("epsilon, classes", [(1.0, 2), (2.0, 2), (4.0, 2), (2.0, 4)])
def test_randomized_response_keeps_labels_as_often_as_it_says(epsilon, classes):
    labels = [i % classes for i in range(N)]
    result = randomize_labels(labels, _texts(N), classes, epsilon, b"key")
    kept = 1 - result.flipped / N
    expected = math.exp(epsilon) / (math.exp(epsilon) + classes - 1)
    assert result.keep_probability == pytest.approx(expected)
    assert abs(kept - expected) < 4 * math.sqrt(expected * (1 - expected) / N)  # 4 standard errors
    # a flipped label goes to every other class alike
    flipped_to = [out for out, true in zip(result.labels, labels) if out != true and true == 0]
    for other in range(1, classes):
        share = flipped_to.count(other) / len(flipped_to)
        assert abs(share - 1 / (classes - 1)) < 0.05


def test_the_draws_are_keyed_by_the_runs_secret():
    labels = [i % 2 for i in range(500)]
    one = randomize_labels(labels, _texts(500), 2, 1.0, b"secret")
    assert one.labels == randomize_labels(labels, _texts(500), 2, 1.0, b"secret").labels  # a resume: the same
    assert one.labels != randomize_labels(labels, _texts(500), 2, 1.0, b"other").labels


def test_rr_with_prior_keeps_more_of_a_skewed_task():
    labels = [0 if i % 10 else 1 for i in range(N)]  # 90% class 0
    plain = randomize_labels(labels, _texts(N), 2, 1.0, b"k")
    prior = randomize_labels(labels, _texts(N), 2, 1.0, b"k", mechanism="rr-prior")
    # at epsilon 1, 0.9 x 1 > 1.0 x 0.731: RRWithPrior answers the majority class for every example
    assert prior.candidates == [0] and set(prior.labels) == {0}
    assert 1 - prior.flipped / N == pytest.approx(0.9, abs=1e-9)
    assert 1 - plain.flipped / N < 0.75
    # with a large epsilon both classes are candidates again
    assert prior_classes([0.9, 0.1], 4.0) == [0, 1]
    assert keep_probability(4.0, 2) == pytest.approx(math.exp(4) / (math.exp(4) + 1))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="epsilon"):
        randomize_labels([0, 1], _texts(2), 2, 0.0, b"k")
    with pytest.raises(ValueError, match="mechanism"):
        randomize_labels([0, 1], _texts(2), 2, 1.0, b"k", mechanism="laplace")
