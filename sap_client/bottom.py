"""Fetch the provider's bottom bundle once, verify it, cache it by content hash, and load it; and a --user-tail run's
tail bundle, kept in the run's folder."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from sap_common.errors import ModelLoadError
from sap_common.models.bundle import BottomMeta, bundle_sha256, load_bottom, load_tail
from sap_common.models.registry import cache_dir
from sap_common.models.split import BottomModel, TopModel
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


def load_server_tail(
    service: TopService, info: ServerInfo, blocks: int, folder: Path, lm_embedding: nn.Embedding | None = None
) -> TopModel:
    """The model's last `blocks` blocks (pretrained, ending in the pooled representation) from folder, downloading
    the tail bundle into it first when it is not there (a run keeps it, so resume and predict do not fetch it
    again). A tail that is not the one the server serves for this run is refused. With lm_embedding (the bottom's
    input embedding table), the tail ends in next-token logits (generative fine-tuning; blocks may be 0)."""
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tail-"))
        try:
            log.info("downloading the tail (the last %d blocks of %s)", blocks, info.model_id)
            service.download_bottom(staging, tail_blocks=blocks, lm_head=lm_embedding is not None)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    tail, meta = load_tail(folder, lm_embedding)
    expected = (info.model_id, info.total_blocks - blocks, info.total_blocks, info.hidden_size)
    if (meta.model_id, meta.first_block, meta.total_blocks, meta.hidden_size) != expected:
        raise ModelLoadError(
            f"the tail in {folder} is blocks {meta.first_block}..{meta.total_blocks - 1} of {meta.model_id}; the run "
            f"needs blocks {expected[1]}..{info.total_blocks - 1} of {info.model_id}"
        )
    return tail
