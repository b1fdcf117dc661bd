"""Fetch the provider's bottom bundle once, verify it, cache it by content hash, and load it."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from sap_common.errors import ModelLoadError
from sap_common.models.bundle import BottomMeta, bundle_sha256, load_bottom
from sap_common.models.registry import cache_dir
from sap_common.models.split import BottomModel
from sap_common.service import ServerInfo, TopService

log = logging.getLogger(__name__)


def fetch_bottom(service: TopService, info: ServerInfo, cache_root: Path | None = None) -> Path:
    """The local folder of the server's bottom bundle, downloading it only when not cached yet."""
    root = cache_root or cache_dir() / "bottoms"
    target = root / info.bottom_sha256
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".download-"))
    try:
        log.info("downloading the bottom (%d of %d blocks of %s)", info.split, info.total_blocks, info.model_id)
        service.download_bottom(staging)
        actual = bundle_sha256(staging)
        if actual != info.bottom_sha256:
            raise ModelLoadError(
                f"downloaded bottom has hash {actual[:12]}…, the server announced "
                f"{info.bottom_sha256[:12]}…; refusing it"
            )
        try:
            staging.rename(target)
        except OSError:  # another process cached the same bundle meanwhile
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_server_bottom(
    service: TopService, info: ServerInfo, cache_root: Path | None = None
) -> tuple[BottomModel, PreTrainedTokenizerBase, BottomMeta]:
    folder = fetch_bottom(service, info, cache_root)
    bottom, tokenizer, meta = load_bottom(folder)
    if meta.split != info.split or meta.hidden_size != info.hidden_size:
        raise ModelLoadError(
            f"cached bottom {folder} does not match the server (split {meta.split} vs "
            f"{info.split}); delete it and retry"
        )
    return bottom, tokenizer, meta
