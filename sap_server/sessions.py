"""Sessions: one trainable top per user session over the provider's one shared, frozen top."""

from __future__ import annotations

import copy
import logging
import secrets
import threading

import torch
from transformers import PreTrainedModel

from sap_common.errors import ResourceLimitError, SessionNotFoundError
from sap_common.models.families import new_head
from sap_common.models.split import TopModel
from sap_common.recording import Recorder
from sap_common.service import SessionSpec
from sap_server.peft import PeftConfig, apply_peft
from sap_server.trainer import TopTrainer

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


class SessionManager:
    """Creates, finds and closes sessions; thread-safe."""

    def __init__(self, template: TopModel, base: PreTrainedModel, peft: PeftConfig, *, max_sessions: int = 16,
                 recorder: Recorder | None = None):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.template = template.requires_grad_(False)
        self.base = base
        self.peft = peft
        self.max_sessions = max_sessions
        self.recorder = recorder
        self._sessions: dict[str, TopTrainer] = {}
        self._lock = threading.Lock()

    def open(self, spec: SessionSpec, *, state: dict[str, torch.Tensor] | None = None,
             steps_applied: int = 0) -> tuple[str, TopTrainer]:
        """A new session; with `state`, its trainable weights are restored from a stored adapter."""
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceLimitError(f"the server already holds {self.max_sessions} sessions "
                                         f"(--max-sessions); close one first")
            top = build_session_top(self.template, self.base, self.peft, spec.num_labels, spec.seed)
            session_id = secrets.token_hex(16)
            trainer = TopTrainer(top, learning_rate=spec.learning_rate, weight_decay=spec.weight_decay,
                                 train_bottom=spec.train_bottom, num_labels=spec.num_labels, seed=spec.seed,
                                 recorder=self.recorder, session_id=session_id)
            if state is not None:
                trainer.load_trainable_state(state, steps_applied)
            self._sessions[session_id] = trainer
        log.info("session %s… opened: %d labels, %d trainable parameters", session_id[:8], spec.num_labels,
                 trainer.trainable_parameters)
        return session_id, trainer

    def get(self, session_id: str) -> TopTrainer:
        with self._lock:
            trainer = self._sessions.get(session_id)
        if trainer is None:
            raise SessionNotFoundError(f"session {session_id[:8]!r}… is unknown or closed")
        return trainer

    def close(self, session_id: str) -> int:
        with self._lock:
            trainer = self._sessions.pop(session_id, None)
        if trainer is None:
            raise SessionNotFoundError(f"session {session_id[:8]!r}… is unknown or closed")
        log.info("session %s… closed after %d steps", session_id[:8], trainer.steps_applied)
        return trainer.steps_applied

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
