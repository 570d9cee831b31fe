"""Sans-I/O state machines for console streams (exec sessions and shells): shared part.

Theory of operation
-------------------
A session lives on the vault and outlives any one stream. Each console stream (tag 0x03)
is one *attachment* to it::

    client                                          server
    OPEN(session, create?, resume_offset)   ------>
    [RESIZE | SIGNAL ...]  (pipelined)      ------>
                                            <------ STARTED(offset, dropped, stdin_offset) | ERROR
    STDIN* [STDIN_EOF] RESIZE* SIGNAL*      ------>
                                            <------ STDOUT | STDERR | STDIN_ACK | STARTED(drop)
                                            <------ EXITED (after every output byte) | DETACHED
    EXIT_ACK, end of stream                 ------>

Two counters make the session exact across cut connections, both absolute from the
session's start:

- **Output offset.** STARTED says where the replay starts; every STDOUT/STDERR byte moves it
  on. A client that loses its stream reattaches (never re-creates: a command must not run
  twice) with ``resume_offset`` = its offset, and the server replays exactly the rest. A
  later STARTED on the same stream says that the ring buffer dropped bytes: the offset jumps
  forward, never back.
- **Stdin offset.** The client keeps every input byte the session has not acknowledged
  (STARTED.stdin_offset, STDIN_ACK). On each new stream it sends input only after STARTED,
  from the session's ``stdin_offset``, so bytes in flight when a stream died are resent
  once, never lost or doubled.

``ExecClient`` (``exec_client.py``) lives as long as the client's interest in the session and
spans every stream; ``ExecServer`` (``exec_server.py``) is one attachment (one stream). Both
are driven like the control machines: ``receive_data(bytes)`` / ``receive_eof()`` feed the
current stream, ``next_event()`` returns the next past-tense event (``None`` when more data
is needed), commands queue frames that ``data_to_send()`` drains, ``now`` is passed in and
deadlines are data (``next_deadline()``, ``handle_timer(now)``). Which peer frames a state
accepts is a table (``CLIENT_ACCEPTS``, ``SERVER_ACCEPTS``); any other frame is a
``RemoteProtocolError`` naming the frame and the state. A command in the wrong state is a
``LocalProtocolError``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from flyvault.errors import RemoteProtocolError
from flyvault.protocol.codec import Frame, FrameDecoder
from flyvault.protocol.console import ConsoleFrame, Exited, OpenSession, Started
from flyvault.protocol.constants import ERROR_FRAME, MAX_PAYLOAD, REQUEST_TIMEOUT
from flyvault.protocol.messages import ErrorMessage

#: How long the server waits for the client's OPEN frame on a new console stream (the first
#: bytes of any stream: one constant).
OPEN_TIMEOUT = REQUEST_TIMEOUT
#: How long the server waits for the client's EXIT_ACK (or its close) after EXITED.
ACK_TIMEOUT = 30.0
#: How long a client that has just acknowledged an exit waits for its unread input and the
#: EXIT_ACK to reach the vault before it lets the connection go (see ``ExecClient``).
EXIT_ACK_DELIVERY = 5.0
#: Largest STDIN frame the client sends (frames may be up to 1 MiB after authentication).
STDIN_CHUNK = 64 * 1024
#: Input kept for a resend beyond which a client should wait for acknowledgements.
STDIN_KEEP = 8 * 1024 * 1024

_FRAME_NAMES = {
    ConsoleFrame.OPEN: "console open",
    ConsoleFrame.STDIN: "stdin",
    ConsoleFrame.STDIN_EOF: "stdin eof",
    ConsoleFrame.RESIZE: "resize",
    ConsoleFrame.SIGNAL: "signal",
    ConsoleFrame.EXIT_ACK: "exit ack",
    ConsoleFrame.STARTED: "started",
    ConsoleFrame.STDOUT: "stdout",
    ConsoleFrame.STDERR: "stderr",
    ConsoleFrame.EXITED: "exited",
    ConsoleFrame.DETACHED: "detached",
    ConsoleFrame.STDIN_ACK: "stdin ack",
    ERROR_FRAME: "error",
}


def frame_name(frame_type: int) -> str:
    return _FRAME_NAMES.get(frame_type, f"unknown frame type 0x{frame_type:02x}")


class OutputChannel(enum.Enum):
    STDOUT = ConsoleFrame.STDOUT
    STDERR = ConsoleFrame.STDERR


# Events of the client machine -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """STARTED: the output replay starts at ``started.offset``. ``first_attach`` is true for
    the client's first STARTED of the session; ``resumed`` for a later stream's first one;
    neither for a drop notice in the middle of a stream (``started.dropped`` bytes lost)."""

    started: Started
    first_attach: bool
    resumed: bool


@dataclass(frozen=True, slots=True)
class OutputReceived:
    """Output bytes; ``offset`` is the absolute offset of ``data[0]``."""

    channel: OutputChannel
    data: bytes
    offset: int


@dataclass(frozen=True, slots=True)
class StdinAcknowledged:
    """The session has taken ``offset`` bytes of standard input in all."""

    offset: int


@dataclass(frozen=True, slots=True)
class SessionExited:
    exited: Exited


@dataclass(frozen=True, slots=True)
class SessionDisplaced:
    """DETACHED: another client attached. Do not reattach on your own."""

    reason: str


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """The server refused; ``error.to_exception()`` gives the matching exception."""

    error: ErrorMessage


@dataclass(frozen=True, slots=True)
class StreamEndedEarly:
    """The server ended the stream before the session's exit: reattach."""


@dataclass(frozen=True, slots=True)
class ExitDelivered:
    """The EXIT_ACK (and any input queued before it) reached the vault."""


@dataclass(frozen=True, slots=True)
class ExitDeliveryTimedOut:
    """The EXIT_ACK was not confirmed within ``EXIT_ACK_DELIVERY``; let it go anyway."""


ClientEvent = (
    SessionStarted
    | OutputReceived
    | StdinAcknowledged
    | SessionExited
    | SessionDisplaced
    | ErrorReceived
    | StreamEndedEarly
    | ExitDelivered
    | ExitDeliveryTimedOut
)


# Events of the server machine -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionOpenRequested:
    """OPEN: find or create the session, then ``start`` or ``refuse``."""

    request: OpenSession


@dataclass(frozen=True, slots=True)
class StdinReceived:
    """Input; ``offset`` is the session's stdin offset of ``data[0]``."""

    data: bytes
    offset: int


@dataclass(frozen=True, slots=True)
class StdinClosed:
    pass


@dataclass(frozen=True, slots=True)
class ResizeRequested:
    rows: int
    cols: int


@dataclass(frozen=True, slots=True)
class SignalRequested:
    signal: int


@dataclass(frozen=True, slots=True)
class ExitAcknowledged:
    """EXIT_ACK: the client saw the exit; an anonymous session may go."""


@dataclass(frozen=True, slots=True)
class ClientDetached:
    """The client ended its side without an EXIT_ACK: it detached; the process runs on."""


@dataclass(frozen=True, slots=True)
class StreamClosedBeforeOpen:
    """The client ended the stream without an OPEN: nothing to answer."""


@dataclass(frozen=True, slots=True)
class OpenTimedOut:
    """No OPEN within ``OPEN_TIMEOUT``: an error frame has been queued."""


@dataclass(frozen=True, slots=True)
class ExitAckTimedOut:
    """No EXIT_ACK within ``ACK_TIMEOUT`` of EXITED: the attachment is over."""


ServerEvent = (
    SessionOpenRequested
    | StdinReceived
    | StdinClosed
    | ResizeRequested
    | SignalRequested
    | ExitAcknowledged
    | ClientDetached
    | StreamClosedBeforeOpen
    | OpenTimedOut
    | ExitAckTimedOut
)


class StreamFrames:
    """One stream's frame decoder with the state table check; shared by both machines."""

    def __init__(self, side: str) -> None:
        self._decoder = FrameDecoder(MAX_PAYLOAD)
        self._side = side

    def feed(self, data: bytes) -> None:
        self._decoder.feed(data)

    def feed_eof(self) -> None:
        self._decoder.feed_eof()

    @property
    def finished(self) -> bool:
        return self._decoder.finished

    def next_frame(self) -> Frame | None:
        return self._decoder.next_frame()

    def check(self, frame: Frame, allowed: frozenset[int], state: str) -> None:
        if frame.type not in allowed:
            raise RemoteProtocolError(
                f"unexpected {frame_name(frame.type)} frame from the {self._side} in state "
                f"'{state}'"
            )
