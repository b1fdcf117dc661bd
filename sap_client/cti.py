"""Contributing token identification (CTI, docs/DESIGN.md section 3): per-class token importance -> per-token eta."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CTI_MODES = ("scale", "exempt")
_FORMAT = "sap-cti-counts"
_VERSION = "1"


@dataclass
class CtiStatistics:
    """Token counts per class from the user's training split; they never leave the client."""

    counts: torch.Tensor  # (C, V) int64

    def __post_init__(self) -> None:
        if not isinstance(self.counts, torch.Tensor) or self.counts.dim() != 2:
            raise ValueError(f"counts must be a 2-D (classes, vocab) tensor, got {self.counts!r:.80}")
        if self.counts.dtype != torch.int64:
            raise ValueError(f"counts must be int64, got {self.counts.dtype}")
        if self.counts.shape[0] < 1 or self.counts.shape[1] < 1:
            raise ValueError(f"counts must have at least one class and one token, got shape {tuple(self.counts.shape)}")
        if (self.counts < 0).any():
            raise ValueError(f"counts must be non-negative, got {self.counts.min().item()}")
        if self.counts.sum() == 0:
            raise ValueError("counts are all zero: no training tokens were counted")

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.counts.shape[1])

    def importance(self) -> torch.Tensor:
        """UI[c,t] = sum_{k != c} ln(freq[c,t] / (freq[k,t] + 3 xi)) where count[c,t] > 0, else 0. (C, V) float64."""
        counts = self.counts.to(torch.float64)
        totals = counts.sum(dim=1, keepdim=True)  # (C, 1): S_c
        freq = counts / totals.clamp_min(1.0)  # a class with no tokens has freq 0 everywhere
        xi = 1.0 / totals.max().item()
        log_denom = torch.log(freq + 3.0 * xi)  # (C, V): ln(freq[k,t] + 3 xi)
        others = log_denom.sum(dim=0, keepdim=True) - log_denom  # (C, V): sum over k != c
        seen = self.counts > 0
        log_freq = torch.log(torch.where(seen, freq, torch.ones_like(freq)))
        ui = (self.num_classes - 1) * log_freq - others
        return torch.where(seen, ui, torch.zeros_like(ui))

    def save(self, path: Path) -> None:
        """Write the counts as one safetensors file (no pickle)."""
        save_file({"counts": self.counts.contiguous()}, str(path), metadata={"format": _FORMAT, "version": _VERSION})

    @classmethod
    def load(cls, path: Path) -> CtiStatistics:
        """Read statistics written by `save`."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
                raise ValueError(
                    f"{path} is not a CTI statistics file (format {meta.get('format')!r}, "
                    f"version {meta.get('version')!r}; expected {_FORMAT!r} {_VERSION!r})"
                )
            if "counts" not in set(f.keys()):
                raise ValueError(f"{path} has no 'counts' tensor")
            return cls(counts=f.get_tensor("counts"))


def _as_int_tensor(values: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
    if len(values) == 0:
        return torch.zeros(0, dtype=torch.int64)
    t = torch.as_tensor(values)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{what} must be integers, got dtype {t.dtype}")
    return t.reshape(-1).to(torch.int64)


def fit_cti(
    token_ids: Sequence[Sequence[int]],
    labels: Sequence[int],
    *,
    num_classes: int,
    vocab_size: int,
    ignore_ids: Collection[int] = (),
) -> CtiStatistics:
    """Count each token id per class over the training texts; ids in `ignore_ids` (e.g. padding) are skipped."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size!r}")
    if len(token_ids) != len(labels):
        raise ValueError(f"got {len(token_ids)} texts but {len(labels)} labels")
    label_t = _as_int_tensor(labels, "labels")
    bad = (label_t < 0) | (label_t >= num_classes)
    if bad.any():
        raise ValueError(f"label {label_t[bad][0].item()} is outside [0, {num_classes})")
    ignore = torch.tensor(sorted(int(i) for i in ignore_ids), dtype=torch.int64)
    flat_ids, flat_classes = [], []
    for ids, label in zip(token_ids, label_t.tolist()):
        ids_t = _as_int_tensor(ids, "token ids")
        ids_t = ids_t[~torch.isin(ids_t, ignore)]
        bad = (ids_t < 0) | (ids_t >= vocab_size)
        if bad.any():
            raise ValueError(f"token id {ids_t[bad][0].item()} is outside [0, {vocab_size})")
        flat_ids.append(ids_t)
        flat_classes.append(torch.full_like(ids_t, label))
    if not flat_ids:
        raise ValueError("no training texts given")
    index = torch.cat(flat_classes) * vocab_size + torch.cat(flat_ids)
    counts = torch.bincount(index, minlength=num_classes * vocab_size).reshape(num_classes, vocab_size)
    return CtiStatistics(counts=counts)


def _exempt_rows(stats: CtiStatistics, eta_base: float, top: float) -> torch.Tensor:
    """Per class, eta = inf for the max(1, floor(top * n_seen)) seen tokens of highest UI, eta_base elsewhere."""
    ui = stats.importance()
    rows = torch.full(ui.shape, eta_base, dtype=torch.float64)
    for c in range(stats.num_classes):
        seen = torch.nonzero(stats.counts[c] > 0).flatten()  # ascending token ids
        if seen.numel() == 0:
            continue
        # The small slack keeps e.g. 0.29 * 100 = 28.999... from rounding down to 28.
        n_exempt = max(1, math.floor(top * seen.numel() + 1e-9))
        # Stable sort on ascending ids: equal UI keeps the smaller id first.
        order = torch.sort(ui[c, seen], descending=True, stable=True).indices
        rows[c, seen[order[:n_exempt]]] = math.inf
    return rows


def eta_table(
    stats: CtiStatistics, eta_base: float, *, mode: str = "scale", floor: float = 0.6, top: float = 0.1
) -> torch.Tensor:
    """(C + 1, V) float64 eta per (class, token); row C is the max over classes, for unlabeled text.

    "scale": eta = max(UI, floor) * eta_base. "exempt": the top fraction of each class's seen tokens by UI
    get eta = inf (no noise), the rest eta_base.
    """
    if (
        isinstance(eta_base, bool)
        or not isinstance(eta_base, (int, float))
        or not math.isfinite(eta_base)
        or eta_base <= 0
    ):
        raise ValueError(f"eta_base must be positive and finite, got {eta_base!r}")
    if mode not in CTI_MODES:
        raise ValueError(f"mode must be one of {CTI_MODES}, got {mode!r}")
    if not math.isfinite(floor) or floor <= 0:
        raise ValueError(f"floor must be positive and finite, got {floor!r}")
    if not math.isfinite(top) or not 0 < top <= 1:
        raise ValueError(f"top must be in (0, 1], got {top!r}")
    if mode == "scale":
        rows = stats.importance().clamp_min(floor) * float(eta_base)
    else:
        rows = _exempt_rows(stats, float(eta_base), top)
    return torch.cat([rows, rows.max(dim=0, keepdim=True).values], dim=0)


def token_eta(table: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """(B, T) eta per token: row labels[b] for a labelled example, the last (unlabeled) row when labels is None."""
    if table.dim() != 2 or table.shape[0] < 2:
        raise ValueError(f"table must be (classes + 1, vocab), got shape {tuple(table.shape)}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    num_classes, vocab_size = table.shape[0] - 1, table.shape[1]
    ids = input_ids.to(device=table.device, dtype=torch.int64)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise ValueError(f"token id {ids[bad][0].item()} is outside [0, {vocab_size})")
    if labels is None:
        rows = torch.full((ids.shape[0],), num_classes, dtype=torch.int64, device=table.device)
    else:
        rows = labels.to(device=table.device, dtype=torch.int64).reshape(-1)
        if rows.shape[0] != ids.shape[0]:
            raise ValueError(f"got {rows.shape[0]} labels for a batch of {ids.shape[0]}")
        bad = (rows < 0) | (rows >= num_classes)
        if bad.any():
            raise ValueError(f"label {rows[bad][0].item()} is outside [0, {num_classes})")
    return table[rows.unsqueeze(1), ids].to(input_ids.device)  # (B, T)
