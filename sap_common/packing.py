"""Packed hidden states: only the real (non-padding) token vectors cross the wire, (N_real, H) with one length per
example. Pure torch (no protobuf, no gRPC), so the server's session validates and unpacks with it and the domain
stays free of the transport (tests/test_layering.py); sap_common.codec re-exports it."""

from __future__ import annotations

from collections.abc import Collection

import torch

from sap_common.errors import InvalidInputError

MAX_PACKED_ROWS = 65536  # most examples one packed request may carry (lengths entries)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of a (B, T) 0/1 mask is ones then zeros, with at least one one."""
    if attention_mask.dim() != 2 or attention_mask.shape[0] == 0 or attention_mask.shape[1] == 0:
        return False
    mask = attention_mask.detach().cpu()
    if ((mask != 0) & (mask != 1)).any():
        return False
    lengths = (mask != 0).sum(-1)
    prefix = torch.arange(mask.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return bool((lengths >= 1).all()) and bool(torch.equal(prefix, mask != 0))


def pack_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(B, T, H) + right-padded (B, T) mask -> (N_real, H) real token vectors, per-example lengths.

    Padding vectors are dropped: unpack_hidden restores them as zeros (what the client sends anyway)."""
    if hidden.dim() != 3 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"pack_hidden: hidden (B, T, H) and mask (B, T) expected, got {tuple(hidden.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if not is_right_padded(attention_mask):
        raise ValueError(
            "pack_hidden: the attention mask must be right-padded (ones, then zeros) with at "
            "least one real token per row"
        )
    mask = attention_mask.detach().to(device=hidden.device, dtype=torch.bool)
    lengths = [int(n) for n in mask.sum(-1).tolist()]
    return hidden.detach()[mask], lengths  # boolean indexing keeps row-major order: example by example


def unpack_hidden(
    packed: torch.Tensor,
    lengths: Collection[int],
    *,
    field: str = "packed_hidden",
    max_rows: int = MAX_PACKED_ROWS,
    max_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_real, H) + lengths -> (B, T_max, H) with zero padding and the (B, T_max) int64 mask (right
    padding). Validating: a malformed request raises InvalidInputError naming the field."""
    lengths = [int(n) for n in lengths]
    lengths_field = "lengths"
    if packed.dim() != 2:
        raise InvalidInputError(f"{field} has shape {list(packed.shape)}; expected (N_real, H)")
    if not lengths:
        raise InvalidInputError(f"{lengths_field} is empty; a packed request needs one length per example")
    if len(lengths) > max_rows:
        raise InvalidInputError(f"{lengths_field} has {len(lengths)} entries; at most {max_rows} allowed")
    bad = next((i for i, n in enumerate(lengths) if n < 1), None)
    if bad is not None:
        raise InvalidInputError(f"{lengths_field}[{bad}]={lengths[bad]}; every example needs >= 1 real token")
    total = sum(lengths)
    if total != packed.shape[0]:
        raise InvalidInputError(
            f"{lengths_field} sum to {total} but {field} has {packed.shape[0]} rows; they must be equal"
        )
    batch, longest = len(lengths), max(lengths)
    padded_bytes = batch * longest * packed.shape[1] * packed.element_size()
    if max_bytes is not None and padded_bytes > max_bytes:
        raise InvalidInputError(
            f"{field} unpacks to ({batch}, {longest}, {packed.shape[1]}), {padded_bytes} "
            f"bytes; at most {max_bytes} allowed"
        )
    lengths_t = torch.tensor(lengths)
    mask = (torch.arange(longest).unsqueeze(0) < lengths_t.unsqueeze(1)).long()  # (B, T)
    hidden = packed.new_zeros(batch, longest, packed.shape[1])  # (B, T, H)
    hidden[mask.bool()] = packed
    return hidden, mask
