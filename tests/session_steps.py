"""Training steps driven straight through a TopService (no bottom, no text): hidden states, mask and
labels drawn from (seed, step) alone, so two runs of the same steps are comparable bit for bit."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from sap_common.service import BackwardResult

HIDDEN, NUM_LABELS, BATCH, LENGTH = 32, 2, 4, 6  # the tiny models' hidden size; a small batch


def batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (B, T, H), right-padded mask (B, T), labels (B,) of one step, from (seed, step) alone."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    hidden = torch.randn(BATCH, LENGTH, HIDDEN, generator=g)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[0, -2:] = 0
    return hidden, mask, torch.randint(0, NUM_LABELS, (BATCH,), generator=g)


def step(service, session_id: str, seed: int, step_number: int) -> BackwardResult:
    """Forward and Backward of one step; asserts it was applied (not replayed) and returns the reply."""
    hidden, mask, labels = batch(seed, step_number)
    logits = service.forward(session_id, step_number, hidden, mask).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
    result = service.backward(session_id, step_number, grad)
    assert (result.applied_step, result.replayed) == (step_number, False)
    return result
