"""A real in-process gRPC server on 127.0.0.1:0: raw stub calls, status codes and what the messages say."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
import torch
import wire

from conftest import running_server
from sap_common import codec
from sap_common.models.bundle import bundle_sha256
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_common.proto import sap_pb2, sap_pb2_grpc
from sap_server.provider import Provider

HIDDEN = 32  # tiny models' hidden size
NUM_LABELS = 3
SECRETS: dict[str, str] = {}  # session id -> the secret OpenSession returned; raw calls carry it as metadata


def _provider(folder: Path, **kwargs) -> Provider:
    return Provider.from_loaded(load_model(str(folder)), split=1, peft=PeftConfig(), **kwargs)


@pytest.fixture(scope="module")
def served(tiny_llama):
    """(provider, stub) over a real loopback server, shared by this module's error-path tests."""
    provider = _provider(tiny_llama)
    with running_server(provider) as address, grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = sap_pb2_grpc.SplitLearningStub(channel)
        stub.channel = channel  # for the raw-bytes calls
        yield provider, stub
    provider.close()


def _open(stub, num_labels: int = NUM_LABELS, seed: int = 0) -> str:
    reply = stub.OpenSession(
        sap_pb2.OpenSessionRequest(num_labels=num_labels, learning_rate=1e-2, seed=seed), timeout=10
    )
    assert reply.session_id and reply.trainable_parameters > 0
    assert len(reply.session_secret) == 64
    SECRETS[reply.session_id] = reply.session_secret
    return reply.session_id


def _md(session_id: str) -> list[tuple[str, str]]:
    """The session's secret as call metadata (a well-formed but wrong one for a made-up session id)."""
    return [("sap-session-secret", SECRETS.get(session_id, "0" * 64))]


def _close(stub, session_id: str) -> int:
    """CloseSession with the session's secret; the steps it had applied."""
    return stub.CloseSession(
        sap_pb2.CloseSessionRequest(session_id=session_id), timeout=10, metadata=_md(session_id)
    ).steps_applied


def _inputs(batch: int = 2, length: int = 5, hidden: int = HIDDEN, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g)  # (B, T, H)
    mask = torch.ones(batch, length, dtype=torch.long)  # (B, T)
    mask[0, -2:] = 0
    return h, mask


def _forward(stub, session_id, step, hidden, mask) -> torch.Tensor:
    reply_step, logits = wire.logits_of(
        stub.Forward, wire.forward_frames(session_id, step, hidden, mask), _md(session_id)
    )
    assert reply_step == step
    return logits


def _backward(stub, session_id, step, grad) -> sap_pb2.BackwardReplyHeader:
    return wire.call(stub.Backward, wire.backward_frames(session_id, step, grad), _md(session_id))[0]


def _expect_error(code: grpc.StatusCode, call, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, f"{info.value.code()}: {info.value.details()}"
    details = info.value.details()
    for word in words:
        assert word in details, f"{word!r} not in {details!r}"
    return details


def _top_state(provider: Provider, session_id: str) -> dict[str, torch.Tensor]:
    top = provider.sessions.get(session_id).top
    return {name: p.detach().clone() for name, p in top.named_parameters() if p.requires_grad}


# --- info and bottom download ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_server_info_and_bottom_download(family, tiny_bert, tiny_llama, tmp_path):
    provider = _provider(tiny_bert if family == "bert" else tiny_llama)
    try:
        with running_server(provider, chunk_bytes=4096) as address, grpc.insecure_channel(address) as channel:
            stub = sap_pb2_grpc.SplitLearningStub(channel)
            info = stub.GetServerInfo(sap_pb2.ServerInfoRequest(), timeout=10)
            assert (info.split, info.total_blocks, info.hidden_size) == (1, 3, HIDDEN)
            assert info.family == ("encoder" if family == "bert" else "decoder")
            assert info.model_type == family
            assert info.peft == "lora"
            assert info.protocol_version >= 1
            assert len(info.bottom_sha256) == 64
            assert info.chunk_bytes == 4096 and info.max_message_bytes > info.chunk_bytes

            pieces = 0
            for chunk in stub.DownloadBottom(sap_pb2.DownloadBottomRequest(), timeout=30):
                assert len(chunk.data) <= 4096
                assert not chunk.path.startswith("/") and ".." not in chunk.path.split("/")
                target = tmp_path / chunk.path
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("r+b" if target.exists() else "wb") as handle:
                    handle.seek(chunk.offset)
                    handle.write(chunk.data)
                assert chunk.offset + len(chunk.data) <= chunk.total_size or chunk.total_size == 0
                pieces += 1
            assert pieces > 1  # the weights alone are larger than one 4 KiB chunk
            assert bundle_sha256(tmp_path) == info.bottom_sha256
            assert (tmp_path / "bottom.safetensors").stat().st_size > 4096
    finally:
        provider.close()


# --- OpenSession ------------------------------------------------------------------------------


def test_open_session_rejects_one_label(served):
    _, stub = served
    _expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.OpenSession(sap_pb2.OpenSessionRequest(num_labels=1, learning_rate=1e-3), timeout=10),
        "num_labels",
        "1",
    )


def test_open_session_rejects_zero_learning_rate(served):
    _, stub = served
    _expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.OpenSession(sap_pb2.OpenSessionRequest(num_labels=2), timeout=10),
        "learning_rate",
    )


def test_too_many_sessions_is_resource_exhausted(tiny_llama):
    provider = _provider(tiny_llama, max_sessions=1)
    try:
        with running_server(provider) as address, grpc.insecure_channel(address) as channel:
            stub = sap_pb2_grpc.SplitLearningStub(channel)
            first = _open(stub)
            _expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: _open(stub, seed=1), "1 sessions")
            assert _close(stub, first) == 0
            _open(stub, seed=2)  # closing one frees the slot
    finally:
        provider.close()


# --- Forward / Backward errors -----------------------------------------------------------------


def test_forward_unknown_session_is_not_found(served):
    _, stub = served
    h, mask = _inputs()
    _expect_error(grpc.StatusCode.NOT_FOUND, lambda: _forward(stub, "deadbeef" * 4, 1, h, mask), "deadbeef", "unknown")


def test_close_unknown_session_is_not_found(served):
    _, stub = served
    _expect_error(grpc.StatusCode.NOT_FOUND, lambda: _close(stub, "nope"), "unknown")


def test_forward_input_errors_are_invalid_argument_and_server_keeps_serving(served):
    provider, stub = served
    sid = _open(stub)
    h, mask = _inputs()
    bad = grpc.StatusCode.INVALID_ARGUMENT

    # wrong hidden size
    wide, _ = _inputs(hidden=HIDDEN + 1)
    _expect_error(bad, lambda: _forward(stub, sid, 1, wide, mask), "hidden", str(HIDDEN + 1), str(HIDDEN))
    # a dtype that is not a float
    _expect_error(bad, lambda: _forward(stub, sid, 1, h.long(), mask), "hidden", "int64")
    # byte length not matching the shape
    frames = wire.forward_frames(sid, 1, h, mask)
    frames[-1].data = frames[-1].data[:-4]
    _expect_error(bad, lambda: wire.call(stub.Forward, frames, _md(sid)), "bytes", "announces")
    # an unknown dtype name
    frames = wire.forward_frames(sid, 1, h, mask)
    frames[0].header.hidden.dtype = "float128"
    _expect_error(bad, lambda: wire.call(stub.Forward, frames, _md(sid)), "float128")
    # NaN / Inf
    nan = h.clone()
    nan[1, 2, 3] = math.nan
    _expect_error(bad, lambda: _forward(stub, sid, 1, nan, mask), "hidden", "NaN")
    inf = h.clone()
    inf[0, 0, 0] = math.inf
    _expect_error(bad, lambda: _forward(stub, sid, 1, inf, mask), "hidden", "Inf")
    # lengths that do not fit the packed tokens, an example with no real token, no lengths at all
    packed, lengths = codec.pack_hidden(h, mask)
    assert lengths == [3, 5]
    for wrong, words in (([4, 5], ("sum to 9", "8 rows")), ([3, 0, 5], ("lengths[1]=0",)), ([], ("empty",))):
        frames = wire.forward_frames(sid, 1, packed, lengths=wrong)
        _expect_error(bad, lambda: wire.call(stub.Forward, frames, _md(sid)), *words)
    # an output other than the session's (it was opened with its head: logits), and one no session returns
    frames = wire.forward_frames(sid, 1, h, mask, output=sap_pb2.OUTPUT_POOLED)
    _expect_error(bad, lambda: wire.call(stub.Forward, frames, _md(sid)), "'pooled'", "returns logits")
    frames = wire.forward_frames(sid, 1, h, mask, output=sap_pb2.OUTPUT_HIDDEN)
    _expect_error(bad, lambda: wire.call(stub.Forward, frames, _md(sid)), "'hidden'", "returns logits")
    frames = wire.forward_frames(sid, 1, h, mask, output=7)
    _expect_error(bad, lambda: wire.call(stub.Forward, frames, _md(sid)), "output=7", "not a known Output")

    # bytes that are not a ForwardFrame at all
    def garbage():
        return list(stub.Forward(iter([sap_pb2.ForwardFrame(data=b"\xff" * 16)]), timeout=10, metadata=_md(sid)))

    def scrambled():
        forward = stub.channel.stream_stream("/sap.v2.SplitLearning/Forward")  # raw bytes, no serializer
        return list(forward(iter([b"\xff" * 16]), timeout=10, metadata=_md(sid)))

    _expect_error(bad, scrambled, "ForwardFrame")
    # a stream of data without a header, and an empty stream
    _expect_error(bad, garbage, "header comes first")
    _expect_error(bad, lambda: list(stub.Forward(iter([]), timeout=10, metadata=_md(sid))), "0 frames")

    # none of that touched the session: step 1 is still the next one and trains normally
    before = _top_state(provider, sid)
    logits = _forward(stub, sid, 1, h, mask)
    assert logits.shape == (2, NUM_LABELS) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    reply = _backward(stub, sid, 1, torch.ones_like(logits))
    assert (reply.applied_step, reply.replayed) == (1, False)
    after = _top_state(provider, sid)
    assert any(not torch.equal(before[name], after[name]) for name in before), "the optimizer step changed nothing"


def test_step_order_errors_are_failed_precondition(served):
    provider, stub = served
    sid = _open(stub)
    h, mask = _inputs()
    grad = torch.ones(2, NUM_LABELS)
    pre = grpc.StatusCode.FAILED_PRECONDITION

    details = _expect_error(pre, lambda: _forward(stub, sid, 2, h, mask), "step 2")
    assert "next step is 1" in details
    _expect_error(pre, lambda: _forward(stub, sid, 0, h, mask), "next step is 1")
    _expect_error(pre, lambda: _backward(stub, sid, 1, grad), "no forward is pending", "next step is 1")

    _forward(stub, sid, 1, h, mask)
    _expect_error(pre, lambda: _backward(stub, sid, 2, grad), "step 1")
    assert provider.sessions.get(sid).steps_applied == 0
    assert _backward(stub, sid, 1, grad).applied_step == 1
    _expect_error(pre, lambda: _forward(stub, sid, 1, h, mask), "next step is 2")
    assert _forward(stub, sid, 2, h, mask).shape == (2, NUM_LABELS)


def test_backward_retry_is_replayed_without_a_second_optimizer_step(served):
    provider, stub = served
    sid = _open(stub)
    h, mask = _inputs()
    initial = _top_state(provider, sid)
    logits = _forward(stub, sid, 1, h, mask)
    grad = torch.full_like(logits, 0.5)
    first = _backward(stub, sid, 1, grad)
    assert (first.applied_step, first.replayed) == (1, False)
    applied = _top_state(provider, sid)
    assert any(not torch.equal(initial[n], applied[n]) for n in initial)

    again = _backward(stub, sid, 1, grad)
    assert (again.applied_step, again.replayed) == (1, True)
    retried = _top_state(provider, sid)
    assert all(torch.equal(applied[n], retried[n]) for n in applied), "a retried Backward changed the weights"
    assert provider.sessions.get(sid).steps_applied == 1
    assert _close(stub, sid) == 1


def test_backward_with_wrong_grad_shape_is_invalid_argument(served):
    provider, stub = served
    sid = _open(stub)
    h, mask = _inputs()
    logits = _forward(stub, sid, 1, h, mask)
    before = _top_state(provider, sid)
    _expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: _backward(stub, sid, 1, torch.ones(2, NUM_LABELS + 1)),
        "grad_logits",
        f"(2, {NUM_LABELS + 1})",
        f"(2, {NUM_LABELS})",
    )
    nan = torch.ones_like(logits)
    nan[0, 0] = math.nan
    _expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: _backward(stub, sid, 1, nan), "grad_logits", "NaN")
    _expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: _backward(stub, sid, 1, torch.ones(2, NUM_LABELS).long()),
        "grad.dtype",
        "int64",
    )
    assert all(torch.equal(before[n], v) for n, v in _top_state(provider, sid).items())
    # the pending forward survived the bad requests
    reply = _backward(stub, sid, 1, torch.ones_like(logits))
    assert (reply.applied_step, reply.replayed) == (1, False)


def test_evaluate_changes_nothing_and_matches_training_forward(served):
    provider, stub = served
    sid = _open(stub)
    h, mask = _inputs(seed=3)
    before = _top_state(provider, sid)
    step, evaluated = wire.logits_of(stub.Evaluate, wire.forward_frames(sid, 0, h, mask), _md(sid))
    assert step == 0
    assert all(torch.equal(before[n], v) for n, v in _top_state(provider, sid).items())
    assert provider.sessions.get(sid).steps_applied == 0
    # tiny models have no dropout: the training forward of step 1 gives the same logits
    torch.testing.assert_close(_forward(stub, sid, 1, h, mask), evaluated)


def test_a_small_evaluate_goes_in_one_message_and_answers_as_the_stream_does(served):
    """EvaluateSmall: the same frames in one unary message each way (batch-1 inference pays no stream); a request
    of more than one data frame is refused, naming the streaming Evaluate."""
    provider, stub = served
    sid = _open(stub)
    h, mask = _inputs(seed=4)
    frames = wire.forward_frames(sid, 0, h, mask)
    assert len(frames) == 2  # the header and one data frame
    _, streamed = wire.logits_of(stub.Evaluate, frames, _md(sid))
    reply = stub.EvaluateSmall(sap_pb2.ForwardFrames(frames=frames), timeout=30, metadata=_md(sid))
    header, tensors = codec.from_frames(reply.frames, sap_pb2.ForwardReplyFrame, ("tensor",))
    assert header.step == 0 and header.output == sap_pb2.OUTPUT_LOGITS
    torch.testing.assert_close(tensors["tensor"], streamed, rtol=0, atol=0)
    chunked = wire.forward_frames(sid, 0, h, mask, chunk_bytes=64)
    assert len(chunked) > 2
    _expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.EvaluateSmall(sap_pb2.ForwardFrames(frames=chunked), timeout=30, metadata=_md(sid)),
        "EvaluateSmall takes a header and at most one data frame",
        "with Evaluate",
    )
    assert provider.sessions.get(sid).steps_applied == 0


def test_a_call_routed_for_another_session_is_refused(served):
    """sap-session-id metadata (what a router routes by) must name the session the body names."""
    provider, stub = served
    sid, other = _open(stub), _open(stub, seed=1)
    metadata = [*_md(sid), ("sap-session-id", other)]
    _expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.ResumeSession(sap_pb2.ResumeSessionRequest(session_id=sid, step=0), timeout=10, metadata=metadata),
        "sap-session-id names session",
    )
    h, mask = _inputs(seed=5)
    _expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: wire.call(stub.Forward, wire.forward_frames(sid, 1, h, mask), metadata),
        "sap-session-id names session",
    )
    assert provider.sessions.get(sid).pending_step is None  # refused before anything ran
    # named rightly, it is served
    _forward(stub, sid, 1, h, mask)


# --- tensors larger than the message cap -------------------------------------------------------


def test_the_client_refuses_a_server_of_another_protocol_version(tiny_llama):
    """A server that says another protocol version, and one without this version's service at all (an older
    package: UNIMPLEMENTED), are both refused when the client connects, naming the versions."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from sap_client.remote import RemoteTopService
    from sap_common import PROTOCOL_VERSION
    from sap_common.errors import ProtocolError

    provider = _provider(tiny_llama)
    provider.info = dataclasses.replace(provider.info, protocol_version=PROTOCOL_VERSION - 1)
    try:
        with running_server(provider) as address, RemoteTopService(address, tries=1) as service:
            with pytest.raises(ProtocolError, match=f"protocol {PROTOCOL_VERSION - 1}, this client {PROTOCOL_VERSION}"):
                service.server_info()
    finally:
        provider.close()
    bare = grpc.server(ThreadPoolExecutor(max_workers=1))  # serves no method of sap.v2
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        with RemoteTopService(f"127.0.0.1:{port}", tries=1) as service:
            with pytest.raises(ProtocolError, match=f"does not speak SAP wire protocol {PROTOCOL_VERSION}"):
                service.server_info()
    finally:
        bare.stop(None)


def test_tensor_larger_than_message_cap_streams_in_chunks(tiny_llama):
    from sap_client.remote import RemoteTopService
    from sap_common.service import SessionSpec

    cap, chunk = 64 * 1024, 16 * 1024
    provider = _provider(tiny_llama)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, 60, HIDDEN, generator=g)  # (B, T, H): ~123 KB of float32
    mask = torch.ones(16, 60, dtype=torch.long)
    mask[::2, 40:] = 0
    assert hidden[mask.bool()].numel() * 4 > cap  # would not fit one message
    try:
        with running_server(provider, chunk_bytes=chunk, max_message_bytes=cap) as address:
            with RemoteTopService(address, chunk_bytes=chunk, max_message_bytes=cap) as service:
                sid = service.open_session(SessionSpec(num_labels=2, learning_rate=1e-3, seed=0))
                SECRETS[sid] = service.session_secret(sid)
                evaluated = service.evaluate(sid, hidden, mask)
                trainer = provider.sessions.get(sid)
                expected = trainer.evaluate(*codec.pack_hidden(hidden, mask))
                torch.testing.assert_close(evaluated, expected, rtol=0, atol=0)
                logits = service.forward(sid, 1, hidden, mask)
                torch.testing.assert_close(logits, expected)
                assert service.bytes_sent > 2 * cap
                result = service.backward(sid, 1, torch.ones_like(logits))
                assert (result.applied_step, result.replayed) == (1, False)

            # a client sending the tensor in one data frame hits the cap: the framing above is what made it work
            with grpc.insecure_channel(address) as channel:
                stub = sap_pb2_grpc.SplitLearningStub(channel)
                whole = wire.forward_frames(sid, 2, hidden, mask, chunk_bytes=10**9)
                assert len(whole) == 2
                _expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: wire.call(stub.Forward, whole, _md(sid), 10))
    finally:
        provider.close()


def test_training_round_trip_for_each_family(tiny_model):
    """Open, forward, backward, evaluate, close through the raw stub, for an encoder and a decoder."""
    provider = _provider(tiny_model)
    try:
        with running_server(provider) as address, grpc.insecure_channel(address) as channel:
            stub = sap_pb2_grpc.SplitLearningStub(channel)
            sid = _open(stub, num_labels=2)
            h, mask = _inputs(batch=4, length=6, seed=7)
            labels = torch.tensor([0, 1, 0, 1])
            losses = []
            for step in (1, 2, 3):
                logits = _forward(stub, sid, step, h, mask).requires_grad_(True)
                assert logits.shape == (4, 2)
                loss = torch.nn.functional.cross_entropy(logits, labels)
                (grad,) = torch.autograd.grad(loss, logits)
                reply = _backward(stub, sid, step, grad)
                assert (reply.applied_step, reply.replayed) == (step, False)
                assert not reply.HasField("grad_hidden")  # the session does not train the bottom
                losses.append(loss.item())
            assert losses[-1] < losses[0]  # lr 1e-2 on one fixed batch: the loss must go down
            assert _close(stub, sid) == 3
            _expect_error(grpc.StatusCode.NOT_FOUND, lambda: _forward(stub, sid, 4, h, mask), "unknown")
    finally:
        provider.close()


def test_a_pooled_session_returns_the_pooled_representation_and_takes_its_gradient(served):
    """OpenSession(output=OUTPUT_POOLED): no head on the provider (num_labels must be 0), Forward returns (B, H) and
    Backward takes dL/dpooled (B, H); a (B, C) gradient is refused, and so is asking it for logits."""
    provider, stub = served
    bad = grpc.StatusCode.INVALID_ARGUMENT
    asked_labels = sap_pb2.OpenSessionRequest(num_labels=2, learning_rate=1e-2, output=sap_pb2.OUTPUT_POOLED)
    _expect_error(bad, lambda: stub.OpenSession(asked_labels, timeout=10), "num_labels must be 0")
    reply = stub.OpenSession(
        sap_pb2.OpenSessionRequest(num_labels=0, learning_rate=1e-2, output=sap_pb2.OUTPUT_POOLED), timeout=10
    )
    sid = reply.session_id
    SECRETS[sid] = reply.session_secret
    assert reply.num_labels == 0 and reply.trainable_parameters > 0  # LoRA only: no head
    h, mask = _inputs()
    frames = wire.forward_frames(sid, 1, h, mask)  # asks for logits
    _expect_error(bad, lambda: wire.call(stub.Forward, frames, _md(sid)), "'logits'", "pooled")
    header, tensors = wire.call(
        stub.Forward, wire.forward_frames(sid, 1, h, mask, output=sap_pb2.OUTPUT_POOLED), _md(sid)
    )
    assert header.output == sap_pb2.OUTPUT_POOLED and tuple(tensors["tensor"].shape) == (2, HIDDEN)
    pooled = tensors["tensor"]
    session = provider.sessions.get(sid)
    torch.testing.assert_close(session.pending_output, pooled)
    before = _top_state(provider, sid)
    _expect_error(bad, lambda: _backward(stub, sid, 1, torch.ones(2, 2)), "grad_pooled", f"(2, {HIDDEN})")
    assert _backward(stub, sid, 1, torch.ones_like(pooled)).applied_step == 1
    assert any(not torch.equal(before[n], v) for n, v in _top_state(provider, sid).items())
    evaluated = wire.call(stub.Evaluate, wire.forward_frames(sid, 0, h, mask, output=sap_pb2.OUTPUT_POOLED), _md(sid))
    assert tuple(evaluated[1]["tensor"].shape) == (2, HIDDEN)
    assert _close(stub, sid) == 1
