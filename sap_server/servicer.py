"""The gRPC servicer: authenticate, decode a request, call the provider's sessions, encode the reply, map errors."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator

import grpc

from sap_common import codec
from sap_common.errors import (
    AuthenticationError,
    IdleTimeoutError,
    InvalidInputError,
    ModelLoadError,
    PermissionDeniedError,
    ResourceLimitError,
    SapError,
    SessionNotFoundError,
    StepOrderError,
)
from sap_common.models.bundle import bundle_files
from sap_common.models.families import KVCache
from sap_common.proto import sap_pb2, sap_pb2_grpc
from sap_common.service import (
    API_KEY_METADATA,
    DEFAULT_LEARNING_RATE,
    SESSION_ID_METADATA,
    SESSION_SECRET_METADATA,
)
from sap_server.auth import ApiKeys, require_secret
from sap_server.compute import ComputeThread, compute_thread
from sap_server.generation import Generations
from sap_server.metrics import ServerMetrics
from sap_server.provider import Provider

log = logging.getLogger(__name__)

# The one place where domain errors become gRPC status codes (most specific first).
STATUS_OF_ERROR: tuple[tuple[type[SapError], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (SessionNotFoundError, grpc.StatusCode.NOT_FOUND),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (StepOrderError, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IdleTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (SapError, grpc.StatusCode.INTERNAL),
)


def status_for(error: SapError) -> grpc.StatusCode:
    return next(code for kind, code in STATUS_OF_ERROR if isinstance(error, kind))


def _abort(context, name: str, exc: Exception) -> None:
    """SapErrors become their status with their message; anything else INTERNAL without details."""
    if isinstance(exc, SapError):
        context.abort(status_for(exc), str(exc))
    log.error("%s failed", name, exc_info=exc)  # a bug: log it, reveal nothing of the internals to the caller
    context.abort(grpc.StatusCode.INTERNAL, f"{name} failed on the server; see its log")


def _rpc(method: Callable) -> Callable:
    """Run a unary-reply method; a request that did not parse is INVALID_ARGUMENT, errors become statuses."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            if isinstance(request, codec.Undecodable):
                raise request.error()
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status, see _abort
            _abort(context, method.__name__, exc)

    return wrapper


def _frames_rpc(method: Callable) -> Callable:
    """Like _rpc for the hot calls: the method reads the request's frames and returns the reply's frames."""

    @functools.wraps(method)
    def wrapper(self, request_iterator, context):
        replies = _rpc(method)(self, self._counted(request_iterator), context)
        if self.metrics is not None:
            self.metrics.sent(sum(frame.ByteSize() for frame in replies))
        yield from replies

    return wrapper


def _reply_stream(method: Callable) -> Callable:
    """Like _rpc for generator methods (a stream of replies)."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            if isinstance(request, codec.Undecodable):
                raise request.error()
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status, see _abort
            _abort(context, method.__name__, exc)

    return wrapper


def _metadata(context, key: str) -> str | None:
    """The value of a text metadata key the caller sent (the first one), or None."""
    return _first(context.invocation_metadata() or (), key)


def _session_secret(context, session_id: str) -> str | None:
    """The session secret a call carries, after checking that a routed call (sap-session-id metadata, which a router
    reads) names the session its body names."""
    routed = _metadata(context, SESSION_ID_METADATA)
    if routed is not None and routed != session_id:
        raise InvalidInputError(
            f"metadata {SESSION_ID_METADATA} names session {routed[:8]!r}…, the request session {session_id[:8]!r}…"
        )
    return _metadata(context, SESSION_SECRET_METADATA)


def _first(metadata, key: str) -> str | None:
    """The first text value of key in (name, value) pairs, or None."""
    return next((value for name, value in metadata if name == key and isinstance(value, str)), None)


class SplitLearningServicer(sap_pb2_grpc.SplitLearningServicer):
    """Decode, call the provider's sessions, encode. Credentials are checked before a method runs, by AuthInterceptor
    (the API key; that a session call carries a secret); the session's registry then matches the secret to the
    session when it looks it up: unknown or closed session: NOT_FOUND; a wrong secret: PERMISSION_DENIED. What a
    request carries is validated by the session (Session._inputs, Session.backward) before it changes anything: a
    refused call changes nothing."""

    def __init__(
        self,
        provider: Provider,
        *,
        chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
        max_request_bytes: int = codec.DEFAULT_MAX_REQUEST_BYTES,
        compute: ComputeThread | None = None,
        generations: Generations | None = None,
        metrics: ServerMetrics | None = None,
    ):
        self.provider = provider
        self.metrics = metrics
        self.generations = generations or Generations()
        # Tensor work (decoding, the sessions' steps, checkpoints, encoding) runs on the process's compute
        # thread, not on the gRPC workers (why: sap_server/compute.py); the workers read the request
        # streams, check API keys and send the replies, so a slow upload does not hold up other sessions.
        self.compute = compute or compute_thread()
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        self.max_request_bytes = max_request_bytes

    def _counted(self, messages: Iterable) -> Iterator:
        """The request's messages, their bytes counted as received (sap_server/metrics.py)."""
        for message in messages:
            if self.metrics is not None:
                self.metrics.received(message.size if isinstance(message, codec.Undecodable) else message.ByteSize())
            yield message

    @_rpc
    def GetServerInfo(self, request, context):
        return codec.info_to_proto(
            self.provider.info, max_message_bytes=self.max_message_bytes, chunk_bytes=self.chunk_bytes
        )

    @_reply_stream
    def DownloadBottom(self, request, context) -> Iterator[sap_pb2.FileChunk]:
        if request.tail_blocks or request.lm_head:  # reads the model's weights: on the compute thread
            folder = self.compute.run(self.provider.tail_bundle, request.tail_blocks, request.lm_head)
        else:
            folder = self.provider.bundle_dir
        for relative in bundle_files(folder):
            data = (folder / relative).read_bytes()
            for offset in range(0, max(len(data), 1), self.chunk_bytes):
                chunk = sap_pb2.FileChunk(
                    path=relative, offset=offset, total_size=len(data), data=data[offset : offset + self.chunk_bytes]
                )
                if self.metrics is not None:
                    self.metrics.sent(chunk.ByteSize())
                yield chunk

    @_rpc
    def OpenSession(self, request, context):
        return self.compute.run(self._open_session, request)

    def _open_session(self, request) -> sap_pb2.OpenSessionReply:
        if request.adapter_id:
            if request.output != sap_pb2.OUTPUT_LOGITS:
                raise InvalidInputError("OpenSessionRequest: output comes from the stored adapter; leave it unset")
            session_id, trainer, secret = self.provider.attach_adapter(
                request.adapter_id,
                learning_rate=request.learning_rate or DEFAULT_LEARNING_RATE,
                weight_decay=request.weight_decay,
            )
        else:
            session_id, trainer, secret = self.provider.sessions.open(codec.spec_from_proto(request))
        return sap_pb2.OpenSessionReply(
            session_id=session_id,
            trainable_parameters=trainer.trainable_parameters,
            num_labels=trainer.num_labels,
            steps_applied=trainer.steps_applied,
            session_secret=secret,
        )

    @_rpc
    def CloseSession(self, request, context):
        sessions, secret = self.provider.sessions, _session_secret(context, request.session_id)
        closed = sessions.closed(request.session_id, secret)
        if closed is None:
            closed = self.compute.run(self.provider.close_session, request.session_id, secret, keep=request.keep)
        elif request.keep and not closed.adapter_id:  # a retried close (its owner's secret)
            raise SessionNotFoundError(f"session {request.session_id[:8]!r}… was closed without keeping its adapter")
        # a retried close gets the first close's reply again
        return sap_pb2.CloseSessionReply(steps_applied=closed.steps_applied, adapter_id=closed.adapter_id)

    @_rpc
    def ResumeSession(self, request, context):
        secret = _session_secret(context, request.session_id)
        trainer = self.compute.run(self.provider.sessions.resume, request.session_id, secret, request.step)
        return sap_pb2.ResumeSessionReply(steps_applied=request.step, num_labels=trainer.num_labels)

    @_frames_rpc
    def Forward(self, frames, context):
        header, tensors = codec.from_frames(frames, sap_pb2.ForwardFrame, ("hidden",), max_bytes=self.max_request_bytes)
        secret = _session_secret(context, header.session_id)
        return self.compute.run(self._forward, header, tensors.get("hidden"), secret, True)

    @_frames_rpc
    def Evaluate(self, frames, context):
        header, tensors = codec.from_frames(frames, sap_pb2.ForwardFrame, ("hidden",), max_bytes=self.max_request_bytes)
        secret = _session_secret(context, header.session_id)
        return self.compute.run(self._forward, header, tensors.get("hidden"), secret, False)

    @_rpc
    def EvaluateSmall(self, request: sap_pb2.ForwardFrames, context) -> sap_pb2.ForwardReplyFrames:
        if self.metrics is not None:
            self.metrics.received(request.ByteSize())
        if len(request.frames) > 2:
            raise InvalidInputError(
                f"EvaluateSmall takes a header and at most one data frame, got {len(request.frames)} frames: "
                f"send a larger batch with Evaluate"
            )
        header, tensors = codec.from_frames(
            request.frames, sap_pb2.ForwardFrame, ("hidden",), max_bytes=self.max_request_bytes
        )
        secret = _session_secret(context, header.session_id)
        reply = sap_pb2.ForwardReplyFrames(
            frames=self.compute.run(self._forward, header, tensors.get("hidden"), secret, False)
        )
        if reply.ByteSize() > self.max_message_bytes:  # e.g. packed float32 hidden states of a large batch
            raise ResourceLimitError(
                f"the reply of this EvaluateSmall is {reply.ByteSize()} bytes, over the message cap "
                f"{self.max_message_bytes}: send the batch with Evaluate"
            )
        if self.metrics is not None:
            self.metrics.sent(reply.ByteSize())
        return reply

    def _forward(self, header: sap_pb2.ForwardHeader, packed, secret: str, train: bool) -> list:
        with self.provider.sessions.use(header.session_id, secret) as trainer:
            if packed is None:
                raise InvalidInputError("ForwardHeader.hidden is missing: the packed real token vectors (N_real, H)")
            output, lengths = codec.output_name(header.output), header.lengths
            if train:
                result = trainer.forward(header.step, packed, lengths, output)
            else:
                result = trainer.evaluate(packed, lengths, output)
        tensor, raw = codec.wire_tensor(result)
        reply = sap_pb2.ForwardReplyHeader(step=header.step if train else 0, output=header.output, tensor=tensor)
        return codec.to_frames(sap_pb2.ForwardReplyFrame, reply, [raw], self.chunk_bytes)

    @_frames_rpc
    def Backward(self, frames, context):
        header, tensors = codec.from_frames(frames, sap_pb2.BackwardFrame, ("grad",), max_bytes=self.max_request_bytes)
        secret = _session_secret(context, header.session_id)
        return self.compute.run(self._backward, header, tensors.get("grad"), secret)

    def _backward(self, header: sap_pb2.BackwardHeader, grad, secret: str) -> list:
        with self.provider.sessions.use(header.session_id, secret) as trainer:
            if grad is None:
                raise InvalidInputError("BackwardHeader.grad is missing: dL/d(what Forward returned)")
            result = self.provider.sessions.backward(trainer, header.step, grad)  # checkpointed before this reply
        if self.metrics is not None and not result.replayed:
            self.metrics.step()
        reply = sap_pb2.BackwardReplyHeader(
            applied_step=result.applied_step, replayed=result.replayed, checkpointed=result.checkpointed
        )
        raws = []
        if result.grad_hidden is not None:
            tensor, raw = codec.wire_tensor(result.grad_hidden)
            reply.grad_hidden.CopyFrom(tensor)
            raws.append(raw)
        return codec.to_frames(sap_pb2.BackwardReplyFrame, reply, raws, self.chunk_bytes)

    @_reply_stream
    def Generate(self, frames, context) -> Iterator[sap_pb2.GenerateReplyFrame]:
        """One sequence, piece by piece, with this call's own key/value cache (see sap.proto)."""
        secret = None
        with self.generations.slot():
            cache, session_id = KVCache(), ""
            pieces = codec.read_messages(
                self._counted(self.generations.watched(frames)),
                sap_pb2.GenerateFrame,
                ("hidden",),
                max_bytes=self.max_request_bytes,
            )
            for header, tensors in pieces:
                if not session_id:
                    if not header.session_id:
                        raise InvalidInputError("GenerateHeader.session_id is missing from the first piece")
                    session_id = header.session_id
                    secret = _session_secret(context, session_id)
                elif header.session_id not in ("", session_id):
                    raise InvalidInputError("GenerateHeader.session_id changed within one generation")
                if "hidden" not in tensors:
                    raise InvalidInputError("GenerateHeader.hidden is missing: the next positions' vectors (n, H)")
                position = cache.length
                result = self.compute.run(self._generate, session_id, secret, cache, tensors["hidden"])
                tensor, raw = codec.wire_tensor(result)
                reply = sap_pb2.GenerateReplyHeader(position=position, tensor=tensor)
                for frame in codec.to_frames(sap_pb2.GenerateReplyFrame, reply, [raw], self.chunk_bytes):
                    if self.metrics is not None:
                        self.metrics.sent(frame.ByteSize())
                    yield frame

    def _generate(self, session_id: str, secret: str | None, cache: KVCache, packed):
        with self.provider.sessions.use(session_id, secret) as session:
            return session.generate(cache, packed)


# Which calls need what (sap_common/service.py names the metadata keys).
KEYED_METHODS = frozenset({"GetServerInfo", "DownloadBottom", "OpenSession"})  # with --api-keys
SESSION_METHODS = frozenset(
    {"Forward", "Backward", "Evaluate", "EvaluateSmall", "CloseSession", "ResumeSession", "Generate"}
)  # the secret


class AuthInterceptor(grpc.ServerInterceptor):
    """Each call's credentials, checked once, before its handler runs and before a request stream is read: the API
    key on the calls that need one (when the server has keys), the presence of a session secret on a session's
    calls. Missing or unknown: UNAUTHENTICATED."""

    def __init__(self, api_keys: ApiKeys | None):
        self.api_keys = api_keys

    def intercept_service(self, continuation, handler_call_details):
        name = handler_call_details.method.rsplit("/", 1)[-1]
        metadata = handler_call_details.invocation_metadata or ()
        try:
            if name in KEYED_METHODS and self.api_keys is not None:
                self.api_keys.check(_first(metadata, API_KEY_METADATA))
            elif name in SESSION_METHODS:
                require_secret(_first(metadata, SESSION_SECRET_METADATA))
        except AuthenticationError as exc:
            return _refusal(continuation(handler_call_details), str(exc))
        return continuation(handler_call_details)


def _refusal(handler, details: str):
    """A handler of the same kind as handler that answers UNAUTHENTICATED without reading the request."""

    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    def refuse_stream(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, details)
        yield  # a generator, as a streaming reply must be

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse_stream if handler.response_streaming else refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def add_to_server(servicer: SplitLearningServicer, server: grpc.Server) -> None:
    """Register the servicer like the generated add_SplitLearningServicer_to_server, but with request parsers
    that never raise: bytes that are not the expected message reach the servicer as codec.Undecodable and
    get INVALID_ARGUMENT (a raising parser would make gRPC answer INTERNAL)."""
    pb = sap_pb2
    handlers = {
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo,
            request_deserializer=codec.lenient_parser(pb.ServerInfoRequest),
            response_serializer=pb.ServerInfo.SerializeToString,
        ),
        "DownloadBottom": grpc.unary_stream_rpc_method_handler(
            servicer.DownloadBottom,
            request_deserializer=codec.lenient_parser(pb.DownloadBottomRequest),
            response_serializer=pb.FileChunk.SerializeToString,
        ),
        "OpenSession": grpc.unary_unary_rpc_method_handler(
            servicer.OpenSession,
            request_deserializer=codec.lenient_parser(pb.OpenSessionRequest),
            response_serializer=pb.OpenSessionReply.SerializeToString,
        ),
        "CloseSession": grpc.unary_unary_rpc_method_handler(
            servicer.CloseSession,
            request_deserializer=codec.lenient_parser(pb.CloseSessionRequest),
            response_serializer=pb.CloseSessionReply.SerializeToString,
        ),
        "EvaluateSmall": grpc.unary_unary_rpc_method_handler(
            servicer.EvaluateSmall,
            request_deserializer=codec.lenient_parser(pb.ForwardFrames),
            response_serializer=pb.ForwardReplyFrames.SerializeToString,
        ),
        "ResumeSession": grpc.unary_unary_rpc_method_handler(
            servicer.ResumeSession,
            request_deserializer=codec.lenient_parser(pb.ResumeSessionRequest),
            response_serializer=pb.ResumeSessionReply.SerializeToString,
        ),
    }
    for name, request, reply in (
        ("Forward", pb.ForwardFrame, pb.ForwardReplyFrame),
        ("Evaluate", pb.ForwardFrame, pb.ForwardReplyFrame),
        ("Backward", pb.BackwardFrame, pb.BackwardReplyFrame),
        ("Generate", pb.GenerateFrame, pb.GenerateReplyFrame),
    ):
        handlers[name] = grpc.stream_stream_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=codec.lenient_parser(request),
            response_serializer=reply.SerializeToString,
        )
    service = pb.DESCRIPTOR.services_by_name["SplitLearning"]
    missing = {m.name for m in service.methods} - handlers.keys()
    if missing:  # a new RPC in sap.proto must be registered here too
        raise RuntimeError(f"add_to_server: no handler for {sorted(missing)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
