"""The vault-proxy wire format: the original's vector, strict decoding, and a decoder fuzz."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flyvault.errors import ConfigError
from flyvault.proxy.wire import (
    MALFORMED,
    Drop,
    decode,
    destination_cid,
    encode,
    encode_header,
    source_cid,
)
from flyvault.transport.endpoint import (
    MAX_DATAGRAM_SIZE,
    MAX_WRAPPED_DATAGRAM_SIZE,
    PROXY_MAX_ID_BYTES,
    proxy_prefix,
    proxy_wrapper,
)


def test_the_originals_test_vector() -> None:
    assert encode_header("machine-123") == bytes.fromhex("0b00000000000000") + b"machine-123"
    # The client's wrapper writes the same bytes the proxy decodes.
    assert proxy_prefix("machine-123") == encode_header("machine-123")
    assert proxy_wrapper("machine-123")(b"\xc3quic") == encode("machine-123", b"\xc3quic")
    assert decode(encode("machine-123", b"\xc3quic")) == ("machine-123", 19)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", Drop.SHORT),
        (b"\x0b\x00\x00", Drop.SHORT),
        (bytes(8), Drop.EMPTY_ID),
        (bytes(8) + b"payload", Drop.EMPTY_ID),
        ((2**64 - 8).to_bytes(8, "little"), Drop.ID_TOO_LONG),  # the original's crash
        ((2**64 - 8).to_bytes(8, "little") + b"x" * 100, Drop.ID_TOO_LONG),
        ((2**64 - 1).to_bytes(8, "little") + b"x", Drop.ID_TOO_LONG),
        ((65).to_bytes(8, "little") + b"x" * 200, Drop.ID_TOO_LONG),
        ((11).to_bytes(8, "little") + b"machine", Drop.TRUNCATED),
        ((11).to_bytes(8, "little") + b"machine-123", Drop.EMPTY_PAYLOAD),
        ((2).to_bytes(8, "little") + b"\xff\xfe" + b"q", Drop.NON_UTF8),
        ((2).to_bytes(8, "little") + b"\xc0\x80" + b"q", Drop.NON_UTF8),  # overlong NUL
        ((3).to_bytes(8, "little") + b"\xed\xa0\x80" + b"q", Drop.NON_UTF8),  # surrogate
        ((2).to_bytes(8, "little") + b"a\n" + b"q", Drop.BAD_ID),
        ((4).to_bytes(8, "little") + b"\x1b[2J" + b"q", Drop.BAD_ID),
    ],
)
def test_malformed_packets_are_dropped_with_a_reason(packet: bytes, reason: Drop) -> None:
    assert decode(packet) is reason


def test_the_id_cap_is_configurable() -> None:
    packet = encode("x" * 100, b"\xc3")
    assert decode(packet) is Drop.ID_TOO_LONG
    assert decode(packet, max_id_bytes=100) == ("x" * 100, 108)


def _reference(data: bytes, cap: int) -> tuple[str, int] | Drop:
    """The rules written out the slow, obvious way."""
    if len(data) < 8:
        return Drop.SHORT
    n = int.from_bytes(data[:8], "little")
    if n == 0:
        return Drop.EMPTY_ID
    if n > cap:
        return Drop.ID_TOO_LONG
    if len(data) < 8 + n:
        return Drop.TRUNCATED
    if len(data) == 8 + n:
        return Drop.EMPTY_PAYLOAD
    try:
        text = data[8 : 8 + n].decode("utf-8")
    except UnicodeDecodeError:
        return Drop.NON_UTF8
    return (text, 8 + n) if text.isprintable() else Drop.BAD_ID


def test_decoder_fuzz_agrees_with_the_rules() -> None:
    """200,000 random and near-miss inputs: never an exception, always the documented answer."""
    rng = random.Random(6)
    for i in range(200_000):
        if i % 3 == 0:
            data = os.urandom(rng.randrange(0, 64))
        elif i % 3 == 1:
            length = rng.choice([rng.randrange(0, 70), 2**64 - 8, 2**64 - rng.randrange(1, 9)])
            data = length.to_bytes(8, "little") + os.urandom(rng.randrange(0, 80))
        else:
            ident = rng.choice(["148e21ea7e46e8", "é-machine", "m"])
            data = encode(ident, os.urandom(rng.randrange(0, 3)))
            data = data[: rng.randrange(0, len(data) + 1)]
        assert decode(data) == _reference(data, 64)


@settings(max_examples=300, deadline=None)
@given(
    machine_id=st.text(min_size=1, max_size=64).filter(
        lambda t: t.isprintable() and len(t.encode()) <= 64
    ),
    payload=st.binary(min_size=1, max_size=1500),
)
def test_encode_decode_round_trip(machine_id: str, payload: bytes) -> None:
    data = encode(machine_id, payload)
    decoded = decode(data)
    assert isinstance(decoded, tuple)
    assert decoded[0] == machine_id and data[decoded[1] :] == payload


def test_quic_header_invariants() -> None:
    long_header = b"\xc3\x00\x00\x00\x01\x08" + b"D" * 8 + b"\x04" + b"SSSS" + b"rest"
    assert destination_cid(long_header, 0, 8) == b"D" * 8
    assert source_cid(long_header) == b"SSSS"
    assert destination_cid(b"\x43" + b"E" * 8 + b"data", 0, 8) == b"E" * 8
    assert destination_cid(b"\x43" + b"E" * 4, 0, 8) is None  # too short for the CID
    assert destination_cid(b"\x03" + b"E" * 8, 0, 8) is None  # fixed bit clear
    assert destination_cid(b"\xc3\x00\x00\x00\x01\x15" + bytes(30), 0, 8) is None  # 21 > 20
    assert destination_cid(b"\xc3\x00\x00", 0, 8) is None
    assert source_cid(b"\x43" + bytes(20)) is None  # short headers carry no SCID
    assert source_cid(b"\xc3\x00\x00\x00\x01\x08" + bytes(8) + b"\x09" + bytes(3)) is None
    rng = random.Random(7)
    for _ in range(20_000):
        data = os.urandom(rng.randrange(0, 40))
        cid = destination_cid(data, 0, 8)
        assert cid is None or len(cid) <= 20
        scid = source_cid(data)
        assert scid is None or len(scid) <= 20


def test_client_wrapped_datagrams_fit_the_ipv6_minimum_mtu() -> None:
    assert MAX_WRAPPED_DATAGRAM_SIZE == 1232 == 1280 - 40 - 8
    longest = "m" * PROXY_MAX_ID_BYTES
    assert len(proxy_wrapper(longest)(bytes(MAX_DATAGRAM_SIZE))) == MAX_WRAPPED_DATAGRAM_SIZE
    with pytest.raises(ConfigError, match="at most 24"):
        proxy_wrapper("m" * (PROXY_MAX_ID_BYTES + 1))
    with pytest.raises(ConfigError, match="must not be empty"):
        proxy_wrapper("")
    with pytest.raises(ValueError, match="must not be empty"):
        encode_header("")


def test_one_header_rule_for_both_ends() -> None:
    """The client's prefix and the proxy's decoder are the same code in flyvault.protocol."""
    from flyvault.protocol import proxy_header
    from flyvault.proxy import wire

    assert wire.encode_header is proxy_header.encode_header
    assert wire.HEADER_SIZE == proxy_header.HEADER_SIZE
    # Every fault of the header is a malformed-packet drop of the same name.
    assert {Drop(fault.value) for fault in proxy_header.HeaderFault} <= MALFORMED
    assert proxy_header.decode_header(proxy_prefix("m-1") + b"q", 24) == ("m-1", 11)
