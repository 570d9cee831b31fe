"""Console streams (exec sessions and shells), the sessions stream, and forward streams.

Theory of operation
-------------------
Console stream (tag 0x03). The client's first frame is OPEN: which session, whether to
create it (argv, PTY or pipes, terminal, cwd, env) and the absolute output offset it has
already seen. The server answers STARTED (where its replay starts and how many bytes were
lost from the ring buffer before that), then STDOUT/STDERR frames, then EXITED once every
output byte has been sent. Output offsets are absolute: the client's offset is STARTED's
offset plus every output byte since, so a reattach replays exactly what was not seen.
A client displaced by another attach gets DETACHED and must not reconnect on its own
(the original's takeover ping-pong, B4). Closing the stream detaches; the process keeps
running. EXIT_ACK tells the server the exit was seen, so an anonymous session can go.

Sessions stream (tag 0x04): one request (LIST, or KILL with a signal), one answer.

Forward stream (tag 0x02): its opening machines are in ``flyvault.protocol.forward``.

Every stream kind refuses with the common ERROR frame (0xFF), never a silent close.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from flyvault.errors import RemoteProtocolError, VaultError
from flyvault.protocol.codec import (
    COMMAND_BYTES,
    Frame,
    FrameDecoder,
    PayloadReader,
    PayloadWriter,
    encode_frame,
)
from flyvault.protocol.constants import ERROR_FRAME, MAX_PAYLOAD
from flyvault.protocol.limits import (
    MAX_ARG_LENGTH,
    MAX_ARGV,
    MAX_CONTEXT_LENGTH,
    MAX_ENV,
    MAX_ENV_NAME_LENGTH,
    MAX_PATH_LENGTH,
    MAX_TERM_LENGTH,
    MAX_USER_LENGTH,
    check_session_id,
    check_user,
)
from flyvault.protocol.messages import ErrorMessage


class ConsoleFrame(enum.IntEnum):
    OPEN = 0x01
    STDIN = 0x02
    STDIN_EOF = 0x03
    RESIZE = 0x04
    SIGNAL = 0x05
    EXIT_ACK = 0x06
    STARTED = 0x11
    STDOUT = 0x12
    STDERR = 0x13
    EXITED = 0x14
    DETACHED = 0x15
    STDIN_ACK = 0x16


class SessionsFrame(enum.IntEnum):
    LIST = 0x01
    KILL = 0x02
    #: C->S (protocol 6): restart the workload; every session ends (reason given).
    RESTART = 0x03
    LIST_RESULT = 0x11
    KILLED = 0x12
    #: S->C: JSON ``{"old_boot_id", "new_boot_id", "runtime"}``, once the new workload runs.
    RESTARTED = 0x13


@dataclass(frozen=True, slots=True)
class OpenSession:
    """C->S, first console frame. ``argv`` None means "reattach only"."""

    session_id: str
    argv: tuple[str, ...] | None = None
    pty: bool = False
    #: A login shell (``bash -l``, else ``sh -l``); ``argv`` is ignored.
    shell: bool = False
    #: Keep the session after it exits until collected (named sessions), so list-exec can
    #: show its exit code; anonymous sessions go as soon as their exit was acknowledged.
    keep: bool = False
    context: str | None = None
    term: str = ""
    rows: int = 0
    cols: int = 0
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    resume_offset: int = 0
    #: Protocol 4: the account (a name in the workload's ``/etc/passwd``) a new session runs
    #: as; None is root, as before. A trailing field sent only when set, so a request
    #: without it is byte for byte what older clients send. A reattach never carries it:
    #: the session keeps the user it was started as.
    user: str | None = None
    #: Protocol 5: a read-only attach. It follows the output from ``resume_offset`` beside
    #: the session's attached client instead of displacing it, and may send no input,
    #: resize or signal; its EXIT_ACK does not collect the session. Only for a reattach.
    observe: bool = False

    @property
    def create(self) -> bool:
        return self.argv is not None or self.shell

    def encode(self) -> bytes:
        flags = (
            (1 if self.argv is not None else 0)
            | (2 if self.pty else 0)
            | (4 if self.shell else 0)
            | (8 if self.keep else 0)
            | (16 if self.observe else 0)
        )
        writer = PayloadWriter().text(self.session_id).u8(flags)
        argv = self.argv or ()
        writer.u32(len(argv))
        for arg in argv:
            writer.text(arg, COMMAND_BYTES)
        writer.optional_text(self.context).text(self.term).u16(self.rows).u16(self.cols)
        writer.optional_text(self.cwd, COMMAND_BYTES).u32(len(self.env))
        for key, value in self.env:
            writer.text(key).text(value, COMMAND_BYTES)
        writer.u64(self.resume_offset)
        if self.user is not None:
            writer.text(self.user)
        return writer.getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> OpenSession:
        reader = PayloadReader(payload, "console open")
        session_id = check_session_id(reader.text("session id", 512))
        flags = reader.u8("flags")
        if flags & ~0x1F:
            raise RemoteProtocolError(f"console open: unknown flags 0x{flags:02x}")
        if flags & 16 and flags & (1 | 4):
            raise RemoteProtocolError("console open: a read-only attach cannot start a session")
        count = reader.u32("argv count")
        if count > MAX_ARGV:
            raise RemoteProtocolError(f"console open: {count} arguments, more than {MAX_ARGV}")
        args = tuple(reader.text("argument", MAX_ARG_LENGTH, COMMAND_BYTES) for _ in range(count))
        context = reader.optional_text("context", MAX_CONTEXT_LENGTH)
        term = reader.text("term", MAX_TERM_LENGTH)
        rows = reader.u16("rows")
        cols = reader.u16("cols")
        cwd = reader.optional_text("cwd", MAX_PATH_LENGTH, COMMAND_BYTES)
        env_count = reader.u32("env count")
        if env_count > MAX_ENV:
            raise RemoteProtocolError(f"console open: {env_count} variables, more than {MAX_ENV}")
        env = tuple(
            (
                reader.text("env name", MAX_ENV_NAME_LENGTH),
                reader.text("env value", MAX_ARG_LENGTH, COMMAND_BYTES),
            )
            for _ in range(env_count)
        )
        resume = reader.u64("resume offset")
        user = check_user(reader.text("user", MAX_USER_LENGTH)) if reader.remaining else None
        reader.end()
        argv = args if flags & 1 else None
        if argv is not None and not argv and not flags & 4:
            raise RemoteProtocolError("exec request must include at least one argv element")
        return cls(
            session_id,
            argv,
            bool(flags & 2),
            bool(flags & 4),
            bool(flags & 8),
            context,
            term,
            rows,
            cols,
            cwd,
            env,
            resume,
            user,
            bool(flags & 16),
        )


@dataclass(frozen=True, slots=True)
class Started:
    session_id: str
    created: bool
    #: Absolute offset of the first output byte that follows.
    offset: int
    #: Bytes between the client's resume offset and ``offset`` that the ring buffer lost.
    dropped: int
    pid: int
    pty: bool
    #: Standard input bytes the session has taken so far, from every attachment: a client
    #: that reattaches after a loss resends its input from here, so none is lost or doubled.
    stdin_offset: int = 0

    def encode(self) -> bytes:
        return (
            PayloadWriter()
            .text(self.session_id)
            .u8(int(self.created))
            .u64(self.offset)
            .u64(self.dropped)
            .u32(self.pid)
            .u8(int(self.pty))
            .u64(self.stdin_offset)
            .getvalue()
        )

    @classmethod
    def decode(cls, payload: bytes) -> Started:
        reader = PayloadReader(payload, "console started")
        value = cls(
            reader.text("session id", 512),
            bool(reader.u8("created")),
            reader.u64("offset"),
            reader.u64("dropped"),
            reader.u32("pid"),
            bool(reader.u8("pty")),
            reader.u64("stdin offset"),
        )
        reader.end()
        return value


#: Longest EXITED reason.
MAX_REASON_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class Exited:
    """How the process ended: ``code`` for a normal exit, else ``signal``.

    ``reason`` (protocol 3): why the vault ended the session, when it did (the workload
    stopped for a reprovision, a restart, init's shutdown). It is sent only to clients that
    negotiated protocol 3: a protocol 2 decoder refuses the extra bytes.
    """

    code: int | None
    signal: int | None
    total_bytes: int
    reason: str | None = None

    @property
    def exit_status(self) -> int:
        """The shell convention: the code, or 128 + the signal number."""
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 255

    def encode(self) -> bytes:
        if self.signal is not None:
            kind, value = 1, self.signal
        else:
            kind, value = 0, self.code or 0
        writer = PayloadWriter().u8(kind).u8(value & 0xFF).u64(self.total_bytes)
        if self.reason is not None:
            writer.text(self.reason[:MAX_REASON_LENGTH])
        return writer.getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> Exited:
        reader = PayloadReader(payload, "console exited")
        kind = reader.u8("kind")
        value = reader.u8("value")
        total = reader.u64("total bytes")
        reason = reader.text("reason", 4 * MAX_REASON_LENGTH) if reader.remaining else None
        reader.end()
        if kind == 0:
            return cls(value, None, total, reason)
        if kind == 1:
            return cls(None, value, total, reason)
        raise RemoteProtocolError(f"console exited: invalid kind {kind}")


def encode_resize(rows: int, cols: int) -> bytes:
    return PayloadWriter().u16(rows).u16(cols).getvalue()


def decode_resize(payload: bytes) -> tuple[int, int]:
    reader = PayloadReader(payload, "resize")
    rows, cols = reader.u16("rows"), reader.u16("cols")
    reader.end()
    return rows, cols


def encode_stdin_ack(offset: int) -> bytes:
    """STDIN_ACK: the session has taken ``offset`` bytes of standard input in all."""
    return PayloadWriter().u64(offset).getvalue()


def decode_stdin_ack(payload: bytes) -> int:
    reader = PayloadReader(payload, "stdin ack")
    offset = reader.u64("stdin offset")
    reader.end()
    return offset


def decode_signal(payload: bytes) -> int:
    reader = PayloadReader(payload, "signal")
    signo = reader.u8("signal number")
    reader.end()
    if not 1 <= signo <= 64:
        raise RemoteProtocolError(f"signal number {signo} is out of range 1-64")
    return signo


@dataclass(frozen=True, slots=True)
class KillSession:
    session_id: str
    signal: int

    def encode(self) -> bytes:
        return PayloadWriter().text(self.session_id).u8(self.signal).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> KillSession:
        reader = PayloadReader(payload, "kill")
        session_id = check_session_id(reader.text("session id", 512))
        signo = reader.u8("signal")
        reader.end()
        if not 1 <= signo <= 64:
            raise RemoteProtocolError(f"signal number {signo} is out of range 1-64")
        return cls(session_id, signo)


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def decode_json(payload: bytes, what: str) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RemoteProtocolError(f"{what} is not valid JSON") from None
    except RecursionError:  # e.g. 1000 nested '[': json recurses once per level
        raise RemoteProtocolError(f"{what} is JSON nested too deeply") from None


@dataclass
class FrameChannel:
    """Frame codec for one stream: ``feed`` bytes, iterate frames; error frames decoded."""

    max_payload: int = MAX_PAYLOAD
    decoder: FrameDecoder = field(init=False)

    def __post_init__(self) -> None:
        self.decoder = FrameDecoder(self.max_payload)

    def feed(self, data: bytes) -> None:
        if data:
            self.decoder.feed(data)
        else:
            self.decoder.feed_eof()

    def next_frame(self) -> Frame | None:
        return self.decoder.next_frame()

    @property
    def finished(self) -> bool:
        return self.decoder.finished


def frame(frame_type: int, payload: bytes = b"") -> bytes:
    return encode_frame(frame_type, payload)


def error_frame(code: int, message: str) -> bytes:
    return encode_frame(ERROR_FRAME, ErrorMessage(code, message).encode())


def refusal(exc: VaultError) -> bytes:
    """The error frame that refuses with ``exc``: the code is the one its class declares."""
    return encode_frame(ERROR_FRAME, ErrorMessage.from_exception(exc).encode())
