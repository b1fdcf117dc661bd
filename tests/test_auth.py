"""Session secrets and API keys over a real loopback server.

- Isolation: a second client that knows the first one's session id but not its secret is refused
  (UNAUTHENTICATED without a secret, PERMISSION_DENIED with a wrong one) on every session RPC, the
  refusals reveal nothing about the session, the first session's weights and pending step are untouched,
  and it trains on to exactly the weights of an undisturbed run.
- API keys (`sap-server --api-keys FILE`): info, bottom and opening sessions need `Bearer KEY`.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
import wire
from torch.nn import functional as F

from conftest import running_server
from sap_client import cli as client_cli
from sap_client.remote import ClientCredentials, RemoteTopService
from sap_common.errors import AuthenticationError, InvalidInputError, PermissionDeniedError, SessionNotFoundError
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_common.proto import sap_pb2, sap_pb2_grpc
from sap_common.service import SessionSpec
from sap_server import cli as server_cli
from sap_server.auth import ApiKeys
from sap_server.provider import Provider
from session_steps import BATCH, HIDDEN, NUM_LABELS
from session_steps import batch as _batch
from session_steps import step as _step
from tiny_models import learnable_rows, write_csv

SECRET_KEY = "sap-session-secret"

pytestmark = pytest.mark.usefixtures("one_thread")


def _provider(folder: Path) -> Provider:
    return Provider.from_loaded(load_model(str(folder)), split=1, peft=PeftConfig())


def _weights(provider: Provider, session_id: str) -> dict[str, torch.Tensor]:
    return provider.sessions.get(session_id).trainable_state()


def _solo(folder: Path, seed: int, steps: int) -> dict[str, torch.Tensor]:
    """The weights of `steps` undisturbed steps on a fresh server."""
    provider = _provider(folder)
    try:
        with running_server(provider) as address, RemoteTopService(address) as service:
            sid = service.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=seed))
            for step in range(1, steps + 1):
                _step(service, sid, seed, step)
            return _weights(provider, sid)
    finally:
        provider.close()


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# --- session secrets -----------------------------------------------------------------------------


def test_a_session_is_refused_to_anyone_without_its_secret(tiny_llama):
    provider = _provider(tiny_llama)
    try:
        with (
            running_server(provider) as address,
            RemoteTopService(address) as owner,
            grpc.insecure_channel(address) as channel,
        ):
            sid = owner.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=3))
            secret = owner.session_secret(sid)
            assert len(secret) == 64 and int(secret, 16) >= 0 and secret not in sid
            for step in (1, 2):
                _step(owner, sid, 3, step)
            # the owner's forward of step 3 is pending when the intruder strikes
            hidden, mask, labels = _batch(3, 3)
            logits = owner.forward(sid, 3, hidden, mask).requires_grad_(True)
            trainer = provider.sessions.get(sid)
            before, pending = _weights(provider, sid), (trainer.pending_step, trainer.pending_output)

            stub = sap_pb2_grpc.SplitLearningStub(channel)
            forward = wire.forward_frames(sid, 3, hidden, mask)
            backward = wire.backward_frames(sid, 3, torch.ones(BATCH, NUM_LABELS))
            evaluate = wire.forward_frames(sid, 0, hidden, mask)
            small = wire.forward_frames(sid, 0, hidden, mask, chunk_bytes=1 << 20)  # one data frame
            calls = {
                "Forward": lambda md: list(stub.Forward(iter(forward), timeout=30, metadata=md)),
                "Backward": lambda md: list(stub.Backward(iter(backward), timeout=30, metadata=md)),
                "Evaluate": lambda md: list(stub.Evaluate(iter(evaluate), timeout=30, metadata=md)),
                "EvaluateSmall": lambda md: stub.EvaluateSmall(
                    sap_pb2.ForwardFrames(frames=small), timeout=30, metadata=md
                ),
                "CloseSession": lambda md: stub.CloseSession(
                    sap_pb2.CloseSessionRequest(session_id=sid, keep=True), timeout=30, metadata=md
                ),
            }
            wrong = "f" * 64 if secret != "f" * 64 else "e" * 64
            for name, call in calls.items():
                code, details = _code(lambda: call(()))
                assert code == grpc.StatusCode.UNAUTHENTICATED, (name, code, details)
                assert SECRET_KEY in details and sid[:8] not in details  # a probe without a secret learns nothing
                for bad in (wrong, secret[:-1], secret.upper(), secret + "0"):
                    code, details = _code(lambda: call([(SECRET_KEY, bad)]))
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code, details)
                    assert "does not match" in details and secret not in details
                    assert "step" not in details and "label" not in details  # nothing about the session's state

            # a second RemoteTopService that knows the id and a wrong secret gets the domain errors
            with RemoteTopService(address, tries=1) as intruder:
                with pytest.raises(AuthenticationError, match="no session secret"):
                    intruder.evaluate(sid, hidden, mask)
                intruder.use_session(sid, wrong)
                with pytest.raises(PermissionDeniedError, match="does not match"):
                    intruder.backward(sid, 3, torch.ones(BATCH, NUM_LABELS))
                with pytest.raises(PermissionDeniedError):
                    intruder.close_session(sid)

            # nothing changed: same weights, same pending forward, no step applied, session still open
            assert trainer.steps_applied == 2 and _same_pending(trainer, pending)
            assert all(torch.equal(before[n], v) for n, v in _weights(provider, sid).items())
            # the owner goes on: its pending backward is applied (not replayed), then one more step
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
            result = owner.backward(sid, 3, grad)
            assert (result.applied_step, result.replayed) == (3, False)
            _step(owner, sid, 3, 4)
            final = _weights(provider, sid)
            assert owner.close_session(sid) == 4
    finally:
        provider.close()
    expected = _solo(tiny_llama, seed=3, steps=4)
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name


def test_missing_secret_reveals_nothing_and_unknown_or_closed_sessions_are_not_found(tiny_llama):
    provider = _provider(tiny_llama)
    try:
        with (
            running_server(provider) as address,
            RemoteTopService(address) as owner,
            grpc.insecure_channel(address) as channel,
        ):
            stub = sap_pb2_grpc.SplitLearningStub(channel)
            sid = owner.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=0))
            secret = owner.session_secret(sid)
            made_up = "0123456789abcdef" * 2

            def close(session_id: str, md=()):
                return stub.CloseSession(sap_pb2.CloseSessionRequest(session_id=session_id), timeout=30, metadata=md)

            # without a secret, an existing and a made-up session id get the very same answer
            assert _code(lambda: close(sid)) == _code(lambda: close(made_up))
            code, details = _code(lambda: close(made_up, [(SECRET_KEY, secret)]))
            assert code == grpc.StatusCode.NOT_FOUND and "unknown or closed" in details

            _step(owner, sid, 0, 1)
            assert close(sid, [(SECRET_KEY, secret)]).steps_applied == 1
            # a retried close (same secret) gets the same reply; anyone else is still refused
            assert close(sid, [(SECRET_KEY, secret)]).steps_applied == 1
            assert _code(lambda: close(sid, [(SECRET_KEY, "a" * 64)]))[0] == grpc.StatusCode.PERMISSION_DENIED
            hidden, mask, _ = _batch(0, 2)
            with pytest.raises(SessionNotFoundError, match="unknown or closed"):
                owner.forward(sid, 2, hidden, mask)
            owner.use_session(made_up, secret)
            with pytest.raises(SessionNotFoundError):
                owner.evaluate(made_up, hidden, mask)
    finally:
        provider.close()


def test_attached_adapter_gets_its_own_secret(tiny_llama):
    provider = _provider(tiny_llama)
    try:
        with running_server(provider) as address, RemoteTopService(address) as service:
            sid = service.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=1))
            _step(service, sid, 1, 1)
            first_secret = service.session_secret(sid)
            adapter_id = service.finish_session(sid)
            assert service.session_secret(sid) is None
            again, labels = service.attach_adapter(adapter_id)
            assert labels == NUM_LABELS and again != sid
            assert service.session_secret(again) not in (None, first_secret)
            hidden, mask, _ = _batch(1, 2)
            assert service.evaluate(again, hidden, mask).shape == (BATCH, NUM_LABELS)
            service.use_session(again, first_secret)  # the old session's secret does not open the new one
            with pytest.raises(PermissionDeniedError):
                service.evaluate(again, hidden, mask)
    finally:
        provider.close()


# --- API keys ------------------------------------------------------------------------------------


def test_api_key_file_format(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# provider keys\n\n  alpha-key-1  \n#beta-key-0\nbeta-key-2\n")
    api = ApiKeys.from_file(keys)
    assert len(api) == 2
    api.check("Bearer alpha-key-1")
    api.check("bearer beta-key-2")
    for bad in (
        None,
        "",
        "alpha-key-1",
        "Bearer",
        "Bearer ",
        "Basic alpha-key-1",
        "Bearer beta-key-0",
        "Bearer alpha-key-",
        "Bearer alpha-key-12",
    ):
        with pytest.raises(AuthenticationError):
            api.check(bad)
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(InvalidInputError, match="holds no key"):
        ApiKeys.from_file(tmp_path / "empty")
    with pytest.raises(InvalidInputError, match="missing"):
        ApiKeys.from_file(tmp_path / "missing")


def test_api_keys_gate_info_bottom_and_sessions(tiny_llama, tmp_path):
    provider = _provider(tiny_llama)
    try:
        with (
            running_server(provider, api_keys=ApiKeys.of(["k-one", "k-two"])) as address,
            grpc.insecure_channel(address) as channel,
        ):
            stub = sap_pb2_grpc.SplitLearningStub(channel)
            open_request = sap_pb2.OpenSessionRequest(num_labels=2, learning_rate=1e-3)
            calls = {
                "GetServerInfo": lambda md: stub.GetServerInfo(sap_pb2.ServerInfoRequest(), timeout=30, metadata=md),
                "DownloadBottom": lambda md: list(
                    stub.DownloadBottom(sap_pb2.DownloadBottomRequest(), timeout=30, metadata=md)
                ),
                "OpenSession": lambda md: stub.OpenSession(open_request, timeout=30, metadata=md),
            }
            for name, call in calls.items():
                for md in (
                    (),
                    [("authorization", "Bearer k-three")],
                    [("authorization", "k-one")],
                    [("authorization", "Basic k-one")],
                ):
                    code, details = _code(lambda: call(md))
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (name, md, code, details)
                    assert "k-one" not in details and "k-two" not in details
                assert call([("authorization", "Bearer k-two")])

            # the client: --api-key / $SAP_API_KEY as ClientCredentials
            with RemoteTopService(address, tries=1) as anonymous:
                with pytest.raises(AuthenticationError, match="API key"):
                    anonymous.server_info()
                with pytest.raises(AuthenticationError):
                    anonymous.open_session(SessionSpec(num_labels=2))
            with RemoteTopService(address, credentials=ClientCredentials(api_key="k-one")) as service:
                assert service.server_info().hidden_size == HIDDEN
                service.download_bottom(tmp_path / "bottom")
                assert (tmp_path / "bottom" / "bottom.safetensors").is_file()
                sid = service.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2))
                _step(service, sid, 0, 1)
                adapter_id = service.finish_session(sid)
            with RemoteTopService(address, tries=1) as anonymous:  # reattaching opens a session: key needed
                with pytest.raises(AuthenticationError):
                    anonymous.attach_adapter(adapter_id)
    finally:
        provider.close()


def test_cli_api_keys(tiny_llama, tmp_path, capsys, monkeypatch):
    # the server refuses a missing key file at once (before loading the model) with one clear line
    assert (
        server_cli.main(
            ["--model", str(tiny_llama), "--split", "1", "--port", "0", "--api-keys", str(tmp_path / "no-keys")]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-keys" in err[0] and "--api-keys" in err[0]

    # the client passes --api-key / $SAP_API_KEY through to every call
    data = write_csv(tmp_path / "data.csv", learnable_rows(24))
    provider = _provider(tiny_llama)
    try:
        with running_server(provider, api_keys=ApiKeys.of(["cli-key"])) as address:
            monkeypatch.delenv("SAP_API_KEY", raising=False)
            train = ["train", str(data), "--server", address, "--batch-size", "8", "--eval-fraction", "0.25"]
            assert client_cli.main(train + ["--out", str(tmp_path / "denied")]) == 1
            assert "API key" in capsys.readouterr().err
            assert client_cli.main(train + ["--out", str(tmp_path / "run"), "--api-key", "cli-key"]) == 0
            monkeypatch.setenv("SAP_API_KEY", "cli-key")
            assert client_cli.main(["evaluate", str(data), "--run", str(tmp_path / "run")]) == 0
    finally:
        provider.close()


def _same_pending(session, pending) -> bool:
    """The session's pending forward is still the one recorded: its step, and its very logits (the same storage, not
    a recomputation)."""
    step, logits = pending
    now = session.pending_output
    return session.pending_step == step and logits is not None and now.data_ptr() == logits.data_ptr()
