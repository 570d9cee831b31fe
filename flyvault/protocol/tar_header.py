"""Tar header blocks, encoded and decoded without ``tarfile``'s general machinery.

Why: a tree of 10,000 small files spends more time in ``TarInfo.tobuf`` and ``frombuf``
(dictionaries, per-field helpers, two checksums) than in moving its bytes. The common case,
an ASCII name that fits ustar's fields and numbers that fit in octal, is a single
``struct`` call each way. Everything else (long or non-ASCII names, device nodes, base-256
numbers, signed checksums, sparse or GNU headers) goes to ``tarfile`` itself, so the output
is byte-identical to ``TarInfo.tobuf(PAX_FORMAT, "utf-8", "surrogateescape")`` and the
decoded fields identical to ``TarInfo.frombuf`` (tests/test_tar_header.py checks both).
"""

from __future__ import annotations

import struct
import tarfile
import zlib
from collections.abc import Mapping

BLOCK = 512
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
_POSIX_MAGIC = b"ustar\x0000"
_ZERO_BLOCK = bytes(BLOCK)
#: name mode uid gid size mtime chksum type linkname magic uname gname major minor prefix.
_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s12x")
_NO_DEVICE = bytes(8)
_PAX_NAME = b"././@PaxHeader"
#: Fields ``tarfile`` moves into pax records when they do not fit ustar; left to it.
_PAX_OVERRIDES = frozenset({"path", "linkpath", "uname", "gname", "size", "uid", "gid"})
_OCTAL_8 = 8**7
_OCTAL_12 = 8**11


def byte_sum(block: bytes | bytearray) -> int:
    """``sum(block)`` of a header block, the checksum's sum, in a quarter of the time.

    Why: ``sum`` walks the 512 bytes as Python ints (2-3 us, twice per file of a tree). With at
    most 256 non-zero bytes (any header but a long name's) the sum is at most 65,280, below
    Adler-32's modulus, so Adler-32's low half (1 + the byte sum, modulo 65,521) is exact."""
    if block.count(0) >= len(block) - 256:
        return (zlib.adler32(block) & 0xFFFF) - 1
    return sum(block)


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _ustar_block(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    kind: bytes,
    linkname: bytes = b"",
    uname: bytes = b"",
    gname: bytes = b"",
) -> bytes:
    block = bytearray(
        _USTAR.pack(
            name,
            _octal(mode & 0o7777, 8),
            _octal(uid, 8),
            _octal(gid, 8),
            _octal(size, 12),
            _octal(mtime, 12),
            b"        ",
            kind,
            linkname,
            _POSIX_MAGIC,
            uname,
            gname,
            _NO_DEVICE,
            _NO_DEVICE,
            b"",
        )
    )
    block[148:155] = b"%06o\0" % byte_sum(block)
    return bytes(block)


def _pax_records(pax: Mapping[str, str]) -> bytes:
    records = bytearray()
    for keyword, value in pax.items():
        body = b" %s=%s\n" % (keyword.encode(), value.encode())
        length = len(body)
        while len(str(length)) + len(body) != length:
            length = len(str(length)) + len(body)
        records += b"%d" % length + body
    return bytes(records)


def _fits_ustar(info: tarfile.TarInfo, name: str) -> bool:
    texts = (name, info.linkname, info.uname, info.gname)
    return (
        info.type not in (tarfile.CHRTYPE, tarfile.BLKTYPE)
        and all(text.isascii() for text in texts)
        and len(name) <= 100
        and len(info.linkname) <= 100
        and len(info.uname) <= 32
        and len(info.gname) <= 32
        and 0 <= info.uid < _OCTAL_8
        and 0 <= info.gid < _OCTAL_8
        and 0 <= info.size < _OCTAL_12
        and 0 <= info.mtime < _OCTAL_12
        and not _PAX_OVERRIDES.intersection(info.pax_headers)
        and all(k.isascii() and v.isascii() for k, v in info.pax_headers.items())
    )


def encode_header(info: tarfile.TarInfo) -> bytes:
    """``info.tobuf(PAX_FORMAT, "utf-8", "surrogateescape")``, in one step where it can be."""
    name = info.name
    if info.type == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    mtime = info.mtime
    if not _fits_ustar(info, name) or not isinstance(mtime, int):
        return info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)
    block = _ustar_block(
        name.encode(),
        info.mode,
        info.uid,
        info.gid,
        info.size,
        mtime,
        info.type,
        info.linkname.encode(),
        info.uname.encode(),
        info.gname.encode(),
    )
    if not info.pax_headers:
        return block
    records = _pax_records(info.pax_headers)
    extended = _ustar_block(_PAX_NAME, 0, 0, 0, len(records), 0, tarfile.XHDTYPE)
    return extended + records + bytes(-len(records) % BLOCK) + block


def _text(field: bytes) -> str:
    return field.partition(b"\0")[0].decode(_ENCODING, _ERRORS)


def _number(field: bytes) -> int:
    """An octal field, as ``tarfile.nti`` reads it; ValueError for anything else.

    ``int`` refuses what ``nti`` would not read as octal (base-256's high bytes, other
    non-ASCII bytes) and skips the spaces ``nti`` strips; a field of spaces alone, which
    ``nti`` reads as 0, raises here and so takes ``frombuf``'s path."""
    return int(field.partition(b"\0")[0] or b"0", 8)


def _device(field: bytes) -> int:
    """A device number: the NULs of a header that has none (ours) need no parsing."""
    return 0 if field == _NO_DEVICE else _number(field)


def decode_header(block: bytes) -> tarfile.TarInfo:
    """``TarInfo.frombuf(block, "utf-8", "surrogateescape")``, in one step for POSIX headers.

    Raises ``tarfile.HeaderError`` (through ``frombuf``) for a bad block, as ``frombuf`` does.
    """
    if len(block) != BLOCK or block[257:265] != _POSIX_MAGIC or block == _ZERO_BLOCK:
        return tarfile.TarInfo.frombuf(block, _ENCODING, _ERRORS)
    fields = _USTAR.unpack(block)
    kind: bytes = fields[7]
    try:
        mode, uid, gid, size, mtime, chksum = map(_number, fields[1:7])
        devmajor, devminor = _device(fields[12]), _device(fields[13])
    except ValueError:
        return tarfile.TarInfo.frombuf(block, _ENCODING, _ERRORS)
    unsigned = 256 + byte_sum(block) - sum(block[148:156])
    if chksum != unsigned or kind == tarfile.GNUTYPE_SPARSE:
        return tarfile.TarInfo.frombuf(block, _ENCODING, _ERRORS)  # signed sums, sparse maps
    info = tarfile.TarInfo(_text(fields[0]))
    info.mode, info.uid, info.gid, info.size, info.mtime = mode, uid, gid, size, mtime
    info.chksum, info.type = chksum, kind
    info.linkname, info.uname, info.gname = _text(fields[8]), _text(fields[10]), _text(fields[11])
    info.devmajor, info.devminor = devmajor, devminor
    if kind == tarfile.AREGTYPE and info.name.endswith("/"):
        info.type = tarfile.DIRTYPE
    if info.isdir():
        info.name = info.name.rstrip("/")
    prefix = _text(fields[14])
    if prefix and info.type not in tarfile.GNU_TYPES:
        info.name = prefix + "/" + info.name
    return info
