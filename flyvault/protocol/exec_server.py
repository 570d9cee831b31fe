"""The server's console-stream machine: one attachment (one stream) to a session.

Theory of operation
-------------------
See ``exec_session.py`` for the exchange. The stream's first frame must be OPEN, within
``OPEN_TIMEOUT``; the machine then pauses (reads nothing more, so pipelined resizes and
signals wait) until the glue has found or created the session and calls ``start`` with the
STARTED record, or ``refuse`` with an error. Attached, it turns the client's frames into
events and the glue's output into frames, keeping both counters:

- the output offset starts at STARTED's and moves with every output byte; a drop notice
  (``send_resume_notice``) may move it forward only; EXITED must carry exactly the offset
  reached, which is how "EXITED comes only after every output byte" is enforced;
- the stdin offset starts at STARTED's ``stdin_offset`` and moves with every STDIN byte.
  Whenever the machine has no complete frame left to return it queues a STDIN_ACK with the
  offset reached (if it changed), so the client can drop what it keeps for a resend.

A read-only attach (OPEN with ``observe``) is refused input, resizes and signals as
protocol errors; everything else is the same.

After EXITED the client acknowledges (EXIT_ACK) or closes its side; the wait is bounded by
``ACK_TIMEOUT``. ``displace`` (another client attached) queues DETACHED and ends the
machine's side: input arriving afterwards is never applied, because the new attachment was
told how much input the session had taken. The glue ends the stream whenever
``sending_finished`` is true (after DETACHED or an error frame).

States (the client frames each accepts: ``SERVER_ACCEPTS``)::

    AWAIT_OPEN --OPEN--> OPENING --start--> ATTACHED --send_exited(now)--> EXITED
    AWAIT_OPEN --deadline, another frame--> FAILED (error frame); --end of stream--> CLOSED
    OPENING --refuse--> FAILED                    ATTACHED, EXITED --displace--> DISPLACED
    ATTACHED --end of stream--> CLOSED      EXITED --EXIT_ACK, end, deadline--> CLOSED
"""

from __future__ import annotations

import enum
from collections import deque

from flyvault.errors import LocalProtocolError, RemoteProtocolError, VaultError
from flyvault.protocol.codec import Frame, encode_frame
from flyvault.protocol.console import (
    ConsoleFrame,
    Exited,
    OpenSession,
    Started,
    decode_resize,
    decode_signal,
    encode_stdin_ack,
)
from flyvault.protocol.constants import ERROR_FRAME, ErrorCode
from flyvault.protocol.exec_session import (
    ACK_TIMEOUT,
    OPEN_TIMEOUT,
    ClientDetached,
    ExitAcknowledged,
    ExitAckTimedOut,
    OpenTimedOut,
    OutputChannel,
    ResizeRequested,
    ServerEvent,
    SessionOpenRequested,
    SignalRequested,
    StdinClosed,
    StdinReceived,
    StreamClosedBeforeOpen,
    StreamFrames,
)
from flyvault.protocol.messages import ErrorMessage


class ServerState(enum.Enum):
    AWAIT_OPEN = "await open"
    OPENING = "opening"
    ATTACHED = "attached"
    EXITED = "exited"
    CLOSED = "closed"
    DISPLACED = "displaced"
    FAILED = "failed"


_INPUT = frozenset(
    {
        ConsoleFrame.STDIN,
        ConsoleFrame.STDIN_EOF,
        ConsoleFrame.RESIZE,
        ConsoleFrame.SIGNAL,
    }
)

#: Which client frames each state accepts; any other is a protocol error. States missing
#: here read nothing: the machine waits for the glue (OPENING) or is over.
SERVER_ACCEPTS: dict[ServerState, frozenset[int]] = {
    ServerState.AWAIT_OPEN: frozenset({ConsoleFrame.OPEN}),
    # EXIT_ACK only after EXITED: an early one would let a client remove a running session.
    ServerState.ATTACHED: _INPUT,
    # Input still in flight when the process exited is taken (counted) and acknowledged.
    ServerState.EXITED: _INPUT | {ConsoleFrame.EXIT_ACK},
}

_ATTACHED_STATES = frozenset({ServerState.ATTACHED, ServerState.EXITED})


class ExecServer:
    """The server's half of one console stream."""

    def __init__(
        self, now: float, *, open_timeout: float = OPEN_TIMEOUT, ack_timeout: float = ACK_TIMEOUT
    ) -> None:
        self.state = ServerState.AWAIT_OPEN
        self.request: OpenSession | None = None
        #: Absolute offset of the next output byte this stream sends.
        self.output_offset = 0
        #: Standard input the session has taken, from every attachment up to this one's.
        self.stdin_offset = 0
        self._stdin_acknowledged = 0
        self._ack_timeout = ack_timeout
        self._deadline: float | None = now + open_timeout
        self._frames = StreamFrames("client")
        self._outgoing = bytearray()
        self._events: deque[ServerEvent] = deque()
        #: Our side of the stream is over (DETACHED or an error frame went out last).
        self.sending_finished = False

    @property
    def attached(self) -> bool:
        return self.state in _ATTACHED_STATES

    # Commands ----------------------------------------------------------------------------

    def start(self, started: Started) -> None:
        """The session is found or created: send STARTED; input flows from now on."""
        self._require(ServerState.OPENING, "start the session")
        self._outgoing += encode_frame(ConsoleFrame.STARTED, started.encode())
        self.output_offset = started.offset
        self.stdin_offset = self._stdin_acknowledged = started.stdin_offset
        self.state = ServerState.ATTACHED

    def refuse(self, code: ErrorCode, message: str) -> None:
        """Answer with an error frame; the stream is over."""
        self._refuse(ErrorMessage(code, message))

    def refuse_with(self, exc: VaultError) -> None:
        """Answer with the error frame of ``exc``: the code its class declares."""
        self._refuse(ErrorMessage.from_exception(exc))

    def _refuse(self, error: ErrorMessage) -> None:
        if self.state in (ServerState.CLOSED, ServerState.FAILED, ServerState.DISPLACED):
            raise LocalProtocolError(f"cannot refuse in state '{self.state.value}'")
        self._outgoing += encode_frame(ERROR_FRAME, error.encode())
        self._end(ServerState.FAILED)

    def send_output(self, channel: OutputChannel, data: bytes) -> None:
        self._require(ServerState.ATTACHED, "send output")
        self._outgoing += encode_frame(channel.value, data)
        self.output_offset += len(data)

    def send_resume_notice(self, started: Started) -> None:
        """A STARTED in mid-stream: the ring buffer dropped bytes, output resumes later."""
        self._require(ServerState.ATTACHED, "send a resume notice")
        if started.offset < self.output_offset:
            raise LocalProtocolError(
                f"output cannot resume at {started.offset}, before offset {self.output_offset}"
            )
        self._outgoing += encode_frame(ConsoleFrame.STARTED, started.encode())
        self.output_offset = started.offset

    def send_exited(self, exited: Exited, now: float) -> None:
        self._require(ServerState.ATTACHED, "send the exit")
        if exited.total_bytes != self.output_offset:
            raise LocalProtocolError(
                f"cannot send the exit at output offset {self.output_offset}: the session "
                f"has {exited.total_bytes} bytes"
            )
        self._outgoing += encode_frame(ConsoleFrame.EXITED, exited.encode())
        self.state = ServerState.EXITED
        self._deadline = now + self._ack_timeout

    def displace(self, reason: str) -> None:
        """Another client attached: tell this one (DETACHED) and apply nothing more."""
        if not self.attached:
            raise LocalProtocolError(f"cannot displace in state '{self.state.value}'")
        self._outgoing += encode_frame(ConsoleFrame.DETACHED, reason.encode("utf-8"))
        self._end(ServerState.DISPLACED)

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    # Deadlines ---------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> None:
        if self._deadline is None or now < self._deadline:
            return
        if self.state is ServerState.AWAIT_OPEN:
            self.refuse(ErrorCode.PROTOCOL, f"no console open frame within {OPEN_TIMEOUT:g} s")
            self._events.append(OpenTimedOut())
        elif self.state is ServerState.EXITED:
            self._end(ServerState.CLOSED, finished_sending=False)
            self._events.append(ExitAckTimedOut())

    # Incoming ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._frames.feed(data)

    def receive_eof(self) -> None:
        self._frames.feed_eof()

    def next_event(self) -> ServerEvent | None:
        """The next event, or ``None`` when more data is needed or the machine waits for
        the glue (OPENING) or is over."""
        if self._events:
            return self._events.popleft()
        allowed = SERVER_ACCEPTS.get(self.state)
        if allowed is None:
            return None
        try:
            item = self._frames.next_frame()
            if item is None:
                return self._idle()
            self._frames.check(item, allowed, self.state.value)
            if item.type in _INPUT and self.request is not None and self.request.observe:
                raise RemoteProtocolError(
                    f"console: a read-only attach cannot send {ConsoleFrame(item.type).name}"
                )
            return self._handle(item)
        except RemoteProtocolError as exc:
            self.refuse(ErrorCode.PROTOCOL, exc.message)
            raise

    def _idle(self) -> ServerEvent | None:
        """No complete frame left: acknowledge the input taken, or report the end."""
        if self.attached and self.stdin_offset != self._stdin_acknowledged:
            self._stdin_acknowledged = self.stdin_offset
            self._outgoing += encode_frame(
                ConsoleFrame.STDIN_ACK, encode_stdin_ack(self.stdin_offset)
            )
        if not self._frames.finished:
            return None
        if self.state is ServerState.AWAIT_OPEN:
            self._end(ServerState.CLOSED, finished_sending=False)
            return StreamClosedBeforeOpen()
        self._end(ServerState.CLOSED, finished_sending=False)
        return ClientDetached()

    def _handle(self, frame: Frame) -> ServerEvent:
        kind, payload = frame.type, frame.payload
        if kind == ConsoleFrame.OPEN:
            self.request = OpenSession.decode(payload)
            self.state = ServerState.OPENING
            self._deadline = None
            return SessionOpenRequested(self.request)
        if kind == ConsoleFrame.STDIN:
            offset = self.stdin_offset
            self.stdin_offset += len(payload)
            return StdinReceived(payload, offset)
        if kind == ConsoleFrame.STDIN_EOF:
            return StdinClosed()
        if kind == ConsoleFrame.RESIZE:
            return ResizeRequested(*decode_resize(payload))
        if kind == ConsoleFrame.SIGNAL:
            return SignalRequested(decode_signal(payload))
        self._end(ServerState.CLOSED, finished_sending=False)
        return ExitAcknowledged()

    def _end(self, state: ServerState, *, finished_sending: bool = True) -> None:
        self.state = state
        self._deadline = None
        self.sending_finished = self.sending_finished or finished_sending

    def _require(self, state: ServerState, action: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"cannot {action} in state '{self.state.value}'")
