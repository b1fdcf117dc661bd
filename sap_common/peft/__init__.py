"""Parameter-efficient fine-tuning methods (LoRA, BitFit, Adapter): the provider's top blocks, and with
`sap-client train --user-tail M` the user's own tail blocks (LoRA)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sap_common.models.families import Family
from sap_common.peft.adapter import apply_adapters
from sap_common.peft.bitfit import apply_bitfit
from sap_common.peft.config import PEFT_METHODS, PeftConfig
from sap_common.peft.lora import apply_lora

__all__ = ["PEFT_METHODS", "PeftConfig", "apply_peft"]


def apply_peft(blocks: Sequence[nn.Module], family: Family, config: PeftConfig) -> None:
    """Freeze the blocks and add/unfreeze the method's trainable parameters, in place, block by block.

    The order of random draws depends only on the blocks' order, so applying this to the top
    blocks of a split model and to the same blocks of the unsplit model (after the same
    torch.manual_seed) gives identical initial weights.
    """
    for block in blocks:
        block.requires_grad_(False)
    if config.method == "lora":
        apply_lora(blocks, family, config)
    elif config.method == "bitfit":
        apply_bitfit(blocks)
    else:
        apply_adapters(blocks, family, config)
