"""Checkpoint files (both sides) and the per-step random draws that make a resumed run replay exactly.

A checkpoint is one safetensors file: tensors by name, plus one JSON object in the header's metadata
(key "sap"). No pickle. Files are written atomically: into a temporary file in the same folder, flushed
and fsynced, then os.replace()d over the target (and the folder fsynced), so a reader (or a process
killed with SIGKILL half-way) sees either the old file or the new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from sap_common.errors import InvalidInputError

META_KEY = "sap"
TMP_PREFIX = ".tmp-"


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write data to path atomically (temp file in the same folder, fsync, os.replace, fsync the folder)."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # the rename itself must survive a crash too
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def pack(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """tensors (any device; copied to contiguous CPU memory) and a JSON-able meta -> safetensors bytes."""
    cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    return save_tensors(cpu, metadata={META_KEY: json.dumps(meta)})


def unpack(data: bytes, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The inverse of pack; InvalidInputError naming `what` when the bytes are not such a file."""
    view = memoryview(data)
    try:
        meta = _header_meta(bytes(view[:8]), view[8:], what)
        return load_tensors(bytes(data)), meta
    except InvalidInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise InvalidInputError(f"{what} is not a readable checkpoint: {exc}") from exc


def read_meta(path: Path) -> dict:
    """Only the JSON meta of a checkpoint file (reads the header, not the tensors)."""
    with Path(path).open("rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise InvalidInputError(f"{path} is not a readable checkpoint: it is shorter than 8 bytes")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise InvalidInputError(f"{path} is not a readable checkpoint: header of {size} bytes")
        return _header_meta(head, handle.read(size), str(path))


def _header_meta(head: bytes, rest: bytes | memoryview, what: str) -> dict:
    if len(head) != 8:
        raise InvalidInputError(f"{what} is not a readable checkpoint: it is shorter than 8 bytes")
    (size,) = struct.unpack("<Q", head)
    if size > len(rest):
        raise InvalidInputError(f"{what} is not a readable checkpoint: truncated header")
    try:
        header = json.loads(bytes(rest[:size]))
        return json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{what} is not a readable checkpoint: no SAP metadata ({exc})") from exc


# --- optimizer state ------------------------------------------------------------------------------


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer's state_dict as flat tensors (`{prefix}{index}/{key}`) and a JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str
) -> None:
    """Load what optimizer_to_tensors wrote into optimizer (it casts and moves the state to its parameters)."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            index, key = name[len(prefix) :].split("/", 1)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [dict(group, betas=tuple(group["betas"])) if "betas" in group else group for group in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- per-step random draws ------------------------------------------------------------------------

# Every training forward that draws random numbers (dropout in the provider's top, in a trainable bottom) draws
# them from torch's global generator re-seeded with step_seed(seed, step) inside fork_rng, under this lock.
# The draws of a step are then a function of (the session's seed, the step) alone: a step recomputed after a
# restart or a resume draws the same dropout masks, and sessions that run at the same time in one process
# cannot disturb each other's draws (the global generator is shared state; the lock keeps two forwards from
# re-seeding it at once, fork_rng puts back whatever state it had). No RNG state needs to be saved.
GLOBAL_RNG_LOCK = threading.RLock()


def step_seed(seed: int, step: int, purpose: str = "dropout") -> int:
    """A 63-bit seed derived from (seed, step, purpose) alone."""
    digest = hashlib.sha256(f"sap:{purpose}:{int(seed)}:{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def seeded_draws(
    seed: int, step: int, device: torch.device | Iterable[torch.device] | None = None, purpose: str = "dropout"
) -> Iterator[None]:
    """Run the block with the global generators (CPU, and each CUDA device among `device`, one device or
    several: a top spread over GPUs) seeded from (seed, step), restoring them afterwards; one block at a
    time in the process (GLOBAL_RNG_LOCK)."""
    given = [device] if isinstance(device, torch.device) else list(device or ())
    devices = sorted(
        {d.index if d.index is not None else torch.cuda.current_device() for d in given if d.type == "cuda"}
    )
    value = step_seed(seed, step, purpose)
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(value)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(value)
        yield
