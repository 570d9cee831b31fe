"""The tar streams of ``fly-vault cp``: a strict push parser and the writer's pieces.

Theory of operation. A tree crosses the wire as one POSIX (pax) tar stream, with a
``MemberDigest`` after each regular file's data (``RemoteFiles.tar_get`` / ``tar_put``).
``TarReader`` is sans-I/O: bytes go in (``feed``), digests go in (``digest``), past-tense
events come out. It parses headers itself, with ``tar_header.decode_header`` for the 512-byte
block only, because the stream from a vault is untrusted input: every size is bounded
before anything is buffered, GNU sparse maps and global headers are refused, a member's data
never reaches the caller without its header having been parsed first, and a regular file is
only reported ``Verified`` once the vault's digest matched the bytes this side hashed.

While a digest is awaited the reader parses nothing further (bytes are held, bounded), so
wherever the sender puts the digest (right after the data, after the padding, or after the
frame of joined members the data ended in) the extractor never sees a later member before
the current file is settled.

The same reader parses a plain tar (``expect_digests=False``: standard input with ``-r``),
reporting each file's SHA-256 in ``FileEnded`` so the writer can add the digests.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from typing import Generic, TypeVar, final

from flyvault.errors import IntegrityError, RemoteProtocolError

from .tar_header import decode_header, encode_header

BLOCK = 512
#: The end-of-archive marker tarfile writes (two zero blocks).
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
#: A pax extended header or GNU long name larger than this is refused, not buffered.
MAX_META_BYTES = 1024 * 1024
#: Bytes held while a file's digest is awaited: what followed its data in the frames that
#: came before the digest (our senders put it within 512 KiB).
MAX_HELD_BYTES = 4 * 1024 * 1024
#: Types that carry data in the archive.
DATA_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


class TarStreamError(RemoteProtocolError):
    """The tar stream is malformed (truncated, a bad header, a digest out of place)."""


@final
@dataclass(frozen=True)
class MemberStarted:
    """A member's header, pax records applied; ``mtime_ns`` is exact (pax decimal)."""

    info: tarfile.TarInfo
    mtime_ns: int


@final
@dataclass(frozen=True)
class DataReceived:
    data: bytes


@final
@dataclass(frozen=True)
class FileEnded:
    name: str
    size: int
    sha256: str


@final
@dataclass(frozen=True)
class Verified:
    """The sender's digest of the last file matched what was received."""

    name: str


@final
@dataclass(frozen=True)
class ArchiveEnded:
    pass


TarEvent = MemberStarted | DataReceived | FileEnded | Verified | ArchiveEnded


#: A sender's digest, as it hands it to ``PieceBatcher`` (never ``bytes``).
Digest = TypeVar("Digest")


class PieceBatcher(Generic[Digest]):
    """A sender's tar bytes joined into pieces of at most ``limit`` bytes (a frame each), each
    followed by the digests of the files whose data ended in it: a tree of small files costs
    about one frame per file (its digest) instead of two. The receiver holds what follows a
    file's data until its digest comes (``TarReader``), so it holds at most a piece."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._digests: list[Digest] = []

    def add(self, data: bytes) -> list[bytes | Digest]:
        """Adds ``data`` (at most ``limit``); returns what must go first to keep the limit."""
        pieces = self.rest() if self._size + len(data) > self.limit else []
        if data:
            self._parts.append(data)
            self._size += len(data)
        return pieces

    def digest(self, digest: Digest) -> None:
        """The digest of the file whose data ``add`` took last: it goes after this piece."""
        self._digests.append(digest)

    def rest(self) -> list[bytes | Digest]:
        """The bytes so far as one piece (a lone part is not copied), then the digests."""
        pieces: list[bytes | Digest] = []
        if self._parts:
            parts = self._parts
            pieces.append(parts[0] if len(parts) == 1 else b"".join(parts))
        pieces += self._digests
        self._parts, self._size, self._digests = [], 0, []
        return pieces


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def header(info: tarfile.TarInfo) -> bytes:
    """The pax header block(s) of ``info`` (names beyond ustar's limits go in pax records)."""
    return encode_header(info)


def mtime_ns_of(text: str) -> int:
    """A pax ``mtime`` ("1700000000.123456789") in nanoseconds, without float rounding."""
    whole, _, fraction = text.strip().partition(".")
    negative = whole.startswith("-")
    seconds = int(whole or "0")
    nanos = int((fraction + "000000000")[:9]) if fraction else 0
    return seconds * 1_000_000_000 + (-nanos if negative else nanos)


class TarReader:
    """Push parser of one tar stream; see the module's theory of operation."""

    def __init__(self, *, expect_digests: bool, sender: str = "the vault") -> None:
        self._expect = expect_digests
        #: Who sent the stream, as error messages name it.
        self._sender = sender
        #: Bytes fed and not yet parsed are ``self._held[self._at:]``: parsing moves the
        #: offset, so a feed of many small members is not copied once per member.
        self._held = b""
        self._at = 0
        self._state = "header"  # header | meta | data | padding | digest | ended
        self._remaining = 0
        self._meta_kind = ""
        self._meta = bytearray()
        self._meta_size = 0
        self._pax: dict[str, str] = {}
        self._long_name: str | None = None
        self._long_link: str | None = None
        self._member: tarfile.TarInfo | None = None
        self._hash = hashlib.sha256()
        self._last: FileEnded | None = None
        self.last_name = ""

    @property
    def ended(self) -> bool:
        return self._state == "ended"

    def feed(self, data: bytes) -> list[TarEvent]:
        if self._state == "ended":
            return []  # what follows the marker (tar's record padding) is ignored
        if self._at < len(self._held):
            self._held = self._held[self._at :] + data
        else:
            self._held = bytes(data)
        self._at = 0
        if self._state == "digest" and len(self._held) > MAX_HELD_BYTES:
            raise TarStreamError(
                f"{self._sender} sent no digest after {self.last_name!r}; the stream is malformed"
            )
        return self._parse()

    def digest(self, name: str, size: int, sha256: str) -> list[TarEvent]:
        """The sender's digest of the file that just ended."""
        last = self._last
        if self._state != "digest" or last is None:
            raise TarStreamError(f"a digest for {name!r} arrived where none was due")
        if (name.rstrip("/"), size) != (last.name, last.size):
            raise TarStreamError(
                f"a digest for {name!r} ({size} bytes) arrived after {last.name!r} "
                f"({last.size} bytes)"
            )
        if sha256.lower() != last.sha256:
            raise IntegrityError(
                f"{last.name}: SHA-256 mismatch: received {last.sha256}, {self._sender} read "
                f"{sha256}; the data was corrupted in transit or the file changed while it "
                "was copied; not stored: copy it again"
            )
        self._state = "padding" if self._remaining else "header"
        self._last = None
        return [Verified(last.name), *self._parse()]

    def close(self) -> None:
        """The stream ended: it must have ended with the end-of-archive marker."""
        if self._state != "ended":
            after = f" after {self.last_name!r}" if self.last_name else ""
            raise TarStreamError(
                f"the tar stream ended{after} without its end-of-archive marker; the "
                "transfer was cut short: copy it again"
            )

    # -- parsing ------------------------------------------------------------------------

    def _parse(self) -> list[TarEvent]:
        events: list[TarEvent] = []
        while self._state not in ("digest", "ended"):
            if self._state == "data":
                if self._at == len(self._held):
                    break
                events.extend(self._data())
            elif self._state in ("padding", "meta"):
                if not self._skip_or_collect():
                    break
            else:  # header
                if len(self._held) - self._at < BLOCK:
                    break
                block = self._held[self._at : self._at + BLOCK]
                self._at += BLOCK
                events.extend(self._header(block))
        return events

    def _data(self) -> list[TarEvent]:
        take = min(self._remaining, len(self._held) - self._at)
        chunk = self._held[self._at : self._at + take]  # the object itself when it is all
        self._at += take
        self._remaining -= take
        self._hash.update(chunk)
        events: list[TarEvent] = [DataReceived(chunk)]
        if self._remaining == 0:
            events.append(self._file_ended())
        return events

    def _file_ended(self) -> FileEnded:
        member = self._member
        assert member is not None
        ended = FileEnded(member.name, member.size, self._hash.hexdigest())
        self._remaining = -member.size % BLOCK
        if self._expect:
            self._last = ended
            self._state = "digest"
        else:
            self._state = "padding" if self._remaining else "header"
        return ended

    def _skip_or_collect(self) -> bool:
        take = min(self._remaining, len(self._held) - self._at)
        if self._state == "meta":
            self._meta += self._held[self._at : self._at + take]
        self._at += take
        self._remaining -= take
        if self._remaining:
            return False
        if self._state == "meta":
            self._finish_meta()
        else:
            self._state = "header"
        return True

    def _header(self, block: bytes) -> list[TarEvent]:
        if block == b"\0" * BLOCK:
            self._state = "ended"
            return [ArchiveEnded()]
        try:
            info = decode_header(block)
        except tarfile.HeaderError as exc:
            after = f" after {self.last_name!r}" if self.last_name else ""
            raise TarStreamError(f"the tar stream has a bad header{after} ({exc})") from None
        if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if not 0 <= info.size <= MAX_META_BYTES:
                raise TarStreamError(
                    f"the tar stream has an extended header of {info.size} bytes after "
                    f"{self.last_name!r} (at most {MAX_META_BYTES})"
                )
            self._meta_kind = info.type.decode()
            self._meta = bytearray()
            # The padding is collected too and cut off when the record is parsed.
            self._remaining = info.size + -info.size % BLOCK
            self._meta_size = info.size
            self._state = "meta"
            return []
        if info.type in (tarfile.XGLTYPE, tarfile.GNUTYPE_SPARSE):
            raise TarStreamError(
                f"the tar stream has an unsupported header type {info.type!r} after "
                f"{self.last_name!r}"
            )
        return self._member_started(info)

    def _finish_meta(self) -> None:
        payload = bytes(self._meta[: self._meta_size])
        if self._meta_kind == "x":
            self._pax.update(_pax_records(payload, self.last_name))
        else:
            text = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
            if self._meta_kind == "L":
                self._long_name = text
            else:
                self._long_link = text
        self._state = "header"

    def _member_started(self, info: tarfile.TarInfo) -> list[TarEvent]:
        pax, self._pax = self._pax, {}
        mtime_ns = int(info.mtime) * 1_000_000_000
        if self._long_name is not None:
            info.name, self._long_name = self._long_name, None
        if self._long_link is not None:
            info.linkname, self._long_link = self._long_link, None
        if any(key.startswith("GNU.sparse") for key in pax):
            raise TarStreamError(f"{pax.get('path', info.name)!r}: sparse tar members are refused")
        try:
            info.name = pax.get("path", info.name)
            info.linkname = pax.get("linkpath", info.linkname)
            info.size = int(pax.get("size", info.size))
            info.uid = int(pax.get("uid", info.uid))
            info.gid = int(pax.get("gid", info.gid))
            info.uname = pax.get("uname", info.uname)
            info.gname = pax.get("gname", info.gname)
            if "mtime" in pax:
                mtime_ns = mtime_ns_of(pax["mtime"])
        except ValueError:
            raise TarStreamError(f"{info.name!r}: a malformed pax record") from None
        info.pax_headers = pax
        if info.type == tarfile.AREGTYPE and info.name.endswith("/"):
            info.type = tarfile.DIRTYPE
        info.name = info.name.rstrip("/") or info.name
        if info.size < 0 or (info.size and info.type not in DATA_TYPES):
            raise TarStreamError(f"{info.name!r}: a {info.type!r} member with a data size")
        self._member = info
        self.last_name = info.name
        events: list[TarEvent] = [MemberStarted(info, mtime_ns)]
        if info.type in DATA_TYPES:
            self._hash = hashlib.sha256()
            self._remaining = info.size
            if info.size == 0:
                events.append(self._file_ended())
            else:
                self._state = "data"
        return events


def _pax_records(payload: bytes, last: str) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records; any malformed one refuses the stream."""
    records: dict[str, str] = {}
    position = 0
    while position < len(payload):
        if payload[position:].strip(b"\0") == b"":
            break
        space = payload.find(b" ", position)
        try:
            length = int(payload[position:space])
        except ValueError:
            length = 0
        record = payload[position : position + length]
        if space < 0 or length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise TarStreamError(f"a malformed pax header after {last!r}")
        key, _, value = record[space - position + 1 : -1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records
