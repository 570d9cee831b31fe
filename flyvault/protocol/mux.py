"""The keeper protocol: a CLI process and its user's connection keeper over a unix socket.

The keeper (``flyvault.client.keeper``) holds one attested, authenticated connection to a
vault; a CLI process sends it one request per unix connection and gets the answer back, so
a short command pays neither the imports of QUIC and crypto nor a handshake. The access
token never crosses this socket: the keeper read it from the config itself.

Every message is a frame: ``kind`` (u8), ``length`` (u32, big-endian), ``length`` bytes.

* The client opens with ``HELLO``: a JSON object ``{"version": 1, "op": ..., ...}``.
* The keeper answers ``ACCEPTED`` before it acts on anything. A client that sees the
  socket close before ``ACCEPTED`` knows nothing was done and may try again elsewhere (a
  new keeper, or a direct connection); after ``ACCEPTED`` it must not.
* Then, for ``exec``: the client sends ``STDIN`` / ``STDIN_EOF`` / ``RESIZE``; the keeper
  sends ``STDOUT`` / ``STDERR`` / ``NOTICE`` / ``RAW`` / ``PROGRESS``.
* For ``stream`` (a raw vault stream of the given tag, relayed): the client sends
  ``STDIN`` / ``STDIN_EOF`` / ``ABORT``; the keeper sends ``STDOUT``, ``EOF`` and
  ``FAILED`` (one direction failed: a stream reset, the connection lost).
* ``connect`` makes sure the keeper's connection is up and answers with what the client
  needs to know about it (boot id, protocol version, VM and runtime state).
* ``ping`` (``fly-vault doctor``) answers with the keeper's status plus one PING over its
  live vault connection: whether it answered and the round trip in ms. It never connects.
* The keeper ends every accepted request with exactly one ``RESULT`` (JSON) or ``ERROR``
  (JSON ``{"type", "message", "hint", "exit_code"}``), then closes.

This module is the codec only: bytes in, frames out, no I/O.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

from flyvault.errors import LocalProtocolError, RemoteProtocolError

#: Bumped whenever the frames or ops change. Keepers are named with it (and the release),
#: so a CLI never talks to a keeper of another version.
MUX_VERSION = 5
HEADER = struct.Struct(">BI")
#: One frame's payload at most; output and stdin travel in chunks well below it.
MAX_FRAME = 1024 * 1024


class MuxKind(enum.IntEnum):
    # client -> keeper
    HELLO = 1
    STDIN = 2
    STDIN_EOF = 3
    RESIZE = 4
    #: ``stream``: reset the vault stream both ways (the CLI gave up on it).
    ABORT = 5
    # keeper -> client
    ACCEPTED = 16
    STDOUT = 17
    STDERR = 18
    NOTICE = 19
    RAW = 20
    PROGRESS = 21
    RESULT = 22
    ERROR = 23
    #: ``stream``: the vault finished sending (its FIN).
    EOF = 24
    #: ``stream``: one direction failed; JSON as ERROR plus ``sending`` (which direction)
    #: and ``error_code`` (a stream reset's). The request goes on for the other direction.
    FAILED = 25
    #: ``exec``: the keeper handed one STDIN chunk to the session; the CLI may send one
    #: more. Without it a keeper whose vault does not read stdin would have to stop
    #: reading the socket, and could not see the CLI leave.
    STDIN_TAKEN = 26


#: STDIN chunks a CLI may have sent and the keeper not yet acknowledged (STDIN_TAKEN).
STDIN_IN_FLIGHT = 16

#: Operations a HELLO may name.
OPS = frozenset({"exec", "list", "kill", "status", "stop", "connect", "stream", "ping"})


class MuxFrame:
    __slots__ = ("kind", "payload")

    kind: MuxKind
    payload: bytes

    def __init__(self, kind: MuxKind, payload: bytes) -> None:
        self.kind = kind
        self.payload = payload

    def __repr__(self) -> str:
        return f"MuxFrame(kind={self.kind!r}, payload={self.payload!r})"

    def __eq__(self, other: object) -> bool:
        return other.__class__ is self.__class__ and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    __hash__ = None  # type: ignore[assignment]

    def json(self) -> Any:
        """The payload as JSON (a ``RemoteProtocolError`` naming the frame if it is not)."""
        try:
            return json.loads(self.payload.decode("utf-8", "surrogatepass"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RemoteProtocolError(
                f"keeper protocol: the {self.kind.name} frame does not hold JSON"
            ) from None


def encode(kind: MuxKind, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise LocalProtocolError(
            f"keeper protocol: a {kind.name} frame of {len(payload)} bytes is over {MAX_FRAME}"
        )
    return HEADER.pack(kind, len(payload)) + payload


def encode_json(kind: MuxKind, value: Any) -> bytes:
    # UTF-8 as is: escaping non-ASCII would grow text up to 6x, past MAX_FRAME for requests
    # that fit the vault's own limits. surrogatepass, as the console codec: an argv may
    # hold the surrogates Python makes of bytes that are not UTF-8.
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return encode(kind, text.encode("utf-8", "surrogatepass"))


class MuxDecoder:
    """Frames from a byte stream cut anywhere. Unknown kinds and oversized frames are
    refused (``RemoteProtocolError``): the two ends are the same release, so either is a
    bug or a stranger on the socket.

    Each payload is copied once, straight out of the bytes fed: a tree's 100 MB pass
    through here on both ends of the keeper's socket, and gathering them in a buffer first
    cost two more copies of every byte. Only a frame cut by the end of one ``feed`` is
    held, and completed from the start of the next."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[MuxFrame]:
        frames: list[MuxFrame] = []
        with memoryview(data) as view:
            offset = self._complete_held(view, frames) if self._buffer else 0
            if self._buffer:  # still short: all of data is held
                return frames
            size = len(view)
            while size - offset >= HEADER.size:
                kind, length = _header(view, offset)
                end = offset + HEADER.size + length
                if end > size:
                    break
                frames.append(MuxFrame(kind, bytes(view[offset + HEADER.size : end])))
                offset = end
            if offset < size:  # a frame cut short (its header, if whole, was checked)
                self._buffer += view[offset:]
        return frames

    def _complete_held(self, view: memoryview, frames: list[MuxFrame]) -> int:
        """Complete the held frame from the start of ``view``: the bytes of it taken."""
        buffer = self._buffer
        taken = min(max(HEADER.size - len(buffer), 0), len(view))
        buffer += view[:taken]
        if len(buffer) < HEADER.size:
            return taken
        kind, length = _header(buffer, 0)
        missing = HEADER.size + length - len(buffer)
        more = min(missing, len(view) - taken)
        buffer += view[taken : taken + more]
        if more == missing:
            with memoryview(buffer) as held:
                frames.append(MuxFrame(kind, bytes(held[HEADER.size :])))
            buffer.clear()
        return taken + more

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


def _header(data: bytes | bytearray | memoryview, offset: int) -> tuple[MuxKind, int]:
    """The frame header at ``offset``, checked: a known kind, a length within MAX_FRAME."""
    raw_kind, length = HEADER.unpack_from(data, offset)
    try:
        kind = MuxKind(raw_kind)
    except ValueError:
        raise RemoteProtocolError(f"keeper protocol: unknown frame kind {raw_kind}") from None
    if length > MAX_FRAME:
        raise RemoteProtocolError(
            f"keeper protocol: a {kind.name} frame of {length} bytes is over {MAX_FRAME}"
        )
    return kind, length


def check_hello(value: Any) -> dict[str, Any]:
    """The HELLO object, checked: a dict with this version and a known op."""
    if not isinstance(value, dict):
        raise RemoteProtocolError("keeper protocol: HELLO is not a JSON object")
    version, op = value.get("version"), value.get("op")
    # Exactly the integer: JSON true and 1.0 compare equal to 1 in Python.
    if type(version) is not int or version != MUX_VERSION:
        raise RemoteProtocolError(
            f"keeper protocol: version {version!r}, this keeper speaks {MUX_VERSION}"
        )
    if not isinstance(op, str) or op not in OPS:  # a list or object is not hashable
        raise RemoteProtocolError(f"keeper protocol: unknown op {op!r}")
    return value


__all__ = [
    "MAX_FRAME",
    "MUX_VERSION",
    "OPS",
    "STDIN_IN_FLIGHT",
    "MuxDecoder",
    "MuxFrame",
    "MuxKind",
    "check_hello",
    "encode",
    "encode_json",
]
