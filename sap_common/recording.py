"""The recording format of the curious provider's view. With `sap-server --record DIR`, every hidden-state tensor and
mask the server receives, and every gradient Backward receives, is written to DIR, so an audit can attack real
traffic (off by default)."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class Recorder:
    """Writes DIR/NNNNNNNN-<kind>.safetensors: `hidden_states` (B, T, H) and `attention_mask` (B, T) for forward and
    evaluate, `grad_logits` (B, C), `grad_pooled` (B, H) or `grad_hidden` (N_real, H)
    for backward; the metadata names the session (its first 8 characters) and step."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        existing = [int(p.name.split("-")[0]) for p in folder.glob("*.safetensors") if p.name[:8].isdigit()]
        self._counter = itertools.count(max(existing, default=0) + 1)
        self._lock = threading.Lock()

    def record(self, kind: str, session_id: str, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._write(
            kind,
            session_id,
            step,
            {
                "hidden_states": hidden.detach().to("cpu", torch.float32).contiguous(),
                "attention_mask": attention_mask.detach().to("cpu", torch.int64).contiguous(),
            },
        )

    def record_gradient(self, session_id: str, step: int, gradient: torch.Tensor, *, name: str = "grad_logits") -> None:
        """What a Backward of `step` carried: dL/dlogits (B, C) as `grad_logits`, or, for a session whose user keeps
        the head, dL/dpooled (B, H) as `grad_pooled`, or with a user-kept tail the packed dL/dhidden (N_real, H) of
        the top's last block as `grad_hidden` (rows in the order of the forward's real tokens)."""
        self._write("backward", session_id, step, {name: gradient.detach().to("cpu", torch.float32).contiguous()})

    def _write(self, kind: str, session_id: str, step: int, tensors: dict[str, torch.Tensor]) -> None:
        with self._lock:
            number = next(self._counter)
        meta = {"kind": kind, "session": session_id[:8], "step": str(step)}
        save_file(tensors, str(self.folder / f"{number:08d}-{kind}.safetensors"), metadata=meta)


@dataclass
class Record:
    """One recorded message: kind (forward, evaluate, backward), session prefix, step and its tensors."""

    kind: str
    session: str
    step: int
    tensors: dict[str, torch.Tensor]


def read_records(folder: Path) -> list[Record]:
    """Every recorded message, in the order received."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no recorded tensors in {folder}")
    records = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        records.append(
            Record(
                meta.get("kind", path.stem.split("-", 1)[-1]),
                meta.get("session", ""),
                int(meta.get("step", 0)),
                load_file(str(path)),
            )
        )
    return records


def read_recording(folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every recorded (hidden (B, T, H), attention_mask (B, T)) pair, in the order received."""
    return [
        (r.tensors["hidden_states"], r.tensors["attention_mask"])
        for r in read_records(folder)
        if "hidden_states" in r.tensors
    ]
