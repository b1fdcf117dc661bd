"""Lean wire: packed real tokens (no padding on the wire) and --wire-dtype float32|bfloat16|float16."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
import wire

from conftest import running_server
from sap_client.cli import main as client_main
from sap_client.remote import RemoteTopService
from sap_common import codec
from sap_common.errors import InvalidInputError
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_common.proto import sap_pb2, sap_pb2_grpc
from sap_common.service import SessionSpec
from sap_server.provider import Provider
from tiny_models import learnable_rows, write_csv

HIDDEN = 32  # tiny models' hidden size
LENGTHS = [64, 8, 8, 8, 16, 4, 4, 32]  # mixed lengths: 144 real tokens of 8 x 64 padded slots


def _padded(lengths: list[int], hidden: int = HIDDEN, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max, H) with zero padding (as the client sends it) and the right-padded (B, T_max) mask."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(max(lengths)).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    h = torch.randn(len(lengths), max(lengths), hidden, generator=g) * mask.unsqueeze(-1)
    return h, mask


# --- pack / unpack --------------------------------------------------------------------------------


def test_pack_unpack_round_trip_is_exact():
    hidden, mask = _padded(LENGTHS)
    packed, lengths = codec.pack_hidden(hidden, mask)
    assert lengths == LENGTHS and tuple(packed.shape) == (sum(LENGTHS), HIDDEN)
    assert torch.equal(packed[: LENGTHS[0]], hidden[0, : LENGTHS[0]])
    assert torch.equal(packed[LENGTHS[0] : LENGTHS[0] + LENGTHS[1]], hidden[1, : LENGTHS[1]])
    back, back_mask = codec.unpack_hidden(packed, lengths)
    assert torch.equal(back, hidden) and torch.equal(back_mask, mask) and back_mask.dtype == torch.int64


def test_pack_round_trip_through_the_wire_in_bfloat16():
    hidden, mask = _padded([3, 1, 5])
    packed, lengths = codec.pack_hidden(hidden, mask)
    header, raw = codec.wire_tensor(packed, wire_dtype=torch.bfloat16)
    assert header.dtype == "bfloat16" and raw.numel() == sum(lengths) * HIDDEN * 2
    frames = codec.to_frames(sap_pb2.ForwardFrame, sap_pb2.ForwardHeader(hidden=header, lengths=lengths), [raw], 64)
    _, tensors = codec.from_frames(frames, sap_pb2.ForwardFrame, ("hidden",))
    back, back_mask = codec.unpack_hidden(tensors["hidden"], lengths)
    assert back.dtype == torch.bfloat16 and torch.equal(back_mask, mask)
    assert torch.equal(back, hidden.to(torch.bfloat16))  # padding still exactly zero


def test_pack_refuses_a_mask_that_is_not_right_padded():
    hidden, _ = _padded([3, 3])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert not codec.is_right_padded(left)
    with pytest.raises(ValueError, match="right-padded"):
        codec.pack_hidden(hidden, left)
    with pytest.raises(ValueError, match="right-padded"):
        codec.pack_hidden(hidden, torch.tensor([[1, 1, 1], [0, 0, 0]]))  # a row with no real token


@pytest.mark.parametrize(
    ("packed_shape", "lengths", "words"),
    [
        ((10, HIDDEN), [4, 5], ("lengths", "sum to 9", "10 rows")),
        ((10, HIDDEN), [4, 0, 6], ("lengths[1]=0", ">= 1")),
        ((10, HIDDEN), [], ("lengths", "empty")),
        ((10,), [10], ("packed_hidden", "(N_real, H)")),
        ((5, HIDDEN), [1] * 5, ("lengths", "5 entries", "at most 4")),
    ],
)
def test_unpack_validation_names_the_field(packed_shape, lengths, words):
    with pytest.raises(InvalidInputError) as info:
        codec.unpack_hidden(torch.zeros(packed_shape), lengths, max_rows=4)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_unpack_refuses_a_padded_size_over_the_limit():
    with pytest.raises(InvalidInputError, match="unpacks to"):
        codec.unpack_hidden(torch.zeros(101, HIDDEN), [100, 1], max_bytes=100 * HIDDEN * 4)


# --- a real loopback server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_llama):
    provider = Provider.from_loaded(load_model(str(tiny_llama)), split=1, peft=PeftConfig())
    with running_server(provider) as address:
        yield provider, address
    provider.close()


def _forward_bytes(address: str, wire_dtype: torch.dtype, hidden: torch.Tensor, mask: torch.Tensor) -> int:
    with RemoteTopService(address, wire_dtype=wire_dtype) as service:
        session = service.open_session(SessionSpec(num_labels=2, learning_rate=1e-3, seed=0))
        before = service.bytes_sent
        logits = service.forward(session, 1, hidden, mask)
        sent = service.bytes_sent - before
        assert tuple(logits.shape) == (hidden.shape[0], 2) and torch.isfinite(logits).all()
        service.close_session(session)
    return sent


def test_packing_and_bfloat16_shrink_the_bytes_sent(served):
    _, address = served
    hidden, mask = _padded(LENGTHS)
    naive = len(LENGTHS) * max(LENGTHS) * HIDDEN * 4  # float32, every sequence padded to the longest
    real_fraction = sum(LENGTHS) / (len(LENGTHS) * max(LENGTHS))  # 144 / 512
    f32 = _forward_bytes(address, torch.float32, hidden, mask)
    bf16 = _forward_bytes(address, torch.bfloat16, hidden, mask)
    f16 = _forward_bytes(address, torch.float16, hidden, mask)
    print(
        f"\nnaive padded float32 {naive} B; packed float32 {f32} B ({f32 / naive:.3f}); "
        f"packed bfloat16 {bf16} B ({bf16 / naive:.3f}, {bf16 / f32:.3f} of float32); float16 {f16} B"
    )
    assert f32 < naive
    assert f32 / naive <= real_fraction + 0.02  # only the real tokens travel, plus a small envelope
    assert 0.45 <= bf16 / f32 <= 0.55 and abs(f16 - bf16) <= 2  # "float16" vs "bfloat16": one name byte
    assert bf16 / naive <= real_fraction / 2 + 0.02


def _stub(address: str):
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel, sap_pb2_grpc.SplitLearningStub(channel)


SECRETS: dict[str, str] = {}  # session id -> its secret (every call of a session carries it as metadata)


def _open(stub, num_labels: int) -> str:
    reply = stub.OpenSession(sap_pb2.OpenSessionRequest(num_labels=num_labels, learning_rate=1e-3), timeout=10)
    SECRETS[reply.session_id] = reply.session_secret
    return reply.session_id


def _md(session_id: str) -> list[tuple[str, str]]:
    return [("sap-session-secret", SECRETS[session_id])]


def test_a_mask_that_is_not_right_padded_is_refused_before_it_is_sent(served):
    """The wire has one encoding, the packed real tokens of right-padded rows: a left-padded batch (whose positions
    the server could not restore) is refused by the client, with what to do."""
    _, address = served
    hidden, _ = _padded([3, 3])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with RemoteTopService(address) as service:
        with pytest.raises(InvalidInputError, match="right-padded"):
            service.evaluate("any", hidden, left)
        assert service.bytes_sent == 0


@pytest.mark.parametrize(
    ("rows", "lengths", "words"),
    [
        (10, [4, 5], ("lengths", "sum to 9", "10 rows")),
        (10, [4, 0, 6], ("lengths[1]=0",)),
    ],
)
@pytest.mark.parametrize("rpc", ["Forward", "Evaluate"])
def test_malformed_packed_request_is_invalid_argument(served, rpc, rows, lengths, words):
    _, address = served
    channel, stub = _stub(address)
    with channel:
        session = _open(stub, num_labels=2)
        method = stub.Forward if rpc == "Forward" else stub.Evaluate
        frames = wire.forward_frames(session, 1 if rpc == "Forward" else 0, torch.randn(rows, HIDDEN), lengths=lengths)
        with pytest.raises(grpc.RpcError) as info:
            wire.call(method, frames, _md(session))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        for word in words:
            assert word in info.value.details(), info.value.details()
        # The session is unharmed: a good packed request at step 1 still works.
        good_hidden, good_mask = _padded([3, 2])
        assert (
            wire.logits_of(stub.Forward, wire.forward_frames(session, 1, good_hidden, good_mask), _md(session))[0] == 1
        )
        stub.CloseSession(sap_pb2.CloseSessionRequest(session_id=session), timeout=10, metadata=_md(session))


def test_remote_service_refuses_a_non_float_wire_dtype(served):
    with pytest.raises(ValueError, match="wire_dtype"):
        RemoteTopService(served[1], wire_dtype=torch.int32)


# --- the command line ------------------------------------------------------------------------------


def test_bfloat16_wire_training_learns_and_is_recorded(served, tmp_path, capsys):
    _, address = served
    rows = learnable_rows(500, seed=0)
    train_csv = write_csv(tmp_path / "train.csv", rows[:400])
    eval_csv = write_csv(tmp_path / "eval.csv", rows[400:])
    run = tmp_path / "run"
    code = client_main(
        [
            "train",
            str(train_csv),
            "--eval",
            str(eval_csv),
            "--server",
            address,
            "--out",
            str(run),
            "--epochs",
            "4",
            "--lr",
            "3e-3",
            "--wire-dtype",
            "bfloat16",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    settings = json.loads((run / "run.json").read_text())
    assert metrics["wire_dtype"] == "bfloat16" and settings["wire_dtype"] == "bfloat16"
    assert metrics["eval_accuracy"] >= 0.85, metrics["history"]  # chance is 0.5; float32 reaches 0.96

    # evaluate reuses the run's wire dtype: the same figures as training's final evaluation.
    assert client_main(["evaluate", str(eval_csv), "--run", str(run), "--server", address, "--device", "cpu"]) == 0
    assert json.loads((run / "evaluation.json").read_text())["accuracy"] == metrics["eval_accuracy"]
    # an explicit flag overrides it (float32 is lossless; accuracy stays about the same).
    out = tmp_path / "eval32.json"
    assert (
        client_main(
            [
                "evaluate",
                str(eval_csv),
                "--run",
                str(run),
                "--server",
                address,
                "--device",
                "cpu",
                "--wire-dtype",
                "float32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert abs(json.loads(out.read_text())["accuracy"] - metrics["eval_accuracy"]) <= 0.05


def test_wire_dtype_flag_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        client_main(["train", str(tmp_path / "x.csv"), "--wire-dtype", "int8"])
    assert info.value.code == 2 and "--wire-dtype" in capsys.readouterr().err
