"""Sessions: one trainable top per user session over the provider's one shared, frozen top."""

from __future__ import annotations

import copy
import logging
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from sap_common.errors import ResourceLimitError, SessionNotFoundError
from sap_common.models.families import new_head
from sap_common.models.split import TopModel
from sap_common.recording import Recorder
from sap_common.service import SessionSpec
from sap_server.auth import check_session_secret, new_session_secret, require_secret
from sap_server.peft import PeftConfig, apply_peft
from sap_server.trainer import DEFAULT_MAX_BATCH_TOKENS, TopTrainer

log = logging.getLogger(__name__)


def build_session_top(template: TopModel, base: PreTrainedModel, peft: PeftConfig, num_labels: int,
                      seed: int) -> TopModel:
    """A session's top: frozen weights shared with template, fresh head (seeded) and PEFT parameters.

    Random draws: the head from its own generator seeded with `seed`; the PEFT parameters from
    the global generator re-seeded with `seed` inside fork_rng, so other threads are unaffected
    and the same seed always gives the same initial weights.
    """
    # Parameters that stay frozen are shared (memory per session is the adapter's, not the model's);
    # BitFit trains existing biases, so those must be copied.
    shared = {id(p): p for name, p in template.named_parameters()
              if not (peft.method == "bitfit" and name.endswith("bias"))}
    shared.update({id(b): b for b in template.buffers()})
    shared[id(template.config)] = template.config
    top = copy.deepcopy(template, memo=shared)
    # The head is drawn on the CPU in float32 (the same start on any device), then placed with the blocks.
    frozen = next(template.blocks.parameters())
    top.head = new_head(template.config, base, num_labels, torch.Generator().manual_seed(seed)).to(
        device=frozen.device, dtype=frozen.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        apply_peft(top.blocks, top.family, peft)  # new PEFT weights take each wrapped layer's device/dtype
    return top


@dataclass(frozen=True)
class ClosedSession:
    """What is left of a closed session: enough to answer a retried CloseSession with the same reply."""

    secret: str
    steps_applied: int
    adapter_id: str  # "" when the adapter was not kept


class SessionManager:
    """Creates, finds, authenticates and closes sessions; thread-safe."""

    CLOSED_KEPT = 4096  # closed sessions remembered (for retried closes), oldest forgotten first

    def __init__(self, template: TopModel, base: PreTrainedModel, peft: PeftConfig, *, max_sessions: int = 16,
                 recorder: Recorder | None = None, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.template = template.requires_grad_(False)
        self.base = base
        self.peft = peft
        self.max_sessions = max_sessions
        self.max_batch_tokens = max_batch_tokens
        self.recorder = recorder
        self._sessions: dict[str, TopTrainer] = {}
        self._closed: OrderedDict[str, ClosedSession] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, spec: SessionSpec, *, state: dict[str, torch.Tensor] | None = None,
             steps_applied: int = 0, secret: str | None = None) -> tuple[str, TopTrainer]:
        """A new session with a new random secret (trainer.secret; `secret` restores a saved one); with
        `state`, its trainable weights are restored from a stored adapter."""
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceLimitError(f"the server already holds {self.max_sessions} sessions "
                                         f"(--max-sessions); close one first")
            top = build_session_top(self.template, self.base, self.peft, spec.num_labels, spec.seed)
            session_id = secrets.token_hex(16)
            trainer = TopTrainer(top, learning_rate=spec.learning_rate, weight_decay=spec.weight_decay,
                                 train_bottom=spec.train_bottom, num_labels=spec.num_labels, seed=spec.seed,
                                 recorder=self.recorder, session_id=session_id,
                                 secret=secret or new_session_secret(), max_batch_tokens=self.max_batch_tokens)
            if state is not None:
                trainer.load_trainable_state(state, steps_applied)
            self._sessions[session_id] = trainer
        log.info("session %s… opened: %d labels, %d trainable parameters", session_id[:8], spec.num_labels,
                 trainer.trainable_parameters)
        return session_id, trainer

    def get(self, session_id: str) -> TopTrainer:
        """The session's trainer, without authentication (in-process callers; the servicer uses authenticate)."""
        with self._lock:
            trainer = self._sessions.get(session_id)
        if trainer is None:
            raise SessionNotFoundError(f"session {session_id[:8]!r}… is unknown or closed")
        return trainer

    def authenticate(self, session_id: str, secret: str | None) -> TopTrainer:
        """The session's trainer when `secret` is its secret.

        Order: no secret -> AuthenticationError (before any lookup); unknown or closed id ->
        SessionNotFoundError; wrong secret -> PermissionDeniedError. Nothing about the session changes.
        """
        require_secret(secret)
        trainer = self.get(session_id)
        check_session_secret(trainer.secret, secret, session_id)
        return trainer

    def closed(self, session_id: str, secret: str | None) -> ClosedSession | None:
        """What a closed session left, for its owner (the right secret) only; None when it is not closed."""
        require_secret(secret)
        with self._lock:
            closed = self._closed.get(session_id)
        if closed is not None:
            check_session_secret(closed.secret, secret, session_id)
        return closed

    def close(self, session_id: str, *, adapter_id: str = "") -> int:
        with self._lock:
            trainer = self._sessions.pop(session_id, None)
            if trainer is not None:
                self._closed[session_id] = ClosedSession(trainer.secret, trainer.steps_applied, adapter_id)
                while len(self._closed) > self.CLOSED_KEPT:
                    self._closed.popitem(last=False)
        if trainer is None:
            raise SessionNotFoundError(f"session {session_id[:8]!r}… is unknown or closed")
        log.info("session %s… closed after %d steps", session_id[:8], trainer.steps_applied)
        return trainer.steps_applied

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
