"""Provider: the loaded model cut at k, the bottom bundle it hands out, and its sessions (no gRPC here)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sap_common import PROTOCOL_VERSION
from sap_common.errors import ModelLoadError
from sap_common.models.bundle import bundle_sha256, export_bottom
from sap_common.models.registry import LoadedModel, load_model
from sap_common.models.split import split_base
from sap_common.service import ServerInfo
from sap_server.peft import PeftConfig
from sap_server.sessions import SessionManager

log = logging.getLogger(__name__)


@dataclass
class Provider:
    info: ServerInfo
    sessions: SessionManager
    bundle_dir: Path
    _owns_bundle_dir: bool = False

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, split: int, peft: PeftConfig, *, max_sessions: int = 16,
                    bundle_dir: Path | None = None) -> Provider:
        """Cut the loaded model at `split` and write the bottom bundle users download."""
        base = loaded.base
        total = base.config.num_hidden_layers
        bottom, top = split_base(base, split)
        owns = bundle_dir is None
        bundle_dir = Path(tempfile.mkdtemp(prefix="sap-bottom-")) if bundle_dir is None else bundle_dir
        bundle_dir.mkdir(parents=True, exist_ok=True)
        if any(bundle_dir.iterdir()):
            raise ModelLoadError(f"bundle folder {bundle_dir} must be empty")
        meta = export_bottom(bottom, loaded.tokenizer, loaded.model_id, total, bundle_dir)
        info = ServerInfo(protocol_version=PROTOCOL_VERSION, model_id=loaded.model_id, family=meta.family,
                          model_type=meta.model_type, split=split, total_blocks=total,
                          hidden_size=meta.hidden_size, peft=peft.method, bottom_sha256=bundle_sha256(bundle_dir))
        sessions = SessionManager(top, base, peft, max_sessions=max_sessions)
        return cls(info=info, sessions=sessions, bundle_dir=bundle_dir, _owns_bundle_dir=owns)

    @classmethod
    def load(cls, model: str, split: int, peft: PeftConfig, *, dtype: torch.dtype = torch.float32,
             max_sessions: int = 16) -> Provider:
        loaded = load_model(model, dtype=dtype)
        log.info("loaded %s: %s, %d blocks, hidden %d", loaded.model_id, loaded.base.config.model_type,
                 loaded.base.config.num_hidden_layers, loaded.base.config.hidden_size)
        return cls.from_loaded(loaded, split, peft, max_sessions=max_sessions)

    def close(self) -> None:
        if self._owns_bundle_dir:
            shutil.rmtree(self.bundle_dir, ignore_errors=True)
