"""The gRPC servicer: decode a request, call the provider's sessions, encode the reply, map errors."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator

import grpc

from sap_common import codec
from sap_common.errors import (
    InvalidInputError,
    ModelLoadError,
    ResourceLimitError,
    SapError,
    SessionNotFoundError,
    StepOrderError,
)
from sap_common.models.bundle import bundle_files
from sap_common.proto import sap_pb2, sap_pb2_grpc
from sap_server.provider import Provider

log = logging.getLogger(__name__)

# The one place where domain errors become gRPC status codes (most specific first).
STATUS_OF_ERROR: tuple[tuple[type[SapError], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (SessionNotFoundError, grpc.StatusCode.NOT_FOUND),
    (StepOrderError, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (SapError, grpc.StatusCode.INTERNAL),
)


def status_for(error: SapError) -> grpc.StatusCode:
    return next(code for kind, code in STATUS_OF_ERROR if isinstance(error, kind))


def _rpc(method: Callable) -> Callable:
    """Turn SapErrors into a status with their message; anything else into INTERNAL without details."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except SapError as exc:
            context.abort(status_for(exc), str(exc))
        except Exception:  # a bug: log it, reveal nothing of the internals to the caller
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed on the server; see its log")

    return wrapper


def _streaming_rpc(method: Callable) -> Callable:
    """Like _rpc for methods that return a reply message to be sent back as Chunks."""

    @functools.wraps(method)
    def wrapper(self, request_iterator, context):
        reply = _rpc(method)(self, request_iterator, context)
        yield from codec.to_chunks(reply, self.chunk_bytes)

    return wrapper


class SplitLearningServicer(sap_pb2_grpc.SplitLearningServicer):
    def __init__(self, provider: Provider, *, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
                 max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
                 max_request_bytes: int = codec.DEFAULT_MAX_REQUEST_BYTES):
        self.provider = provider
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        self.max_request_bytes = max_request_bytes

    @_rpc
    def GetServerInfo(self, request, context):
        return codec.info_to_proto(self.provider.info, max_message_bytes=self.max_message_bytes,
                                   chunk_bytes=self.chunk_bytes)

    def DownloadBottom(self, request, context) -> Iterator[sap_pb2.FileChunk]:
        folder = self.provider.bundle_dir
        for relative in bundle_files(folder):
            data = (folder / relative).read_bytes()
            for offset in range(0, max(len(data), 1), self.chunk_bytes):
                yield sap_pb2.FileChunk(path=relative, offset=offset, total_size=len(data),
                                        data=data[offset:offset + self.chunk_bytes])

    @_rpc
    def OpenSession(self, request, context):
        if request.adapter_id:
            session_id, trainer = self.provider.attach_adapter(
                request.adapter_id, learning_rate=request.learning_rate or 5e-4, weight_decay=request.weight_decay)
        else:
            session_id, trainer = self.provider.sessions.open(codec.spec_from_proto(request))
        return sap_pb2.OpenSessionReply(session_id=session_id, trainable_parameters=trainer.trainable_parameters,
                                        num_labels=trainer.num_labels, steps_applied=trainer.steps_applied)

    @_rpc
    def CloseSession(self, request, context):
        adapter_id = self.provider.keep_adapter(request.session_id) if request.keep else ""
        return sap_pb2.CloseSessionReply(steps_applied=self.provider.sessions.close(request.session_id),
                                         adapter_id=adapter_id)

    @_streaming_rpc
    def Forward(self, request_iterator, context):
        request = codec.from_chunks(request_iterator, sap_pb2.ForwardRequest, max_bytes=self.max_request_bytes)
        hidden, mask = self._decode_inputs(request)
        trainer = self.provider.sessions.get(request.session_id)
        with trainer.lock:
            logits = trainer.forward(request.step, hidden, mask)
        return sap_pb2.ForwardReply(step=request.step, logits=codec.encode_tensor(logits))

    @_streaming_rpc
    def Backward(self, request_iterator, context):
        request = codec.from_chunks(request_iterator, sap_pb2.BackwardRequest, max_bytes=self.max_request_bytes)
        grad = codec.decode_tensor(request.grad_logits, field="grad_logits", allowed=_FLOATS)
        trainer = self.provider.sessions.get(request.session_id)
        with trainer.lock:
            result = trainer.backward(request.step, grad)
        reply = sap_pb2.BackwardReply(applied_step=result.applied_step, replayed=result.replayed)
        if result.grad_hidden is not None:
            reply.grad_hidden.CopyFrom(codec.encode_tensor(result.grad_hidden))
        return reply

    @_streaming_rpc
    def Evaluate(self, request_iterator, context):
        request = codec.from_chunks(request_iterator, sap_pb2.EvaluateRequest, max_bytes=self.max_request_bytes)
        hidden, mask = self._decode_inputs(request)
        trainer = self.provider.sessions.get(request.session_id)
        with trainer.lock:
            logits = trainer.evaluate(hidden, mask)
        return sap_pb2.ForwardReply(step=0, logits=codec.encode_tensor(logits))

    def _decode_inputs(self, request: sap_pb2.ForwardRequest | sap_pb2.EvaluateRequest):
        """(B, T, H) hidden states and (B, T) mask from the packed form when set, else the padded one."""
        if request.HasField("packed_hidden"):
            packed = codec.decode_tensor(request.packed_hidden, field="packed_hidden", allowed=_FLOATS)
            return codec.unpack_hidden(packed, request.lengths, max_bytes=self.max_request_bytes)
        hidden = codec.decode_tensor(request.hidden_states, field="hidden_states", allowed=_FLOATS)
        mask = codec.decode_tensor(request.attention_mask, field="attention_mask",
                                   allowed=("int64", "int32", "bool", "uint8"))
        return hidden, mask


_FLOATS = ("float32", "float16", "bfloat16")
