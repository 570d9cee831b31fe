"""The client's console-stream machine: one exec session or shell across every stream.

Theory of operation
-------------------
See ``exec_session.py`` for the exchange. ``ExecClient`` outlives streams: it holds the
output offset and the input not yet acknowledged, so whatever stream carries the session
next resumes exactly. Per stream the glue calls ``open_stream()`` (bytes to write first:
OPEN, then any resize or signal queued while no stream was up), then feeds what it reads;
when the stream fails it calls ``stream_lost(unsent)`` and opens another. Only the first
OPEN may create the session: every later one reattaches with the output offset seen. One
exception: a reattach answered NOT_FOUND before any STARTED means the first OPEN never
reached the vault (the stream was lost with it in flight). The vault keeps a session that
exited unacknowledged for its TTL (an hour by default), far longer than a reconnect takes,
so nothing ran: ``recreate()`` makes the next OPEN the creating one again, with the same id.

Input waits for STARTED on each stream, which says how much input the session has taken:
the client drops what the session has, and sends the rest from there (first attach: all it
holds is new). After EXITED the glue calls ``acknowledge_exit(now)``; if input was written
that the session had not acknowledged, the stream carries it ahead of the EXIT_ACK, and the
machine waits (``EXIT_ACK_DELIVERY``, a deadline) for the glue to confirm delivery, so a
one-shot client closing its connection does not leave the finished session waiting.

States (what the server may send in each: ``CLIENT_ACCEPTS``)::

    IDLE/DISCONNECTED --open_stream--> OPENING --STARTED--> ATTACHED --EXITED--> EXITED
    OPENING, ATTACHED --end of stream, stream_lost--> DISCONNECTED (reattach)
    OPENING, ATTACHED --ERROR--> FAILED          ATTACHED --DETACHED--> DISPLACED
    EXITED --acknowledge_exit(now)--> DONE, or DELIVERING (input unacknowledged)
    DELIVERING --delivery_confirmed, deadline, stream_lost--> DONE
"""

from __future__ import annotations

import enum
from collections import deque

from flyvault.errors import LocalProtocolError, RemoteProtocolError, Unsupported
from flyvault.protocol.codec import Frame, FrameDecoder, encode_frame
from flyvault.protocol.console import (
    ConsoleFrame,
    Exited,
    OpenSession,
    Started,
    decode_stdin_ack,
    encode_resize,
)
from flyvault.protocol.constants import (
    ERROR_FRAME,
    EXEC_USER_VERSION,
    MAX_PAYLOAD,
    OBSERVE_VERSION,
    PROTOCOL_VERSION,
    ErrorCode,
)
from flyvault.protocol.exec_session import (
    EXIT_ACK_DELIVERY,
    STDIN_CHUNK,
    STDIN_KEEP,
    ClientEvent,
    ErrorReceived,
    ExitDelivered,
    ExitDeliveryTimedOut,
    OutputChannel,
    OutputReceived,
    SessionDisplaced,
    SessionExited,
    SessionStarted,
    StdinAcknowledged,
    StreamEndedEarly,
    StreamFrames,
)
from flyvault.protocol.messages import ErrorMessage


class ClientState(enum.Enum):
    IDLE = "idle"
    OPENING = "opening"
    ATTACHED = "attached"
    DISCONNECTED = "disconnected"
    EXITED = "exited"
    DELIVERING = "delivering exit ack"
    DONE = "done"
    DISPLACED = "displaced"
    FAILED = "failed"


_OUTPUT = frozenset({ConsoleFrame.STDOUT, ConsoleFrame.STDERR})

#: Which server frames each state accepts; any other is a protocol error.
CLIENT_ACCEPTS: dict[ClientState, frozenset[int]] = {
    ClientState.IDLE: frozenset(),
    ClientState.OPENING: frozenset({ConsoleFrame.STARTED, ERROR_FRAME}),
    ClientState.ATTACHED: frozenset(
        {
            ConsoleFrame.STARTED,
            *_OUTPUT,
            ConsoleFrame.STDIN_ACK,
            ConsoleFrame.EXITED,
            ConsoleFrame.DETACHED,
            ERROR_FRAME,
        }
    ),
    ClientState.DISCONNECTED: frozenset(),
    # After EXITED the server may still acknowledge input it read; nothing else follows.
    ClientState.EXITED: frozenset({ConsoleFrame.STDIN_ACK}),
    ClientState.DELIVERING: frozenset({ConsoleFrame.STDIN_ACK}),
    ClientState.DONE: frozenset({ConsoleFrame.STDIN_ACK}),
    ClientState.DISPLACED: frozenset(),
    ClientState.FAILED: frozenset(),
}

#: States in which a stream is up (frames may be written on it).
_STREAM_UP = frozenset(
    {ClientState.OPENING, ClientState.ATTACHED, ClientState.EXITED, ClientState.DELIVERING}
)
#: States with no stream to read: nothing was asked on one, or it is gone or given up.
_NO_STREAM = frozenset({ClientState.DISCONNECTED, ClientState.DISPLACED, ClientState.FAILED})
#: Frames worth carrying over to the next stream when a write failed.
_REPLAYED_ON_LOSS = frozenset({ConsoleFrame.RESIZE, ConsoleFrame.SIGNAL})


class ExecClient:
    """The client's half of one exec session, across every stream that carries it."""

    def __init__(self, request: OpenSession) -> None:
        self.request = request
        self._creating = request
        self._last_error: ErrorMessage | None = None
        self.state = ClientState.IDLE
        #: Absolute offset of the next output byte (what a reattach resumes from).
        self.output_offset = request.resume_offset
        #: The last STARTED, or None before the first.
        self.started: Started | None = None
        self._frames = StreamFrames("server")
        self._outgoing = bytearray()
        self._events: deque[ClientEvent] = deque()
        self._opened_once = False
        self._pending: list[bytes] = []  # resize/signal frames waiting for a stream
        self._size: tuple[int, int] | None = None
        # Input kept until acknowledged: _unacked[0] is at absolute offset _unacked_base.
        self._unacked = bytearray()
        self._unacked_base = 0
        self._stdin_total = 0  # absolute offset after the last byte given to send_stdin
        self._stdin_written = 0  # absolute offset written on the current stream
        self._stdin_closed = False
        self._eof_written = False
        self._deadline: float | None = None

    @property
    def session_id(self) -> str:
        return self.request.session_id

    @property
    def reattaching(self) -> bool:
        """The next (or current) OPEN only reattaches: the session was asked for before."""
        return self.request.argv is None and not self.request.shell

    @property
    def stdin_unacknowledged(self) -> int:
        return len(self._unacked)

    @property
    def stdin_backlog_full(self) -> bool:
        """Input kept for a resend is over ``STDIN_KEEP``: wait for acknowledgements."""
        return len(self._unacked) > STDIN_KEEP

    # Commands ----------------------------------------------------------------------------

    def open_stream(self, version: int = PROTOCOL_VERSION) -> bytes:
        """Start a new stream: the bytes to write on it first. ``version``: the protocol
        the connection negotiated; a field the server would not understand is refused
        here (``Unsupported``), before anything is sent."""
        if self.state not in (ClientState.IDLE, ClientState.DISCONNECTED):
            raise LocalProtocolError(f"cannot open a console stream in state '{self.state.value}'")
        if self.request.observe and version < OBSERVE_VERSION:
            raise Unsupported(
                f"this vault's init speaks protocol {version}, which has no read-only attach "
                f"(protocol {OBSERVE_VERSION}); update the vault's image (fly-vault-admin "
                "tenant update-image), or attach normally"
            )
        if self.request.user is not None and version < EXEC_USER_VERSION and not self._opened_once:
            raise Unsupported(
                f"this vault's init speaks protocol {version}, which cannot run a command as "
                f"another user (--user needs protocol {EXEC_USER_VERSION}); update the vault's "
                "image (fly-vault-admin tenant update-image), or leave the user out to run as root"
            )
        if self._opened_once:
            # The command must never run twice: every later stream reattaches.
            self.request = _reattach(self.request, self.output_offset, self._size)
        self._opened_once = True
        self._frames = StreamFrames("server")
        self.state = ClientState.OPENING
        data = encode_frame(ConsoleFrame.OPEN, self.request.encode())
        data += b"".join(self._pending)
        self._pending.clear()
        return data

    @property
    def may_recreate(self) -> bool:
        """The vault answered a reattach with NOT_FOUND before any STARTED: the creating
        OPEN never arrived (see the theory of operation), so it may be sent again."""
        creating = self._creating.argv is not None or self._creating.shell
        return (
            creating  # a plain reattach to an unknown id is just "not found"
            and self.state is ClientState.FAILED
            and self.started is None
            and self._opened_once
            and self.reattaching
            and self._last_error is not None
            and self._last_error.code == ErrorCode.NOT_FOUND
        )

    def recreate(self) -> None:
        """After ``may_recreate``: the next ``open_stream`` sends the creating OPEN again."""
        if not self.may_recreate:
            raise LocalProtocolError(
                f"cannot create the session again in state '{self.state.value}'"
            )
        self.request = self._creating
        self._opened_once = False
        self._last_error = None
        self.state = ClientState.DISCONNECTED

    def stream_lost(self, unsent: bytes = b"") -> None:
        """The current stream failed. ``unsent``: bytes from ``data_to_send`` that could not
        be written; their resizes and signals go out on the next stream (input is resent
        from the session's offset anyway)."""
        self._pending.extend(_replayable(unsent + bytes(self._outgoing)))
        self._outgoing.clear()
        if self.state in (ClientState.OPENING, ClientState.ATTACHED):
            self.state = ClientState.DISCONNECTED
        elif self.state is ClientState.DELIVERING:
            # Nothing more can be delivered on a dead stream: waiting longer is pointless.
            self._deadline = None
            self.state = ClientState.DONE

    def _writable(self, what: str) -> None:
        if self.request.observe:
            raise LocalProtocolError(f"a read-only attach cannot {what}")

    def send_stdin(self, data: bytes) -> None:
        self._writable("send input")
        if self._stdin_closed or not data:
            return
        self._unacked += data
        self._stdin_total += len(data)
        self._flush_stdin()

    def close_stdin(self) -> None:
        self._writable("close the input")
        self._stdin_closed = True
        self._flush_stdin()

    def resize(self, rows: int, cols: int) -> None:
        self._writable("resize the terminal")
        self._size = (rows, cols)
        self._control(encode_frame(ConsoleFrame.RESIZE, encode_resize(rows, cols)))

    def signal(self, signo: int) -> None:
        self._writable("send a signal")
        self._control(encode_frame(ConsoleFrame.SIGNAL, bytes((signo,))))

    def acknowledge_exit(self, now: float) -> None:
        """Queue EXIT_ACK (the glue ends the stream with it)."""
        if self.state is not ClientState.EXITED:
            raise LocalProtocolError(f"cannot acknowledge an exit in state '{self.state.value}'")
        self._outgoing += encode_frame(ConsoleFrame.EXIT_ACK)
        if self._stdin_written > self._unacked_base:
            self.state = ClientState.DELIVERING
            self._deadline = now + EXIT_ACK_DELIVERY
        else:
            self.state = ClientState.DONE

    def delivery_confirmed(self) -> None:
        """Every byte written on the stream, the EXIT_ACK last, reached the vault."""
        if self.state is ClientState.DELIVERING:
            self._finish_delivery(ExitDelivered())

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    # Deadlines ---------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> None:
        if self._deadline is not None and now >= self._deadline:
            self._finish_delivery(ExitDeliveryTimedOut())

    # Incoming ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._frames.feed(data)

    def receive_eof(self) -> None:
        self._frames.feed_eof()

    def next_event(self) -> ClientEvent | None:
        if self._events:
            return self._events.popleft()
        if self.state in _NO_STREAM:
            return None
        try:
            item = self._frames.next_frame()
            if item is None:
                return self._maybe_ended()
            self._frames.check(item, CLIENT_ACCEPTS[self.state], self.state.value)
            return self._handle(item)
        except RemoteProtocolError:
            self.state = ClientState.FAILED
            raise

    def _maybe_ended(self) -> ClientEvent | None:
        if self._frames.finished and self.state in (ClientState.OPENING, ClientState.ATTACHED):
            self.state = ClientState.DISCONNECTED
            return StreamEndedEarly()
        return None

    def _handle(self, frame: Frame) -> ClientEvent:
        kind, payload = frame.type, frame.payload
        if kind in _OUTPUT:
            offset = self.output_offset
            self.output_offset += len(payload)
            return OutputReceived(OutputChannel(kind), payload, offset)
        if kind == ConsoleFrame.STARTED:
            return self._on_started(Started.decode(payload))
        if kind == ConsoleFrame.STDIN_ACK:
            offset = decode_stdin_ack(payload)
            self._acknowledge_stdin(offset)
            return StdinAcknowledged(offset)
        if kind == ConsoleFrame.EXITED:
            self.state = ClientState.EXITED
            return SessionExited(Exited.decode(payload))
        if kind == ConsoleFrame.DETACHED:
            self.state = ClientState.DISPLACED
            return SessionDisplaced(payload.decode("utf-8", "replace"))
        self.state = ClientState.FAILED
        self._last_error = ErrorMessage.decode(payload)
        return ErrorReceived(self._last_error)

    def _on_started(self, started: Started) -> SessionStarted:
        if started.offset < self.output_offset:
            raise RemoteProtocolError(
                f"server replays from {started.offset}, before our offset {self.output_offset}"
            )
        self.output_offset = started.offset
        first_attach = self.started is None
        self.started = started
        stream_start = self.state is ClientState.OPENING
        if stream_start:
            self.state = ClientState.ATTACHED
            self._sync_stdin(started.stdin_offset, first_attach)
        return SessionStarted(started, first_attach, stream_start and not first_attach)

    # Input bookkeeping -------------------------------------------------------------------

    def _sync_stdin(self, offset: int, first_attach: bool) -> None:
        if first_attach:
            # A new session (0), or one another client fed before: what we hold is all new.
            self._unacked_base = offset
            self._stdin_total = offset + len(self._unacked)
        else:
            # A reattach after a loss: drop what the session took, resend the rest.
            self._acknowledge_stdin(offset)
        self._stdin_written = offset
        self._eof_written = False  # a repeated EOF is harmless
        self._flush_stdin()

    def _acknowledge_stdin(self, offset: int) -> None:
        if not self._unacked_base <= offset <= self._stdin_total:
            raise RemoteProtocolError(
                f"the vault acknowledges {offset} bytes of input; {self._unacked_base} to "
                f"{self._stdin_total} were possible"
            )
        del self._unacked[: offset - self._unacked_base]
        self._unacked_base = offset

    def _flush_stdin(self) -> None:
        """Queue the input the current stream has not carried yet, then the EOF."""
        if self.state is not ClientState.ATTACHED:
            return
        while self._stdin_written < self._stdin_total:
            start = self._stdin_written - self._unacked_base
            chunk = bytes(self._unacked[start : start + STDIN_CHUNK])
            self._outgoing += encode_frame(ConsoleFrame.STDIN, chunk)
            self._stdin_written += len(chunk)
        if self._stdin_closed and not self._eof_written:
            self._outgoing += encode_frame(ConsoleFrame.STDIN_EOF)
            self._eof_written = True

    def _control(self, data: bytes) -> None:
        if self.state in (ClientState.OPENING, ClientState.ATTACHED):
            self._outgoing += data
        elif self.state in (ClientState.IDLE, ClientState.DISCONNECTED):
            self._pending.append(data)
        # After the exit (or a displacement) there is no process to resize or signal.

    def _finish_delivery(self, event: ClientEvent) -> None:
        self._deadline = None
        self.state = ClientState.DONE
        self._events.append(event)


def _reattach(request: OpenSession, offset: int, size: tuple[int, int] | None) -> OpenSession:
    rows, cols = size if size else (request.rows, request.cols)
    return OpenSession(
        session_id=request.session_id,
        argv=None,
        pty=request.pty,
        shell=False,
        keep=request.keep,
        term=request.term,
        rows=rows,
        cols=cols,
        resume_offset=offset,
        observe=request.observe,
    )


def _replayable(data: bytes) -> list[bytes]:
    """The resize and signal frames among our own encoded ``data``."""
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoder.feed(data)
    kept: list[bytes] = []
    while (frame := decoder.next_frame()) is not None:
        if frame.type in _REPLAYED_ON_LOSS:
            kept.append(encode_frame(frame.type, frame.payload))
    return kept
