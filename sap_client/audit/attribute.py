"""Attribute inference attack (AIA): predict a private attribute from the representations a provider receives.

The attacker holds a labelled auxiliary split, trains a small MLP on mean-pooled received hidden
states, and predicts the attribute of the victim split. Success = accuracy on the victim split,
reported beside the majority-class baseline; empirical privacy = 1 - accuracy.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H), attention_mask (B, T) -> the mean over real tokens (B, H)."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"attention_mask must be (B, T) = {tuple(hidden.shape[:2])}, got {tuple(attention_mask.shape)}"
        )
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, H)


def _check_split(name: str, features: torch.Tensor, labels: torch.Tensor) -> None:
    if features.dim() != 2 or features.shape[0] < 1:
        raise ValueError(f"{name}_features must be a non-empty (N, H) matrix, got shape {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"{name}_labels must be (N,) with N = {features.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name}_labels must be integer class ids, got dtype {labels.dtype}")


def attribute_inference(
    aux_features: torch.Tensor,
    aux_labels: torch.Tensor,
    victim_features: torch.Tensor,
    victim_labels: torch.Tensor,
    *,
    hidden: int = 64,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float | int]:
    """Train an MLP on the auxiliary split, predict the victim split.

    Features are standardised with statistics from the auxiliary split only. Labels are integer
    class ids (any values). Returns accuracy, baseline, privacy (= 1 - accuracy) and victims (M).
    The baseline is the majority class of the AUXILIARY split applied to the victim split: the best an
    attacker can do without looking at any representation (the victim labels are not the attacker's).
    """
    _check_split("aux", aux_features, aux_labels)
    _check_split("victim", victim_features, victim_labels)
    if victim_features.shape[1] != aux_features.shape[1]:
        raise ValueError(
            f"victim_features width {victim_features.shape[1]} differs from aux_features width {aux_features.shape[1]}"
        )
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive and finite, got {lr!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0 and finite, got {weight_decay!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")

    x_aux = aux_features.detach().float().cpu()  # (N, H)
    x_victim = victim_features.detach().float().cpu()  # (M, H)
    mean, std = x_aux.mean(0), x_aux.std(0, unbiased=False).clamp_min(1e-6)
    x_aux, x_victim = (x_aux - mean) / std, (x_victim - mean) / std

    classes, y_aux = torch.unique(aux_labels.detach().cpu(), return_inverse=True)  # classes (C,), y (N,)
    y_victim = victim_labels.detach().cpu()
    generator = torch.Generator().manual_seed(seed)
    model = _mlp(x_aux.shape[1], hidden, len(classes), generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in tqdm(range(epochs), desc="attribute inference", unit="epoch", disable=None):
        order = torch.randperm(x_aux.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x_aux[rows]), y_aux[rows]).backward()
            optimizer.step()

    model.eval()
    with torch.no_grad():
        predicted = classes[model(x_victim).argmax(-1)]  # (M,)
    majority = classes[torch.bincount(y_aux, minlength=len(classes)).argmax()]
    accuracy = (predicted == y_victim).float().mean().item()
    return {
        "accuracy": accuracy,
        "baseline": (y_victim == majority).float().mean().item(),
        "privacy": 1.0 - accuracy,
        "victims": int(y_victim.shape[0]),
    }


def _mlp(width: int, hidden: int, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    """One hidden layer, initialised from generator (Kaiming-uniform bounds, as nn.Linear)."""
    model = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    with torch.no_grad():
        layers: tuple[nn.Linear, nn.Linear] = (model[0], model[2])  # type: ignore[assignment]
        for layer in layers:
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    return model
