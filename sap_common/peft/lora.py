"""LoRA on the attention projections of the top blocks, through the peft library."""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from sap_common.models.families import Family
from sap_common.peft.config import PeftConfig


def apply_lora(blocks: Sequence[nn.Module], family: Family, config: PeftConfig) -> None:
    """Inject rank-r LoRA into each block's attention projections; only the LoRA matrices train."""
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; the scale alpha / r takes floats
        lora_dropout=config.lora_dropout,
        target_modules=list(family.lora_targets),
        bias="none",
    )
    for block in blocks:
        inject_adapter_in_model(lora_config, block)
        for name, param in block.named_parameters():
            param.requires_grad_("lora_" in name)
