"""Unit tests of sap_common.codec: tensor round-trips, corrupt payloads and chunk framing."""

from __future__ import annotations

import pytest
import torch

from sap_common import codec
from sap_common.codec import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    WIRE_DTYPES,
    decode_tensor,
    encode_tensor,
    from_chunks,
    tensor_nbytes,
    to_chunks,
)
from sap_common.errors import InvalidInputError, InvalidTensorError
from sap_common.proto import sap_pb2

ALL_DTYPES = list(WIRE_DTYPES.values())


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if dtype in (torch.int64, torch.int32):
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)
    return (torch.randn(shape, generator=g) * 100).to(dtype)


def _assert_bit_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    if a.numel():
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _roundtrip(t: torch.Tensor, **kw) -> torch.Tensor:
    msg = encode_tensor(t, **kw)
    wire = sap_pb2.Tensor.FromString(msg.SerializeToString())
    return decode_tensor(wire)


# --- tensor round-trips ------------------------------------------------------------------------


def test_whitelist_is_exactly_the_contract() -> None:
    assert set(WIRE_DTYPES) == {"float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8"}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7), (17,), (0,), (2, 0, 3), ()], ids=str)
def test_roundtrip_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _sample(dtype, shape)
    out = _roundtrip(t)
    _assert_bit_exact(out, t)
    assert encode_tensor(t).dtype == codec._DTYPE_NAMES[dtype]
    assert list(encode_tensor(t).shape) == list(shape)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_roundtrip_non_contiguous(dtype: torch.dtype) -> None:
    base = _sample(dtype, (4, 6), seed=1)
    for t in (base.t(), base[:, ::2], base.unsqueeze(0).expand(3, 4, 6)):
        assert not t.is_contiguous()
        out = _roundtrip(t)
        _assert_bit_exact(out, t.contiguous())
        assert out.is_contiguous()


def test_special_float_values_survive() -> None:
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38])
    out = _roundtrip(t)
    _assert_bit_exact(out, t)


def test_bytes_are_little_endian() -> None:
    msg = encode_tensor(torch.tensor([1, 256], dtype=torch.int32))
    assert msg.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert encode_tensor(torch.tensor(1.0, dtype=torch.bfloat16)).data == b"\x80\x3f"


def test_encode_detaches_autograd_tensors() -> None:
    t = torch.randn(2, 3, requires_grad=True) * 2
    out = _roundtrip(t)
    assert not out.requires_grad
    assert torch.equal(out, t.detach())


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16], ids=str)
def test_wire_dtype_cast_rounds_and_halves_bytes(wire: torch.dtype) -> None:
    t = torch.randn(64, 33, generator=torch.Generator().manual_seed(3))
    full = encode_tensor(t)
    half = encode_tensor(t, wire_dtype=wire)
    assert len(half.data) * 2 == len(full.data)
    out = decode_tensor(half)
    _assert_bit_exact(out, t.to(wire))
    assert not torch.equal(out.float(), t)  # rounding really happened


def test_wire_dtype_same_as_tensor_is_noop() -> None:
    t = torch.arange(5)
    assert encode_tensor(t, wire_dtype=torch.int64) == encode_tensor(t)


@pytest.mark.parametrize(
    ("t", "wire"),
    [
        (torch.arange(4), torch.float16),
        (torch.randn(4), torch.int32),
        (torch.randn(4), torch.float64),
        (torch.ones(4, dtype=torch.bool), torch.float32),
    ],
)
def test_wire_dtype_rejects_non_float_casts(t: torch.Tensor, wire: torch.dtype) -> None:
    with pytest.raises(ValueError, match="wire_dtype"):
        encode_tensor(t, wire_dtype=wire)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.int8, torch.int16])
def test_encode_rejects_dtype_outside_whitelist(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=str(dtype)):
        encode_tensor(torch.zeros(2, dtype=dtype))


# --- corrupt payloads --------------------------------------------------------------------------


def _good(shape: tuple[int, ...] = (2, 3)) -> sap_pb2.Tensor:
    return encode_tensor(torch.randn(shape))


def test_rejects_one_byte_short() -> None:
    msg = _good()
    msg.data = msg.data[:-1]
    with pytest.raises(InvalidTensorError, match=r"hidden_states\.data has 23 bytes.*exactly 24"):
        decode_tensor(msg, field="hidden_states")


def test_rejects_one_byte_extra() -> None:
    msg = _good()
    msg.data = msg.data + b"\x00"
    with pytest.raises(InvalidTensorError, match=r"grad_logits\.data has 25 bytes.*exactly 24"):
        decode_tensor(msg, field="grad_logits")


def test_rejects_data_on_empty_shape() -> None:
    msg = sap_pb2.Tensor(dtype="float32", shape=[0, 4], data=b"\x00" * 4)
    with pytest.raises(InvalidTensorError, match="logits"):
        decode_tensor(msg, field="logits")


@pytest.mark.parametrize("dtype", ["float64", "complex64", "", "FLOAT32", "torch.float32"])
def test_rejects_unknown_dtype(dtype: str) -> None:
    msg = sap_pb2.Tensor(dtype=dtype, shape=[1], data=b"\x00" * 8)
    with pytest.raises(InvalidTensorError, match="attention_mask.dtype") as info:
        decode_tensor(msg, field="attention_mask")
    assert repr(dtype) in str(info.value)
    assert "bfloat16" in str(info.value)  # says what is valid


def test_rejects_dtype_not_in_allowed() -> None:
    msg = encode_tensor(torch.ones(3))
    with pytest.raises(InvalidTensorError, match=r"attention_mask\.dtype='float32'.*int64"):
        decode_tensor(msg, field="attention_mask", allowed={"int64", "bool"})
    assert decode_tensor(msg, allowed=("float32",)).shape == (3,)


def test_rejects_negative_dim() -> None:
    msg = sap_pb2.Tensor(dtype="float32", shape=[2, -1], data=b"")
    with pytest.raises(InvalidTensorError, match=r"logits\.shape\[1\]=-1"):
        decode_tensor(msg, field="logits")


def test_rejects_negative_dims_that_multiply_to_positive() -> None:
    msg = sap_pb2.Tensor(dtype="uint8", shape=[-2, -3], data=b"\x00" * 6)
    with pytest.raises(InvalidTensorError, match=r"x\.shape\[0\]=-2"):
        decode_tensor(msg, field="x")


def test_rejects_too_many_dims() -> None:
    msg = sap_pb2.Tensor(dtype="uint8", shape=[1] * 9, data=b"\x00")
    with pytest.raises(InvalidTensorError, match=r"x\.shape has 9 dims.*8"):
        decode_tensor(msg, field="x")
    ok = sap_pb2.Tensor(dtype="uint8", shape=[1] * 8, data=b"\x07")
    assert decode_tensor(ok).shape == (1,) * 8


def test_rejects_over_max_bytes() -> None:
    msg = encode_tensor(torch.zeros(10))  # 40 bytes
    with pytest.raises(InvalidTensorError, match=r"hidden_states.*40 bytes.*at most 39"):
        decode_tensor(msg, field="hidden_states", max_bytes=39)
    assert decode_tensor(msg, max_bytes=40).shape == (10,)


def test_huge_shape_rejected_without_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    def _no_alloc(*args, **kwargs):
        raise AssertionError("decode_tensor allocated for a bad message")

    monkeypatch.setattr(torch, "frombuffer", _no_alloc)
    monkeypatch.setattr(torch, "empty", _no_alloc)
    huge = sap_pb2.Tensor(dtype="float32", shape=[2**40, 2**40], data=b"\x00" * 16)
    assert tensor_nbytes(huge) == 2**80 * 4  # Python ints: no int64 overflow
    with pytest.raises(InvalidTensorError, match=r"hidden_states\.data has 16 bytes"):
        decode_tensor(huge, field="hidden_states")
    with pytest.raises(InvalidTensorError, match="at most"):
        decode_tensor(huge, field="hidden_states", max_bytes=DEFAULT_MAX_MESSAGE_BYTES)


def test_int64_overflowing_shape_rejected() -> None:
    # 2**32 * 2**32 wraps to 0 in int64: an empty data field must not slip through.
    msg = sap_pb2.Tensor(dtype="uint8", shape=[2**32, 2**32], data=b"")
    with pytest.raises(InvalidTensorError, match="need exactly 18446744073709551616"):
        decode_tensor(msg, field="x")


def test_rejects_bool_bytes_other_than_0_1() -> None:
    msg = sap_pb2.Tensor(dtype="bool", shape=[3], data=b"\x00\x01\x02")
    with pytest.raises(InvalidTensorError, match="mask"):
        decode_tensor(msg, field="mask")


def test_default_field_name_is_tensor() -> None:
    with pytest.raises(InvalidTensorError, match=r"^tensor\.dtype"):
        decode_tensor(sap_pb2.Tensor(dtype="float64"))


def test_errors_are_invalid_input_and_value_errors() -> None:
    assert issubclass(InvalidTensorError, InvalidInputError)
    assert issubclass(InvalidTensorError, ValueError)


# --- ownership ---------------------------------------------------------------------------------


def test_decoded_tensor_is_writable_and_owns_its_memory() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    msg = encode_tensor(t)
    out = decode_tensor(msg)
    out += 1  # writable, no warning about non-writable buffers
    assert torch.equal(out, t + 1)
    msg.data = b"\xff" * 24
    assert torch.equal(out, t + 1)
    again = decode_tensor(encode_tensor(t))
    assert torch.equal(again, t)


@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)], ids=str)
def test_decoded_empty_tensor_is_usable(shape: tuple[int, ...]) -> None:
    out = decode_tensor(encode_tensor(torch.zeros(shape, dtype=torch.bfloat16)))
    assert out.shape == shape and out.dtype == torch.bfloat16
    assert torch.cat([out, torch.zeros(shape, dtype=torch.bfloat16)]).numel() == 0


def test_big_endian_path_byteswaps() -> None:
    t = torch.tensor([1, 256], dtype=torch.int32)
    raw = t.view(torch.uint8)
    swapped = codec._byteswap(raw, 4)
    assert swapped.tolist() == [0, 0, 0, 1, 0, 0, 1, 0]
    assert codec._byteswap(raw, 1) is raw


# --- chunk framing -----------------------------------------------------------------------------


def _forward_request(nbytes: int) -> sap_pb2.ForwardRequest:
    hidden = torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(7)).reshape(-1, 256)
    return sap_pb2.ForwardRequest(
        session_id="s-1",
        step=3,
        hidden_states=encode_tensor(hidden),
        attention_mask=encode_tensor(torch.ones(4, 8, dtype=torch.int64)),
    )


def test_constants() -> None:
    assert DEFAULT_CHUNK_BYTES == 2 * 1024 * 1024
    assert DEFAULT_MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    assert DEFAULT_MAX_REQUEST_BYTES == 1024 * 1024 * 1024
    assert DEFAULT_CHUNK_BYTES < DEFAULT_MAX_MESSAGE_BYTES


def test_chunks_roundtrip_large_message() -> None:
    req = _forward_request(3 * 1024 * 1024)
    chunks = list(to_chunks(req, chunk_bytes=64 * 1024))
    assert len(chunks) > 40
    assert all(len(c.data) <= 64 * 1024 for c in chunks)
    assert all(len(c.data) == 64 * 1024 for c in chunks[:-1])
    assert b"".join(c.data for c in chunks) == req.SerializeToString()
    out = from_chunks(iter(chunks), sap_pb2.ForwardRequest)
    assert out == req
    _assert_bit_exact(decode_tensor(out.hidden_states), decode_tensor(req.hidden_states))


def test_chunks_exact_multiple_has_no_trailing_empty_chunk() -> None:
    msg = sap_pb2.Chunk(data=b"x" * 98)  # serializes to 100 bytes
    assert len(msg.SerializeToString()) == 100
    chunks = list(to_chunks(msg, chunk_bytes=10))
    assert len(chunks) == 10 and all(len(c.data) == 10 for c in chunks)


def test_default_chunk_size_gives_one_chunk_for_small_message() -> None:
    req = _forward_request(1024)
    chunks = list(to_chunks(req))
    assert len(chunks) == 1
    assert from_chunks(chunks, sap_pb2.ForwardRequest) == req


def test_empty_message_is_one_empty_chunk() -> None:
    chunks = list(to_chunks(sap_pb2.ForwardReply()))
    assert len(chunks) == 1 and chunks[0].data == b""
    assert from_chunks(chunks, sap_pb2.ForwardReply) == sap_pb2.ForwardReply()


@pytest.mark.parametrize("bad", [0, -1])
def test_chunk_bytes_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match=f"chunk_bytes={bad}"):
        list(to_chunks(sap_pb2.ForwardReply(step=1), chunk_bytes=bad))


def test_from_chunks_max_bytes_stops_reading_early() -> None:
    req = _forward_request(64 * 1024)
    consumed = 0

    def stream():
        nonlocal consumed
        for chunk in to_chunks(req, chunk_bytes=1024):
            consumed += 1
            yield chunk

    with pytest.raises(InvalidInputError, match=r"ForwardRequest.*max_bytes=4096"):
        from_chunks(stream(), sap_pb2.ForwardRequest, max_bytes=4096)
    assert consumed == 5  # the fifth chunk crossed the limit; nothing after it was read
    size = len(req.SerializeToString())
    assert from_chunks(to_chunks(req, 1024), sap_pb2.ForwardRequest, max_bytes=size) == req


def test_from_chunks_garbage_raises_invalid_input() -> None:
    chunks = [sap_pb2.Chunk(data=b"\xff\xff\xff"), sap_pb2.Chunk(data=b"\xff\xff")]
    with pytest.raises(InvalidInputError, match="BackwardRequest"):
        from_chunks(chunks, sap_pb2.BackwardRequest)


def test_from_chunks_truncated_stream_raises_invalid_input() -> None:
    chunks = list(to_chunks(_forward_request(16 * 1024), chunk_bytes=1000))
    with pytest.raises(InvalidInputError, match="ForwardRequest"):
        from_chunks(chunks[:-3], sap_pb2.ForwardRequest)


def test_from_chunks_zero_chunks_raises() -> None:
    with pytest.raises(InvalidInputError, match=r"EvaluateRequest.*0 chunks"):
        from_chunks(iter(()), sap_pb2.EvaluateRequest)
