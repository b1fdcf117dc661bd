"""Resume: session checkpoints (`sap-server --state-dir`), lazy loading, idle unloading and `sap-client resume`.

- Checkpoint files: atomic writes, a round trip of everything a session needs, which checkpoints are kept.
- Dropout draws depend on (session seed, step) only: a recomputed step and interleaved sessions draw the same.
- In-process: a restarted provider knows its sessions and loads them on their first call; ResumeSession
  (auth order, rollback of a live state that is ahead, refusal naming the steps it has); idle sessions are
  checkpointed and unloaded (or closed without a state dir) and come back with the same weights.
- The client: a run cut short at any step continues with `sap-client resume` to exactly the uninterrupted run's
  metrics and weights (noise off and on, frozen and trainable bottom, classification and generative);
  conflicting flags are refused.
- Real processes: `sap-client train` against `sap-server --state-dir --checkpoint-every 2`; the server killed
  with SIGKILL and restarted (or only the client killed), then `sap-client resume RUN_DIR`.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
import wire
from safetensors.torch import load_file
from torch.nn import functional as F

from conftest import running_server
from sap_client import cli as client_cli
from sap_client import trainer as client_trainer
from sap_client.remote import RemoteTopService
from sap_client.sft import SFTTrainer
from sap_common.checkpoint import TMP_PREFIX, atomic_write, pack, read_meta, seeded_draws, step_seed, unpack
from sap_common.errors import InvalidInputError, ResourceLimitError, SessionNotFoundError, StepOrderError
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_common.proto import sap_pb2, sap_pb2_grpc
from sap_common.service import BackwardResult, SessionSpec
from sap_server import cli as server_cli
from sap_server.checkpoints import SessionStore
from sap_server.launch import LISTENING
from sap_server.local import LocalTopService
from sap_server.provider import Provider
from sap_server.session import SessionSnapshot
from session_steps import BATCH, NUM_LABELS
from session_steps import batch as _batch
from session_steps import step as _step
from tiny_models import WORDS, bert_config, learnable_rows, make_tokenizer, write_csv

SECRET_KEY = "sap-session-secret"
Weights = dict[str, torch.Tensor]

pytestmark = pytest.mark.usefixtures("one_thread")


def _provider(folder: Path, state_dir: Path | None = None, **kwargs) -> Provider:
    return Provider.from_loaded(load_model(str(folder)), split=1, peft=PeftConfig(), state_dir=state_dir, **kwargs)


def _spec(seed: int) -> SessionSpec:
    return SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=seed)


def _solo(folder: Path, seed: int, steps: int) -> Weights:
    """The weights of `steps` undisturbed steps on a fresh server without a state dir."""
    provider = _provider(folder)
    try:
        service = LocalTopService(provider)
        sid = service.open_session(_spec(seed))
        for step in range(1, steps + 1):
            _step(service, sid, seed, step)
        return provider.sessions.get(sid).trainable_state()
    finally:
        provider.close()


def _assert_close(actual: Weights, expected: Weights, what: str, atol: float = 0.0) -> None:
    assert actual.keys() == expected.keys(), what
    for name in expected:
        if atol:
            assert torch.allclose(actual[name], expected[name], rtol=0, atol=atol), f"{what}: {name} differs"
        else:
            assert torch.equal(actual[name], expected[name]), f"{what}: {name} differs"


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# --- checkpoint files ---------------------------------------------------------------------------


def test_atomic_write_and_pack_round_trip(tmp_path):
    target = tmp_path / "ckpt.safetensors"
    tensors = {"a/b": torch.randn(3, 4), "step": torch.tensor(7.0), "ints": torch.arange(5)}
    meta = {"step": 7, "nested": {"list": [1, 2.5, None]}, "text": "é"}
    atomic_write(target, pack(tensors, meta))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert read_meta(target) == meta
    loaded, loaded_meta = unpack(target.read_bytes(), "ckpt")
    assert loaded_meta == meta and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    # a write that fails half-way leaves the old file and no temp file behind
    with pytest.raises(TypeError):
        atomic_write(target, object())  # not bytes: the write raises after the temp file exists
    assert read_meta(target) == meta and [p.name for p in tmp_path.iterdir()] == [target.name]
    for bad in (b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{}", target.read_bytes()[:40]):
        with pytest.raises(InvalidInputError, match="not a readable checkpoint"):
            unpack(bad, "bad")


def _snapshot(step: int, *, announced: bool, seed: int = 0) -> SessionSnapshot:
    """A snapshot with real AdamW state over two small parameters."""
    g = torch.Generator().manual_seed(step)
    params = [torch.nn.Parameter(torch.randn(3, generator=g)), torch.nn.Parameter(torch.randn(2, 2, generator=g))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(max(step, 0)):
        params[0].grad, params[1].grad = torch.ones(3), torch.full((2, 2), 0.5)
        optimizer.step()
    from sap_common.checkpoint import optimizer_to_tensors

    reply = BackwardResult(step, False, torch.randn(2, 3, 4, generator=g), announced) if step else None
    return SessionSnapshot(
        spec=SessionSpec(num_labels=3, learning_rate=1e-3, seed=seed, train_bottom=True),
        steps_applied=step,
        secret_digest=bytes(range(32)),
        weights={"head.weight": params[0].detach().clone(), "blocks.0.lora": params[1].detach()},
        optimizer=optimizer_to_tensors(optimizer, "optimizer/"),
        last_reply=reply,
        announced=announced,
    )


def test_session_store_round_trip_and_keeps_the_two_latest_announced(tmp_path):
    identity = {"model_id": "m", "split": 1, "peft": {"method": "lora"}}
    store = SessionStore(tmp_path, identity)
    sid = "ab" * 16
    folder = tmp_path / "sessions" / sid

    def on_disk() -> list[int]:
        return sorted(int(p.name[5:25]) for p in folder.glob("step-*.safetensors"))

    for step in (0, 2, 4):
        store.save(sid, _snapshot(step, announced=True))
    assert on_disk() == store.steps(sid) == [2, 4]
    store.save(sid, _snapshot(5, announced=False))  # an idle unload: kept while it is the newest
    assert on_disk() == [2, 4, 5]
    store.save(sid, _snapshot(7, announced=False))
    assert on_disk() == [2, 4, 7]
    store.save(sid, _snapshot(8, announced=True))  # the client's latest is 4 or 8: both kept
    assert on_disk() == [4, 8]
    assert not list(folder.glob(TMP_PREFIX + "*"))

    expected = _snapshot(8, announced=True)
    loaded = store.load(sid, 8)
    assert (loaded.spec, loaded.steps_applied, loaded.secret_digest, loaded.announced) == (
        expected.spec,
        8,
        expected.secret_digest,
        True,
    )
    _assert_close(loaded.weights, expected.weights, "weights")
    _assert_close(loaded.optimizer[0], expected.optimizer[0], "optimizer state")
    assert loaded.optimizer[1]["param_groups"][0]["betas"] == [0.9, 0.999]
    assert loaded.last_reply.applied_step == 8 and loaded.last_reply.checkpointed
    assert torch.equal(loaded.last_reply.grad_hidden, expected.last_reply.grad_hidden)
    assert store.load(sid).steps_applied == 8  # the latest by default
    assert read_meta(folder / "step-00000000000000000008.safetensors")["secret_sha256"] == bytes(range(32)).hex()

    # a restarted store finds what is on disk (a leftover temp file of a killed write is removed)
    (folder / f"{TMP_PREFIX}killed").write_bytes(b"half a checkpoint")
    again = SessionStore(tmp_path, identity)
    assert again.steps(sid) == [4, 8] and again.get(sid).secret_digest == bytes(range(32))
    assert not list(folder.glob(TMP_PREFIX + "*"))
    again.discard_after(sid, 4)
    assert on_disk() == [4] and again.steps(sid) == [4]
    assert again.get("../" + sid[3:]) is None and again.get("cd" * 16) is None
    # a checkpoint written for another top is refused
    other = SessionStore(tmp_path, dict(identity, split=2))
    with pytest.raises(Exception, match="written for"):
        other.load(sid, 4)


def test_dropout_draws_depend_only_on_seed_and_step(tmp_path):
    folder = tmp_path / "dropout-bert"
    from transformers import BertModel

    torch.manual_seed(0)
    config = bert_config(layers=3)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.3
    BertModel(config).save_pretrained(folder)
    make_tokenizer(bert_style=True).save_pretrained(folder)
    provider = _provider(folder)
    try:
        service = LocalTopService(provider)
        alone = service.open_session(_spec(5))
        for step in (1, 2, 3):
            _step(service, alone, 5, step)
        expected = provider.sessions.get(alone).trainable_state()

        # the same seed again, interleaved with another session and with the global generator disturbed
        busy, other = service.open_session(_spec(5)), service.open_session(_spec(6))
        for step in (1, 2, 3):
            torch.manual_seed(1234 + step)
            hidden, mask, labels = _batch(5, step)
            first = service.forward(busy, step, hidden, mask)
            _step(service, other, 6, step)
            torch.rand(100)
            again = service.forward(busy, step, hidden, mask)  # a retried forward draws the same masks
            assert torch.equal(first, again)
            logits = again.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
            service.backward(busy, step, grad)
        _assert_close(provider.sessions.get(busy).trainable_state(), expected, "interleaved run")
        # dropout is really on: the training forward differs from the evaluation forward
        hidden, mask, _ = _batch(5, 4)
        assert not torch.allclose(service.forward(busy, 4, hidden, mask), service.evaluate(busy, hidden, mask))
    finally:
        provider.close()
    assert step_seed(5, 4) != step_seed(5, 3) and step_seed(5, 4) == step_seed(5, 4)
    with seeded_draws(1, 1):
        first = torch.rand(3)
    with seeded_draws(1, 1):
        assert torch.equal(torch.rand(3), first)


# --- in-process: restart, ResumeSession, idle unloading ------------------------------------------


def test_a_restarted_server_loads_sessions_lazily_and_replays_exactly(tiny_llama, tmp_path):
    state = tmp_path / "state"
    first = _provider(tiny_llama, state, checkpoint_every=2)
    try:
        with running_server(first) as address, RemoteTopService(address) as service:
            sid = service.open_session(_spec(7))
            secret = service.session_secret(sid)
            announced = [_step(service, sid, 7, step).checkpointed for step in range(1, 6)]
            assert announced == [False, True, False, True, False]
    finally:
        first.close()  # the server goes away with step 5 applied but never checkpointed: as after SIGKILL

    second = _provider(tiny_llama, state, checkpoint_every=2, max_sessions=1)
    try:
        assert len(second.sessions) == 0 and second.sessions.store.steps(sid) == [2, 4]
        with (
            running_server(second) as address,
            RemoteTopService(address, tries=1) as service,
            grpc.insecure_channel(address) as channel,
        ):
            stub = sap_pb2_grpc.SplitLearningStub(channel)
            hidden, mask, _ = _batch(7, 5)
            evaluate = wire.forward_frames(sid, 0, hidden, mask)
            # refused calls load nothing
            code, _ = _code(lambda: list(stub.Evaluate(iter(evaluate), timeout=30)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = _code(lambda: list(stub.Evaluate(iter(evaluate), timeout=30, metadata=[(SECRET_KEY, "0" * 64)])))
            assert code == grpc.StatusCode.PERMISSION_DENIED and len(second.sessions) == 0

            service.use_session(sid, secret)
            # the retried Backward of the checkpointed step 4 is answered from its record, flag and all
            replay = service.backward(sid, 4, torch.zeros(BATCH, NUM_LABELS))
            assert (replay.applied_step, replay.replayed, replay.checkpointed) == (4, True, True)
            assert sid in second.sessions and len(second.sessions) == 1
            with pytest.raises(StepOrderError, match="next step is 5"):
                service.forward(sid, 6, hidden, mask)
            # a loaded session counts toward --max-sessions (1 here)
            with pytest.raises(ResourceLimitError, match="--max-sessions"):
                service.open_session(_spec(8))
            for step in (5, 6, 7):
                _step(service, sid, 7, step)
            trained = second.sessions.get(sid).trainable_state()
            assert service.close_session(sid) == 7
    finally:
        second.close()
    _assert_close(trained, _solo(tiny_llama, 7, 7), "run across a restart")

    # a retried close after another restart still gets the first close's reply
    third = _provider(tiny_llama, state)
    try:
        with running_server(third) as address, RemoteTopService(address) as service:
            service.use_session(sid, secret)
            assert service.close_session(sid) == 7
    finally:
        third.close()


def test_a_graceful_stop_checkpoints_every_session_where_it_stands(tiny_llama, tmp_path):
    """sap-server on SIGTERM (with --state-dir) checkpoints each loaded session: a client that retries across the
    restart goes on with its next step, no resume needed."""
    state = tmp_path / "state"
    first = _provider(tiny_llama, state, checkpoint_every=2)
    try:
        service = LocalTopService(first)
        sid = service.open_session(_spec(4))
        for step in (1, 2, 3):
            _step(service, sid, 4, step)
        assert first.sessions.store.steps(sid) == [0, 2]
        assert first.sessions.checkpoint_loaded() == 1 and first.sessions.checkpoint_loaded() == 0
        assert first.sessions.store.steps(sid) == [0, 2, 3]
    finally:
        first.close()
    second = _provider(tiny_llama, state, checkpoint_every=2)
    try:
        service = LocalTopService(second)
        for step in (4, 5):
            _step(service, sid, 4, step)
        trained = second.sessions.get(sid).trainable_state()
    finally:
        second.close()
    _assert_close(trained, _solo(tiny_llama, 4, 5), "run across a graceful restart")


def test_resume_session_auth_rollback_and_refusals(tiny_llama, tmp_path):
    provider = _provider(tiny_llama, tmp_path / "state", checkpoint_every=2)
    try:
        with (
            running_server(provider) as address,
            RemoteTopService(address) as owner,
            grpc.insecure_channel(address) as channel,
        ):
            stub = sap_pb2_grpc.SplitLearningStub(channel)
            sid = owner.open_session(_spec(3))
            secret = owner.session_secret(sid)
            for step in range(1, 6):
                _step(owner, sid, 3, step)
            hidden, mask, _ = _batch(3, 6)
            owner.forward(sid, 6, hidden, mask)  # step 6 pending
            trainer = provider.sessions.get(sid)
            before, pending = trainer.trainable_state(), (trainer.pending_step, trainer.pending_output)

            def resume(session_id: str, step: int, md=()):
                return stub.ResumeSession(
                    sap_pb2.ResumeSessionRequest(session_id=session_id, step=step), timeout=30, metadata=md
                )

            made_up = "0123456789abcdef" * 2
            # the auth order of every session call: no secret (the same answer for any id), unknown, wrong
            assert _code(lambda: resume(sid, 4)) == _code(lambda: resume(made_up, 4))
            code, details = _code(lambda: resume(sid, 4))
            assert code == grpc.StatusCode.UNAUTHENTICATED and SECRET_KEY in details and sid[:8] not in details
            code, details = _code(lambda: resume(made_up, 4, [(SECRET_KEY, secret)]))
            assert code == grpc.StatusCode.NOT_FOUND and "unknown or closed" in details
            for bad in ("f" * 64, secret[:-1], secret.upper()):
                code, details = _code(lambda: resume(sid, 4, [(SECRET_KEY, bad)]))
                assert code == grpc.StatusCode.PERMISSION_DENIED and "does not match" in details
                assert "step" not in details
            code, details = _code(lambda: resume(sid, 3, [(SECRET_KEY, secret)]))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "step 3" in details and "at step 5" in details and "[2, 4]" in details
            # nothing changed
            assert trainer.steps_applied == 5 and _same_pending(trainer, pending)
            _assert_close(trainer.trainable_state(), before, "after refusals")

            # the live session exactly at the step: accepted, the pending forward dropped
            assert owner.resume_session(sid, 5) == 5 and trainer.pending_step is None
            # ahead of the step: restored from the checkpoint at 4 (the one at 6 will be written again)
            _step(owner, sid, 3, 6)
            assert provider.sessions.store.steps(sid) == [4, 6]
            assert resume(sid, 4, [(SECRET_KEY, secret)]).steps_applied == 4
            assert trainer.steps_applied == 4 and provider.sessions.store.steps(sid) == [4]
            replay = owner.backward(sid, 4, torch.zeros(BATCH, NUM_LABELS))
            assert replay.replayed and replay.checkpointed
            for step in range(5, 9):
                _step(owner, sid, 3, step)
            trained = trainer.trainable_state()
            # a closed session goes back to a checkpoint it still has (a client that died after closing)
            assert owner.close_session(sid) == 8
            owner.use_session(sid, secret)  # the client forgets a closed session's secret; its checkpoint has it
            assert owner.resume_session(sid, 8) == 8 and sid in provider.sessions
            with pytest.raises(StepOrderError, match=r"\[6, 8\]"):
                owner.resume_session(sid, 2)
            owner.close_session(sid)
        # without a state dir there is nothing to go back to
        bare = _provider(tiny_llama)
        try:
            service = LocalTopService(bare)
            other = service.open_session(_spec(3))
            _step(service, other, 3, 1)
            assert service.resume_session(other, 1) == 1
            with pytest.raises(StepOrderError, match="without --state-dir"):
                service.resume_session(other, 0)
            service.close_session(other)
            with pytest.raises(SessionNotFoundError):
                service.resume_session(other, 1)
        finally:
            bare.close()
    finally:
        provider.close()
    _assert_close(trained, _solo(tiny_llama, 3, 8), "run with a rollback")


def _wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_idle_sessions_are_unloaded_and_come_back_the_same(tiny_llama, tmp_path, caplog):
    provider = _provider(tiny_llama, tmp_path / "state", checkpoint_every=4, idle_timeout=1.0, max_sessions=1)
    try:
        with running_server(provider) as address, RemoteTopService(address) as service:
            sid = service.open_session(_spec(9))
            for step in (1, 2, 3):  # step 3 is not a multiple of 4: the unload writes it
                _step(service, sid, 9, step)
            _wait_until(lambda: sid not in provider.sessions, what="the idle session to be unloaded")
            assert provider.sessions.store.steps(sid) == [0, 3]
            # an unloaded session does not count toward --max-sessions (1 here); a loaded one does
            other = service.open_session(_spec(10))
            with pytest.raises(ResourceLimitError):
                _step(service, sid, 9, 4)
            service.close_session(other)
            for step in (4, 5, 6):  # loaded again on its first call, from step 3
                _step(service, sid, 9, step)
            trained = provider.sessions.get(sid).trainable_state()
            service.close_session(sid)
    finally:
        provider.close()
    _assert_close(trained, _solo(tiny_llama, 9, 6), "run with an idle unload")

    # without a state dir an idle session is closed (and said so in the log)
    bare = _provider(tiny_llama, idle_timeout=0.3)
    try:
        service = LocalTopService(bare)
        sid = service.open_session(_spec(9))
        _step(service, sid, 9, 1)
        with caplog.at_level("WARNING", logger="sap_server.registry"):
            _wait_until(lambda: sid not in bare.sessions, what="the idle session to be closed")
            # the reaper logs right after it takes the session out: wait for the line, not just the removal
            _wait_until(lambda: "closed after 1 steps" in caplog.text, what="the close to be logged")
        with pytest.raises(SessionNotFoundError, match="unknown or closed"):
            _step(service, sid, 9, 2)
    finally:
        bare.close()


# --- the client: resume -----------------------------------------------------------------------------

TRAIN_FLAGS = ["--batch-size", "4", "--epochs", "2", "--eval-fraction", "0.25", "--lr", "1e-2", "--seed", "3"]
NOISE_KEY = "5a" * 32 + "\n"


def _run_dir(path: Path) -> Path:
    """A run folder with a fixed noise key, so runs with noise can be compared."""
    path.mkdir(parents=True)
    (path / "noise.key").write_text(NOISE_KEY)
    return path


def _adapter_weights(provider: Provider, run: Path) -> Weights:
    return provider.adapters.get(json.loads((run / "run.json").read_text())["adapter_id"]).state


def _comparable(metrics: dict) -> dict:
    return {
        key: metrics[key]
        for key in (
            "steps",
            "examples",
            "eval_accuracy",
            "train_loss",
            "history",
            "noise_to_signal",
            "eta",
            "rescale_norm",
        )
    }


class _Killed(BaseException):
    """Stands for the client process dying: not an error the client handles."""


@pytest.mark.parametrize(
    "flags, cut_at, applied",
    [
        ([], 5, False),
        (["--noise-ratio", "0.5", "--cti", "--rescale-noised"], 15, True),
        (["--train-bottom", "--eta", "600"], 10, True),
        (["--private-head", "--label-epsilon", "2", "--noise-ratio", "0.5"], 15, True),
        (["--user-tail", "1", "--noise-ratio", "0.5"], 11, True),
    ],
    ids=[
        "plain-forward-pending",
        "noise-cti-rescaled-epoch2",
        "train-bottom-server-checkpoint-ahead",
        "private-head-label-dp-epoch2",
        "user-tail-epoch2",
    ],
)
def test_a_run_cut_short_resumes_to_the_uninterrupted_result(tiny_llama, tmp_path, monkeypatch, flags, cut_at, applied):
    """The client dies at step cut_at: with its forward under way (the server then sits at the client's checkpoint
    with a forward pending), or right after the server applied it (the server is ahead; at an even step it also
    holds a checkpoint the client never wrote: the alignment case)."""
    data = write_csv(tmp_path / "data.csv", learnable_rows(48, seed=1))
    train = ["train", str(data), *TRAIN_FLAGS, *flags]
    reference = _provider(tiny_llama)
    try:
        with running_server(reference) as address:
            assert client_cli.main([*train, "--server", address, "--out", str(_run_dir(tmp_path / "ref"))]) == 0
        expected = _adapter_weights(reference, tmp_path / "ref")
    finally:
        reference.close()

    provider = _provider(tiny_llama, tmp_path / "state", checkpoint_every=2)
    run = _run_dir(tmp_path / "run")
    exchange, calls = client_trainer.SplitTrainer._exchange, []

    def dies_at_step(self, outgoing, labels):
        calls.append(1)
        if len(calls) == cut_at:
            if applied:
                exchange(self, outgoing, labels)
            else:
                self.service.forward(self.session_id, self.steps + 1, outgoing[1], outgoing[2])
            raise _Killed
        return exchange(self, outgoing, labels)

    try:
        with running_server(provider) as address:
            monkeypatch.setattr(client_trainer.SplitTrainer, "_exchange", dies_at_step)
            with pytest.raises(_Killed):
                client_cli.main([*train, "--server", address, "--out", str(run)])
            monkeypatch.setattr(client_trainer.SplitTrainer, "_exchange", exchange)
            assert not (run / "metrics.json").exists()
            saved = read_meta(run / "checkpoint.safetensors")
            assert (
                saved["step"] == (cut_at - 1) // 2 * 2
                and stat.S_IMODE((run / "checkpoint.safetensors").stat().st_mode) == 0o600
            )
            # predict/evaluate and a new train into the folder are refused while the run is unfinished
            assert client_cli.main(["evaluate", str(data), "--run", str(run)]) == 1
            assert client_cli.main([*train, "--server", address, "--out", str(run)]) == 1
            assert client_cli.main(["resume", str(run), "--server", address]) == 0
        metrics = json.loads((run / "metrics.json").read_text())
        trained = _adapter_weights(provider, run)
    finally:
        provider.close()
    reference_metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert _comparable(metrics) == _comparable(reference_metrics)
    assert metrics["resumed_at_steps"] == [saved["step"]] and reference_metrics["resumed_at_steps"] == []
    _assert_close(trained, expected, "resumed run")
    if "--train-bottom" in flags:
        _assert_close(
            load_file(str(run / "bottom.safetensors")),
            load_file(str(tmp_path / "ref" / "bottom.safetensors")),
            "trained bottom",
        )
    if "--private-head" in flags or "--user-tail" in flags:
        # the head (and the tail's LoRA) and its optimizer came back from the client's checkpoint
        _assert_close(
            load_file(str(run / "head.safetensors")), load_file(str(tmp_path / "ref" / "head.safetensors")), "head"
        )
        assert metrics["label_dp"] == reference_metrics["label_dp"]  # the same randomized labels (or none)
    assert not (run / "checkpoint.safetensors").exists(), "the completed run keeps no session secret"
    settings = json.loads((run / "run.json").read_text())
    assert settings["finished"] and settings["adapter_id"]
    assert (settings["rescale_norm"] is not None) == ("--rescale-noised" in flags)


def _completion_rows(n: int, seed: int) -> list[dict]:
    """prompt/completion pairs a tiny decoder can learn (the completion names the parity of the first word)."""
    rng = random.Random(seed)
    fillers = [w for w in WORDS if w.startswith("w")]
    rows = []
    for _ in range(n):
        words = rng.sample(fillers, rng.randint(2, 5))
        rows.append({"prompt": " ".join(words), "completion": "good movie" if int(words[0][1:]) % 2 else "bad plot"})
    return rows


@pytest.mark.parametrize(
    "flags, cut_at, applied",
    [([], 5, False), (["--user-tail", "1", "--noise-ratio", "0.5"], 13, True)],
    ids=["plain-forward-pending", "user-tail-noise-epoch2"],
)
def test_a_generative_run_cut_short_resumes_to_the_uninterrupted_result(
    tiny_llama, tmp_path, monkeypatch, flags, cut_at, applied
):
    """sap-client train DATA.jsonl dies at step cut_at (forward under way, or just after the server applied it);
    sap-client resume ends with the uninterrupted run's perplexities, losses, adapter and tail LoRA."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _completion_rows(48, seed=1)))
    train = ["train", str(data), *TRAIN_FLAGS, *flags]
    reference = _provider(tiny_llama)
    try:
        with running_server(reference) as address:
            assert client_cli.main([*train, "--server", address, "--out", str(_run_dir(tmp_path / "ref"))]) == 0
        expected = _adapter_weights(reference, tmp_path / "ref")
    finally:
        reference.close()

    provider = _provider(tiny_llama, tmp_path / "state", checkpoint_every=2)
    run = _run_dir(tmp_path / "run")
    step, calls = SFTTrainer.sft_step, []

    def dies_at_step(self, examples):
        calls.append(1)
        if len(calls) == cut_at:
            if applied:
                step(self, examples)
            else:
                _, sent, mask, _ = self._sent(examples, train=True)
                self.service.forward(self.session_id, self.steps + 1, sent, mask, output="hidden")
            raise _Killed
        return step(self, examples)

    try:
        with running_server(provider) as address:
            monkeypatch.setattr(SFTTrainer, "sft_step", dies_at_step)
            with pytest.raises(_Killed):
                client_cli.main([*train, "--server", address, "--out", str(run)])
            monkeypatch.setattr(SFTTrainer, "sft_step", step)
            assert not (run / "metrics.json").exists()
            saved = read_meta(run / "checkpoint.safetensors")
            assert saved["step"] == (cut_at - 1) // 2 * 2
            assert client_cli.main([*train, "--server", address, "--out", str(run)]) == 1  # unfinished: refused
            assert client_cli.main(["resume", str(run), "--server", address]) == 0
        metrics = json.loads((run / "metrics.json").read_text())
        trained = _adapter_weights(provider, run)
    finally:
        provider.close()
    reference_metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    keys = ("steps", "examples", "train_tokens", "eval_perplexity_before", "eval_perplexity", "history", "eta")
    assert {k: metrics[k] for k in keys} == {k: reference_metrics[k] for k in keys}
    assert metrics["noise_to_signal"] == pytest.approx(reference_metrics["noise_to_signal"])
    assert metrics["resumed_at_steps"] == [saved["step"]] and reference_metrics["resumed_at_steps"] == []
    _assert_close(trained, expected, "resumed run")
    if "--user-tail" in flags:  # the tail's LoRA and its optimizer came back from the client's checkpoint
        _assert_close(
            load_file(str(run / "head.safetensors")), load_file(str(tmp_path / "ref" / "head.safetensors")), "tail"
        )
    assert not (run / "checkpoint.safetensors").exists(), "the completed run keeps no session secret"
    assert json.loads((run / "run.json").read_text())["finished"]


def test_resume_refuses_conflicting_flags_and_completed_runs(tiny_llama, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv", learnable_rows(24, seed=2))
    run = tmp_path / "run"
    provider = _provider(tiny_llama)
    try:
        with running_server(provider) as address:
            assert (
                client_cli.main(
                    [
                        "train",
                        str(data),
                        "--server",
                        address,
                        "--out",
                        str(run),
                        "--batch-size",
                        "8",
                        "--eval-fraction",
                        "0.25",
                        "--epochs",
                        "2",
                    ]
                )
                == 0
            )
    finally:
        provider.close()
    capsys.readouterr()
    # resume takes the run's own settings: a training flag is not one of its flags
    for flags in (["--epochs", "3"], ["--batch-size", "4", "--eta", "9"], [str(tmp_path / "other.csv")]):
        with pytest.raises(SystemExit) as info:
            client_cli.main(["resume", str(run), *flags])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "unrecognized arguments" in err and flags[0] in err, err
    # the old spelling says what to use instead
    with pytest.raises(SystemExit) as info:
        client_cli.main(["train", "--resume", str(run)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"sap-client resume {run}" in err, err
    # where/how to connect may be given; a completed run is refused before connecting
    assert client_cli.main(["resume", str(run), "--device", "cpu", "--server", "127.0.0.1:1"]) == 1
    assert "completed run" in capsys.readouterr().err
    assert client_cli.main(["resume", str(tmp_path / "nothing")]) == 1
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        client_cli.main(["train"])
    assert info.value.code == 2 and "DATA.csv" in capsys.readouterr().err


def test_cli_flags_and_help(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        server_cli.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--state-dir", "--checkpoint-every", "--idle-timeout", "SAP_CHECKPOINT_EVERY", "SAP_IDLE_TIMEOUT"):
        assert flag in out
    with pytest.raises(SystemExit):
        client_cli.main(["resume", "--help"])
    assert "RUN_DIR" in capsys.readouterr().out
    for argv, word in (
        (["--checkpoint-every", "0"], "--checkpoint-every"),
        (["--idle-timeout", "-1"], "--idle-timeout"),
        (["--idle-timeout", "nan"], "--idle-timeout"),
    ):
        with pytest.raises(SystemExit) as info:
            server_cli.main(argv)
        assert info.value.code == 2 and word in capsys.readouterr().err
    monkeypatch.setenv("SAP_CHECKPOINT_EVERY", "7")
    monkeypatch.setenv("SAP_IDLE_TIMEOUT", "60")
    args = server_cli.build_parser().parse_args([])
    assert (args.checkpoint_every, args.idle_timeout) == (7, 60.0)


# --- real processes, SIGKILL ----------------------------------------------------------------------

KILL_ROWS, KILL_FLAGS = (
    64,
    [
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--eval-fraction",
        "0.25",
        "--lr",
        "1e-2",
        "--seed",
        "4",
        "--noise-ratio",
        "0.5",
    ],
)
# The console scripts' entry points (pyproject: sap-server = sap_server.cli:main, sap-client = sap_client.cli:main),
# each in its own process. The process does its heavy imports first and then waits for a go file, so that the
# processes a test needs start together (a cold import of torch + transformers takes seconds on a busy machine).
LAUNCHER = """
import importlib, sys, time
from pathlib import Path
go, module, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
import sap_client.commands, sap_server.app, sap_server.provider  # noqa: the imports main() would do
cli = importlib.import_module(module)
while not go.exists():
    time.sleep(0.01)
sys.exit(cli.main(argv))
"""


class _Process:
    """`sap-server ARGS` or `sap-client ARGS` in a new process; it starts when go() is called. Output goes to a
    log file; a server's stdout is read for its 'listening' line."""

    def __init__(self, module: str, argv: list[str], env: dict, log: Path, *, go: bool = False):
        self.log, self._go = log, log.with_suffix(".go")
        if go:
            self.go()
        self._out = log.open("w")
        server = module == "sap_server.cli"
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(self._go), module, *argv],
            stdout=subprocess.PIPE if server else self._out,
            stderr=self._out,
            text=True,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        if server:
            threading.Thread(target=self._pump, daemon=True).start()

    def go(self) -> None:
        self._go.touch()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def address(self, timeout: float = 90) -> str:
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"sap-server did not listen within {timeout} s: {self.log.read_text()[-2000:]}")
            if line is None:
                pytest.fail(f"sap-server exited ({self.process.wait()}): {self.log.read_text()[-2000:]}")
            match = LISTENING.match(line)  # the one pattern (sap_server.launch)
            if match:
                return match.group(1)

    def kill(self) -> None:
        """SIGKILL (the process gets no chance to clean up)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._out.close()


def _server(folder: Path, state: Path, port: int, env: dict, log: Path, *, go: bool) -> _Process:
    return _Process(
        "sap_server.cli",
        [
            "--model",
            str(folder),
            "--split",
            "1",
            "--port",
            str(port),
            "--state-dir",
            str(state),
            "--checkpoint-every",
            "2",
            "--workers",
            "4",
        ],
        env,
        log,
        go=go,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def uninterrupted(one_thread, tiny_llama, tmp_path_factory) -> tuple[Path, dict, Weights]:
    """The reference: the same run (with noise) without interruption, in-process (one torch thread, like the
    processes)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    data = write_csv(folder / "data.csv", learnable_rows(KILL_ROWS, seed=5))
    run = _run_dir(folder / "run")
    provider = _provider(tiny_llama)
    try:
        with running_server(provider) as address:
            assert client_cli.main(["train", str(data), "--server", address, "--out", str(run), *KILL_FLAGS]) == 0
        weights = _adapter_weights(provider, run)
    finally:
        provider.close()
    return data, json.loads((run / "metrics.json").read_text()), weights


def _env(tmp_path: Path) -> dict:
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        SAP_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
        OMP_NUM_THREADS="1",
    )


def _client_checkpoint_step(run: Path) -> int:
    try:
        return read_meta(run / "checkpoint.safetensors")["step"]
    except (OSError, InvalidInputError):
        return -1


def _server_checkpointed_past(state: Path, run: Path) -> None:
    """Wait until the server holds a checkpoint of a later step than the client's latest (it has gone on)."""
    step = _client_checkpoint_step(run)

    def server_steps() -> list[int]:
        return [int(p.stem.split("-")[1]) for p in state.glob("sessions/*/step-*.safetensors")]

    _wait_until(lambda: max(server_steps(), default=-1) > step, timeout=90, what=f"a server checkpoint past {step}")


def _kill_when_checkpointed(client: _Process, run: Path, then) -> int:
    """Wait for the client's first checkpoint after a step (step >= 2), run `then`, SIGKILL the client; the
    step of its checkpoint."""
    _wait_until(
        lambda: _client_checkpoint_step(run) >= 2 or client.process.poll() is not None,
        timeout=90,
        what="the client's first checkpoint",
    )
    exited = client.process.poll()
    then()
    client.kill()
    assert not (run / "metrics.json").exists(), f"the run finished before it was killed: {client.log.read_text()}"
    step = _client_checkpoint_step(run)
    assert step >= 2 or exited is None, f"the client exited ({exited}) before its checkpoint: {client.log.read_text()}"
    return step


def _check_against(uninterrupted, run: Path, state: Path, capsys) -> None:
    """`sap-client resume RUN_DIR` ran: the same metrics and weights as the uninterrupted run."""
    _, expected_metrics, expected_weights = uninterrupted
    assert "resumed at step" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == expected_metrics["steps"] and metrics["examples"] == expected_metrics["examples"]
    assert [h["eval_accuracy"] for h in metrics["history"]] == [h["eval_accuracy"] for h in expected_metrics["history"]]
    assert [h["train_loss"] for h in metrics["history"]] == pytest.approx(
        [h["train_loss"] for h in expected_metrics["history"]], rel=1e-5
    )  # the 1e-5: on a 16-core
    # machine torch's parallel reductions can differ in the last bits between two runs of the same step
    assert metrics["eval_accuracy"] == expected_metrics["eval_accuracy"]
    assert metrics["noise_to_signal"] == pytest.approx(expected_metrics["noise_to_signal"], rel=1e-6)
    adapter_id = json.loads((run / "run.json").read_text())["adapter_id"]
    _assert_close(
        load_file(str(state / "adapters" / adapter_id / "adapter.safetensors")),
        expected_weights,
        "resumed run",
        atol=1e-5,
    )


def test_server_killed_mid_run_restarts_and_the_client_resumes(tiny_llama, uninterrupted, tmp_path, capsys):
    data, _, _ = uninterrupted
    env, state, run, port = _env(tmp_path), tmp_path / "state", _run_dir(tmp_path / "run"), _free_port()
    address = f"127.0.0.1:{port}"
    server = _server(tiny_llama, state, port, env, tmp_path / "server.log", go=True)
    client = _Process(
        "sap_client.cli",
        ["train", str(data), "--server", address, "--out", str(run), *KILL_FLAGS],
        env,
        tmp_path / "client.log",
    )
    restarted = _server(tiny_llama, state, port, env, tmp_path / "restarted.log", go=False)
    try:
        assert server.address() == address
        client.go()
        step = _kill_when_checkpointed(client, run, then=server.kill)  # kill -9 the server, then the client
        assert step >= 2
        [session] = (state / "sessions").iterdir()
        assert list(session.glob("step-*.safetensors"))
        restarted.go()  # the same port, the same --state-dir
        assert restarted.address() == address
        assert client_cli.main(["resume", str(run), "--server", address]) == 0
    finally:
        for process in (client, server, restarted):
            process.kill()
    _check_against(uninterrupted, run, state, capsys)
    assert "loaded from its checkpoint" in (tmp_path / "restarted.log").read_text()


def test_client_killed_mid_run_resumes_against_the_running_server(tiny_llama, uninterrupted, tmp_path, capsys):
    data, _, _ = uninterrupted
    env, state, run, port = _env(tmp_path), tmp_path / "state", _run_dir(tmp_path / "run"), _free_port()
    address = f"127.0.0.1:{port}"
    server = _server(tiny_llama, state, port, env, tmp_path / "server.log", go=True)
    client = _Process(
        "sap_client.cli",
        ["train", str(data), "--server", address, "--out", str(run), *KILL_FLAGS],
        env,
        tmp_path / "client.log",
    )
    try:
        assert server.address() == address
        client.go()
        # the server goes on past the client's checkpoint before the client dies: it resumes back to it
        _kill_when_checkpointed(client, run, then=lambda: _server_checkpointed_past(state, run))
        assert client_cli.main(["resume", str(run)]) == 0  # the run's own server
    finally:
        client.kill()
        server.kill()
    _check_against(uninterrupted, run, state, capsys)
    assert "resumed at step" in (tmp_path / "server.log").read_text()


def _same_pending(session, pending) -> bool:
    """The session's pending forward is still the one recorded: its step, and its very logits (the same storage, not
    a recomputation)."""
    step, logits = pending
    now = session.pending_output
    return session.pending_step == step and logits is not None and now.data_ptr() == logits.data_ptr()


def test_a_run_from_before_resume_existed_is_read_but_not_resumed(tmp_path):
    """run.json without data/data_sha256 (written before `resume` existed): it still reads as a RunSpec, for predict
    and evaluate, and `resume` says why it cannot continue it instead of failing on a missing key."""
    from sap_client.commands import resume
    from sap_client.rundir import RunDir

    run = tmp_path / "old-run"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps(
            {
                "server": "127.0.0.1:1",
                "model": "tiny",
                "split": 1,
                "label_names": ["neg", "pos"],
                "text_column": "text",
                "label_column": "label",
                "config": {"epochs": 1, "batch_size": 4},
                "noise": {},
                "eta": None,
                "finished": None,
            }
        )
    )
    spec = RunDir(run).read_spec()
    assert spec.data is None and spec.wire_dtype == "float32" and spec.config.batch_size == 4
    with pytest.raises(InvalidInputError, match="no resume information"):
        resume(run)
