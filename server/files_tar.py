"""Tree streams of the file stream, run in the worker: tar_get and tar_put.

tar_get writes a POSIX (pax) tar of the trees straight into DATA frames: each member's
header, data and padding, and after each frame the MemberDigests of the files whose data
ended in it. Members are named
relative to the parent of their top; symlinks stay symlinks unless ``follow``; a file seen
before (same device and inode) becomes a tar hardlink; owner names come from the workload's
own account files (``Accounts``), never from NSS. Exact nanosecond mtimes (a pax record per
member, 1 KiB more each) are sent only when the client keeps mtimes (``preserve``).

tar_put extracts as strictly as a rootfs archive. The frames drive the same strict push
parser the client uses (``flyvault.protocol.tar_stream.TarReader``), so a file is stored
only once its MemberDigest matched the bytes hashed here. Names with ``..`` or absolute
names are refused, every parent is opened component by component with ``O_NOFOLLOW`` below
the destination (so no entry is ever reached through a symlink), device nodes are refused,
and setuid/setgid bits and owners are kept only with ``preserve`` as root. Each regular file
is written to a temp file beside its final name (zero blocks seeked over, so sparse data
stays sparse) and renamed into place only after its digest matched.

Why no ``tarfile.TarFile``: for a tree of many small files its per-member machinery cost
more than the I/O (about 40 % of a 10,000-file copy); headers go through
``flyvault.protocol.tar_header`` instead, byte-identical to tarfile's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import Any

from flyvault.errors import FileOpError, file_error
from flyvault.protocol.files_messages import (
    DEFERRED_RECORD,
    MAX_DATA,
    FileFrame,
    FileRequest,
    MemberDigest,
)
from flyvault.protocol.tar_header import encode_header
from flyvault.protocol.tar_stream import (
    END_OF_ARCHIVE,
    DataReceived,
    FileEnded,
    MemberStarted,
    PieceBatcher,
    TarReader,
    TarStreamError,
    Verified,
    padding,
)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ZERO = bytes(MAX_DATA)
#: Directories tar_put keeps open (a tree's files mostly land in the last few).
_OPEN_DIRS = 256


class _Out:
    """Tar bytes into DATA frames of at most MAX_DATA bytes, each followed by the digests of
    the files whose data ended in it (``PieceBatcher``)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.pieces: PieceBatcher[MemberDigest] = PieceBatcher(MAX_DATA)

    def write(self, data: bytes) -> None:
        self._send(self.pieces.add(data))

    def digest(self, digest: MemberDigest) -> None:
        self.pieces.digest(digest)

    def flush(self) -> None:
        self._send(self.pieces.rest())

    def _send(self, pieces: list[bytes | MemberDigest]) -> None:
        for piece in pieces:
            if isinstance(piece, MemberDigest):
                self.channel.send(FileFrame.DIGEST, piece.encode())
            else:
                self.channel.send(FileFrame.DATA, piece)


@dataclass
class _Walk:
    """One tar_get: where its bytes go and what it has seen."""

    out: _Out
    follow: bool
    accounts: Any
    defer_above: int | None
    exact_mtimes: bool
    counts: dict[str, int] = field(
        default_factory=lambda: {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}
    )
    #: (device, inode) -> the member name a hardlinked file was first archived under.
    seen: dict[tuple[int, int], str] = field(default_factory=dict)


def tar_get(
    channel: Any,
    paths: list[str],
    follow: bool,
    defer_above: int | None = None,
    exact_mtimes: bool = False,
) -> None:
    from .files_worker import Accounts

    walk = _Walk(_Out(channel), follow, Accounts.load(), defer_above, exact_mtimes)
    try:
        for top in paths:
            os.stat(top)  # a missing top is an error naming it
            # A symlink named as a top is followed, as scp -r follows it (and uploads).
            _add(walk, top, os.path.basename(top.rstrip("/")) or ".")
    except Exception:
        # The files that ended before the error still land, verified (their digests were
        # held for the frame): the client keeps what was verified before the ERROR.
        with contextlib.suppress(Exception):
            walk.out.flush()
        raise
    walk.out.write(END_OF_ARCHIVE)
    walk.out.flush()
    channel.result(walk.counts)


def _add(walk: _Walk, path: str, name: str) -> None:
    """``path`` (a top, followed if a symlink) and all below it, depth first in name order,
    with a stack of its own: a chain of a thousand directories went past Python's
    recursion limit."""
    todo = [(path, name, frozenset[tuple[int, int]](), True)]
    while todo:
        path, name, above, top = todo.pop()
        children, below = _add_one(walk, path, name, above, top)
        todo.extend(
            (os.path.join(path, child), f"{name}/{child}", below, False)
            for child in reversed(children)
        )


def _add_one(
    walk: _Walk, path: str, name: str, ancestors: frozenset[tuple[int, int]], top: bool
) -> tuple[list[str], frozenset[tuple[int, int]]]:
    """One entry; a directory's children (sorted) come back, with the directories above
    them (device, inode: -L's loops)."""
    st = os.stat(path, follow_symlinks=walk.follow or top)
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    info.uname = walk.accounts.users.get(st.st_uid, "")
    info.gname = walk.accounts.groups.get(st.st_gid, "")
    seconds, nanos = divmod(st.st_mtime_ns, 1_000_000_000)
    info.mtime = seconds
    if nanos and walk.exact_mtimes:  # a pax record: a float mtime would round them
        info.pax_headers = {"mtime": f"{seconds}.{nanos:09d}"}
    mode, counts = st.st_mode, walk.counts
    if stat.S_ISDIR(mode):
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            _add_loop(walk, path, info)
            return [], ancestors
        info.type = tarfile.DIRTYPE
        walk.out.write(encode_header(info))
        counts["dirs"] += 1
        return sorted(os.listdir(path)), ancestors | {key}
    elif stat.S_ISLNK(mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
        walk.out.write(encode_header(info))
        counts["symlinks"] += 1
    elif stat.S_ISREG(mode):
        _add_file(walk, path, info, st)
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
        walk.out.write(encode_header(info))
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        walk.out.write(encode_header(info))
    # sockets cannot be archived: left out, as tar does
    return [], ancestors


def _add_loop(walk: _Walk, path: str, info: tarfile.TarInfo) -> None:
    """-L met a symlink back to a directory above it: it goes as the symlink it is (tar -h
    and rsync -L leave such a loop out; following it would never end)."""
    if not os.path.islink(path):  # a bind mount of a directory above: nothing to keep
        raise FileOpError(f"{path}: a directory that contains itself (a bind mount); not copied")
    lst = os.lstat(path)
    info.mode = stat.S_IMODE(lst.st_mode)
    info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    walk.out.write(encode_header(info))
    walk.counts["symlinks"] += 1


def _add_file(walk: _Walk, path: str, info: tarfile.TarInfo, st: os.stat_result) -> None:
    key, out = (st.st_dev, st.st_ino), walk.out
    walk.counts["files"] += 1
    if st.st_nlink > 1 and key in walk.seen:
        info.type, info.linkname = tarfile.LNKTYPE, walk.seen[key]
        out.write(encode_header(info))
        return
    walk.seen[key] = info.name
    if walk.defer_above is not None and st.st_nlink == 1 and st.st_size > walk.defer_above:
        _add_deferred(out, info, st.st_size)
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info.size = size = os.fstat(fd).st_size
        out.write(encode_header(info))
        digest, remaining = hashlib.sha256(), size
        while remaining:
            chunk = os.read(fd, min(remaining, MAX_DATA))
            if not chunk:
                raise FileOpError(f"{path}: the file shrank while it was read; copy again")
            digest.update(chunk)
            out.write(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    out.write(padding(size))
    out.digest(MemberDigest(info.name, size, digest.hexdigest()))
    walk.counts["bytes"] += size


def _add_deferred(out: _Out, info: tarfile.TarInfo, size: int) -> None:
    """A large file as its header only: the client fetches the data with ranged reads."""
    info.pax_headers = {**info.pax_headers, DEFERRED_RECORD: str(size)}
    out.write(encode_header(info))
    out.digest(MemberDigest(info.name, 0, hashlib.sha256().hexdigest()))


def _refuse(name: str, problem: str) -> FileOpError:
    return FileOpError(f"tar member {name!r} {problem}; nothing of it was written")


def _parts(name: str, what: str = "name") -> tuple[str, ...]:
    if name.startswith("/"):
        raise _refuse(name, f"has an absolute {what}, which could write outside the destination")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _refuse(name, f"has a '..' component in its {what}")
    return parts


@dataclass
class _Landing:
    """A regular file being received: its temp file, waiting for its digest."""

    fd: int
    temp: str
    parent: int
    leaf: str
    member: tarfile.TarInfo
    mtime_ns: int
    size: int = 0
    #: The last data was seeked over: the file's length must be set at its end.
    hole_at_end: bool = False


class _Extractor:
    def __init__(self, request: FileRequest, dest: str) -> None:
        self.request = request
        self.root = os.open(dest, _DIR_FLAGS)
        self.as_root = os.geteuid() == 0
        self.counts = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}
        self.deferred: list[tuple[tuple[str, ...], tarfile.TarInfo, int]] = []
        self.landing: _Landing | None = None
        self._chown = request.preserve and self.as_root
        #: The worker's umask, for parents made on the way (tar_put runs with umask 0).
        self.umask = 0o022
        self._nonce = os.urandom(8).hex()
        self._made = 0
        #: The member being handled, which an error names.
        self.entry = ""
        #: Parent directories opened before, by their parts, least recently used first;
        #: ``parent`` lends them (no dup and close per file). Safe to keep: a member can
        #: never turn a directory into something else (``replace``).
        self._dirs: dict[tuple[str, ...], int] = {}

    def parent(self, parts: tuple[str, ...], name: str) -> int:
        """The directory ``parts`` below the destination, opened without following
        symlinks: lent, closed by ``close`` (or when ``_OPEN_DIRS`` others came after it)."""
        cached = self._dirs.pop(parts, None)
        if cached is not None:
            self._dirs[parts] = cached  # now the newest: a lent directory is never evicted
            return cached
        fd = self._open_parent(parts, name)
        if len(self._dirs) >= _OPEN_DIRS:
            self._evict()
        self._dirs[parts] = fd
        return fd

    def _evict(self) -> None:
        """Closes the least recently used directory but the one a landing file uses."""
        in_use = self.landing.parent if self.landing is not None else -1
        for parts, fd in self._dirs.items():
            if fd != in_use:
                del self._dirs[parts]
                os.close(fd)
                return

    def _open_parent(self, parts: tuple[str, ...], name: str) -> int:
        fd = os.dup(self.root)
        for part in parts:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:  # as mkdir -p would make it, under the worker's umask
                os.mkdir(part, 0o755 & ~self.umask, dir_fd=fd)
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

    def start(self, member: tarfile.TarInfo, mtime_ns: int) -> None:
        """A member's header arrived: a regular file starts landing, the rest is made now."""
        self.entry = member.name
        parts = _parts(member.name)
        if not parts:
            if member.isreg():
                raise _refuse(member.name, "names the destination itself")
            return  # "./": the destination itself
        if member.ischr() or member.isblk():
            raise _refuse(member.name, "is a device node; device nodes are refused")
        parent = self.parent(parts[:-1], member.name)
        if member.isreg():
            self._made += 1  # unique with the random nonce; O_EXCL guards the rest
            temp = f".flyvault-tmp-{self._nonce}-{self._made}"
            # The final mode at once, when no chown comes later to clear bits: one call less
            # per file (tar_put runs with umask 0, so open(2) gives exactly this mode).
            mode = 0o600 if self._chown else self.mode_of(member)
            fd = os.open(temp, _FILE_FLAGS, mode, dir_fd=parent)
            self.landing = _Landing(fd, temp, parent, parts[-1], member, mtime_ns)
            return
        self._make(member, mtime_ns, parts, parent)

    def _make(
        self, member: tarfile.TarInfo, mtime_ns: int, parts: tuple[str, ...], parent: int
    ) -> None:
        leaf = parts[-1]
        if member.isdir():
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf, 0o700, dir_fd=parent)
            if not stat.S_ISDIR(os.stat(leaf, dir_fd=parent, follow_symlinks=False).st_mode):
                raise _refuse(member.name, "would replace a file with a directory")
            self.deferred.append((parts, member, mtime_ns))
            self.counts["dirs"] += 1
        elif member.issym():
            self.replace(parent, leaf)
            os.symlink(member.linkname, leaf, dir_fd=parent)
            self.finish(member, mtime_ns, parent, leaf)
            self.counts["symlinks"] += 1
        elif member.islnk():
            self._link(member, parent, leaf)
            self.counts["files"] += 1  # a file of the copy, as the client counts it
        elif member.isfifo():
            self.replace(parent, leaf)
            os.mkfifo(leaf, 0o600, dir_fd=parent)
            self.finish(member, mtime_ns, parent, leaf)
        else:
            raise _refuse(member.name, f"has an unsupported tar type {member.type!r}")

    def _link(self, member: tarfile.TarInfo, parent: int, leaf: str) -> None:
        target = _parts(member.linkname, "hardlink target")
        source_parent = self.parent(target[:-1], member.name)
        self.replace(parent, leaf)
        os.link(
            target[-1], leaf, src_dir_fd=source_parent, dst_dir_fd=parent, follow_symlinks=False
        )

    def write(self, chunk: bytes) -> None:
        landing = self.landing
        assert landing is not None
        fd = landing.fd
        landing.hole_at_end = chunk == _ZERO[: len(chunk)]
        if landing.hole_at_end:
            os.lseek(fd, len(chunk), os.SEEK_CUR)  # a hole, where the filesystem can
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]

    def ended(self, size: int) -> None:
        assert self.landing is not None
        if self.landing.hole_at_end:
            os.ftruncate(self.landing.fd, size)  # a trailing hole gets its length
        self.landing.size = size

    def verified(self) -> None:
        """The digest matched: the file takes its final name."""
        landing, self.landing = self.landing, None
        assert landing is not None
        try:
            self.finish(
                landing.member, landing.mtime_ns, landing.parent, fd=landing.fd, mode_set=True
            )
            if self.request.fsync:
                os.fsync(landing.fd)
            try:  # rename(2) replaces a file or symlink, and never a directory
                os.rename(
                    landing.temp,
                    landing.leaf,
                    src_dir_fd=landing.parent,
                    dst_dir_fd=landing.parent,
                )
            except IsADirectoryError:
                raise FileOpError(
                    f"{landing.leaf}: would replace a directory; nothing was written"
                ) from None
        except BaseException:
            self.landing = landing  # dropped (temp removed) by close
            raise
        os.close(landing.fd)
        self.counts["files"] += 1
        self.counts["bytes"] += landing.size

    def replace(self, parent: int, leaf: str) -> None:
        try:
            st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise FileOpError(f"{leaf}: would replace a directory; nothing was written")
        os.unlink(leaf, dir_fd=parent)

    def finish(
        self,
        member: tarfile.TarInfo,
        mtime_ns: int,
        parent: int,
        leaf: str = "",
        fd: int | None = None,
        mode_set: bool = False,
    ) -> None:
        """Mode always (but symlinks), owner and mtime with preserve. ``mode_set``: a file
        created with its mode (``start``), which only a chown would have to set again."""
        preserve = self.request.preserve
        if preserve and self.as_root:
            if fd is not None:
                os.fchown(fd, member.uid, member.gid)
            else:
                os.chown(leaf, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        if fd is not None:
            if self._chown or not mode_set:
                os.fchmod(fd, self.mode_of(member))
        elif not member.issym():
            os.chmod(leaf, self.mode_of(member), dir_fd=parent)
        if preserve:
            if fd is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            else:
                os.utime(leaf, ns=(mtime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)

    def finish_dirs(self) -> None:
        """Directory modes and mtimes last (children first, so their mtimes stick). Only
        after a whole stream: a cut-off one leaves its directories writable (as made), so
        the same tree sent again lands even as a user a mode like 0555 would lock out."""
        for parts, member, mtime_ns in reversed(self.deferred):
            self.entry = member.name
            parent = self.parent(parts[:-1], member.name)
            self.finish(member, mtime_ns, parent, parts[-1])

    def close(self) -> None:
        """A file still landing is dropped; the directories' fds are closed. Never raises
        a file system error of its own (it would hide the one that ended the stream)."""
        landing, self.landing = self.landing, None
        if landing is not None:
            os.close(landing.fd)
            with contextlib.suppress(OSError):
                os.unlink(landing.temp, dir_fd=landing.parent)
        for fd in self._dirs.values():
            os.close(fd)
        os.close(self.root)


class ClientGone(Exception):
    """The handler's socket ended or broke: nobody is left to answer. Apart from OSError,
    so that no file system error (a network filesystem's ECONNRESET, say) is taken for it."""


def tar_put(channel: Any, request: FileRequest, dest: str) -> None:
    """The client's tar stream into ``dest``; see the module's docstring."""
    reader = TarReader(expect_digests=True, sender="the client")
    extractor = _Extractor(request, dest)
    umask = os.umask(0)  # modes are set exactly (this worker process does only this op)
    extractor.umask = umask
    try:
        while (frame := channel.receive()) is not None:
            kind, payload = frame
            if kind == FileFrame.DATA:
                events = reader.feed(payload)
            elif kind == FileFrame.DIGEST:
                digest = MemberDigest.decode(payload)
                events = reader.digest(digest.name, digest.size, digest.sha256)
            else:  # END
                break
            for event in events:
                _apply(extractor, event)
        else:
            raise ClientGone("the client went away during tar_put")
        reader.close()
        extractor.finish_dirs()
    except TarStreamError as exc:
        raise FileOpError(
            f"{dest}: the tar stream is not valid ({exc}); the rest was not written"
        ) from None
    except OSError as exc:
        # Named by the entry: the call's own file name is a temp name or a bare leaf.
        where = os.path.join(dest, extractor.entry) if extractor.entry else dest
        raise file_error(where, exc.errno, exc.strerror) from None
    finally:
        os.umask(umask)
        extractor.close()
    channel.result(extractor.counts)


def _apply(extractor: _Extractor, event: object) -> None:
    if isinstance(event, DataReceived):
        extractor.write(event.data)
    elif isinstance(event, MemberStarted):
        extractor.start(event.info, event.mtime_ns)
    elif isinstance(event, FileEnded):
        extractor.ended(event.size)
    elif isinstance(event, Verified):
        extractor.verified()
