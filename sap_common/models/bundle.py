"""The bottom bundle: the files a provider sends so a user can run blocks 0..k-1 locally.

Layout of a bundle folder:
    bottom.safetensors   weights of embeddings + blocks 0..k-1
    config.json          the model config truncated to k blocks
    sap_bottom.json      split, total blocks, family, model id
    tokenizer/...        the tokenizer files
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerBase

from sap_common.errors import ModelLoadError
from sap_common.models.families import truncated_config
from sap_common.models.registry import load_tokenizer
from sap_common.models.split import BottomModel, whole_base_as_bottom

WEIGHTS = "bottom.safetensors"
META = "sap_bottom.json"
TOKENIZER_DIR = "tokenizer"
BUNDLE_FORMAT = 1


@dataclass(frozen=True)
class BottomMeta:
    model_id: str
    family: str
    model_type: str
    split: int
    total_blocks: int
    hidden_size: int
    format: int = BUNDLE_FORMAT


def export_bottom(
    bottom: BottomModel, tokenizer: PreTrainedTokenizerBase, model_id: str, total_blocks: int, folder: Path
) -> BottomMeta:
    """Write the bundle for bottom into folder (which must exist and be empty)."""
    state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in bottom.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    truncated_config(bottom.config, bottom.split).save_pretrained(folder)
    tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    meta = BottomMeta(
        model_id=model_id,
        family=bottom.family.name,
        model_type=bottom.config.model_type,
        split=bottom.split,
        total_blocks=total_blocks,
        hidden_size=bottom.config.hidden_size,
    )
    (folder / META).write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta


def bundle_files(folder: Path) -> list[str]:
    """Relative paths of every file in the bundle, sorted (the order they are sent in)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def bundle_sha256(folder: Path) -> str:
    """A content hash over every file's path and bytes: clients cache bottoms under it."""
    digest = hashlib.sha256()
    for relative in bundle_files(folder):
        digest.update(relative.encode() + b"\0")
        digest.update(hashlib.sha256((folder / relative).read_bytes()).digest())
    return digest.hexdigest()


def read_meta(folder: Path) -> BottomMeta:
    try:
        raw = json.loads((folder / META).read_text())
        return BottomMeta(**raw)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{folder} is not a valid bottom bundle ({META}: {exc})") from exc


def load_bottom(folder: Path) -> tuple[BottomModel, PreTrainedTokenizerBase, BottomMeta]:
    """Rebuild the BottomModel, its tokenizer and metadata from a bundle folder."""
    meta = read_meta(folder)
    if meta.format != BUNDLE_FORMAT:
        raise ModelLoadError(f"bottom bundle format {meta.format} is not supported (expected {BUNDLE_FORMAT})")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
        state = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read bottom bundle {folder}: {exc}") from exc
    dtype = next(iter(state.values())).dtype if state else torch.float32
    if config.num_hidden_layers != meta.split:
        raise ModelLoadError(
            f"bottom bundle {folder}: config has {config.num_hidden_layers} blocks, {META} says {meta.split}"
        )
    bottom = whole_base_as_bottom(AutoModel.from_config(config, dtype=dtype))
    missing, unexpected = bottom.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"bottom bundle {folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    bottom.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return bottom, tokenizer, meta
