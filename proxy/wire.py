"""The vault-proxy wire format, and the few bits of a QUIC header the proxy reads.

Client to proxy, every datagram (reference admin-and-proxy §2.2)::

    | id_len: u64 little-endian | machine id: id_len bytes, UTF-8 | QUIC datagram (>= 1 byte) |

Proxy to client: the machine's datagram, unchanged.

``decode`` is total: every input gives either ``(machine_id, payload_offset)`` or a ``Drop``
reason, never an exception. The original died on one packet (reference §5 bug 1): it added
``8 + id_len`` in a u64, so ``id_len = 2**64 - 8`` wrapped to 0, passed the length check and
panicked on the slice. Here ``id_len`` is compared with a small cap *before* it takes part in
any arithmetic, and Python integers cannot wrap anyway.

The proxy routes by machine id *and* QUIC destination connection id (DCID), so it reads the
version-independent header invariants of RFC 8999 (nothing encrypted): a long header carries
both connection ids with their lengths; a short header carries only the DCID, whose length
the receiver chose, so the proxy must be told the length the vaults use (aioquic: 8).
"""

from __future__ import annotations

import struct
from enum import Enum

HEADER_SIZE = 8
#: Fly machine ids are 14 characters; 64 leaves room for other id schemes and bounds the
#: work (and the log text) a hostile packet can cause.
DEFAULT_MAX_ID_BYTES = 64
#: RFC 9000 §17.2: QUIC v1 (and v2) connection ids are at most 20 bytes.
MAX_CID_BYTES = 20
#: aioquic's (and quinn's) default connection id length: what init issues.
DEFAULT_CID_LENGTH = 8
#: RFC 9000 §14.1: a client's Initial rides in a datagram of at least 1200 bytes.
MIN_INITIAL_DATAGRAM = 1200

_LONG_HEADER = 0x80
_FIXED_BIT = 0x40
_U64 = struct.Struct("<Q")


class Drop(Enum):
    """Why a datagram was not relayed. The value is the counter's name on the status page."""

    # Malformed wire header.
    SHORT = "short"  # fewer than 8 bytes
    EMPTY_ID = "empty_id"  # id_len == 0
    ID_TOO_LONG = "id_too_long"  # id_len above the cap (this is where 2**64-8 lands)
    TRUNCATED = "truncated"  # fewer than 8 + id_len bytes
    NON_UTF8 = "non_utf8"
    BAD_ID = "bad_id"  # valid UTF-8 with control characters: never a machine id
    EMPTY_PAYLOAD = "empty_payload"
    NOT_QUIC = "not_quic"  # payload has no readable QUIC header invariants
    # Routing.
    UNKNOWN_MACHINE = "unknown_machine"  # not a managed (and allowed) machine of the app
    MACHINE_NOT_STARTED = "machine_not_started"  # managed, not routable now (may be waking)
    NO_SESSION = "no_session"  # handshake packet for a flow that was never opened
    SESSION_LIMIT = "session_limit"
    IP_SESSION_LIMIT = "ip_session_limit"
    # Sending.
    BACKEND_BUSY = "backend_busy"  # socket buffer full towards the machine
    BACKEND_FAILED = "backend_failed"  # error towards the machine (session closed)
    CLIENT_BUSY = "client_busy"  # socket buffer full towards the client
    CLIENT_FAILED = "client_failed"


#: The drops that mean "the packet itself was malformed" (the fuzz test sums these).
MALFORMED = frozenset(
    {
        Drop.SHORT,
        Drop.EMPTY_ID,
        Drop.ID_TOO_LONG,
        Drop.TRUNCATED,
        Drop.NON_UTF8,
        Drop.BAD_ID,
        Drop.EMPTY_PAYLOAD,
        Drop.NOT_QUIC,
    }
)


def encode_header(machine_id: str) -> bytes:
    """The prefix a client puts in front of every QUIC datagram."""
    raw = machine_id.encode("utf-8")
    if not raw:
        raise ValueError("machine_id must not be empty")
    return _U64.pack(len(raw)) + raw


def encode(machine_id: str, datagram: bytes) -> bytes:
    return encode_header(machine_id) + datagram


def decode(data: bytes, max_id_bytes: int = DEFAULT_MAX_ID_BYTES) -> tuple[str, int] | Drop:
    """``(machine_id, offset of the QUIC datagram)`` or why the datagram is dropped."""
    size = len(data)
    if size < HEADER_SIZE:
        return Drop.SHORT
    id_len: int = _U64.unpack_from(data)[0]
    if id_len == 0:
        return Drop.EMPTY_ID
    if id_len > max_id_bytes:  # before any arithmetic with id_len
        return Drop.ID_TOO_LONG
    end = HEADER_SIZE + id_len
    if end > size:
        return Drop.TRUNCATED
    if end == size:
        return Drop.EMPTY_PAYLOAD
    try:
        machine_id = data[HEADER_SIZE:end].decode("utf-8")  # strict: no surrogates, overlongs
    except UnicodeDecodeError:
        return Drop.NON_UTF8
    if not machine_id.isprintable():
        # Ids end up in logs and the status page; control characters are never legitimate.
        return Drop.BAD_ID
    return machine_id, end


def destination_cid(data: bytes, offset: int, short_cid_length: int) -> bytes | None:
    """The DCID of the QUIC packet at ``offset``, or None when the header is unreadable."""
    size = len(data)
    if offset >= size:
        return None
    first = data[offset]
    if first & _LONG_HEADER:
        # flags(1) version(4) dcid_len(1) dcid
        if size < offset + 6:
            return None
        dcid_len = data[offset + 5]
        start = offset + 6
        if dcid_len > MAX_CID_BYTES or size < start + dcid_len:
            return None
        return data[start : start + dcid_len]
    if not first & _FIXED_BIT:
        return None  # RFC 9000 §17.3.1: the fixed bit is 1 (no grease_quic_bit here)
    start = offset + 1
    if size < start + short_cid_length:
        return None
    return data[start : start + short_cid_length]


def is_long_header(data: bytes, offset: int) -> bool:
    return offset < len(data) and bool(data[offset] & _LONG_HEADER)


def source_cid(data: bytes) -> bytes | None:
    """The SCID of a long-header packet from a machine (how the proxy learns its CIDs)."""
    size = len(data)
    if size < 7 or not data[0] & _LONG_HEADER:
        return None
    dcid_len = data[5]
    at = 6 + dcid_len
    if dcid_len > MAX_CID_BYTES or size < at + 1:
        return None
    scid_len = data[at]
    if scid_len > MAX_CID_BYTES or size < at + 1 + scid_len:
        return None
    return data[at + 1 : at + 1 + scid_len]


__all__ = [
    "DEFAULT_CID_LENGTH",
    "DEFAULT_MAX_ID_BYTES",
    "HEADER_SIZE",
    "MALFORMED",
    "MIN_INITIAL_DATAGRAM",
    "Drop",
    "decode",
    "destination_cid",
    "encode",
    "encode_header",
    "is_long_header",
    "source_cid",
]
