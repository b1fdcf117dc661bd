"""The one serde module between the wire and torch: tensors as headers plus raw bytes, the frames of the hot calls
(a header, then the bytes), the packed encoding of hidden states, and the domain <-> message mappings."""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, fields
from typing import TypeVar

import torch
from google.protobuf.message import DecodeError, Message

from sap_common.devices import DTYPES
from sap_common.errors import InvalidInputError, InvalidTensorError
from sap_common.packing import MAX_PACKED_ROWS, is_right_padded, pack_hidden, unpack_hidden
from sap_common.proto import sap_pb2
from sap_common.service import ServerInfo, SessionSpec

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "MAX_DIMS",
    "MAX_PACKED_ROWS",
    "WIRE_DTYPES",
    "Undecodable",
    "from_frames",
    "header_nbytes",
    "is_right_padded",
    "lenient_parser",
    "pack_hidden",
    "read_messages",
    "to_frames",
    "unpack_hidden",
    "wire_tensor",
]

M = TypeVar("M", bound=Message)
F = TypeVar("F", bound=Message)  # a frame type: oneof frame { header; bytes data }

DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024  # the most tensor bytes one data frame carries
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # gRPC per-message cap, set on both ends
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024 * 1024  # most a whole reassembled message may be
MAX_DIMS = 8

WIRE_DTYPES: dict[str, torch.dtype] = {
    **DTYPES,  # the float dtypes, named once in sap_common.devices
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
    "uint8": torch.uint8,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in WIRE_DTYPES.items()}
_FLOAT_WIRE = frozenset(DTYPES.values())
_BIG_ENDIAN = sys.byteorder == "big"


def _byteswap(flat_u8: torch.Tensor, itemsize: int) -> torch.Tensor:
    """Reverse the byte order of each element in a flat uint8 buffer (big-endian hosts only)."""
    if itemsize == 1:
        return flat_u8
    return flat_u8.view(-1, itemsize).flip(1).reshape(-1)


class Undecodable:
    """Stands for received bytes that do not parse as the expected message (see lenient_parser)."""

    def __init__(self, name: str, size: int, reason: str):
        self.name, self.size, self.reason = name, size, reason

    def error(self) -> InvalidInputError:
        return InvalidInputError(f"{self.size} bytes do not parse as a {self.name}: {self.reason}")


def lenient_parser(message_type: type[M]) -> Callable[[bytes], M | Undecodable]:
    """A request deserializer that never raises: bytes that do not parse become an Undecodable, which the
    servicer answers with INVALID_ARGUMENT (gRPC itself would answer a failing deserializer with INTERNAL)."""
    name = message_type.DESCRIPTOR.name

    def parse(data: bytes) -> M | Undecodable:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError, TypeError) as exc:
            return Undecodable(name, len(data), str(exc) or type(exc).__name__)

    return parse


# --- frames: the hot calls' streams (a header, then the raw bytes of the tensors it describes) ---------------


def wire_tensor(t: torch.Tensor, *, wire_dtype: torch.dtype | None = None) -> tuple[sap_pb2.TensorHeader, torch.Tensor]:
    """(its header, its bytes as a flat little-endian uint8 CPU tensor), optionally cast to a smaller float dtype.
    The bytes are a view of t where t already is a contiguous CPU tensor of that dtype (no copy)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"wire_tensor: expected a torch.Tensor, got {type(t).__name__}")
    t = t.detach().cpu()
    if wire_dtype is not None and wire_dtype != t.dtype:
        if t.dtype not in _FLOAT_WIRE or wire_dtype not in _FLOAT_WIRE:
            raise ValueError(
                f"wire_dtype={wire_dtype} for a {t.dtype} tensor: only float tensors "
                f"(float32, float16, bfloat16) may be cast, and only to one of those"
            )
        t = t.to(wire_dtype)
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise ValueError(f"tensor dtype {t.dtype} cannot go on the wire; valid: {sorted(WIRE_DTYPES)}")
    t = t.contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    if _BIG_ENDIAN:
        raw = _byteswap(raw, t.element_size()).contiguous()
    return sap_pb2.TensorHeader(dtype=name, shape=list(t.shape)), raw


def to_frames(frame_type: type[F], header: Message, tensors: Sequence[torch.Tensor], chunk_bytes: int) -> list[F]:
    """The frames of one call: header first, then the bytes of tensors (uint8, from wire_tensor, in the order of the
    header's tensor fields) in frames of at most chunk_bytes each."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be > 0")
    frames = [frame_type(header=header)]
    for raw in tensors:
        for start in range(0, raw.numel(), chunk_bytes):
            frames.append(frame_type(data=raw[start : start + chunk_bytes].numpy().tobytes()))
    return frames


def header_nbytes(header: sap_pb2.TensorHeader, *, field: str = "tensor") -> int:
    """The byte length a TensorHeader announces (validates its dtype and shape)."""
    dtype = WIRE_DTYPES.get(header.dtype)
    if dtype is None:
        raise InvalidTensorError(f"{field}.dtype={header.dtype!r} is not a wire dtype; valid: {sorted(WIRE_DTYPES)}")
    shape = list(header.shape)
    if len(shape) > MAX_DIMS:
        raise InvalidTensorError(f"{field}.shape has {len(shape)} dims; at most {MAX_DIMS} allowed")
    numel = 1
    for i, dim in enumerate(shape):
        if dim < 0:
            raise InvalidTensorError(f"{field}.shape[{i}]={dim} is negative; dims must be >= 0")
        numel *= dim  # Python ints: no overflow
    return numel * dtype.itemsize


def from_frames(
    frames: Iterable,
    frame_type: type[F],
    tensor_fields: Sequence[str],
    *,
    max_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    allowed: Collection[str] | None = None,
) -> tuple[Message, dict[str, torch.Tensor]]:
    """Read one call's frames: (its header, {field: tensor} for each of tensor_fields the header sets).

    The header comes first and announces every tensor's size, so the bytes are read straight into one buffer of
    that size (no growing, no joining); the tensors are views of it. Validating: a stream that is not one header
    then exactly the announced bytes, a tensor of a dtype not in allowed, or more than max_bytes in all raise
    InvalidInputError naming what is wrong."""
    name = frame_type.DESCRIPTOR.name
    stream = iter(frames)
    first = next(stream, None)
    if first is None:
        raise InvalidInputError(f"{name} stream had 0 frames; expected a header first")
    if isinstance(first, Undecodable):
        raise InvalidInputError(f"{name} stream: frame 1: {first.error()}")
    if first.WhichOneof("frame") != "header":
        raise InvalidInputError(f"{name} stream: frame 1 is {first.WhichOneof('frame')!r}; the header comes first")
    header = first.header
    layout, total = _layout(header, tensor_fields, allowed, max_bytes, name)
    buffer = bytearray(total)
    view = memoryview(buffer)
    filled, count = 0, 1
    for frame in stream:
        count += 1
        if isinstance(frame, Undecodable):
            raise InvalidInputError(f"{name} stream: frame {count}: {frame.error()}")
        if frame.WhichOneof("frame") != "data":
            raise InvalidInputError(f"{name} stream: frame {count} is {frame.WhichOneof('frame')!r}; only data follows")
        size = len(frame.data)
        if filled + size > total:
            raise InvalidInputError(f"{name} stream: more bytes than its header announces ({total})")
        view[filled : filled + size] = frame.data
        filled += size
    if filled != total:
        raise InvalidInputError(f"{name} stream: {filled} bytes of tensors; its header announces {total}")
    return header, _tensors(buffer, layout)


def read_messages(
    frames: Iterable,
    frame_type: type[F],
    tensor_fields: Sequence[str],
    *,
    max_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    allowed: Collection[str] | None = None,
) -> Iterator[tuple[Message, dict[str, torch.Tensor]]]:
    """A stream of several messages (split generation): each a header, then exactly the bytes it announces; yields
    (header, {field: tensor}) as each one is complete, so a reply can go out before the next arrives. Validating
    like from_frames, each message on its own against max_bytes."""
    name = frame_type.DESCRIPTOR.name
    stream = iter(frames)
    count = 0
    for first in stream:
        count += 1
        if isinstance(first, Undecodable):
            raise InvalidInputError(f"{name} stream: frame {count}: {first.error()}")
        if first.WhichOneof("frame") != "header":
            raise InvalidInputError(
                f"{name} stream: frame {count} is {first.WhichOneof('frame')!r}; a header comes before its bytes"
            )
        header = first.header
        layout, total = _layout(header, tensor_fields, allowed, max_bytes, name)
        buffer = bytearray(total)
        view = memoryview(buffer)
        filled = 0
        while filled < total:
            frame = next(stream, None)
            if frame is None:
                raise InvalidInputError(f"{name} stream ended after {filled} of the {total} bytes its header announces")
            count += 1
            if isinstance(frame, Undecodable):
                raise InvalidInputError(f"{name} stream: frame {count}: {frame.error()}")
            if frame.WhichOneof("frame") != "data":
                raise InvalidInputError(
                    f"{name} stream: frame {count} is {frame.WhichOneof('frame')!r}; "
                    f"{total - filled} more bytes of data were announced"
                )
            size = len(frame.data)
            if filled + size > total:
                raise InvalidInputError(f"{name} stream: more bytes than its header announces ({total})")
            view[filled : filled + size] = frame.data
            filled += size
        yield header, _tensors(buffer, layout)


def _layout(
    header: Message, tensor_fields: Sequence[str], allowed: Collection[str] | None, max_bytes: int, name: str
) -> tuple[list, int]:
    """Where each tensor the header announces lies in the message's bytes: ([(field, spec, offset, nbytes)], total);
    refuses a dtype not in allowed and more than max_bytes in all."""
    layout = []
    total = 0
    for field in tensor_fields:
        if not header.HasField(field):
            continue
        spec = getattr(header, field)
        if allowed is not None and spec.dtype not in allowed:
            raise InvalidTensorError(
                f"{field}.dtype={spec.dtype!r} is not allowed here; expected one of {sorted(allowed)}"
            )
        nbytes = header_nbytes(spec, field=field)
        layout.append((field, spec, total, nbytes))
        total += nbytes
    if total > max_bytes:
        raise InvalidInputError(f"{name} stream announces {total} bytes of tensors; at most {max_bytes} allowed")
    return layout, total


def _tensors(buffer: bytearray, layout: list) -> dict[str, torch.Tensor]:
    """The tensors of one message: views of its bytes (copied only to align or to swap the byte order)."""
    total = len(buffer)
    raw = torch.frombuffer(buffer, dtype=torch.uint8) if total else torch.empty(0, dtype=torch.uint8)
    tensors = {}
    for field, spec, offset, nbytes in layout:
        dtype, shape = WIRE_DTYPES[spec.dtype], tuple(spec.shape)
        if nbytes == 0:
            tensors[field] = torch.empty(shape, dtype=dtype)
            continue
        part = raw[offset : offset + nbytes]
        if dtype == torch.bool and int(part.max()) > 1:
            # Any byte other than 0/1 viewed as bool is undefined behaviour in torch.
            raise InvalidTensorError(f"{field} holds a byte > 1 for dtype bool; valid bytes: 0, 1")
        if _BIG_ENDIAN:
            part = _byteswap(part, dtype.itemsize).contiguous()
        elif offset % dtype.itemsize:
            part = part.clone()  # a dtype view needs an aligned start
        tensors[field] = part.view(dtype).reshape(shape)
    return tensors


# --- domain <-> message mappings -------------------------------------------------------------


def info_to_proto(info: ServerInfo, *, max_message_bytes: int, chunk_bytes: int) -> sap_pb2.ServerInfo:
    """ServerInfo (domain) -> sap_pb2.ServerInfo, with the server's wire limits."""
    return sap_pb2.ServerInfo(max_message_bytes=max_message_bytes, chunk_bytes=chunk_bytes, **asdict(info))


def info_from_proto(msg: sap_pb2.ServerInfo) -> ServerInfo:
    values = {f.name: getattr(msg, f.name) for f in fields(ServerInfo)}
    values["start_adapters"] = tuple(values["start_adapters"])
    return ServerInfo(**values)


# sap.proto's Output values by the names SessionSpec.output uses
OUTPUT_OF_NAME = {"logits": sap_pb2.OUTPUT_LOGITS, "pooled": sap_pb2.OUTPUT_POOLED, "hidden": sap_pb2.OUTPUT_HIDDEN}
NAME_OF_OUTPUT: dict[int, str] = {int(value): name for name, value in OUTPUT_OF_NAME.items()}


def output_name(value: int) -> str:
    """The SessionSpec name of a wire Output value (InvalidInputError for a value this release does not know)."""
    if value not in NAME_OF_OUTPUT:
        raise InvalidInputError(f"output={value} is not a known Output value (known: {sorted(NAME_OF_OUTPUT)})")
    return NAME_OF_OUTPUT[value]


def spec_to_proto(spec: SessionSpec) -> sap_pb2.OpenSessionRequest:
    return sap_pb2.OpenSessionRequest(
        num_labels=spec.num_labels,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        train_bottom=spec.train_bottom,
        weight_decay=spec.weight_decay,
        output=OUTPUT_OF_NAME[spec.output],
        user_tail=spec.user_tail,
        start_adapter=spec.start_adapter,
    )


def spec_from_proto(msg: sap_pb2.OpenSessionRequest) -> SessionSpec:
    """Validating: a bad request raises InvalidInputError naming the field."""
    try:
        return SessionSpec(
            num_labels=msg.num_labels,
            learning_rate=msg.learning_rate,
            seed=msg.seed,
            train_bottom=msg.train_bottom,
            weight_decay=msg.weight_decay,
            output=output_name(msg.output),
            user_tail=msg.user_tail,
            start_adapter=msg.start_adapter,
        )
    except ValueError as exc:
        raise InvalidInputError(f"OpenSessionRequest: {exc}") from exc
