"""End to end over real QUIC on 127.0.0.1: attestation, token, refusals, robustness.

The init server runs in the test's event loop (a real UDP socket, real TLS); only the Fly
platform is a stand-in (OIDC issuer, and an attestor that can be told to misbehave).
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, ScriptedAttestor, run_async, vault_entry

from flyvault.client.connection import open_vault
from flyvault.errors import (
    AttestationError,
    AuthError,
    ConnectError,
    RemoteProtocolError,
    VersionMismatch,
)
from flyvault.protocol.codec import FrameDecoder, encode_frame
from flyvault.protocol.constants import (
    ERROR_FRAME,
    MAX_PAYLOAD,
    MAX_PROTOCOL_VERSION,
    ControlFrame,
    ErrorCode,
    RuntimeStatus,
    StreamTag,
    VmState,
)
from flyvault.protocol.control import ControlClient, ErrorReceived
from flyvault.protocol.messages import ErrorMessage
from flyvault.server.app import ServerOptions, VaultServer
from flyvault.server.attestation import FlyOidcAttestor
from flyvault.server.auth import AccessToken
from flyvault.standins import OidcIssuer
from flyvault.transport import connect


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def start_server(
    tmp_path: Path, attestor: Any, *, token: str | None = TOKEN, host_mode: bool = True, **kw: Any
) -> VaultServer:
    options = ServerOptions(
        listen_host="127.0.0.1", listen_port=0, data_dir=tmp_path, host_mode=host_mode
    )
    server = VaultServer(options, AccessToken(token), attestor, **kw)
    await server.start()
    return server


def port_of(server: VaultServer) -> int:
    assert server.listener is not None
    return server.listener.address[1]


async def read_frames(stream: Any) -> list[Any]:
    decoder = FrameDecoder(MAX_PAYLOAD)
    frames = []
    while True:
        data = await stream.read()
        if not data:
            decoder.feed_eof()
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
            return frames
        decoder.feed(data)


def test_connect_attest_authenticate(tmp_path: Path, issuer: OidcIssuer, fly_api: Any) -> None:
    async def scenario() -> None:
        attestor = FlyOidcAttestor(str(fly_api.path))
        server = await start_server(tmp_path, attestor)
        try:
            entry = vault_entry(port_of(server), issuer, machine_id=fly_api.identity.machine_id)
            connection = await open_vault(entry)
            assert connection.vm_state is VmState.READY
            assert connection.runtime_status is RuntimeStatus.HOST_MODE
            assert connection.claims.machine_id == fly_api.identity.machine_id
            assert connection.claims.app_name == "test-app"
            # The token was bound to this very connection.
            exporter = connection.channel.export_keying_material(b"fly-vault-channel-binding", 32)
            assert fly_api.audiences[-1] == exporter.hex()
            assert server.stats.authenticated == 1
            connection.close()
        finally:
            server.close()
            await attestor.aclose()

    run_async(scenario())


FORGERIES = {
    "other key, same kid": (
        lambda issuer: lambda c, a: {"key": _other_key(), "kid": issuer.current_kid},
        "signature",
    ),
    "alg none": (lambda issuer: lambda c, a: {"algorithm": "none"}, "not allowed"),
    "HS256 keyed with the public key": (
        lambda issuer: lambda c, a: {"algorithm": "HS256"},
        "not allowed",
    ),
    "missing kid": (lambda issuer: lambda c, a: {"headers": {"kid": None}}, "missing kid"),
    "unknown kid": (lambda issuer: lambda c, a: {"kid": "no-such-kid"}, "no-such-kid"),
    "expired": (lambda issuer: lambda c, a: c.update(exp=c["iat"] - 3600), "expired"),
    "not yet valid": (lambda issuer: lambda c, a: c.update(nbf=c["iat"] + 3600), "not valid yet"),
    "other issuer": (
        lambda issuer: lambda c, a: c.update(iss=issuer.issuer("evil-org")),
        "org mismatch",
    ),
    "other app": (lambda issuer: lambda c, a: c.update(app_name="evil-app"), "app mismatch"),
    "other machine": (
        lambda issuer: lambda c, a: c.update(machine_id="0000000000bad0"),
        "machine mismatch",
    ),
    "other connection's exporter": (
        lambda issuer: lambda c, a: c.update(aud="ab" * 32),
        "different TLS connection",
    ),
}

_OTHER_KEY: Any = None


def _other_key() -> Any:
    global _OTHER_KEY
    if _OTHER_KEY is None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        _OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _OTHER_KEY


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_forged_attestation_refused_before_token_is_sent(
    case: str, tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    make_tamper, expected = FORGERIES[case]

    async def scenario() -> None:
        server = await start_server(tmp_path, attestor)
        try:
            entry = vault_entry(port_of(server), issuer, machine_id=attestor.identity.machine_id)
            attestor.tamper = make_tamper(issuer)
            with pytest.raises(AttestationError) as info:
                await open_vault(entry)
            assert expected in info.value.message
            assert TOKEN not in info.value.message
            # The token never left the client: the server saw no setup request at all.
            assert server.stats.setup_requests == 0
            # The same server keeps serving: an honest attestation now passes.
            attestor.tamper = None
            connection = await open_vault(entry)
            assert server.stats.authenticated == 1
            connection.close()
        finally:
            server.close()

    run_async(scenario())


def test_relayed_jwt_from_another_connection_refused(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    """A relay replays a genuine token minted for a different TLS connection."""

    async def scenario() -> None:
        server = await start_server(tmp_path, attestor)
        try:
            entry = vault_entry(port_of(server), issuer)
            first = await open_vault(entry)
            first.close()
            attestor.replay = issuer.mint(
                _claims_for(attestor, attestor.audiences[-1])
            )  # valid signature, other connection's aud
            with pytest.raises(AttestationError, match="different TLS connection"):
                await open_vault(entry)
            assert server.stats.setup_requests == 1  # only the first, honest connection
        finally:
            server.close()

    run_async(scenario())


def _claims_for(attestor: ScriptedAttestor, audience: str) -> dict[str, Any]:
    from flyvault.standins import fly_claims

    return fly_claims(
        attestor.identity, issuer=attestor.issuer.issuer(attestor.identity.org), aud=audience
    )


def test_machine_id_checked_when_configured_even_without_proxy(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    async def scenario() -> None:
        server = await start_server(tmp_path, attestor)
        try:
            entry = vault_entry(port_of(server), issuer, machine_id="148e21ea7e46e8")
            with pytest.raises(AttestationError, match="machine mismatch"):
                await open_vault(entry)
        finally:
            server.close()

    run_async(scenario())


def test_no_access_token_configured_on_server(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    async def scenario() -> None:
        server = await start_server(tmp_path, attestor, token="")
        try:
            with pytest.raises(AuthError, match="no ACCESS_TOKEN configured"):
                await open_vault(vault_entry(port_of(server), issuer, token="anything"))
        finally:
            server.close()

    run_async(scenario())


def test_cold_vault_without_rootfs_is_refused(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    async def scenario() -> None:
        server = await start_server(tmp_path, attestor, host_mode=False)
        try:
            from flyvault.errors import ConfigError

            # The client knows the vault is cold and refuses before sending the token...
            with pytest.raises(ConfigError, match="rootfs_url is required for cold boot"):
                await open_vault(vault_entry(port_of(server), issuer))
            assert server.stats.setup_requests == 0
            # ...and the server refuses a cold setup without a rootfs on its own.
            error = await _raw_setup(port_of(server), attestor, TOKEN)
            assert error.code == ErrorCode.PROVISION_FAILED
            assert "cold boot requires a rootfs payload" in error.message
            (tmp_path / ".provisioned").touch()
            connection = await open_vault(vault_entry(port_of(server), issuer))
            assert connection.vm_state is VmState.READY
            assert connection.runtime_status is RuntimeStatus.NOT_STARTED
            connection.close()
        finally:
            server.close()

    run_async(scenario())


async def _raw_setup(port: int, attestor: ScriptedAttestor, token: str) -> ErrorMessage:
    """A control exchange that skips the client's checks: attestation, then a bare setup."""
    from flyvault.protocol.messages import RootfsNone, SetupRequest

    channel = await connect("127.0.0.1", port)
    stream = channel.open_stream()
    control = ControlClient()
    control.request_attestation()
    stream.write(bytes([StreamTag.CONTROL]) + control.data_to_send())
    decoder = FrameDecoder(MAX_PAYLOAD)
    while (frame := decoder.next_frame()) is None:
        decoder.feed(await stream.read())
    control.receive_data(encode_frame(frame.type, frame.payload))
    control.next_event()
    control.send_setup(SetupRequest(token, RootfsNone()))
    await stream.send(control.data_to_send(), end_stream=True)
    frames = await read_frames_from(stream, decoder)
    channel.close_now()
    assert frames[-1].type == ERROR_FRAME
    return ErrorMessage.decode(frames[-1].payload)


async def read_frames_from(stream: Any, decoder: FrameDecoder) -> list[Any]:
    frames = []
    while True:
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
        data = await stream.read()
        if not data:
            decoder.feed_eof()
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
            return frames
        decoder.feed(data)


def test_attestation_unavailable_is_an_error_frame_not_a_silent_close(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    async def scenario() -> None:
        attestor = FlyOidcAttestor(str(tmp_path / "no-such-socket"))
        server = await start_server(tmp_path, attestor)
        try:
            with pytest.raises(AttestationError, match="server cannot attest"):
                await open_vault(vault_entry(port_of(server), issuer))
        finally:
            server.close()
            await attestor.aclose()

    run_async(scenario())


def test_version_mismatch_end_to_end(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    async def scenario() -> None:
        server = await start_server(tmp_path, attestor)
        try:
            channel = await connect("127.0.0.1", port_of(server))
            stream = channel.open_stream()
            control = ControlClient(min_version=1, max_version=1)
            control.request_attestation()
            await stream.send(bytes([StreamTag.CONTROL]) + control.data_to_send())
            for frame in await read_frames(stream):
                control.receive_data(encode_frame(frame.type, frame.payload))
            event = control.next_event()
            assert isinstance(event, ErrorReceived)
            error = event.error.to_exception()
            assert isinstance(error, VersionMismatch)
            assert f"client speaks 1..1, server speaks 2..{MAX_PROTOCOL_VERSION}" in error.message
            channel.close_now()
        finally:
            server.close()

    run_async(scenario())


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (bytes([ControlFrame.REQUEST_ATTESTATION]) + (50_000_000).to_bytes(4, "big"), "declares"),
        (encode_frame(ControlFrame.REQUEST_ATTESTATION, b"\x00\x02\x00\x02")[:-2], "ended inside"),
        (b"\x01\x00", "ended inside a frame header"),
    ],
    ids=["oversized", "truncated-payload", "truncated-header"],
)
def test_bad_frames_before_auth_get_an_error_frame(
    payload: bytes,
    expected: str,
    tmp_path: Path,
    issuer: OidcIssuer,
    attestor: ScriptedAttestor,
) -> None:
    async def scenario() -> None:
        server = await start_server(tmp_path, attestor)
        try:
            channel = await connect("127.0.0.1", port_of(server))
            stream = channel.open_stream()
            await stream.send(bytes([StreamTag.CONTROL]) + payload, end_stream=True)
            frames = await read_frames(stream)
            assert frames[-1].type == ERROR_FRAME
            error = ErrorMessage.decode(frames[-1].payload)
            assert error.code == ErrorCode.PROTOCOL
            assert expected in error.message
            channel.close_now()
            assert server.stats.protocol_errors == 1
            # Still serving.
            connection = await open_vault(vault_entry(port_of(server), issuer))
            connection.close()
        finally:
            server.close()

    run_async(scenario())


def test_streams_before_auth_and_unknown_tags_get_error_frames(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    async def scenario() -> None:
        server = await start_server(tmp_path, attestor)
        try:
            channel = await connect("127.0.0.1", port_of(server))
            stream = channel.open_stream()
            await stream.send(bytes([StreamTag.CONSOLE]), end_stream=True)
            [frame] = await read_frames(stream)
            error = ErrorMessage.decode(frame.payload)
            assert (frame.type, error.code) == (ERROR_FRAME, ErrorCode.NOT_AUTHENTICATED)
            channel.close_now()

            connection = await open_vault(vault_entry(port_of(server), issuer))
            odd = connection.channel.open_stream()
            await odd.send(b"\x7e", end_stream=True)
            [frame] = await read_frames(odd)
            error = ErrorMessage.decode(frame.payload)
            assert error.code == ErrorCode.UNSUPPORTED
            assert "unknown stream type 0x7e" in error.message
            # Only that stream was refused: the connection still works.
            again = connection.channel.open_stream()
            await again.send(b"\x7f", end_stream=True)
            assert (await read_frames(again))[0].type == ERROR_FRAME
            assert not connection.is_closed
            connection.close()
        finally:
            server.close()

    run_async(scenario())


def test_garbage_datagrams_are_dropped_and_server_keeps_serving(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    async def scenario() -> None:
        server = await start_server(tmp_path, attestor)
        try:
            port = port_of(server)
            rng = random.Random(1234)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for i in range(3000):  # bounded
                    size = rng.choice((1, 5, 20, 1200, 1300, rng.randrange(1, 1500)))
                    packet = bytes(rng.getrandbits(8) for _ in range(size))
                    if i % 3 == 0:
                        packet = b"\xc0\x00\x00\x00\x01" + packet  # long header, QUIC v1
                    sock.sendto(packet, ("127.0.0.1", port))
            connection = await open_vault(vault_entry(port, issuer))
            connection.close()
            assert server.listener is not None
            assert server.listener.stats.dropped_unparseable > 0
        finally:
            server.close()

    run_async(scenario())


def test_unauthenticated_connection_closed_after_auth_timeout(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    async def scenario() -> None:
        options = ServerOptions(
            listen_host="127.0.0.1", listen_port=0, data_dir=tmp_path, auth_timeout=0.3
        )
        server = VaultServer(options, AccessToken(TOKEN), attestor)
        await server.start()
        try:
            channel = await connect("127.0.0.1", port_of(server))
            await channel.wait_closed()
            assert "not authenticated in time" in (channel.close_reason or "")
        finally:
            server.close()

    run_async(scenario())


def test_unreachable_address_fails_fast_with_connect_error(issuer: OidcIssuer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectError) as info:
        run_async(open_vault(vault_entry(port, issuer)))
    assert "127.0.0.1" in info.value.message
    assert info.value.hint


def test_remote_protocol_error_type_for_garbage_attestation(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    """A server whose 'JWT' is not a JWT is refused with an attestation error."""

    async def scenario() -> None:
        attestor.replay = "not-a-jwt"
        server = await start_server(tmp_path, attestor)
        try:
            with pytest.raises((AttestationError, RemoteProtocolError)):
                await open_vault(vault_entry(port_of(server), issuer))
            assert server.stats.setup_requests == 0
        finally:
            server.close()

    run_async(scenario())


def test_environment_never_holds_token_after_start() -> None:
    token = AccessToken.from_environment()
    assert not token.configured
    os.environ["ACCESS_TOKEN"] = "abc"
    try:
        token = AccessToken.from_environment()
        assert token.configured and token.matches("abc") and not token.matches("abd")
        assert "ACCESS_TOKEN" not in os.environ
        assert "abc" not in repr(token)
    finally:
        os.environ.pop("ACCESS_TOKEN", None)
