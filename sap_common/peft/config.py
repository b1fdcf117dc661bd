"""PeftConfig: which PEFT method trains the provider's top, and its hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

PEFT_METHODS = ("lora", "bitfit", "adapter")


@dataclass
class PeftConfig:
    method: str = field(default="lora", metadata={"help": "lora, bitfit or adapter"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    adapter_size: int = field(default=64, metadata={"help": "bottleneck width of each Houlsby adapter"})

    def __post_init__(self) -> None:
        if self.method not in PEFT_METHODS:
            raise ValueError(f"peft method {self.method!r} is not supported; choose one of {', '.join(PEFT_METHODS)}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.adapter_size < 1:
            raise ValueError(f"adapter_size must be >= 1, got {self.adapter_size}")
