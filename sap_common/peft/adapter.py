"""Houlsby-style bottleneck adapters after the attention output and the MLP output of each top block."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sap_common.models.families import Family
from sap_common.peft.config import PeftConfig


class BottleneckAdapter(nn.Module):
    """y = proj(x); y + up(gelu(down(y))). up starts at zero, so the block is unchanged at step 0."""

    def __init__(self, projection: nn.Linear, size: int):
        super().__init__()
        self.projection = projection
        width = projection.out_features
        self.down = nn.Linear(width, size)
        self.up = nn.Linear(size, width)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        dtype, device = projection.weight.dtype, projection.weight.device
        self.down.to(device=device, dtype=dtype)
        self.up.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.projection(x)
        return y + self.up(nn.functional.gelu(self.down(y)))


def _wrap(block: nn.Module, path: str, size: int) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    setattr(parent, name, BottleneckAdapter(getattr(parent, name), size))


def apply_adapters(blocks: Sequence[nn.Module], family: Family, config: PeftConfig) -> None:
    """Add two adapters per block (after attention, after MLP); only adapter weights train."""
    for block in blocks:
        _wrap(block, family.attention_out, config.adapter_size)
        _wrap(block, family.mlp_out, config.adapter_size)
        for name, param in block.named_parameters():
            param.requires_grad_(".down." in f".{name}" or ".up." in f".{name}")
