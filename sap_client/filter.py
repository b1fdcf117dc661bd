"""The learned privacy filter (`sap-client train --learned-filter`): a map the user trains on its own machine, on its
own training texts, that sits between the bottom and the d_chi noise. What is sent is filter(h) + n instead of h + n.

The filter is trained before the first step, against an inversion model of the same kind as the audit's learned
inverter (a small transformer that reads tokens back from noised vectors), adversarially: the inversion model learns
to read the tokens of noised, filtered vectors while the filter, with a local task head, minimises the task loss on
them plus the inversion model's confusion (the cross-entropy of its guesses against the uniform distribution) plus
a term that keeps the filtered vectors near the bottom's (the provider's pretrained top must still read them). It
then stays frozen: each training text is sent once with its keyed noise, as with a frozen bottom.

What stays true: filter(h) has the norm of h, token by token, so the noise calibration (eta from --noise-ratio, the
measured noise/signal) and the d_chi statement, which holds for any input, hold for filter(h) as they do for h.
What is measured: the audit simulates the user's mechanism *with the filter* on its public text (a provider that
knows the filter's weights: Kerckhoffs' assumption), so its learned inverter is trained against exactly what is
sent; the optimization attack still inverts through the pretrained bottom alone. The filter is the user's secret
only in the sense that the run's noise key is; no privacy figure counts on its weights staying unknown.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from sap_client.audit.learned import InversionModel, LearnedConfig
from sap_client.data import TextDataset
from sap_client.privacy import Privatizer

if TYPE_CHECKING:
    from sap_client.trainer import SplitTrainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterConfig:
    """How the filter is trained (flags of `sap-client train --learned-filter`)."""

    steps: int = field(default=300, metadata={"help": "optimizer steps of the filter's training (local)"})
    privacy_weight: float = field(
        default=0.3, metadata={"help": "weight of the inversion model's confusion against the task loss"}
    )
    closeness_weight: float = field(
        default=1.0,
        metadata={"help": "weight of ||filter(h) - h||^2 / ||h||^2: keeps what is sent readable by the top"},
    )
    batch_size: int = 32
    lr: float = 1e-3  # the filter's
    head_lr: float = 1e-2  # the local task head's: a linear layer that must keep up with the filter
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        for name in ("privacy_weight", "closeness_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")


class LearnedFilter(nn.Module):
    """h (..., H) -> h + h D, rescaled to the norm of h token by token (D: H x H, zero at the start: the identity).
    A zero vector (padding) stays zero."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(hidden_size, hidden_size))

    def undo(self, sent: torch.Tensor) -> torch.Tensor:
        """The attacker's inverse of the linear map (up to each vector's scale, which the map's rescaling hides):
        sent (..., H) -> sent (I + D)^-1."""
        eye = torch.eye(self.delta.shape[0], dtype=torch.float64)
        inverse = torch.linalg.inv(eye + self.delta.detach().double())
        return (sent.double() @ inverse).to(sent.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mapped = hidden + hidden @ self.delta.to(hidden.dtype)
        scale = hidden.norm(dim=-1, keepdim=True) / mapped.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return mapped * scale


def _noised(
    filtered: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, privatizer: Privatizer | None, step: int, seed: int
) -> torch.Tensor:
    """filtered + the mechanism's noise, differentiable in filtered: a draw of its own for every step and row, from
    the seed (this never leaves the machine, and a run's filter can be trained again exactly)."""
    if privatizer is None or privatizer.eta is None:
        return filtered * mask.unsqueeze(-1).to(filtered.dtype)
    twin = privatizer.with_key(f"sap learned filter {seed}".encode())
    keys = [f"filter-training-{step}-{row}".encode() for row in range(filtered.shape[0])]
    sent = twin(filtered.detach(), mask, ids, None, keys)
    # straight through: d(sent)/d(filtered) = I on real tokens (exact for h + n; rescaling is treated as the identity)
    return filtered * mask.unsqueeze(-1).to(filtered.dtype) + (sent - filtered.detach() * mask.unsqueeze(-1)).detach()


def train_filter(
    trainer: SplitTrainer, data: TextDataset, privatizer: Privatizer | None, config: FilterConfig = FilterConfig()
) -> tuple[LearnedFilter, dict]:
    """Train a filter on data (the user's labelled training texts) through trainer's frozen bottom, under the
    mechanism of privatizer. Returns the filter (frozen, eval mode) and what its training measured at the end
    (the local inversion model's token accuracy and the local head's accuracy, on noised filtered vectors)."""
    if not data.labels:
        raise ValueError("the learned filter trains with the task's labels: the data has none")
    hidden_size = trainer.bottom.config.hidden_size
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    filter_ = LearnedFilter(hidden_size).to(trainer.device)
    head = nn.Linear(hidden_size, len(data.label_names)).to(trainer.device)
    limit = trainer.config.max_length
    token_ids = [trainer.tokenizer(text, truncation=True, max_length=limit)["input_ids"] for text in data.texts]
    known = torch.tensor(sorted({t for ids in token_ids for t in ids}))
    lookup = torch.full((int(known.max()) + 1,), -100, dtype=torch.long)
    lookup[known] = torch.arange(len(known))
    adversary = InversionModel(hidden_size, len(known), trainer.config.max_length, LearnedConfig()).to(trainer.device)
    groups: list[dict[str, Any]] = [
        {"params": list(filter_.parameters())},
        {"params": list(head.parameters()), "lr": config.head_lr},
    ]
    ours = torch.optim.AdamW(groups, lr=config.lr)
    theirs = torch.optim.AdamW(adversary.parameters(), lr=config.lr)
    labels = torch.tensor(data.labels)
    tail: list[tuple[float, float]] = []
    with tqdm(total=config.steps, desc="learned filter", unit="step", disable=None, leave=False) as bar:
        for step in range(config.steps):
            picked = torch.randint(len(data), (min(config.batch_size, len(data)),), generator=generator).tolist()
            input_ids, mask = trainer.encode([data.texts[i] for i in picked])
            hidden = trainer.bottom_outputs(input_ids.to(trainer.device), mask.to(trainer.device))  # no graph
            target = lookup[input_ids.clamp(max=len(lookup) - 1)].masked_fill(~mask.bool(), -100).to(trainer.device)
            mask = mask.to(trainer.device)
            sent = _noised(filter_(hidden), mask, input_ids, privatizer, step, config.seed)

            adversary.train()
            read = adversary(sent.detach(), mask)
            adversary_loss = F.cross_entropy(read.reshape(-1, len(known)), target.reshape(-1), ignore_index=-100)
            theirs.zero_grad(set_to_none=True)
            adversary_loss.backward()
            theirs.step()

            weights = mask.unsqueeze(-1).to(sent.dtype)
            pooled = (sent * weights).sum(1) / weights.sum(1)
            logits = head(pooled)
            task_loss = F.cross_entropy(logits, labels[picked].to(trainer.device))
            read = adversary(sent, mask)
            # confusion, not the adversary's loss reversed: push its guesses towards uniform over the known tokens
            # (bounded; reversing its cross-entropy rewards confidently wrong guesses and drifts without end)
            confusion = -F.log_softmax(read, dim=-1).mean(-1)[mask.bool()].mean()
            filtered = filter_(hidden)
            drift = ((filtered - hidden).pow(2).sum(-1) / hidden.pow(2).sum(-1).clamp_min(1e-12))[mask.bool()].mean()
            loss = task_loss + config.privacy_weight * confusion + config.closeness_weight * drift
            ours.zero_grad(set_to_none=True)
            loss.backward()
            ours.step()

            real = target != -100
            tokens_read = (read.argmax(-1) == target)[real].float().mean().item()
            task_right = (logits.argmax(-1) == labels[picked].to(trainer.device)).float().mean().item()
            tail = (tail + [(tokens_read, task_right)])[-50:]
            bar.update()
            bar.set_postfix(read=f"{tokens_read:.2f}", task=f"{task_right:.2f}", drift=f"{drift.item():.3f}")
    filter_.requires_grad_(False)
    filter_.eval()
    measured = {
        "steps": config.steps,
        "privacy_weight": config.privacy_weight,
        "closeness_weight": config.closeness_weight,
        "local_inversion_token_accuracy": sum(t for t, _ in tail) / len(tail),
        "local_task_accuracy": sum(a for _, a in tail) / len(tail),
        "drift": drift.item(),
    }
    log.info(
        "learned filter: the local inversion model reads %.1f%% of tokens, the local head %.1f%% right, drift %.3f "
        "(last %d steps)",
        100 * measured["local_inversion_token_accuracy"],
        100 * measured["local_task_accuracy"],
        measured["drift"],
        len(tail),
    )
    return filter_, measured
