"""TopService: the provider's top model as the user's training loop sees it, remote or in-process."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from sap_common.errors import InvalidInputError

# gRPC metadata (the wire contract besides sap.proto). Every call of a session after OpenSession carries the
# secret OpenSession returned; with `sap-server --api-keys`, GetServerInfo, DownloadBottom and OpenSession
# carry `authorization: Bearer KEY`.
SESSION_SECRET_METADATA = "sap-session-secret"
# The session's id beside its secret on every call of a session, so that a router in front of several replicas
# (sap_cluster) can route a call without reading its body; a server refuses a call whose body names another session.
SESSION_ID_METADATA = "sap-session-id"
API_KEY_METADATA = "authorization"
API_KEY_SCHEME = "Bearer"

DEFAULT_LEARNING_RATE = 5e-4  # AdamW, top and bottom: the client's --lr default and the server's when none is sent
# What a session's Forward can return (sap.proto's Output): the task head's logits; the pooled representation the
# head would read (last real token for decoders, first token for encoders, after the final norm); or the packed
# output (N_real, H) of the top's last block, which the user's own tail blocks continue from (--user-tail).
OUTPUTS = ("logits", "pooled", "hidden")
MAX_NUM_LABELS = 4096  # a session's classification head is (hidden, num_labels): keep a request from asking for GBs


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
    start_adapters: tuple[str, ...] = ()  # noise-robust starting adapters offered (sap_server/robust.py)


@dataclass(frozen=True)
class SessionSpec:
    """What a user asks for when it opens a training session."""

    num_labels: int
    learning_rate: float = DEFAULT_LEARNING_RATE
    seed: int = 0
    train_bottom: bool = False
    weight_decay: float = 0.0
    output: str = "logits"  # what Forward returns: "logits" (B, C), "pooled" (B, H) or "hidden" (N_real, H)
    user_tail: int = 0  # output "hidden": the model's last user_tail blocks run on the user's side, not here
    start_adapter: str = ""  # one of ServerInfo.start_adapters: the top's PEFT weights start from it

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.output != "logits" and self.num_labels != 0:
            raise ValueError(
                f"a {self.output} session has no head on the provider: num_labels must be 0, got {self.num_labels}"
            )
        if self.user_tail < 0 or (self.user_tail and self.output != "hidden"):
            raise ValueError(f"user_tail must be 0, or >= 1 with output 'hidden'; got {self.user_tail}")
        if self.output == "logits" and not 2 <= self.num_labels <= MAX_NUM_LABELS:
            raise ValueError(f"num_labels must be in 2..{MAX_NUM_LABELS}, got {self.num_labels}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):  # NaN fails both
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class BackwardResult:
    applied_step: int
    replayed: bool
    grad_hidden: torch.Tensor | None  # (N_real, H), the real tokens packed, when the session trains the bottom
    # The provider checkpointed the session at applied_step before answering: the client checkpoints its own
    # side before it sends the next step (see sap.proto, BackwardReply.checkpointed).
    checkpointed: bool = False


class Generation(Protocol):
    """One sequence generated through the split (TopService.generation): each piece of privatized vectors (n, H) of
    the sequence's next positions goes in, the top's last block at those positions (n, H) comes back. The
    provider keeps a key/value cache of the earlier positions until close (or its --generation-timeout)."""

    def step(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...

    def __enter__(self) -> Generation: ...

    def __exit__(self, *exc) -> None: ...


class TopService(Protocol):
    """Remote (gRPC, sap_client.remote) and local (sap_server.local) implementations share this.

    A session is named by its id; over the wire every call of a session also carries the session's
    secret, which the remote implementation keeps per session and attaches by itself (in-process there is
    no wire to guard, so the local implementation has none).
    """

    def server_info(self) -> ServerInfo: ...

    def download_bottom(self, destination: Path, tail_blocks: int = 0, lm_head: bool = False) -> None:
        """Write the bottom bundle's files into the (empty) folder destination; with tail_blocks M > 0, the tail
        bundle's instead (the model's last M blocks and final norm, for a --user-tail session); with lm_head, the
        tail bundle with what makes next-token logits too (a decoder's final norm and untied LM head; M may be 0)."""

    def open_session(self, spec: SessionSpec) -> str: ...

    def forward(
        self, session_id: str, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor, *, output: str = "logits"
    ) -> torch.Tensor:
        """Training forward of step: hidden (B, T, H), mask (B, T) -> logits (B, C), or pooled (B, H) or packed
        hidden states (N_real, H) for a session opened with that output (output must name the session's)."""

    def backward(self, session_id: str, step: int, grad_logits: torch.Tensor) -> BackwardResult:
        """dL/d(what forward returned) of step; the step is applied once."""

    def evaluate(
        self, session_id: str, hidden: torch.Tensor, attention_mask: torch.Tensor, *, output: str = "logits"
    ) -> torch.Tensor:
        """Inference forward: no graph kept, nothing changes."""

    def generation(self, session_id: str) -> Generation:
        """Start generating one sequence on a session whose top returns packed hidden states (see Generation)."""

    def close_session(self, session_id: str) -> int:
        """Close the session; returns the number of optimizer steps it applied."""

    def resume_session(self, session_id: str, step: int) -> int:
        """Bring the session back to `step` (a provider checkpoint, or the live state when it is exactly there);
        returns the step. A provider without that step refuses (StepOrderError naming the steps it has)."""

    def finish_session(self, session_id: str) -> str:
        """Close the session keeping its trained adapter on the provider; returns the adapter id."""

    def attach_adapter(self, adapter_id: str) -> tuple[str, int]:
        """Open a session on a kept adapter (e.g. from a new process); returns (session id, num_labels)."""

    def session_secret(self, session_id: str) -> str | None:
        """The secret this service attaches to the session's calls (None when it needs none: in-process).
        A client that must reconnect to the same session from another process keeps it with the session id."""

    def use_session(self, session_id: str, secret: str | None) -> None:
        """Adopt a session opened elsewhere (its id and secret, e.g. kept by an earlier process)."""


def read_credentials_file(path: Path, what: str) -> bytes:
    """The bytes of a credentials file (API keys, TLS certificate, key or CA), or InvalidInputError that names
    the file and what it was for; used by both sap-server and sap-client."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise InvalidInputError(f"{what}: {path} is empty")
    return data
