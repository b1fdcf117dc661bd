"""Who may call: session secrets, provider API keys and the server's TLS files (no gRPC here).

- Every session has a random secret, returned once by OpenSession; each later call of the session carries
  it and is checked in constant time (hmac.compare_digest of SHA-256 digests). The server keeps only the
  digest (in the session object, Session, and in its checkpoints under --state-dir), never the secret.
- With `sap-server --api-keys FILE`, opening a session (and fetching the server's info and bottom) needs
  `authorization: Bearer KEY` with one of the file's keys. Keys are kept only as SHA-256 digests and a
  presented key is compared with every one of them, so the time taken says nothing about which key (or
  which prefix) came close.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sap_common.errors import AuthenticationError, InvalidInputError, PermissionDeniedError
from sap_common.service import API_KEY_METADATA, API_KEY_SCHEME, SESSION_SECRET_METADATA, read_credentials_file

SECRET_BYTES = 32  # a session secret is 64 hex digits


def new_session_secret() -> str:
    return secrets.token_hex(SECRET_BYTES)


def secret_digest(secret: str) -> bytes:
    """What the server keeps of a session secret: its SHA-256 digest."""
    return hashlib.sha256(secret.encode()).digest()


def require_secret(presented: str | None) -> str:
    """The presented secret, or AuthenticationError when the call carries none (checked before any lookup,
    so a call without a secret learns nothing, not even whether its session id exists)."""
    if not presented:
        raise AuthenticationError(
            f"this call carries no session secret (metadata {SESSION_SECRET_METADATA}); "
            f"send the session_secret OpenSession returned"
        )
    return presented


def check_session_secret(expected_digest: bytes, presented: str | None, session_id: str) -> None:
    """Raise unless presented is the secret whose SHA-256 digest is expected_digest (constant time).

    The message names only what the caller sent (a prefix of its own session id), nothing of other sessions.
    """
    if not hmac.compare_digest(expected_digest, secret_digest(require_secret(presented))):
        raise PermissionDeniedError(f"the session secret does not match session {session_id[:8]!r}…")


@dataclass(frozen=True)
class ApiKeys:
    """The provider's API keys, as SHA-256 digests; check() takes the `authorization` metadata value."""

    digests: tuple[bytes, ...] = field(repr=False)

    @classmethod
    def of(cls, keys: Iterable[str]) -> ApiKeys:
        digests = tuple(_digest(key) for key in keys)
        if not digests:
            raise InvalidInputError("no API keys given: an empty key list would refuse every user")
        return cls(digests)

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        """One key per line; blank lines and lines starting with '#' are ignored, spaces around keys too."""
        text = read_credentials_file(path, "API key file (--api-keys)").decode("utf-8", errors="replace")
        keys = [line.strip() for line in text.splitlines()]
        keys = [key for key in keys if key and not key.startswith("#")]
        if not keys:
            raise InvalidInputError(f"API key file {path} holds no key (one per line; '#' starts a comment)")
        bad = next((i for i, key in enumerate(keys) if any(c.isspace() for c in key)), None)
        if bad is not None:
            raise InvalidInputError(f"API key file {path}: key {bad + 1} contains whitespace; one key per line")
        return cls.of(keys)

    def __len__(self) -> int:
        return len(self.digests)

    def check(self, header: str | None) -> None:
        """Raise AuthenticationError unless header is 'Bearer KEY' with one of the keys."""
        scheme, _, key = (header or "").strip().partition(" ")
        if not header or scheme.lower() != API_KEY_SCHEME.lower() or not key.strip():
            raise AuthenticationError(
                f"this server needs an API key: metadata {API_KEY_METADATA}: "
                f"'{API_KEY_SCHEME} KEY' (sap-client --api-key or $SAP_API_KEY)"
            )
        presented = _digest(key.strip())
        matched = False
        for digest in self.digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(digest, presented)
        if not matched:
            raise AuthenticationError("the API key is not valid on this server")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes for TLS: the server's certificate chain and key, and (mutual TLS) the CA of client certs."""

    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_files(cls, cert: Path, key: Path, client_ca: Path | None = None) -> ServerTls:
        return cls(
            read_credentials_file(cert, "TLS certificate (--tls-cert)"),
            read_credentials_file(key, "TLS key (--tls-key)"),
            read_credentials_file(client_ca, "client CA (--tls-client-ca)") if client_ca is not None else None,
        )

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None
