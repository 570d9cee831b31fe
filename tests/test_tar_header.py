"""The fast tar header codec is byte-identical to tarfile's, on every input it may see."""

from __future__ import annotations

import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flyvault.protocol.tar_header import decode_header, encode_header

ASCII_NAME = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=120
)
ANY_NAME = st.one_of(ASCII_NAME, st.text(min_size=1, max_size=60).filter(lambda s: "\0" not in s))
KINDS = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.FIFOTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
    ]
)


@st.composite
def members(draw: st.DrawFn) -> tarfile.TarInfo:
    info = tarfile.TarInfo(draw(ANY_NAME))
    info.type = draw(KINDS)
    info.mode = draw(st.integers(0, 0o177777))
    info.uid = draw(st.integers(0, 8**8))
    info.gid = draw(st.integers(0, 8**7 - 1))
    info.size = draw(st.integers(0, 8**12)) if info.type == tarfile.REGTYPE else 0
    info.mtime = draw(st.one_of(st.integers(0, 8**12), st.floats(0, 2e9)))
    info.uname = draw(st.one_of(st.just(""), st.just("root"), ANY_NAME))
    info.gname = draw(st.one_of(st.just(""), st.just("wheel"), ANY_NAME))
    if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = draw(ANY_NAME)
    if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = draw(st.integers(0, 255)), draw(st.integers(0, 255))
    records = draw(
        st.dictionaries(
            st.sampled_from(["mtime", "flyvault.deferred", "comment", "size"]),
            st.one_of(st.text(max_size=30), st.just("1700000000.123456789")),
            max_size=2,
        )
    )
    info.pax_headers = records
    return info


def _fields(info: tarfile.TarInfo) -> tuple[object, ...]:
    return (
        info.name,
        info.mode,
        info.uid,
        info.gid,
        info.size,
        info.mtime,
        info.chksum,
        info.type,
        info.linkname,
        info.uname,
        info.gname,
        info.devmajor,
        info.devminor,
    )


@settings(max_examples=600, deadline=None)
@given(members())
def test_encoding_matches_tarfile_byte_for_byte(info: tarfile.TarInfo) -> None:
    assert encode_header(info) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


@settings(max_examples=600, deadline=None)
@given(members())
def test_decoding_matches_tarfile_field_for_field(info: tarfile.TarInfo) -> None:
    encoded = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    for block in {encoded[:512], encoded[-512:]}:  # the pax header (if any), the ustar one
        ours = decode_header(block)
        theirs = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        assert _fields(ours) == _fields(theirs)


@settings(max_examples=400, deadline=None)
@given(members(), st.integers(0, 511), st.integers(0, 255))
def test_a_damaged_block_decodes_or_fails_as_tarfile_does(
    info: tarfile.TarInfo, at: int, value: int
) -> None:
    block = bytearray(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")[-512:])
    block[at] = value
    try:
        theirs = tarfile.TarInfo.frombuf(bytes(block), "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        with pytest.raises(type(exc)):
            decode_header(bytes(block))
        return
    assert _fields(decode_header(bytes(block))) == _fields(theirs)


def test_gnu_and_ustar_headers_of_other_tools_are_read() -> None:
    for fmt in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        info = tarfile.TarInfo("a/" * 40 + "leaf")
        info.size = 5
        block = info.tobuf(fmt, "utf-8", "surrogateescape")[-512:]
        theirs = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        assert _fields(decode_header(block)) == _fields(theirs)


@st.composite
def blocks(draw: st.DrawFn) -> bytes:
    """512 bytes, any number of them non-zero, the bytes at the edges included."""
    rng = draw(st.randoms(use_true_random=False))
    nonzero = draw(st.integers(0, 512))
    block = bytearray(512)
    for index in rng.sample(range(512), nonzero):
        block[index] = rng.choice((1, 0x20, 0x30, 0x7F, 0xFF))
    return bytes(block)


@settings(max_examples=200, deadline=None)
@given(blocks())
def test_the_checksums_byte_sum_is_exact(block: bytes) -> None:
    from flyvault.protocol.tar_header import byte_sum

    assert byte_sum(block) == sum(block)
    assert byte_sum(bytearray(block)) == sum(block)


def test_the_byte_sum_at_its_bound() -> None:
    """256 bytes of 0xFF is the most the Adler-32 path takes; one more takes ``sum``."""
    from flyvault.protocol.tar_header import byte_sum

    for nonzero in (255, 256, 257, 512):
        block = b"\xff" * nonzero + bytes(512 - nonzero)
        assert byte_sum(block) == sum(block) == 255 * nonzero
