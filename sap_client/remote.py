"""RemoteTopService: the TopService interface over gRPC (the only client module that touches the wire)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import grpc
import torch

from sap_common import codec
from sap_common.errors import (
    InvalidInputError,
    RemoteError,
    ResourceLimitError,
    SapError,
    ServerUnavailableError,
    SessionNotFoundError,
    StepOrderError,
)
from sap_common.proto import sap_pb2, sap_pb2_grpc
from sap_common.service import BackwardResult, ServerInfo, SessionSpec

ERROR_OF_STATUS: dict[grpc.StatusCode, type[SapError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: SessionNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: StepOrderError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceLimitError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
}


class RemoteTopService:
    """Talks to one sap-server over one channel; counts the bytes it sends and receives."""

    def __init__(self, address: str, *, connect_timeout: float = 10.0, call_timeout: float = 600.0,
                 chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
                 max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
                 wire_dtype: torch.dtype = torch.float32):
        if wire_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"wire_dtype={wire_dtype}: expected torch.float32, torch.bfloat16 or torch.float16")
        self.address = address
        self.wire_dtype = wire_dtype  # hidden states are cast to it for the wire (float32: lossless)
        self.call_timeout = call_timeout
        self.chunk_bytes = chunk_bytes
        self.bytes_sent = 0
        self.bytes_received = 0
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(address, options=options)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise ServerUnavailableError(f"cannot reach sap-server at {address} within {connect_timeout:g} s "
                                         f"(is it running? check --server HOST:PORT)") from None
        self._stub = sap_pb2_grpc.SplitLearningStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteTopService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- TopService -------------------------------------------------------------------------

    def server_info(self) -> ServerInfo:
        return codec.info_from_proto(self._call(self._stub.GetServerInfo, sap_pb2.ServerInfoRequest()))

    def download_bottom(self, destination: Path) -> None:
        handles: dict[str, object] = {}
        try:
            for chunk in self._call(self._stub.DownloadBottom, sap_pb2.DownloadBottomRequest()):
                self.bytes_received += chunk.ByteSize()
                handle = handles.get(chunk.path)
                if handle is None:
                    handle = handles[chunk.path] = _safe_target(destination, chunk.path).open("wb")
                handle.seek(chunk.offset)
                handle.write(chunk.data)
        except grpc.RpcError as exc:
            raise _as_sap_error(exc, self.address) from None
        finally:
            for handle in handles.values():
                handle.close()

    def open_session(self, spec: SessionSpec) -> str:
        return self._call(self._stub.OpenSession, codec.spec_to_proto(spec)).session_id

    def forward(self, session_id: str, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        request = sap_pb2.ForwardRequest(session_id=session_id, step=step)
        self._put_inputs(request, hidden, attention_mask)
        reply = self._chunked(self._stub.Forward, request, sap_pb2.ForwardReply)
        return codec.decode_tensor(reply.logits, field="logits")

    def backward(self, session_id: str, step: int, grad_logits: torch.Tensor) -> BackwardResult:
        request = sap_pb2.BackwardRequest(session_id=session_id, step=step,
                                          grad_logits=codec.encode_tensor(grad_logits))
        reply = self._chunked(self._stub.Backward, request, sap_pb2.BackwardReply)
        grad_hidden = (codec.decode_tensor(reply.grad_hidden, field="grad_hidden")
                       if reply.HasField("grad_hidden") else None)
        return BackwardResult(reply.applied_step, reply.replayed, grad_hidden)

    def evaluate(self, session_id: str, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        request = sap_pb2.EvaluateRequest(session_id=session_id)
        self._put_inputs(request, hidden, attention_mask)
        reply = self._chunked(self._stub.Evaluate, request, sap_pb2.ForwardReply)
        return codec.decode_tensor(reply.logits, field="logits")

    def close_session(self, session_id: str) -> int:
        return self._call(self._stub.CloseSession, sap_pb2.CloseSessionRequest(session_id=session_id)).steps_applied

    def finish_session(self, session_id: str) -> str:
        request = sap_pb2.CloseSessionRequest(session_id=session_id, keep=True)
        return self._call(self._stub.CloseSession, request).adapter_id

    def attach_adapter(self, adapter_id: str) -> tuple[str, int]:
        reply = self._call(self._stub.OpenSession, sap_pb2.OpenSessionRequest(adapter_id=adapter_id))
        return reply.session_id, reply.num_labels

    # --- plumbing ---------------------------------------------------------------------------

    def _put_inputs(self, request, hidden: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Packed real tokens in the wire dtype; the padded form only for a mask that is not right-padded."""
        if codec.is_right_padded(attention_mask):
            packed, lengths = codec.pack_hidden(hidden, attention_mask)
            request.packed_hidden.CopyFrom(codec.encode_tensor(packed, wire_dtype=self.wire_dtype))
            request.lengths.extend(lengths)
        else:
            request.hidden_states.CopyFrom(codec.encode_tensor(hidden, wire_dtype=self.wire_dtype))
            request.attention_mask.CopyFrom(codec.encode_tensor(attention_mask))

    def _call(self, method, request):
        self.bytes_sent += request.ByteSize()
        try:
            reply = method(request, timeout=self.call_timeout)
        except grpc.RpcError as exc:
            raise _as_sap_error(exc, self.address) from None
        if hasattr(reply, "ByteSize"):
            self.bytes_received += reply.ByteSize()
        return reply

    def _chunked(self, method, request, reply_type):
        chunks = list(codec.to_chunks(request, self.chunk_bytes))
        self.bytes_sent += sum(len(c.data) for c in chunks)
        try:
            replies = list(method(iter(chunks), timeout=self.call_timeout))
        except grpc.RpcError as exc:
            raise _as_sap_error(exc, self.address) from None
        self.bytes_received += sum(len(c.data) for c in replies)
        return codec.from_chunks(replies, reply_type)


def _as_sap_error(exc: grpc.RpcError, address: str) -> SapError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(f"sap-server at {address} is unavailable: {details}")
    return ERROR_OF_STATUS.get(code, RemoteError)(f"server answered {code.name if code else '?'}: {details}")


def _safe_target(destination: Path, relative: str) -> Path:
    """Refuse absolute paths and '..' so a malicious server cannot write outside destination."""
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or any(part in ("..", "") for part in parts) or "\\" in relative:
        raise InvalidInputError(f"bottom bundle file path {relative!r} is not a safe relative path")
    target = destination.joinpath(*parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target
