"""The file stream's worker: a forked process that performs one file operation.

Why a process: the operation must see paths as exec does (the workload's mount namespace
and root) and act with the rights of the named account, and neither can be changed for one
task of init's asyncio process. So the handler forks; the child joins the workload's mount
namespace (``setns(CLONE_NEWNS)``, then ``fchdir``/``chroot`` to the root of its init, the
same steps as ``WorkloadEntry``), reads the account from the workload's own ``/etc/passwd``
and ``/etc/group`` (parsed here: NSS would load libraries from inside), drops to it, and runs
the operation. Everything the child runs is imported before the fork: after the chroot,
init's files are not visible. In host mode the same child runs on the host.

The child talks to the handler over a socketpair in the file stream's own frames (the
handler re-encodes what its ``FileServer`` machine validated), blocking, a chunk at a time: at
most ``FLUSH_AT`` bytes of frames wait to be written (and a read takes at most
``RECEIVE_SIZE``), so a 1 GB file never sits in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import signal
import socket
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from flyvault.errors import (
    Conflict,
    IntegrityError,
    LocalProtocolError,
    RemoteError,
    UsageError,
    VaultError,
    file_error,
)
from flyvault.heap import reuse_freed_buffers
from flyvault.protocol.codec import FrameDecoder
from flyvault.protocol.constants import ERROR_FRAME
from flyvault.protocol.files import MAX_FRAME, decode_offset
from flyvault.protocol.files_messages import (
    EXPECT_ABSENT,
    ITEMS_PER_FRAME,
    MAX_DATA,
    FileFrame,
    FileInfo,
    FileKind,
    FileOp,
    FileRequest,
    MemberDigest,
    WriteReady,
    encode_items,
    encode_result,
)
from flyvault.protocol.messages import ErrorMessage
from flyvault.sparse import SparseWriter
from flyvault.writeback import prepare

from . import files_tar
from .accounts import MAX_ACCOUNT_FILE, parse_groups, parse_passwd, switch_to
from .files_tar import ClientGone
from .workload_entry import CLONE_NEWNS, setns

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
prepare()  # in init, before any worker is forked: nothing to look up after setns/chroot
_HEADER = struct.Struct(">BI")
#: Frames to the handler are written in batches of about this many bytes.
FLUSH_AT = 256 * 1024
#: The most one read from the handler takes.
RECEIVE_SIZE = 1024 * 1024
EMPTY_SHA256 = hashlib.sha256().hexdigest()
PARTIAL_PREFIX = ".flyvault-partial-"
TEMP_PREFIX = ".flyvault-tmp-"


@dataclass
class Accounts:
    """Names for the uids and gids of the workload's /etc/passwd and /etc/group (the owner
    and group of each FileInfo). Acting as a user goes through ``accounts``, as exec does."""

    users: dict[int, str] = field(default_factory=dict)
    groups: dict[int, str] = field(default_factory=dict)

    @classmethod
    def load(cls) -> Accounts:
        accounts = cls()
        for line in _text("/etc/passwd").splitlines():
            parts = line.split(":")
            if len(parts) >= 7 and parts[2].isdigit():
                accounts.users.setdefault(int(parts[2]), parts[0])
        for line in _text("/etc/group").splitlines():
            parts = line.split(":")
            if len(parts) >= 4 and parts[2].isdigit():
                accounts.groups.setdefault(int(parts[2]), parts[0])
        return accounts


def _text(path: str) -> str:
    try:
        with open(path, "rb") as file:
            return file.read(MAX_ACCOUNT_FILE).decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class Target:
    """Where the worker runs: the workload (its mount namespace and root, as fds opened by
    the handler) or the host (both None)."""

    mount_ns: int | None = None
    root: int | None = None
    #: The home of root in host mode (relative paths start there).
    host_home: str = "/"
    #: ``cgroup.procs`` of the workload's cgroups, opened for writing: the worker joins
    #: them (as ``WorkloadEntry``'s commands do) so its memory counts against the
    #: workload's limits and a clean-up of the workload's cgroups ends it too.
    cgroup_procs: tuple[int, ...] = ()


# Entering and dropping privileges ------------------------------------------------------


def enter(target: Target, user: str | None) -> Accounts:
    """Join the workload (if any), become ``user`` (if given), go to its home."""
    if target.mount_ns is not None and target.root is not None:
        _join_cgroups(target.cgroup_procs)
        try:
            setns(target.mount_ns, CLONE_NEWNS)
        except OSError as exc:
            raise RemoteError(
                f"cannot enter the workload's mount namespace: {os.strerror(exc.errno or 0)}"
            ) from None
        os.fchdir(target.root)
        os.chroot(".")
        os.close(target.mount_ns)
        os.close(target.root)
    accounts = Accounts.load()
    home = "/root" if target.mount_ns is not None else target.host_home
    if user is not None:
        home = _become(user)
    os.umask(0o022)
    try:
        os.chdir(home)
    except OSError:
        os.chdir("/")
    return accounts


def _join_cgroups(procs: tuple[int, ...]) -> None:
    try:
        # init lowers its own OOM score; the workload's processes have the default one.
        with open("/proc/self/oom_score_adj", "wb", buffering=0) as score:
            score.write(b"0")
        for fd in procs:
            os.write(fd, b"0")
            os.close(fd)
    except OSError as exc:
        raise RemoteError(f"cannot join the workload's cgroup: {exc.strerror or exc}") from None


def _become(user: str) -> str:
    """Act as ``user`` of the workload's /etc/passwd (groups from /etc/group, as exec's
    commands get them); its home, where relative paths start."""
    account = parse_passwd(_text("/etc/passwd"), user)
    if account is None:
        raise UsageError(f"no user {user!r} in the vault's /etc/passwd")
    if os.geteuid() != account.uid:
        if os.geteuid() != 0:
            raise UsageError(
                f"cannot act as {user!r}: init does not run as root here (host mode as "
                f"uid {os.geteuid()})"
            )
        switch_to(account.with_groups(parse_groups(_text("/etc/group"), user, account.gid)))
    return account.home


# Frames over the socketpair ----------------------------------------------------------


class Channel:
    """Blocking frames to and from the handler.

    Frames out are collected and written about FLUSH_AT bytes at a time, and always before
    the worker waits for input or ends (``receive``, ``result``, ``error``): a write per frame
    cost more than the bytes for a tree of small files. Frames in are split from whatever
    the socket holds."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._out = bytearray()
        self._in = FrameDecoder(MAX_FRAME)

    def send(self, kind: int, payload: bytes = b"") -> None:
        if len(payload) > MAX_FRAME:  # our bug, named as encode_frame names it
            raise LocalProtocolError(
                f"frame payload of {len(payload)} bytes exceeds the limit of {MAX_FRAME} bytes"
            )
        self._out += _HEADER.pack(kind, len(payload))
        self._out += payload  # copied once (encode_frame's join would be a second copy)
        if len(self._out) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self._out:
            data, self._out = self._out, bytearray()
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise ClientGone(f"the handler's socket failed: {exc}") from exc

    def error(self, exc: VaultError) -> None:
        self.send(ERROR_FRAME, ErrorMessage.from_exception(exc).encode())
        self.flush()

    def result(self, result: dict[str, object]) -> None:
        self.send(FileFrame.RESULT, encode_result(result))
        self.flush()

    def receive(self) -> tuple[int, bytes] | None:
        """The next frame from the handler, or None at the end of the stream (abandoned)."""
        self.flush()
        while (frame := self._in.next_frame()) is None:
            try:
                chunk = self.sock.recv(RECEIVE_SIZE)
            except OSError as exc:
                raise ClientGone(f"the handler's socket failed: {exc}") from exc
            if not chunk:
                return None
            self._in.feed(chunk)
        return frame.type, frame.payload


# The operations ----------------------------------------------------------------------


_KINDS: dict[int, FileKind] = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
}


def info_of(path: str, st: os.stat_result, accounts: Accounts, target: str | None) -> FileInfo:
    return FileInfo(
        path=path,
        name=os.path.basename(path) or "/",
        kind=_KINDS.get(stat.S_IFMT(st.st_mode), "file"),
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        owner=accounts.users.get(st.st_uid),
        group=accounts.groups.get(st.st_gid),
        mtime_ns=st.st_mtime_ns,
        target=target,
    )


def stat_path(path: str, follow: bool, accounts: Accounts) -> FileInfo:
    st = os.stat(path, follow_symlinks=follow)
    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return info_of(path, st, accounts, target)


class Worker:
    def __init__(self, channel: Channel, request: FileRequest, accounts: Accounts) -> None:
        self.channel = channel
        self.request = request
        self.accounts = accounts
        #: The path an OSError is about (named in the error).
        self.subject = self._abs(request.path) if request.path else "/"

    def _abs(self, path: str) -> str:
        return os.path.normpath(os.path.join(os.getcwd(), path))

    def run(self) -> None:
        try:
            self._dispatch()
        except ClientGone:
            raise  # the handler or the client is gone: nobody to tell
        except OSError as exc:
            where = exc.filename if isinstance(exc.filename, str) else self.subject
            self.channel.error(file_error(where, exc.errno, exc.strerror))
        except VaultError as exc:
            self.channel.error(exc)
        except Exception as exc:
            self.channel.error(
                RemoteError(f"{self.subject}: internal error ({type(exc).__name__}: {exc})")
            )

    def _dispatch(self) -> None:
        request, op = self.request, self.request.op
        path = self.subject
        if op is FileOp.STAT:
            info = stat_path(path, request.follow, self.accounts)
            self.channel.result({"info": info.to_json()})
        elif op is FileOp.LIST:
            self._list(path)
        elif op is FileOp.READ:
            self._read(path)
        elif op is FileOp.SHA256:
            digest, size = self._hash(path)
            self.channel.result({"sha256": digest, "size": size})
        elif op is FileOp.WRITE:
            write_file(self.channel, request, path)
        elif op is FileOp.TAR_GET:
            files_tar.tar_get(
                self.channel,
                [self._abs(p) for p in request.paths],
                request.follow,
                request.defer_above,
                exact_mtimes=request.preserve,
            )
        elif op is FileOp.TAR_PUT:
            files_tar.tar_put(self.channel, request, path)
        else:
            self._simple(path)

    def _simple(self, path: str) -> None:
        request, op = self.request, self.request.op
        answer: dict[str, object] = {}
        if op is FileOp.MKDIR:
            _mkdir(path, request)
        elif op is FileOp.REMOVE:
            _remove(path, request.recursive)
        elif op is FileOp.RENAME:
            os.rename(path, self._abs(request.target))
        elif op is FileOp.CHMOD:
            assert request.mode is not None
            os.chmod(path, request.mode)
        elif op is FileOp.CHOWN:
            uid = -1 if request.uid is None else request.uid
            gid = -1 if request.gid is None else request.gid
            os.chown(path, uid, gid, follow_symlinks=False)
        elif op is FileOp.SET_MTIME:
            assert request.mtime_ns is not None
            atime = os.stat(path, follow_symlinks=False).st_atime_ns
            os.utime(path, ns=(atime, request.mtime_ns), follow_symlinks=False)
        elif op is FileOp.READLINK:
            answer = {"target": os.readlink(path)}
        elif op is FileOp.SYMLINK:
            os.symlink(request.target, path)
        self.channel.result(answer)

    def _list(self, path: str) -> None:
        limit = self.request.limit
        with os.scandir(path) as entries:
            names = sorted(entry.name for entry in entries)
        truncated = len(names) > limit
        batch: list[FileInfo] = []
        count = 0
        for name in names[:limit]:
            full = os.path.join(path, name)
            try:
                info = stat_path(full, False, self.accounts)
            except FileNotFoundError:
                continue  # removed while listing
            batch.append(info)
            count += 1
            if len(batch) == ITEMS_PER_FRAME:
                self.channel.send(FileFrame.ITEMS, encode_items(batch))
                batch = []
        if batch:
            self.channel.send(FileFrame.ITEMS, encode_items(batch))
        self.channel.result({"count": count, "truncated": truncated})

    def _chunks(self, path: str, seen: list[os.stat_result] | None = None) -> Iterator[bytes]:
        """The requested range of ``path``; ``seen`` gets its fstat before the first read and
        after the last (a regular file written meanwhile differs in size or times)."""
        request = self.request
        with open(path, "rb", buffering=0) as file:
            before = os.fstat(file.fileno())
            if stat.S_ISDIR(before.st_mode):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            if request.offset:  # a FIFO or a character device cannot seek, even to 0
                file.seek(request.offset)
            remaining = request.length
            while remaining is None or remaining > 0:
                want = MAX_DATA if remaining is None else min(MAX_DATA, remaining)
                chunk = file.read(want)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
            if seen is not None:
                seen.extend((before, os.fstat(file.fileno())))

    def _read(self, path: str) -> None:
        """DATA frames, then the size of what was sent, whether the file changed while it
        was read (the reader then holds a mixture, whatever its digest) and, unless the file
        was written too recently to tell, the SHA-256 of what was sent."""
        size = 0
        digest = hashlib.sha256()
        seen: list[os.stat_result] = []
        for chunk in self._chunks(path, seen):
            self.channel.send(FileFrame.DATA, chunk)
            digest.update(chunk)
            size += len(chunk)
        before, after = seen
        whole = not self.request.offset and self.request.length is None
        changed = _changed(before, after) or (
            whole and stat.S_ISREG(after.st_mode) and size != after.st_size
        )
        result: dict[str, object] = {"size": size, "changed": changed}
        if _settled(after):
            result["sha256"] = digest.hexdigest()
        self.channel.result(result)

    def _hash(self, path: str) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        for chunk in self._chunks(path):
            digest.update(chunk)
            size += len(chunk)
        return digest.hexdigest(), size


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    """A regular file written between two fstats: its size, mtime or ctime moved. (Kernels
    since 6.13 give a change right after a stat a fine-grained time on ext4, xfs, btrfs and
    tmpfs; an older one may let a write in the same clock tick as the first fstat pass.)"""
    if not stat.S_ISREG(before.st_mode):
        return False  # a FIFO's or a device's times say nothing about what was read
    fields = ("st_size", "st_mtime_ns", "st_ctime_ns")
    return any(getattr(before, name) != getattr(after, name) for name in fields)


#: A file whose mtime or ctime is younger than this when its read ends may have been written
#: in the same clock tick as the fstat before the read (on kernels without fine-grained
#: timestamps a tick is 1-10 ms): its digest is left out, and the reader asks for one.
RECENT = 0.05


def _settled(after: os.stat_result) -> bool:
    """Whether the times ``_changed`` compares could have shown every write: a regular file
    last changed more than ``RECENT`` ago, or anything else (its times say nothing)."""
    if not stat.S_ISREG(after.st_mode):
        return True
    return time.time() - max(after.st_mtime, after.st_ctime) > RECENT


def _mkdir(path: str, request: FileRequest) -> None:
    mode = 0o755 if request.mode is None else request.mode
    try:
        if request.parents:
            os.makedirs(path, mode, exist_ok=False)
        else:
            os.mkdir(path, mode)
    except FileExistsError:
        if not (request.exist_ok and os.path.isdir(path)):
            raise


def _remove(path: str, recursive: bool) -> None:
    st = os.stat(path, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
    elif recursive:
        shutil.rmtree(path)  # never follows symlinks; its OSError names the failing entry
    else:
        os.rmdir(path)


# Writing ---------------------------------------------------------------------------------


def partial_name(path: str, resume_key: str) -> str:
    """The resumable partial of ``path`` for ``resume_key``: in the same directory, so the
    final rename stays on one filesystem, named by a digest of the key (any key is safe)."""
    key = hashlib.sha256(f"{resume_key}\0{path}".encode()).hexdigest()[:24]
    return os.path.join(os.path.dirname(path), f"{PARTIAL_PREFIX}{key}")


def write_file(channel: Channel, request: FileRequest, path: str) -> None:
    """Write ``path`` atomically (temp file in its directory, then rename)."""
    directory = os.path.dirname(path) or "/"
    # Compare-and-swap: refuse before any data moves (and before a temp file is made in a
    # directory the caller may not even be able to write); checked again before the rename.
    check_expected(path, request.expect_sha256)
    if request.parents:
        os.makedirs(directory, 0o755, exist_ok=True)
    if os.path.isdir(path) and not os.path.islink(path):
        # Before any data moves: the rename would fail at the end, naming the temp file.
        raise OSError(errno.EISDIR, "Is a directory", path)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    if request.resume_key is not None:
        temp = partial_name(path, request.resume_key)
    else:
        temp = os.path.join(directory, f"{TEMP_PREFIX}{os.urandom(8).hex()}")
        flags |= os.O_EXCL
    try:
        fd = os.open(temp, flags, 0o600)
    except OSError as exc:  # the temp name means nothing to the caller: name the target
        raise OSError(exc.errno, exc.strerror, path) from None
    keep = False
    try:
        keep = _receive_into(channel, request, path, fd, temp)
    except BaseException:
        keep = False
        raise
    finally:
        os.close(fd)
        if not keep:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def _prefix_digest(fd: int, size: int) -> hashlib._Hash:
    """The SHA-256 of the first ``size`` bytes of ``fd`` (all of it for -1)."""
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    remaining = size
    while remaining:
        chunk = os.read(fd, MAX_DATA if remaining < 0 else min(MAX_DATA, remaining))
        if not chunk:
            break
        digest.update(chunk)
        remaining -= len(chunk)
    return digest


def _receive_into(channel: Channel, request: FileRequest, path: str, fd: int, temp: str) -> bool:
    """Returns whether the temp file is to be kept (a resumable partial left behind)."""
    have = os.fstat(fd).st_size
    if request.size is not None and have > request.size:
        os.ftruncate(fd, 0)
        have = 0
    digest = _prefix_digest(fd, have)
    channel.send(FileFrame.READY, WriteReady(have, digest.hexdigest()).encode())
    resumable = request.resume_key is not None
    frame = channel.receive()
    if frame is None:
        return resumable
    offset = decode_offset(frame[1])
    if offset != have:
        os.ftruncate(fd, offset)
        digest = _prefix_digest(fd, offset)
    # Zero blocks stay holes (a disk image's, a sparse file's), as a download's do.
    writer = SparseWriter(fd, offset, fsync_follows=request.fsync)
    while True:
        frame = channel.receive()
        if frame is None:
            # The connection went: keep what arrived. What the writer still held (up to
            # a block, or a trailing hole) is sent again: a resume starts at the file's size.
            return resumable
        kind, payload = frame
        if kind == FileFrame.END:
            break
        writer.write(payload)
        digest.update(payload)
    size = writer.size
    writer.finish()
    found = digest.hexdigest()
    # The handler's machine checked END's payload: empty, or the whole file's SHA-256.
    expected = request.sha256 or (payload.hex() if payload else None)
    if request.size is not None and size != request.size:
        raise IntegrityError(f"{path}: received {size} bytes, expected {request.size}; not stored")
    if expected is not None and found != expected:
        raise IntegrityError(
            f"{path}: SHA-256 mismatch (expected {expected}, received {found}); not stored"
        )
    mode = request.mode
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~0o022
    os.fchmod(fd, mode)
    if request.fsync:
        os.fsync(fd)
    _install(temp, path, request.expect_sha256)
    if request.fsync:
        _fsync_dir(os.path.dirname(path) or "/")
    channel.result({"path": path, "size": size, "sha256": found})
    return True  # renamed: nothing left to delete


def check_expected(path: str, expected: str | None) -> None:
    """Raise ``Conflict`` unless ``path`` is what the writer last saw: absent for
    ``EXPECT_ABSENT``, else a regular file whose content hashes to ``expected``."""
    if expected is None:
        return
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        if expected == EXPECT_ABSENT:
            return
        raise Conflict(
            f"{path}: no longer exists (expected SHA-256 {expected}); not written"
        ) from None
    if expected == EXPECT_ABSENT:
        raise Conflict(f"{path}: already exists; not written")
    if not stat.S_ISREG(before.st_mode):
        kind = _KINDS.get(stat.S_IFMT(before.st_mode), "file")
        raise Conflict(f"{path}: is now a {kind}, not the file expected; not written")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        if (os.fstat(fd).st_ino, os.fstat(fd).st_dev) != (before.st_ino, before.st_dev):
            raise Conflict(f"{path}: was replaced while it was checked; not written")
        found = _prefix_digest(fd, -1).hexdigest()
    finally:
        os.close(fd)
    if found != expected:
        raise Conflict(
            f"{path}: changed since it was read (SHA-256 {found}, expected {expected}); not written"
        )


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _install(temp: str, path: str, expected: str | None) -> None:
    """Rename ``temp`` over ``path`` once the expectation (if any) holds. "Must not exist" is
    atomic (``renameat2(RENAME_NOREPLACE)``, where the filesystem has it); a SHA-256 is
    checked right before the rename, so the window is one rename, not the whole upload."""
    if expected == EXPECT_ABSENT:
        renameat2 = getattr(_libc, "renameat2", None)
        if renameat2 is not None:
            done = renameat2(
                _AT_FDCWD, os.fsencode(temp), _AT_FDCWD, os.fsencode(path), _RENAME_NOREPLACE
            )
            if done == 0:
                return
            code = ctypes.get_errno()
            if code == errno.EEXIST:
                raise Conflict(f"{path}: already exists; not written")
            if code not in (errno.EINVAL, errno.ENOSYS):
                raise OSError(code, os.strerror(code), path)
    check_expected(path, expected)
    try:
        os.rename(temp, path)
    except IsADirectoryError:  # one made since the write began: name it, not the temp file
        raise OSError(errno.EISDIR, "Is a directory", path) from None


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# The child's life ------------------------------------------------------------------------


def child_main(sock: socket.socket, request: FileRequest, target: Target) -> None:
    """Runs in the forked child; never returns (``os._exit``)."""
    status = 0
    try:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        reuse_freed_buffers()  # one operation, then gone: what it keeps goes with it
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        held = (target.mount_ns, target.root, *target.cgroup_procs)
        keep = {sock.fileno(), *(fd for fd in held if fd is not None)}
        _close_others(keep)
        channel = Channel(sock)
        try:
            accounts = enter(target, request.user)
        except VaultError as exc:
            channel.error(exc)
        except OSError as exc:
            channel.error(file_error("/", exc.errno, exc.strerror))
        else:
            Worker(channel, request, accounts).run()
        # Closing with unread input would reset the socket and could lose the answer on
        # the handler's side: end our side, then discard input until the handler closes.
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1024 * 1024):
            pass
    except BaseException:
        status = 70
    finally:
        os._exit(status)


def _close_others(keep: set[int]) -> None:
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 65536)


__all__ = ["MemberDigest", "Target", "child_main"]
