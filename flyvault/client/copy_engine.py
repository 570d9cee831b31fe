"""The copy engine behind ``fly-vault cp`` and the MCP copy tool (scp's semantics).

``copy`` moves files between this machine (or standard input/output) and one vault, over
``RemoteFiles``: a single file with ``write``/``read`` (verified by SHA-256, resumed after a
dropped connection from the last verified offset, landing atomically through a temporary
file), trees and ``-r`` copies as one tar stream (``tar_put``/``tar_get``, a digest after
each file), so many small files cost one round trip, not one each.

DST follows scp: an existing directory receives the sources under their own names; any
other DST is the new name of the one source (several sources need a directory); a DST with
a trailing slash must be an existing directory. What a vault sends is checked as strictly
as an archive from a stranger (``copy_local``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import posixpath
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from flyvault.config_values import NAME_RE
from flyvault.errors import (
    FileOpError,
    IntegrityError,
    NotFoundError,
    TransportError,
    UsageError,
    VaultError,
)

if TYPE_CHECKING:
    from flyvault.client.vault import Vault

#: Attempts of one file across dropped connections (each resumes where the last stopped;
#: the Vault's reconnect budget bounds the time).
MAX_ATTEMPTS = 8
CHUNK = 256 * 1024
#: Files above this size in a tree copy leave the tar stream and go on their own (a
#: resumable write up, ranged reads down), so a dropped connection costs at most the small
#: files' stream again, never a large file's bytes that the other side already verified.
LARGE_FILE = 8 * 1024 * 1024
#: A file of at least this size goes over a connection of its own, not through the
#: vault's connection keeper (``RemoteFiles.for_bulk``): its own connection costs one more
#: handshake (~0.1 s); the keeper's extra hop costs about a fifth of a large file's time.
DIRECT_FROM = 128 * 1024 * 1024
#: What leaves a download's verified partial file in place for the next run: a connection
#: that did not come back, Ctrl-C (the copy's task cancelled). Its prefix is checked against
#: the vault's SHA-256 before it is trusted.
INTERRUPTED = (TransportError, asyncio.CancelledError, KeyboardInterrupt)


@dataclass(frozen=True)
class CopyEndpoint:
    vault: str | None
    path: str  # "-": standard input (as a source) or output (as DST)

    @property
    def stdio(self) -> bool:
        return self.vault is None and self.path == "-"

    def __str__(self) -> str:
        return f"{self.vault}:{self.path}" if self.vault else self.path


@dataclass
class CopyProgress:
    bytes_done: int
    bytes_total: int | None
    files_done: int
    files_total: int | None
    current: str | None


@dataclass(frozen=True)
class CopySummary:
    files: int
    dirs: int
    symlinks: int
    bytes: int
    seconds: float
    resumed_bytes: int
    verified: bool
    #: Local entries not sent (sockets, FIFOs, device nodes, symlink loops), with why.
    skipped: tuple[str, ...] = field(default=())


def parse_endpoint(text: str) -> CopyEndpoint:
    """``VAULT:PATH`` (a colon before any slash, as scp), ``-``, or a local path."""
    if text == "-":
        return CopyEndpoint(None, "-")
    if not text:
        raise UsageError("an empty path", hint="name a file: PATH, VAULT:PATH or -")
    head, sep, tail = text.partition(":")
    if not sep or "/" in head:
        return CopyEndpoint(None, text)
    if not head or not NAME_RE.fullmatch(head):
        raise UsageError(
            f"{text!r}: {head!r} is not a vault name (letters, digits, '_', '.', '-')",
            hint=f"a local path with a colon: ./{text}",
        )
    return CopyEndpoint(head, tail or ".")


def check_endpoints(sources: Sequence[CopyEndpoint], dest: CopyEndpoint, *, recursive: bool) -> str:
    """Refuse what cannot work, before connecting. Returns the direction: up or down."""
    if not sources:
        raise UsageError("cp needs at least one SRC and a DST", hint="fly-vault cp SRC... DST")
    remote_sources = {source.vault for source in sources if source.vault}
    if any(source.stdio for source in sources) and len(sources) > 1:
        raise UsageError("'-' (standard input) must be the only SRC")
    if dest.vault and remote_sources:
        raise UsageError(
            f"both SRC and DST are on a vault ({', '.join(sorted(remote_sources))} -> "
            f"{dest.vault}): copying between vault paths is not supported",
            hint="copy through a local directory, or run cp on the vault with fly-vault exec",
        )
    if not dest.vault and not remote_sources:
        raise UsageError(
            "neither SRC nor DST is on a vault: name one as VAULT:PATH",
            hint="fly-vault cp FILE VAULT:PATH, or fly-vault cp VAULT:PATH FILE",
        )
    if dest.vault:
        return "up"
    if recursive and any(_remote_path(source.path) in ("/", "//") for source in sources):
        raise UsageError(
            "copying the vault's whole / is not supported: name the directories under it",
            hint="fly-vault cp -r VAULT:/etc VAULT:/srv ... DST",
        )
    if len(remote_sources) > 1 or any(not source.vault for source in sources):
        raise UsageError("all SRC must be on the same vault when DST is local")
    if dest.stdio and len(sources) > 1 and not recursive:
        raise UsageError("'-' as DST takes one SRC (or -r: a tar stream of them all)")
    if not dest.stdio:
        _check_local_dest(dest.path, len(sources))
    return "down"


def _check_local_dest(path: str, count: int) -> None:
    if os.path.isdir(path):
        return
    if count > 1:
        raise UsageError(
            f"{path}: not a directory; several sources need an existing directory as DST"
        )
    if path.endswith("/"):
        raise _missing_directory(path.rstrip("/") or "/")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise _missing_directory(parent)


def _missing_directory(path: str) -> VaultError:
    """ENOTDIR naming the file when ``path`` (or a directory above it) is not a
    directory, as the kernel would say; else ENOENT naming ``path``."""
    existing = path
    while not os.path.lexists(existing) and os.path.dirname(existing) not in ("", existing):
        existing = os.path.dirname(existing)
    if os.path.lexists(existing) and not os.path.isdir(existing):
        return FileOpError(f"{existing}: not a directory (ENOTDIR)")
    return NotFoundError(f"{path}: no such directory (ENOENT)")


class _Tracker:
    """Counts for the progress callback and the summary."""

    def __init__(self, on_progress: Callable[[CopyProgress], None] | None) -> None:
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.progress = CopyProgress(0, None, 0, None, None)
        self.resumed = 0

    def bytes(self, count: int) -> None:
        self.progress.bytes_done += count
        self._tell()

    def file(self, name: str) -> None:
        self.progress.files_done += 1
        self.progress.current = name
        self._tell()

    def _tell(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)

    def summary(self, files: int, dirs: int, symlinks: int, **extra: Any) -> CopySummary:
        return CopySummary(
            files=files,
            dirs=dirs,
            symlinks=symlinks,
            bytes=self.progress.bytes_done,
            seconds=time.monotonic() - self.started,
            resumed_bytes=self.resumed,
            verified=True,
            **extra,
        )


async def copy(
    vaults: Callable[[str], Vault],
    sources: Sequence[CopyEndpoint],
    dest: CopyEndpoint,
    *,
    recursive: bool = False,
    preserve: bool = False,
    follow_symlinks: bool = False,
    user: str | None = None,
    on_progress: Callable[[CopyProgress], None] | None = None,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
) -> CopySummary:
    direction = check_endpoints(sources, dest, recursive=recursive)
    tracker = _Tracker(on_progress)
    options = _Options(recursive, preserve, follow_symlinks, user)
    name = dest.vault if direction == "up" else next(s.vault for s in sources if s.vault)
    assert name is not None
    vault = vaults(name)
    files = vault.files(user=user)
    try:
        if direction == "up":
            from .copy_up import upload

            return await upload(files, sources, dest.path, options, tracker, stdin)
        paths = [_remote_path(source.path) for source in sources]
        if dest.stdio:
            return await _to_stdout(files, paths, options, tracker, stdout)
        return await _download(files, paths, dest.path, options, tracker)
    finally:
        # A large file's own connection (Vault.bulk) ends with the copy: a long-lived
        # caller (the MCP server) keeps only the keeper's.
        # getattr: a duck-typed vault (a test's hostile stand-in) may have no bulk twin.
        end_bulk = getattr(vault, "end_bulk", None)
        if end_bulk is not None:
            await end_bulk()


@dataclass(frozen=True)
class _Options:
    recursive: bool
    preserve: bool
    follow_symlinks: bool
    user: str | None

    @property
    def remote_root(self) -> bool:
        """The vault side acts as root (owners are kept with -p)."""
        return self.user in (None, "root")


def for_size(files: Any, size: int) -> Any:
    """The file operations to move one file's ``size`` bytes with: a large file's go over a
    connection of their own (``DIRECT_FROM``)."""
    return files.for_bulk() if size >= DIRECT_FROM else files


def _remote_path(path: str) -> str:
    return posixpath.normpath(path) if path not in ("", ".") else "."


async def _named(files: Any, path: str) -> str:
    """A tree's SRC as the vault names it: ``.`` (the user's home, ``VAULT:``) or ``..`` is
    the directory it is, so that it arrives under its own name, as ``cp -r /root DST``
    would."""
    if posixpath.basename(path) not in (".", ".."):
        return path  # "/" was refused by check_endpoints
    resolved = str((await files.stat(path, follow=True)).path)
    if posixpath.basename(resolved) in ("", ".", ".."):
        raise UsageError(f"{path!r} is {resolved!r} on the vault: name the directory to copy")
    return resolved


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, TransportError)


# -- download -----------------------------------------------------------------------------


async def _download(
    files: Any, paths: list[str], dest: str, options: _Options, tracker: _Tracker
) -> CopySummary:
    into_dir = os.path.isdir(dest)
    if options.recursive:
        paths = [await _named(files, path) for path in paths]
        names = [posixpath.basename(path) for path in paths]
        if len(set(names)) != len(names):
            raise UsageError("two SRC have the same name; copy them one at a time")
        if into_dir:
            return await _download_tree(
                files, paths, Path(dest), dict(zip(names, names, strict=True)), options, tracker
            )
        target = os.path.basename(dest.rstrip("/"))
        return await _download_tree(
            files, paths, Path(os.path.dirname(dest) or "."), {names[0]: target}, options, tracker
        )
    total_files = 0
    for path in paths:
        info = await files.stat(path, follow=True)
        if info.kind == "dir":
            raise UsageError(
                f"{path} is a directory on the vault: copying a directory needs -r",
                hint="fly-vault cp -r VAULT:PATH DST",
            )
        if info.kind != "file":
            raise UsageError(f"{path} is a {info.kind} on the vault, not a file: not copied")
        local = os.path.join(dest, posixpath.basename(path)) if into_dir else dest
        tracker.progress.bytes_total = (tracker.progress.bytes_total or 0) + info.size
        await _download_file(files, path, info, local, options, tracker)
        total_files += 1
    return tracker.summary(total_files, 0, 0)


async def _download_tree(
    files: Any,
    paths: list[str],
    dest: Path,
    tops: dict[str, str],
    options: _Options,
    tracker: _Tracker,
) -> CopySummary:
    """Small files as one tar stream; large ones arrive as headers only (deferred) and are
    fetched afterwards with ranged reads into partial files that survive a dropped
    connection. Directories get their metadata last, once every file is in."""
    from flyvault.protocol.tar_stream import ArchiveEnded, TarReader

    from .copy_local import LocalTreeWriter

    writer = LocalTreeWriter(dest, tops, preserve=options.preserve)
    try:
        for attempt in range(MAX_ATTEMPTS):
            reader = TarReader(expect_digests=True)
            base = tracker.progress.bytes_done, tracker.progress.files_done
            try:
                deferred = await _receive_tree(files, paths, reader, writer, options, tracker)
                break
            except Exception as exc:
                # The stream holds no large file: sending it again costs little.
                if not _retryable(exc) or attempt == MAX_ATTEMPTS - 1:
                    raise
                writer.restart()
                tracker.progress.bytes_done, tracker.progress.files_done = base
        remote_tops = {posixpath.basename(path) or "/": path for path in paths}
        for info, mtime_ns, size in deferred:
            top, _, rest = info.name.partition("/")
            remote = posixpath.join(remote_tops[top], rest) if rest else remote_tops[top]
            await _fetch_large(files, remote, info, mtime_ns, size, writer, dest, tracker)
        writer.handle(ArchiveEnded())
        counts = writer.counts
    finally:
        writer.close()
    return tracker.summary(counts.files, counts.dirs, counts.symlinks)


async def _receive_tree(
    files: Any, paths: list[str], reader: Any, writer: Any, options: _Options, tracker: _Tracker
) -> list[tuple[Any, int, int]]:
    """The tar stream into ``writer``; returns the deferred members (info, mtime, size)."""
    from contextlib import aclosing

    from flyvault.protocol.files_messages import DEFERRED_RECORD
    from flyvault.protocol.tar_stream import (
        ArchiveEnded,
        DataReceived,
        FileEnded,
        MemberStarted,
        Verified,
    )

    deferred: list[tuple[Any, int, int]] = []
    seen: set[str] = set()
    skipping: str | None = None  # a deferred member: its (empty) file events are not written
    batches = files.tar_get_batches(
        paths,
        follow_symlinks=options.follow_symlinks,
        defer_above=LARGE_FILE,
        exact_mtimes=options.preserve,
    )
    async with aclosing(batches):
        async for batch in batches:
            for piece in batch:
                if isinstance(piece, bytes | bytearray | memoryview):
                    events = reader.feed(piece if type(piece) is bytes else bytes(piece))
                else:  # a MemberDigest
                    events = reader.digest(piece.name, piece.size, piece.sha256)
                # Dispatched by exact type, the most frequent first: ~40,000 events a tree.
                for event in events:
                    if type(event) is DataReceived:
                        writer.handle(event)
                        tracker.bytes(len(event.data))
                    elif skipping is not None and type(event) in (FileEnded, Verified):
                        if type(event) is Verified:
                            skipping = None
                    elif type(event) is MemberStarted and DEFERRED_RECORD in event.info.pax_headers:
                        skipping = _defer(event, seen, deferred)
                    elif type(event) is not ArchiveEnded:  # directories: after the large files
                        writer.handle(event)
                        if type(event) is FileEnded:
                            tracker.file(event.name)
    reader.close()
    return deferred


def _defer(event: Any, seen: set[str], deferred: list[tuple[Any, int, int]]) -> str:
    """A member the vault sent as a header only: fetched after the stream. Its name."""
    from flyvault.protocol.files_messages import DEFERRED_RECORD

    from .copy_local import refuse

    info = event.info
    size_text = info.pax_headers[DEFERRED_RECORD]
    if not size_text.isdigit() or info.size:
        raise refuse(info.name, f"a malformed deferred size {size_text!r}")
    if info.name not in seen:  # a retried stream sends it again
        seen.add(info.name)
        deferred.append((info, event.mtime_ns, int(size_text)))
    return str(info.name)


def _partial_name(path: str, info: Any, local: str) -> str:
    """The same source, version and DST resume the same partial file, across runs too."""
    return os.path.join(
        os.path.dirname(local) or ".", f".fv-part-{_partial_key(path, info, local)}"
    )


def _partial_key(path: str, info: Any, local: str) -> str:
    return hashlib.sha256(
        f"{path}\0{info.size}\0{info.mtime_ns}\0{os.path.abspath(local)}".encode()
    ).hexdigest()[:24]


async def _fetch_large(
    files: Any,
    path: str,
    member: Any,
    mtime_ns: int,
    size: int,
    writer: Any,
    dest: Path,
    tracker: _Tracker,
) -> None:
    """A deferred member: resumable ranged reads into a partial beside its final name."""
    from types import SimpleNamespace

    from .copy_local import local_error

    version = SimpleNamespace(size=size, mtime_ns=mtime_ns)
    key = _partial_key(path, version, str(dest / member.name))
    fd, _ = writer.open_partial(member, key)
    keep = True
    try:
        tracker.progress.bytes_total = (tracker.progress.bytes_total or 0) + size
        try:
            await _fetch_into(for_size(files, size), path, fd, tracker)
        except OSError as exc:
            raise local_error(member.name, exc) from None
        if os.fstat(fd).st_size != size:
            keep = False
            raise IntegrityError(
                f"{path}: the vault announced {size} bytes and sent "
                f"{os.fstat(fd).st_size}; the file changed while it was copied: copy it again"
            )
        writer.land_partial(fd, member, mtime_ns)
        tracker.file(member.name)
    except INTERRUPTED:
        raise  # the partial stays: the next run resumes from it
    except BaseException:
        keep = False
        raise
    finally:
        if writer.holds(fd):
            writer.drop_partial(fd, keep=keep)


async def _fetch_into(
    files: Any, path: str, fd: int, tracker: _Tracker, *, fsync_follows: bool = False
) -> None:
    """Fill ``fd`` with the vault's ``path`` after the prefix it already verifiably holds;
    raises IntegrityError (the partial emptied) when the whole does not match.
    ``fsync_follows``: the caller fsyncs the file, so its writeback starts as it arrives."""
    from flyvault.sparse import SparseWriter

    sha = await _verified_prefix(files, path, fd, tracker)
    writer = SparseWriter(fd, os.fstat(fd).st_size, fsync_follows=fsync_follows)
    vault = getattr(files, "vault", None)
    answers: list[Any] = []
    resuming = False  # a failed attempt: the next one's first chunk resumes
    for attempt in range(MAX_ATTEMPTS):
        connects = getattr(vault, "connects", 0)
        try:
            async for chunk in files.read(path, offset=writer.size, answers=answers):
                now = getattr(vault, "connects", 0)
                if now != connects or resuming:  # resumed after a drop: counted once
                    tracker.resumed += writer.size
                    connects, resuming = now, False
                writer.write(chunk)
                sha.update(chunk)
                tracker.bytes(len(chunk))
            break
        except Exception as exc:
            if not _retryable(exc) or attempt == MAX_ATTEMPTS - 1:
                raise
            resuming = True
    writer.finish()
    remote = await _whole_digest(files, path, answers)
    if remote is None:
        os.ftruncate(fd, 0)
        raise IntegrityError(
            f"{path}: the file changed on the vault while it was copied, so what arrived "
            "may be a mixture of old and new bytes; nothing was kept: copy it again"
        )
    if remote != sha.hexdigest():
        os.ftruncate(fd, 0)
        raise IntegrityError(
            f"{path}: SHA-256 mismatch: received {sha.hexdigest()}, the vault has "
            f"{remote}; the file changed on the vault while it was copied, or the data "
            "was corrupted; nothing was kept: copy it again"
        )


async def _whole_digest(files: Any, path: str, answers: list[Any]) -> str | None:
    """The vault's SHA-256 of the whole file, or None when it changed while it was read.
    One read from the start already said what it sent: that is the digest, and the file is
    not read twice. Otherwise (a resumed copy, a vault that does not say) it hashes it now."""
    if len(answers) == 1 and answers[0].offset == 0 and answers[0].sha256 is not None:
        return None if answers[0].changed else str(answers[0].sha256)
    return str(await files.sha256(path))


async def _download_file(
    files: Any, path: str, info: Any, local: str, options: _Options, tracker: _Tracker
) -> None:
    from .copy_local import local_error

    partial = _partial_name(path, info, local)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(partial, flags, 0o600)
    except OSError as exc:
        raise local_error(local, exc) from None
    landed = False
    try:
        try:
            await _fetch_into(for_size(files, info.size), path, fd, tracker, fsync_follows=True)
            _land_download(fd, partial, local, info, options)
        except OSError as exc:  # a local write, never the network's (a TransportError)
            raise local_error(local, exc) from None
        landed = True
        tracker.file(path)
    except INTERRUPTED:
        raise  # the partial file stays: the next run resumes from it
    except BaseException:
        if not landed:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        raise
    finally:
        os.close(fd)


def _land_download(fd: int, partial: str, local: str, info: Any, options: _Options) -> None:
    """The verified partial file: its metadata, on the disk, then under its name."""
    root = options.preserve and os.geteuid() == 0
    mode = info.mode & (0o7777 if root else 0o777)
    if root:
        os.fchown(fd, info.uid, info.gid)
    os.fchmod(fd, mode if options.preserve else mode & ~_umask())
    if options.preserve:
        os.utime(fd, ns=(info.mtime_ns, info.mtime_ns))
    os.fsync(fd)
    os.rename(partial, local)


async def _verified_prefix(files: Any, path: str, fd: int, tracker: _Tracker) -> Any:
    """The SHA-256 state of the partial file's prefix, if the vault's prefix is the same;
    otherwise the partial file is emptied. Resumed bytes are counted as done."""
    sha = hashlib.sha256()
    size = os.fstat(fd).st_size
    if not size:
        return sha
    offset = 0
    while offset < size:
        data = os.pread(fd, min(CHUNK * 4, size - offset), offset)
        if not data:
            break
        sha.update(data)
        offset += len(data)
    remote = await files.sha256(path, offset=0, length=size)
    if remote == sha.hexdigest():
        tracker.resumed += size
        tracker.bytes(size)
        return sha
    os.ftruncate(fd, 0)
    return hashlib.sha256()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- standard output -----------------------------------------------------------------------


async def _to_stdout(
    files: Any, paths: list[str], options: _Options, tracker: _Tracker, stdout: BinaryIO | None
) -> CopySummary:
    import sys

    out = stdout if stdout is not None else sys.stdout.buffer
    if options.recursive:
        from flyvault.protocol.tar_stream import FileEnded, TarReader

        reader = TarReader(expect_digests=True)  # checks the digests of what passes through
        count = 0
        async for piece in files.tar_get(
            paths, follow_symlinks=options.follow_symlinks, exact_mtimes=options.preserve
        ):
            if isinstance(piece, bytes | bytearray | memoryview):
                data = bytes(piece)
                events = reader.feed(data)
                await _write_out(out, data)
                tracker.bytes(len(data))
            else:
                events = reader.digest(piece.name, piece.size, piece.sha256)
            count += sum(isinstance(event, FileEnded) for event in events)
        reader.close()
        await asyncio.to_thread(out.flush)
        return tracker.summary(count, 0, 0)
    info = await files.stat(paths[0], follow=True)
    if info.kind != "file":
        raise UsageError(
            f"{paths[0]} is a {info.kind} on the vault: '-' takes one file (or -r for a tar stream)"
        )
    tracker.progress.bytes_total = info.size
    files = for_size(files, info.size)
    sha = hashlib.sha256()
    answers: list[Any] = []
    async for chunk in _read_all(files, paths[0], tracker, answers):
        sha.update(chunk)
        await _write_out(out, chunk)
    await asyncio.to_thread(out.flush)
    remote = await _whole_digest(files, paths[0], answers)
    if remote is None:
        raise IntegrityError(
            f"{paths[0]}: the file changed on the vault while it was copied, so what went to "
            "standard output may be a mixture of old and new bytes; discard it and copy again"
        )
    if remote != sha.hexdigest():
        raise IntegrityError(
            f"{paths[0]}: SHA-256 mismatch: sent {sha.hexdigest()} to standard output, the "
            f"vault has {remote}; discard the output and copy again"
        )
    tracker.file(paths[0])
    return tracker.summary(1, 0, 0)


async def _read_all(
    files: Any, path: str, tracker: _Tracker, answers: list[Any]
) -> AsyncIterator[bytes]:
    """A remote file's bytes, continuing after dropped connections from where they stopped
    (what was written to stdout cannot be taken back, so it is never re-read)."""
    offset = 0
    for attempt in range(MAX_ATTEMPTS):
        try:
            async for chunk in files.read(path, offset=offset, answers=answers):
                offset += len(chunk)
                tracker.bytes(len(chunk))
                yield chunk
            return
        except Exception as exc:
            if not _retryable(exc) or attempt == MAX_ATTEMPTS - 1:
                raise
            tracker.resumed += offset


async def _write_out(out: BinaryIO, data: bytes) -> None:
    await asyncio.to_thread(out.write, data)
