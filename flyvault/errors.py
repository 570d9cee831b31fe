"""The one exception tree of fly-vault.

Every failure that reaches a user is a ``VaultError``. Library exceptions (aioquic, httpx,
pyjwt, cryptography, OSError) are mapped into this tree at the boundary where they occur
(``map_exceptions``) and never escape. Each class carries, as data:

- ``exit_code``: the process exit code the CLI uses for it, so the code a script sees says
  which kind of step failed (documented in references/cli.md);
- ``code``: the ``ErrorCode`` the server puts in the error frame when it refuses with this
  class (``flyvault.protocol.messages.ErrorMessage.from_exception``);
- ``remote_hint``: what the client suggests when it receives that code.

``WIRE_CLASSES`` names the one class each code turns back into on the client
(``exception_for``), so both directions read the same declarations.

The protocol errors follow h11's split: ``LocalProtocolError`` means we broke the protocol
(a bug or a bad argument on our side), ``RemoteProtocolError`` means the peer did.
"""

from __future__ import annotations

import contextlib
import enum
import errno
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar


class ErrorCode(enum.IntEnum):
    """Codes of the error frame (``u16``). Each stands for one class of ``WIRE_CLASSES``."""

    PROTOCOL = 1
    VERSION_MISMATCH = 2
    AUTH_FAILED = 3
    RATE_LIMITED = 4
    NOT_AUTHENTICATED = 5
    PROVISION_FAILED = 6
    ATTESTATION_UNAVAILABLE = 7
    NOT_FOUND = 8
    UNSUPPORTED = 9
    INTERNAL = 10
    BUSY = 11
    INVALID_REQUEST = 12
    #: A forward's TCP connect failed (refused, unresolvable, timed out).
    CONNECT_FAILED = 13
    #: Another client attached to the session (sent as DETACHED, listed for completeness).
    TAKEN_OVER = 14
    #: A file operation failed on the vault (permission denied, not a directory, ...).
    FILE_OP = 15
    #: Data did not match its SHA-256 (a write, a tar member): nothing was stored.
    INTEGRITY = 16
    #: A path named in a file operation does not exist.
    PATH_NOT_FOUND = 17
    #: A compare-and-swap write found the file changed (or present, or gone): not written.
    CONFLICT = 18
    #: The command (or its working directory) does not exist: the shell's 127.
    COMMAND_NOT_FOUND = 19
    #: The command exists but cannot be executed: the shell's 126.
    COMMAND_NOT_EXECUTABLE = 20


class VaultError(Exception):
    """Root of every fly-vault error. ``hint`` says what to do about it."""

    exit_code: int = 1
    #: What the server sends for this class: a class without a code of its own is a fault
    #: of the server, not of the request.
    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    #: The hint the client attaches when it receives ``code`` (the server sends none).
    remote_hint: ClassVar[str | None] = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(VaultError):
    """The command line itself is wrong (a malformed flag value, a missing argument); on
    the wire: the request was invalid."""

    exit_code = 2
    code = ErrorCode.INVALID_REQUEST


class ConfigError(VaultError):
    """The config file is missing, unreadable, invalid, or lacks what the command needs."""

    exit_code = 3


class TransportError(VaultError):
    """The QUIC channel could not be set up or was lost."""

    exit_code = 4


class ConnectError(TransportError):
    """The vault could not be reached (resolution, handshake, refused)."""


class NoAnswer(ConnectError):
    """Nothing answered at the vault's address (no QUIC answer, refused, unreachable): the
    vault is not running there, or the address is wrong. The client names the vault in the
    hint (``fly-vault local up`` for the local dev vault)."""


class ServerBusy(ConnectError):
    """The vault turned this connection away before authentication because it is under
    load (QUIC CONNECTION_REFUSED); connecting again shortly is the right answer."""


class ConnectionLost(TransportError):
    """An established connection went away (idle timeout, peer closed, network gone)."""


class Timeout(TransportError):
    """An operation did not finish within its deadline."""


class StreamReset(TransportError):
    """The peer reset its sending side of the stream (or stopped ours)."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


class AttestationError(VaultError):
    """The server could not prove it is the expected Fly machine; the token was not sent."""

    exit_code = 5
    code = ErrorCode.ATTESTATION_UNAVAILABLE
    remote_hint = (
        "the machine could not mint a Fly OIDC token; is it running on Fly (the /.fly/api socket)?"
    )


class AuthError(VaultError):
    """The access token was refused (or refused too often: rate limited)."""

    exit_code = 6
    code = ErrorCode.AUTH_FAILED
    remote_hint: ClassVar[str | None] = (
        "check access_token in the vault's config entry; it must equal the ACCESS_TOKEN the "
        "machine was started with"
    )


class RateLimited(AuthError):
    """Too many wrong tokens (no longer sent by the server; older servers do)."""

    code = ErrorCode.RATE_LIMITED
    remote_hint = "too many wrong tokens from this address; wait and fix access_token"


class NotAuthenticated(AuthError):
    """A stream other than control was opened before the control exchange succeeded."""

    code = ErrorCode.NOT_AUTHENTICATED
    remote_hint: ClassVar[str | None] = None  # none of its parent's hint


class ProtocolError(VaultError):
    """A frame or message broke the wire protocol. Abstract: raise a subclass."""

    exit_code = 7
    code = ErrorCode.PROTOCOL


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (bad argument, illegal state transition)."""

    code = ErrorCode.INTERNAL  # on the server: our own bug, not the client's


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (malformed, oversized or unexpected frame)."""


class VersionMismatch(RemoteProtocolError):
    """Client and server share no protocol version."""

    code = ErrorCode.VERSION_MISMATCH
    remote_hint = (
        "install the same fly-vault version on the laptop and in the vault image "
        "(fly-vault build), then redeploy"
    )


class ProvisionError(VaultError):
    """Provisioning or reprovisioning the rootfs failed (or the workload is not running)."""

    exit_code = 8
    code = ErrorCode.PROVISION_FAILED


class ColdVault(ProvisionError):
    """The vault was never provisioned and we were asked not to (``doctor``); the token was
    accepted, since the server checks it first."""


class NotFoundError(VaultError):
    """A named thing (exec session, vault entry on the server side) does not exist."""

    exit_code = 9
    code = ErrorCode.NOT_FOUND
    remote_hint: ClassVar[str | None] = "list the vault's sessions with: fly-vault list-exec VAULT"


class RemoteError(VaultError):
    """The server reported an error that has no more specific class (INTERNAL)."""

    exit_code = 10


class Unsupported(RemoteError):
    """The server does not speak what was asked (an unknown stream tag)."""

    code = ErrorCode.UNSUPPORTED


class Busy(RemoteError):
    """The vault is busy: another provisioning runs, or it holds too many sessions."""

    code = ErrorCode.BUSY
    remote_hint = (
        "the vault is busy (another provisioning, or too many sessions); retry later or stop "
        "sessions with fly-vault kill"
    )


class TooManySessions(Busy):
    """The vault already holds its maximum of exec sessions (server side)."""


class TargetUnreachable(RemoteError):
    """The vault could not open a forward's TCP connection (refused, unresolvable, timed
    out); the message says which target and why."""

    code = ErrorCode.CONNECT_FAILED
    remote_hint = (
        "the address is as the vault sees it: is a server listening there? "
        "(fly-vault exec VAULT -- ss -ltn)"
    )


class PathNotFound(NotFoundError):
    """A path named in a file operation does not exist on the vault (ENOENT)."""

    code = ErrorCode.PATH_NOT_FOUND
    remote_hint: ClassVar[str | None] = None  # none of its parent's hint


class FileOpError(RemoteError):
    """A file operation failed on the vault (the message names the path and the errno in
    words, e.g. "/etc/x: permission denied (EACCES)"), or a local file changed or shrank
    while a copy read it."""

    code = ErrorCode.FILE_OP


class IntegrityError(RemoteError):
    """Data did not match its SHA-256 or size (a write, a tar member); nothing was stored."""

    code = ErrorCode.INTEGRITY


class Conflict(RemoteError):
    """A write with an expected SHA-256 (compare-and-swap) found the file changed since it
    was read, gone, or (when it had to be absent) present; the file was left untouched."""

    code = ErrorCode.CONFLICT
    remote_hint = "read the file again, redo the change on what is there now, and write again"


def printable(text: str) -> str:
    """``text`` as valid UTF-8, for a message or a JSON that must carry it. The bytes of a
    name that is not UTF-8 arrive as lone surrogates (surrogateescape); they are shown as
    ``\\xNN``, any other lone surrogate as ``\\udNNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def file_error(path: str, number: int | None, detail: str | None = None) -> VaultError:
    """The error for an ``OSError`` on ``path``: ``PathNotFound`` for ENOENT, else
    ``FileOpError``; both read "<path>: <errno in words> (<ERRNO name>)"."""
    import errno as errno_module
    import os

    if number is None:
        return FileOpError(f"{path}: {detail or 'failed'}")
    words = os.strerror(number)
    words = words[:1].lower() + words[1:]
    name = errno_module.errorcode.get(number, f"errno {number}")
    message = f"{path}: {words} ({name})"
    if number == errno_module.ENOENT:
        return PathNotFound(message)
    return FileOpError(message)


class SessionTakenOver(VaultError):
    """Another client attached to the session; this one was detached (and must not retry)."""

    exit_code = 1
    code = ErrorCode.TAKEN_OVER


class SessionGone(VaultError):
    """The vault restarted while the connection was down: the session went with it."""

    exit_code = 4
    #: What ended the session, as an EXITED reason would say it (MCP ``end_reason``).
    reason = "the vault restarted while the connection was down"


class SpawnError(VaultError):
    """The command could not be started at all (no such file, not executable, bad cwd).

    ``exit_code`` follows the shell: 127 when the program (or cwd) does not exist, 126 when
    it exists but cannot be executed. The caller reports it to the client as the session's
    outcome (an invalid request). With a ``wrapper`` (nsenter), a program missing *inside*
    the namespace is not a SpawnError: the wrapper starts fine and exits 127 itself; with an
    ``Entry`` it is.
    """

    exit_code = 127
    code = ErrorCode.INVALID_REQUEST


class CommandNotFound(SpawnError):
    """No such program (or working directory): ``exec`` exits 127, as ssh's shell would."""

    exit_code = 127
    code = ErrorCode.COMMAND_NOT_FOUND


class CommandNotExecutable(SpawnError):
    """The program exists but cannot be run (permissions, not a program, a directory):
    ``exec`` exits 126, as ssh's shell would."""

    exit_code = 126
    code = ErrorCode.COMMAND_NOT_EXECUTABLE


def shell_status(exc: OSError) -> int:
    """A shell's status for a command it could not start: 127 when something named does
    not exist (ENOENT), 126 for every other reason (permissions, not a program, ...)."""
    return 127 if exc.errno == errno.ENOENT else 126


def spawn_error(message: str, exit_code: int) -> SpawnError:
    """The SpawnError for a start that failed with the shell's ``exit_code`` (126 or 127)."""
    return CommandNotExecutable(message) if exit_code == 126 else CommandNotFound(message)


class FirewallError(VaultError):
    """The firewall could not be applied; init must not start serving without it."""


class UnsafeEntry(RemoteProtocolError):
    """A copy from a vault sent an entry this side refuses to create (``..``, an absolute
    name, a path through a symlink, a device node, a setuid bit): a vault may be
    compromised, so its tree is checked as strictly as an archive from a stranger."""


#: The class each error code turns back into on the receiving side: one per code. A class
#: sent under a code (say ``SpawnError`` as INVALID_REQUEST) arrives as the class listed here.
WIRE_CLASSES: tuple[type[VaultError], ...] = (
    RemoteProtocolError,
    VersionMismatch,
    AuthError,
    RateLimited,
    NotAuthenticated,
    ProvisionError,
    AttestationError,
    NotFoundError,
    Unsupported,
    RemoteError,
    Busy,
    UsageError,
    TargetUnreachable,
    SessionTakenOver,
    FileOpError,
    IntegrityError,
    PathNotFound,
    Conflict,
    CommandNotFound,
    CommandNotExecutable,
)

_BY_CODE: dict[int, type[VaultError]] = {cls.code: cls for cls in WIRE_CLASSES}


def exception_for(code: int, message: str) -> VaultError:
    """The exception an error frame with ``code`` and ``message`` stands for."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(f"server error (code {code}): {message}")
    return cls(message, hint=cls.remote_hint)


# Mapping library exceptions at a boundary ------------------------------------------------

#: From a library exception type to a factory of ours; the first matching entry wins, so
#: list subclasses (``TimeoutError``) before their bases (``OSError``).
ExceptionMapping = Mapping[type[BaseException], Callable[[BaseException], VaultError]]


@contextlib.contextmanager
def map_exceptions(mapping: ExceptionMapping) -> Iterator[None]:
    """Turn library exceptions raised inside the block into ours (httpcore's pattern).

    Exceptions the mapping does not name pass through unchanged, and so do our own unless
    the mapping names them (a handshake maps ``ConnectionLost`` to ``ConnectError``).
    """
    try:
        yield
    except Exception as exc:
        for source, factory in mapping.items():
            if isinstance(exc, source):
                raise factory(exc) from exc
        raise
