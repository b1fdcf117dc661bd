"""Label inference: read the user's training labels back from the gradients the provider receives.

- Gradients of the logits (the present protocol): for cross-entropy dL/dlogits = (softmax - onehot(y)) / B, whose
  only negative entry is the label's: the sign rule reads every label exactly.
- Gradients of a hidden state (a user-kept head; Li et al., "Label Leakage and Protection in Two-party Split
  Learning", ICLR 2022): with a linear binary head dL/dh = (p - y)(w_1 - w_0) / B, every gradient lies on one
  line and its side is the label, up to one global flip. Direction scoring splits the gradients by the sign of
  their projection on the principal direction; norm scoring ranks them by norm (the rarer class, predicted with
  less confidence, has the larger gradients). The flip is resolved with the class prior the provider knows or
  guesses: the side holding the prior's majority share is the majority class.
- Clustering (any number of classes): the gradients of one label point alike; spherical k-means with one cluster
  per class, the clusters named by the class prior (largest cluster, most frequent class) or, for two classes, by
  a few examples whose labels the provider knows.
- With a user-kept tail (--user-tail M) the provider receives dL/dh at block L-M for every token: the row at the
  position the head reads (the last real token for decoders, the first for encoders) carries dL/dpooled through
  the tail's residual path, and the attacks above are run on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LABEL_ATTACKS = ("sign", "direction", "norm", "tracked", "clustering", "linked clustering")


def sign_rule(grad_logits: torch.Tensor) -> torch.Tensor:
    """(N, C) gradients of the logits -> (N,) labels: the column of the one negative entry."""
    if grad_logits.dim() != 2 or grad_logits.shape[1] < 2:
        raise ValueError(f"grad_logits must be (N, C) with C >= 2, got shape {tuple(grad_logits.shape)}")
    return grad_logits.argmin(dim=1)


def direction_scoring(gradients: torch.Tensor, majority_class: int = 0) -> torch.Tensor:
    """(N, D) gradients of a binary task -> (N,) labels in {0, 1}: the side of the principal direction; the side
    with more examples is named majority_class (the provider's prior)."""
    _check_binary_input(gradients, majority_class)
    rows = gradients.double()  # not centred: the gradients lie on a line through the origin
    direction = torch.linalg.svd(rows, full_matrices=False).Vh[0]  # (D,)
    side = (rows @ direction > 0).long()
    return _name_sides(side, majority_class)


def norm_scoring(gradients: torch.Tensor, minority_fraction: float, majority_class: int = 0) -> torch.Tensor:
    """(N, D) gradients of a binary task -> (N,) labels: the minority_fraction largest gradient norms are the
    minority class (1 - majority_class)."""
    _check_binary_input(gradients, majority_class)
    if not 0 < minority_fraction < 1:
        raise ValueError(f"minority_fraction must be in (0, 1), got {minority_fraction!r}")
    norms = gradients.double().norm(dim=1)
    count = round(minority_fraction * len(norms))
    labels = torch.full((len(norms),), majority_class, dtype=torch.long)
    labels[norms.topk(count).indices] = 1 - majority_class
    return labels


def tracked_sides(steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per training step, (B_t, D) gradients of a binary task -> (B_t,) sides in {0, 1} that mean the same in every
    step. Within a step every gradient lies on the line of w_1 - w_0 (Li et al.); the head moves between steps, so
    each step's principal direction is oriented to agree with the previous step's, which names the sides alike all
    through the run, up to one flip for the whole run (resolve it with name_sides)."""
    sides, previous = [], None
    for gradients in steps:
        if gradients.dim() != 2 or gradients.shape[0] < 1:
            raise ValueError(f"each step's gradients must be (B, D) with B >= 1, got {tuple(gradients.shape)}")
        rows = gradients.double()
        direction = torch.linalg.svd(rows, full_matrices=False).Vh[0]  # (D,)
        if previous is not None and float(direction @ previous) < 0:
            direction = -direction
        previous = direction
        sides.append((rows @ direction > 0).long())
    return sides


def name_clusters(clusters: torch.Tensor, prior: list[float]) -> torch.Tensor:
    """(N,) cluster indices in [0, len(prior)) -> labels: the largest cluster is the most frequent class, and so on."""
    by_size = torch.bincount(clusters, minlength=len(prior)).argsort(descending=True).tolist()
    by_prior = sorted(range(len(prior)), key=lambda c: -prior[c])
    name = torch.empty(len(prior), dtype=torch.long)
    for cluster, label in zip(by_size, by_prior):
        name[cluster] = label
    return name[clusters]


def gradient_clusters(gradients: torch.Tensor, classes: int, *, restarts: int = 8, iterations: int = 50):
    """(N, D) gradients -> (N,) cluster indices in [0, classes): spherical k-means on the gradients' directions (for
    a linear head dL/dh = W^T (p - onehot(y)) / B, so the examples of one label point alike, even through a
    user-kept tail that bends each example's gradient differently). Seeded restarts, the tightest kept. Name the
    clusters with name_clusters (the prior) or, for two classes, name_sides (the prior or a few known labels)."""
    if gradients.dim() != 2 or classes < 2 or gradients.shape[0] < classes:
        raise ValueError(
            f"gradients must be (N, D) with N >= {max(classes, 2)} for {classes} classes, got {tuple(gradients.shape)}"
        )
    rows = torch.nn.functional.normalize(gradients.double(), dim=1)
    generator = torch.Generator().manual_seed(0)
    best, best_score = None, -float("inf")
    for _ in range(restarts):
        centres = rows[torch.randperm(len(rows), generator=generator)[:classes]].clone()
        assign = torch.zeros(len(rows), dtype=torch.long)
        for _ in range(iterations):
            assign = (rows @ centres.T).argmax(1)
            updated = torch.stack(
                [rows[assign == c].sum(0) if bool((assign == c).any()) else centres[c] for c in range(classes)]
            )
            updated = torch.nn.functional.normalize(updated, dim=1)
            if torch.allclose(updated, centres):
                break
            centres = updated
        score = float((rows @ centres.T).max(1).values.sum())
        if score > best_score:
            best, best_score = assign, score
    assert best is not None
    return best


def linked_clusters(gradients: torch.Tensor, clusters: torch.Tensor, groups: torch.Tensor, classes: int):
    """(N, D) gradients, their (N,) clusters from gradient_clusters, and (N,) group ids -> (N,) clusters, every
    observation of a group given the one cluster whose centre the group's directions are nearest in sum (cosine).
    A group is one example the provider links by what it was sent: the same text gets the same keyed noise, so
    through a frozen bottom every epoch sends it identical vectors. Late in a run the gradients of well-fitted
    examples are small and bent off their label's direction; the same example's earlier ones outvote them."""
    if not (len(gradients) == len(clusters) == len(groups)):
        raise ValueError(f"{len(gradients)} gradients, {len(clusters)} clusters and {len(groups)} groups differ")
    rows = torch.nn.functional.normalize(gradients.double(), dim=1)
    centres = torch.stack([rows[clusters == c].sum(0) for c in range(classes)])  # an empty cluster's is zero
    similarity = rows @ torch.nn.functional.normalize(centres, dim=1).T  # (N, classes)
    ids, group = torch.unique(groups, return_inverse=True)
    summed = torch.zeros(len(ids), classes, dtype=similarity.dtype).index_add_(0, group, similarity)
    return summed.argmax(1)[group]


def name_sides(
    side: torch.Tensor, *, majority_class: int | None = None, known: Sequence[tuple[int, int]] | None = None
) -> torch.Tensor:
    """Sides (N,) in {0, 1} -> labels: by the class prior (the side with more examples is majority_class), or by a few
    examples whose labels the provider knows (known = [(index, label), ...]; the naming most of them agree with, so
    one known label that randomized response flipped in training does not turn the whole run around)."""
    if (majority_class is None) == (known is None):
        raise ValueError("name the sides by exactly one of majority_class and known")
    if known is not None:
        if not known or any(label not in (0, 1) for _, label in known):
            raise ValueError(f"known must be one or more (index, label) pairs with labels 0 or 1, got {known!r}")
        agree = sum(int(side[index]) == label for index, label in known)  # the naming side -> label
        label_of_side_1 = 1 if 2 * agree >= len(known) else 0
        return torch.where(side == 1, label_of_side_1, 1 - label_of_side_1).long()
    if majority_class not in (0, 1):
        raise ValueError(f"majority_class must be 0 or 1, got {majority_class!r}")
    return _name_sides(side, majority_class)


def _check_binary_input(gradients: torch.Tensor, majority_class: int) -> None:
    if gradients.dim() != 2 or gradients.shape[0] < 2:
        raise ValueError(f"gradients must be (N, D) with N >= 2, got shape {tuple(gradients.shape)}")
    if majority_class not in (0, 1):
        raise ValueError(f"majority_class must be 0 or 1, got {majority_class!r}")


def _name_sides(side: torch.Tensor, majority_class: int) -> torch.Tensor:
    larger = int(side.sum() * 2 > len(side))  # the side (0 or 1) holding more examples
    return torch.where(side == larger, majority_class, 1 - majority_class).long()


def label_inference(guesses: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int]:
    """The attack's accuracy on the true labels and the majority-class baseline (the best guess without gradients)."""
    if guesses.shape != labels.shape or labels.dim() != 1 or len(labels) < 1:
        raise ValueError(
            f"guesses and labels must be equal (N,) tensors, got {tuple(guesses.shape)} and {tuple(labels.shape)}"
        )
    counts = torch.bincount(labels.long())
    return {
        "label_inference_accuracy": float((guesses.long() == labels.long()).float().mean()),
        "label_inference_baseline": float(counts.max()) / len(labels),
        "label_inference_examples": len(labels),
    }
