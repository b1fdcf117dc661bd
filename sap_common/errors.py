"""The SAP error hierarchy: domain code raises these; the servicer maps them to gRPC status codes."""


class SapError(Exception):
    """Base class of every error SAP raises on purpose."""


class InvalidInputError(SapError, ValueError):
    """A request, file or argument is malformed (bad tensor, wrong shape, bad CSV...)."""


class InvalidTensorError(InvalidInputError):
    """A tensor on the wire cannot be decoded: unknown dtype, byte length not matching its shape."""


class SessionNotFoundError(SapError, KeyError):
    """The session id is unknown or the session was closed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "session not found"


class AuthenticationError(SapError):
    """A call lacks a credential it needs: no or an unknown API key, no session secret (UNAUTHENTICATED)."""


class PermissionDeniedError(SapError):
    """A call's credential does not grant what it asks: a wrong session secret (PERMISSION_DENIED)."""


class StepOrderError(SapError):
    """A training request arrived for a step that is not the next one expected."""


class ResourceLimitError(SapError):
    """A configured limit (sessions, batch x length, message size) would be exceeded."""


class IdleTimeoutError(SapError):
    """A call waited longer than the server allows for the caller's next message (DEADLINE_EXCEEDED)."""


class ModelLoadError(SapError):
    """A model folder or alias cannot be loaded or split."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture is not one of the supported families."""


class ServerUnavailableError(SapError):
    """The provider cannot be reached."""


class ProtocolError(SapError):
    """The other side speaks another version of the wire contract (sap_common.PROTOCOL_VERSION)."""


class RemoteError(SapError):
    """The provider answered with an error that has no more specific SAP class."""
