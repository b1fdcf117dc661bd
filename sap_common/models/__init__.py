"""Model families, the split at block k, the bottom bundle, model aliases; set_training, which both sides use."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def set_training(module: nn.Module, mode: bool) -> None:
    """module.train(mode) only when it is in the other mode: train() walks every submodule, which for a small top
    at batch 1 cost more than a tenth of a forward, on every call. (Here, not in split.py: the client's command
    line imports this without loading transformers.)"""
    if module.training != mode:
        module.train(mode)
