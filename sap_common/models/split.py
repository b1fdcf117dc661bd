"""Cut a transformer at block k into the user's BottomModel and the provider's TopModel."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from sap_common.errors import ModelLoadError
from sap_common.models.families import (
    DECODER,
    ENCODER,
    EncoderHead,
    KVCache,
    LastTokenHead,
    RobertaHead,
    base_blocks,
    embed,
    family_of,
    run_blocks,
)


class BottomModel(nn.Module):
    """Embeddings + blocks 0..k-1: runs on the user's machine; input ids never leave it."""

    def __init__(
        self, config: PretrainedConfig, embeddings: nn.Module, blocks: nn.ModuleList, rotary: nn.Module | None
    ):
        super().__init__()
        self.config = config
        self.family = family_of(config)
        self.embeddings = embeddings
        self.blocks = blocks
        self.rotary = rotary

    @property
    def split(self) -> int:
        return len(self.blocks)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """input_ids (B, T) -> the last bottom block's output (B, T, H); with a cache, of the next T positions."""
        hidden = embed(self.embeddings, self.family, input_ids)  # (B, T, H)
        return run_blocks(self.config, self.family, self.blocks, 0, hidden, attention_mask, self.rotary, cache)

    def input_embedding_matrix(self) -> torch.Tensor:
        """The token embedding table (V, H) (what an inversion attacker compares against)."""
        embeddings: Any = self.embeddings
        table = embeddings.word_embeddings if self.family is ENCODER else embeddings
        return table.weight


class TopModel(nn.Module):
    """Blocks k..L-1 and the classification head: stays with the provider."""

    def __init__(
        self,
        config: PretrainedConfig,
        blocks: nn.ModuleList,
        first_index: int,
        rotary: nn.Module | None,
        head: nn.Module | None = None,
    ):
        super().__init__()
        self.config = config
        self.family = family_of(config)
        self.blocks = blocks
        self.first_index = first_index
        self.rotary = rotary
        self.head = head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """hidden (B, T, H) from the user's bottom, attention_mask (B, T) -> what the head makes of the last block's
        output (logits (B, C), ...); with a cache (generation), of the next T positions."""
        if self.head is None:
            raise ModelLoadError("this TopModel has no classification head yet (a session attaches one)")
        hidden = run_blocks(
            self.config, self.family, self.blocks, self.first_index, hidden, attention_mask, self.rotary, cache
        )
        return self.head(hidden, attention_mask.to(hidden.device))  # the last block's device (--device-map)


def _embeddings(base: Any, config: PretrainedConfig) -> nn.Module:
    return base.embeddings if family_of(config) is ENCODER else base.embed_tokens


def check_split(k: int, total_blocks: int) -> None:
    """Raise ModelLoadError unless 0 <= k < total_blocks."""
    if not 0 <= k < total_blocks:
        raise ModelLoadError(
            f"split k={k} is out of range: the model has {total_blocks} blocks, so k must be in 0..{total_blocks - 1}"
        )


def split_base(base: PreTrainedModel, k: int) -> tuple[BottomModel, TopModel]:
    """Split a headless base model (BertModel, LlamaModel, ...) at block k; modules are shared, not copied."""
    config = base.config
    blocks = base_blocks(base, family_of(config))
    check_split(k, len(blocks))
    rotary = getattr(base, "rotary_emb", None)
    bottom = BottomModel(config, _embeddings(base, config), nn.ModuleList(blocks[:k]), rotary)
    top = TopModel(config, nn.ModuleList(blocks[k:]), k, rotary)
    return bottom, top


def whole_base_as_bottom(base: PreTrainedModel) -> BottomModel:
    """A BottomModel over every block of base (a user's truncated copy holds exactly its k blocks)."""
    config = base.config
    return BottomModel(
        config, _embeddings(base, config), base_blocks(base, family_of(config)), getattr(base, "rotary_emb", None)
    )


def split_sequence_classifier(model: Any, k: int) -> tuple[BottomModel, TopModel]:
    """Split a transformers *ForSequenceClassification model, reusing its own head (for checks)."""
    base = model.base_model
    bottom, top = split_base(base, k)
    config = base.config
    num_labels = model.config.num_labels
    head: Any
    if family_of(config) is DECODER:
        head = LastTokenHead(config, base.norm, num_labels)
        head.score = model.score
    elif config.model_type == "bert":
        head = EncoderHead(config, base.pooler, num_labels)
        head.dropout, head.classifier = model.dropout, model.classifier
    else:
        head = RobertaHead(config, num_labels)
        head.dropout, head.dense, head.out_proj = (
            model.classifier.dropout,
            model.classifier.dense,
            model.classifier.out_proj,
        )
    top.head = head
    return bottom, top
