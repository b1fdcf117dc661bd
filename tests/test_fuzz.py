"""Fuzz every RPC of a real loopback server with malformed requests, then train on it normally.

Over 500 seeded-random requests: random bytes, truncated and garbled serialized messages, forbidden and
unknown dtypes, byte lengths that do not match the header, wrong hidden sizes, NaN/Inf, lengths that do not
fit the tokens, oversized batches, wrong steps, empty streams, bogus session ids and secrets, missing and
wrong API keys. Each must get a non-OK status from the set expected for it (never INTERNAL or UNKNOWN,
which would mean an unhandled error), and a message naming the problem where the problem is known.
Afterwards the fuzzed sessions are exactly as before, and a normal training run on the same server ends
with exactly the weights of the same run on a fresh server.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from torch.nn import functional as F

from conftest import running_server
from sap_client.remote import ClientCredentials, RemoteTopService
from sap_common import codec
from sap_common.errors import InvalidInputError
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_common.proto import sap_pb2
from sap_common.service import SessionSpec
from sap_server.auth import ApiKeys
from sap_server.provider import Provider

HIDDEN, NUM_LABELS, MAX_BATCH_TOKENS, REQUESTS = 32, 3, 256, 600
TIMEOUT = 60  # per call: generous, so that a busy machine cannot turn a refusal into DEADLINE_EXCEEDED
KEY = "fuzz-key"
SERVICE = "/sap.v2.SplitLearning/"
S = grpc.StatusCode
INVALID, NOT_FOUND, UNAUTH, DENIED, ORDER, LIMIT = (
    S.INVALID_ARGUMENT,
    S.NOT_FOUND,
    S.UNAUTHENTICATED,
    S.PERMISSION_DENIED,
    S.FAILED_PRECONDITION,
    S.RESOURCE_EXHAUSTED,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _provider(folder: Path) -> Provider:
    return Provider.from_loaded(
        load_model(str(folder)), split=1, peft=PeftConfig(), max_sessions=32, max_batch_tokens=MAX_BATCH_TOKENS
    )


@dataclass
class Case:
    rpc: str
    what: str
    call: Callable[[], object]
    expected: frozenset[grpc.StatusCode]
    words: tuple[str, ...] = ()  # each must appear in the status details


@dataclass
class Session:
    sid: str
    secret: str


class Fuzzer:
    """Builds the cases over raw multi-callables (bytes in, bytes out: nothing is validated client-side)."""

    def __init__(
        self,
        channel: grpc.Channel,
        rng: random.Random,
        fresh: Session,
        pending: Session,
        closed: Session,
        pending_batch: int,
    ):
        self.rng = rng
        self.fresh, self.pending, self.closed = fresh, pending, closed  # no step yet / forward 1 pending / closed
        self.pending_batch = pending_batch
        self.unary = {
            name: channel.unary_unary(SERVICE + name)
            for name in ("GetServerInfo", "OpenSession", "CloseSession", "ResumeSession")
        }
        self.download = channel.unary_stream(SERVICE + "DownloadBottom")
        self.stream = {name: channel.stream_stream(SERVICE + name) for name in ("Forward", "Backward", "Evaluate")}

    # --- raw calls ----------------------------------------------------------------------------

    def _stream(self, rpc: str, frames: list[bytes] | None, md):
        """A hot call sending the given serialized frames (None: an empty stream)."""
        return lambda: list(self.stream[rpc](iter(frames or []), timeout=TIMEOUT, metadata=md))

    def _serialized(self, rpc: str, header, tensor: torch.Tensor | None, data: bytes | None = None) -> list[bytes]:
        """header's frame, then tensor's bytes (or data, as given) in data frames of a random size."""
        frame = sap_pb2.BackwardFrame if rpc == "Backward" else sap_pb2.ForwardFrame
        if data is None:
            data = b"" if tensor is None else codec.wire_tensor(tensor)[1].numpy().tobytes()
        size = self.rng.choice([7, 64, 1024, 1 << 20])
        return [frame(header=header).SerializeToString()] + [
            frame(data=data[i : i + size]).SerializeToString() for i in range(0, len(data), size)
        ]

    def _unary(self, rpc: str, payload: bytes, md=()):
        return lambda: self.unary[rpc](payload, timeout=TIMEOUT, metadata=md)

    def _random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([1, 2, 5, 17, 64, 300]))

    def _garble(self, data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 8)):
            out[self.rng.randrange(len(out))] = self.rng.randrange(256)
        return bytes(out)

    def _md(self, session: Session, mode: str):
        if mode == "none":
            return ()
        secret = session.secret if mode == "real" else self.rng.randbytes(32).hex()
        return [("sap-session-secret", secret)]

    # --- valid bases to break -----------------------------------------------------------------

    def _tensors(self, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, T, H) and a right-padded mask (B, T) with at least one real token per row."""
        batch = batch or self.rng.randint(1, 4)
        length = self.rng.randint(2, 6)
        generator = torch.Generator().manual_seed(self.rng.randrange(1 << 30))
        hidden = torch.randn(batch, length, HIDDEN, generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        for row in range(batch):
            mask[row, self.rng.randint(1, length) :] = 0
        return hidden, mask

    def _request(self, rpc: str, session: Session, *, step: int = 1, batch: int | None = None):
        """(a good ForwardHeader for rpc, the packed hidden states it announces)."""
        hidden, mask = self._tensors(batch)
        flat, lengths = codec.pack_hidden(hidden, mask)
        header = sap_pb2.ForwardHeader(
            session_id=session.sid, step=step if rpc == "Forward" else 0, hidden=codec.wire_tensor(flat)[0]
        )
        header.lengths.extend(lengths)
        return header, flat

    def _grad_request(self, session: Session, grad: torch.Tensor | None = None):
        grad = torch.ones(self.pending_batch, NUM_LABELS) if grad is None else grad
        return sap_pb2.BackwardHeader(session_id=session.sid, step=1, grad=codec.wire_tensor(grad)[0]), grad

    # --- the cases ----------------------------------------------------------------------------

    def case(self) -> Case:
        kind = self.rng.choices(
            ["info", "download", "open", "close", "inputs", "backward", "bytes", "secret", "closed", "resume"],
            weights=[1, 1, 2, 2, 6, 3, 3, 3, 1, 2],
        )[0]
        return getattr(self, f"_{kind}")()

    def _info(self) -> Case:
        payload = self.rng.choice([b"", self._random_bytes()])
        md = self.rng.choice([(), [("authorization", "Bearer nope")], [("authorization", KEY)]])
        return Case(
            "GetServerInfo",
            "no or a wrong API key",
            self._unary("GetServerInfo", payload, md),
            frozenset({UNAUTH, INVALID}),
        )

    def _download(self) -> Case:
        payload = self.rng.choice([b"", self._random_bytes()])
        md = self.rng.choice([(), [("authorization", "Bearer nope")], [("authorization", f"bearer{KEY}")]])
        return Case(
            "DownloadBottom",
            "no or a wrong API key",
            lambda: list(self.download(payload, timeout=TIMEOUT, metadata=md)),
            frozenset({UNAUTH, INVALID}),
        )

    def _open(self) -> Case:
        good_key = [("authorization", f"Bearer {KEY}")]
        choice = self.rng.randrange(5)
        if choice == 0:
            payload = self._random_bytes()
            md = self.rng.choice([(), [("authorization", "Bearer nope")]])
            return Case(
                "OpenSession",
                "random bytes, no key",
                self._unary("OpenSession", payload, md),
                frozenset({UNAUTH, INVALID}),
            )
        if choice == 1:
            request = sap_pb2.OpenSessionRequest(
                num_labels=self.rng.choice([0, 1, 4097, 2**32 - 1]), learning_rate=1e-3
            )
            words: tuple[str, ...] = ("num_labels",)
        elif choice == 2:
            request = sap_pb2.OpenSessionRequest(
                num_labels=2, learning_rate=self.rng.choice([0.0, -1e-3, math.nan, math.inf, -math.inf])
            )
            words = ("learning_rate",)
        elif choice == 3:
            request = sap_pb2.OpenSessionRequest(
                num_labels=2, learning_rate=1e-3, weight_decay=self.rng.choice([-0.1, math.nan, math.inf])
            )
            words = ("weight_decay",)
        else:
            adapter = self.rng.choice([self.rng.randbytes(16).hex(), "../../etc/passwd", "x" * 500, "A" * 32])
            request = sap_pb2.OpenSessionRequest(adapter_id=adapter, learning_rate=self.rng.choice([0.0, math.nan]))
            return Case(
                "OpenSession",
                "unknown adapter",
                self._unary("OpenSession", request.SerializeToString(), good_key),
                frozenset({NOT_FOUND}),
                ("unknown",),
            )
        payload = request.SerializeToString()
        return Case(
            "OpenSession", f"bad {words[0]}", self._unary("OpenSession", payload, good_key), frozenset({INVALID}), words
        )

    def _close(self) -> Case:
        session = self.rng.choice([self.fresh, self.pending])
        choice = self.rng.randrange(4)
        keep = self.rng.random() < 0.5
        if choice == 0:  # no secret
            payload = sap_pb2.CloseSessionRequest(session_id=session.sid, keep=keep).SerializeToString()
            return Case(
                "CloseSession", "no secret", self._unary("CloseSession", payload), frozenset({UNAUTH}), ("secret",)
            )
        if choice == 1:  # a wrong secret
            payload = sap_pb2.CloseSessionRequest(session_id=session.sid, keep=keep).SerializeToString()
            md = self._md(session, "wrong")
            return Case(
                "CloseSession",
                "wrong secret",
                self._unary("CloseSession", payload, md),
                frozenset({DENIED}),
                ("does not match",),
            )
        if choice == 2:  # a made-up session
            payload = sap_pb2.CloseSessionRequest(session_id=self.rng.randbytes(16).hex()).SerializeToString()
            md = self._md(session, "real")
            return Case(
                "CloseSession",
                "unknown session",
                self._unary("CloseSession", payload, md),
                frozenset({NOT_FOUND}),
                ("unknown or closed",),
            )
        payload, md = self._random_bytes(), self._md(session, self.rng.choice(["real", "wrong"]))
        return Case(
            "CloseSession", "random bytes", self._unary("CloseSession", payload, md), frozenset({INVALID, NOT_FOUND})
        )

    def _resume(self) -> Case:
        """ResumeSession with no, a wrong or a made-up identity, a step the session is not at, or bad bytes.
        (Never step 0 with the real secret: the sessions are at step 0, so that would be accepted.)"""
        session = self.rng.choice([self.fresh, self.pending])
        step = self.rng.choice([1, 2, 1000, 2**64 - 1])
        choice = self.rng.randrange(6)
        request = sap_pb2.ResumeSessionRequest(session_id=session.sid, step=self.rng.choice([0, step]))
        if choice == 0:
            return Case(
                "ResumeSession",
                "no secret",
                self._unary("ResumeSession", request.SerializeToString()),
                frozenset({UNAUTH}),
                ("secret",),
            )
        if choice == 1:
            return Case(
                "ResumeSession",
                "wrong secret",
                self._unary("ResumeSession", request.SerializeToString(), self._md(session, "wrong")),
                frozenset({DENIED}),
                ("does not match",),
            )
        if choice == 2:
            request.session_id = self.rng.choice([self.rng.randbytes(16).hex(), "", "../x", session.sid[:-1]])
            return Case(
                "ResumeSession",
                "unknown session",
                self._unary("ResumeSession", request.SerializeToString(), self._md(session, "real")),
                frozenset({NOT_FOUND}),
                ("unknown or closed",),
            )
        if choice == 3:
            request = sap_pb2.ResumeSessionRequest(session_id=self.closed.sid, step=step)
            return Case(
                "ResumeSession",
                "closed session",
                self._unary("ResumeSession", request.SerializeToString(), self._md(self.closed, "real")),
                frozenset({NOT_FOUND}),
                ("unknown or closed",),
            )
        if choice == 4:
            request.step = step
            return Case(
                "ResumeSession",
                "a step it is not at",
                self._unary("ResumeSession", request.SerializeToString(), self._md(session, "real")),
                frozenset({ORDER}),
                ("cannot resume", f"step {step}"),
            )
        payload, md = self._random_bytes(), self._md(session, self.rng.choice(["real", "wrong"]))
        return Case(
            "ResumeSession", "random bytes", self._unary("ResumeSession", payload, md), frozenset({INVALID, NOT_FOUND})
        )

    def _inputs(self) -> Case:
        """A Forward/Evaluate of a real session, with its real secret, whose inputs are broken in one known way."""
        rpc = self.rng.choice(["Forward", "Evaluate"])
        session = self.rng.choice([self.fresh, self.pending])
        md = self._md(session, "real")
        header, tensor = self._request(rpc, session)
        data = None
        breakage = self.rng.choice(
            ["dtype", "unknown dtype", "bytes", "hidden size", "nan", "dims", "limit", "step", "lengths", "empty"]
        )
        expected, words = frozenset({INVALID}), ()
        if breakage == "dtype":
            tensor = (tensor > 0).to(self.rng.choice([torch.int64, torch.int32, torch.uint8, torch.bool]))
            words = ("hidden", "not allowed")
        elif breakage == "unknown dtype":
            header.hidden.dtype = self.rng.choice(["float64", "float128", "", "complex64", "FLOAT32", "float32 "])
            words = ("hidden.dtype",)
        elif breakage == "bytes":
            cut = self.rng.randint(1, 9)
            raw = codec.wire_tensor(tensor)[1].numpy().tobytes()
            data = raw[:-cut] if self.rng.random() < 0.5 else raw + b"\0" * cut
            words = ("bytes", "announces")
        elif breakage == "hidden size":
            size = self.rng.choice([1, HIDDEN - 1, HIDDEN + 1, 2 * HIDDEN])
            tensor = torch.randn(tensor.shape[0], size)
            words = ("hidden", str(size), str(HIDDEN))
        elif breakage == "nan":
            tensor = tensor.clone()
            flat = tensor.view(-1)
            flat[self.rng.randrange(flat.numel())] = self.rng.choice([math.nan, math.inf, -math.inf])
            tensor = tensor.to(self.rng.choice([torch.float32, torch.float16]))
            words = ("hidden", "NaN or Inf")  # named as the wire field the session checks
        elif breakage == "dims":
            shape = self.rng.choice([[HIDDEN], [2, 2, 2, HIDDEN], [1] * 9 + [HIDDEN], [-1, HIDDEN], [0, 3, HIDDEN]])
            header.hidden.CopyFrom(sap_pb2.TensorHeader(dtype="float32", shape=shape))
            data = b"\0" * 4 * max(math.prod(shape), 0)
            words = ("hidden",)
        elif breakage == "limit":  # a batch x length over --max-batch-tokens
            lengths = [MAX_BATCH_TOKENS // 4 + 1] * 4 + [1] * self.rng.randint(0, 3)
            header.ClearField("lengths")
            header.lengths.extend(lengths)
            tensor = torch.zeros(sum(lengths), HIDDEN)
            expected, words = frozenset({LIMIT}), ("--max-batch-tokens", str(MAX_BATCH_TOKENS))
        elif breakage == "step" and rpc == "Forward":
            header.step = self.rng.choice([0, 2, 3, 1000, 2**64 - 1])
            expected, words = frozenset({ORDER}), ("next step is 1",)
        elif breakage in ("step", "lengths"):  # lengths that do not fit the rows
            lengths = list(header.lengths)
            how = self.rng.randrange(3)
            if how == 0:  # the sum no longer matches the rows, or a length becomes 0
                lengths[self.rng.randrange(len(lengths))] += self.rng.choice([-1, 1])
            elif how == 1:
                lengths = lengths + [0]
            else:
                lengths = []
            header.ClearField("lengths")
            header.lengths.extend(lengths)
            words = ("lengths",)
        else:  # empty: nothing sent at all, or a header without the tensor
            if self.rng.random() < 0.5:
                return Case(rpc, "empty stream", self._stream(rpc, None, md), frozenset({INVALID}), ("0 frames",))
            header.ClearField("hidden")
            header.ClearField("lengths")
            tensor = None
            words = ("hidden", "missing")
        if tensor is not None and breakage in ("dtype", "hidden size", "nan", "limit"):
            header.hidden.CopyFrom(codec.wire_tensor(tensor)[0])
        return Case(rpc, breakage, self._stream(rpc, self._serialized(rpc, header, tensor, data), md), expected, words)

    def _backward(self) -> Case:
        md = self._md(self.pending, "real")
        logits_shape = (self.pending_batch, NUM_LABELS)
        grad = torch.randn(logits_shape, generator=torch.Generator().manual_seed(self.rng.randrange(1 << 30)))
        header, grad = self._grad_request(self.pending, grad)
        data = None
        breakage = self.rng.choice(["shape", "nan", "dtype", "unknown dtype", "bytes", "step", "no forward"])
        expected, words = frozenset({INVALID}), ("grad",)
        if breakage == "shape":
            shape = self.rng.choice(
                [
                    (self.pending_batch, NUM_LABELS + 1),
                    (self.pending_batch + 1, NUM_LABELS),
                    (NUM_LABELS,),
                    (1, self.pending_batch, NUM_LABELS),
                ]
            )
            grad = torch.ones(shape)
            words = ("grad_logits", "shape")
        elif breakage == "nan":
            grad.view(-1)[self.rng.randrange(grad.numel())] = self.rng.choice([math.nan, math.inf])
            words = ("grad_logits", "NaN or Inf")
        elif breakage == "dtype":
            grad = grad.to(self.rng.choice([torch.int64, torch.uint8]))
            words = ("grad.dtype", "not allowed")
        elif breakage == "unknown dtype":
            header.grad.dtype = self.rng.choice(["double", "f32", ""])
            words = ("grad.dtype",)
        elif breakage == "bytes":
            data = codec.wire_tensor(grad)[1].numpy().tobytes()[: -self.rng.randint(1, 5)]
            words = ("bytes", "announces")
        elif breakage == "step":
            header.step = self.rng.choice([0, 2, 5, 2**64 - 1])
            expected, words = frozenset({ORDER}), ("pending forward is step 1",)
        else:  # the session without a pending forward
            header.session_id = self.fresh.sid
            md = self._md(self.fresh, "real")
            expected, words = frozenset({ORDER}), ("no forward is pending",)
        if breakage in ("shape", "dtype"):
            header.grad.CopyFrom(codec.wire_tensor(grad)[0])
        frames = self._serialized("Backward", header, grad, data)
        return Case("Backward", breakage, self._stream("Backward", frames, md), expected, words)

    def _good_frames(self, rpc: str, session: Session) -> list[bytes]:
        if rpc == "Backward":
            return self._serialized(rpc, *self._grad_request(session))
        return self._serialized(rpc, *self._request(rpc, session))

    def _bytes(self) -> Case:
        """Random frames, or a good call whose header frame is truncated."""
        rpc = self.rng.choice(["Forward", "Backward", "Evaluate"])
        session = self.rng.choice([self.fresh, self.pending])
        md = self._md(session, "real")
        how = self.rng.randrange(3)
        if how == 0:
            return Case(rpc, "a random frame", self._stream(rpc, [self._random_bytes()], md), frozenset({INVALID}))
        if how == 1:
            frames = [self._random_bytes() for _ in range(self.rng.randint(1, 3))]
            return Case(rpc, "random frames", self._stream(rpc, frames, md), frozenset({INVALID, NOT_FOUND}))
        frames = self._good_frames(rpc, session)
        frames[0] = frames[0][: self.rng.randrange(len(frames[0]))]
        # a cut header may still parse (fewer fields): what it then announces does not fit the data, or it names
        # no session, or (a Backward of the session without a pending forward) finds none pending
        return Case(rpc, "truncated header", self._stream(rpc, frames, md), frozenset({INVALID, NOT_FOUND, ORDER}))

    def _secret(self) -> Case:
        """A well-formed (or garbled) request of a real session with no, a wrong, or a made-up identity."""
        rpc = self.rng.choice(["Forward", "Backward", "Evaluate"])
        session = self.rng.choice([self.fresh, self.pending])
        mode = self.rng.choice(["none", "wrong", "made-up"])
        header, tensor = self._grad_request(session) if rpc == "Backward" else self._request(rpc, session)
        if mode == "made-up":
            header.session_id = self.rng.choice([self.rng.randbytes(16).hex(), "", "../x", session.sid[:-1]])
        frames = self._serialized(rpc, header, tensor)
        md = self._md(session, "none" if mode == "none" else "wrong")
        if mode == "none":
            expected, words = frozenset({UNAUTH}), ("secret",)
        elif mode == "wrong":
            expected, words = frozenset({DENIED}), ("does not match",)
        else:
            expected, words = frozenset({NOT_FOUND}), ("unknown or closed",)
        if mode != "none" and self.rng.random() < 0.4:  # garbled on top: it may no longer parse, or name no session
            frames[0], expected, words = self._garble(frames[0]), expected | {INVALID, NOT_FOUND}, ()
        return Case(rpc, f"{mode} secret", self._stream(rpc, frames, md), expected, words)

    def _closed(self) -> Case:
        """A good request of a closed session, with that session's real secret."""
        rpc = self.rng.choice(["Forward", "Evaluate", "Backward"])
        return Case(
            rpc,
            "closed session",
            self._stream(rpc, self._good_frames(rpc, self.closed), self._md(self.closed, "real")),
            frozenset({NOT_FOUND}),
            ("unknown or closed",),
        )


# --- the test -------------------------------------------------------------------------------------


def _train(service: RemoteTopService, seed: int, steps: int = 3) -> str:
    """A normal short training through the real client; returns the session id."""
    sid = service.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=seed))
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        hidden = torch.randn(4, 6, HIDDEN, generator=g)
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[2, 3:] = 0
        labels = torch.randint(0, NUM_LABELS, (4,), generator=g)
        logits = service.forward(sid, step, hidden, mask).requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
        assert service.backward(sid, step, grad).applied_step == step
    return sid


def _run(case: Case) -> tuple[grpc.StatusCode, str]:
    try:
        case.call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return S.OK, ""


def test_fuzz_every_rpc_then_train_to_the_exact_weights(tiny_llama):
    provider = _provider(tiny_llama)
    credentials = ClientCredentials(api_key=KEY)
    try:
        with (
            running_server(provider, api_keys=ApiKeys.of([KEY])) as address,
            grpc.insecure_channel(address) as channel,
            RemoteTopService(address, credentials=credentials, tries=1) as service,
        ):
            # three sessions to aim at: no step yet, a forward of step 1 pending, closed
            spec = SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=1)
            fresh_id, pending_id, closed_id = (service.open_session(spec) for _ in range(3))
            sessions = [Session(sid, service.session_secret(sid)) for sid in (fresh_id, pending_id, closed_id)]
            hidden = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(9))
            mask = torch.ones(3, 5, dtype=torch.long)
            logits = service.forward(pending_id, 1, hidden, mask)
            service.close_session(closed_id)
            trainers = [provider.sessions.get(sid) for sid in (fresh_id, pending_id)]
            before = [trainer.trainable_state() for trainer in trainers]
            pending = trainers[1].pending_step, trainers[1].pending_output

            fuzzer = Fuzzer(channel, random.Random(6), *sessions, pending_batch=3)
            failures, per_rpc, codes = [], Counter(), Counter()
            for number in range(REQUESTS):
                case = fuzzer.case()
                code, details = _run(case)
                per_rpc[case.rpc] += 1
                codes[code] += 1
                missing = [word for word in case.words if word not in details]
                if code not in case.expected or missing:
                    failures.append(
                        f"#{number} {case.rpc} {case.what}: {code.name} {details!r}, expected "
                        f"{sorted(c.name for c in case.expected)} with {case.words}"
                    )
            assert not failures, f"{len(failures)} of {REQUESTS} wrong:\n" + "\n".join(failures[:20])
            assert codes[S.INTERNAL] == codes[S.UNKNOWN] == codes[S.OK] == 0
            assert set(codes) == {INVALID, NOT_FOUND, UNAUTH, DENIED, ORDER, LIMIT}, codes
            assert min(per_rpc.values()) >= 20 and len(per_rpc) == 8, per_rpc
            print(
                f"\n{REQUESTS} fuzzed requests: {dict(per_rpc)}; statuses { ({c.name: n for c, n in codes.items()}) }"
            )

            # nothing reached the sessions: same weights, no step, the same pending forward
            for trainer, weights in zip(trainers, before):
                assert trainer.steps_applied == 0
                assert all(torch.equal(weights[name], value) for name, value in trainer.trainable_state().items())
            assert trainers[0].pending_step is None and trainers[1].pending_step == pending[0]
            assert trainers[1].pending_output.data_ptr() == pending[1].data_ptr()  # the very forward, kept
            result = service.backward(pending_id, 1, torch.full_like(logits, 0.1))
            assert (result.applied_step, result.replayed) == (1, False)

            # the server still serves: a normal run on it
            trained = provider.sessions.get(_train(service, seed=21)).trainable_state()
    finally:
        provider.close()

    fresh = _provider(tiny_llama)
    try:
        with running_server(fresh) as address, RemoteTopService(address) as service:
            expected = fresh.sessions.get(_train(service, seed=21)).trainable_state()
    finally:
        fresh.close()
    assert trained.keys() == expected.keys()
    for name in expected:
        assert torch.equal(trained[name], expected[name]), name


def test_values_too_large_for_the_top_are_refused_and_change_nothing(tiny_bert, tiny_llama):
    """Finite inputs can still overflow inside the top: the server refuses the step instead of keeping
    a graph (or applying gradients) that would write NaN into the session's weights."""
    huge = torch.full((2, 4, HIDDEN), 3e38)
    huge[:, :, ::2] = -3e38
    mask = torch.ones(2, 4, dtype=torch.long)
    for folder in (tiny_bert, tiny_llama):
        provider = Provider.from_loaded(load_model(str(folder)), split=1, peft=PeftConfig())
        try:
            with running_server(provider) as address, RemoteTopService(address, tries=1) as service:
                sid = service.open_session(SessionSpec(num_labels=2, learning_rate=1e-2))
                trainer = provider.sessions.get(sid)
                before = trainer.trainable_state()
                try:  # the LayerNorm of BERT overflows in the forward; Llama's RMSNorm only in the backward
                    service.forward(sid, 1, huge, mask)
                    with pytest.raises(InvalidInputError, match="non-finite weight gradient"):
                        service.backward(sid, 1, torch.full((2, 2), 1e30))
                except InvalidInputError as exc:
                    assert "values too large" in str(exc)
                assert trainer.steps_applied == 0
                assert all(torch.equal(before[n], v) for n, v in trainer.trainable_state().items())
                # the session goes on normally with sensible inputs
                hidden = torch.randn(2, 4, HIDDEN, generator=torch.Generator().manual_seed(0))
                logits = service.forward(sid, 1, hidden, mask)
                assert service.backward(sid, 1, torch.ones_like(logits)).applied_step == 1
                assert all(torch.isfinite(v).all() for v in trainer.trainable_state().values())
        finally:
            provider.close()
