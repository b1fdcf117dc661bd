"""Many clients at once, and a flaky network, against one real loopback server.

- 8 clients (threads, one channel each) train at the same time; each one's final weights equal its solo run.
- The client retries UNAVAILABLE and DEADLINE_EXCEEDED (a server-side interceptor fails chosen calls,
  before or after the server handled them; a server that stops and comes back on the same port) and
  still ends with exactly the weights of an undisturbed run; other codes are not retried.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import torch
from torch.nn import functional as F

from conftest import running_server
from sap_client.remote import RemoteTopService
from sap_common.errors import InvalidInputError, ServerUnavailableError
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_common.service import SessionSpec
from sap_server.app import start_server
from sap_server.provider import Provider

HIDDEN, NUM_LABELS, STEPS, CLIENTS = 32, 3, 3, 8
Weights = dict[str, torch.Tensor]

pytestmark = pytest.mark.usefixtures("one_thread")


def _provider(folder: Path) -> Provider:
    return Provider.from_loaded(load_model(str(folder)), split=1, peft=PeftConfig())


def _batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's hidden (B, T, H), right-padded mask (B, T) and labels (B,); sizes vary with the seed."""
    g = torch.Generator().manual_seed(100 * seed + step)
    batch, length = 2 + seed % 3, 4 + seed % 4
    hidden = torch.randn(batch, length, HIDDEN, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0
    return hidden, mask, torch.randint(0, NUM_LABELS, (batch,), generator=g)


def _train(
    service: RemoteTopService,
    seed: int,
    steps: int = STEPS,
    start: threading.Barrier | None = None,
    replays: list[int] | None = None,
) -> str:
    """Open a session and train `steps` steps (plus one Evaluate); returns the session id."""
    sid = service.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=seed))
    if start is not None:
        start.wait(timeout=60)  # every client starts its steps together, so their calls interleave
    for step in range(1, steps + 1):
        hidden, mask, labels = _batch(seed, step)
        logits = service.forward(sid, step, hidden, mask).requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
        result = service.backward(sid, step, grad)
        assert result.applied_step == step
        if result.replayed and replays is not None:
            replays.append(step)
        if step == 1:
            assert service.evaluate(sid, hidden, mask).shape == logits.shape
    return sid


def _solo(folder: Path, seeds: list[int], steps: int = STEPS) -> dict[int, Weights]:
    """Each seed's weights after training alone (one after the other) on a fresh server."""
    provider = _provider(folder)
    try:
        with running_server(provider) as address, RemoteTopService(address) as service:
            return {seed: provider.sessions.get(_train(service, seed, steps)).trainable_state() for seed in seeds}
    finally:
        provider.close()


def _assert_equal(actual: Weights, expected: Weights, what: str) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{what}: {name} differs"


# --- many clients ---------------------------------------------------------------------------------


def test_eight_clients_train_concurrently_each_as_if_alone(tiny_llama):
    seeds = list(range(CLIENTS))
    provider = _provider(tiny_llama)
    results: dict[int, Weights] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS)

    def client(seed: int, address: str) -> None:
        try:
            with RemoteTopService(address) as service:
                sid = _train(service, seed, start=start)
                results[seed] = provider.sessions.get(sid).trainable_state()
                assert service.close_session(sid) == STEPS
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            start.abort()

    try:
        with running_server(provider, workers=CLIENTS) as address:
            threads = [threading.Thread(target=client, args=(seed, address)) for seed in seeds]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
        assert not errors, errors
        assert sorted(results) == seeds and len(provider.sessions) == 0
    finally:
        provider.close()
    for seed, expected in _solo(tiny_llama, seeds).items():
        _assert_equal(results[seed], expected, f"client {seed}")


# --- retries --------------------------------------------------------------------------------------


class Flaky(grpc.ServerInterceptor):
    """Fails chosen calls: plan maps (method, n) -> action for the n-th call (1-based) of that method.

    "down": UNAVAILABLE before the server sees the call; "lose": the server handles the call, then the
    reply is lost (UNAVAILABLE); "slow": the call waits `delay` s before the server handles it.
    """

    def __init__(self, plan: dict[tuple[str, int], str], delay: float = 0.0):
        self.plan, self.delay = plan, delay
        self.calls: Counter[str] = Counter()
        self.finished = threading.Event()  # set when a "slow" call has been handled
        self._lock = threading.Lock()

    def intercept_service(self, continuation, details):
        name = details.method.rsplit("/", 1)[-1]
        with self._lock:
            self.calls[name] += 1
            action = self.plan.get((name, self.calls[name]))
        handler = continuation(details)
        if action is None or handler is None:
            return handler
        return _wrapped(handler, action, self.delay, self.finished)


def _wrapped(handler, action: str, delay: float, finished: threading.Event):
    """The same handler kind, with the action around the real behaviour."""
    streaming = handler.stream_stream is not None
    inner = handler.stream_stream if streaming else handler.unary_unary
    assert inner is not None, "Flaky only wraps unary and stream-stream handlers"

    def run(request, context):
        if action == "down":
            context.abort(grpc.StatusCode.UNAVAILABLE, "simulated outage")
        if action == "slow":
            time.sleep(delay)
        try:
            reply = inner(request, context)
            if streaming:
                reply = list(reply)  # handle the whole call
        finally:
            if action == "slow":
                finished.set()
        if action == "lose":
            context.abort(grpc.StatusCode.UNAVAILABLE, "simulated: the reply was lost")
        return reply

    if streaming:
        return grpc.stream_stream_rpc_method_handler(
            lambda it, ctx: iter(run(it, ctx)), handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(run, handler.request_deserializer, handler.response_serializer)


def test_retries_survive_lost_requests_and_lost_replies(tiny_llama):
    plan = {
        ("OpenSession", 1): "down",
        ("Forward", 1): "down",
        ("Forward", 2): "down",
        ("Backward", 1): "lose",  # applied, reply lost: the retry must be replayed, not applied again
        ("Forward", 4): "lose",  # forward of step 2 ran, reply lost: the retry recomputes it
        ("Backward", 4): "lose",
        ("EvaluateSmall", 1): "down",  # a batch in one frame goes unary
        ("CloseSession", 1): "lose",
    }
    flaky = Flaky(plan)
    provider = _provider(tiny_llama)
    replays: list[int] = []
    try:
        with (
            running_server(provider, interceptors=[flaky]) as address,
            RemoteTopService(address, tries=4, retry_backoff=0.02) as service,
        ):
            sid = _train(service, seed=11, replays=replays)
            trained = provider.sessions.get(sid).trainable_state()
            assert service.close_session(sid) == STEPS  # the first close was applied, its reply lost
    finally:
        provider.close()
    assert replays == [1, 3]  # the retried Backwards of steps 1 and 3 were answered from the record
    assert flaky.calls == Counter(OpenSession=2, Forward=STEPS + 3, Backward=STEPS + 2, EvaluateSmall=2, CloseSession=2)
    _assert_equal(trained, _solo(tiny_llama, [11])[11], "retried run")


def test_a_call_past_its_deadline_is_tried_again(tiny_llama):
    # The first Forward is held 3 s on the server, past the client's 1.5 s deadline; the server then still
    # runs it (its reply goes nowhere) while the client has long retried: the run must not notice.
    flaky = Flaky({("Forward", 1): "slow"}, delay=3.0)
    provider = _provider(tiny_llama)
    try:
        with (
            running_server(provider, interceptors=[flaky]) as address,
            RemoteTopService(address, tries=5, retry_backoff=0.02, call_timeout=1.5) as service,
        ):
            started = time.monotonic()
            sid = _train(service, seed=13)
            assert time.monotonic() - started >= 1.5 and flaky.calls["Forward"] >= STEPS + 1
            assert flaky.finished.wait(timeout=60)  # the held call has run on the server: it must change nothing
            trained = provider.sessions.get(sid).trainable_state()
            assert provider.sessions.get(sid).steps_applied == STEPS
    finally:
        provider.close()
    _assert_equal(trained, _solo(tiny_llama, [13])[13], "run with a deadline")


def test_retries_ride_out_a_server_restart(tiny_llama):
    provider = _provider(tiny_llama)
    server, port = start_server(provider, "127.0.0.1", 0)
    address, restarted = f"127.0.0.1:{port}", []
    try:
        with RemoteTopService(address, tries=8, retry_backoff=0.1, retry_backoff_max=1.0) as service:
            sid = service.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=12))
            for step in range(1, STEPS + 1):
                if step == 2:  # the server goes away between steps and comes back 0.8 s later, same port
                    server.stop(None).wait()
                    timer = threading.Timer(0.8, lambda: restarted.append(start_server(provider, "127.0.0.1", port)))
                    timer.start()
                hidden, mask, labels = _batch(12, step)
                logits = service.forward(sid, step, hidden, mask).requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
                assert service.backward(sid, step, grad).applied_step == step
            timer.join()
            assert restarted and restarted[0][1] == port
            trained = provider.sessions.get(sid).trainable_state()
    finally:
        for started, _ in restarted:
            started.stop(None).wait()
        server.stop(None)
        provider.close()
    _assert_equal(trained, _solo(tiny_llama, [12])[12], "run across a restart")


def test_other_codes_are_not_retried_and_tries_are_bounded(tiny_llama):
    provider = _provider(tiny_llama)
    always_down = Flaky({("GetServerInfo", n): "down" for n in range(1, 10)})
    try:
        with (
            running_server(provider, interceptors=[always_down]) as address,
            RemoteTopService(address, tries=3, retry_backoff=0.01) as service,
        ):
            sid = service.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2))
            hidden, mask, _ = _batch(0, 1)
            with pytest.raises(InvalidInputError, match="hidden size"):
                service.forward(sid, 1, hidden[..., :-1], mask)  # wrong hidden size: INVALID_ARGUMENT
            with pytest.raises(ServerUnavailableError, match="after 3 tries"):
                service.server_info()
            assert always_down.calls == Counter(OpenSession=1, Forward=1, GetServerInfo=3)
    finally:
        provider.close()
