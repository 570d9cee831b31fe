"""``MemberDigest``'s plain fast path (one digest a file in every tree stream) against the
general JSON encoding and reading: the same bytes out, the same digest or error in."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flyvault.errors import RemoteProtocolError
from flyvault.protocol.files_messages import MAX_PATH, MemberDigest

HEX = st.text("0123456789abcdef", min_size=64, max_size=64)
ASCII = st.characters(min_codepoint=0, max_codepoint=0x7F)  # controls and DEL too
NAMES = st.one_of(
    st.text(ASCII, max_size=80),
    st.text(st.characters(exclude_categories=()), max_size=40),  # non-ASCII, lone surrogates
    st.sampled_from(["", "a" * MAX_PATH, "a" * (MAX_PATH + 1), 'q"uote', "back\\slash"]),
)
SIZES = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**64, -1, True, False]))


def both_ways(payload: bytes) -> tuple[object, object]:
    """What ``decode`` and ``decode_json`` make of ``payload``: a digest or the error text."""

    def outcome(read: object) -> object:
        try:
            return read(payload)  # type: ignore[operator]
        except RemoteProtocolError as exc:
            return ("error", str(exc))

    return outcome(MemberDigest.decode), outcome(MemberDigest.decode_json)


@settings(max_examples=400, deadline=None)
@given(name=NAMES, size=SIZES, sha256=st.one_of(HEX, st.text(max_size=70)))
def test_encode_writes_the_general_encodings_bytes(name: str, size: int, sha256: str) -> None:
    digest = MemberDigest(name, size, sha256)
    assert digest.encode() == digest.encode_json()


def _valid_name(name: str) -> bool:
    """What the readers accept: no NUL, at most MAX_PATH bytes, and no lone surrogate but
    the escaped bytes of a name that is not UTF-8 (\\udc80-\\udcff)."""
    try:
        return "\0" not in name and len(name.encode("utf-8", "surrogateescape")) <= MAX_PATH
    except UnicodeEncodeError:
        return False


@settings(max_examples=400, deadline=None)
@given(name=NAMES, size=SIZES, sha256=HEX)
@example(name="\ud800", size=0, sha256="0" * 64)  # found by this test: it raised UnicodeEncodeError
def test_decode_reads_what_the_general_reading_reads(name: str, size: int, sha256: str) -> None:
    payload = MemberDigest(name, size, sha256).encode()
    fast, general = both_ways(payload)
    assert fast == general
    if _valid_name(name) and type(size) is int and 0 <= size < 2**64:  # a bool is an error
        assert fast == MemberDigest(name, size, sha256)


@settings(max_examples=600, deadline=None)
@given(
    name=st.text(ASCII, max_size=20),
    at=st.integers(0, 200),
    byte=st.integers(0, 255),
    drop=st.booleans(),
)
def test_a_damaged_digest_reads_as_the_general_reading_reads_it(
    name: str, at: int, byte: int, drop: bool
) -> None:
    payload = bytearray(MemberDigest(name, 7, hashlib.sha256(b"x").hexdigest()).encode())
    at %= len(payload)
    if drop:
        del payload[at]
    else:
        payload[at] = byte
    fast, general = both_ways(bytes(payload))
    assert fast == general


@pytest.mark.parametrize(
    "payload",
    [
        b'{"name":"a","size":01,"sha256":"' + b"0" * 64 + b'"}',  # JSON has no leading zeros
        b'{"name":"a","size":18446744073709551616,"sha256":"' + b"0" * 64 + b'"}',
        b'{"name":"' + b"a" * (MAX_PATH + 1) + b'","size":1,"sha256":"' + b"0" * 64 + b'"}',
        b'{"name":"a","size":1,"sha256":"' + b"A" * 64 + b'"}',
    ],
)
def test_what_the_general_reading_refuses_is_refused(payload: bytes) -> None:
    fast, general = both_ways(payload)
    assert fast == general
    assert isinstance(fast, tuple) and fast[0] == "error"
