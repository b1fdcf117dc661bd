"""TopService: the provider's top model as the user's training loop sees it, remote or in-process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass(frozen=True)
class ServerInfo:
    protocol_version: int
    model_id: str
    family: str
    model_type: str
    split: int
    total_blocks: int
    hidden_size: int
    peft: str
    bottom_sha256: str


@dataclass(frozen=True)
class SessionSpec:
    """What a user asks for when it opens a training session."""

    num_labels: int
    learning_rate: float = 5e-4
    seed: int = 0
    train_bottom: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {self.num_labels}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class BackwardResult:
    applied_step: int
    replayed: bool
    grad_hidden: torch.Tensor | None  # (B, T, H) when the session trains the bottom


class TopService(Protocol):
    """Remote (gRPC, sap_client.remote) and local (sap_server.local) implementations share this."""

    def server_info(self) -> ServerInfo: ...

    def download_bottom(self, destination: Path) -> None:
        """Write the bottom bundle's files into the (empty) folder destination."""

    def open_session(self, spec: SessionSpec) -> str: ...

    def forward(self, session_id: str, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Training forward of step: hidden (B, T, H), mask (B, T) -> logits (B, C)."""

    def backward(self, session_id: str, step: int, grad_logits: torch.Tensor) -> BackwardResult: ...

    def evaluate(self, session_id: str, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Inference forward: no graph kept, nothing changes."""

    def close_session(self, session_id: str) -> int:
        """Close the session; returns the number of optimizer steps it applied."""

    def finish_session(self, session_id: str) -> str:
        """Close the session keeping its trained adapter on the provider; returns the adapter id."""

    def attach_adapter(self, adapter_id: str) -> tuple[str, int]:
        """Open a session on a kept adapter (e.g. from a new process); returns (session id, num_labels)."""
