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
* The keeper ends every accepted request with exactly one ``RESULT`` (JSON) or ``ERROR``
  (JSON ``{"type", "message", "hint", "exit_code"}``), then closes.

This module is the codec only: bytes in, frames out, no I/O.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

from flyvault.errors import LocalProtocolError, RemoteProtocolError

MUX_VERSION = 1
HEADER = struct.Struct(">BI")
#: One frame's payload at most; output and stdin travel in chunks well below it.
MAX_FRAME = 1024 * 1024


class MuxKind(enum.IntEnum):
    # client -> keeper
    HELLO = 1
    STDIN = 2
    STDIN_EOF = 3
    RESIZE = 4
    # keeper -> client
    ACCEPTED = 16
    STDOUT = 17
    STDERR = 18
    NOTICE = 19
    RAW = 20
    PROGRESS = 21
    RESULT = 22
    ERROR = 23


#: Operations a HELLO may name.
OPS = frozenset({"exec", "list", "kill", "status", "stop"})


@dataclass(frozen=True, slots=True)
class MuxFrame:
    kind: MuxKind
    payload: bytes

    def json(self) -> Any:
        """The payload as JSON (a ``RemoteProtocolError`` naming the frame if it is not)."""
        try:
            return json.loads(self.payload)
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
    return encode(kind, json.dumps(value, separators=(",", ":")).encode())


class MuxDecoder:
    """Frames from a byte stream cut anywhere. Unknown kinds and oversized frames are
    refused (``RemoteProtocolError``): the two ends are the same release, so either is a
    bug or a stranger on the socket."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[MuxFrame]:
        self._buffer += data
        frames: list[MuxFrame] = []
        while len(self._buffer) >= HEADER.size:
            raw_kind, length = HEADER.unpack_from(self._buffer)
            try:
                kind = MuxKind(raw_kind)
            except ValueError:
                raise RemoteProtocolError(
                    f"keeper protocol: unknown frame kind {raw_kind}"
                ) from None
            if length > MAX_FRAME:
                raise RemoteProtocolError(
                    f"keeper protocol: a {kind.name} frame of {length} bytes is over {MAX_FRAME}"
                )
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append(MuxFrame(kind, bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


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
    "MuxDecoder",
    "MuxFrame",
    "MuxKind",
    "check_hello",
    "encode",
    "encode_json",
]
