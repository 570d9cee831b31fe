"""Sending to a vault: single files with ``RemoteFiles.write``, trees with ``tar_put``.

A single file is hashed as it is sent, and the digest goes with the write's END (a version 7
vault; an older one is given it up front, so there the file is hashed first): the vault
refuses, and removes its temporary file, when what it stored does not match. A file that
changes while it is sent is refused here. The write has a ``resume_key`` made of the source's
path, size and mtime and the destination: after a dropped connection the same call continues
after the prefix the vault verified. With ``-r`` everything goes as one tar stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import os
import posixpath
import tarfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, BinaryIO

from flyvault.errors import FileOpError, IntegrityError, NotFoundError, UsageError

from .copy_source import CHUNK, LocalEntry, LocalTree, scan, stdin_tree_pieces, tree_pieces

if TYPE_CHECKING:
    from .copy_engine import CopyEndpoint, CopySummary, _Options, _Tracker


async def upload(
    files: Any,
    sources: Sequence[CopyEndpoint],
    dest: str,
    options: _Options,
    tracker: _Tracker,
    stdin: BinaryIO | None,
) -> CopySummary:
    from .copy_engine import _remote_path

    if sources[0].stdio:
        return await _upload_stdin(files, dest, options, tracker, stdin)
    # Local checks first: a missing file or a directory without -r costs no round trip.
    locals_ = [source.path for source in sources]
    names = [os.path.basename(path.rstrip("/")) or path for path in locals_]
    if not options.recursive:
        named = scan(
            [(path, name) for path, name in zip(locals_, names, strict=True)],
            recursive=False,
            follow_symlinks=True,
            preserve=options.preserve,
        )
        if named.skipped:  # a FIFO would block for ever, /dev/zero read without end
            raise FileOpError(
                f"not a regular file: {', '.join(named.skipped)}; nothing was copied",
                hint="cp copies regular files, symlinks and (with -r) directories",
            )
    target = _remote_path(dest)
    info = await _stat_or_none(files, target)
    if info is not None and info.kind == "dir":
        into, new_names = target, names
    else:
        if len(sources) > 1:
            raise UsageError(
                f"{dest}: not a directory on the vault; several sources need an existing "
                "directory as DST"
            )
        if dest.endswith("/") and info is not None:
            raise FileOpError(f"{dest}: not a directory on the vault (ENOTDIR)")
        if dest.endswith("/"):
            raise NotFoundError(f"{dest}: no such directory on the vault (ENOENT)")
        into, new_names = posixpath.dirname(target) or ".", [posixpath.basename(target)]
    if options.recursive:
        tree = scan(
            list(zip(locals_, new_names, strict=True)),
            recursive=True,
            follow_symlinks=options.follow_symlinks,
            preserve=options.preserve,
        )
        return await _upload_tree(files, into, tree, options, tracker)
    for path, name in zip(locals_, new_names, strict=True):
        await _upload_file(files, path, posixpath.join(into, name), options, tracker)
    return tracker.summary(len(locals_), 0, 0)


async def _stat_or_none(files: Any, path: str) -> Any:
    try:
        return await files.stat(path, follow=True)
    except NotFoundError:
        return None


def resume_key(path: str, info: os.stat_result, dest: str) -> str:
    text = f"{os.path.abspath(path)}\0{info.st_size}\0{info.st_mtime_ns}\0{dest}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class FileSource:
    """A local file as a re-iterable source: each iteration reads from the start (the API
    skips what the vault already verified). ``info``: the file's stat when the copy began;
    the file opened must still be that file, unchanged, and stay so while it is read."""

    def __init__(self, path: str, info: os.stat_result) -> None:
        self.path = path
        self.info = info
        self.size = info.st_size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        remaining = self.size
        with open(self.path, "rb", buffering=0) as source:
            before = os.fstat(source.fileno())
            if _moved(self.info, before):
                raise _changed(self.path)
            while remaining:
                data = source.read(min(CHUNK, remaining))
                if not data:
                    raise FileOpError(f"{self.path}: shrank while it was being copied")
                remaining -= len(data)
                if not remaining and _moved(before, os.fstat(source.fileno())):
                    # Hashed as it went, a mixture of old and new bytes would verify.
                    raise _changed(self.path)
                yield data


def _moved(before: os.stat_result, after: os.stat_result) -> bool:
    fields = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")
    return any(getattr(before, name) != getattr(after, name) for name in fields)


def _changed(path: str) -> FileOpError:
    return FileOpError(
        f"{path}: changed while it was being copied; nothing was stored: copy it again"
    )


def _sha256_file(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as source:
        while data := source.read(1024 * 1024):
            sha.update(data)
    return sha.hexdigest()


async def _upload_file(
    files: Any,
    path: str,
    target: str,
    options: _Options,
    tracker: _Tracker,
    *,
    counted: bool = False,
) -> None:
    """``counted``: the file's size is already in the progress total (a tree's large file)."""
    from .copy_engine import MAX_ATTEMPTS, _retryable, for_size

    info = os.stat(path)
    files = for_size(files, info.st_size)
    # A version 7 vault checks the digest sent with END; an older one needs it up front.
    digest = (
        None if await files.checks_end_digest() else await asyncio.to_thread(_sha256_file, path)
    )
    if not counted:
        tracker.progress.bytes_total = (tracker.progress.bytes_total or 0) + info.st_size
    base = tracker.progress.bytes_done
    keep_special = options.preserve and options.remote_root
    mode = info.st_mode & (0o7777 if keep_special else 0o777)
    source: bytes | FileSource = (
        await asyncio.to_thread(_read_small, path, info)
        if info.st_size <= CHUNK
        else FileSource(path, info)
    )

    def progress(done: int) -> None:
        tracker.progress.bytes_done = base + done
        tracker.bytes(0)

    for attempt in range(MAX_ATTEMPTS):
        try:
            result = await files.write(
                target,
                source,
                mode=mode,
                fsync=True,
                size=info.st_size,
                sha256=digest,
                resume_key=resume_key(path, info, target),
                on_progress=progress,
            )
            break
        except Exception as exc:
            if not _retryable(exc) or attempt == MAX_ATTEMPTS - 1:
                raise
    # The vault checks this too; a vault may be compromised. (Without a digest up front,
    # files.write compared the vault's with the digest of what it sent.)
    if digest is not None and result.sha256 != digest:
        raise IntegrityError(f"{target}: the vault stored {result.sha256}, not {digest}")
    # What the vault held verified from an interrupted attempt (this run's or an earlier one).
    tracker.resumed += result.resumed
    tracker.progress.bytes_done = base + info.st_size
    if options.preserve:
        if options.remote_root:
            await files.chown(target, info.st_uid, info.st_gid)
            await files.chmod(target, mode)  # chown clears setuid
        await files.set_mtime(target, info.st_mtime_ns)
    tracker.file(target)


def _read_small(path: str, info: os.stat_result) -> bytes:
    """The whole file, which must still be the one ``info`` describes."""
    with open(path, "rb") as source:
        data = source.read()
        if _moved(info, os.fstat(source.fileno())):
            raise _changed(path)
        return data


async def _upload_tree(
    files: Any, into: str, tree: LocalTree, options: _Options, tracker: _Tracker
) -> CopySummary:
    """Small files as one tar stream (retried whole after a dropped connection: it holds no
    large file), then each large file on its own, resumable."""
    from . import files as files_module
    from .copy_engine import MAX_ATTEMPTS, _retryable

    tracker.progress.bytes_total = tree.bytes
    tracker.progress.files_total = tree.files
    small, large = split_large(tree)
    small, locked = _writable_until_large_files_land(small, large)
    base = tracker.progress.bytes_done, tracker.progress.files_done
    for attempt in range(MAX_ATTEMPTS):
        tracker.progress.bytes_done, tracker.progress.files_done = base
        pieces = tree_pieces(small, files_module.MemberDigest, tracker.bytes, tracker.file)
        try:
            # Through the keeper whatever the size (a download too): the keeper takes the
            # QUIC work off this core, and no QUIC import or handshake comes first. Measured
            # on 2 cores, tmpfs, paired medians against a connection of the cp's own
            # (bench/README.md, 2026-12-07 (2)): 10,000 files of 10 kB 1.03 against 1.14 s,
            # 100 files of 1 MB 0.55 against 0.61 s, 900 of 1 MB 4.34 against 4.66 s.
            result = await files.tar_put(into, pieces, preserve=options.preserve)
            break
        except Exception as exc:
            if not _retryable(exc) or attempt == MAX_ATTEMPTS - 1:
                raise
    try:
        for entry in large:
            target = posixpath.join(into, entry.info.name)
            await _upload_file(files, entry.path, target, options, tracker, counted=True)
    except BaseException:
        if locked:  # best effort: the connection may be what failed
            with contextlib.suppress(Exception):
                async with asyncio.timeout(LOCK_AGAIN_WAIT):
                    await _lock_again(files, into, locked, options)
        raise
    if locked:
        await _lock_again(files, into, locked, options)
    if options.preserve:
        await _restore_dir_mtimes(files, into, tree, large)
    return tracker.summary(
        result.files + len(large), result.dirs, result.symlinks, skipped=tuple(tree.skipped)
    )


#: How long a failed upload tries to give its opened directories their modes back.
LOCK_AGAIN_WAIT = 10.0


def _writable_until_large_files_land(
    small: LocalTree, large: list[LocalEntry]
) -> tuple[LocalTree, list[LocalEntry]]:
    """The stream sets a directory's mode when it ends, before the large files go: a
    directory above one that its owner may not write or enter (0555, a user's read-only
    tree) would refuse them (EACCES, and again on every retry). Such directories go with
    u+rwx; the entries returned (their own modes, parents first) go again once the large
    files are in (``_lock_again``)."""
    above: set[str] = set()
    for entry in large:
        name = posixpath.dirname(entry.info.name)
        while name and name not in above:
            above.add(name)
            name = posixpath.dirname(name)
    locked: list[LocalEntry] = []
    entries: list[LocalEntry] = []
    for entry in small.entries:
        info = entry.info
        if info.type == tarfile.DIRTYPE and info.name in above and info.mode & 0o700 != 0o700:
            locked.append(entry)
            opened = copy.copy(info)
            opened.mode = info.mode | 0o700
            entry = LocalEntry(opened, entry.path)
        entries.append(entry)
    if not locked:
        return small, []
    return replace(small, entries=entries), locked


async def _lock_again(files: Any, into: str, locked: list[LocalEntry], options: _Options) -> None:
    """The opened directories' own modes (and, with -p, mtimes), set by a second stream of
    their headers alone: the vault applies them as it did the first's (its rules for the
    mode's bits, directory descriptors that follow no symlink), not a chmod by path."""
    from . import files as files_module

    def ignore(_: object) -> None:
        pass

    pieces = tree_pieces(LocalTree(entries=list(locked)), files_module.MemberDigest, ignore, ignore)
    await files.tar_put(into, pieces, preserve=options.preserve)


def split_large(tree: LocalTree) -> tuple[LocalTree, list[LocalEntry]]:
    """The tree without its large regular files, and those files. A large file that other
    entries hardlink to stays in the stream (the links must find it there)."""
    from .copy_engine import LARGE_FILE

    linked = {entry.info.linkname for entry in tree.entries if entry.info.type == tarfile.LNKTYPE}
    small = LocalTree(bytes=tree.bytes, files=tree.files, skipped=tree.skipped)
    large: list[LocalEntry] = []
    for entry in tree.entries:
        info = entry.info
        if info.type == tarfile.REGTYPE and info.size > LARGE_FILE and info.name not in linked:
            large.append(entry)
        else:
            small.entries.append(entry)
    return small, large


async def _restore_dir_mtimes(
    files: Any, into: str, tree: LocalTree, large: list[LocalEntry]
) -> None:
    """Writing a large file after the stream touched its directory's mtime: set it back."""
    from flyvault.protocol.tar_stream import mtime_ns_of

    parents = {posixpath.dirname(entry.info.name) for entry in large}
    for entry in tree.entries:
        info = entry.info
        if info.type == tarfile.DIRTYPE and info.name in parents:
            mtime = info.pax_headers.get("mtime", str(int(info.mtime)))
            await files.set_mtime(posixpath.join(into, info.name), mtime_ns_of(mtime))


async def _upload_stdin(
    files: Any, dest: str, options: _Options, tracker: _Tracker, stdin: BinaryIO | None
) -> CopySummary:
    import sys

    from . import files as files_module
    from .copy_engine import _remote_path

    source = stdin if stdin is not None else sys.stdin.buffer
    target = _remote_path(dest)
    if options.recursive:
        await files.mkdir(target, parents=True, exist_ok=True)
        pieces = stdin_tree_pieces(source, files_module.MemberDigest, tracker.bytes, tracker.file)
        result = await files.tar_put(target, pieces, preserve=options.preserve)
        return tracker.summary(result.files, result.dirs, result.symlinks)
    info = await _stat_or_none(files, target)
    if info is not None and info.kind == "dir":
        raise UsageError(
            f"{dest} is a directory on the vault: with '-' as SRC, DST names the file to write"
        )
    sha = hashlib.sha256()

    async def chunks() -> AsyncIterator[bytes]:
        from .copy_source import _read_some

        while data := await asyncio.to_thread(_read_some, source):
            sha.update(data)
            tracker.bytes(len(data))
            yield data

    result = await files.write(target, chunks(), fsync=True)
    if result.sha256 != sha.hexdigest():
        await files.remove(target)
        raise IntegrityError(
            f"{target}: the vault stored SHA-256 {result.sha256}, standard input was "
            f"{sha.hexdigest()}; the file was removed: copy it again"
        )
    tracker.file(target)
    return tracker.summary(1, 0, 0)
