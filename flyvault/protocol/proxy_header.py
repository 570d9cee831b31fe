"""The vault-proxy datagram header: the one place its layout is written.

Client to proxy, every datagram (reference admin-and-proxy §2.2)::

    | id_len: u64 little-endian | machine id: id_len bytes, UTF-8 | QUIC datagram (>= 1 byte) |

Proxy to client: the machine's datagram, unchanged. The client's transport prefixes every
datagram it sends with ``encode_header`` (``flyvault.transport.endpoint.proxy_wrapper``);
vault-proxy reads it back with ``decode_header`` (``proxy.wire.decode``).

``decode_header`` is total: every input gives either ``(machine_id, payload_offset)`` or a
``HeaderFault``, never an exception. The original died on one packet (reference §5 bug 1): it
added ``8 + id_len`` in a u64, so ``id_len = 2**64 - 8`` wrapped to 0, passed the length check
and panicked on the slice. Here ``id_len`` is compared with a small cap *before* it takes part
in any arithmetic, and Python integers cannot wrap anyway.

How long an id may be is the caller's policy, not the layout's: the client bounds it so a
wrapped datagram still fits the IPv6 minimum MTU, the proxy so a hostile packet costs little.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

#: The ``id_len`` field: a u64, little-endian (the original's choice, kept for the wire).
HEADER_SIZE: Final = 8
_ID_LENGTH = struct.Struct("<Q")


class HeaderFault(enum.Enum):
    """Why a datagram carries no valid header. Values are vault-proxy's drop counter names."""

    SHORT = "short"  # fewer than 8 bytes
    EMPTY_ID = "empty_id"  # id_len == 0
    ID_TOO_LONG = "id_too_long"  # id_len above the cap (this is where 2**64-8 lands)
    TRUNCATED = "truncated"  # fewer than 8 + id_len bytes
    NON_UTF8 = "non_utf8"
    BAD_ID = "bad_id"  # valid UTF-8 with control characters: never a machine id
    EMPTY_PAYLOAD = "empty_payload"  # a header and no QUIC datagram after it


def encode_header(machine_id: str) -> bytes:
    """The prefix a client puts in front of every QUIC datagram (``ValueError`` if empty)."""
    raw = machine_id.encode("utf-8")
    if not raw:
        raise ValueError("machine_id must not be empty")
    return _ID_LENGTH.pack(len(raw)) + raw


def decode_header(data: bytes, max_id_bytes: int) -> tuple[str, int] | HeaderFault:
    """``(machine_id, offset of the QUIC datagram)`` or why ``data`` has no valid header."""
    size = len(data)
    if size < HEADER_SIZE:
        return HeaderFault.SHORT
    id_len: int = _ID_LENGTH.unpack_from(data)[0]
    if id_len == 0:
        return HeaderFault.EMPTY_ID
    if id_len > max_id_bytes:  # before any arithmetic with id_len
        return HeaderFault.ID_TOO_LONG
    end = HEADER_SIZE + id_len
    if end > size:
        return HeaderFault.TRUNCATED
    if end == size:
        return HeaderFault.EMPTY_PAYLOAD
    try:
        machine_id = data[HEADER_SIZE:end].decode("utf-8")  # strict: no surrogates, overlongs
    except UnicodeDecodeError:
        return HeaderFault.NON_UTF8
    if not machine_id.isprintable():
        # Ids end up in logs and the status page; control characters are never legitimate.
        return HeaderFault.BAD_ID
    return machine_id, end


__all__ = ["HEADER_SIZE", "HeaderFault", "decode_header", "encode_header"]
