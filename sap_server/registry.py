"""Sessions: one trainable top per user session over the provider's one shared, frozen top.

With a SessionStore (`sap-server --state-dir`) every session is checkpointed when it opens, every
`checkpoint_every` steps (before the reply, which then says so), when it is unloaded for idleness and when
it closes. A session that is not in memory (unloaded, or known only from the disk of a restarted server) is
loaded from its latest checkpoint on its first call; loaded sessions count toward max_sessions.
"""

from __future__ import annotations

import copy
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from sap_common.checkpoint import GLOBAL_RNG_LOCK
from sap_common.errors import InvalidInputError, ResourceLimitError, SessionNotFoundError, StepOrderError
from sap_common.models.families import PackedOutput, new_head, pooled_output
from sap_common.models.split import TopModel
from sap_common.peft import PeftConfig, apply_peft
from sap_common.recording import Recorder
from sap_common.service import BackwardResult, SessionSpec
from sap_server.auth import check_session_secret, new_session_secret, require_secret, secret_digest
from sap_server.checkpoints import ClosedSession, SessionStore
from sap_server.compute import compute_thread
from sap_server.heap import trim_heap
from sap_server.session import DEFAULT_CHECKPOINT_EVERY, DEFAULT_MAX_BATCH_TOKENS, Session

log = logging.getLogger(__name__)


def build_session_top(
    template: TopModel,
    base: PreTrainedModel,
    peft: PeftConfig,
    num_labels: int,
    seed: int,
    output: str = "logits",
    user_tail: int = 0,
    start: dict[str, torch.Tensor] | None = None,
) -> TopModel:
    """A session's top: frozen weights shared with template, fresh head (seeded) and PEFT parameters. With output
    "pooled" the top ends in PooledOutput instead of a head: the user keeps its head (and its labels' number). With
    output "hidden" it ends user_tail blocks early, in PackedOutput: the user runs those blocks and the head.

    Random draws: the head from its own generator seeded with `seed`; the PEFT parameters from
    the global generator re-seeded with `seed` inside fork_rng, so other threads are unaffected
    and the same seed always gives the same initial weights. With start (a noise-robust starting adapter,
    sap_server/robust.py: the blocks' PEFT weights by name), the blocks' PEFT weights are copied from it instead;
    a top that ends user_tail blocks early takes the weights of the blocks it keeps.
    """
    # Parameters that stay frozen are shared (memory per session is the adapter's, not the model's);
    # BitFit trains existing biases, so those must be copied.
    shared: dict[int, object] = {
        id(p): p for name, p in template.named_parameters() if not (peft.method == "bitfit" and name.endswith("bias"))
    }
    shared.update({id(b): b for b in template.buffers()})
    shared[id(template.config)] = template.config
    served = len(template.blocks)
    if output == "hidden" and not 0 <= user_tail < served:
        raise InvalidInputError(
            f"user_tail {user_tail} leaves this server no block: it serves blocks {template.first_index}.."
            f"{template.first_index + served - 1}, so user_tail must be at most {served - 1}"
        )
    top = copy.deepcopy(template, memo=shared)
    if user_tail:
        top.blocks = nn.ModuleList(list(top.blocks)[: len(top.blocks) - user_tail])
    # The head is drawn on the CPU in float32 (the same start on any device), then placed with the blocks.
    frozen = next(template.blocks[-1].parameters())  # the head follows the last block (--device-map)
    end: nn.Module
    if output == "pooled":
        end = pooled_output(template.config, base)
    elif output == "hidden":
        end = PackedOutput()
    else:
        end = new_head(template.config, base, num_labels, torch.Generator().manual_seed(seed))
    top.head = end.to(device=frozen.device, dtype=frozen.dtype)
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):  # the lock: training forwards seed it too
        torch.manual_seed(seed)
        apply_peft(list(top.blocks), top.family, peft)  # new PEFT weights take each wrapped layer's device/dtype
    if start is not None:
        load_start_adapter(top, start)
    return top


def load_start_adapter(top: TopModel, start: dict[str, torch.Tensor]) -> None:
    """Copy a starting adapter's weights (names "blocks.<i>....") into the trainable block parameters of top."""
    trainable = {n: p for n, p in top.named_parameters() if p.requires_grad and n.startswith("blocks.")}
    missing = sorted(trainable.keys() - start.keys())
    if missing:
        raise InvalidInputError(f"the starting adapter does not fit this top: it lacks {missing[:3]}")
    with torch.no_grad():
        for name, param in trainable.items():
            if start[name].shape != param.shape:
                raise InvalidInputError(
                    f"the starting adapter's {name} is {tuple(start[name].shape)}, the top's {tuple(param.shape)}"
                )
            param.copy_(start[name])


@dataclass
class Closing:
    """A session being closed (SessionRegistry.closing): what the caller keeps of it, and the record afterwards."""

    session: Session | None  # inside the block; None once closed, so the session's memory can go
    adapter_id: str = ""
    record: ClosedSession | None = None

    @property
    def held(self) -> Session:
        """The session being closed (inside the block)."""
        if self.session is None:
            raise RuntimeError("the session is closed already: use it inside the closing() block")
        return self.session

    @property
    def closed(self) -> ClosedSession:
        """The record of the close (after the block)."""
        if self.record is None:
            raise RuntimeError("the session is not closed yet: read the record after the closing() block")
        return self.record


def _unknown(session_id: str) -> SessionNotFoundError:
    return SessionNotFoundError(f"session {session_id[:8]!r}… is unknown or closed")


class SessionRegistry:
    """Creates, finds, authenticates, checkpoints, unloads, resumes and closes sessions; thread-safe.

    Locks, always taken in this order: a session's trainer.lock, then the manager's lock, then the store's.
    """

    CLOSED_KEPT = 4096  # closed sessions remembered in memory (for retried closes), oldest forgotten first

    def __init__(
        self,
        template: TopModel,
        base: PreTrainedModel,
        peft: PeftConfig,
        *,
        max_sessions: int = 16,
        recorder: Recorder | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        store: SessionStore | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.template = template.requires_grad_(False)
        self.base = base
        self.peft = peft
        self.max_sessions = max_sessions
        self.max_batch_tokens = max_batch_tokens
        self.recorder = recorder
        self.store = store
        self.checkpoint_every = checkpoint_every
        self._sessions: dict[str, Session] = {}  # the loaded sessions
        self._closed: OrderedDict[str, ClosedSession] = OrderedDict()
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._stop_reaper = threading.Event()
        self.start_adapters: dict[str, dict[str, torch.Tensor]] = {}  # offered starting adapters, by name
        self.checkpoint_seconds: Callable[[float], None] | None = None  # told how long each checkpoint took

    # --- opening, finding, loading ------------------------------------------------------------

    def open(
        self, spec: SessionSpec, *, state: dict[str, torch.Tensor] | None = None, steps_applied: int = 0
    ) -> tuple[str, Session, str]:
        """A new session: (id, trainer, its random secret, which only the opener learns; the server keeps its
        SHA-256). With `state`, its trainable weights are restored from a stored adapter."""
        secret = new_session_secret()
        session_id = secrets.token_hex(16)
        with self._lock:
            self._check_room()
            trainer = self._new_trainer(session_id, spec, secret_digest(secret), fresh=state is None)
            if state is not None:
                trainer.load_trainable_state(state, steps_applied)
            self._sessions[session_id] = trainer
        if self.store is not None:
            with trainer.lock:  # the opening state: a run can always go back to its start
                self._save(trainer, announced=True)
        log.info(
            "session %s… opened: %d labels, %d trainable parameters",
            session_id[:8],
            spec.num_labels,
            trainer.trainable_parameters,
        )
        return session_id, trainer, secret

    def _new_trainer(self, session_id: str, spec: SessionSpec, digest: bytes, *, fresh: bool = False) -> Session:
        """fresh: a session's first weights (from its starting adapter, if it names one); otherwise the caller
        loads them (a checkpoint, a kept adapter)."""
        start = None
        if fresh and spec.start_adapter:
            start = self.start_adapters.get(spec.start_adapter)
            if start is None:
                offered = ", ".join(sorted(self.start_adapters)) or "none"
                raise InvalidInputError(
                    f"this server offers no starting adapter {spec.start_adapter!r} (offered: {offered}; "
                    "sap-server --start-adapter NAME=FILE)"
                )
        top = build_session_top(
            self.template, self.base, self.peft, spec.num_labels, spec.seed, spec.output, spec.user_tail, start
        )
        return Session(
            top,
            learning_rate=spec.learning_rate,
            weight_decay=spec.weight_decay,
            train_bottom=spec.train_bottom,
            num_labels=spec.num_labels,
            output=spec.output,
            user_tail=spec.user_tail,
            seed=spec.seed,
            recorder=self.recorder,
            session_id=session_id,
            secret_digest=digest,
            max_batch_tokens=self.max_batch_tokens,
        )

    def _check_room(self) -> None:
        """Called with self._lock held."""
        if len(self._sessions) >= self.max_sessions:
            raise ResourceLimitError(
                f"the server already holds {self.max_sessions} sessions (--max-sessions); close one first"
            )

    def get(self, session_id: str) -> Session:
        """The session's trainer, without authentication (in-process callers; the servicer uses `use`)."""
        return self._find(session_id, None, check=False)

    def authenticate(self, session_id: str, secret: str | None) -> Session:
        """The session's trainer when `secret` is its secret (loaded from its checkpoint if need be).

        Order: no secret -> AuthenticationError (before any lookup); unknown or closed id ->
        SessionNotFoundError; wrong secret -> PermissionDeniedError. Nothing about the session changes.
        """
        require_secret(secret)
        return self._find(session_id, secret, check=True)

    def _find(self, session_id: str, secret: str | None, check: bool) -> Session:
        with self._lock:
            trainer = self._sessions.get(session_id)
            if trainer is not None:
                if check:
                    check_session_secret(trainer.secret_digest, secret, session_id)
                return trainer
            # read from disk again: with a shared state dir another replica may have checkpointed it since
            stored = self.store.get(session_id, fresh=True) if self.store is not None else None
            if stored is None or stored.closed is not None:
                raise _unknown(session_id)
            if check:  # before loading: a refused caller costs no load
                check_session_secret(stored.secret_digest, secret, session_id)
            self._check_room()
            assert self.store is not None  # it gave `stored`
            snapshot = self.store.load(session_id)
            trainer = self._new_trainer(session_id, snapshot.spec, snapshot.secret_digest)
            trainer.restore(snapshot)
            self._sessions[session_id] = trainer
        log.info("session %s… loaded from its checkpoint at step %d", session_id[:8], trainer.steps_applied)
        return trainer

    @contextmanager
    def use(self, session_id: str, secret: str | None, *, check: bool = True) -> Iterator[Session]:
        """Authenticate (when check), load if need be, and hold the session's lock for the block.

        A session the idle reaper unloads while this call waits for its lock is looked up (and loaded) again,
        so no call ever works on a session that has left memory."""
        while True:
            trainer = self._find(session_id, secret, check)
            with trainer.lock:
                if trainer.unloaded:
                    continue
                trainer.last_used = time.monotonic()
                try:
                    yield trainer
                finally:
                    trainer.last_used = time.monotonic()
                return

    # --- checkpoints --------------------------------------------------------------------------

    def _save(self, trainer: Session, *, announced: bool) -> bool:
        """Checkpoint the session (caller holds trainer.lock); a failure is logged, never raised."""
        assert self.store is not None, "checkpoints need a store (sap-server --state-dir)"
        started = time.perf_counter()
        try:
            self.store.save(trainer.session_id, trainer.snapshot(announced=announced))
        except Exception as exc:  # noqa: BLE001 - a full disk must not fail the step; the reply says so
            log.error(
                "session %s…: checkpoint at step %d failed: %s", trainer.session_id[:8], trainer.steps_applied, exc
            )
            return False
        if self.checkpoint_seconds is not None:
            self.checkpoint_seconds(time.perf_counter() - started)
        trainer.saved_step = trainer.steps_applied
        return True

    def backward(self, session: Session, step: int, grad_logits: torch.Tensor) -> BackwardResult:
        """The session's Backward of `step` (the caller holds its lock, through `use`); with a store, every
        checkpoint_every steps the session is checkpointed before the reply goes out, and the reply says whether
        it was (BackwardReply.checkpointed)."""
        due = self.store is not None and step % self.checkpoint_every == 0 and step > session.steps_applied
        result = session.backward(step, grad_logits, checkpointed=due)
        if due and not result.replayed and not self._save(session, announced=True):
            return session.checkpoint_failed()
        return result

    def resume(self, session_id: str, secret: str | None, step: int, *, check: bool = True) -> Session:
        """Bring the session to `step`: accepted as it is when it is exactly there (a pending forward is
        dropped), else restored from its checkpoint at `step` (a closed session is reopened; checkpoints after
        `step` are deleted). Otherwise StepOrderError naming the steps it has. Same auth order as every call."""
        self._reopen_closed(session_id, secret, step, check)
        with self.use(session_id, secret, check=check) as trainer:
            if trainer.steps_applied == step:
                trainer.drop_pending()
                log.info("session %s… resumed at step %d (it was there)", session_id[:8], step)
                return trainer
            steps = self.store.steps(session_id) if self.store is not None else []
            if step not in steps:
                have = (
                    f"checkpoints at steps {steps}"
                    if self.store is not None
                    else "no checkpoints (the server runs without --state-dir)"
                )
                raise StepOrderError(
                    f"session {session_id[:8]!r}… cannot resume at step {step}: it is at step "
                    f"{trainer.steps_applied} and has {have}"
                )
            was = trainer.steps_applied
            assert self.store is not None  # the step is one of its checkpoints
            trainer.restore(self.store.load(session_id, step))
            self.store.discard_after(session_id, step)
        log.info("session %s… resumed at step %d (it was at step %d)", session_id[:8], step, was)
        return trainer

    def _reopen_closed(self, session_id: str, secret: str | None, step: int, check: bool) -> None:
        with self._lock:
            if session_id in self._sessions:
                return
            stored = self.store.get(session_id, fresh=True) if self.store is not None else None
            closed = self._closed.get(session_id) or (stored.closed if stored is not None else None)
            if closed is None:
                return  # open (in memory or on disk) or unknown: `use` tells
            if check:
                check_session_secret(closed.secret_digest, secret, session_id)
            if stored is None:
                raise _unknown(session_id)
            if step not in stored.steps:
                raise StepOrderError(
                    f"session {session_id[:8]!r}… is closed and cannot resume at step {step}: "
                    f"it has checkpoints at steps {sorted(stored.steps)}"
                )
            self._closed.pop(session_id, None)
            assert self.store is not None  # it gave `stored`
            self.store.reopen(session_id)
        log.info("closed session %s… reopened to resume at step %d", session_id[:8], step)

    # --- closing and unloading ----------------------------------------------------------------

    def closed(self, session_id: str, secret: str | None) -> ClosedSession | None:
        """What a closed session left, for its owner (the right secret) only; None when it is not closed."""
        require_secret(secret)
        with self._lock:
            closed = self._closed.get(session_id)
            if closed is None and session_id not in self._sessions and self.store is not None:
                stored = self.store.get(session_id, fresh=True)
                closed = stored.closed if stored is not None else None
        if closed is not None:
            check_session_secret(closed.secret_digest, secret, session_id)
        return closed

    @contextmanager
    def closing(self, session_id: str, secret: str | None = None, *, check: bool = False) -> Iterator[Closing]:
        """Close the session at the end of the block; inside it the caller holds the session (its lock) and may set
        closing.adapter_id (e.g. after storing the adapter). With a store the final state is checkpointed and the
        close recorded on disk. The record is closing.closed afterwards."""
        with self.use(session_id, secret, check=check) as session:
            closing = Closing(session)
            yield closing
            record = ClosedSession(session.secret_digest, session.steps_applied, closing.adapter_id)
            if self.store is not None:
                if session.saved_step != session.steps_applied:
                    self._save(session, announced=False)
                try:
                    self.store.mark_closed(session_id, record)
                except OSError as exc:
                    log.error("session %s…: recording the close failed: %s", session_id[:8], exc)
            with self._lock:
                self._sessions.pop(session_id, None)
                session.unloaded = True
                self._remember_closed(session_id, record)
            closing.record, closing.session = record, None
        del session  # the last reference: the session's tensors are freed here
        trim_heap()
        log.info("session %s… closed after %d steps", session_id[:8], record.steps_applied)

    def close(self, session_id: str, secret: str | None = None, *, check: bool = False) -> ClosedSession:
        """Close the session without keeping its adapter."""
        with self.closing(session_id, secret, check=check) as closing:
            pass
        return closing.closed

    def _remember_closed(self, session_id: str, record: ClosedSession) -> None:
        """Called with self._lock held."""
        self._closed[session_id] = record
        while len(self._closed) > self.CLOSED_KEPT:
            self._closed.popitem(last=False)

    def unload_idle(self, idle_timeout: float) -> list[str]:
        """Sessions without a call for more than idle_timeout seconds leave memory: with a store they are
        checkpointed and unloaded (the next call loads them again), without one they are closed. A session
        busy in a call is left alone. Returns the ids it unloaded or closed."""
        cutoff = time.monotonic() - idle_timeout
        with self._lock:
            idle = [t for t in self._sessions.values() if t.last_used < cutoff]
        done = []
        for trainer in idle:
            if not trainer.lock.acquire(blocking=False):
                continue
            try:
                if trainer.unloaded or trainer.last_used >= cutoff:
                    continue
                sid = trainer.session_id
                if self.store is not None:
                    if trainer.saved_step != trainer.steps_applied and not self._save(trainer, announced=False):
                        continue  # could not be saved: it stays in memory
                    with self._lock:
                        self._sessions.pop(sid, None)
                        trainer.unloaded = True
                    log.info(
                        "session %s… idle for more than %g s: checkpointed at step %d and unloaded; its next "
                        "call loads it again",
                        sid[:8],
                        idle_timeout,
                        trainer.steps_applied,
                    )
                else:
                    with self._lock:
                        self._sessions.pop(sid, None)
                        trainer.unloaded = True
                        self._remember_closed(sid, ClosedSession(trainer.secret_digest, trainer.steps_applied, ""))
                    log.warning(
                        "session %s… idle for more than %g s: closed after %d steps (without --state-dir an "
                        "idle session cannot be kept)",
                        sid[:8],
                        idle_timeout,
                        trainer.steps_applied,
                    )
                done.append(sid)
            finally:
                trainer.lock.release()
        if done:
            del idle, trainer  # the unloaded sessions' last references
            trim_heap()
        return done

    def checkpoint_loaded(self) -> int:
        """With a store: checkpoint every loaded session whose current step is not on disk yet (a graceful stop,
        so that a restarted server continues each session where it stood). Returns how many were written."""
        if self.store is None:
            return 0
        with self._lock:
            trainers = list(self._sessions.values())
        written = 0
        for trainer in trainers:
            with trainer.lock:
                if not trainer.unloaded and trainer.saved_step != trainer.steps_applied:
                    written += self._save(trainer, announced=False)
        return written

    def start_reaper(self, idle_timeout: float) -> None:
        """A background thread that runs unload_idle(idle_timeout) every idle_timeout / 4 (at most 30 s)."""
        if idle_timeout <= 0 or self._reaper is not None:
            return
        interval = min(max(idle_timeout / 4, 0.05), 30.0)

        def reap() -> None:
            while not self._stop_reaper.wait(interval):
                try:  # on the compute thread, like every step (sap_server/compute.py)
                    compute_thread().run(self.unload_idle, idle_timeout)
                except Exception:  # noqa: BLE001 - the reaper must outlive a bad round
                    log.exception("unloading idle sessions failed")

        self._reaper = threading.Thread(target=reap, name="sap-idle-reaper", daemon=True)
        self._reaper.start()

    def stop_reaper(self) -> None:
        self._stop_reaper.set()
        if self._reaper is not None:
            self._reaper.join(timeout=10)
            self._reaper = None

    def __contains__(self, session_id: str) -> bool:
        """Whether the session is loaded (in memory)."""
        with self._lock:
            return session_id in self._sessions

    def __len__(self) -> int:
        """Loaded sessions (what counts toward max_sessions)."""
        with self._lock:
            return len(self._sessions)
