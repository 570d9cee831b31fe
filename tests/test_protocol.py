"""The sans-I/O core in memory: codec bounds, messages, control state machines."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flyvault.errors import LocalProtocolError, ProtocolError, RemoteProtocolError, VersionMismatch
from flyvault.protocol.codec import Frame, FrameDecoder, PayloadReader, encode_frame
from flyvault.protocol.constants import (
    ERROR_FRAME,
    MAX_PAYLOAD,
    MAX_PREAUTH_PAYLOAD,
    MAX_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    ControlFrame,
    ErrorCode,
    RuntimeStatus,
    VmState,
)
from flyvault.protocol.control import (
    AttestationReceived,
    AttestationRequested,
    ClientState,
    ControlClient,
    ControlServer,
    ErrorReceived,
    ProgressReported,
    RootfsChunkReceived,
    RootfsUploaded,
    ServerState,
    SetupCompleted,
    SetupRequested,
    StreamEnded,
    UploadReady,
    VersionRejected,
)
from flyvault.protocol.messages import (
    Attestation,
    ErrorMessage,
    Progress,
    RequestAttestation,
    RootfsInline,
    RootfsNone,
    RootfsOptions,
    RootfsUrl,
    SetupComplete,
    SetupRequest,
)

# --- isolation ------------------------------------------------------------------------


def test_protocol_imports_without_asyncio_sockets_or_clock() -> None:
    code = (
        "import sys\n"
        "for name in ('asyncio', 'socket', 'time', 'aioquic'):\n"
        "    sys.modules[name] = None\n"
        "import flyvault.protocol, flyvault.protocol.control, flyvault.protocol.messages\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- codec ------------------------------------------------------------------------------


def test_frame_round_trip_in_arbitrary_chunks() -> None:
    frames = [(1, b""), (2, b"x" * 1000), (ERROR_FRAME, b"abc")]
    wire = b"".join(encode_frame(t, p) for t, p in frames)
    decoder = FrameDecoder(MAX_PAYLOAD)
    out = []
    for i in range(0, len(wire), 7):
        decoder.feed(wire[i : i + 7])
        while (frame := decoder.next_frame()) is not None:
            out.append((frame.type, frame.payload))
    assert out == frames


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=12),
    st.lists(st.integers(1, 400), min_size=1, max_size=8),
    st.sampled_from([bytes, bytearray, memoryview]),
)
def test_frames_come_out_whole_whatever_the_cuts_and_chunk_types(
    frames: list[tuple[int, bytes]], cuts: list[int], kind: type
) -> None:
    """Cut the wire anywhere, feed bytes, bytearrays or memoryviews (changed right after,
    as a caller's reused buffer is): every frame comes out once, whole, in order."""
    wire = b"".join(encode_frame(t, p) for t, p in frames)
    decoder = FrameDecoder(MAX_PAYLOAD)
    out: list[tuple[int, bytes]] = []
    position, turn = 0, 0
    while position < len(wire):
        size = cuts[turn % len(cuts)]
        piece = bytearray(wire[position : position + size])
        decoder.feed(kind(piece))
        piece[:] = b"\xff" * len(piece)  # a reused buffer: must not reach the frames
        position += size
        turn += 1
        while (frame := decoder.next_frame()) is not None:
            out.append((frame.type, frame.payload))
    decoder.feed_eof()
    assert out == frames
    assert decoder.finished and decoder.buffered == 0


def test_a_typed_memoryview_is_counted_in_bytes() -> None:
    wire = encode_frame(3, b"abc")  # 8 bytes: two 4-byte items as a typed view
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoder.feed(memoryview(wire).cast("I"))
    assert decoder.buffered == len(wire)
    assert decoder.next_frame() == Frame(3, b"abc")


def test_a_payload_fed_as_its_own_chunk_is_not_copied() -> None:
    payload = bytes(range(256)) * 1024
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoder.feed(encode_frame(7, b"")[:1] + len(payload).to_bytes(4, "big"))
    decoder.feed(payload)
    frame = decoder.next_frame()
    assert frame is not None and frame.payload is payload
    assert decoder.at_frame_boundary


def test_oversized_declaration_refused_before_payload_arrives() -> None:
    decoder = FrameDecoder(MAX_PREAUTH_PAYLOAD)
    header = bytes([1]) + (0xFFFFFFFF).to_bytes(4, "big")
    decoder.feed(header + b"x" * 1000)
    decoder.feed(b"y" * 100_000)
    # Nothing beyond the 5-byte header was buffered, and the refusal is sticky.
    assert decoder.buffered == 5
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="declares 4294967295 bytes"):
            decoder.next_frame()


def test_truncated_frame_at_eof_is_an_error() -> None:
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoder.feed(encode_frame(1, b"hello")[:-2])
    decoder.feed_eof()
    with pytest.raises(RemoteProtocolError, match="stream ended inside a frame"):
        decoder.next_frame()


def test_truncated_header_at_eof_is_an_error() -> None:
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoder.feed(b"\x01\x00")
    decoder.feed_eof()
    with pytest.raises(RemoteProtocolError, match="inside a frame header"):
        decoder.next_frame()


def test_encode_refuses_payload_over_limit() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(1, b"x" * 11, max_payload=10)


def test_reader_reports_field_names_not_payload() -> None:
    reader = PayloadReader(b"\x00\x00\x00\x10secret", "setup request")
    with pytest.raises(RemoteProtocolError) as info:
        reader.text("access token", 4096)
    assert "access token truncated" in str(info.value)
    assert "secret" not in str(info.value)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_decoding_arbitrary_bytes_only_raises_protocol_error(data: bytes, chunk: int) -> None:
    decoder = FrameDecoder(4096)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i : i + chunk])
            while decoder.next_frame() is not None:
                pass
        decoder.feed_eof()
        while decoder.next_frame() is not None:
            pass
    except ProtocolError:
        pass


_DECODERS = [
    ErrorMessage.decode,
    RequestAttestation.decode,
    Attestation.decode,
    SetupRequest.decode,
    SetupComplete.decode,
    Progress.decode,
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_DECODERS), st.binary(max_size=512))
def test_message_decoders_only_raise_protocol_error(decode, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(ProtocolError):
        decode(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=50))
def test_server_machine_fed_garbage_only_raises_protocol_error(data: bytes, chunk: int) -> None:
    server = ControlServer()
    try:
        for i in range(0, len(data), chunk):
            server.receive_data(data[i : i + chunk])
            while (event := server.next_event()) is not None:
                if isinstance(event, AttestationRequested):
                    server.send_attestation(VmState.READY, RuntimeStatus.HOST_MODE, "b", "jwt")
                elif isinstance(event, SetupRequested):
                    server.accept_token()
    except ProtocolError:
        assert server.state is ServerState.FAILED
        # A protocol violation is always answered with an error frame.
        wire = server.data_to_send()
        assert ErrorMessage.decode(_last_frame(wire).payload).code == ErrorCode.PROTOCOL


def _last_frame(wire: bytes):  # type: ignore[no-untyped-def]
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoder.feed(wire)
    last = None
    while (frame := decoder.next_frame()) is not None:
        last = frame
    assert last is not None
    return last


text = st.text(max_size=64)
rootfs = st.one_of(
    st.just(RootfsNone()),
    st.builds(RootfsInline, st.integers(min_value=0, max_value=2**64 - 1)),
    st.builds(
        RootfsUrl,
        text,
        st.one_of(st.none(), st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)),
    ),
)


@given(text, rootfs)
def test_setup_request_round_trip(token: str, source) -> None:  # type: ignore[no-untyped-def]
    message = SetupRequest(token, source)
    assert SetupRequest.decode(message.encode()) == message


@given(
    st.integers(min_value=0, max_value=65535),
    st.sampled_from(list(VmState)),
    st.sampled_from(list(RuntimeStatus)),
    st.text(alphabet="0123456789abcdef-", max_size=128),
    text,
)
def test_attestation_round_trip(version, state, status, boot_id, jwt) -> None:  # type: ignore[no-untyped-def]
    message = Attestation(version, state, status, boot_id, jwt)
    assert Attestation.decode(message.encode()) == message


def test_overlong_boot_id_refused() -> None:
    payload = Attestation(2, VmState.READY, RuntimeStatus.SYSTEM_INIT, "b" * 129, "j").encode()
    with pytest.raises(RemoteProtocolError, match="boot id is 129 bytes"):
        Attestation.decode(payload)


@given(st.integers(min_value=0, max_value=65535), text)
def test_error_round_trip(code: int, message: str) -> None:
    assert ErrorMessage.decode(ErrorMessage(code, message).encode()) == ErrorMessage(code, message)


options = st.builds(
    RootfsOptions,
    st.booleans(),
    st.one_of(st.none(), st.integers(min_value=0, max_value=2**32 - 1)),
)


@given(text, rootfs, options)
def test_setup_request_with_options_round_trip(token: str, source, opts) -> None:  # type: ignore[no-untyped-def]
    message = SetupRequest(token, source, opts)
    assert SetupRequest.decode(message.encode()) == message


def test_rootfs_options_are_a_backward_compatible_tail() -> None:
    # Default options add nothing: the request is what clients without options send, and
    # what they send decodes to the defaults.
    legacy = SetupRequest("tok", RootfsInline(5)).encode()
    assert legacy == b"\0\0\0\x03tok" + b"\x01" + (5).to_bytes(8, "big")
    assert SetupRequest("tok", RootfsInline(5), RootfsOptions()).encode() == legacy
    assert SetupRequest.decode(legacy).options == RootfsOptions()
    assert (
        SetupRequest("t", RootfsNone(), RootfsOptions(allow_devices=True)).encode()[-1:] == b"\x01"
    )
    tail = SetupRequest("t", RootfsNone(), RootfsOptions(False, 20)).encode()[-5:]
    assert tail == b"\x02" + (20).to_bytes(4, "big")
    assert SetupRequest.decode(legacy + b"\x03" + (0).to_bytes(4, "big")).options == RootfsOptions(
        True, 0
    )
    with pytest.raises(RemoteProtocolError, match="unknown rootfs option flags 0x04"):
        SetupRequest.decode(legacy + b"\x04")
    with pytest.raises(RemoteProtocolError, match="max expansion ratio truncated"):
        SetupRequest.decode(legacy + b"\x02\0\0")
    with pytest.raises(RemoteProtocolError, match="trailing bytes"):
        SetupRequest.decode(legacy + b"\x01\0")
    with pytest.raises(LocalProtocolError, match="outside"):
        SetupRequest("t", RootfsNone(), RootfsOptions(max_expansion_ratio=2**32)).encode()
    assert "allow_devices=True" in repr(SetupRequest("t", RootfsNone(), RootfsOptions(True)))


def test_setup_complete_notes_are_an_optional_tail() -> None:
    plain = SetupComplete(VmState.READY, RuntimeStatus.FALLBACK_INIT, "boot")
    assert plain.encode() == b"\x01\x02\0\0\0\x04boot"
    noted = SetupComplete(
        VmState.READY, RuntimeStatus.FALLBACK_INIT, "boot", ("created 1 device node", "é")
    )
    assert SetupComplete.decode(noted.encode()) == noted
    assert SetupComplete.decode(plain.encode()).notes == ()
    too_many = plain.encode() + (17).to_bytes(4, "big") + b"\0\0\0\0" * 17
    with pytest.raises(RemoteProtocolError, match="17 notes, more than the 16 allowed"):
        SetupComplete.decode(too_many)
    long = SetupComplete(VmState.READY, RuntimeStatus.FALLBACK_INIT, "b", ("é" * 5000,))
    assert len(SetupComplete.decode(long.encode()).notes[0].encode()) <= 4096


def test_setup_request_repr_hides_token() -> None:
    assert "hunter2" not in repr(SetupRequest("hunter2", RootfsNone()))


def test_error_codes_map_to_exception_classes() -> None:
    from flyvault.errors import AuthError, NotFoundError, VersionMismatch

    assert isinstance(ErrorMessage(ErrorCode.AUTH_FAILED, "x").to_exception(), AuthError)
    assert isinstance(ErrorMessage(ErrorCode.NOT_FOUND, "x").to_exception(), NotFoundError)
    assert isinstance(ErrorMessage(ErrorCode.VERSION_MISMATCH, "x").to_exception(), VersionMismatch)
    assert "code 999" in str(ErrorMessage(999, "odd").to_exception())


# --- control exchange in memory ---------------------------------------------------------


def pump(source, destination) -> None:  # type: ignore[no-untyped-def]
    destination.receive_data(source.data_to_send())


def events(machine) -> list:  # type: ignore[no-untyped-def]
    out = []
    while (event := machine.next_event()) is not None:
        out.append(event)
    return out


def test_full_exchange_with_inline_rootfs() -> None:
    client, server = ControlClient(), ControlServer()
    client.request_attestation()
    pump(client, server)
    assert events(server) == [AttestationRequested(PROTOCOL_VERSION)]
    server.send_attestation(VmState.COLD, RuntimeStatus.NOT_STARTED, "boot-1", "the.jwt")
    pump(server, client)
    [received] = events(client)
    assert isinstance(received, AttestationReceived)
    assert received.attestation.jwt == "the.jwt"
    assert client.state is ClientState.ATTESTED

    client.send_setup(SetupRequest("tok", RootfsInline(10)))
    with pytest.raises(LocalProtocolError):
        client.send_rootfs_chunk(b"early")  # not before the server accepted the token
    pump(client, server)
    [setup] = events(server)
    assert isinstance(setup, SetupRequested)
    assert setup.request.access_token == "tok"
    server.accept_token()
    pump(server, client)
    assert events(client) == [UploadReady()]
    client.send_rootfs_chunk(b"01234")
    client.send_rootfs_chunk(b"56789")
    client.end_rootfs(b"\x11" * 32)
    pump(client, server)
    assert events(server) == [
        RootfsChunkReceived(b"01234"),
        RootfsChunkReceived(b"56789"),
        RootfsUploaded(b"\x11" * 32),
    ]
    server.send_progress(Progress("extracting", 5, 10))
    server.send_setup_complete(SetupComplete(VmState.READY, RuntimeStatus.SYSTEM_INIT, "boot-2"))
    pump(server, client)
    got = events(client)
    assert isinstance(got[0], ProgressReported)
    assert got[1] == SetupCompleted(
        SetupComplete(VmState.READY, RuntimeStatus.SYSTEM_INIT, "boot-2")
    )
    assert client.state is ClientState.COMPLETE


def test_upload_frames_capped_until_token_accepted() -> None:
    server = ControlServer()
    server.receive_data(encode_frame(ControlFrame.REQUEST_ATTESTATION, b"\x00\x02\x00\x02"))
    events(server)
    server.send_attestation(VmState.COLD, RuntimeStatus.NOT_STARTED, "b", "j")
    server.receive_data(
        encode_frame(ControlFrame.SETUP_REQUEST, SetupRequest("t", RootfsInline(10**6)).encode())
    )
    assert len(events(server)) == 1
    # Token not yet accepted: a 100 KiB chunk is over the pre-auth limit.
    server.receive_data(encode_frame(ControlFrame.ROOTFS_CHUNK, b"x" * 100_000))
    assert server.next_event() is None  # paused until the application decides
    server.accept_token()
    with pytest.raises(RemoteProtocolError, match="declares"):
        server.next_event()


def test_version_mismatch_is_refused_with_clear_error() -> None:
    client = ControlClient(min_version=1, max_version=1)
    server = ControlServer()
    client.request_attestation()
    pump(client, server)
    assert events(server) == [VersionRejected(1, 1)]
    pump(server, client)
    [event] = events(client)
    assert isinstance(event, ErrorReceived)
    error = event.error.to_exception()
    assert isinstance(error, VersionMismatch)
    expected = f"client speaks 1..1, server speaks 2..{MAX_PROTOCOL_VERSION}"
    assert expected in error.message


def test_client_refuses_attestation_with_unsupported_version() -> None:
    client = ControlClient()
    client.request_attestation()
    client.receive_data(
        encode_frame(
            ControlFrame.ATTESTATION,
            Attestation(
                MAX_PROTOCOL_VERSION + 1, VmState.READY, RuntimeStatus.SYSTEM_INIT, "b", "j"
            ).encode(),
        )
    )
    with pytest.raises(VersionMismatch, match=f"server={MAX_PROTOCOL_VERSION + 1}"):
        client.next_event()


def test_client_names_a_protocol_1_server() -> None:
    client = ControlClient()
    client.request_attestation()
    client.receive_data(encode_frame(0x05, b"request attestation frame must be empty"))
    with pytest.raises(VersionMismatch, match="original fly-vault protocol 1"):
        client.next_event()


def test_server_answers_unexpected_frame_with_error_frame_without_payload() -> None:
    server = ControlServer()
    server.receive_data(
        encode_frame(ControlFrame.SETUP_REQUEST, SetupRequest("sekrit", RootfsNone()).encode())
    )
    with pytest.raises(RemoteProtocolError, match="expected attestation request, got setup"):
        server.next_event()
    error = ErrorMessage.decode(_last_frame(server.data_to_send()).payload)
    assert error.code == ErrorCode.PROTOCOL
    assert "sekrit" not in error.message


def test_sending_setup_before_attestation_is_a_local_error() -> None:
    client = ControlClient()
    with pytest.raises(LocalProtocolError):
        client.send_setup(SetupRequest("t", RootfsNone()))


def test_upload_longer_than_declared_is_refused_both_sides() -> None:
    client = ControlClient()
    client.request_attestation()
    client.receive_data(
        encode_frame(
            ControlFrame.ATTESTATION,
            Attestation(2, VmState.COLD, RuntimeStatus.NOT_STARTED, "b", "j").encode(),
        )
    )
    events(client)
    client.send_setup(SetupRequest("t", RootfsInline(3)))
    client.receive_data(encode_frame(ControlFrame.UPLOAD_READY))
    assert events(client) == [UploadReady()]
    with pytest.raises(LocalProtocolError, match="exceeds"):
        client.send_rootfs_chunk(b"abcd")


def test_client_sees_early_close_as_error() -> None:
    client = ControlClient()
    client.request_attestation()
    client.receive_eof()
    with pytest.raises(RemoteProtocolError, match="closed the control stream"):
        client.next_event()


def test_server_quiet_when_client_leaves_between_frames() -> None:
    server = ControlServer()
    server.receive_eof()
    assert server.next_event() == StreamEnded()
    assert server.data_to_send() == b""


@given(
    offset=st.integers(0, 2**64 - 1),
    dropped=st.integers(0, 2**64 - 1),
    stdin_offset=st.integers(0, 2**64 - 1),
    pid=st.integers(0, 2**32 - 1),
)
def test_started_and_stdin_ack_round_trip(
    offset: int, dropped: int, stdin_offset: int, pid: int
) -> None:
    from flyvault.protocol.console import (
        Started,
        decode_stdin_ack,
        encode_stdin_ack,
    )

    started = Started("job-1", True, offset, dropped, pid, False, stdin_offset)
    assert Started.decode(started.encode()) == started
    assert decode_stdin_ack(encode_stdin_ack(stdin_offset)) == stdin_offset


def test_truncated_started_and_stdin_ack_are_protocol_errors() -> None:
    from flyvault.protocol.console import Started, decode_stdin_ack, encode_stdin_ack

    encoded = Started("job-1", False, 5, 0, 42, True, 7).encode()
    with pytest.raises(ProtocolError):
        Started.decode(encoded[:-1])  # the stdin offset is required
    with pytest.raises(ProtocolError):
        decode_stdin_ack(encode_stdin_ack(3)[:-2])
    with pytest.raises(ProtocolError):
        decode_stdin_ack(encode_stdin_ack(3) + b"\x00")


def test_a_protocol_2_client_is_still_served_at_version_2() -> None:
    client, server = ControlClient(min_version=2, max_version=2), ControlServer()
    client.request_attestation()
    pump(client, server)
    assert events(server) == [AttestationRequested(2)]
    server.send_attestation(VmState.READY, RuntimeStatus.SYSTEM_INIT, "boot-1", "the.jwt")
    pump(server, client)
    [received] = events(client)
    assert isinstance(received, AttestationReceived)
    assert received.attestation.protocol_version == 2


def test_exited_reason_round_trip_and_absent_in_the_protocol_2_form() -> None:
    from flyvault.protocol.console import Exited

    plain = Exited(None, 1, 42)
    assert plain.encode() == b"\x01\x01" + (42).to_bytes(8, "big")  # what protocol 2 sends
    assert Exited.decode(plain.encode()) == plain
    ended = Exited(None, 1, 42, "the vault is being reprovisioned")
    assert Exited.decode(ended.encode()) == ended
    assert Exited.decode(Exited(0, None, 0, "").encode()).reason == ""
    with pytest.raises(ProtocolError):
        Exited.decode(ended.encode()[:-1])
    with pytest.raises(ProtocolError):
        Exited.decode(ended.encode() + b"\x00")


def test_a_rollback_after_setup_complete_reaches_the_client_on_the_same_stream() -> None:
    """After a provisioning's SETUP_COMPLETE the server may still say that the new
    workload died inside its settle window (an error frame); a clean end says it stayed."""
    from flyvault.errors import ProvisionError
    from flyvault.protocol.control import ErrorReceived, ServerState, StreamEnded

    def answered() -> tuple[ControlClient, ControlServer]:
        client, server = ControlClient(), ControlServer()
        client.request_attestation()
        pump(client, server)
        events(server)
        server.send_attestation(VmState.READY, RuntimeStatus.SYSTEM_INIT, "boot-1", "the.jwt")
        pump(server, client)
        events(client)
        client.send_setup(SetupRequest("tok", RootfsInline(1)))
        pump(client, server)
        events(server)
        with pytest.raises(LocalProtocolError):
            server.send_rolled_back(ProvisionError("too early"))  # only after the answer
        server.accept_token()
        pump(server, client)
        events(client)
        client.send_rootfs_chunk(b"x")
        client.end_rootfs(b"\x11" * 32)
        pump(client, server)
        events(server)
        server.send_setup_complete(SetupComplete(VmState.READY, RuntimeStatus.SYSTEM_INIT, "b2"))
        pump(server, client)
        assert isinstance(events(client)[-1], SetupCompleted)
        return client, server

    client, server = answered()
    server.send_rolled_back(ProvisionError("setup rolled back: its init exited"))
    assert server.state is ServerState.FAILED
    pump(server, client)
    client.receive_eof()
    [error, end] = events(client)
    assert isinstance(error, ErrorReceived)
    assert isinstance(error.error.to_exception(), ProvisionError)
    assert "rolled back" in error.error.message
    assert isinstance(end, StreamEnded)

    client, server = answered()
    client.receive_eof()  # the window passed: the server just ends the stream
    assert events(client) == [StreamEnded()]
    assert client.state is ClientState.COMPLETE
