"""Sans-I/O machines for the opening of a forward stream (tag 0x02).

Theory of operation
-------------------
A forward stream starts with one frame each way, then carries raw bytes::

    client                                   server
    OPEN(host, port) [raw bytes...]  ---->
                                             (connects to host:port, at most CONNECT_TIMEOUT)
                                     <----   OPENED(peer address) [raw bytes...]
                                       or    ERROR(CONNECT_FAILED | PROTOCOL, reason), end

The client pipelines its first raw bytes right behind OPEN, so a request costs no extra
round trip; the server holds them (``DataReceived`` after ``accept``) until the target
answers. Because raw bytes follow the first frame, only that one frame is ever parsed
(``split_first_frame``): whatever comes after it is data, never a header.

Both machines are driven alike: ``receive_data(bytes)`` / ``receive_eof()`` feed what the
stream delivered, ``next_event()`` returns the next past-tense event or ``None`` when more
input is needed, commands (``open``, ``accept``, ``refuse``) queue bytes that
``data_to_send()`` drains. Nothing here reads a clock or touches a socket: ``now`` is passed
in, and each machine states its one deadline as data (``next_deadline()``; the glue calls
``handle_timer(now)`` when it passes), which yields a ``...TimedOut`` event.

A peer that breaks the opening raises ``RemoteProtocolError`` from ``next_event`` (the server
queues a PROTOCOL error frame for the client first); a command in the wrong state raises
``LocalProtocolError``. Either leaves the machine in ``FAILED``.

State tables (anything not listed is illegal)::

    client            input                        next          event
    IDLE              open(host, port, now)        AWAIT_OPENED  -
    AWAIT_OPENED      OPENED frame                 RELAYING      Opened (+ DataReceived)
    AWAIT_OPENED      ERROR frame                  REFUSED       Refused
    AWAIT_OPENED      timer past the deadline      TIMED_OUT     OpenTimedOut
    AWAIT_OPENED      other frame, EOF, oversize   FAILED        (RemoteProtocolError)
    RELAYING          bytes / EOF                  RELAYING      DataReceived / StreamEnded

    server            input                        next          event
    AWAIT_OPEN        OPEN frame                   CONNECTING    OpenRequested
    AWAIT_OPEN        timer past the deadline      FAILED        OpenTimedOut (error queued)
    AWAIT_OPEN        other frame, EOF, bad OPEN   FAILED        (RemoteProtocolError, queued)
    CONNECTING        connecting(now)              CONNECTING    - (the connect deadline)
    CONNECTING        accept(peer)                 RELAYING      DataReceived (held bytes)
    CONNECTING        refuse(exc)                  REFUSED       -
    CONNECTING        timer past the deadline      REFUSED       ConnectTimedOut (error queued)
    RELAYING          bytes / EOF                  RELAYING      DataReceived / StreamEnded
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, TypeAlias

from flyvault.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    TargetUnreachable,
    VaultError,
)
from flyvault.protocol.codec import (
    Frame,
    PayloadReader,
    PayloadWriter,
    encode_frame,
    split_first_frame,
)
from flyvault.protocol.constants import ERROR_FRAME, REQUEST_TIMEOUT
from flyvault.protocol.messages import ErrorMessage

#: The server's TCP connect to the target may take this long.
CONNECT_TIMEOUT: Final = 10.0
#: How long the client waits for OPENED or ERROR: the server's connect plus a round trip.
OPEN_TIMEOUT: Final = 30.0
#: How long the server waits for OPEN (it normally arrives with the tag).
AWAIT_OPEN_TIMEOUT: Final = REQUEST_TIMEOUT
#: OPEN holds a host of at most 255 bytes and a port.
MAX_OPEN_PAYLOAD: Final = 1024
#: OPENED and ERROR are small; nothing bigger is buffered before the relay starts.
MAX_ANSWER_PAYLOAD: Final = 64 * 1024
MAX_HOST_LENGTH: Final = 255


class ForwardFrame(enum.IntEnum):
    OPEN = 0x01
    OPENED = 0x11


@dataclass(frozen=True, slots=True)
class ForwardOpen:
    """C->S: the target, as the vault resolves it."""

    host: str
    port: int

    def encode(self) -> bytes:
        return PayloadWriter().text(self.host).u16(self.port).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> ForwardOpen:
        reader = PayloadReader(payload, "forward open")
        host = reader.text("host", MAX_HOST_LENGTH)
        port = reader.u16("port")
        reader.end()
        if not host:
            raise RemoteProtocolError("forward open: empty host")
        if port == 0:
            raise RemoteProtocolError("forward open: port 0")
        return cls(host, port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenRequested:
    """Server: the client asked for ``host:port``; connect, then ``accept`` or ``refuse``."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Opened:
    """Client: the vault reached the target; ``peer`` is the address it connected to."""

    peer: str


@dataclass(frozen=True, slots=True)
class Refused:
    """Client: the vault refused; ``error.to_exception()`` is the matching exception."""

    error: ErrorMessage


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Raw relay bytes (on the server: also those the client pipelined behind OPEN)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer finished its side after the opening: a TCP half-close."""


@dataclass(frozen=True, slots=True)
class OpenTimedOut:
    """Client: no answer to OPEN in time. Server: no OPEN in time (an error is queued)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class ConnectTimedOut:
    """Server: the target did not answer in time; the refusal is queued."""

    seconds: float


ForwardEvent: TypeAlias = (
    OpenRequested | Opened | Refused | DataReceived | StreamEnded | OpenTimedOut | ConnectTimedOut
)


class State(enum.Enum):
    IDLE = "idle"
    AWAIT_OPENED = "awaiting opened"
    AWAIT_OPEN = "awaiting open"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    REFUSED = "refused"
    TIMED_OUT = "timed out"
    FAILED = "failed"


class _Machine:
    """Shared by both sides: buffers, the first-frame split, raw bytes afterwards."""

    #: The state whose input is one frame (then raw bytes), and that frame's size bound.
    _FRAME_STATE: State
    _MAX_FRAME: int

    def __init__(self, state: State) -> None:
        self.state = state
        self._inbox = bytearray()
        self._eof = False
        self._end_reported = False
        self._outbox = bytearray()
        self._deadline: float | None = None
        self._events: list[ForwardEvent] = []

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise LocalProtocolError("forward stream: data fed after the end of the stream")
        self._inbox += data

    def receive_eof(self) -> None:
        self._eof = True

    def data_to_send(self) -> bytes:
        data, self._outbox = bytes(self._outbox), bytearray()
        return data

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must be called, or ``None`` while nothing is timed."""
        return self._deadline

    def next_event(self) -> ForwardEvent | None:
        if self._events:
            return self._events.pop(0)
        if self.state is self._FRAME_STATE:
            return self._first_frame()
        if self.state is State.RELAYING:
            return self._raw()
        return None

    def _first_frame(self) -> ForwardEvent | None:
        try:
            split = split_first_frame(self._inbox, self._MAX_FRAME)
            if split is None:
                if self._eof:
                    raise RemoteProtocolError(
                        f"forward stream ended after {len(self._inbox)} bytes, before its "
                        "first frame"
                    )
                return None
            frame, rest = split
            self._inbox = bytearray(rest)
            return self._handle(frame)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def _raw(self) -> ForwardEvent | None:
        if self._inbox:
            data, self._inbox = bytes(self._inbox), bytearray()
            return DataReceived(data)
        if self._eof and not self._end_reported:
            self._end_reported = True
            return StreamEnded()
        return None

    def _handle(self, frame: Frame) -> ForwardEvent:
        raise NotImplementedError

    def _fail(self, exc: RemoteProtocolError) -> None:
        self.state = State.FAILED
        self._deadline = None

    def _queue(self, frame_type: int, payload: bytes) -> None:
        self._outbox += encode_frame(frame_type, payload)

    def _require(self, state: State, action: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"cannot {action} in state '{self.state.value}'")


class ForwardClient(_Machine):
    """The client's side: send OPEN, then wait (bounded) for OPENED or ERROR."""

    _FRAME_STATE = State.AWAIT_OPENED
    _MAX_FRAME = MAX_ANSWER_PAYLOAD

    def __init__(self, open_timeout: float = OPEN_TIMEOUT) -> None:
        super().__init__(State.IDLE)
        self._open_timeout = open_timeout

    def open(self, host: str, port: int, now: float) -> None:
        """Queue OPEN; raw bytes may be sent right behind it (not through the machine)."""
        self._require(State.IDLE, "open a forward")
        self._queue(ForwardFrame.OPEN, ForwardOpen(host, port).encode())
        self.state = State.AWAIT_OPENED
        self._deadline = now + self._open_timeout

    def handle_timer(self, now: float) -> None:
        due = self._deadline is not None and now >= self._deadline
        if self.state is State.AWAIT_OPENED and due:
            self.state = State.TIMED_OUT
            self._deadline = None
            self._events.append(OpenTimedOut(self._open_timeout))

    def _handle(self, frame: Frame) -> ForwardEvent:
        self._deadline = None
        if frame.type == ERROR_FRAME:
            error = ErrorMessage.decode(frame.payload)
            self.state = State.REFUSED
            return Refused(error)
        if frame.type != ForwardFrame.OPENED:
            raise RemoteProtocolError(
                f"expected OPENED on the forward stream, got frame type 0x{frame.type:02x}"
            )
        self.state = State.RELAYING
        return Opened(frame.payload.decode("utf-8", "replace"))


class ForwardServer(_Machine):
    """The server's side: wait (bounded) for OPEN, connect (bounded), answer, relay."""

    _FRAME_STATE = State.AWAIT_OPEN
    _MAX_FRAME = MAX_OPEN_PAYLOAD

    def __init__(
        self,
        now: float,
        *,
        open_timeout: float = AWAIT_OPEN_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        super().__init__(State.AWAIT_OPEN)
        self._open_timeout = open_timeout
        self._connect_timeout = connect_timeout
        self._deadline = now + open_timeout
        self.target: ForwardOpen | None = None

    def connecting(self, now: float) -> None:
        """The connect to the target starts now: it must end by ``next_deadline()``."""
        self._require(State.CONNECTING, "start connecting")
        self._deadline = now + self._connect_timeout

    def accept(self, peer: str) -> None:
        """The target answered: queue OPENED; the held client bytes follow as events."""
        self._require(State.CONNECTING, "accept a forward")
        self._queue(ForwardFrame.OPENED, peer.encode("utf-8"))
        self.state = State.RELAYING
        self._deadline = None

    def refuse(self, exc: VaultError) -> None:
        """Queue the error frame ``exc``'s class declares; the stream ends after it."""
        if self.state not in (State.AWAIT_OPEN, State.CONNECTING):
            raise LocalProtocolError(f"cannot refuse a forward in state '{self.state.value}'")
        self._queue(ERROR_FRAME, ErrorMessage.from_exception(exc).encode())
        self.state = State.REFUSED
        self._deadline = None

    def handle_timer(self, now: float) -> None:
        if self._deadline is None or now < self._deadline:
            return
        if self.state is State.AWAIT_OPEN:
            late = RemoteProtocolError(f"no forward OPEN within {self._open_timeout:g} s")
            self._queue(ERROR_FRAME, ErrorMessage.from_exception(late).encode())
            super()._fail(late)
            self._events.append(OpenTimedOut(self._open_timeout))
        elif self.state is State.CONNECTING:
            assert self.target is not None
            where = format_address(self.target.host, self.target.port)
            self.refuse(
                TargetUnreachable(
                    f"cannot connect to {where}: timed out after {self._connect_timeout:g} s"
                )
            )
            self._events.append(ConnectTimedOut(self._connect_timeout))

    def _handle(self, frame: Frame) -> ForwardEvent:
        if frame.type != ForwardFrame.OPEN:
            raise RemoteProtocolError(
                f"expected a forward OPEN frame, got frame type 0x{frame.type:02x}"
            )
        self.target = ForwardOpen.decode(frame.payload)
        self.state = State.CONNECTING
        self._deadline = None  # until the glue starts connecting (``connecting(now)``)
        return OpenRequested(self.target.host, self.target.port)

    def _fail(self, exc: RemoteProtocolError) -> None:
        # Every violation before the answer is reported to the client, never a silent close.
        if self.state in (State.AWAIT_OPEN, State.CONNECTING):
            self._queue(
                ERROR_FRAME,
                ErrorMessage.from_exception(
                    RemoteProtocolError(f"forward stream: {exc.message}")
                ).encode(),
            )
        super()._fail(exc)

    def next_event(self) -> ForwardEvent | None:
        # While connecting, the client's pipelined bytes wait for the answer.
        if self.state is State.CONNECTING and not self._events:
            return None
        return super().next_event()
