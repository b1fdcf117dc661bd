"""LocalTopService: the TopService interface in-process, so the user's training loop runs without a network."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sap_common import codec
from sap_common.models.bundle import bundle_files
from sap_common.models.families import KVCache
from sap_common.service import BackwardResult, ServerInfo, SessionSpec
from sap_server.provider import Provider


class LocalTopService:
    """Calls the provider's sessions directly: the same code the gRPC servicer calls.

    In-process there is no wire to guard, so calls carry no session secret (session_secret is None)."""

    def __init__(self, provider: Provider):
        self.provider = provider

    def server_info(self) -> ServerInfo:
        return self.provider.info

    def download_bottom(self, destination: Path, tail_blocks: int = 0, lm_head: bool = False) -> None:
        if tail_blocks or lm_head:
            folder = self.provider.tail_bundle(tail_blocks, lm_head)
        else:
            folder = self.provider.bundle_dir
        for relative in bundle_files(folder):
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / relative, target)

    def open_session(self, spec: SessionSpec) -> str:
        session_id, _, _ = self.provider.sessions.open(spec)
        return session_id

    def forward(
        self, session_id: str, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor, *, output: str = "logits"
    ) -> torch.Tensor:
        with self.provider.sessions.use(session_id, None, check=False) as trainer:
            # packed as on the wire; the boolean index copies, so no graph or storage is shared with the user's
            return trainer.forward(step, *codec.pack_hidden(hidden, attention_mask), output)

    def backward(self, session_id: str, step: int, grad_logits: torch.Tensor) -> BackwardResult:
        sessions = self.provider.sessions
        with sessions.use(session_id, None, check=False) as session:
            return sessions.backward(session, step, grad_logits.detach().clone())

    def evaluate(
        self, session_id: str, hidden: torch.Tensor, attention_mask: torch.Tensor, *, output: str = "logits"
    ) -> torch.Tensor:
        with self.provider.sessions.use(session_id, None, check=False) as trainer:
            return trainer.evaluate(*codec.pack_hidden(hidden, attention_mask), output)

    def generation(self, session_id: str) -> LocalGeneration:
        self.provider.sessions.get(session_id)
        return LocalGeneration(self.provider, session_id)

    def close_session(self, session_id: str) -> int:
        return self.provider.close_session(session_id, None, keep=False, check=False).steps_applied

    def finish_session(self, session_id: str) -> str:
        return self.provider.close_session(session_id, None, keep=True, check=False).adapter_id

    def resume_session(self, session_id: str, step: int) -> int:
        self.provider.sessions.resume(session_id, None, step, check=False)
        return step

    def attach_adapter(self, adapter_id: str) -> tuple[str, int]:
        session_id, trainer, _ = self.provider.attach_adapter(adapter_id)
        return session_id, trainer.num_labels

    def session_secret(self, session_id: str) -> str | None:
        return None

    def use_session(self, session_id: str, secret: str | None) -> None:
        self.provider.sessions.get(session_id)  # only checks that it exists: in-process needs no secret


class LocalGeneration:
    """A generation in-process: the session's generate step with a cache of this object's own (as the servicer's
    Generate call keeps one per call)."""

    def __init__(self, provider: Provider, session_id: str):
        self.provider, self.session_id = provider, session_id
        self.cache: KVCache | None = KVCache()

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise ValueError("this generation is closed")
        with self.provider.sessions.use(self.session_id, None, check=False) as session:
            return session.generate(self.cache, hidden.detach().clone())

    def close(self) -> None:
        self.cache = None

    def __enter__(self) -> LocalGeneration:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
