"""Label inference from the gradients a provider receives (no gRPC): the sign rule on logits gradients, and
direction and norm scoring on the gradients of a user-kept linear head's input, and clustering on those gradients
(any number of classes, through a user-kept tail, and linked across epochs by the vectors the provider was sent)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from sap_client.audit.labels import (
    direction_scoring,
    gradient_clusters,
    label_inference,
    linked_clusters,
    name_clusters,
    name_sides,
    norm_scoring,
    sign_rule,
    tracked_sides,
)


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


def test_tracked_sides_follow_a_moving_head_through_a_run():
    """A head trained step by step on balanced batches: each step's dL/dpooled lie on that step's w_1 - w_0, which
    turns as the head learns. Per-step sides agree from step to step, so one flip for the whole run (named by one
    known label) reads every label; naming each step's sides by its own majority does not."""
    generator = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(16, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    centre = torch.randn(2, 16, generator=generator)
    steps, truth = [], []
    for _ in range(40):
        labels = torch.randperm(8, generator=generator) % 2  # 4 of each class: no prior names a side
        pooled = (centre[labels] + torch.randn(8, 16, generator=generator)).requires_grad_(True)
        optimizer.zero_grad()
        loss = F.cross_entropy(head(pooled), labels)
        loss.backward()
        optimizer.step()
        steps.append(pooled.grad.clone())
        truth.append(labels)
    truth_all = torch.cat(truth)
    sides = torch.cat(tracked_sides(steps))
    guesses = name_sides(sides, known=[(0, int(truth_all[0]))])
    assert label_inference(guesses, truth_all)["label_inference_accuracy"] == 1.0
    untracked = torch.cat([direction_scoring(g, majority_class=0) for g in steps])  # each step flips at random
    assert label_inference(untracked, truth_all)["label_inference_accuracy"] < 0.8
    with pytest.raises(ValueError, match="exactly one"):
        name_sides(sides)


def test_a_few_known_labels_name_the_sides_when_one_of_them_was_randomized():
    """Under randomized response the gradients carry the label training used: a known true label that RR flipped
    names the whole run the wrong way round; the majority of a few known labels does not."""
    side = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])  # the side training used: side 1 is label 1
    used = side.clone()
    true = used.clone()
    true[0] = 0  # example 0's label was flipped by RR before training
    alone = name_sides(side, known=[(0, int(true[0]))])
    assert torch.equal(alone, 1 - used)
    several = name_sides(side, known=[(i, int(true[i])) for i in range(5)])
    assert torch.equal(several, used)
    with pytest.raises(ValueError, match="labels 0 or 1"):
        name_sides(side, known=[(0, 2)])
    with pytest.raises(ValueError, match="one or more"):
        name_sides(side, known=[])


def test_clustering_reads_the_labels_of_a_many_class_head_by_the_prior():
    """dL/dh = W^T (p - onehot(y)) / B: the gradients of one label point alike, for any number of classes; with an
    uneven prior the cluster sizes name the classes."""
    generator = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 4)
    prior = torch.tensor([0.4, 0.3, 0.2, 0.1])
    labels = torch.multinomial(prior, 400, replacement=True, generator=generator)
    pooled = torch.randn(400, 16, generator=generator, requires_grad=True)
    (grad,) = torch.autograd.grad(F.cross_entropy(head(pooled), labels), pooled)
    counts = torch.bincount(labels, minlength=4).double()
    guesses = name_clusters(gradient_clusters(grad, 4), (counts / counts.sum()).tolist())
    assert label_inference(guesses, labels)["label_inference_accuracy"] >= 0.99
    with pytest.raises(ValueError, match="N >= 4"):
        gradient_clusters(grad[:3], 4)


def test_clustering_reads_labels_through_a_user_kept_tail():
    """With a user-kept tail the provider receives dL/dh below a nonlinear block: each example's gradient is bent by
    its own Jacobian, so no longer on one line, but the residual path keeps the two labels' gradients apart. One
    known label names the two clusters of a balanced task (the prior cannot)."""
    generator = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    block = torch.nn.Sequential(
        torch.nn.LayerNorm(16), torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)
    )
    head = torch.nn.Linear(16, 2)
    labels = torch.randperm(200, generator=generator) % 2
    hidden = torch.randn(200, 16, generator=generator, requires_grad=True)
    logits = head(hidden + block(hidden))  # a residual block, then the head
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), hidden)
    clusters = gradient_clusters(grad, 2)
    guesses = name_sides(clusters, known=[(0, int(labels[0]))])
    assert label_inference(guesses, labels)["label_inference_accuracy"] >= 0.95


def test_linked_clustering_lets_an_examples_other_epochs_outvote_a_bent_gradient():
    """Each example is observed once per epoch; the one whose last gradient bent past the other label's side is
    misclustered alone, and put right by its earlier observations once they are linked."""
    e1, e2 = torch.eye(2)
    grad = torch.stack([e1, e1, e1, e1, -0.3 * e1 + e2, -e1, -e1, -e1, -e1, -e1 + 0.1 * e2])
    groups = torch.tensor([0, 1, 0, 1, 0, 2, 3, 2, 3, 2])  # example 0 is seen three times
    truth = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    clusters = gradient_clusters(grad, 2)
    alone = name_sides(clusters, known=[(0, 0)])
    assert alone[4] == 1 and (alone == truth).sum() == 9
    linked = name_sides(linked_clusters(grad, clusters, groups, 2), known=[(0, 0)])
    assert torch.equal(linked, truth)
    with pytest.raises(ValueError, match="differ"):
        linked_clusters(grad, clusters, groups[:3], 2)


def test_linked_clustering_reads_every_label_of_a_run_through_a_trained_tail():
    """Ten epochs of training a residual tail and a head, scaled so that the tail bends late gradients off their
    label's direction: linking each example's observations reads every label, and never fewer than clustering
    each observation alone."""
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    examples, width = 240, 16
    block = torch.nn.Sequential(
        torch.nn.LayerNorm(width), torch.nn.Linear(width, 64), torch.nn.GELU(), torch.nn.Linear(64, width)
    )
    head = torch.nn.Linear(width, 2)
    labels = torch.randperm(examples, generator=generator) % 2
    offset = torch.randn(1, width, generator=generator)
    hidden = torch.randn(examples, width, generator=generator) + 0.3 * (2 * labels[:, None] - 1) * offset
    optimizer = torch.optim.Adam([*block.parameters(), *head.parameters()], lr=3e-2)
    grads, seen = [], []
    for _ in range(10):
        for batch in torch.randperm(examples, generator=generator).split(24):
            sent = hidden[batch].clone().requires_grad_(True)
            loss = F.cross_entropy(head(sent + 3 * block(sent)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            grads.append(sent.grad)
            seen.append(batch)
    grad, groups = torch.cat(grads), torch.cat(seen)
    truth = labels[groups]
    clusters = gradient_clusters(grad, 2)
    alone = label_inference(name_sides(clusters, known=[(0, int(truth[0]))]), truth)["label_inference_accuracy"]
    linked = linked_clusters(grad, clusters, groups, 2)
    together = label_inference(name_sides(linked, known=[(0, int(truth[0]))]), truth)["label_inference_accuracy"]
    assert together >= 0.99 and together >= alone, (together, alone)
