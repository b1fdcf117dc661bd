"""BitFit: train only the bias terms of the top blocks.

Bias-free architectures (Llama, Qwen, Mistral) have no bias terms to train, so every linear layer
of a top block without one gets a zero-initialised bias vector first: the model's output is
unchanged at step 0 and BitFit then trains those vectors (our choice, documented in the README).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def apply_bitfit(blocks: Sequence[nn.Module]) -> None:
    """Make every bias of the blocks trainable, adding zero biases to bias-free linear layers."""
    for block in blocks:
        for module in block.modules():
            if isinstance(module, nn.Linear) and module.bias is None:
                weight = module.weight
                module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
        for name, param in block.named_parameters():
            param.requires_grad_(name.endswith("bias"))
