"""RemoteTopService: the TopService interface over gRPC (the only client module that touches the wire)."""

from __future__ import annotations

import logging
import queue
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

import grpc
import torch

from sap_common import PROTOCOL_VERSION, codec
from sap_common.errors import (
    AuthenticationError,
    InvalidInputError,
    PermissionDeniedError,
    ProtocolError,
    RemoteError,
    ResourceLimitError,
    SapError,
    ServerUnavailableError,
    SessionNotFoundError,
    StepOrderError,
)
from sap_common.proto import sap_pb2, sap_pb2_grpc
from sap_common.service import (
    API_KEY_METADATA,
    API_KEY_SCHEME,
    SESSION_ID_METADATA,
    SESSION_SECRET_METADATA,
    BackwardResult,
    ServerInfo,
    SessionSpec,
    read_credentials_file,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

ERROR_OF_STATUS: dict[grpc.StatusCode, type[SapError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: SessionNotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: StepOrderError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceLimitError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.UNIMPLEMENTED: ProtocolError,  # no such method: the server speaks another package version
}

# Tried again: the server may not have seen the call (UNAVAILABLE) or its answer was lost (DEADLINE_EXCEEDED).
# Both are safe for every RPC: Forward and Backward carry step numbers (a repeated Forward of the pending step
# recomputes it, a repeated Backward of the applied step is answered from its record), a repeated CloseSession
# gets the first close's reply, a repeated ResumeSession finds the session at the step the first one brought it
# to (and accepts), and Evaluate, GetServerInfo and DownloadBottom change nothing. A repeated
# OpenSession whose first try did reach the server leaves that first session unused (it counts against
# --max-sessions until the server forgets it).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class ClientCredentials:
    """How this client reaches a guarded provider: an API key and/or TLS (mutual TLS with a cert and key)."""

    api_key: str | None = None
    tls_ca: Path | None = None  # the CA that signed the server's certificate; setting it turns TLS on
    tls_cert: Path | None = None  # mutual TLS: this client's certificate chain (turns TLS on too)
    tls_key: Path | None = None  # ... and its private key

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a client certificate (--tls-cert) and its key (--tls-key) go together")

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials from the PEM files (InvalidInputError naming a file that cannot be read)."""
        return grpc.ssl_channel_credentials(
            root_certificates=read_credentials_file(self.tls_ca, "TLS CA (--tls-ca)") if self.tls_ca else None,
            private_key=read_credentials_file(self.tls_key, "TLS key (--tls-key)") if self.tls_key else None,
            certificate_chain=(
                read_credentials_file(self.tls_cert, "TLS certificate (--tls-cert)") if self.tls_cert else None
            ),
        )


class RemoteTopService:
    """Talks to one sap-server over one channel; counts the bytes it sends and receives.

    It keeps each session's secret (from OpenSession) and attaches it to the session's calls, and the API key
    to every call. Each try of a call has its own deadline (call_timeout); UNAVAILABLE and DEADLINE_EXCEEDED
    are tried again up to `tries` times in all, after retry_backoff seconds doubling up to retry_backoff_max,
    each pause scaled by a random factor in [0.5, 1] so that many clients do not retry in lockstep.
    """

    def __init__(
        self,
        address: str,
        *,
        credentials: ClientCredentials | None = None,
        connect_timeout: float = 10.0,
        call_timeout: float = 600.0,
        tries: int = 5,
        retry_backoff: float = 0.5,
        retry_backoff_max: float = 8.0,
        chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
        wire_dtype: torch.dtype = torch.float32,
    ):
        if wire_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"wire_dtype={wire_dtype}: expected torch.float32, torch.bfloat16 or torch.float16")
        if tries < 1:
            raise ValueError(f"tries must be >= 1, got {tries}")
        if not (call_timeout > 0 and retry_backoff >= 0 and retry_backoff_max >= retry_backoff):
            raise ValueError("call_timeout must be > 0 and 0 <= retry_backoff <= retry_backoff_max")
        self.address = address
        self.credentials = credentials or ClientCredentials()
        self.wire_dtype = wire_dtype  # hidden states are cast to it for the wire (float32: lossless)
        self.call_timeout = call_timeout
        self.tries = tries
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.chunk_bytes = chunk_bytes
        self.bytes_sent = 0
        self.bytes_received = 0
        self._secrets: dict[str, str] = {}  # session id -> the secret its calls carry
        self._random = random.Random()  # jitter only
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # after a lost connection, try to reconnect soon (gRPC's default waits 1 s, then longer)
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 4000),
        ]
        if self.credentials.tls:
            self._channel = grpc.secure_channel(address, self.credentials.channel_credentials(), options=options)
        else:
            if self.credentials.api_key and not _is_loopback(address):
                log.warning("sending the API key to %s without TLS (--tls-ca): anyone on the path can read it", address)
            self._channel = grpc.insecure_channel(address, options=options)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            hint = (
                "check --tls-ca (the CA of the server's certificate) and, when the server requires client "
                "certificates, --tls-cert/--tls-key"
                if self.credentials.tls
                else "if the server uses TLS, pass --tls-ca"
            )
            raise ServerUnavailableError(
                f"cannot reach sap-server at {address} within {connect_timeout:g} s "
                f"(is it running? check --server HOST:PORT; {hint})"
            ) from None
        self._stub = sap_pb2_grpc.SplitLearningStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteTopService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- TopService -------------------------------------------------------------------------

    def server_info(self) -> ServerInfo:
        """What the server serves; ProtocolError when it speaks another version of the wire contract."""
        try:
            info = codec.info_from_proto(self._call(self._stub.GetServerInfo, sap_pb2.ServerInfoRequest()))
        except ProtocolError as exc:  # no /sap.v2.SplitLearning/GetServerInfo
            raise ProtocolError(
                f"sap-server at {self.address} does not speak SAP wire protocol {PROTOCOL_VERSION} "
                f"(sap.v{PROTOCOL_VERSION}): it is an older or newer sap-server; use a client and server "
                f"of the same release"
            ) from exc
        if info.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"sap-server at {self.address} speaks SAP wire protocol {info.protocol_version}, this client "
                f"{PROTOCOL_VERSION}: use a client and server of the same release"
            )
        return info

    def download_bottom(self, destination: Path, tail_blocks: int = 0, lm_head: bool = False) -> None:
        def attempt() -> None:  # a retry starts the download over: every file is rewritten from offset 0
            handles: dict[str, BinaryIO] = {}
            try:
                for chunk in self._stub.DownloadBottom(
                    sap_pb2.DownloadBottomRequest(tail_blocks=tail_blocks, lm_head=lm_head),
                    timeout=self.call_timeout,
                    metadata=self._metadata(),
                ):
                    self.bytes_received += chunk.ByteSize()
                    handle = handles.get(chunk.path)
                    if handle is None:
                        handle = handles[chunk.path] = _safe_target(destination, chunk.path).open("wb")
                    handle.seek(chunk.offset)
                    handle.write(chunk.data)
            finally:
                for handle in handles.values():
                    handle.close()

        self._retrying("DownloadBottom", attempt)

    def open_session(self, spec: SessionSpec) -> str:
        return self._opened(self._call(self._stub.OpenSession, codec.spec_to_proto(spec)))[0]

    def forward(
        self, session_id: str, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor, *, output: str = "logits"
    ) -> torch.Tensor:
        return self._forward(session_id, step, hidden, attention_mask, output)

    def backward(self, session_id: str, step: int, grad_logits: torch.Tensor) -> BackwardResult:
        tensor, raw = codec.wire_tensor(grad_logits)
        header = sap_pb2.BackwardHeader(session_id=session_id, step=step, grad=tensor)
        frames = codec.to_frames(sap_pb2.BackwardFrame, header, [raw], self.chunk_bytes)
        reply, tensors = self._streamed(
            self._stub.Backward, frames, sap_pb2.BackwardReplyFrame, ("grad_hidden",), session_id
        )
        return BackwardResult(reply.applied_step, reply.replayed, tensors.get("grad_hidden"), reply.checkpointed)

    def evaluate(
        self, session_id: str, hidden: torch.Tensor, attention_mask: torch.Tensor, *, output: str = "logits"
    ) -> torch.Tensor:
        return self._forward(session_id, None, hidden, attention_mask, output)

    def generation(self, session_id: str) -> RemoteGeneration:
        """A Generate call (sap.proto): one sequence, piece by piece, over one stream. Not retried: a lost stream
        loses the provider's cache, and the caller starts the sequence again."""
        return RemoteGeneration(self, session_id)

    def close_session(self, session_id: str) -> int:
        request = sap_pb2.CloseSessionRequest(session_id=session_id)
        steps = self._call(self._stub.CloseSession, request, session_id).steps_applied
        self._secrets.pop(session_id, None)
        return steps

    def finish_session(self, session_id: str) -> str:
        request = sap_pb2.CloseSessionRequest(session_id=session_id, keep=True)
        adapter_id = self._call(self._stub.CloseSession, request, session_id).adapter_id
        self._secrets.pop(session_id, None)
        return adapter_id

    def resume_session(self, session_id: str, step: int) -> int:
        request = sap_pb2.ResumeSessionRequest(session_id=session_id, step=step)
        return self._call(self._stub.ResumeSession, request, session_id).steps_applied

    def attach_adapter(self, adapter_id: str) -> tuple[str, int]:
        return self._opened(self._call(self._stub.OpenSession, sap_pb2.OpenSessionRequest(adapter_id=adapter_id)))

    def session_secret(self, session_id: str) -> str | None:
        return self._secrets.get(session_id)

    def use_session(self, session_id: str, secret: str | None) -> None:
        if not secret:
            raise ValueError("use_session needs the session's secret")
        self._secrets[session_id] = secret

    # --- plumbing ---------------------------------------------------------------------------

    def _opened(self, reply: sap_pb2.OpenSessionReply) -> tuple[str, int]:
        """Keep the new session's secret; (session id, num_labels)."""
        if not reply.session_secret:
            raise RemoteError(
                "the server opened a session without a session secret: it is older than this "
                "client (protocol without session secrets); upgrade sap-server"
            )
        self._secrets[reply.session_id] = reply.session_secret
        return reply.session_id, reply.num_labels

    def _metadata(self, session_id: str | None = None) -> list[tuple[str, str]]:
        """The API key (when set) on every call; the session's secret on the session's calls."""
        metadata = []
        if self.credentials.api_key:
            metadata.append((API_KEY_METADATA, f"{API_KEY_SCHEME} {self.credentials.api_key}"))
        if session_id is not None and session_id in self._secrets:
            metadata.append((SESSION_SECRET_METADATA, self._secrets[session_id]))
            metadata.append((SESSION_ID_METADATA, session_id))  # a router routes the call by it (sap_cluster)
        return metadata

    def _forward(
        self, session_id: str, step: int | None, hidden: torch.Tensor, attention_mask: torch.Tensor, output: str
    ):
        """Forward of a training step, or Evaluate (step None): the real tokens packed (N_real, H) in the wire
        dtype; the logits (B, C), the pooled representation (B, H) or packed hidden states (N_real, H). An Evaluate
        whose tensor fits one frame goes as one unary EvaluateSmall call (a stream costs it about a millisecond)."""
        if not codec.is_right_padded(attention_mask):
            raise InvalidInputError(
                "the wire carries right-padded batches only (every row: real tokens, then padding, at least one "
                "real token); tokenize with padding_side='right'"
            )
        packed, lengths = codec.pack_hidden(hidden, attention_mask)
        tensor, raw = codec.wire_tensor(packed, wire_dtype=self.wire_dtype)
        header = sap_pb2.ForwardHeader(
            session_id=session_id, step=step or 0, hidden=tensor, lengths=lengths, output=codec.OUTPUT_OF_NAME[output]
        )
        frames = codec.to_frames(sap_pb2.ForwardFrame, header, [raw], self.chunk_bytes)
        if step is None and len(frames) <= 2:
            replies = self._call(self._stub.EvaluateSmall, sap_pb2.ForwardFrames(frames=frames), session_id).frames
            reply, tensors = codec.from_frames(replies, sap_pb2.ForwardReplyFrame, ("tensor",))
        else:
            method = self._stub.Forward if step is not None else self._stub.Evaluate
            reply, tensors = self._streamed(method, frames, sap_pb2.ForwardReplyFrame, ("tensor",), session_id)
        if "tensor" not in tensors:
            raise RemoteError("the server's Forward reply carries no tensor")
        if reply.output != header.output:
            raise RemoteError(
                f"asked for {output} but the server's reply carries {codec.NAME_OF_OUTPUT.get(reply.output)}"
            )
        return tensors["tensor"]

    def _call(self, method, request, session_id: str | None = None):
        def attempt():
            self.bytes_sent += request.ByteSize()
            return method(request, timeout=self.call_timeout, metadata=self._metadata(session_id))

        reply = self._retrying(_rpc_name(method), attempt)
        if hasattr(reply, "ByteSize"):
            self.bytes_received += reply.ByteSize()
        return reply

    def _streamed(self, method, frames: list, reply_type, tensor_fields: tuple[str, ...], session_id: str):
        """Send a hot call's frames (again on a retry); (the reply's header, its tensors)."""

        def attempt():
            self.bytes_sent += sum(frame.ByteSize() for frame in frames)
            return list(method(iter(frames), timeout=self.call_timeout, metadata=self._metadata(session_id)))

        replies = self._retrying(_rpc_name(method), attempt)
        self.bytes_received += sum(frame.ByteSize() for frame in replies)
        return codec.from_frames(replies, reply_type, tensor_fields)

    def _retrying(self, name: str, attempt: Callable[[], T]) -> T:
        """attempt(), tried again on UNAVAILABLE / DEADLINE_EXCEEDED with bounded exponential backoff and
        jitter; any other status (or the last try's) becomes the matching SapError."""
        delay = self.retry_backoff
        for number in range(1, self.tries + 1):
            try:
                return attempt()
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code not in RETRYABLE or number == self.tries:
                    raise _as_sap_error(exc, self.address, name, number) from None
                pause = min(delay, self.retry_backoff_max) * self._random.uniform(0.5, 1.0)
                log.warning(
                    "%s to %s: %s (try %d of %d); trying again in %.2f s",
                    name,
                    self.address,
                    code.name if code else "?",
                    number,
                    self.tries,
                    pause,
                )
                time.sleep(pause)
                delay *= 2
        raise AssertionError("unreachable")  # the loop returns or raises


class RemoteGeneration:
    """The user's end of one Generate call: step() sends a piece's frames down the open request stream and reads
    that piece's reply; close() ends the request stream, so the provider frees its cache."""

    def __init__(self, service: RemoteTopService, session_id: str):
        self.service, self.session_id = service, session_id
        self._requests: queue.Queue = queue.Queue()
        self._pieces = 0
        self._call = service._stub.Generate(
            iter(self._requests.get, None), timeout=service.call_timeout, metadata=service._metadata(session_id)
        )
        self._replies = codec.read_messages(self._counted(self._call), sap_pb2.GenerateReplyFrame, ("tensor",))

    def _counted(self, frames):
        for frame in frames:
            self.service.bytes_received += frame.ByteSize()
            yield frame

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (n, H): the privatized vectors of the sequence's next n positions -> the top's output there."""
        tensor, raw = codec.wire_tensor(hidden, wire_dtype=self.service.wire_dtype)
        header = sap_pb2.GenerateHeader(session_id=self.session_id if not self._pieces else "", hidden=tensor)
        for frame in codec.to_frames(sap_pb2.GenerateFrame, header, [raw], self.service.chunk_bytes):
            self.service.bytes_sent += frame.ByteSize()
            self._requests.put(frame)
        self._pieces += 1
        try:
            _, tensors = next(self._replies)
        except grpc.RpcError as exc:
            raise _as_sap_error(exc, self.service.address, "Generate") from None
        except StopIteration:
            raise RemoteError("the server ended the generation before answering its last piece") from None
        if "tensor" not in tensors:
            raise RemoteError("the server's Generate reply carries no tensor")
        return tensors["tensor"]

    def close(self) -> None:
        self._requests.put(None)  # the request stream ends: the server's call returns, its cache goes
        try:
            for _ in self._replies:
                pass
        except (grpc.RpcError, InvalidInputError):
            pass  # the call already failed (its step said so) or ended

    def __enter__(self) -> RemoteGeneration:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rpc_name(method) -> str:
    """'Forward' for the stub's multi-callable of /sap.v2.SplitLearning/Forward (best effort, for messages)."""
    name = getattr(method, "_method", b"")
    name = name.decode() if isinstance(name, bytes) else str(name)
    return name.rsplit("/", 1)[-1] or "call"


def _as_sap_error(exc: grpc.RpcError, address: str, name: str = "call", tries: int = 1) -> SapError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in RETRYABLE:
        after = f" after {tries} tries" if tries > 1 else ""
        return ServerUnavailableError(
            f"sap-server at {address} did not answer {name}{after} ({code.name if code else '?'}): {details}"
        )
    return ERROR_OF_STATUS.get(code, RemoteError)(f"server answered {code.name if code else '?'}: {details}")


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _safe_target(destination: Path, relative: str) -> Path:
    """Refuse absolute paths and '..' so a malicious server cannot write outside destination."""
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or any(part in ("..", "") for part in parts) or "\\" in relative:
        raise InvalidInputError(f"bottom bundle file path {relative!r} is not a safe relative path")
    target = destination.joinpath(*parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target
