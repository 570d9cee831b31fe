"""The forward stream's opening machines (flyvault/protocol/forward.py), in memory.

Property tests drive a client and a server machine against each other with the bytes cut
at arbitrary points in both directions; unit tests feed each state the frames it must
refuse. No sockets, no clock: ``now`` is a number the test chooses.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flyvault.errors import (
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    TargetUnreachable,
)
from flyvault.protocol.codec import FrameDecoder, encode_frame
from flyvault.protocol.constants import ERROR_FRAME
from flyvault.protocol.forward import (
    CONNECT_TIMEOUT,
    MAX_OPEN_PAYLOAD,
    OPEN_TIMEOUT,
    REQUEST_TIMEOUT,
    ConnectTimedOut,
    DataReceived,
    ForwardClient,
    ForwardEvent,
    ForwardFrame,
    ForwardOpen,
    ForwardServer,
    Opened,
    OpenRequested,
    OpenTimedOut,
    Refused,
    State,
    StreamEnded,
)
from flyvault.protocol.messages import ErrorMessage


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given positions (taken modulo its length), in order."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _events(machine: ForwardClient | ForwardServer) -> list[ForwardEvent]:
    found = []
    while (event := machine.next_event()) is not None:
        found.append(event)
    return found


def _deliver(
    machine: ForwardClient | ForwardServer, data: bytes, cuts: list[int], *, stop_at: type
) -> tuple[list[ForwardEvent], bytes]:
    """Feed ``data`` in pieces, collecting events, until an event of ``stop_at`` appeared
    (the glue stops reading there). Returns the events and the bytes not fed, which the
    relay reads from the stream itself."""
    events: list[ForwardEvent] = []
    pieces = _cut(data, cuts)
    for index, piece in enumerate(pieces):
        machine.receive_data(piece)
        events += _events(machine)
        if any(isinstance(event, stop_at) for event in events):
            return events, b"".join(pieces[index + 1 :])
    return events, b""


def _raw(events: list[ForwardEvent]) -> bytes:
    return b"".join(event.data for event in events if isinstance(event, DataReceived))


hosts = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=60
).filter(lambda host: len(host.encode()) <= 255)
ports = st.integers(min_value=1, max_value=65535)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


@dataclass
class Run:
    client: ForwardClient
    server: ForwardServer
    client_events: list[ForwardEvent]
    server_events: list[ForwardEvent]


@settings(max_examples=300, deadline=None)
@given(
    host=hosts,
    port=ports,
    pipelined=st.binary(max_size=3000),
    answer=st.binary(max_size=3000),
    peer=st.text(max_size=40),
    up=cuts,
    down=cuts,
)
def test_client_and_server_agree_whatever_the_cuts(
    host: str, port: int, pipelined: bytes, answer: bytes, peer: str, up: list[int], down: list[int]
) -> None:
    client, server = ForwardClient(), ForwardServer(now=0.0)
    client.open(host, port, now=0.0)
    # The client pipelines raw bytes behind OPEN, straight onto the stream.
    upstream = client.data_to_send() + pipelined
    server_events, unread_up = _deliver(server, upstream, up, stop_at=OpenRequested)
    assert server_events[0] == OpenRequested(host, port)
    assert server.state is State.CONNECTING
    server.connecting(now=1.0)
    assert server.next_deadline() == 1.0 + CONNECT_TIMEOUT
    server.accept(peer)
    # What arrived behind OPEN is held until the answer, then handed over once; with what
    # the relay reads itself, the target gets every pipelined byte exactly once, in order.
    held = _raw(server_events[1:] + _events(server))
    assert held + unread_up == pipelined
    downstream = server.data_to_send() + answer
    client_events, unread_down = _deliver(client, downstream, down, stop_at=Opened)
    assert client_events[0] == Opened(peer)
    assert client.state is State.RELAYING and client.next_deadline() is None
    assert _raw(client_events[1:] + _events(client)) + unread_down == answer


@settings(max_examples=200, deadline=None)
@given(
    host=hosts,
    port=ports,
    pipelined=st.binary(max_size=2000),
    reason=st.text(max_size=200),
    up=cuts,
    down=cuts,
)
def test_a_refusal_reaches_the_client_as_its_class(
    host: str, port: int, pipelined: bytes, reason: str, up: list[int], down: list[int]
) -> None:
    client, server = ForwardClient(), ForwardServer(now=0.0)
    client.open(host, port, now=0.0)
    _deliver(server, client.data_to_send() + pipelined, up, stop_at=OpenRequested)
    server.connecting(now=0.0)
    server.refuse(TargetUnreachable(f"cannot connect to x: {reason}"))
    assert server.state is State.REFUSED and server.next_deadline() is None
    events, _ = _deliver(client, server.data_to_send(), down, stop_at=Refused)
    assert len(events) == 1 and isinstance(events[0], Refused)
    exc = events[0].error.to_exception()
    assert type(exc) is TargetUnreachable
    assert exc.message == f"cannot connect to x: {reason}"
    assert client.state is State.REFUSED


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4000), more=st.binary(max_size=100), pieces=cuts)
def test_after_the_opening_bytes_and_the_end_pass_through(
    data: bytes, more: bytes, pieces: list[int]
) -> None:
    client = ForwardClient()
    client.open("h", 1, now=0.0)
    client.receive_data(encode_frame(ForwardFrame.OPENED, b"1.2.3.4:1"))
    assert _events(client) == [Opened("1.2.3.4:1")]
    received = []
    for piece in _cut(data + more, pieces):
        client.receive_data(piece)
        received += _events(client)
    client.receive_eof()
    received += _events(client)
    assert _raw(received) == data + more
    assert received[-1] == StreamEnded()
    assert client.next_event() is None  # reported once


# Deadlines ---------------------------------------------------------------------------------


def test_client_deadline_is_data_and_fires_once() -> None:
    client = ForwardClient()
    assert client.next_deadline() is None
    client.open("h", 1, now=100.0)
    assert client.next_deadline() == 100.0 + OPEN_TIMEOUT
    client.handle_timer(100.0 + OPEN_TIMEOUT - 0.001)
    assert client.next_event() is None and client.state is State.AWAIT_OPENED
    client.handle_timer(100.0 + OPEN_TIMEOUT)
    assert client.next_event() == OpenTimedOut(OPEN_TIMEOUT)
    assert client.state is State.TIMED_OUT and client.next_deadline() is None
    client.handle_timer(1e9)
    assert client.next_event() is None


def test_server_without_open_times_out_with_a_protocol_error() -> None:
    server = ForwardServer(now=5.0)
    assert server.next_deadline() == 5.0 + REQUEST_TIMEOUT
    server.receive_data(b"\x01\x00")  # half a header: still waiting
    assert server.next_event() is None
    server.handle_timer(5.0 + REQUEST_TIMEOUT)
    assert server.next_event() == OpenTimedOut(REQUEST_TIMEOUT)
    error = _error(server.data_to_send())
    assert (error.code, error.message) == (ErrorCode.PROTOCOL, "no forward OPEN within 10 s")
    assert server.state is State.FAILED


def test_server_connect_deadline_refuses_with_connect_failed() -> None:
    server = ForwardServer(now=0.0)
    server.receive_data(_open("db", 5432))
    assert server.next_event() == OpenRequested("db", 5432)
    assert server.next_deadline() is None  # until the connect starts
    server.connecting(now=3.0)
    server.handle_timer(3.0 + CONNECT_TIMEOUT)
    assert server.next_event() == ConnectTimedOut(CONNECT_TIMEOUT)
    error = _error(server.data_to_send())
    assert error.code == ErrorCode.CONNECT_FAILED
    assert error.message == "cannot connect to db:5432: timed out after 10 s"
    assert server.state is State.REFUSED


# Illegal input per state ---------------------------------------------------------------


def _open(host: str, port: int) -> bytes:
    return encode_frame(ForwardFrame.OPEN, ForwardOpen(host, port).encode())


def _error(data: bytes) -> ErrorMessage:
    decoder = FrameDecoder(1 << 20)
    decoder.feed(data)
    frame = decoder.next_frame()
    assert frame is not None and frame.type == ERROR_FRAME
    assert decoder.next_frame() is None
    return ErrorMessage.decode(frame.payload)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (
            encode_frame(ForwardFrame.OPENED, b"x"),
            "expected a forward OPEN frame, got frame type 0x11",
        ),
        (encode_frame(ERROR_FRAME, b""), "expected a forward OPEN frame, got frame type 0xff"),
        (encode_frame(ForwardFrame.OPEN, b"\x00\x00\x00\x00\x00\x01"), "forward open: empty host"),
        (
            encode_frame(ForwardFrame.OPEN, ForwardOpen("h", 1).encode()[:-2] + b"\x00\x00"),
            "forward open: port 0",
        ),
        (
            encode_frame(ForwardFrame.OPEN, ForwardOpen("h", 1).encode() + b"!"),
            "forward open has 1 trailing bytes",
        ),
        (
            encode_frame(ForwardFrame.OPEN, b"\x00\x00\x01\x00" + b"h" * 256 + b"\x00\x01"),
            "host is 256 bytes",
        ),
        (
            bytes((ForwardFrame.OPEN,)) + (MAX_OPEN_PAYLOAD + 1).to_bytes(4, "big"),
            "declares 1025 bytes",
        ),
    ],
)
def test_server_refuses_a_bad_first_frame(wire: bytes, message: str) -> None:
    server = ForwardServer(now=0.0)
    server.receive_data(wire + b"raw bytes that must never be parsed")
    with pytest.raises(RemoteProtocolError, match=message):
        server.next_event()
    assert server.state is State.FAILED and server.next_deadline() is None
    error = _error(server.data_to_send())
    assert error.code == ErrorCode.PROTOCOL and message in error.message
    assert error.message.startswith("forward stream: ")
    assert server.next_event() is None


@pytest.mark.parametrize("sent", [b"", b"\x01\x00\x00", _open("h", 1)[:-1]])
def test_server_refuses_an_end_before_open(sent: bytes) -> None:
    server = ForwardServer(now=0.0)
    server.receive_data(sent)
    server.receive_eof()
    with pytest.raises(RemoteProtocolError, match=f"ended after {len(sent)} bytes"):
        server.next_event()
    assert _error(server.data_to_send()).code == ErrorCode.PROTOCOL


def test_server_commands_in_the_wrong_state() -> None:
    server = ForwardServer(now=0.0)
    with pytest.raises(LocalProtocolError):
        server.accept("x")
    with pytest.raises(LocalProtocolError):
        server.connecting(0.0)
    server.receive_data(_open("h", 1) + b"held")
    assert server.next_event() == OpenRequested("h", 1)
    assert server.next_event() is None  # held while connecting
    server.accept("peer")
    assert _events(server) == [DataReceived(b"held")]
    with pytest.raises(LocalProtocolError):
        server.accept("again")
    with pytest.raises(LocalProtocolError):
        server.refuse(TargetUnreachable("too late"))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (
            encode_frame(ForwardFrame.OPEN, b""),
            "expected OPENED on the forward stream, got frame type 0x01",
        ),
        (encode_frame(0x42, b""), "got frame type 0x42"),
        (encode_frame(ERROR_FRAME, b"\x00"), "error frame: code truncated"),
        (
            bytes((ForwardFrame.OPENED,)) + (64 * 1024 + 1).to_bytes(4, "big"),
            "declares 65537 bytes",
        ),
    ],
)
def test_client_refuses_a_bad_answer(wire: bytes, message: str) -> None:
    client = ForwardClient()
    client.open("h", 1, now=0.0)
    client.data_to_send()
    client.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=message):
        client.next_event()
    assert client.state is State.FAILED and client.next_deadline() is None
    assert client.data_to_send() == b""  # the client never sends an error frame


def test_client_end_before_answer_and_commands_in_the_wrong_state() -> None:
    client = ForwardClient()
    client.handle_timer(1e9)  # nothing is timed before OPEN
    assert client.next_event() is None and client.state is State.IDLE
    client.open("h", 1, 0.0)
    with pytest.raises(LocalProtocolError):
        client.open("h", 1, 0.0)
    other = ForwardClient()
    other.open("h", 1, now=0.0)
    other.receive_eof()
    with pytest.raises(RemoteProtocolError, match="ended after 0 bytes, before its first frame"):
        other.next_event()
    with pytest.raises(LocalProtocolError):
        other.receive_data(b"after the end")
