"""Tree streams of the file stream, run in the worker: tar_get and tar_put.

tar_get writes a POSIX (pax) tar of the trees straight into DATA frames (``TarFile`` in
plain "w" mode writes each member's header, data and padding through at once, so the
MemberDigest that follows a regular file's data really follows it). Members are named
relative to the parent of their top; symlinks stay symlinks unless ``follow``; a file seen
before (same device and inode) becomes a tar hardlink; owner names come from the workload's
own account files (``Accounts``), never from NSS.

tar_put extracts as strictly as a rootfs archive: names with ``..`` or absolute names are
refused, every parent is opened component by component with ``O_NOFOLLOW`` below the
destination (so no entry is ever reached through a symlink), device nodes are refused, and
setuid/setgid bits and owners are kept only with ``preserve`` as root. Each regular file is
written to a temp file beside its final name (zero blocks seeked over, so sparse data stays
sparse) and renamed into place only after its MemberDigest matched.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import stat
import tarfile
from typing import Any

from flyvault.errors import FileOpError, IntegrityError, RemoteProtocolError
from flyvault.protocol.files_messages import (
    DEFERRED_RECORD,
    MAX_DATA,
    FileFrame,
    FileRequest,
    MemberDigest,
)

#: Data buffered while waiting for a member's digest (it must follow the member's data).
MAX_DIGEST_LAG = 8 * 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ZERO = bytes(MAX_DATA)


class _Out:
    """A write-only file object turning tar bytes into DATA frames."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.buffer = bytearray()
        self.position = 0

    def write(self, data: bytes) -> int:
        self.buffer += data
        self.position += len(data)
        if len(self.buffer) >= MAX_DATA:
            self.flush()
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        while self.buffer:
            chunk = bytes(self.buffer[:MAX_DATA])
            del self.buffer[:MAX_DATA]
            self.channel.send(FileFrame.DATA, chunk)


class _Hashing:
    def __init__(self, file: Any) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.file.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def tar_get(channel: Any, paths: list[str], follow: bool, defer_above: int | None = None) -> None:
    from .files_worker import Accounts

    accounts = Accounts.load()
    out = _Out(channel)
    counts = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}
    seen: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        for top in paths:
            os.stat(top, follow_symlinks=follow)  # a missing top is an error naming it
            base = os.path.basename(top.rstrip("/")) or "."
            _add(archive, out, top, base, follow, accounts, counts, seen, defer_above)
    out.flush()
    channel.result(counts)


def _add(
    archive: tarfile.TarFile,
    out: _Out,
    path: str,
    name: str,
    follow: bool,
    accounts: Any,
    counts: dict[str, int],
    seen: dict[tuple[int, int], str],
    defer_above: int | None = None,
) -> None:
    st = os.stat(path, follow_symlinks=follow)
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    info.uname = accounts.users.get(st.st_uid, "")
    info.gname = accounts.groups.get(st.st_gid, "")
    # Exact nanoseconds in a pax record (a float would round them).
    seconds, nanos = divmod(st.st_mtime_ns, 1_000_000_000)
    info.mtime = seconds
    if nanos:
        info.pax_headers = {"mtime": f"{seconds}.{nanos:09d}"}
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
        counts["dirs"] += 1
        for child in sorted(os.listdir(path)):
            _add(
                archive,
                out,
                os.path.join(path, child),
                f"{name}/{child}",
                follow,
                accounts,
                counts,
                seen,
                defer_above,
            )
    elif stat.S_ISLNK(mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
        archive.addfile(info)
        counts["symlinks"] += 1
    elif stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in seen:
            info.type, info.linkname = tarfile.LNKTYPE, seen[key]
            archive.addfile(info)
            counts["files"] += 1
            return
        seen[key] = name
        if defer_above is not None and st.st_nlink == 1 and st.st_size > defer_above:
            _add_deferred(archive, out, info, st.st_size)
            counts["files"] += 1
            return
        with open(path, "rb") as file:
            info.size = os.fstat(file.fileno()).st_size
            source = _Hashing(file)
            archive.addfile(info, source)
        out.flush()
        out.channel.send(
            FileFrame.DIGEST,
            MemberDigest(name, source.size, source.digest.hexdigest()).encode(),
        )
        counts["files"] += 1
        counts["bytes"] += source.size
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
        archive.addfile(info)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        archive.addfile(info)
    # sockets cannot be archived: left out, as tar does


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in nanoseconds, exact from its pax record (tarfile's float
    ``mtime`` would round the last digits)."""
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * 1_000_000_000
    whole, _, fraction = text.strip().partition(".")
    try:
        seconds = int(whole or "0")
        nanos = int((fraction + "000000000")[:9]) if fraction else 0
    except ValueError:
        return int(member.mtime * 1e9)
    return seconds * 1_000_000_000 + (-nanos if whole.startswith("-") else nanos)


def _add_deferred(archive: tarfile.TarFile, out: _Out, info: tarfile.TarInfo, size: int) -> None:
    """A large file as its header only: the client fetches the data with ranged reads."""
    info.pax_headers = {**info.pax_headers, DEFERRED_RECORD: str(size)}
    archive.addfile(info)
    out.flush()
    empty = hashlib.sha256().hexdigest()
    out.channel.send(FileFrame.DIGEST, MemberDigest(info.name, 0, empty).encode())


class _In:
    """A read-only file object over the client's DATA frames; DIGEST frames are queued."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.buffer = bytearray()
        self.digests: collections.deque[MemberDigest] = collections.deque()
        self.ended = False

    def _pull(self) -> None:
        frame = self.channel.receive()
        if frame is None:
            raise ConnectionAbortedError("the client went away during tar_put")
        kind, payload = frame
        if kind == FileFrame.DATA:
            self.buffer += payload
        elif kind == FileFrame.DIGEST:
            self.digests.append(MemberDigest.decode(payload))
        else:
            self.ended = True

    def read(self, size: int = -1) -> bytes:
        while not self.ended and (size < 0 or len(self.buffer) < size):
            self._pull()
        take = len(self.buffer) if size < 0 else min(size, len(self.buffer))
        data = bytes(self.buffer[:take])
        del self.buffer[:take]
        return data

    def next_digest(self, name: str) -> MemberDigest:
        while not self.digests:
            if self.ended or len(self.buffer) > MAX_DIGEST_LAG:
                raise IntegrityError(f"tar member {name!r}: no MemberDigest after its data")
            self._pull()
        return self.digests.popleft()


def _refuse(name: str, problem: str) -> FileOpError:
    return FileOpError(f"tar member {name!r} {problem}; nothing of it was written")


def _parts(name: str, what: str = "name") -> tuple[str, ...]:
    if name.startswith("/"):
        raise _refuse(name, f"has an absolute {what}, which could write outside the destination")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _refuse(name, f"has a '..' component in its {what}")
    return parts


class _Extractor:
    def __init__(self, request: FileRequest, dest: str, source: _In) -> None:
        self.request = request
        self.source = source
        self.root = os.open(dest, _DIR_FLAGS)
        self.as_root = os.geteuid() == 0
        self.counts = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}
        self.deferred: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []

    def parent(self, parts: tuple[str, ...], name: str) -> int:
        fd = os.dup(self.root)
        for part in parts:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                os.close(fd)
                raise _refuse(
                    name, f"lies under {part!r}, which is a symlink or not a directory"
                ) from None
            os.close(fd)
            fd = child
        return fd

    def mode_of(self, member: tarfile.TarInfo) -> int:
        if self.request.preserve and self.as_root:
            return member.mode & 0o7777
        return member.mode & 0o1777

    def add(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _parts(member.name)
        if not parts:
            return  # "./": the destination itself
        if member.ischr() or member.isblk():
            raise _refuse(member.name, "is a device node; device nodes are refused")
        parent = self.parent(parts[:-1], member.name)
        leaf = parts[-1]
        try:
            if member.isdir():
                with contextlib.suppress(FileExistsError):
                    os.mkdir(leaf, 0o700, dir_fd=parent)
                if not stat.S_ISDIR(os.stat(leaf, dir_fd=parent, follow_symlinks=False).st_mode):
                    raise _refuse(member.name, "would replace a file with a directory")
                self.deferred.append((parts, member))
                self.counts["dirs"] += 1
            elif member.isreg():
                self.file(archive, member, parent, leaf)
            elif member.issym():
                self.replace(parent, leaf)
                os.symlink(member.linkname, leaf, dir_fd=parent)
                self.finish(member, leaf, parent)
                self.counts["symlinks"] += 1
            elif member.islnk():
                target = _parts(member.linkname, "hardlink target")
                source_parent = self.parent(target[:-1], member.name)
                try:
                    self.replace(parent, leaf)
                    os.link(
                        target[-1],
                        leaf,
                        src_dir_fd=source_parent,
                        dst_dir_fd=parent,
                        follow_symlinks=False,
                    )
                finally:
                    os.close(source_parent)
                self.counts["files"] += 1  # a file of the copy, as the client counts it
            elif member.isfifo():
                self.replace(parent, leaf)
                os.mkfifo(leaf, 0o600, dir_fd=parent)
                self.finish(member, leaf, parent)
            else:
                raise _refuse(member.name, f"has an unsupported tar type {member.type!r}")
        finally:
            os.close(parent)

    def replace(self, parent: int, leaf: str) -> None:
        try:
            st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise FileOpError(f"{leaf}: would replace a directory; nothing was written")
        os.unlink(leaf, dir_fd=parent)

    def file(
        self, archive: tarfile.TarFile, member: tarfile.TarInfo, parent: int, leaf: str
    ) -> None:
        temp = f".flyvault-tmp-{os.urandom(8).hex()}"
        fd = os.open(
            temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent,
        )
        renamed = False
        try:
            data = archive.extractfile(member)
            assert data is not None
            digest, size = hashlib.sha256(), 0
            while chunk := data.read(MAX_DATA):
                digest.update(chunk)
                size += len(chunk)
                if chunk == _ZERO[: len(chunk)]:
                    os.lseek(fd, len(chunk), os.SEEK_CUR)  # a hole, where the filesystem can
                else:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            os.ftruncate(fd, size)
            expected = self.source.next_digest(member.name)
            found = digest.hexdigest()
            if expected.name != member.name or expected.size != size or expected.sha256 != found:
                raise IntegrityError(
                    f"tar member {member.name!r}: its data (size {size}, SHA-256 {found}) does not "
                    f"match its MemberDigest ({expected.name!r}, size {expected.size}, SHA-256 "
                    f"{expected.sha256}); not stored"
                )
            self.finish(member, None, parent, fd)
            if self.request.fsync:
                os.fsync(fd)
            self.replace(parent, leaf)
            os.rename(temp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
            renamed = True
            self.counts["files"] += 1
            self.counts["bytes"] += size
        finally:
            os.close(fd)
            if not renamed:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=parent)

    def finish(
        self, member: tarfile.TarInfo, leaf: str | None, parent: int, fd: int | None = None
    ) -> None:
        """Mode always (but symlinks), owner and mtime with preserve."""
        preserve = self.request.preserve
        if preserve and self.as_root:
            if fd is not None:
                os.fchown(fd, member.uid, member.gid)
            else:
                os.chown(leaf or "", member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        if fd is not None:
            os.fchmod(fd, self.mode_of(member))
        elif not member.issym():
            os.chmod(leaf or "", self.mode_of(member), dir_fd=parent)
        if preserve:
            ns = _mtime_ns(member)
            if fd is not None:
                os.utime(fd, ns=(ns, ns))
            else:
                os.utime(leaf or "", ns=(ns, ns), dir_fd=parent, follow_symlinks=False)

    def close(self) -> None:
        for parts, member in reversed(self.deferred):  # children first: their mtimes stick
            parent = self.parent(parts[:-1], member.name)
            try:
                self.finish(member, parts[-1], parent)
            finally:
                os.close(parent)
        os.close(self.root)


def tar_put(channel: Any, request: FileRequest, dest: str) -> None:
    source = _In(channel)
    extractor = _Extractor(request, dest, source)
    try:
        with tarfile.open(fileobj=source, mode="r|") as archive:  # type: ignore[call-overload]
            for member in archive:
                extractor.add(archive, member)
        while not source.ended:  # the end-of-archive padding and the END frame
            source.read(MAX_DATA)
        if source.digests:
            raise RemoteProtocolError("tar_put: a MemberDigest matched no regular file")
    except tarfile.TarError as exc:
        raise FileOpError(
            f"{dest}: the tar stream is not valid ({exc}); the rest was not written"
        ) from None
    finally:
        extractor.close()
    channel.result(extractor.counts)
