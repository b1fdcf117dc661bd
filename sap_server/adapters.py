"""AdapterStore: trained session weights kept by id, in memory and (with --state-dir) on disk."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sap_common.errors import ModelLoadError, SessionNotFoundError

_ID = re.compile(r"[0-9a-f]{32}")
WEIGHTS = "adapter.safetensors"
META = "adapter.json"


@dataclass
class AdapterRecord:
    """A session's trainable weights (PEFT parameters and head) and what they fit."""

    adapter_id: str
    model_id: str
    split: int
    peft: dict  # asdict(PeftConfig): r, alpha, ... must match to reattach
    num_labels: int
    seed: int
    steps_applied: int
    state: dict[str, torch.Tensor] = field(repr=False)
    output: str = "logits"  # SessionSpec.output of the session it was kept from (adapters from before: logits)
    user_tail: int = 0  # SessionSpec.user_tail of that session

    def meta(self) -> dict:
        raw = asdict(self)
        raw.pop("state")
        return raw


class AdapterStore:
    """Thread-safe; writes are atomic (write to a temp folder, then rename)."""

    def __init__(self, state_dir: Path | None = None):
        self.root = state_dir / "adapters" if state_dir is not None else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, AdapterRecord] = {}
        self._lock = threading.Lock()

    def put(self, record: AdapterRecord) -> None:
        if not _ID.fullmatch(record.adapter_id):
            raise ValueError(f"adapter id must be 32 hex digits, got {record.adapter_id!r}")
        if self.root is not None:
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
            try:
                save_file({k: v.detach().cpu().contiguous() for k, v in record.state.items()}, str(staging / WEIGHTS))
                (staging / META).write_text(json.dumps(record.meta(), indent=2) + "\n")
                staging.rename(self.root / record.adapter_id)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        with self._lock:
            self._records[record.adapter_id] = record

    def get(self, adapter_id: str) -> AdapterRecord:
        unknown = SessionNotFoundError(f"adapter {adapter_id[:8]!r}… is unknown to this server")
        if not _ID.fullmatch(adapter_id):  # also keeps the id from naming a path outside the store
            raise unknown
        with self._lock:
            record = self._records.get(adapter_id)
        if record is not None:
            return record
        folder = self.root / adapter_id if self.root is not None else None
        if folder is None or not folder.is_dir():
            raise unknown
        try:
            meta = json.loads((folder / META).read_text())
            record = AdapterRecord(state=load_file(str(folder / WEIGHTS)), **meta)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"stored adapter {adapter_id[:8]}… cannot be read: {exc}") from exc
        with self._lock:
            self._records[adapter_id] = record
        return record
