"""The recording format of the curious provider's view. With `sap-server --record DIR`, every hidden-state tensor and
mask the server receives is written to DIR, so an audit can attack real traffic (off by default)."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class Recorder:
    """Writes DIR/NNNNNNNN-<kind>.safetensors with `hidden_states` (B, T, H) and `attention_mask` (B, T)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        existing = [int(p.name.split("-")[0]) for p in folder.glob("*.safetensors") if p.name[:8].isdigit()]
        self._counter = itertools.count(max(existing, default=0) + 1)
        self._lock = threading.Lock()

    def record(self, kind: str, session_id: str, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> None:
        with self._lock:
            number = next(self._counter)
        tensors = {"hidden_states": hidden.detach().to("cpu", torch.float32).contiguous(),
                   "attention_mask": attention_mask.detach().to("cpu", torch.int64).contiguous()}
        meta = {"kind": kind, "session": session_id[:8], "step": str(step)}
        save_file(tensors, str(self.folder / f"{number:08d}-{kind}.safetensors"), metadata=meta)


def read_recording(folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every recorded (hidden (B, T, H), attention_mask (B, T)) pair, in the order received."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no recorded tensors in {folder}")
    pairs = []
    for path in files:
        tensors = load_file(str(path))
        pairs.append((tensors["hidden_states"], tensors["attention_mask"]))
    return pairs
