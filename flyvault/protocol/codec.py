"""Frame codec and the bounded primitive readers/writers every message is built from.

Theory of operation: a ``FrameDecoder`` is fed arbitrary byte chunks (``feed``) and yields
complete ``Frame`` objects (``next_frame``). The 5-byte header is parsed as soon as it is
complete and the declared length is checked against the decoder's current limit *before*
any payload byte is buffered, so a peer cannot make us allocate more than ``max_payload``
plus one read chunk. The limit can be raised once the peer has authenticated.

``PayloadReader`` parses a payload with strict bounds: every read checks the remaining
length first and every failure is a ``RemoteProtocolError`` naming the field, never an
``IndexError``, ``struct.error`` or ``UnicodeDecodeError``.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from flyvault.errors import LocalProtocolError, RemoteProtocolError, printable
from flyvault.protocol.constants import FRAME_HEADER_SIZE

_HEADER = struct.Struct(">BI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

#: How a command line's bytes travel: os.fsencode's error handler, so an argument, a
#: directory or an environment value that is not UTF-8 (a Latin-1 file name) arrives as
#: the same bytes.
COMMAND_BYTES = "surrogateescape"


def wire_size(text: str) -> int:
    """Bytes ``text`` takes on the wire as a command line's text (``COMMAND_BYTES``); a
    lone surrogate no byte stands for counts as UTF-8 would pass it (3 bytes)."""
    try:
        return len(text.encode("utf-8", COMMAND_BYTES))
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))


def quoted(text: str) -> str:
    """``text`` in single quotes for a message, ``printable``: a command named with bytes
    that are not UTF-8 reads ``'caf\\xe9'``, where ``repr`` would say ``'caf\\udce9'``."""
    return f"'{printable(text)}'"


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: its type byte and its payload."""

    type: int
    payload: bytes


def encode_frame(frame_type: int, payload: bytes = b"", *, max_payload: int | None = None) -> bytes:
    """Encode one frame. Refuses payloads the u32 length cannot carry (flaw B5)."""
    return encode_frame_header(frame_type, len(payload), max_payload=max_payload) + payload


def encode_frame_header(frame_type: int, length: int, *, max_payload: int | None = None) -> bytes:
    """The 5-byte header of a frame whose payload of ``length`` bytes follows it (sent apart,
    so a large payload is not copied to be joined to it), checked as ``encode_frame``."""
    if not 0 <= frame_type <= 0xFF:
        raise LocalProtocolError(f"frame type {frame_type} does not fit in a byte")
    limit = 0xFFFFFFFF if max_payload is None else max_payload
    if length > limit:
        raise LocalProtocolError(
            f"frame payload of {length} bytes exceeds the limit of {limit} bytes"
        )
    return _HEADER.pack(frame_type, length)


class FrameDecoder:
    """Incremental decoder for ``u8 type | u32 length | payload`` frames.

    The fed chunks are kept as they came (``bytes`` are not copied) and each payload is
    cut out of them with one copy, or none when a chunk is exactly that payload: a bulk
    download's every byte went through the decoder twice when chunks were appended to one
    buffer and payloads copied out of it. Consuming the front is O(1) per frame."""

    def __init__(self, max_payload: int) -> None:
        self._chunks: deque[bytes] = deque()
        self._skip = 0  # bytes of the first chunk already consumed
        self._size = 0  # bytes buffered, not yet returned
        self._max_payload = max_payload
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        self._max_payload = value

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._size

    @property
    def at_frame_boundary(self) -> bool:
        return not self._size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data``. Never raises: a violation is reported by ``next_frame``."""
        if self._error is not None:
            return  # poisoned: drop everything, hold nothing more
        if self._eof and data:
            self._error = RemoteProtocolError("data received after the end of the stream")
            return
        if not data:
            return
        # bytes() returns a bytes object itself; a caller's bytearray may change: copied.
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._size += len(chunk)  # a typed memoryview's len() counts items, not bytes
        # Validate the header as soon as it is complete, so an oversized declaration is
        # refused before its payload accumulates.
        if self._size >= FRAME_HEADER_SIZE:
            try:
                self._check_header()
            except RemoteProtocolError as exc:
                self._error = exc
                head = self._peek(FRAME_HEADER_SIZE)
                self._chunks, self._skip, self._size = deque([head]), 0, len(head)

    def feed_eof(self) -> None:
        """The peer finished the stream. Raises if it stopped in the middle of a frame."""
        self._eof = True

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or ``None`` if more data is needed.

        Raises ``RemoteProtocolError`` for an oversized declaration or a frame truncated
        by the end of the stream.
        """
        if self._error is not None:
            raise self._error
        buffered = self._size
        if buffered < FRAME_HEADER_SIZE:
            if self._eof and buffered:
                raise RemoteProtocolError(
                    f"stream ended inside a frame header ({buffered} of {FRAME_HEADER_SIZE} bytes)"
                )
            return None
        frame_type, length = self._check_header()
        if buffered < FRAME_HEADER_SIZE + length:
            if self._eof:
                raise RemoteProtocolError(
                    f"stream ended inside a frame (type 0x{frame_type:02x}, "
                    f"{buffered - FRAME_HEADER_SIZE} of {length} payload bytes)"
                )
            return None
        self._take(FRAME_HEADER_SIZE)
        return Frame(frame_type, self._take(length))

    def take_run(self, types: frozenset[int], limit: int) -> bytes:
        """The next complete frames, still encoded, while their types are in ``types``: at
        least one frame when one is there, then more while the run is under ``limit`` bytes.

        For a relay that passes frames on unchanged: one copy for the whole run (none when
        it is exactly one fed chunk), where ``next_frame`` costs a ``Frame`` and a copy of
        each payload, and re-encoding one more. Stops before a frame of another type, an
        incomplete frame, or an oversized declaration (which ``next_frame`` then reports);
        returns b"" when none is first."""
        if self._error is not None:
            return b""
        chunks, size, end = self._chunks, self._size, 0
        index, base = 0, -self._skip  # the chunk holding offset ``end``, and where it starts
        while size - end >= FRAME_HEADER_SIZE and (end == 0 or end < limit):
            while base + len(chunks[index]) <= end:
                base += len(chunks[index])
                index += 1
            chunk, at = chunks[index], end - base
            if at + FRAME_HEADER_SIZE <= len(chunk):
                frame_type, length = _HEADER.unpack_from(chunk, at)
            else:  # the header spans chunks
                frame_type, length = _HEADER.unpack(self._gather(index, at, FRAME_HEADER_SIZE))
            after = end + FRAME_HEADER_SIZE + length
            if frame_type not in types or length > self._max_payload or after > size:
                break
            end = after
        return self._take(end) if end else b""

    @property
    def finished(self) -> bool:
        """True when the peer ended the stream and every frame has been returned."""
        return self._eof and not self._size

    def _check_header(self) -> tuple[int, int]:
        frame_type, length = _HEADER.unpack(self._peek(FRAME_HEADER_SIZE))
        if length > self._max_payload:
            raise RemoteProtocolError(
                f"frame of type 0x{frame_type:02x} declares {length} bytes, more than the "
                f"{self._max_payload} allowed here"
            )
        return frame_type, length

    def _peek(self, size: int) -> bytes:
        """The first ``size`` buffered bytes (``size`` <= ``buffered``), not consumed."""
        return self._gather(0, self._skip, size)

    def _gather(self, index: int, at: int, size: int) -> bytes:
        """``size`` bytes from offset ``at`` of chunk ``index`` on, across chunks."""
        chunk = self._chunks[index]
        if at + size <= len(chunk):  # the usual case: one slice
            return chunk[at : at + size]
        pieces: list[bytes] = []
        while size:
            piece = self._chunks[index][at : at + size]
            pieces.append(piece)
            size -= len(piece)
            index, at = index + 1, 0
        return b"".join(pieces)

    def _take(self, size: int) -> bytes:
        """Consume and return the first ``size`` buffered bytes: one copy at most."""
        if not size:
            return b""
        chunks = self._chunks
        first = chunks[0]
        skip = self._skip
        self._size -= size
        if skip + size <= len(first):
            if skip == 0 and size == len(first):
                chunks.popleft()
                return first
            self._skip = skip + size
            if self._skip == len(first):
                chunks.popleft()
                self._skip = 0
            return first[skip : skip + size]
        pieces: list[memoryview] = []
        while size:
            chunk = chunks[0]
            view = memoryview(chunk)[self._skip : self._skip + size]
            pieces.append(view)
            size -= len(view)
            if self._skip + len(view) == len(chunk):
                chunks.popleft()
                self._skip = 0
            else:
                self._skip += len(view)
        taken = b"".join(pieces)
        for view in pieces:
            view.release()
        return taken


def split_first_frame(buffer: bytes | bytearray, max_payload: int) -> tuple[Frame, bytes] | None:
    """The first frame of ``buffer`` and the bytes after it, or ``None`` if incomplete.

    For streams that switch from frames to raw bytes after one frame (the forward stream):
    the bytes behind the frame are never read as a header, and an oversized declaration is
    refused (``RemoteProtocolError``) before its payload is awaited.
    """
    if len(buffer) < FRAME_HEADER_SIZE:
        return None
    frame_type, length = _HEADER.unpack_from(buffer, 0)
    if length > max_payload:
        raise RemoteProtocolError(
            f"frame of type 0x{frame_type:02x} declares {length} bytes, more than the "
            f"{max_payload} allowed here"
        )
    end = FRAME_HEADER_SIZE + length
    if len(buffer) < end:
        return None
    return Frame(frame_type, bytes(buffer[FRAME_HEADER_SIZE:end])), bytes(buffer[end:])


class PayloadReader:
    """Strict, bounded reader over one frame payload."""

    def __init__(self, payload: bytes, what: str) -> None:
        self._data = payload
        self._offset = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def _take(self, size: int, field: str) -> bytes:
        if size > self.remaining:
            raise RemoteProtocolError(
                f"{self._what}: {field} truncated (needs {size} bytes, {self.remaining} left)"
            )
        chunk = self._data[self._offset : self._offset + size]
        self._offset += size
        return chunk

    def u8(self, field: str) -> int:
        return self._take(1, field)[0]

    def u16(self, field: str) -> int:
        value: int = _U16.unpack(self._take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = _U32.unpack(self._take(4, field))[0]
        return value

    def u64(self, field: str) -> int:
        value: int = _U64.unpack(self._take(8, field))[0]
        return value

    def raw(self, size: int, field: str) -> bytes:
        return self._take(size, field)

    def blob(self, field: str, max_length: int) -> bytes:
        """``u32 length | bytes`` with the length checked before the bytes are taken."""
        length = self.u32(f"{field} length")
        if length > max_length:
            raise RemoteProtocolError(
                f"{self._what}: {field} is {length} bytes, more than the {max_length} allowed"
            )
        return self._take(length, field)

    def text(self, field: str, max_length: int, errors: str = "strict") -> str:
        """UTF-8; ``errors="surrogateescape"`` for the fields that carry a command line's
        bytes (arguments, a directory, environment values), which need not be UTF-8."""
        data = self.blob(field, max_length)
        try:
            return data.decode("utf-8", errors)
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"{self._what}: {field} is not valid UTF-8") from None

    def optional_text(self, field: str, max_length: int, errors: str = "strict") -> str | None:
        flag = self.u8(f"{field} flag")
        if flag == 0:
            return None
        if flag != 1:
            raise RemoteProtocolError(f"{self._what}: {field} flag must be 0 or 1, got {flag}")
        return self.text(field, max_length, errors)

    def rest(self) -> bytes:
        chunk = self._data[self._offset :]
        self._offset = len(self._data)
        return chunk

    def end(self) -> None:
        if self.remaining:
            raise RemoteProtocolError(f"{self._what} has {self.remaining} trailing bytes")


class PayloadWriter:
    """Builds a payload; the counterpart of ``PayloadReader``."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> PayloadWriter:
        self._parts.append(bytes((value,)))
        return self

    def u16(self, value: int) -> PayloadWriter:
        self._parts.append(_U16.pack(value))
        return self

    def u32(self, value: int) -> PayloadWriter:
        self._parts.append(_U32.pack(value))
        return self

    def u64(self, value: int) -> PayloadWriter:
        self._parts.append(_U64.pack(value))
        return self

    def raw(self, data: bytes) -> PayloadWriter:
        self._parts.append(data)
        return self

    def blob(self, data: bytes) -> PayloadWriter:
        if len(data) > 0xFFFFFFFF:
            raise LocalProtocolError(f"field of {len(data)} bytes does not fit a u32 length")
        return self.u32(len(data)).raw(data)

    def text(self, value: str, errors: str = "strict") -> PayloadWriter:
        return self.blob(value.encode("utf-8", errors))

    def optional_text(self, value: str | None, errors: str = "strict") -> PayloadWriter:
        if value is None:
            return self.u8(0)
        return self.u8(1).text(value, errors)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)
