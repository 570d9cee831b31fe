"""The vault-proxy wire format, and the few bits of a QUIC header the proxy reads.

The datagram header (``u64 LE id_len | machine id | QUIC datagram``) is written once, in
``flyvault.protocol.proxy_header``, which the client's transport uses too; ``decode`` here
reads it with the proxy's id cap and turns a fault into a ``Drop`` reason. ``decode`` is
total: every input gives either ``(machine_id, payload_offset)`` or a ``Drop``, never an
exception (the original died on one packet, reference §5 bug 1; see ``proxy_header``).

The proxy routes by machine id *and* QUIC destination connection id (DCID), so it reads the
version-independent header invariants of RFC 8999 (nothing encrypted): a long header carries
both connection ids with their lengths; a short header carries only the DCID, whose length
the receiver chose, so the proxy must be told the length the vaults use (aioquic: 8).
"""

from __future__ import annotations

from enum import Enum

from flyvault.protocol.proxy_header import HEADER_SIZE, HeaderFault, decode_header, encode_header

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


def encode(machine_id: str, datagram: bytes) -> bytes:
    return encode_header(machine_id) + datagram


#: The header's faults, as the drop reasons they count under (the same names).
_FAULT_DROPS = {fault: Drop(fault.value) for fault in HeaderFault}


def decode(data: bytes, max_id_bytes: int = DEFAULT_MAX_ID_BYTES) -> tuple[str, int] | Drop:
    """``(machine_id, offset of the QUIC datagram)`` or why the datagram is dropped."""
    decoded = decode_header(data, max_id_bytes)
    if isinstance(decoded, HeaderFault):
        return _FAULT_DROPS[decoded]
    return decoded


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
