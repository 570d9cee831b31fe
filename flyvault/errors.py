"""The one exception tree of fly-vault.

Every failure that reaches a user is a ``VaultError``. Library exceptions (aioquic, httpx,
pyjwt, cryptography, OSError) are mapped into this tree at the boundary where they occur and
never escape. Each class carries the process exit code the CLI uses for it, so the code a
script sees says which kind of step failed (documented in references/cli.md).

The protocol errors follow h11's split: ``LocalProtocolError`` means we broke the protocol
(a bug or a bad argument on our side), ``RemoteProtocolError`` means the peer did.
"""

from __future__ import annotations


class VaultError(Exception):
    """Root of every fly-vault error. ``hint`` says what to do about it."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(VaultError):
    """The command line itself is wrong (a malformed flag value, a missing argument)."""

    exit_code = 2


class ConfigError(VaultError):
    """The config file is missing, unreadable, invalid, or lacks what the command needs."""

    exit_code = 3


class TransportError(VaultError):
    """The QUIC channel could not be set up or was lost."""

    exit_code = 4


class ConnectError(TransportError):
    """The vault could not be reached (resolution, handshake, refused)."""


class ServerBusy(ConnectError):
    """The vault turned this connection away before authentication because it is under
    load (QUIC CONNECTION_REFUSED); connecting again shortly is the right answer."""


class ConnectionLost(TransportError):
    """An established connection went away (idle timeout, peer closed, network gone)."""


class Timeout(TransportError):
    """An operation did not finish within its deadline."""


class AttestationError(VaultError):
    """The server could not prove it is the expected Fly machine; the token was not sent."""

    exit_code = 5


class AuthError(VaultError):
    """The access token was refused (or refused too often: rate limited)."""

    exit_code = 6


class ProtocolError(VaultError):
    """A frame or message broke the wire protocol. Abstract: raise a subclass."""

    exit_code = 7


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (bad argument, illegal state transition)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (malformed, oversized or unexpected frame)."""


class VersionMismatch(RemoteProtocolError):
    """Client and server share no protocol version."""


class ProvisionError(VaultError):
    """Provisioning or reprovisioning the rootfs failed."""

    exit_code = 8


class ColdVault(ProvisionError):
    """The vault was never provisioned and we were asked not to (``doctor``); the token was
    accepted, since the server checks it first."""


class NotFoundError(VaultError):
    """A named thing (exec session, vault entry on the server side) does not exist."""

    exit_code = 9


class RemoteError(VaultError):
    """The server reported an error that has no more specific class."""

    exit_code = 10
