"""The exec/console session machines, driven against each other in memory.

Property tests: a client machine (``ExecClient``) and server machines (``ExecServer``, one per
stream) exchange bytes through in-memory pipes that hypothesis cuts at arbitrary points,
delivers in arbitrary pieces, interleaves in both directions, and kills (a reconnect: a new
stream that replays from the client's offset, the old server machine either noticing or
left as a zombie that later gets displaced and sees late bytes). The model session keeps
the whole output log and every input byte taken; at every step the client's output must be a
prefix of the log and the session's input a prefix of what the client sent (nothing doubled,
nothing reordered), and at the end both are complete, the exit seen once and acknowledged.

Unit tests: the state tables (a frame a state does not accept is a clear protocol error),
deadlines, displacement and drop notices.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flyvault.errors import LocalProtocolError, RemoteProtocolError, Unsupported
from flyvault.protocol.codec import FrameDecoder, encode_frame
from flyvault.protocol.console import (
    ConsoleFrame,
    Exited,
    OpenSession,
    Started,
    decode_stdin_ack,
    encode_stdin_ack,
)
from flyvault.protocol.constants import ERROR_FRAME, ErrorCode
from flyvault.protocol.exec_client import CLIENT_ACCEPTS, ClientState, ExecClient
from flyvault.protocol.exec_server import SERVER_ACCEPTS, ExecServer, ServerState
from flyvault.protocol.exec_session import (
    ACK_TIMEOUT,
    EXIT_ACK_DELIVERY,
    OPEN_TIMEOUT,
    ClientDetached,
    ErrorReceived,
    ExitAcknowledged,
    ExitAckTimedOut,
    ExitDelivered,
    ExitDeliveryTimedOut,
    OpenTimedOut,
    OutputChannel,
    OutputReceived,
    ResizeRequested,
    SessionDisplaced,
    SessionExited,
    SessionOpenRequested,
    SessionStarted,
    SignalRequested,
    StdinClosed,
    StdinReceived,
    StreamClosedBeforeOpen,
    StreamEndedEarly,
)
from flyvault.protocol.messages import ErrorMessage

# The in-memory world ---------------------------------------------------------------------


@dataclass
class Model:
    """The vault's session: its whole output log and the input it has taken."""

    log: bytearray = field(default_factory=bytearray)
    stdin: bytearray = field(default_factory=bytearray)
    eof_seen: bool = False
    exit: Exited | None = None
    acknowledged: int = 0
    created: int = 0


@dataclass
class Stream:
    """One console stream: bytes written but not yet delivered, per direction."""

    server: ExecServer
    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)


class World:
    def __init__(self, request: OpenSession) -> None:
        self.model = Model()
        self.client = ExecClient(request)
        self.sent_stdin = bytearray()  # what the application gave the client
        self.stdin_closed = False
        self.output = bytearray()  # what the client application got
        self.exits: list[Exited] = []
        self.now = 0.0
        self.stream: Stream | None = None
        self.zombies: list[Stream] = []  # streams the server has not noticed are dead
        self.streams = 0
        self.resent = False  # some input crossed the wire twice (the second copy applied)
        self.recreated = 0  # the first OPEN was lost and sent again
        self.reopen = False

    # The client side ----------------------------------------------------------------------

    def open(self) -> None:
        self.streams += 1
        stream = Stream(ExecServer(self.now))
        stream.to_server += self.client.open_stream()
        self.stream = stream

    def client_write(self) -> None:
        if self.stream is not None:
            self.stream.to_server += self.client.data_to_send()

    def send_stdin(self, data: bytes) -> None:
        if self.stdin_closed or self.client.state in (
            ClientState.EXITED,
            ClientState.DELIVERING,
            ClientState.DONE,
        ):
            return
        self.client.send_stdin(data)
        self.sent_stdin += data
        self.client_write()

    def deliver_to_client(self, size: int) -> None:
        stream = self.stream
        if stream is None:
            return
        chunk = bytes(stream.to_client[:size])
        del stream.to_client[:size]
        self.client.receive_data(chunk)
        while (event := self.client.next_event()) is not None:
            self.on_client_event(event)
        if self.reopen:
            self.reopen = False
            self.open()
        self.client_write()

    def on_client_event(self, event: object) -> None:
        if isinstance(event, OutputReceived):
            assert event.offset == len(self.output), "output offset out of step"
            self.output += event.data
            assert self.output == self.model.log[: len(self.output)], "output not exact"
        elif isinstance(event, SessionStarted):
            assert event.started.offset == len(self.output)
            self.resent = self.resent or (
                event.resumed and event.started.stdin_offset < len(self.sent_stdin)
            )
        elif isinstance(event, SessionExited):
            self.exits.append(event.exited)
            self.client.acknowledge_exit(self.now)
        elif isinstance(event, ErrorReceived) and self.client.may_recreate:
            # The first OPEN was lost with its stream: the client creates the session again.
            self.client.recreate()
            self.recreated += 1
            self.reopen = True
        elif not isinstance(event, (ExitDelivered,)):
            assert not isinstance(event, (ErrorReceived, SessionDisplaced, StreamEndedEarly)), event

    # The server side ----------------------------------------------------------------------

    def deliver_to_server(self, stream: Stream, size: int) -> None:
        chunk = bytes(stream.to_server[:size])
        del stream.to_server[:size]
        stream.server.receive_data(chunk)
        self.serve(stream)

    def serve(self, stream: Stream) -> None:
        server = stream.server
        while (event := server.next_event()) is not None:
            if isinstance(event, SessionOpenRequested):
                self.attach(stream, event.request)
            elif isinstance(event, StdinReceived):
                assert event.offset == len(self.model.stdin), "stdin offset out of step"
                self.model.stdin += event.data
                assert self.model.stdin == self.sent_stdin[: len(self.model.stdin)], "stdin"
            elif isinstance(event, StdinClosed):
                self.model.eof_seen = True
            elif isinstance(event, ExitAcknowledged):
                self.model.acknowledged += 1
        stream.to_client += server.data_to_send()

    def attach(self, stream: Stream, request: OpenSession) -> None:
        for zombie in self.zombies:
            if zombie.server.attached:  # another attach displaces the old one
                zombie.server.displace("another client attached to this session")
                zombie.to_client += zombie.server.data_to_send()
        if not request.create and not self.model.created:
            # What the vault answers a reattach to a session it never got.
            stream.server.refuse(ErrorCode.NOT_FOUND, "exec session s not found")
            return
        self.model.created += request.create
        start = min(request.resume_offset, len(self.model.log))
        stream.server.start(
            Started("s", request.create, start, 0, 42, False, len(self.model.stdin))
        )

    def pump_output(self, stream: Stream, chunk: int) -> None:
        server = stream.server
        if server.state is not ServerState.ATTACHED:
            return
        while server.output_offset < len(self.model.log):
            offset = server.output_offset
            data = bytes(self.model.log[offset : offset + chunk])
            channel = OutputChannel.STDERR if offset % 3 == 0 else OutputChannel.STDOUT
            server.send_output(channel, data)
        if self.model.exit is not None:
            server.send_exited(self.model.exit, self.now)
        stream.to_client += server.data_to_send()

    # Faults -------------------------------------------------------------------------------

    def cut(self, delivered_to_server: int, noticed: bool) -> None:
        """The connection dies with part of what was in flight delivered; the client
        reconnects on a new stream."""
        stream = self.stream
        assert stream is not None
        self.deliver_to_server(stream, delivered_to_server)
        stream.to_client.clear()  # the rest never arrives
        self.client.stream_lost()
        if noticed or stream.server.state is ServerState.AWAIT_OPEN:
            # (A dead stream's OPEN arriving after the reconnect would be a new attach.)
            stream.to_server.clear()
        else:
            self.zombies.append(stream)
        self.stream = None
        self.open()


_cut = st.tuples(st.just("cut"), st.tuples(st.integers(0, 400), st.booleans()))
actions = st.one_of(
    st.tuples(st.just("output"), st.binary(min_size=1, max_size=300)),
    st.tuples(st.just("stdin"), st.binary(min_size=1, max_size=300)),
    _cut,  # listed twice: reconnects are what the machines are for
    st.tuples(st.just("to_server"), st.integers(0, 400)),
    st.tuples(st.just("to_client"), st.integers(0, 400)),
    st.tuples(st.just("pump"), st.integers(1, 200)),
    st.tuples(st.just("cut"), st.tuples(st.integers(0, 400), st.booleans())),
    st.tuples(st.just("zombie"), st.integers(0, 400)),
    st.tuples(st.just("resize"), st.integers(1, 300)),
    st.tuples(st.just("close_stdin"), st.none()),
)


def step(world: World, action: tuple[str, object]) -> None:
    kind, value = action
    stream = world.stream
    assert stream is not None
    if kind == "output" and world.model.exit is None:
        assert isinstance(value, bytes)
        world.model.log += value
    elif kind == "stdin":
        assert isinstance(value, bytes)
        world.send_stdin(value)
    elif kind == "to_server":
        assert isinstance(value, int)
        world.deliver_to_server(stream, value)
    elif kind == "to_client":
        assert isinstance(value, int)
        world.deliver_to_client(value)
    elif kind == "pump":
        assert isinstance(value, int)
        world.pump_output(stream, value)
    elif kind == "cut" and world.client.state in (ClientState.OPENING, ClientState.ATTACHED):
        assert isinstance(value, tuple)
        # A first OPEN lost with its stream (partly delivered, or not at all) gets "not
        # found" on the reattach, and the client creates the session again.
        world.cut(*value)
    elif kind == "zombie" and world.zombies:
        # A late piece of a dead stream reaches the server, after the reconnect: a displaced
        # attachment must apply none of it.
        assert isinstance(value, int)
        zombie = world.zombies[0]
        before = bytes(world.model.stdin)
        world.deliver_to_server(zombie, value)
        if zombie.server.state is ServerState.DISPLACED:
            assert bytes(world.model.stdin) == before
    elif kind == "resize" and world.client.state not in (ClientState.EXITED, ClientState.DONE):
        assert isinstance(value, int)
        world.client.resize(value, value)
        world.client_write()
    elif kind == "close_stdin":
        world.stdin_closed = True
        world.client.close_stdin()
        world.client_write()
    world.now += 0.01


def finish(world: World) -> None:
    """No more faults: run until the session exited, was acknowledged and delivered."""
    world.client.close_stdin()
    world.client_write()
    for _ in range(10_000):  # bounded: each round moves every byte in flight
        stream = world.stream
        assert stream is not None
        if world.model.eof_seen and world.model.exit is None:
            world.model.exit = Exited(0, None, len(world.model.log))
        world.pump_output(stream, 128)
        world.deliver_to_client(len(stream.to_client))
        world.deliver_to_server(stream, len(stream.to_server))
        if world.client.state is ClientState.DELIVERING and not stream.to_server:
            world.client.delivery_confirmed()
        if world.client.state is ClientState.DONE and not stream.to_server:
            return
    raise AssertionError(f"did not finish: client {world.client.state}")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(actions, max_size=60), st.booleans())
def test_output_and_input_arrive_exactly_once_in_order_across_cuts(
    script: list[tuple[str, object]], pty: bool
) -> None:
    world = World(OpenSession("s", ("cat",), pty=pty, rows=24, cols=80))
    world.open()
    for action in script:
        step(world, action)
    finish(world)
    event(f"reconnects: {min(world.streams - 1, 3)}{'+' if world.streams > 4 else ''}")
    event(
        f"zombie displaced: {any(z.server.state is ServerState.DISPLACED for z in world.zombies)}"
    )
    event(f"input resent: {world.resent}")
    event(f"first OPEN lost and sent again: {world.recreated > 0}")
    assert world.output == world.model.log
    assert world.model.stdin == world.sent_stdin
    assert world.model.eof_seen
    assert len(world.exits) == 1 and world.exits[0].total_bytes == len(world.model.log)
    assert world.model.acknowledged == 1
    assert world.model.created == 1, "a reattach must never create the session again"
    assert world.client.stdin_unacknowledged == 0 or world.client.state is ClientState.DONE


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=2000), st.lists(st.integers(1, 50), max_size=40))
def test_any_cut_points_of_the_byte_stream_decode_the_same(output: bytes, cuts: list[int]) -> None:
    """The client's events do not depend on how the stream is cut into reads."""
    server = ExecServer(0.0)
    server.receive_data(encode_frame(ConsoleFrame.OPEN, OpenSession("s", ("x",)).encode()))
    assert isinstance(server.next_event(), SessionOpenRequested)
    server.start(Started("s", True, 0, 0, 1, False, 0))
    for start in range(0, len(output), 97):
        server.send_output(OutputChannel.STDOUT, output[start : start + 97])
    server.send_exited(Exited(3, None, len(output)), 0.0)
    wire = server.data_to_send()
    client = ExecClient(OpenSession("s", ("x",)))
    client.open_stream()
    got = bytearray()
    exits = []
    position = 0
    for size in [*cuts, len(wire)]:
        client.receive_data(wire[position : position + size])
        position += size
        while (event := client.next_event()) is not None:
            if isinstance(event, OutputReceived):
                got += event.data
            elif isinstance(event, SessionExited):
                exits.append(event.exited)
    assert bytes(got) == output
    assert [e.code for e in exits] == [3]


# State tables ----------------------------------------------------------------------------

_ALL_CLIENT_FRAMES = [f for f in ConsoleFrame if f < 0x10]
_ALL_SERVER_FRAMES = [f for f in ConsoleFrame if f >= 0x10]


def _attached_client() -> ExecClient:
    client = ExecClient(OpenSession("s", ("x",)))
    client.open_stream()
    client.receive_data(
        encode_frame(ConsoleFrame.STARTED, Started("s", True, 0, 0, 1, False, 0).encode())
    )
    assert isinstance(client.next_event(), SessionStarted)
    return client


def _attached_server() -> ExecServer:
    server = ExecServer(0.0)
    server.receive_data(encode_frame(ConsoleFrame.OPEN, OpenSession("s", ("x",)).encode()))
    assert isinstance(server.next_event(), SessionOpenRequested)
    server.start(Started("s", True, 0, 0, 1, False, 0))
    server.data_to_send()
    return server


@pytest.mark.parametrize("kind", _ALL_CLIENT_FRAMES)
def test_a_server_frame_type_from_the_client_is_refused_by_name(kind: ConsoleFrame) -> None:
    client = _attached_client()
    with pytest.raises(RemoteProtocolError, match=r"unexpected .* frame from the server in state"):
        client.receive_data(encode_frame(kind, b""))
        client.next_event()
    assert client.state is ClientState.FAILED


def test_client_refuses_output_before_started() -> None:
    client = ExecClient(OpenSession("s", ("x",)))
    client.open_stream()
    client.receive_data(encode_frame(ConsoleFrame.STDOUT, b"early"))
    with pytest.raises(
        RemoteProtocolError, match="unexpected stdout frame from the server in state 'opening'"
    ):
        client.next_event()


def test_client_refuses_a_replay_from_before_its_offset() -> None:
    client = _attached_client()
    client.receive_data(encode_frame(ConsoleFrame.STDOUT, b"abc"))
    client.next_event()
    client.stream_lost()
    client.open_stream()
    client.receive_data(
        encode_frame(ConsoleFrame.STARTED, Started("s", False, 1, 0, 1, False, 0).encode())
    )
    with pytest.raises(RemoteProtocolError, match="server replays from 1, before our offset 3"):
        client.next_event()


def test_client_refuses_an_impossible_stdin_ack() -> None:
    client = _attached_client()
    client.send_stdin(b"abcd")
    client.receive_data(encode_frame(ConsoleFrame.STDIN_ACK, encode_stdin_ack(9)))
    with pytest.raises(RemoteProtocolError, match="acknowledges 9 bytes of input; 0 to 4"):
        client.next_event()


@pytest.mark.parametrize("kind", _ALL_SERVER_FRAMES)
def test_a_client_frame_type_from_the_server_is_refused_with_an_error_frame(
    kind: ConsoleFrame,
) -> None:
    server = _attached_server()
    server.receive_data(encode_frame(kind, b""))
    with pytest.raises(RemoteProtocolError, match=r"unexpected .* frame from the client in state"):
        server.next_event()
    assert server.state is ServerState.FAILED and server.sending_finished
    error = _frames(server.data_to_send())[-1]
    assert error[0] == ERROR_FRAME
    assert ErrorMessage.decode(error[1]).code == ErrorCode.PROTOCOL


def test_server_wants_open_first_and_exit_ack_only_after_exited() -> None:
    server = ExecServer(0.0)
    server.receive_data(encode_frame(ConsoleFrame.STDIN, b"x"))
    with pytest.raises(
        RemoteProtocolError, match="unexpected stdin frame from the client in state 'await open'"
    ):
        server.next_event()
    early = _attached_server()
    early.receive_data(encode_frame(ConsoleFrame.EXIT_ACK))
    with pytest.raises(RemoteProtocolError, match=r"unexpected exit ack frame .* 'attached'"):
        early.next_event()


def test_every_state_has_a_table_row() -> None:
    assert set(CLIENT_ACCEPTS) == set(ClientState)
    assert ConsoleFrame.OPEN in SERVER_ACCEPTS[ServerState.AWAIT_OPEN]
    assert ServerState.OPENING not in SERVER_ACCEPTS  # paused until start() or refuse()


def test_commands_in_the_wrong_state_are_local_errors() -> None:
    server = ExecServer(0.0)
    with pytest.raises(LocalProtocolError, match="cannot send output in state 'await open'"):
        server.send_output(OutputChannel.STDOUT, b"x")
    attached = _attached_server()
    attached.send_output(OutputChannel.STDOUT, b"abc")
    with pytest.raises(LocalProtocolError, match="cannot send the exit at output offset 3"):
        attached.send_exited(Exited(0, None, 5), 0.0)
    client = ExecClient(OpenSession("s", ("x",)))
    with pytest.raises(LocalProtocolError, match="cannot acknowledge an exit in state 'idle'"):
        client.acknowledge_exit(0.0)


# Deadlines, displacement, notices --------------------------------------------------------


def test_server_open_deadline_refuses_with_an_error_frame() -> None:
    server = ExecServer(100.0)
    assert server.next_deadline() == 100.0 + OPEN_TIMEOUT
    server.handle_timer(100.0 + OPEN_TIMEOUT - 0.001)
    assert server.next_event() is None
    server.handle_timer(100.0 + OPEN_TIMEOUT)
    assert isinstance(server.next_event(), OpenTimedOut)
    kind, payload = _frames(server.data_to_send())[0]
    assert (
        kind == ERROR_FRAME
        and "no console open frame within 10 s" in ErrorMessage.decode(payload).message
    )
    assert server.next_deadline() is None


def test_server_ack_deadline_and_pipelined_input_after_exit() -> None:
    server = _attached_server()
    server.send_exited(Exited(0, None, 0), 5.0)
    assert server.next_deadline() == 5.0 + ACK_TIMEOUT
    server.receive_data(encode_frame(ConsoleFrame.STDIN, b"late"))
    assert server.next_event() == StdinReceived(b"late", 0)
    assert server.next_event() is None  # idle: queues the acknowledgement
    assert _frames(server.data_to_send())[-1] == (ConsoleFrame.STDIN_ACK, encode_stdin_ack(4))
    server.handle_timer(5.0 + ACK_TIMEOUT)
    assert isinstance(server.next_event(), ExitAckTimedOut)
    assert server.state is ServerState.CLOSED


def test_server_reports_close_before_open_and_detach() -> None:
    server = ExecServer(0.0)
    server.receive_eof()
    assert isinstance(server.next_event(), StreamClosedBeforeOpen)
    attached = _attached_server()
    attached.receive_data(
        encode_frame(ConsoleFrame.RESIZE, b"\x00\x18\x00\x50")
        + encode_frame(ConsoleFrame.SIGNAL, b"\x02")
    )
    attached.receive_eof()
    assert attached.next_event() == ResizeRequested(24, 80)
    assert attached.next_event() == SignalRequested(2)
    assert isinstance(attached.next_event(), ClientDetached)


def test_server_pauses_after_open_until_started() -> None:
    server = ExecServer(0.0)
    server.receive_data(
        encode_frame(ConsoleFrame.OPEN, OpenSession("s").encode())
        + encode_frame(ConsoleFrame.RESIZE, b"\x00\x18\x00\x50")
    )
    assert isinstance(server.next_event(), SessionOpenRequested)
    assert server.next_event() is None  # the resize waits for the session
    server.start(Started("s", False, 0, 0, 1, True, 0))
    assert server.next_event() == ResizeRequested(24, 80)


def test_displaced_client_is_told_and_the_server_applies_nothing_more() -> None:
    server = _attached_server()
    server.displace("another client attached to this session")
    server.receive_data(encode_frame(ConsoleFrame.STDIN, b"stale"))
    assert server.next_event() is None
    assert server.sending_finished
    client = _attached_client()
    client.receive_data(server.data_to_send())
    event = client.next_event()
    assert event == SessionDisplaced("another client attached to this session")
    assert client.state is ClientState.DISPLACED
    with pytest.raises(LocalProtocolError):
        client.open_stream()  # a displaced client does not come back by itself


def test_drop_notice_moves_the_offset_forward_only() -> None:
    server = _attached_server()
    server.send_output(OutputChannel.STDOUT, b"ab")
    server.send_resume_notice(Started("s", False, 10, 8, 1, False, 0))
    server.send_output(OutputChannel.STDERR, b"z")
    with pytest.raises(LocalProtocolError, match="cannot resume at 4, before offset 11"):
        server.send_resume_notice(Started("s", False, 4, 0, 1, False, 0))
    client = _attached_client()
    client.receive_data(server.data_to_send())
    events = [client.next_event() for _ in range(3)]
    assert isinstance(events[1], SessionStarted) and events[1].started.dropped == 8
    assert not events[1].first_attach and not events[1].resumed
    assert events[2] == OutputReceived(OutputChannel.STDERR, b"z", 10)
    assert client.output_offset == 11


def test_client_exit_delivery_deadline() -> None:
    client = _attached_client()
    client.send_stdin(b"unread")
    client.receive_data(encode_frame(ConsoleFrame.EXITED, Exited(0, None, 0).encode()))
    assert isinstance(client.next_event(), SessionExited)
    client.acknowledge_exit(50.0)
    assert client.state is ClientState.DELIVERING
    assert _frames(client.data_to_send())[-1] == (ConsoleFrame.EXIT_ACK, b"")
    assert client.next_deadline() == 50.0 + EXIT_ACK_DELIVERY
    client.handle_timer(50.0 + EXIT_ACK_DELIVERY)
    assert isinstance(client.next_event(), ExitDeliveryTimedOut)
    assert client.state is ClientState.DONE and client.next_deadline() is None


def test_client_without_unacknowledged_input_is_done_at_once() -> None:
    client = _attached_client()
    client.receive_data(encode_frame(ConsoleFrame.EXITED, Exited(None, 9, 0).encode()))
    assert isinstance(client.next_event(), SessionExited)
    client.acknowledge_exit(0.0)
    assert client.state is ClientState.DONE and client.next_deadline() is None


def test_client_reattach_opens_never_create_and_carry_resizes_and_signals() -> None:
    client = ExecClient(OpenSession("s", ("make",), pty=True, rows=24, cols=80, keep=True))
    first = _frames(client.open_stream())
    assert OpenSession.decode(first[0][1]).argv == ("make",)
    client.stream_lost()
    client.resize(50, 132)
    client.signal(2)
    opened = _frames(client.open_stream())
    request = OpenSession.decode(opened[0][1])
    assert request.argv is None and (request.rows, request.cols) == (50, 132) and request.keep
    assert [kind for kind, _ in opened[1:]] == [ConsoleFrame.RESIZE, ConsoleFrame.SIGNAL]
    # Written but lost with the stream: carried over too; input is not (it is resent).
    client.receive_data(
        encode_frame(ConsoleFrame.STARTED, Started("s", False, 0, 0, 1, True, 0).encode())
    )
    client.next_event()
    client.signal(15)
    client.send_stdin(b"x")
    client.stream_lost(client.data_to_send())
    assert [kind for kind, _ in _frames(client.open_stream())[1:]] == [ConsoleFrame.SIGNAL]


def test_a_lost_first_open_is_sent_again_when_the_reattach_finds_nothing() -> None:
    """The stream died with the creating OPEN in flight: the reattach gets NOT_FOUND before
    any STARTED, so the client creates the session again (same id, same command, input)."""
    client = ExecClient(OpenSession("s", ("make",), keep=True))
    client.open_stream()
    client.send_stdin(b"input")
    client.stream_lost(client.data_to_send())
    assert OpenSession.decode(_frames(client.open_stream())[0][1]).argv is None
    assert not client.may_recreate
    client.receive_data(
        encode_frame(ERROR_FRAME, ErrorMessage(ErrorCode.NOT_FOUND, "gone").encode())
    )
    assert isinstance(client.next_event(), ErrorReceived)
    assert client.may_recreate
    client.recreate()
    again = _frames(client.open_stream())
    assert OpenSession.decode(again[0][1]).argv == ("make",)
    # The session's first STARTED takes all input held so far, as on a first attach.
    client.receive_data(
        encode_frame(ConsoleFrame.STARTED, Started("s", True, 0, 0, 1, False, 0).encode())
    )
    client.next_event()
    assert b"input" in client.data_to_send()


def test_no_second_creation_once_the_session_was_seen_or_for_other_errors() -> None:
    seen = _attached_client()
    seen.stream_lost()
    seen.open_stream()
    seen.receive_data(encode_frame(ERROR_FRAME, ErrorMessage(ErrorCode.NOT_FOUND, "gone").encode()))
    seen.next_event()
    assert not seen.may_recreate  # it ran: creating it again could run the command twice
    with pytest.raises(LocalProtocolError):
        seen.recreate()
    other = ExecClient(OpenSession("s", ("make",), keep=True))
    other.open_stream()
    other.stream_lost()
    other.open_stream()
    other.receive_data(encode_frame(ERROR_FRAME, ErrorMessage(ErrorCode.BUSY, "full").encode()))
    other.next_event()
    assert not other.may_recreate
    # Asked to reattach to an id the vault does not know: "not found" is the answer.
    plain = ExecClient(OpenSession("s", None))
    plain.open_stream()
    plain.receive_data(encode_frame(ERROR_FRAME, ErrorMessage(ErrorCode.NOT_FOUND, "no").encode()))
    plain.next_event()
    assert not plain.may_recreate


def test_client_stream_ended_early_then_resends_input_from_the_session_offset() -> None:
    client = _attached_client()
    client.send_stdin(b"hello world")
    client.data_to_send()
    client.receive_eof()
    assert isinstance(client.next_event(), StreamEndedEarly)
    client.open_stream()
    client.receive_data(
        encode_frame(ConsoleFrame.STARTED, Started("s", False, 0, 0, 1, False, 6).encode())
    )
    client.next_event()
    assert _frames(client.data_to_send()) == [(ConsoleFrame.STDIN, b"world")]
    client.receive_data(encode_frame(ConsoleFrame.STDIN_ACK, encode_stdin_ack(11)))
    client.next_event()
    assert client.stdin_unacknowledged == 0
    assert decode_stdin_ack(encode_stdin_ack(11)) == 11


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    decoder = FrameDecoder(1 << 20)
    decoder.feed(data)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append((frame.type, frame.payload))
    return out


# The glue services the machines' deadlines with an injected clock -------------------------


class _SilentStream:
    """A console stream whose client never sends anything."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.ended = False

    async def read(self, max_bytes: int = 0) -> bytes:
        await asyncio.Event().wait()  # never: only the deadline can end the wait
        return b""

    def write(self, data: bytes, end_stream: bool = False) -> None:
        self.written += data
        self.ended = self.ended or end_stream


def test_server_glue_refuses_a_silent_stream_at_the_machines_deadline() -> None:
    from flyvault.server.console import handle_console

    times = iter([0.0, OPEN_TIMEOUT + 1.0, OPEN_TIMEOUT + 1.0])
    stream = _SilentStream()

    async def scenario() -> None:
        await asyncio.wait_for(
            handle_console(None, stream, b"", clock=lambda: next(times)),  # type: ignore[arg-type]
            5.0,  # a guard only: the injected clock makes the deadline pass at once
        )

    asyncio.run(scenario())
    assert stream.ended
    kind, payload = _frames(bytes(stream.written))[0]
    assert kind == ERROR_FRAME
    assert ErrorMessage.decode(payload).message == "no console open frame within 10 s"


class _ScriptedStream(_SilentStream):
    """A console stream that answers with ``script`` and never confirms delivery."""

    def __init__(self, script: bytes) -> None:
        super().__init__()
        self._script = script

    async def read(self, max_bytes: int = 0) -> bytes:
        if self._script:
            data, self._script = self._script[:7], self._script[7:]  # arbitrary cuts
            return data
        return await super().read()

    async def drain(self) -> None:
        return None

    async def wait_delivered(self) -> None:
        await asyncio.Event().wait()  # never confirmed: only the deadline ends the wait

    def stop(self, error_code: int = 0) -> None:
        return None


def test_client_glue_gives_up_on_exit_delivery_at_the_machines_deadline() -> None:
    from flyvault.client.vault import ExecHooks, ExecSession

    script = (
        encode_frame(ConsoleFrame.STARTED, Started("s", True, 0, 0, 1, False, 0).encode())
        + encode_frame(ConsoleFrame.STDOUT, b"out")
        + encode_frame(ConsoleFrame.EXITED, Exited(7, None, 3).encode())
    )
    stream = _ScriptedStream(script)

    class Connection:
        boot_id = "b"

        def open_stream(self, tag: int) -> _ScriptedStream:
            return stream

    class FakeVault:
        async def connection(self) -> Connection:
            return Connection()

    out = bytearray()
    times = iter([100.0, 100.0 + EXIT_ACK_DELIVERY, 100.0 + EXIT_ACK_DELIVERY])
    session = ExecSession(
        FakeVault(),  # type: ignore[arg-type]
        OpenSession("s", ("cat",)),
        ExecHooks(stdout=out.extend, stderr=out.extend),
        clock=lambda: next(times),
    )
    session.send_stdin(b"never read")

    async def scenario() -> Exited:
        return await asyncio.wait_for(session.run(), 5.0)  # a guard only

    exited = asyncio.run(scenario())
    assert exited.code == 7 and out == b"out"
    assert session.machine.state is ClientState.DONE
    frames = _frames(bytes(stream.written))
    assert [kind for kind, _ in frames[1:]] == [ConsoleFrame.STDIN, ConsoleFrame.EXIT_ACK]
    assert stream.ended


# A read-only attach (protocol 5) -----------------------------------------------------------


@given(
    st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,39}", fullmatch=True),
    st.integers(min_value=0, max_value=2**63),
    st.booleans(),
)
def test_a_read_only_open_round_trips_and_can_never_start_a_session(
    session_id: str, offset: int, pty: bool
) -> None:
    request = OpenSession(session_id, pty=pty, resume_offset=offset, observe=True)
    assert OpenSession.decode(request.encode()) == request
    for creating in (OpenSession(session_id, ("ls",)), OpenSession(session_id, shell=True)):
        payload = bytearray(creating.encode())
        payload[len(session_id.encode()) + 4] |= 16  # the flags byte, after the id
        with pytest.raises(RemoteProtocolError, match="read-only attach cannot start"):
            OpenSession.decode(bytes(payload))


@pytest.mark.parametrize(
    "kind", [ConsoleFrame.STDIN, ConsoleFrame.STDIN_EOF, ConsoleFrame.RESIZE, ConsoleFrame.SIGNAL]
)
def test_the_server_refuses_input_from_a_read_only_attach(kind: ConsoleFrame) -> None:
    server = ExecServer(0.0)
    server.receive_data(encode_frame(ConsoleFrame.OPEN, OpenSession("s", observe=True).encode()))
    assert isinstance(server.next_event(), SessionOpenRequested)
    server.start(Started("s", False, 0, 0, 1, False, 0))
    server.data_to_send()
    payload = {
        ConsoleFrame.STDIN: b"x",
        ConsoleFrame.RESIZE: b"\x00\x18\x00\x50",
        ConsoleFrame.SIGNAL: b"\x02",
    }
    server.receive_data(encode_frame(kind, payload.get(kind, b"")))
    with pytest.raises(RemoteProtocolError, match="read-only attach cannot send"):
        server.next_event()
    assert server.state is ServerState.FAILED
    assert _frames(server.data_to_send())[-1][0] == ERROR_FRAME


def test_a_read_only_client_sends_nothing_and_needs_protocol_5() -> None:
    client = ExecClient(OpenSession("s", resume_offset=10, observe=True))
    with pytest.raises(Unsupported, match="protocol 4, which has no read-only attach"):
        client.open_stream(4)
    opened = _frames(client.open_stream(5))
    assert OpenSession.decode(opened[0][1]).observe
    for act in (
        lambda: client.send_stdin(b"x"),
        client.close_stdin,
        lambda: client.resize(24, 80),
        lambda: client.signal(2),
    ):
        with pytest.raises(LocalProtocolError, match="read-only attach cannot"):
            act()
    client.stream_lost()
    assert OpenSession.decode(_frames(client.open_stream(5))[0][1]).observe  # reattach too
