"""The bottom bundle: the files a provider sends so a user can run blocks 0..k-1 locally.

Layout of a bundle folder:
    bottom.safetensors   weights of embeddings + blocks 0..k-1
    config.json          the model config truncated to k blocks
    sap_bottom.json      split, total blocks, family, model id
    tokenizer/...        the tokenizer files

The tail bundle (`sap-client train --user-tail M`, the model's last M blocks, which the user then runs with its
own LoRA) has its own layout:
    tail.safetensors     blocks L-M..L-1 (as blocks.0..M-1) and, for decoders, the final norm (head.norm.*), in
                         float32, named as in the TopModel that load_tail builds
    config.json          the whole model's config
    sap_tail.json        first block, total blocks, family, model id
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedTokenizerBase

from sap_common.errors import ModelLoadError
from sap_common.models.families import (
    DECODER,
    LMHead,
    base_blocks,
    family_of,
    pooled_output,
    tail_config,
    truncated_config,
)
from sap_common.models.registry import load_tokenizer
from sap_common.models.split import BottomModel, TopModel, whole_base_as_bottom

WEIGHTS = "bottom.safetensors"
META = "sap_bottom.json"
TOKENIZER_DIR = "tokenizer"
BUNDLE_FORMAT = 1
TAIL_WEIGHTS = "tail.safetensors"
TAIL_META = "sap_tail.json"


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


@dataclass(frozen=True)
class TailMeta:
    model_id: str
    family: str
    model_type: str
    first_block: int
    total_blocks: int
    hidden_size: int
    format: int = BUNDLE_FORMAT

    @property
    def blocks(self) -> int:
        return self.total_blocks - self.first_block


def export_tail(
    config: PretrainedConfig,
    blocks: Sequence[nn.Module],
    final_norm: nn.Module | None,
    model_id: str,
    folder: Path,
) -> TailMeta:
    """Write the tail bundle of the model's last len(blocks) blocks (pretrained, without any PEFT) into folder."""
    state = {}
    for index, block in enumerate(blocks):
        state.update({f"blocks.{index}.{name}": t for name, t in block.state_dict().items()})
    if family_of(config) is DECODER:
        if final_norm is None:
            raise ModelLoadError("a decoder's tail bundle needs the model's final norm")
        state.update({f"head.norm.{name}": t for name, t in final_norm.state_dict().items()})
    # float32 on the CPU whatever the server computes in (--dtype, --device): the user's side runs float32
    state = {
        name: (t.float() if t.is_floating_point() else t).detach().cpu().contiguous().clone()
        for name, t in state.items()
    }
    save_file(state, str(folder / TAIL_WEIGHTS))
    config.save_pretrained(folder)
    total = config.num_hidden_layers
    meta = TailMeta(
        model_id=model_id,
        family=family_of(config).name,
        model_type=config.model_type,
        first_block=total - len(blocks),
        total_blocks=total,
        hidden_size=config.hidden_size,
    )
    (folder / TAIL_META).write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta


def read_tail_meta(folder: Path) -> TailMeta:
    try:
        return TailMeta(**json.loads((folder / TAIL_META).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{folder} is not a valid tail bundle ({TAIL_META}: {exc})") from exc


def load_tail(folder: Path, lm_embedding: nn.Embedding | None = None) -> tuple[TopModel, TailMeta]:
    """The tail as a TopModel over blocks L-M..L-1 that ends in the pooled representation (B, H) (decoders: the
    final norm, then the last real token; encoders: the first token), frozen and in eval mode. With lm_embedding
    (a decoder's input embedding table, tied to its output layer) it ends in next-token logits (B, T, V) instead
    (LMHead), and M may be 0: the final norm alone."""
    meta = read_tail_meta(folder)
    if meta.format != BUNDLE_FORMAT:
        raise ModelLoadError(f"tail bundle format {meta.format} is not supported (expected {BUNDLE_FORMAT})")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        state = load_file(str(folder / TAIL_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read tail bundle {folder}: {exc}") from exc
    least = 0 if lm_embedding is not None else 1
    if config.num_hidden_layers != meta.total_blocks or not least <= meta.blocks <= meta.total_blocks:
        raise ModelLoadError(f"tail bundle {folder}: {TAIL_META} does not match its config")
    if lm_embedding is not None and family_of(config) is not DECODER:
        raise ModelLoadError(f"tail bundle {folder}: next-token logits need a decoder, not {config.model_type}")
    base = AutoModel.from_config(tail_config(config, meta.first_block), dtype=torch.float32)
    # The masks are built from the TopModel's config: it must name the attention the blocks were built with (a config
    # read from disk names none, and an encoder's padding keys then went unmasked).
    config._attn_implementation = base.config._attn_implementation
    blocks = base_blocks(base, family_of(config))
    tail = TopModel(config, blocks, meta.first_block, getattr(base, "rotary_emb", None), pooled_output(config, base))
    missing, unexpected = tail.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.startswith("rotary.")]  # computed from the config, not stored
    if missing or unexpected:
        raise ModelLoadError(
            f"tail bundle {folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if lm_embedding is not None:
        norm = tail.head.norm if isinstance(tail.head, nn.Module) else None
        assert isinstance(norm, nn.Module)  # a decoder's PooledOutput holds its final norm
        tail.head = LMHead(norm, lm_embedding)
    tail.eval()
    tail.requires_grad_(False)
    return tail, meta
