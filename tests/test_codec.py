"""Unit tests of sap_common.codec: tensor round-trips through real frames, corrupt streams, framing."""

from __future__ import annotations

import pytest
import torch

from sap_common import codec
from sap_common.codec import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    WIRE_DTYPES,
    from_frames,
    header_nbytes,
    to_frames,
    wire_tensor,
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


def _frames(t: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES, **kw) -> list[sap_pb2.ForwardFrame]:
    """The frames of a Forward carrying t, as they arrive: every frame serialized and parsed again."""
    header, raw = wire_tensor(t, **kw)
    frames = to_frames(
        sap_pb2.ForwardFrame, sap_pb2.ForwardHeader(session_id="s", step=3, hidden=header), [raw], chunk_bytes
    )
    return [sap_pb2.ForwardFrame.FromString(f.SerializeToString()) for f in frames]


def _decode(frames, **kw) -> torch.Tensor:
    header, tensors = from_frames(frames, sap_pb2.ForwardFrame, ("hidden",), **kw)
    assert header.session_id == "s" and header.step == 3
    return tensors["hidden"]


def _roundtrip(t: torch.Tensor, **kw) -> torch.Tensor:
    return _decode(_frames(t, **kw))


def _announcing(dtype: str, shape: list[int], *data: bytes) -> list[sap_pb2.ForwardFrame]:
    """A stream whose header announces (dtype, shape), followed by the given data frames."""
    header = sap_pb2.ForwardHeader(session_id="s", step=3, hidden=sap_pb2.TensorHeader(dtype=dtype, shape=shape))
    return [sap_pb2.ForwardFrame(header=header), *(sap_pb2.ForwardFrame(data=d) for d in data)]


def _raw_bytes(t: torch.Tensor, **kw) -> bytes:
    return wire_tensor(t, **kw)[1].numpy().tobytes()


# --- tensor round-trips ------------------------------------------------------------------------


def test_whitelist_is_exactly_the_contract() -> None:
    assert set(WIRE_DTYPES) == {"float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8"}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7), (17,), (0,), (2, 0, 3), ()], ids=str)
def test_roundtrip_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _sample(dtype, shape)
    out = _roundtrip(t)
    _assert_bit_exact(out, t)
    header, _ = wire_tensor(t)
    assert header.dtype == codec._DTYPE_NAMES[dtype] and list(header.shape) == list(shape)


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
    assert _raw_bytes(torch.tensor([1, 256], dtype=torch.int32)) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert _raw_bytes(torch.tensor(1.0, dtype=torch.bfloat16)) == b"\x80\x3f"


def test_encode_detaches_autograd_tensors() -> None:
    t = torch.randn(2, 3, requires_grad=True) * 2
    out = _roundtrip(t)
    assert not out.requires_grad
    assert torch.equal(out, t.detach())


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16], ids=str)
def test_wire_dtype_cast_rounds_and_halves_bytes(wire: torch.dtype) -> None:
    t = torch.randn(64, 33, generator=torch.Generator().manual_seed(3))
    assert len(_raw_bytes(t, wire_dtype=wire)) * 2 == len(_raw_bytes(t))
    out = _roundtrip(t, wire_dtype=wire)
    _assert_bit_exact(out, t.to(wire))
    assert not torch.equal(out.float(), t)  # rounding really happened


def test_wire_dtype_same_as_tensor_is_noop() -> None:
    t = torch.arange(5)
    assert _raw_bytes(t, wire_dtype=torch.int64) == _raw_bytes(t)
    assert wire_tensor(t, wire_dtype=torch.int64)[0] == wire_tensor(t)[0]


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
        wire_tensor(t, wire_dtype=wire)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.int8, torch.int16])
def test_encode_rejects_dtype_outside_whitelist(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=str(dtype)):
        wire_tensor(torch.zeros(2, dtype=dtype))


# --- corrupt streams ---------------------------------------------------------------------------


def test_rejects_one_byte_short() -> None:
    frames = _frames(torch.randn(2, 3))
    frames[-1].data = frames[-1].data[:-1]
    with pytest.raises(InvalidInputError, match=r"ForwardFrame stream: 23 bytes.*announces 24"):
        _decode(frames)


def test_rejects_one_byte_extra() -> None:
    frames = _frames(torch.randn(2, 3))
    frames[-1].data = frames[-1].data + b"\x00"
    with pytest.raises(InvalidInputError, match=r"more bytes than its header announces \(24\)"):
        _decode(frames)


def test_rejects_data_on_empty_shape() -> None:
    with pytest.raises(InvalidInputError, match=r"announces \(0\)"):
        _decode(_announcing("float32", [0, 4], b"\x00" * 4))


@pytest.mark.parametrize("dtype", ["float64", "complex64", "", "FLOAT32", "torch.float32"])
def test_rejects_unknown_dtype(dtype: str) -> None:
    with pytest.raises(InvalidTensorError, match=r"hidden\.dtype") as info:
        _decode(_announcing(dtype, [1], b"\x00" * 8))
    assert repr(dtype) in str(info.value)
    assert "bfloat16" in str(info.value)  # says what is valid


def test_rejects_dtype_not_in_allowed() -> None:
    frames = _frames(torch.ones(3))
    with pytest.raises(InvalidTensorError, match=r"hidden\.dtype='float32'.*int64"):
        _decode(frames, allowed={"int64", "bool"})
    assert _decode(frames, allowed=("float32",)).shape == (3,)


def test_rejects_negative_dim() -> None:
    with pytest.raises(InvalidTensorError, match=r"hidden\.shape\[1\]=-1"):
        _decode(_announcing("float32", [2, -1]))


def test_rejects_negative_dims_that_multiply_to_positive() -> None:
    with pytest.raises(InvalidTensorError, match=r"hidden\.shape\[0\]=-2"):
        _decode(_announcing("uint8", [-2, -3], b"\x00" * 6))


def test_rejects_too_many_dims() -> None:
    with pytest.raises(InvalidTensorError, match=r"hidden\.shape has 9 dims.*8"):
        _decode(_announcing("uint8", [1] * 9, b"\x00"))
    assert _decode(_announcing("uint8", [1] * 8, b"\x07")).shape == (1,) * 8


def test_rejects_over_max_bytes_before_reading_the_data() -> None:
    read = []

    def stream():
        for frame in _frames(torch.zeros(10), chunk_bytes=8):  # 40 bytes in 5 data frames
            read.append(frame)
            yield frame

    with pytest.raises(InvalidInputError, match=r"announces 40 bytes.*at most 39"):
        _decode(stream(), max_bytes=39)
    assert len(read) == 1  # only the header was read
    assert _decode(_frames(torch.zeros(10)), max_bytes=40).shape == (10,)


def test_huge_shape_rejected_without_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = sap_pb2.TensorHeader(dtype="float32", shape=[2**40, 2**40])
    assert header_nbytes(huge) == 2**80 * 4  # Python ints: no int64 overflow

    def _no_alloc(*args, **kwargs):
        raise AssertionError("from_frames allocated for a bad stream")

    monkeypatch.setattr(torch, "frombuffer", _no_alloc)
    monkeypatch.setattr(torch, "empty", _no_alloc)
    with pytest.raises(InvalidInputError, match="at most"):
        _decode(_announcing("float32", [2**40, 2**40], b"\x00" * 16), max_bytes=DEFAULT_MAX_MESSAGE_BYTES)


def test_int64_overflowing_shape_rejected() -> None:
    # 2**32 * 2**32 wraps to 0 in int64: an empty stream must not slip through.
    with pytest.raises(InvalidInputError, match="18446744073709551616 bytes"):
        _decode(_announcing("uint8", [2**32, 2**32]))


def test_rejects_bool_bytes_other_than_0_1() -> None:
    with pytest.raises(InvalidTensorError, match="hidden holds a byte > 1"):
        _decode(_announcing("bool", [3], b"\x00\x01\x02"))


def test_header_must_come_first_and_only_data_follows() -> None:
    frames = _frames(torch.randn(4, 4), chunk_bytes=16)
    with pytest.raises(InvalidInputError, match="frame 1 is 'data'; the header comes first"):
        _decode(frames[1:])
    with pytest.raises(InvalidInputError, match="frame 3 is 'header'; only data follows"):
        _decode(frames[:2] + frames[:1] + frames[2:])
    with pytest.raises(InvalidInputError, match="0 frames"):
        _decode(iter(()))


def test_garbage_frames_raise_invalid_input() -> None:
    parse = codec.lenient_parser(sap_pb2.ForwardFrame)
    garbage = parse(b"\xff\xff\xff")
    assert isinstance(garbage, codec.Undecodable)
    with pytest.raises(InvalidInputError, match="frame 1: 3 bytes do not parse as a ForwardFrame"):
        _decode([garbage])
    with pytest.raises(InvalidInputError, match="frame 2: 3 bytes do not parse"):
        _decode(_frames(torch.randn(2))[:1] + [garbage])


def test_truncated_stream_raises_invalid_input() -> None:
    frames = _frames(torch.randn(4096), chunk_bytes=1000)
    with pytest.raises(InvalidInputError, match="14000 bytes of tensors; its header announces 16384"):
        _decode(frames[:-3])


def test_errors_are_invalid_input_and_value_errors() -> None:
    assert issubclass(InvalidTensorError, InvalidInputError)
    assert issubclass(InvalidTensorError, ValueError)


# --- ownership ---------------------------------------------------------------------------------


def test_decoded_tensor_is_writable_and_owns_its_memory() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    frames = _frames(t)
    out = _decode(frames)
    out += 1  # writable, no warning about non-writable buffers
    assert torch.equal(out, t + 1)
    frames[1].data = b"\xff" * 24
    assert torch.equal(out, t + 1)
    assert torch.equal(_roundtrip(t), t)


def test_sent_bytes_are_a_view_without_a_copy_for_a_contiguous_cpu_tensor() -> None:
    t = torch.randn(8, 16)
    _, raw = wire_tensor(t)
    assert raw.data_ptr() == t.data_ptr()  # the one copy is into the frames


@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)], ids=str)
def test_decoded_empty_tensor_is_usable(shape: tuple[int, ...]) -> None:
    frames = _frames(torch.zeros(shape, dtype=torch.bfloat16))
    assert len(frames) == 1  # the header alone
    out = _decode(frames)
    assert out.shape == shape and out.dtype == torch.bfloat16
    assert torch.cat([out, torch.zeros(shape, dtype=torch.bfloat16)]).numel() == 0


def test_big_endian_path_byteswaps() -> None:
    t = torch.tensor([1, 256], dtype=torch.int32)
    raw = t.view(torch.uint8)
    swapped = codec._byteswap(raw, 4)
    assert swapped.tolist() == [0, 0, 0, 1, 0, 0, 1, 0]
    assert codec._byteswap(raw, 1) is raw


# --- framing -----------------------------------------------------------------------------------


def test_constants() -> None:
    assert DEFAULT_CHUNK_BYTES == 2 * 1024 * 1024
    assert DEFAULT_MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    assert DEFAULT_MAX_REQUEST_BYTES == 1024 * 1024 * 1024
    assert DEFAULT_CHUNK_BYTES < DEFAULT_MAX_MESSAGE_BYTES


def test_frames_roundtrip_a_large_tensor() -> None:
    t = torch.randn(3 * 1024, 256, generator=torch.Generator().manual_seed(7))  # 3 MiB
    frames = _frames(t, chunk_bytes=64 * 1024)
    data = frames[1:]
    assert frames[0].WhichOneof("frame") == "header" and len(data) == 48
    assert all(f.WhichOneof("frame") == "data" and len(f.data) == 64 * 1024 for f in data)
    assert b"".join(f.data for f in data) == _raw_bytes(t)
    _assert_bit_exact(_decode(frames), t)


def test_exact_multiple_has_no_trailing_empty_frame() -> None:
    frames = _frames(torch.zeros(25), chunk_bytes=10)  # 100 bytes
    assert len(frames) == 11 and all(len(f.data) == 10 for f in frames[1:])


def test_default_chunk_size_gives_one_data_frame_for_a_small_tensor() -> None:
    frames = _frames(torch.randn(16, 16))
    assert len(frames) == 2


@pytest.mark.parametrize("bad", [0, -1])
def test_chunk_bytes_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match=f"chunk_bytes={bad}"):
        to_frames(sap_pb2.ForwardFrame, sap_pb2.ForwardHeader(), [], chunk_bytes=bad)


def test_a_header_without_the_tensor_reads_as_none() -> None:
    header, tensors = from_frames(
        [sap_pb2.BackwardReplyFrame(header=sap_pb2.BackwardReplyHeader(applied_step=2))],
        sap_pb2.BackwardReplyFrame,
        ("grad_hidden",),
    )
    assert header.applied_step == 2 and tensors == {}
