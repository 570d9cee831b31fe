"""Sans-I/O machines for the file stream (tag 0x05): one file operation per stream.

Theory of operation
-------------------
The client opens a stream, writes the tag and one REQUEST frame (``FileRequest``, JSON).
What follows depends on the operation::

    simple (stat, sha256, mkdir, ...):  C: REQUEST, end      S: RESULT | ERROR, end
    list:                               C: REQUEST, end      S: ITEMS*, RESULT | ERROR
    read, tar_get:                      C: REQUEST, end      S: DATA* (DIGEST*), RESULT | ERROR
    write:   C: REQUEST   S: READY(have, sha256)   C: RESUME_AT(offset) DATA* END, end
             S: RESULT | ERROR      (END may carry the file's SHA-256: version 7)
    tar_put: C: REQUEST DATA* DIGEST* END, end             S: RESULT | ERROR

A write is resumable: READY says how many bytes of a partial left by an earlier attempt with
the same resume key the vault holds, and their SHA-256; the client compares that with its own
source and answers RESUME_AT ``have`` (skip them) or 0 (start over). The vault may answer
ERROR at any time (its disk filled, a digest did not match); the client then stops sending.
The server never reads a frame the operation does not expect: any other frame is a protocol
error, answered with an ERROR frame (``FileServer``) or raised (``FileClient``).

Both machines are driven alike: ``receive_data(bytes)`` / ``receive_eof()`` feed what the
stream delivered, ``next_event()`` returns the next past-tense event or ``None`` when more
input is needed, commands queue bytes that ``data_to_send()`` drains. ``now`` is passed in;
each machine states its one deadline as data (``next_deadline()``) and ``handle_timer(now)``
turns a passed deadline into a ``...TimedOut`` event. Frame sizes are bounded before any
payload is buffered (``MAX_DATA``, ``MAX_JSON``). A relay between the stream and a worker
(init) passes data and digests on still encoded: ``take_upload`` hands it the upload's next
such frames, ``relayable`` / ``relay`` take the worker's, each checked as the per-frame
calls would check them, without decoding the payloads.

State tables (anything not listed is illegal)::

    server          input                          next         event
    AWAIT_REQUEST   REQUEST (write)                PREPARING    RequestReceived
    AWAIT_REQUEST   REQUEST (tar_put)              RECEIVING    RequestReceived
    AWAIT_REQUEST   REQUEST (other)                WORKING      RequestReceived
    AWAIT_REQUEST   deadline                       FAILED       RequestTimedOut (error sent)
    PREPARING       ready(have, sha256)            AWAIT_RESUME -
    AWAIT_RESUME    RESUME_AT (<= have)            RECEIVING    ResumeRequested
    RECEIVING       DATA / DIGEST (tar_put) / END  RECEIVING / WORKING   DataReceived / ...
    RECEIVING       take_upload(now): DATA / DIGEST still encoded   RECEIVING   -
    AWAIT_RESUME, RECEIVING   end of stream        CLOSED       UploadAbandoned
    AWAIT_RESUME, RECEIVING   idle deadline        FAILED       UploadTimedOut (error sent)
    WORKING         send_data / send_digest / send_items (streaming ops)   WORKING   -
    WORKING         relay(frames): DATA / DIGEST still encoded (read, tar_get)   WORKING   -
    any open        answer(result)                 DONE         -
    any open        refuse(exc)                    FAILED       -

    client          input                          next         event
    AWAIT_READY     READY                          RESUMING     Ready
    RESUMING        resume_at(offset)              SENDING      -
    SENDING         send_data / send_digest        SENDING      -
    SENDING         finish()                       AWAIT_RESULT -
    RECEIVING       DATA / DIGEST / ITEMS          RECEIVING    DataReceived / ...
    any waiting     RESULT (after the upload)      DONE         Answered
    any open        ERROR                          FAILED       Refused
    any open        idle deadline                  TIMED_OUT    AnswerTimedOut
    any open        end of stream, other frame     FAILED       (RemoteProtocolError)
"""

from __future__ import annotations

import enum
import functools
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, final

from flyvault.errors import LocalProtocolError, RemoteProtocolError, VaultError
from flyvault.protocol.codec import Frame, FrameDecoder, encode_frame_header
from flyvault.protocol.constants import ERROR_FRAME, FRAME_HEADER_SIZE, REQUEST_TIMEOUT
from flyvault.protocol.files_messages import (
    MAX_DATA,
    MAX_JSON,
    STREAMING_OPS,
    FileFrame,
    FileInfo,
    FileOp,
    FileRequest,
    MemberDigest,
    WriteReady,
    decode_items,
    decode_result,
    encode_items,
    encode_result,
    valid_digest,
)
from flyvault.protocol.messages import ErrorMessage

#: How long either side waits without a frame from the other while it expects one (a
#: SHA-256 of a large file or an fsync may take a while; nothing is silent for longer).
IDLE_TIMEOUT: Final = 600.0
#: The largest frame either side accepts (a DATA frame, a JSON frame).
MAX_FRAME: Final = max(MAX_DATA, MAX_JSON)
#: A write's END payload (version 7): the raw SHA-256 of the whole file.
END_DIGEST_SIZE: Final = 32
_U64 = struct.Struct(">Q")
#: The most bytes of frames one ``take_upload`` returns (the glue's batch to the worker).
UPLOAD_RUN: Final = 1024 * 1024


class FileState(enum.Enum):
    AWAIT_REQUEST = "awaiting request"
    PREPARING = "preparing"
    AWAIT_RESUME = "awaiting resume offset"
    RECEIVING = "receiving"
    WORKING = "working"
    AWAIT_READY = "awaiting ready"
    RESUMING = "resuming"
    SENDING = "sending"
    AWAIT_RESULT = "awaiting result"
    DONE = "done"
    CLOSED = "closed"
    TIMED_OUT = "timed out"
    FAILED = "failed"


# Events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    request: FileRequest


@dataclass(frozen=True, slots=True)
class ResumeRequested:
    """Server: the client's data starts at ``offset`` of the file (0: start over)."""

    offset: int


@final
@dataclass(frozen=True, slots=True)
class DataReceived:
    data: bytes


@final
@dataclass(frozen=True, slots=True)
class DigestReceived:
    digest: MemberDigest


@dataclass(frozen=True, slots=True)
class ItemsReceived:
    items: tuple[FileInfo, ...]


@dataclass(frozen=True, slots=True)
class UploadEnded:
    """Server: END: the client sent everything; ``sha256`` (a write's END, version 7): hex,
    of the whole file, to be checked before the rename."""

    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class UploadAbandoned:
    """Server: the client closed its side before END (its data is incomplete)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Client: the vault is ready for the write's data; ``ready.have`` bytes are there."""

    ready: WriteReady


@final
@dataclass(frozen=True, slots=True)
class Answered:
    """Client: the operation succeeded; ``result`` is its JSON object."""

    result: dict[str, Any]


@final
@dataclass(frozen=True, slots=True)
class Refused:
    """Client: the vault refused; ``error.to_exception()`` is the matching exception."""

    error: ErrorMessage


@dataclass(frozen=True, slots=True)
class RequestTimedOut:
    seconds: float


@dataclass(frozen=True, slots=True)
class UploadTimedOut:
    seconds: float


@final
@dataclass(frozen=True, slots=True)
class AnswerTimedOut:
    seconds: float


FileEvent: TypeAlias = (
    RequestReceived
    | ResumeRequested
    | DataReceived
    | DigestReceived
    | ItemsReceived
    | UploadEnded
    | UploadAbandoned
    | Ready
    | Answered
    | Refused
    | RequestTimedOut
    | UploadTimedOut
    | AnswerTimedOut
)

#: Which server frames the client accepts in each state, by operation kind.
_ANSWER = frozenset({FileFrame.RESULT, ERROR_FRAME})


@functools.cache  # asked once per frame: a tree of small files has two frames a file
def client_accepts(state: FileState, op: FileOp) -> frozenset[int]:
    if state is FileState.AWAIT_READY:
        return frozenset({FileFrame.READY, ERROR_FRAME})
    if state in (FileState.RESUMING, FileState.SENDING):
        return frozenset({ERROR_FRAME})  # a RESULT before END would be a server bug
    if state is FileState.AWAIT_RESULT:
        return _ANSWER
    if state is FileState.RECEIVING:
        extra = {
            FileOp.READ: {FileFrame.DATA},
            FileOp.TAR_GET: {FileFrame.DATA, FileFrame.DIGEST},
            FileOp.LIST: {FileFrame.ITEMS},
        }[op]
        return _ANSWER | extra
    return frozenset()


@functools.cache
def server_accepts(state: FileState, op: FileOp | None) -> frozenset[int]:
    if state is FileState.AWAIT_REQUEST:
        return frozenset({FileFrame.REQUEST})
    if state is FileState.AWAIT_RESUME:
        return frozenset({FileFrame.RESUME_AT})
    if state is FileState.RECEIVING:
        if op is FileOp.TAR_PUT:
            return frozenset({FileFrame.DATA, FileFrame.DIGEST, FileFrame.END})
        return frozenset({FileFrame.DATA, FileFrame.END})
    return frozenset()


_OPEN_SERVER = frozenset(
    {
        FileState.AWAIT_REQUEST,
        FileState.PREPARING,
        FileState.AWAIT_RESUME,
        FileState.RECEIVING,
        FileState.WORKING,
    }
)
_READING_SERVER = frozenset({FileState.AWAIT_REQUEST, FileState.AWAIT_RESUME, FileState.RECEIVING})
#: The frames the server glue passes on still encoded (``take_upload``, ``relay``): an
#: upload's data and a tree's digests, the worker's data and digests. Their payloads are
#: read by the worker (an upload's) or were written by it, so decoding them here would
#: only cost a copy and, for a digest, JSON each way.
_UPLOADED = {
    FileOp.TAR_PUT: frozenset({FileFrame.DATA, FileFrame.DIGEST}),
    FileOp.WRITE: frozenset({FileFrame.DATA}),
}
_RELAYED = {
    FileOp.READ: frozenset({FileFrame.DATA}),
    FileOp.TAR_GET: frozenset({FileFrame.DATA, FileFrame.DIGEST}),
}


def _frame_name(kind: int) -> str:
    if kind == ERROR_FRAME:
        return "ERROR"
    try:
        return FileFrame(kind).name
    except ValueError:
        return f"0x{kind:02x}"


def encode_offset(offset: int) -> bytes:
    return _U64.pack(offset)


def decode_offset(payload: bytes) -> int:
    if len(payload) != _U64.size:
        raise RemoteProtocolError("file stream: RESUME_AT must be 8 bytes")
    value: int = _U64.unpack(payload)[0]
    return value


class _Base:
    def __init__(self, state: FileState) -> None:
        self.state = state
        self._decoder = FrameDecoder(MAX_FRAME)
        #: Headers and payloads apart, joined once by ``data_to_send``: a payload is
        #: copied once on its way out (and not at all when it is all there is).
        self._outbox: list[bytes] = []
        self._queued = 0
        self._events: deque[FileEvent] = deque()
        self._deadline: float | None = None

    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)

    def receive_eof(self) -> None:
        self._decoder.feed_eof()

    def data_to_send(self) -> bytes:
        data = b"".join(self._outbox)
        self._outbox, self._queued = [], 0
        return data

    @property
    def queued(self) -> int:
        return self._queued

    def next_deadline(self) -> float | None:
        return self._deadline

    def _queue(self, kind: int, payload: bytes = b"") -> None:
        self._outbox.append(encode_frame_header(kind, len(payload), max_payload=MAX_FRAME))
        if payload:
            # Kept until data_to_send: a view of a buffer its owner reuses would change.
            self._outbox.append(payload if type(payload) is bytes else bytes(payload))
        self._queued += FRAME_HEADER_SIZE + len(payload)

    def _queue_encoded(self, frames: bytes) -> None:
        self._outbox.append(frames)
        self._queued += len(frames)

    def _require(self, states: frozenset[FileState] | FileState, action: str) -> None:
        allowed = states if isinstance(states, frozenset) else frozenset({states})
        if self.state not in allowed:
            raise LocalProtocolError(f"cannot {action} in state '{self.state.value}'")


class FileServer(_Base):
    """The server's side of one file stream."""

    def __init__(
        self,
        now: float,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        super().__init__(FileState.AWAIT_REQUEST)
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self._deadline = now + request_timeout
        self._have = 0
        self._now = now
        self.request: FileRequest | None = None

    @property
    def input_ended(self) -> bool:
        """The client ended its side and every frame of it was read."""
        return self._decoder.finished

    @property
    def finished(self) -> bool:
        """Our side is over: the glue ends the stream after ``data_to_send()``."""
        return self.state in (FileState.DONE, FileState.FAILED, FileState.CLOSED)

    # Commands ----------------------------------------------------------------------------

    def ready(self, have: int, sha256: str, now: float) -> None:
        """Write only: the target is prepared; ``have`` bytes of a partial are kept."""
        self._require(FileState.PREPARING, "answer ready")
        self._queue(FileFrame.READY, WriteReady(have, sha256).encode())
        self._have = have
        self.state = FileState.AWAIT_RESUME
        self._deadline = now + self._idle_timeout

    def send_data(self, data: bytes) -> None:
        self._require_streaming({FileOp.READ, FileOp.TAR_GET}, "send data")
        for start in range(0, len(data), MAX_DATA):
            self._queue(FileFrame.DATA, data[start : start + MAX_DATA])

    def send_digest(self, digest: MemberDigest) -> None:
        self._require_streaming({FileOp.TAR_GET}, "send a member digest")
        self._queue(FileFrame.DIGEST, digest.encode())

    def relayable(self) -> frozenset[int]:
        """The worker's frame types the glue may hand to ``relay`` still encoded now."""
        if self.state is not FileState.WORKING or self.request is None:
            return frozenset()
        return _RELAYED.get(self.request.op, frozenset())

    def relay(self, frames: bytes) -> None:
        """Frames the worker encoded, all of ``relayable`` types (``FrameDecoder.take_run``
        gives such a run), queued unchanged: what ``send_data`` and ``send_digest`` would
        queue for them, without decoding and encoding each."""
        self._require_streaming({FileOp.READ, FileOp.TAR_GET}, "relay frames")
        self._queue_encoded(frames)

    def send_items(self, items: list[FileInfo]) -> None:
        self._require_streaming({FileOp.LIST}, "send records")
        self._queue(FileFrame.ITEMS, encode_items(items))

    def answer(self, result: dict[str, object]) -> None:
        """The operation succeeded: RESULT, and the stream is over."""
        self._require(FileState.WORKING, "answer")
        self._queue(FileFrame.RESULT, encode_result(result))
        self._end(FileState.DONE)

    def refuse(self, exc: VaultError) -> None:
        """The error frame ``exc``'s class declares; the stream is over."""
        self._require(_OPEN_SERVER, "refuse")
        self._queue(ERROR_FRAME, ErrorMessage.from_exception(exc).encode())
        self._end(FileState.FAILED)

    def _require_streaming(self, ops: set[FileOp], action: str) -> None:
        self._require(FileState.WORKING, action)
        assert self.request is not None
        if self.request.op not in ops:
            raise LocalProtocolError(f"cannot {action} for a {self.request.op.value}")

    def _end(self, state: FileState) -> None:
        self.state = state
        self._deadline = None

    # Deadlines ---------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        if self._deadline is None or now < self._deadline:
            return
        if self.state is FileState.AWAIT_REQUEST:
            seconds = self._request_timeout
            self.refuse(RemoteProtocolError(f"no file request within {seconds:g} s"))
            self._events.append(RequestTimedOut(seconds))
        elif self.state in (FileState.AWAIT_RESUME, FileState.RECEIVING):
            seconds = self._idle_timeout
            self.refuse(RemoteProtocolError(f"file upload idle for {seconds:g} s"))
            self._events.append(UploadTimedOut(seconds))

    # Incoming ----------------------------------------------------------------------------

    def take_upload(self, now: float) -> bytes:
        """While receiving an upload: its next DATA frames (and a tree's DIGEST frames)
        still encoded, for the glue to pass to the worker unchanged, which reads them as
        ``next_event``'s glue would have passed them on. b"" when the next frame is another
        (END, or one not allowed: ``next_event`` then reports it) or not complete yet."""
        if self._events or self.state is not FileState.RECEIVING or self.request is None:
            return b""
        run = self._decoder.take_run(_UPLOADED[self.request.op], UPLOAD_RUN)
        if run:
            self._now = now
            if self._deadline is not None:
                self._deadline = now + self._idle_timeout
        return run

    def next_event(self, now: float | None = None) -> FileEvent | None:
        """The next event; ``now`` (when given) moves the upload's idle deadline."""
        if self._events:
            return self._events.popleft()
        if self.state not in _READING_SERVER and self.state is not FileState.WORKING:
            return None
        try:
            frame = self._decoder.next_frame()
            if frame is None:
                if self._decoder.finished:
                    return self._eof()
                return None
            op = self.request.op if self.request is not None else None
            if frame.type not in server_accepts(self.state, op):
                raise RemoteProtocolError(
                    f"file stream: frame {_frame_name(frame.type)} is not allowed while "
                    f"{self.state.value}"
                )
            if now is not None:
                self._now = now
                if self._deadline is not None:
                    self._deadline = now + self._idle_timeout
            return self._handle(frame)
        except RemoteProtocolError as exc:
            if self.state in _OPEN_SERVER:
                self.refuse(exc)
            else:
                self._end(FileState.FAILED)
            raise

    def _eof(self) -> FileEvent | None:
        if self.state is FileState.AWAIT_REQUEST:
            self._end(FileState.CLOSED)
            return None
        if self.state in (FileState.AWAIT_RESUME, FileState.RECEIVING):
            self._end(FileState.CLOSED)
            return UploadAbandoned()
        return None  # WORKING: the client sent everything it had to

    def _handle(self, frame: Frame) -> FileEvent:
        kind = frame.type
        if kind == FileFrame.REQUEST:
            request = FileRequest.decode(frame.payload)
            self.request = request
            if request.op is FileOp.WRITE:
                self.state = FileState.PREPARING
                self._deadline = None  # the glue's preparation, then the client's turn
            elif request.op is FileOp.TAR_PUT:
                self.state = FileState.RECEIVING
                self._deadline = self._now + self._idle_timeout
            else:
                self.state = FileState.WORKING
                self._deadline = None
            return RequestReceived(request)
        if kind == FileFrame.RESUME_AT:
            offset = decode_offset(frame.payload)
            if offset > self._have:
                raise RemoteProtocolError(
                    f"file stream: RESUME_AT {offset} is past the {self._have} bytes held"
                )
            self.state = FileState.RECEIVING
            return ResumeRequested(offset)
        if kind == FileFrame.DATA:
            return DataReceived(frame.payload)
        if kind == FileFrame.DIGEST:
            return DigestReceived(MemberDigest.decode(frame.payload))
        self.state = FileState.WORKING
        self._deadline = None
        return UploadEnded(self._end_digest(frame.payload))

    def _end_digest(self, payload: bytes) -> str | None:
        """A write's END may carry the file's SHA-256 (32 bytes); a tree's carries nothing."""
        if not payload:
            return None
        assert self.request is not None
        if self.request.op is not FileOp.WRITE:
            raise RemoteProtocolError("file stream: a tree's END carries no payload")
        if len(payload) != END_DIGEST_SIZE:
            raise RemoteProtocolError(
                f"file stream: END carries {len(payload)} bytes, not a {END_DIGEST_SIZE}-byte "
                "SHA-256"
            )
        digest = payload.hex()
        if self.request.sha256 is not None and digest != self.request.sha256:
            raise RemoteProtocolError("file stream: END's SHA-256 contradicts the request's")
        return digest


class FileClient(_Base):
    """The client's side of one file stream: ``FileClient(request, now)`` queues REQUEST."""

    def __init__(self, request: FileRequest, now: float, *, idle_timeout: float = IDLE_TIMEOUT):
        request.check_local()
        op = request.op
        if op is FileOp.WRITE:
            state = FileState.AWAIT_READY
        elif op is FileOp.TAR_PUT:
            state = FileState.SENDING
        elif op in STREAMING_OPS:
            state = FileState.RECEIVING
        else:
            state = FileState.AWAIT_RESULT
        super().__init__(state)
        self.request = request
        self._idle_timeout = idle_timeout
        self._deadline = now + idle_timeout
        self._queue(FileFrame.REQUEST, request.encode())
        self.ready: WriteReady | None = None

    @property
    def sending_finished(self) -> bool:
        """Nothing more will be written: the glue ends its side of the stream."""
        return self.state not in (FileState.AWAIT_READY, FileState.RESUMING, FileState.SENDING)

    @property
    def may_send(self) -> bool:
        return self.state is FileState.SENDING

    def resume_at(self, offset: int, now: float) -> None:
        self._require(FileState.RESUMING, "resume")
        assert self.ready is not None
        if not 0 <= offset <= self.ready.have:
            raise LocalProtocolError(
                f"cannot resume at {offset}: the vault holds {self.ready.have}"
            )
        self._queue(FileFrame.RESUME_AT, encode_offset(offset))
        self.state = FileState.SENDING
        self._deadline = now + self._idle_timeout

    def send_data(self, data: bytes) -> None:
        self._require(FileState.SENDING, "send data")
        for start in range(0, len(data), MAX_DATA):
            self._queue(FileFrame.DATA, data[start : start + MAX_DATA])

    def send_digest(self, digest: MemberDigest) -> None:
        self._require(FileState.SENDING, "send a member digest")
        if self.request.op is not FileOp.TAR_PUT:
            raise LocalProtocolError("member digests belong to tar_put only")
        self._queue(FileFrame.DIGEST, digest.encode())

    def finish(self, now: float, sha256: str | None = None) -> None:
        """END. ``sha256`` (a write to a version 7 vault): hex, of the whole file, which the
        vault checks before the rename."""
        self._require(FileState.SENDING, "finish the upload")
        payload = b""
        if sha256 is not None:
            if self.request.op is not FileOp.WRITE or not valid_digest(sha256):
                raise LocalProtocolError("END carries 64 hex digits of a write's SHA-256 only")
            payload = bytes.fromhex(sha256)
        self._queue(FileFrame.END, payload)
        self.state = FileState.AWAIT_RESULT
        self._deadline = now + self._idle_timeout

    def handle_timer(self, now: float) -> None:
        if self._deadline is None or now < self._deadline:
            return
        if self.state in (FileState.DONE, FileState.FAILED, FileState.TIMED_OUT):
            return
        self.state = FileState.TIMED_OUT
        self._deadline = None
        self._events.append(AnswerTimedOut(self._idle_timeout))

    def next_event(self, now: float | None = None) -> FileEvent | None:
        if self._events:
            return self._events.popleft()
        if self.state in (FileState.DONE, FileState.FAILED, FileState.TIMED_OUT):
            return None
        try:
            frame = self._decoder.next_frame()
            if frame is None:
                if self._decoder.finished:
                    raise RemoteProtocolError(
                        f"the vault ended the file stream while {self.state.value}, "
                        "without an answer"
                    )
                return None
            if frame.type not in client_accepts(self.state, self.request.op):
                raise RemoteProtocolError(
                    f"file stream: the vault sent {_frame_name(frame.type)} while "
                    f"{self.state.value}"
                )
            if now is not None and self._deadline is not None:
                self._deadline = now + self._idle_timeout
            return self._handle(frame)
        except RemoteProtocolError:
            self.state = FileState.FAILED
            self._deadline = None
            raise

    def _handle(self, frame: Frame) -> FileEvent:
        kind = frame.type
        if kind == ERROR_FRAME:
            self.state = FileState.FAILED
            self._deadline = None
            return Refused(ErrorMessage.decode(frame.payload))
        if kind == FileFrame.RESULT:
            result = decode_result(frame.payload)
            self.state = FileState.DONE
            self._deadline = None
            return Answered(result)
        if kind == FileFrame.READY:
            self.ready = WriteReady.decode(frame.payload)
            size = self.request.size
            if size is not None and self.ready.have > size:
                raise RemoteProtocolError(
                    f"the vault holds {self.ready.have} bytes of a {size}-byte file"
                )
            self.state = FileState.RESUMING
            return Ready(self.ready)
        if kind == FileFrame.DATA:
            return DataReceived(frame.payload)
        if kind == FileFrame.DIGEST:
            return DigestReceived(MemberDigest.decode(frame.payload))
        return ItemsReceived(decode_items(frame.payload))
