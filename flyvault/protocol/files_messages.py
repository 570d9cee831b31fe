"""The file stream's values (tag 0x05): the request, file records, member digests, results.

Requests, records and results travel as small JSON objects (bounded by ``MAX_JSON``); every
decoder checks each field's type and range and raises ``RemoteProtocolError`` naming the
field, never ``KeyError`` or ``TypeError``. Bulk data never goes through JSON: it is carried
by DATA frames (``FileFrame.DATA``) of at most ``MAX_DATA`` bytes.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Final, Literal, cast

from flyvault.errors import LocalProtocolError, RemoteProtocolError

#: Largest DATA frame (what a reader sends per frame, what a writer may send).
MAX_DATA: Final = 256 * 1024
#: Largest JSON frame: a request, a result, one batch of records.
MAX_JSON: Final = 256 * 1024
#: Records per ITEMS frame in a listing (a record is well under 1 KiB of JSON).
ITEMS_PER_FRAME: Final = 128
MAX_PATH: Final = 4096
MAX_PATHS: Final = 1024
MAX_LIST_LIMIT: Final = 1_000_000
MAX_RESUME_KEY: Final = 128
#: The pax record of a tar_get member deferred by ``defer_above`` (its real size).
DEFERRED_RECORD: Final = "FLYVAULT.deferred"
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: ``expect_sha256`` value meaning "the file must not exist" (a create that never replaces).
EXPECT_ABSENT: Final = "absent"
_U64_MAX: Final = 2**64 - 1


class FileFrame(enum.IntEnum):
    #: C->S, first frame: the request (JSON).
    REQUEST = 0x01
    #: Both ways: bulk bytes (file data, tar bytes).
    DATA = 0x02
    #: Both ways in tree streams: a MemberDigest (JSON) after a regular file's data.
    DIGEST = 0x03
    #: C->S: no more DATA/DIGEST (a write or tar_put is complete).
    END = 0x04
    #: C->S, write only, first after READY: ``u64`` offset the data starts at.
    RESUME_AT = 0x05
    #: S->C, write only: how much of a resumable partial the vault holds (JSON).
    READY = 0x10
    #: S->C, list only: a batch of FileInfo records (JSON array).
    ITEMS = 0x11
    #: S->C, last frame of a successful operation (JSON).
    RESULT = 0x12


class FileOp(enum.Enum):
    STAT = "stat"
    LIST = "list"
    READ = "read"
    WRITE = "write"
    SHA256 = "sha256"
    MKDIR = "mkdir"
    REMOVE = "remove"
    RENAME = "rename"
    CHMOD = "chmod"
    CHOWN = "chown"
    SET_MTIME = "set_mtime"
    READLINK = "readlink"
    SYMLINK = "symlink"
    TAR_GET = "tar_get"
    TAR_PUT = "tar_put"


#: Operations whose answer streams DATA (and DIGEST/ITEMS) before RESULT.
STREAMING_OPS: Final = frozenset({FileOp.READ, FileOp.TAR_GET, FileOp.LIST})
#: Operations the client streams DATA for (after READY for a write).
UPLOAD_OPS: Final = frozenset({FileOp.WRITE, FileOp.TAR_PUT})
#: Operations that change nothing on the vault: safe to ask again after a lost connection,
#: and safe to stop when their client leaves.
READING_OPS: Final = frozenset(
    {FileOp.STAT, FileOp.LIST, FileOp.READ, FileOp.SHA256, FileOp.READLINK, FileOp.TAR_GET}
)

FileKind = Literal["file", "dir", "symlink", "fifo", "socket", "char", "block"]
FILE_KINDS: Final = ("file", "dir", "symlink", "fifo", "socket", "char", "block")


def encode_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def decode_json(payload: bytes, what: str) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RemoteProtocolError(f"{what} is not valid JSON") from None
    except RecursionError:
        raise RemoteProtocolError(f"{what} is JSON nested too deeply") from None


def _object(payload: bytes, what: str) -> dict[str, Any]:
    value = decode_json(payload, what)
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} is not a JSON object")
    return value


def _int(value: object, what: str, low: int = 0, high: int = _U64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RemoteProtocolError(f"{what} must be an integer in {low}..{high}")
    return value


def _opt_int(value: object, what: str, low: int = 0, high: int = _U64_MAX) -> int | None:
    return None if value is None else _int(value, what, low, high)


def _str(value: object, what: str, limit: int = MAX_PATH) -> str:
    if not isinstance(value, str):
        raise RemoteProtocolError(f"{what} must be a string of at most {limit} bytes")
    try:  # a name's bytes that are not UTF-8 arrive escaped (\udc80-\udcff): those count
        size = len(value.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # any other lone surrogate (JSON may hold "\ud800")
        raise RemoteProtocolError(f"{what} holds a lone surrogate: not a name") from None
    if size > limit:
        raise RemoteProtocolError(f"{what} must be a string of at most {limit} bytes")
    if "\0" in value:
        raise RemoteProtocolError(f"{what} contains a NUL byte")
    return value


def _opt_str(value: object, what: str, limit: int = MAX_PATH) -> str | None:
    return None if value is None else _str(value, what, limit)


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise RemoteProtocolError(f"{what} must be true or false")
    return value


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise RemoteProtocolError(f"{what} must be 64 lower-case hex digits")
    return value


def _expectation(value: object) -> str | None:
    if value is None or value == EXPECT_ABSENT:
        return value
    return _digest(value, "file request: expect_sha256")


def valid_digest(value: str) -> bool:
    return bool(_HEX64.fullmatch(value))


@dataclass(frozen=True, slots=True)
class FileRequest:
    """C->S: one operation. Fields an operation does not use keep their defaults."""

    op: FileOp
    path: str = ""
    #: tar_get: the tops; rename: unused (``target`` is the destination).
    paths: tuple[str, ...] = ()
    #: Act as this account of the workload (None: root, or init's user in host mode).
    user: str | None = None
    follow: bool = False
    offset: int = 0
    length: int | None = None
    limit: int = 10_000
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    #: symlink: the link's target; rename: the destination path.
    target: str = ""
    size: int | None = None
    sha256: str | None = None
    resume_key: str | None = None
    #: write: compare-and-swap. The SHA-256 the target must have when the new file is
    #: renamed over it, or ``EXPECT_ABSENT`` (it must not exist); None: no check.
    expect_sha256: str | None = None
    fsync: bool = False
    parents: bool = False
    exist_ok: bool = False
    recursive: bool = False
    preserve: bool = False
    #: tar_get: a regular file larger than this (with a single link) is sent as a header
    #: only, size 0 and a ``FLYVAULT.deferred`` pax record holding its size, so the client
    #: fetches it with resumable ranged reads. None: every file travels in the stream.
    defer_above: int | None = None

    def encode(self) -> bytes:
        defaults = FileRequest(self.op)
        out: dict[str, object] = {"op": self.op.value}
        for name, value in asdict(self).items():
            if name != "op" and value != getattr(defaults, name):
                out[name] = list(value) if isinstance(value, tuple) else value
        return encode_json(out)

    @classmethod
    def decode(cls, payload: bytes) -> FileRequest:
        raw = _object(payload, "file request")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RemoteProtocolError(f"file request: unknown field {unknown[0]!r}")
        try:
            op = FileOp(raw.get("op"))
        except ValueError:
            raise RemoteProtocolError("file request: unknown op") from None
        paths_raw = raw.get("paths", [])
        if not isinstance(paths_raw, list) or len(paths_raw) > MAX_PATHS:
            raise RemoteProtocolError(f"file request: paths must be a list of at most {MAX_PATHS}")
        request = cls(
            op=op,
            path=_str(raw.get("path", ""), "file request: path"),
            paths=tuple(_str(p, "file request: paths[]") for p in paths_raw),
            user=_opt_str(raw.get("user"), "file request: user", 256),
            follow=_bool(raw.get("follow", False), "file request: follow"),
            offset=_int(raw.get("offset", 0), "file request: offset"),
            length=_opt_int(raw.get("length"), "file request: length"),
            limit=_int(raw.get("limit", 10_000), "file request: limit", 1, MAX_LIST_LIMIT),
            mode=_opt_int(raw.get("mode"), "file request: mode", 0, 0o7777),
            uid=_opt_int(raw.get("uid"), "file request: uid", 0, 2**32 - 2),
            gid=_opt_int(raw.get("gid"), "file request: gid", 0, 2**32 - 2),
            mtime_ns=_opt_int(raw.get("mtime_ns"), "file request: mtime_ns", -(2**63), 2**63 - 1),
            target=_str(raw.get("target", ""), "file request: target"),
            size=_opt_int(raw.get("size"), "file request: size"),
            sha256=None if raw.get("sha256") is None else _digest(raw["sha256"], "sha256"),
            resume_key=_opt_str(raw.get("resume_key"), "file request: resume_key", MAX_RESUME_KEY),
            expect_sha256=_expectation(raw.get("expect_sha256")),
            fsync=_bool(raw.get("fsync", False), "file request: fsync"),
            parents=_bool(raw.get("parents", False), "file request: parents"),
            exist_ok=_bool(raw.get("exist_ok", False), "file request: exist_ok"),
            recursive=_bool(raw.get("recursive", False), "file request: recursive"),
            preserve=_bool(raw.get("preserve", False), "file request: preserve"),
            defer_above=_opt_int(raw.get("defer_above"), "file request: defer_above"),
        )
        request.check()
        return request

    def check_local(self) -> None:
        """Before sending: a malformed request is our bug (the client API checks first)."""
        problem = request_problem(self)
        if problem:
            raise LocalProtocolError(f"file request ({self.op.value}): {problem}")

    def check(self) -> None:
        """What every op needs; raises RemoteProtocolError (the client checks first)."""
        problem = request_problem(self)
        if problem:
            raise RemoteProtocolError(f"file request ({self.op.value}): {problem}")


def request_problem(request: FileRequest) -> str | None:
    """Why ``request`` is malformed, or None. Shared by the client's argument checks."""
    op = request.op
    if op is FileOp.TAR_GET:
        if not request.paths:
            return "no paths"
        if any(not p for p in request.paths):
            return "an empty path"
        return None
    if not request.path:
        return "empty path"
    if op in (FileOp.RENAME, FileOp.SYMLINK) and not request.target:
        return "empty target" if op is FileOp.SYMLINK else "empty destination"
    if op is FileOp.CHMOD and request.mode is None:
        return "no mode"
    if op is FileOp.SET_MTIME and request.mtime_ns is None:
        return "no mtime"
    if op is FileOp.CHOWN and request.uid is None and request.gid is None:
        return "neither uid nor gid"
    if request.resume_key is not None and not request.resume_key:
        return "empty resume key"
    if request.expect_sha256 is not None:
        if op is not FileOp.WRITE:
            return "expect_sha256 belongs to write only"
        if request.expect_sha256 != EXPECT_ABSENT and not valid_digest(request.expect_sha256):
            return f"expect_sha256 must be 64 lower-case hex digits or {EXPECT_ABSENT!r}"
    return None


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One file as the vault sees it (lstat, or stat with ``follow``)."""

    path: str
    name: str
    kind: FileKind
    size: int
    mode: int
    uid: int
    gid: int
    owner: str | None
    group: str | None
    mtime_ns: int
    target: str | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> FileInfo:
        if not isinstance(raw, dict):
            raise RemoteProtocolError("file record is not a JSON object")
        kind = raw.get("kind")
        if kind not in FILE_KINDS:
            raise RemoteProtocolError("file record: unknown kind")
        return cls(
            path=_str(raw.get("path"), "file record: path"),
            name=_str(raw.get("name"), "file record: name"),
            kind=cast(FileKind, kind),
            size=_int(raw.get("size"), "file record: size"),
            mode=_int(raw.get("mode"), "file record: mode", 0, 0o7777),
            uid=_int(raw.get("uid"), "file record: uid", 0, 2**32 - 1),
            gid=_int(raw.get("gid"), "file record: gid", 0, 2**32 - 1),
            owner=_opt_str(raw.get("owner"), "file record: owner", 256),
            group=_opt_str(raw.get("group"), "file record: group", 256),
            mtime_ns=_int(raw.get("mtime_ns"), "file record: mtime_ns", -(2**63), 2**63 - 1),
            target=_opt_str(raw.get("target"), "file record: target"),
        )


def encode_items(items: list[FileInfo]) -> bytes:
    return encode_json([item.to_json() for item in items])


def decode_items(payload: bytes) -> tuple[FileInfo, ...]:
    raw = decode_json(payload, "file records")
    if not isinstance(raw, list) or len(raw) > ITEMS_PER_FRAME:
        raise RemoteProtocolError(f"file records: not a list of at most {ITEMS_PER_FRAME}")
    return tuple(FileInfo.from_json(item) for item in raw)


#: A name JSON writes as it is (printable ASCII but the quote and the backslash), and the
#: whole digest as ``encode_json`` writes it with such a name: nearly every digest. One comes
#: with every small file of a tree (10,000 a tree), so both ways skip the JSON machinery for
#: these; the result is the same, byte for byte and field for field (property-tested).
_PLAIN_NAME = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
_PLAIN_DIGEST = re.compile(
    rb'\{"name":"([\x20\x21\x23-\x5b\x5d-\x7e]*)","size":(0|[1-9][0-9]{0,19}),'
    rb'"sha256":"([0-9a-f]{64})"\}'
)


@dataclass(frozen=True, slots=True)
class MemberDigest:
    """In a tree stream, after a regular file member's data: its name, size and SHA-256."""

    name: str
    size: int
    sha256: str

    def encode(self) -> bytes:
        name, size, sha256 = self.name, self.size, self.sha256
        plain = type(name) is str and type(sha256) is str and type(size) is int  # no bool
        if plain and _PLAIN_NAME.fullmatch(name) and _HEX64.fullmatch(sha256) and size >= 0:
            return b'{"name":"%s","size":%d,"sha256":"%s"}' % (
                name.encode("ascii"),
                size,
                sha256.encode("ascii"),
            )
        return self.encode_json()

    def encode_json(self) -> bytes:
        """The general encoding (``encode`` gives the same bytes, faster, for most names)."""
        return encode_json({"name": self.name, "size": self.size, "sha256": self.sha256})

    @classmethod
    def decode(cls, payload: bytes) -> MemberDigest:
        plain = _PLAIN_DIGEST.fullmatch(payload)
        if plain is not None:
            name, size, sha256 = plain.groups()
            if len(name) <= MAX_PATH and int(size) <= _U64_MAX:
                return cls(name.decode("ascii"), int(size), sha256.decode("ascii"))
        return cls.decode_json(payload)

    @classmethod
    def decode_json(cls, payload: bytes) -> MemberDigest:
        """The general reading (``decode`` gives the same digest, or error, faster)."""
        raw = _object(payload, "member digest")
        return cls(
            _str(raw.get("name"), "member digest: name"),
            _int(raw.get("size"), "member digest: size"),
            _digest(raw.get("sha256"), "member digest: sha256"),
        )


@dataclass(frozen=True, slots=True)
class WriteReady:
    """S->C (READY): the resumable partial holds ``have`` bytes whose SHA-256 is ``sha256``
    (0 and the empty digest when there is none)."""

    have: int
    sha256: str

    def encode(self) -> bytes:
        return encode_json({"have": self.have, "sha256": self.sha256})

    @classmethod
    def decode(cls, payload: bytes) -> WriteReady:
        raw = _object(payload, "write ready")
        return cls(_int(raw.get("have"), "write ready: have"), _digest(raw.get("sha256"), "sha256"))


def encode_result(result: Mapping[str, object]) -> bytes:
    return encode_json(dict(result))


def decode_result(payload: bytes) -> dict[str, Any]:
    return _object(payload, "file result")


def result_int(result: Mapping[str, Any], name: str) -> int:
    return _int(result.get(name), f"file result: {name}")


def result_str(result: Mapping[str, Any], name: str, limit: int = MAX_PATH) -> str:
    return _str(result.get(name), f"file result: {name}", limit)


def result_digest(result: Mapping[str, Any], name: str = "sha256") -> str:
    return _digest(result.get(name), f"file result: {name}")
