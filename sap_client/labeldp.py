"""Label differential privacy (`sap-client train --label-epsilon EPS`): the user trains on randomized labels.

Every gradient the user returns is a function of the label it trained on, and the provider reads that label back
from it (sap_client/audit/labels.py). Randomized response replaces each training label once, before training, so
what the provider can read is the randomized label: epsilon-label-DP (for any two labels y, y' and any output o,
P[o | y] <= e^epsilon P[o | y']), whatever the provider computes from the gradients afterwards.

- rr: keep the label with probability e^eps / (e^eps + K - 1), else one of the other K - 1 uniformly.
- rr-prior (RRWithPrior, Ghazi et al., "Deep Learning with Label Differential Privacy", NeurIPS 2021): randomize
  within the k most likely classes of a prior, k chosen to maximize the chance of a correct output; for a skewed
  prior it keeps more labels at the same epsilon. The prior here is the training split's class frequencies: that
  is itself computed from the labels and not randomized, so the guarantee holds for a prior treated as public.

Each example's draw comes from a generator keyed by the run's secret and the example (its position in the training
split and its text), so a resumed run trains on the same randomized labels and the provider cannot redraw them.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

import torch

MECHANISMS = ("rr", "rr-prior")


def keep_probability(epsilon: float, classes: int) -> float:
    """P[the randomized label is the true one] for randomized response over `classes` labels."""
    return math.exp(epsilon) / (math.exp(epsilon) + classes - 1)


def prior_classes(prior: list[float], epsilon: float) -> list[int]:
    """RRWithPrior's candidate set: the k classes of largest prior, k maximizing sum(prior over them) x
    keep_probability(epsilon, k)."""
    order = sorted(range(len(prior)), key=lambda c: (-prior[c], c))
    best, best_score = 1, -1.0
    for k in range(1, len(prior) + 1):
        score = sum(prior[c] for c in order[:k]) * keep_probability(epsilon, k)
        if score > best_score + 1e-15:
            best, best_score = k, score
    return order[:best]


@dataclass(frozen=True)
class LabelRandomization:
    labels: list[int]  # what training uses
    flipped: int  # how many differ from the true labels
    keep_probability: float  # the mechanism's P[kept] for a label inside its candidate set
    candidates: list[int]  # the classes a randomized label can take


def randomize_labels(
    labels: list[int],
    texts: list[str],
    classes: int,
    epsilon: float,
    key: bytes,
    mechanism: str = "rr",
) -> LabelRandomization:
    """Each label replaced once by its randomized response (see the module docstring)."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"label epsilon must be a finite number > 0, got {epsilon!r}")
    if mechanism not in MECHANISMS:
        raise ValueError(f"label mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if classes < 2 or len(labels) != len(texts):
        raise ValueError(f"need >= 2 classes and one text per label, got {classes} and {len(texts)} for {len(labels)}")
    if mechanism == "rr-prior":
        counts = [labels.count(c) for c in range(classes)]
        candidates = prior_classes([n / len(labels) for n in counts], epsilon)
    else:
        candidates = list(range(classes))
    keep = keep_probability(epsilon, len(candidates))
    out = []
    for index, (label, text) in enumerate(zip(labels, texts, strict=True)):
        digest = hmac.new(key, f"sap-label-rr\0{index}\0{text}".encode(), hashlib.sha256).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        u, pick = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        if label in candidates:
            others = [c for c in candidates if c != label]
            out.append(label if u < keep or not others else others[min(int(pick * len(others)), len(others) - 1)])
        else:  # outside the prior's top classes: any candidate, uniformly
            out.append(candidates[min(int(pick * len(candidates)), len(candidates) - 1)])
    flipped = sum(a != b for a, b in zip(out, labels))
    return LabelRandomization(out, flipped, keep, candidates)
