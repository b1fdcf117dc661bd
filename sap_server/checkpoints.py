"""SessionStore: session checkpoints under `sap-server --state-dir DIR`, in DIR/sessions/<session id>/.

    step-<step, 20 digits>.safetensors   one checkpoint: trainable weights (PEFT + head), AdamW state, the
                                         last Backward reply (so a retried Backward is replayed), and in the
                                         header's JSON: the session spec, steps_applied, the SHA-256 of the
                                         session secret (never the secret), what model/split/PEFT it fits
    closed.json                          the session was closed: steps, kept adapter id (for a retried
                                         CloseSession after a restart); gone again when the session resumes

Which checkpoints are kept. A checkpoint is *announced* when the client was told about it
(BackwardReply.checkpointed, written every --checkpoint-every steps) or it is the session's opening state;
the client writes its own checkpoint of an announced step before it sends the next step, so the server is
never more than one announced checkpoint ahead of the client's latest. Keeping the two latest announced
checkpoints therefore always keeps the client's latest. Checkpoints written when an idle session is unloaded
or a session is closed are not announced; the latest of those is kept too while it is the newest, since it
is the session's current state. Writes are atomic (sap_common.checkpoint.atomic_write).

Closed sessions' folders are removed when the server starts and their close is older than CLOSED_RETENTION_S.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sap_common.checkpoint import TMP_PREFIX, atomic_write, pack, read_meta, unpack
from sap_common.errors import InvalidInputError, ModelLoadError
from sap_common.service import BackwardResult, SessionSpec
from sap_server.session import OPTIMIZER_PREFIX, SessionSnapshot

log = logging.getLogger(__name__)

FORMAT = 1
KEEP_ANNOUNCED = 2
CLOSED = "closed.json"
CLOSED_RETENTION_S = 7 * 24 * 3600
_SESSION_ID = re.compile(r"[0-9a-f]{32}")
_STEP_FILE = re.compile(r"step-(\d{20})\.safetensors")
_WEIGHTS, _REPLY = "weights/", "reply/grad_hidden"


@dataclass(frozen=True)
class ClosedSession:
    """What is left of a closed session: enough to answer a retried CloseSession with the same reply."""

    secret_digest: bytes = field(repr=False)
    steps_applied: int
    adapter_id: str


@dataclass
class StoredSession:
    """What the store knows of a session without loading it."""

    secret_digest: bytes = field(repr=False)
    steps: dict[int, bool] = field(default_factory=dict)  # step -> announced
    closed: ClosedSession | None = None

    @property
    def latest(self) -> int:
        return max(self.steps)


def _step_file(step: int) -> str:
    return f"step-{step:020d}.safetensors"


class SessionStore:
    """Thread-safe index of the sessions on disk; the files of one session are written by one thread at a
    time (its caller holds the session's lock)."""

    def __init__(self, state_dir: Path, identity: dict):
        self.root = Path(state_dir) / "sessions"
        self.root.mkdir(parents=True, exist_ok=True)
        self.identity = identity  # model_id, split, peft: a checkpoint only loads into the same top
        self._lock = threading.Lock()
        self._sessions: dict[str, StoredSession] = {}
        self._scan()

    # --- what is on disk ------------------------------------------------------------------------

    def _scan(self) -> None:
        now = time.time()
        for folder in sorted(self.root.iterdir()):
            if not (folder.is_dir() and _SESSION_ID.fullmatch(folder.name)):
                continue
            for leftover in folder.glob(TMP_PREFIX + "*"):  # a write that a crash cut short
                leftover.unlink(missing_ok=True)
            closed = folder / CLOSED
            if closed.is_file() and now - closed.stat().st_mtime > CLOSED_RETENTION_S:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            entry = self._read_folder(folder)
            if entry is not None:
                self._sessions[folder.name] = entry
        if self._sessions:
            log.info(
                "state dir holds %d sessions (%d closed); each loads on its first call",
                len(self._sessions),
                sum(1 for e in self._sessions.values() if e.closed),
            )

    def _read_folder(self, folder: Path) -> StoredSession | None:
        steps: dict[int, bool] = {}
        digest = None
        for path in sorted(folder.glob("step-*.safetensors")):
            match = _STEP_FILE.fullmatch(path.name)
            if not match:
                continue
            try:
                meta = read_meta(path)
                steps[int(match.group(1))] = bool(meta["announced"])
                digest = bytes.fromhex(meta["secret_sha256"])
            except (OSError, InvalidInputError, KeyError, ValueError) as exc:
                log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
        if not steps or digest is None:
            return None
        entry = StoredSession(secret_digest=digest, steps=steps)
        closed = folder / CLOSED
        if closed.is_file():
            try:
                raw = json.loads(closed.read_text())
                entry.closed = ClosedSession(
                    bytes.fromhex(raw["secret_sha256"]), int(raw["steps_applied"]), str(raw["adapter_id"])
                )
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring unreadable %s: %s", closed, exc)
        return entry

    def get(self, session_id: str, *, fresh: bool = False) -> StoredSession | None:
        """The stored session (open or closed), or None. A session this index does not hold, or any session when
        fresh, is read from disk again: the state dir may be shared by replicas (sap_cluster), and a session that
        another replica opened, and checkpointed since, moves here when that replica dies."""
        if not _SESSION_ID.fullmatch(session_id):  # also keeps an id from naming a path outside the store
            return None
        with self._lock:
            entry = self._sessions.get(session_id)
        if entry is not None and not fresh:
            return entry
        folder = self.root / session_id
        entry = self._read_folder(folder) if folder.is_dir() else None
        with self._lock:
            if entry is None:
                self._sessions.pop(session_id, None)
            else:
                self._sessions[session_id] = entry
        return entry

    def steps(self, session_id: str) -> list[int]:
        entry = self.get(session_id)
        return sorted(entry.steps) if entry is not None else []

    # --- writing --------------------------------------------------------------------------------

    def save(self, session_id: str, snapshot: SessionSnapshot) -> None:
        """Write the snapshot as the checkpoint of its step (atomically), then prune (see the module doc)."""
        folder = self.root / session_id
        folder.mkdir(exist_ok=True)
        step = snapshot.steps_applied
        with self._lock:
            entry = self._sessions.get(session_id)
            announced = snapshot.announced or bool(entry and entry.steps.get(step))  # a rewrite stays announced
        tensors = {_WEIGHTS + name: value for name, value in snapshot.weights.items()}
        tensors.update(snapshot.optimizer[0])
        reply = snapshot.last_reply
        if reply is not None and reply.grad_hidden is not None:
            tensors[_REPLY] = reply.grad_hidden
        meta = {
            "format": FORMAT,
            "session_id": session_id,
            "identity": self.identity,
            "spec": asdict(snapshot.spec),
            "steps_applied": step,
            "secret_sha256": snapshot.secret_digest.hex(),
            "optimizer": snapshot.optimizer[1],
            "announced": announced,
            "last_reply": None
            if reply is None
            else {"applied_step": reply.applied_step, "checkpointed": reply.checkpointed},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write(folder / _step_file(step), pack(tensors, meta))
        with self._lock:
            entry = self._sessions.setdefault(session_id, StoredSession(secret_digest=snapshot.secret_digest))
            entry.steps[step] = announced
            drop = self._to_prune(entry.steps)
            for old in drop:
                del entry.steps[old]
        for old in drop:
            (folder / _step_file(old)).unlink(missing_ok=True)

    @staticmethod
    def _to_prune(steps: dict[int, bool]) -> list[int]:
        announced = sorted(s for s, a in steps.items() if a)
        keep = set(announced[-KEEP_ANNOUNCED:]) | {max(steps)}
        return [s for s in steps if s not in keep]

    def discard_after(self, session_id: str, step: int) -> None:
        """Delete the checkpoints after step: a timeline the session left when it went back to step."""
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None:
                return
            later = [s for s in entry.steps if s > step]
            for s in later:
                del entry.steps[s]
        for s in later:
            (self.root / session_id / _step_file(s)).unlink(missing_ok=True)

    def mark_closed(self, session_id: str, record: ClosedSession) -> None:
        raw = {
            "secret_sha256": record.secret_digest.hex(),
            "steps_applied": record.steps_applied,
            "adapter_id": record.adapter_id,
            "closed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write(self.root / session_id / CLOSED, (json.dumps(raw, indent=2) + "\n").encode())
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is not None:
                entry.closed = record

    def reopen(self, session_id: str) -> None:
        (self.root / session_id / CLOSED).unlink(missing_ok=True)
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is not None:
                entry.closed = None

    # --- reading --------------------------------------------------------------------------------

    def load(self, session_id: str, step: int | None = None) -> SessionSnapshot:
        """The checkpoint at step (default: the latest). ModelLoadError when it cannot be read or was written
        for another model, split or PEFT setting."""
        entry = self.get(session_id)
        if entry is None or not entry.steps or (step is not None and step not in entry.steps):
            raise ModelLoadError(f"session {session_id[:8]}… has no checkpoint at step {step}")
        step = entry.latest if step is None else step
        path = self.root / session_id / _step_file(step)
        try:
            tensors, meta = unpack(path.read_bytes(), str(path))
        except (OSError, InvalidInputError) as exc:
            raise ModelLoadError(
                f"the checkpoint of session {session_id[:8]}… at step {step} cannot be read: {exc}"
            ) from exc
        if meta.get("format") != FORMAT or meta.get("identity") != self.identity:
            raise ModelLoadError(
                f"the checkpoint of session {session_id[:8]}… at step {step} was written for "
                f"{meta.get('identity')}; this server serves {self.identity}"
            )
        try:
            reply = meta["last_reply"]
            return SessionSnapshot(
                spec=SessionSpec(**meta["spec"]),
                steps_applied=int(meta["steps_applied"]),
                secret_digest=bytes.fromhex(meta["secret_sha256"]),
                weights={name[len(_WEIGHTS) :]: value for name, value in tensors.items() if name.startswith(_WEIGHTS)},
                optimizer=(
                    {name: value for name, value in tensors.items() if name.startswith(OPTIMIZER_PREFIX)},
                    meta["optimizer"],
                ),
                last_reply=None
                if reply is None
                else BackwardResult(
                    int(reply["applied_step"]), False, tensors.get(_REPLY), bool(reply["checkpointed"])
                ),
                announced=bool(meta["announced"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelLoadError(
                f"the checkpoint of session {session_id[:8]}… at step {step} is malformed: {exc!r}"
            ) from exc
