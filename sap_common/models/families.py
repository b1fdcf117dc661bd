"""Architecture families SAP can split: how to embed, run a slice of blocks and classify for each."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from sap_common.errors import UnsupportedModelError

ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta"})
DECODER_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


@dataclass(frozen=True)
class Family:
    """Names and paths that differ between encoder and decoder architectures."""

    name: str  # "encoder" | "decoder"
    # Paths inside one block, relative to the block.
    lora_targets: tuple[str, ...]  # attention projections LoRA adapts
    attention_out: str  # projection after attention (Houlsby adapter goes after it)
    mlp_out: str  # projection closing the MLP (second adapter goes after it)

    # Families are compared by identity (`family is ENCODER`): copies must stay the same object.
    def __copy__(self) -> Family:
        return self

    def __deepcopy__(self, memo: dict) -> Family:
        return self


ENCODER = Family(
    name="encoder",
    lora_targets=("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    attention_out="attention.output.dense",
    mlp_out="output.dense",
)
DECODER = Family(
    name="decoder",
    lora_targets=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    attention_out="self_attn.o_proj",
    mlp_out="mlp.down_proj",
)


def family_of(config: PretrainedConfig) -> Family:
    """The family of a transformers config, or UnsupportedModelError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type in ENCODER_TYPES:
        return ENCODER
    if model_type in DECODER_TYPES:
        return DECODER
    supported = ", ".join(sorted(ENCODER_TYPES | DECODER_TYPES))
    raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {supported}")


def base_blocks(base: Any, family: Family) -> nn.ModuleList:
    """The transformer blocks of a base (headless) model, in order (base: a transformers model, whose submodules
    are named per architecture)."""
    return base.encoder.layer if family is ENCODER else base.layers


def embed(base_embeddings: nn.Module, family: Family, input_ids: torch.Tensor) -> torch.Tensor:
    """Token ids (B, T) -> first hidden states (B, T, H)."""
    if family is ENCODER:
        # BertEmbeddings/RobertaEmbeddings add positions (and zero token types) themselves.
        return base_embeddings(input_ids=input_ids)
    return base_embeddings(input_ids)


def _layer_type(config: PretrainedConfig, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    if getattr(config, "model_type", "") == "mistral" and getattr(config, "sliding_window", None):
        return "sliding_attention"
    return "full_attention"


def run_blocks(
    config: PretrainedConfig,
    family: Family,
    blocks: nn.ModuleList,
    first_index: int,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    rotary: nn.Module | None,
    cache: KVCache | None = None,
) -> torch.Tensor:
    """Run blocks first_index.. of the original model on hidden (B, T, H) with a (B, T) padding mask.

    With a cache (decoders, generation): hidden holds the next T positions of sequences whose cache.length earlier
    positions these blocks have seen; their keys and values are read from the cache and the new ones added.

    The blocks may sit on different devices (sap-server --device-map): the hidden states move to each
    block's device, the masks and positions once per device; the result is on the last block's device."""
    if len(blocks) == 0:
        return hidden
    if cache is not None and family is ENCODER:
        raise ValueError("an encoder has no key/value cache: it does not generate")
    if family is ENCODER:
        mask_on = _per_device(
            create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
        )
        for block in blocks:
            device = _device_of(block, hidden.device)
            hidden = block(hidden.to(device), attention_mask=mask_on(device))
        return hidden
    # Decoder: causal + padding masks, rotary positions 0..T-1 (right padding, as in the unsplit model).
    if rotary is None:
        raise ValueError("a decoder's blocks need the model's rotary position embedding, got None")
    start = cache.length if cache is not None else 0
    position_ids = torch.arange(start, start + hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)
    if start:  # the mask covers the cached positions too (all real: one sequence grows token by token)
        seen = attention_mask.new_ones(attention_mask.shape[0], start)
        attention_mask = torch.cat([seen, attention_mask.to(seen.device)], dim=1)
    mask_kwargs = dict(
        config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache, position_ids=position_ids
    )
    positions_on = _per_device((position_ids, rotary(hidden, position_ids)))
    masks_on: dict[str, Callable[[torch.device], object]] = {}
    for offset, block in enumerate(blocks):
        kind = _layer_type(config, first_index + offset)
        if kind not in masks_on:
            masks_on[kind] = _per_device(
                create_causal_mask(**mask_kwargs)
                if kind == "full_attention"
                else create_sliding_window_causal_mask(**mask_kwargs)
            )
        device = _device_of(block, hidden.device)
        block_positions, position_embeddings = positions_on(device)
        hidden = block(
            hidden.to(device),
            attention_mask=masks_on[kind](device),
            position_ids=block_positions,
            position_embeddings=position_embeddings,
            cache=cache,
            use_cache=cache is not None,
        )
    if cache is not None:
        cache.length += hidden.shape[1]
    return hidden


class KVCache:
    """The keys and values one side's decoder blocks computed for the earlier positions of the sequences it
    generates (split generation: the user's bottom and tail and the provider's top each keep their own), by block.

    It offers what transformers' attention and mask builders ask of a cache (update, get_seq_length,
    get_query_offset, get_mask_sizes) and nothing else: a slice of blocks numbered from k has no blocks 0..k-1,
    which transformers' own caches index by position. Keys and values are kept whole, sliding-window layers too
    (their mask hides what is out of the window)."""

    is_compileable = False

    def __init__(self) -> None:
        self.length = 0  # positions seen; run_blocks advances it once all its blocks ran
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Add a block's new keys and values (B, heads, T, head_dim); return all of that block's so far."""
        if layer_idx in self._layers:
            old_keys, old_values = self._layers[layer_idx]
            keys, values = torch.cat([old_keys, keys], dim=-2), torch.cat([old_values, values], dim=-2)
        self._layers[layer_idx] = (keys, values)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(key/value length, offset) the attention of query_length new positions sees."""
        return self.length + query_length, 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._layers.values())


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else default


def _per_device(value):
    """value (a tensor, None, or a tuple of them) -> a function giving it on a device, moved once per device."""
    copies: dict[torch.device, object] = {}

    def move(item, device):
        if isinstance(item, torch.Tensor):
            return item.to(device)
        if isinstance(item, tuple):
            return tuple(move(part, device) for part in item)
        return item

    def on(device: torch.device):
        if device not in copies:
            copies[device] = move(value, device)
        return copies[device]

    return on


class EncoderHead(nn.Module):
    """BERT-style: pooler on the first token -> dropout -> linear classifier (as BertForSequenceClassification)."""

    def __init__(self, config: PretrainedConfig, pooler: nn.Module | None, num_labels: int):
        super().__init__()
        self.pooler = pooler
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.pooler(hidden) if self.pooler is not None else hidden[:, 0]  # (B, H)
        return self.classifier(self.dropout(pooled))  # (B, C)


class RobertaHead(nn.Module):
    """RoBERTa-style: dense + tanh on the first token -> out_proj (as RobertaClassificationHead)."""

    def __init__(self, config: PretrainedConfig, num_labels: int):
        super().__init__()
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.dropout(hidden[:, 0])  # (B, H)
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)  # (B, C)


def last_real_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B, H): each example's rightmost real token (right and left padding alike)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (positions * attention_mask.to(device=hidden.device, dtype=positions.dtype)).argmax(-1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class LastTokenHead(nn.Module):
    """Decoder-style: final norm, then a linear score of the last non-padding token."""

    def __init__(self, config: PretrainedConfig, final_norm: nn.Module, num_labels: int):
        super().__init__()
        self.norm = final_norm
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score(last_real_token(self.norm(hidden), attention_mask))  # (B, C)


class PooledOutput(nn.Module):
    """The top of a session whose user keeps the task head (--private-head): the representation a head reads, (B, H).
    Decoders: the final norm, then the last real token; encoders: the first token of the last block's output (which
    ends in its own LayerNorm). Nothing here trains, and nothing here depends on the number of classes."""

    def __init__(self, config: PretrainedConfig, final_norm: nn.Module | None):
        super().__init__()
        self.norm = final_norm

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.norm is None:  # an encoder
            return hidden[:, 0]
        return last_real_token(self.norm(hidden), attention_mask)


class PackedOutput(nn.Module):
    """The end of a session whose user runs the model's last blocks itself (--user-tail): the last block's output
    at the real tokens, packed (N_real, H) in the order the client sent them; no norm, nothing trains."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return hidden[attention_mask.to(hidden.device).bool()]


class LMHead(nn.Module):
    """The end of a decoder on the user's side in generative fine-tuning: the final norm, then next-token logits
    (B, T, V) from the input embedding table, which a tied model's output layer is (the user's bottom holds it).
    Nothing here trains."""

    def __init__(self, final_norm: nn.Module, embedding: nn.Embedding):
        super().__init__()
        self.norm = final_norm
        self.embedding = embedding  # the bottom's own module: shared, not copied

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.norm(hidden), self.embedding.weight)


def pooled_output(config: PretrainedConfig, base: Any) -> PooledOutput:
    """The pooling end of a headless session's top, over the base's frozen final norm (decoders)."""
    return PooledOutput(config, base.norm if family_of(config) is DECODER else None)


def new_head(config: PretrainedConfig, base: Any, num_labels: int, generator: torch.Generator) -> nn.Module:
    """A freshly initialised classification head over the base's frozen pooler or final norm."""
    family = family_of(config)
    head: nn.Module
    if family is DECODER:
        head = LastTokenHead(config, base.norm, num_labels)
    elif config.model_type == "bert":
        head = EncoderHead(config, getattr(base, "pooler", None), num_labels)
    else:
        head = RobertaHead(config, num_labels)
    std = getattr(config, "initializer_range", 0.02)
    for module in head.modules():
        if isinstance(module, nn.Linear) and _is_new(module, base):
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.zero_()
    return head


def _is_new(module: nn.Module, base: nn.Module) -> bool:
    return all(module is not existing for existing in base.modules())


def truncated_config(config: PretrainedConfig, num_blocks: int) -> PretrainedConfig:
    """A copy of config describing only the first num_blocks blocks (the user's bottom)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = num_blocks
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:num_blocks])
    return config


def tail_config(config: PretrainedConfig, first: int) -> PretrainedConfig:
    """A copy of config that builds only blocks first..L-1 (the user's tail), each with the layer type it has in
    the whole model, and a two-row vocabulary: the tail never embeds a token, so the table would be dead weight."""
    config = copy.deepcopy(config)
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[first:])
    config.num_hidden_layers = config.num_hidden_layers - first
    config.vocab_size = 2
    if getattr(config, "pad_token_id", None) is not None:
        config.pad_token_id = 0
    return config
