"""Label inference from the gradients a provider receives (no gRPC): the sign rule on logits gradients, and
direction and norm scoring on the gradients of a user-kept linear head's input."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from sap_client.audit.labels import direction_scoring, label_inference, norm_scoring, sign_rule


def test_sign_rule_reads_every_label_from_cross_entropy_gradients():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=generator, requires_grad=True)
    labels = torch.randint(0, 5, (64,), generator=generator)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), logits)  # what Backward carries
    figures = label_inference(sign_rule(grad), labels)
    assert figures["label_inference_accuracy"] == 1.0
    assert figures["label_inference_baseline"] == torch.bincount(labels).max().item() / 64
    with pytest.raises(ValueError, match="C >= 2"):
        sign_rule(grad[:, :1])


def test_direction_scoring_reads_the_labels_of_a_user_kept_binary_head():
    """dL/dh = (p - y)(w_1 - w_0) / B: all on one line, the side is the label; the prior names the sides."""
    generator = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 2)
    pooled = torch.randn(100, 16, generator=generator, requires_grad=True)
    labels = (torch.rand(100, generator=generator) < 0.3).long()  # 30% positive: class 0 is the majority
    (grad,) = torch.autograd.grad(F.cross_entropy(head(pooled), labels), pooled)
    guesses = direction_scoring(grad, majority_class=0)
    assert label_inference(guesses, labels)["label_inference_accuracy"] == 1.0


def test_norm_scoring_names_the_largest_norms_the_minority():
    gradients = torch.tensor([[3.0, 0.0], [0.1, 0.0], [0.0, 2.5], [0.2, 0.1]])
    assert norm_scoring(gradients, 0.5, majority_class=0).tolist() == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="minority_fraction"):
        norm_scoring(gradients, 1.0)
