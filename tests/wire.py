"""Raw calls of the hot RPCs (Forward, Evaluate, Backward) as frames, for tests that speak to a server through the
generated stub directly: to send what sap-client never would, and to read exactly what comes back."""

from __future__ import annotations

import torch

from sap_common import codec
from sap_common.proto import sap_pb2

CHUNK = 1024  # small data frames, so that every test streams several


def forward_frames(
    session_id: str,
    step: int,
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    lengths: list[int] | None = None,
    output: int = sap_pb2.OUTPUT_LOGITS,
    chunk_bytes: int = CHUNK,
) -> list[sap_pb2.ForwardFrame]:
    """A Forward (or Evaluate, step 0) carrying hidden: (B, T, H) with its right-padded mask, packed here; or
    (N_real, H) already packed, with lengths as given (any, to send malformed ones)."""
    if lengths is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long) if mask is None else mask
        hidden, lengths = codec.pack_hidden(hidden, mask)
    tensor, raw = codec.wire_tensor(hidden)
    header = sap_pb2.ForwardHeader(session_id=session_id, step=step, hidden=tensor, lengths=lengths, output=output)
    return codec.to_frames(sap_pb2.ForwardFrame, header, [raw], chunk_bytes)


def backward_frames(
    session_id: str, step: int, grad: torch.Tensor, chunk_bytes: int = CHUNK
) -> list[sap_pb2.BackwardFrame]:
    tensor, raw = codec.wire_tensor(grad)
    header = sap_pb2.BackwardHeader(session_id=session_id, step=step, grad=tensor)
    return codec.to_frames(sap_pb2.BackwardFrame, header, [raw], chunk_bytes)


def call(method, frames, metadata, timeout: float = 30):
    """(reply header, reply tensors) of a hot call through a raw stub's method (Forward, Evaluate or Backward)."""
    replies = list(method(iter(frames), timeout=timeout, metadata=metadata))
    if not replies:
        raise AssertionError("the server answered with no frame")
    reply_type = type(replies[0])
    fields = ("grad_hidden",) if reply_type is sap_pb2.BackwardReplyFrame else ("tensor",)
    return codec.from_frames(replies, reply_type, fields)


def logits_of(method, frames, metadata) -> tuple[int, torch.Tensor]:
    """(the reply's step, its logits) of a Forward or Evaluate."""
    header, tensors = call(method, frames, metadata)
    return header.step, tensors["tensor"]
