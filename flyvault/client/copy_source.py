"""The sending side of a tree copy: local trees (or a tar on stdin) as tar pieces.

``scan`` walks the local sources once, before anything is sent, so the totals for the
progress bar are known and a directory given without ``-r`` is refused up front.
``tree_pieces`` then streams them as one pax tar with a ``MemberDigest`` after each regular
file's data, hashing while reading (each file is read once). Symlinks stay symlinks unless
``follow_symlinks``; files with several links inside the copy become tar hardlinks; sockets,
FIFOs and device nodes are skipped and reported (reading a FIFO would block forever, and
the vault refuses device nodes anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import os
import posixpath
import pwd
import stat
import tarfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any, BinaryIO

from flyvault.errors import FileOpError, NotFoundError, UsageError
from flyvault.protocol.tar_stream import (
    END_OF_ARCHIVE,
    ArchiveEnded,
    DataReceived,
    FileEnded,
    MemberStarted,
    PieceBatcher,
    TarReader,
    header,
    padding,
)

CHUNK = 256 * 1024


@dataclass(frozen=True)
class LocalEntry:
    info: tarfile.TarInfo
    path: str  # the local path (read for regular files)


@dataclass
class LocalTree:
    entries: list[LocalEntry] = field(default_factory=list)
    bytes: int = 0
    files: int = 0
    skipped: list[str] = field(default_factory=list)


def scan(
    paths: list[tuple[str, str]], *, recursive: bool, follow_symlinks: bool, preserve: bool
) -> LocalTree:
    """``paths``: (local path, name in the archive). Raises before anything is sent."""
    tree = LocalTree()
    links: dict[tuple[int, int], str] = {}
    for path, name in paths:
        try:
            # A symlink named on the command line is followed, as scp does (cp -r: with -H).
            info = os.stat(path)
        except FileNotFoundError:
            raise NotFoundError(f"{path}: no such file or directory (ENOENT)") from None
        except OSError as exc:
            raise FileOpError(_os_words(path, exc)) from None
        if stat.S_ISDIR(info.st_mode) and not recursive:
            raise UsageError(
                f"{path} is a directory: copying a directory needs -r",
                hint=f"fly-vault cp -r {path} ...",
            )
        _add(tree, path, name, info, links, follow_symlinks, preserve, set())
    return tree


def _add(
    tree: LocalTree,
    path: str,
    name: str,
    info: os.stat_result,
    links: dict[tuple[int, int], str],
    follow: bool,
    preserve: bool,
    ancestors: set[tuple[int, int]],
) -> None:
    """``path`` and all below it, depth first in name order, with a stack of its own: a
    chain of a thousand directories went past Python's recursion limit."""
    todo: list[tuple[str, str, os.stat_result | None, frozenset[tuple[int, int]]]] = [
        (path, name, info, frozenset(ancestors))
    ]
    while todo:
        path, name, found, above = todo.pop()
        if found is None:
            found = os.stat(path, follow_symlinks=False)
            if follow and stat.S_ISLNK(found.st_mode):
                # A dangling symlink is copied as the symlink it is.
                with contextlib.suppress(OSError):
                    found = os.stat(path)
        children = _add_one(tree, path, name, found, links, preserve, above)
        if children:
            below = above | {(found.st_dev, found.st_ino)}
            todo.extend(
                (child.path, f"{name}/{child.name}", None, below) for child in reversed(children)
            )


def _add_one(
    tree: LocalTree,
    path: str,
    name: str,
    info: os.stat_result,
    links: dict[tuple[int, int], str],
    preserve: bool,
    ancestors: frozenset[tuple[int, int]],
) -> list[os.DirEntry[str]]:
    """One entry; a directory's children (sorted by name) are returned, to be added next."""
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        entry = _tar_info(name, info, preserve, tarfile.SYMTYPE)
        entry.linkname = os.readlink(path)
        tree.entries.append(LocalEntry(entry, path))
    elif stat.S_ISREG(mode):
        key = (info.st_dev, info.st_ino)
        if info.st_nlink > 1 and key in links:
            entry = _tar_info(name, info, preserve, tarfile.LNKTYPE)
            entry.linkname = links[key]
        else:
            links[key] = name
            entry = _tar_info(name, info, preserve, tarfile.REGTYPE)
            entry.size = info.st_size
            tree.bytes += info.st_size
        tree.files += 1
        tree.entries.append(LocalEntry(entry, path))
    elif stat.S_ISDIR(mode):
        if (info.st_dev, info.st_ino) in ancestors:  # -L through a symlink to an ancestor
            tree.skipped.append(f"{path} (a symlink loop)")
            return []
        tree.entries.append(LocalEntry(_tar_info(name, info, preserve, tarfile.DIRTYPE), path))
        try:
            return sorted(os.scandir(path), key=lambda child: child.name)
        except OSError as exc:
            raise FileOpError(_os_words(path, exc)) from None
    else:
        kind = "socket" if stat.S_ISSOCK(mode) else "FIFO" if stat.S_ISFIFO(mode) else "device"
        tree.skipped.append(f"{path} (a {kind})")
    return []


def _tar_info(name: str, info: os.stat_result, preserve: bool, kind: bytes) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type = kind
    entry.mode = stat.S_IMODE(info.st_mode)
    entry.uid, entry.gid = info.st_uid, info.st_gid
    entry.uname, entry.gname = _user(info.st_uid), _group(info.st_gid)
    seconds, nanos = divmod(info.st_mtime_ns, 1_000_000_000)
    entry.mtime = seconds
    if preserve and nanos:
        entry.pax_headers = {"mtime": f"{seconds}.{nanos:09d}"}
    return entry


@cache
def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@cache
def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


def _os_words(path: str, exc: OSError) -> str:
    import errno

    code = errno.errorcode.get(exc.errno or 0, "EIO")
    return f"{path}: {(exc.strerror or str(exc)).lower()} ({code})"


Digest = Callable[[str, int, str], object]


async def tree_pieces(
    tree: LocalTree,
    digest: Digest,
    on_bytes: Callable[[int], None],
    on_file: Callable[[str], None],
) -> AsyncIterator[bytes | object]:
    """The pax stream of ``tree``: header, data, padding, and ``digest(name, size, sha256)``.

    Small members are joined into pieces of at most CHUNK bytes, each followed by the
    digests of the files whose data ended in it (``PieceBatcher``)."""
    batch: PieceBatcher[object] = PieceBatcher(CHUNK)
    for entry in tree.entries:
        info = entry.info
        if info.type == tarfile.REGTYPE:
            sha = hashlib.sha256()
            for piece in batch.add(header(info)):
                yield piece
            try:
                for data in _file_data(entry.path, info, sha, on_bytes):
                    for piece in batch.add(data):
                        yield piece
            except (OSError, FileOpError) as exc:
                # The files that ended before this one go with their digests, so they land
                # (the consumer then ends the stream; this file's part is refused there).
                for piece in batch.rest():
                    yield piece
                if isinstance(exc, FileOpError):
                    raise
                raise FileOpError(_os_words(entry.path, exc)) from None
            for piece in batch.add(padding(info.size)):
                yield piece
            batch.digest(digest(info.name, info.size, sha.hexdigest()))
        else:
            for piece in batch.add(header(info)):
                yield piece
        if info.type in (tarfile.REGTYPE, tarfile.LNKTYPE):
            on_file(info.name)
    for piece in [*batch.add(END_OF_ARCHIVE), *batch.rest()]:
        yield piece


def _file_data(
    path: str, info: tarfile.TarInfo, sha: Any, on_bytes: Callable[[int], None]
) -> Iterator[bytes]:
    """The data of one regular file, in chunks of at most CHUNK, hashed as read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        remaining = info.size
        while remaining:
            data = os.read(fd, min(CHUNK, remaining))
            if not data:
                raise FileOpError(f"{path}: shrank while it was being copied; copy again")
            remaining -= len(data)
            sha.update(data)
            on_bytes(len(data))
            yield data
    finally:
        os.close(fd)


async def stdin_tree_pieces(
    stdin: BinaryIO,
    digest: Digest,
    on_bytes: Callable[[int], None],
    on_file: Callable[[str], None],
) -> AsyncIterator[bytes | object]:
    """A tar read from standard input, re-emitted with digests (names are checked by the
    vault, which extracts it as strictly as any archive)."""
    reader = TarReader(expect_digests=False)
    name = ""  # the current member's name as sent (normalized: `tar -c .` writes "./x")
    while not reader.ended:
        data = await asyncio.to_thread(_read_some, stdin)
        if not data:
            reader.close()  # raises: no end-of-archive marker
        for event in reader.feed(data):
            if isinstance(event, MemberStarted):
                info = event.info
                info.name = posixpath.normpath(info.name) if info.name else info.name
                name = info.name
                seconds, nanos = divmod(event.mtime_ns, 1_000_000_000)
                info.mtime = seconds
                info.pax_headers = {"mtime": f"{seconds}.{nanos:09d}"} if nanos else {}
                yield header(info)
            elif isinstance(event, DataReceived):
                on_bytes(len(event.data))
                yield event.data
            elif isinstance(event, FileEnded):
                yield digest(name, event.size, event.sha256)
                yield padding(event.size)
                on_file(event.name)
            elif isinstance(event, ArchiveEnded):
                yield END_OF_ARCHIVE


def _read_some(stream: BinaryIO) -> bytes:
    read1 = getattr(stream, "read1", None)
    return bytes(read1(CHUNK) if read1 is not None else stream.read(CHUNK))
