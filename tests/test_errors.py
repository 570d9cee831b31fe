"""Errors declared once: codes, exit codes and the mapping at the transport boundary.

Every class that crosses the wire declares its ``ErrorCode`` (and the hint the client adds);
the server answers with ``ErrorMessage.from_exception`` and the client turns the frame back
into a class through ``WIRE_CLASSES``. These tests hold the table, the round trip, the
library-exception mapping, and (over real QUIC) the console stream's refusals, which used
to be NOT_FOUND for every error.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, ScriptedAttestor, run_async, vault_entry

from flyvault import errors
from flyvault.errors import (
    WIRE_CLASSES,
    AttestationError,
    AuthError,
    Busy,
    ConnectError,
    ConnectionLost,
    ErrorCode,
    LocalProtocolError,
    NoAnswer,
    NotAuthenticated,
    NotFoundError,
    ProvisionError,
    RateLimited,
    RemoteError,
    RemoteProtocolError,
    ServerBusy,
    SessionTakenOver,
    SpawnError,
    TargetUnreachable,
    TooManySessions,
    Unsupported,
    UsageError,
    VaultError,
    VersionMismatch,
    exception_for,
    map_exceptions,
)
from flyvault.protocol.codec import FrameDecoder
from flyvault.protocol.console import refusal
from flyvault.protocol.constants import ERROR_FRAME, MAX_PAYLOAD
from flyvault.protocol.messages import ErrorMessage
from flyvault.standins import OidcIssuer

#: class -> (code the server sends, exit code of the CLI). The table in protocol.md and the
#: report of issue 13 item 5; a change here is a change of the wire or of scripts' view.
EXPECTED: dict[type[VaultError], tuple[ErrorCode, int]] = {
    RemoteProtocolError: (ErrorCode.PROTOCOL, 7),
    VersionMismatch: (ErrorCode.VERSION_MISMATCH, 7),
    AuthError: (ErrorCode.AUTH_FAILED, 6),
    RateLimited: (ErrorCode.RATE_LIMITED, 6),
    NotAuthenticated: (ErrorCode.NOT_AUTHENTICATED, 6),
    ProvisionError: (ErrorCode.PROVISION_FAILED, 8),
    AttestationError: (ErrorCode.ATTESTATION_UNAVAILABLE, 5),
    NotFoundError: (ErrorCode.NOT_FOUND, 9),
    Unsupported: (ErrorCode.UNSUPPORTED, 10),
    RemoteError: (ErrorCode.INTERNAL, 10),
    Busy: (ErrorCode.BUSY, 10),
    UsageError: (ErrorCode.INVALID_REQUEST, 2),
    TargetUnreachable: (ErrorCode.CONNECT_FAILED, 10),
    SessionTakenOver: (ErrorCode.TAKEN_OVER, 1),
    errors.FileOpError: (ErrorCode.FILE_OP, 10),
    errors.IntegrityError: (ErrorCode.INTEGRITY, 10),
    errors.PathNotFound: (ErrorCode.PATH_NOT_FOUND, 9),
    errors.Conflict: (ErrorCode.CONFLICT, 10),
    errors.CommandNotFound: (ErrorCode.COMMAND_NOT_FOUND, 127),
    errors.CommandNotExecutable: (ErrorCode.COMMAND_NOT_EXECUTABLE, 126),
}

#: Server-side classes sent under another class's code: (class, the class it arrives as).
SENT_AS: dict[type[VaultError], type[VaultError]] = {
    TooManySessions: Busy,
    SpawnError: UsageError,
    LocalProtocolError: RemoteError,  # our own bug: INTERNAL, not the client's PROTOCOL
    VaultError: RemoteError,  # a class without a code of its own
    errors.ColdVault: ProvisionError,
    errors.ConfigError: RemoteError,
}


def test_every_code_has_exactly_one_wire_class() -> None:
    codes = [cls.code for cls in WIRE_CLASSES]
    assert len(codes) == len(set(codes)), "two classes claim one code"
    assert set(codes) == set(ErrorCode), "a code turns into no class"


@pytest.mark.parametrize("cls", WIRE_CLASSES, ids=lambda cls: cls.__name__)
def test_wire_class_code_and_exit_code(cls: type[VaultError]) -> None:
    assert (cls.code, cls.exit_code) == EXPECTED[cls]


def _round_trip(exc: VaultError) -> VaultError:
    """Server ``from_exception`` -> bytes of an error frame -> client exception."""
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoder.feed(refusal(exc))
    frame = decoder.next_frame()
    assert frame is not None and frame.type == ERROR_FRAME
    return ErrorMessage.decode(frame.payload).to_exception()


@pytest.mark.parametrize("cls", [*WIRE_CLASSES, *SENT_AS], ids=lambda cls: cls.__name__)
def test_round_trip_server_class_to_client_class(cls: type[VaultError]) -> None:
    received = _round_trip(cls("what went wrong"))
    assert type(received) is SENT_AS.get(cls, cls)
    assert received.message == "what went wrong"
    assert received.hint == type(received).remote_hint
    assert received.exit_code == type(received).exit_code


def test_hints_the_client_adds() -> None:
    assert "access_token" in (_round_trip(AuthError("x")).hint or "")
    assert "list-exec" in (_round_trip(NotFoundError("x")).hint or "")
    assert "fly-vault kill" in (_round_trip(TooManySessions("x")).hint or "")
    assert _round_trip(NotAuthenticated("x")).hint is None


def test_file_errors_name_the_path_and_the_errno_in_words() -> None:
    import errno

    missing = errors.file_error("/srv/x", errno.ENOENT)
    assert isinstance(missing, NotFoundError)
    assert missing.message == "/srv/x: no such file or directory (ENOENT)"
    denied = _round_trip(errors.file_error("/etc/x", errno.EACCES))
    assert type(denied) is errors.FileOpError
    assert denied.message == "/etc/x: permission denied (EACCES)"


def test_unknown_code_is_a_remote_error_naming_it() -> None:
    received = exception_for(999, "from the future")
    assert type(received) is RemoteError
    assert received.message == "server error (code 999): from the future"


def test_map_exceptions_maps_each_listed_library_exception() -> None:
    mapping = {
        TimeoutError: lambda exc: errors.Timeout("timed out"),
        socket.gaierror: lambda exc: ConnectError("resolve"),
        OSError: lambda exc: ConnectError(f"os: {exc}"),
        ConnectionLost: lambda exc: ServerBusy("busy"),
    }
    cases: list[tuple[BaseException, type[VaultError], str]] = [
        (TimeoutError(), errors.Timeout, "timed out"),
        (socket.gaierror(socket.EAI_NONAME, "x"), ConnectError, "resolve"),
        (ConnectionRefusedError("refused"), ConnectError, "os: refused"),
        (ConnectionLost("gone"), ServerBusy, "busy"),
    ]
    for raised, expected, message in cases:
        with pytest.raises(expected) as caught, map_exceptions(mapping):
            raise raised
        assert type(caught.value) is expected and caught.value.message == message
        assert caught.value.__cause__ is raised


def test_map_exceptions_lets_unlisted_exceptions_through() -> None:
    with pytest.raises(KeyError), map_exceptions({OSError: lambda exc: ConnectError("x")}):
        raise KeyError("k")
    with pytest.raises(AuthError), map_exceptions({OSError: lambda exc: ConnectError("x")}):
        raise AuthError("ours stays ours")


class _Channel:
    def __init__(self, refused: bool, nothing_listening: bool = False) -> None:
        self.refused_by_peer = refused
        self.nothing_listening = nothing_listening


@pytest.mark.parametrize(
    ("raised", "refused", "expected", "message", "close_reason"),
    [
        (TimeoutError(), False, NoAnswer, "no QUIC answer from h:1 within 3 s", "timeout"),
        (OSError(113, "No route to host"), False, NoAnswer, "cannot reach h:1: No route", "socket"),
        (ConnectionLost("closed"), False, ConnectError, "cannot connect to h:1: closed", "failed"),
        (ConnectionLost("server busy: x"), True, ServerBusy, "h:1 is busy: server busy", "failed"),
        (ValueError("bad cid"), False, ConnectError, "QUIC handshake with h:1 failed", "failed"),
    ],
)
def test_handshake_mapping(
    raised: BaseException, refused: bool, expected: type, message: str, close_reason: str
) -> None:
    from flyvault.transport import endpoint

    mapping = endpoint._handshake_errors("h:1", 3.0, _Channel(refused))  # type: ignore[arg-type]
    with pytest.raises(ConnectError) as caught, map_exceptions(mapping):
        raise raised
    assert type(caught.value) is expected
    assert caught.value.message.startswith(message)
    assert close_reason in endpoint._close_reason(caught.value)


def test_nothing_listening_is_no_answer_and_a_tls_alert_is_not() -> None:
    from flyvault.transport import endpoint

    for listening, expected in ((True, NoAnswer), (False, ConnectError)):
        channel = _Channel(False, nothing_listening=listening)
        mapping = endpoint._handshake_errors("h:1", 3.0, channel)  # type: ignore[arg-type]
        with pytest.raises(ConnectError) as caught, map_exceptions(mapping):
            raise ConnectionLost("nothing is listening there (Connection refused)")
        assert type(caught.value) is expected


def test_resolve_failure_is_a_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from flyvault.transport import endpoint

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def scenario() -> None:
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", failing)
        with pytest.raises(ConnectError) as caught:
            await endpoint.resolve("nowhere.invalid", 1)
        assert caught.value.message == "cannot resolve nowhere.invalid: Name or service not known"
        assert caught.value.hint is not None

    run_async(scenario())


# Over real QUIC: the console stream answers with the refused class's own code -------------


def test_console_refusals_carry_the_class_code_over_quic(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer
) -> None:
    """Regression: server/console.py sent every VaultError it had no branch for as
    NOT_FOUND, so a client told "session not found" (exit 9, "list-exec") for, say, a
    busy vault. Each refusal now arrives as the class the server raised."""
    from flyvault.client.vault import ExecSession, Vault
    from flyvault.protocol.console import OpenSession
    from flyvault.server.app import ServerOptions, VaultServer
    from flyvault.server.auth import AccessToken

    refusals: list[VaultError] = [
        Busy("the vault's workload is restarting"),
        UsageError("no such directory: /nowhere"),
        ProvisionError("the workload is not running"),
        RemoteError("something else broke"),
    ]

    async def scenario() -> list[VaultError]:
        options = ServerOptions(
            listen_host="127.0.0.1", listen_port=0, data_dir=tmp_path, host_mode=True
        )
        server = VaultServer(options, AccessToken(TOKEN), attestor)
        await server.start()
        assert server.listener is not None
        vault = Vault(vault_entry(server.listener.address[1], issuer))
        pending = list(refusals)

        def enter(cwd: str | None) -> tuple[list[str], str | None]:
            raise pending.pop(0)

        server.sessions.policy.enter = enter
        received: list[VaultError] = []
        try:
            for index in range(len(refusals)):
                request = OpenSession(f"refused-{index}", ("true",))
                with pytest.raises(VaultError) as caught:
                    await ExecSession(vault, request, _hooks()).run()
                received.append(caught.value)
            # A reattach to an unknown id is still NOT_FOUND, with its hint.
            with pytest.raises(NotFoundError) as missing:
                await ExecSession(vault, OpenSession("nobody", None), _hooks()).run()
            assert "list-exec" in (missing.value.hint or "")
        finally:
            await vault.close()
            server.close()
        return received

    received = run_async(scenario())
    assert [type(exc) for exc in received] == [type(exc) for exc in refusals]
    assert [exc.message for exc in received] == [exc.message for exc in refusals]
    assert [exc.exit_code for exc in received] == [10, 2, 8, 10]


def _hooks() -> Any:
    from flyvault.client.vault import ExecHooks

    return ExecHooks(stdout=lambda data: None, stderr=lambda data: None)
