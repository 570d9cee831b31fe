"""Creating a tree that came from a vault, on this machine, without ever leaving DST.

A vault may be compromised, so its tar stream is handled as an archive from a stranger,
with the strictness the vault applies to rootfs archives (``server/provision/members.py``;
mirrored here, since the client never imports server code):

* names must be relative, without ``..``, and begin with one of the tops that were asked
  for (a vault asked for ``app`` cannot drop ``.bashrc`` next to it);
* every parent directory is opened component by component with ``O_NOFOLLOW`` relative to
  DST's fd, so nothing is reached through a symlink an earlier entry planted (or one that
  was already there); files are created under a temporary name with ``O_EXCL|O_NOFOLLOW``
  and renamed over the final name only once the vault's SHA-256 matched;
* hardlinks must point at a file this same copy created; device nodes and FIFOs are
  refused; setuid/setgid bits are refused unless ``-p`` as root;
* symlinks are created verbatim (they are never followed while extracting).

Each refusal is an ``UnsafeEntry`` naming the entry. Zero blocks are skipped with a seek, so
sparse files stay sparse where the filesystem allows.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flyvault.errors import UnsafeEntry, VaultError
from flyvault.protocol.tar_stream import (
    ArchiveEnded,
    DataReceived,
    FileEnded,
    MemberStarted,
    TarEvent,
    Verified,
)
from flyvault.sparse import SparseWriter

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_PATH = 4096
TEMP_PREFIX = ".fv-part-"


@dataclass
class TreeCounts:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0


def refuse(entry: str, problem: str) -> UnsafeEntry:
    return UnsafeEntry(
        f"refused entry {entry!r} from the vault: {problem}; nothing was written outside "
        "the destination",
        hint="the vault's tree holds something a copy must not create; inspect it on the "
        "vault (fly-vault exec VAULT -- ls -la PATH) before copying it",
    )


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class LocalTreeWriter:
    """Consumes ``TarReader`` events (with digests) and builds the tree under ``destination``.

    ``tops`` maps each top name the vault may send to the name it gets here (``cp -r
    dev:/srv/app newname``). Call ``close`` in every case: it removes an unfinished file.
    """

    def __init__(
        self,
        destination: Path,
        tops: Mapping[str, str],
        *,
        preserve: bool = False,
        is_root: bool | None = None,
    ) -> None:
        self.destination = destination
        self.tops = dict(tops)
        self.preserve = preserve
        self.is_root = os.geteuid() == 0 if is_root is None else is_root
        self.counts = TreeCounts()
        self._umask = current_umask()
        self._root_fd = os.open(destination, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs: dict[tuple[str, ...], int] = {}
        self._deferred: dict[tuple[str, ...], tuple[tarfile.TarInfo, int]] = {}
        self._files: set[tuple[str, ...]] = set()
        #: Entries this copy made (not the user's): one in the way is the vault's doing.
        self._created: set[tuple[str, ...]] = set()
        self._pending: _Pending | None = None
        self._nonce = secrets.token_hex(8)
        self._made = 0
        self._partials: dict[int, tuple[int, tuple[str, ...], str]] = {}
        self._entry = ""  # the entry being handled, for errors

    # -- events -------------------------------------------------------------------------

    def handle(self, event: TarEvent) -> None:
        """Apply one event. A file system error here (the disk full, say) is raised as a
        ``FileOpError`` naming the entry, never a temporary name."""
        try:
            # By exact type (the event classes are @final), the most frequent first.
            if type(event) is DataReceived:
                assert self._pending is not None
                self._pending.writer.write(event.data)
                self.counts.bytes += len(event.data)
            elif type(event) is MemberStarted:
                self._entry = event.info.name
                self._member(event.info, event.mtime_ns)
            elif type(event) is FileEnded:
                assert self._pending is not None
                self._pending.writer.finish(event.size)
            elif type(event) is Verified:
                self._land()
            elif type(event) is ArchiveEnded:
                self._finish()
        except OSError as exc:
            raise local_error(self._entry, exc) from None

    def close(self) -> None:
        for fd in list(self._partials):
            self.drop_partial(fd, keep=True)
        self._discard_pending()
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def restart(self) -> None:
        """The stream was lost and is asked for again from its start: the file it cut off
        goes, and the counts start over (the new stream sends every entry again)."""
        self._discard_pending()
        self.counts = TreeCounts()

    def _discard_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            os.close(pending.writer.fd)
            with contextlib.suppress(OSError):
                os.unlink(pending.temp, dir_fd=pending.parent)

    # -- large files, fetched apart from the stream -------------------------------------

    def open_partial(self, info: tarfile.TarInfo, key: str) -> tuple[int, int]:
        """For a member the vault deferred: checks it as any member, then opens (creating
        or reusing) the partial file ``key`` beside its final name. Returns (fd, size
        held): what an interrupted run left there may be resumed."""
        entry = info.name
        parts = self._parts(entry, entry, "name")
        self._check_kind(info, entry)
        try:
            parent = self._dir_fd(parts[:-1], entry)
            temp = f"{TEMP_PREFIX}{key}"
            fd = os.open(
                temp, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
            )
        except OSError as exc:
            raise local_error(entry, exc) from None
        self._partials[fd] = (parent, parts, temp)
        return fd, os.fstat(fd).st_size

    def land_partial(self, fd: int, info: tarfile.TarInfo, mtime_ns: int) -> None:
        """The partial's SHA-256 matched the vault's: metadata, then the rename."""
        parent, parts, temp = self._partials.pop(fd)
        self._pending = _Pending(info, mtime_ns, parent, parts, temp, SparseWriter(fd))
        try:
            self._land()
        except OSError as exc:
            raise local_error(info.name, exc) from None

    def holds(self, fd: int) -> bool:
        return fd in self._partials

    def drop_partial(self, fd: int, *, keep: bool) -> None:
        """Close an unfinished partial; ``keep`` it for a later run to resume."""
        parent, _, temp = self._partials.pop(fd)
        os.close(fd)
        if not keep:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=parent)

    # -- members ------------------------------------------------------------------------

    def _member(self, info: tarfile.TarInfo, mtime_ns: int) -> None:
        entry = info.name
        parts = self._parts(entry, entry, "name")
        self._check_kind(info, entry)
        try:
            parent = self._dir_fd(parts[:-1], entry)
            name = parts[-1]
            if info.isdir():
                self._directory(parent, parts, entry)
                self._deferred[parts] = (info, mtime_ns)
                self.counts.dirs += 1
            elif info.isreg():
                self._start_file(info, mtime_ns, parent, parts)
            elif info.issym():
                self._free_name(parent, parts, "symlink")
                os.symlink(info.linkname, name, dir_fd=parent)
                self._created.add(parts)
                self._metadata(info, mtime_ns, name=name, dir_fd=parent, link=True)
                self.counts.symlinks += 1
            else:
                self._hardlink(info, parent, parts, entry)
        except OSError as exc:
            raise local_error(entry, exc) from None

    def _parts(self, name: str, entry: str, what: str) -> tuple[str, ...]:
        if len(name) > MAX_PATH or "\0" in name:
            raise refuse(entry, f"its {what} is over {MAX_PATH} characters or holds a NUL")
        if name.startswith("/"):
            raise refuse(entry, f"its {what} is absolute ({name!r})")
        parts = tuple(part for part in name.split("/") if part not in ("", "."))
        if ".." in parts:
            raise refuse(entry, f"its {what} has a '..' component ({name!r})")
        if not parts or parts[0] not in self.tops:
            asked = ", ".join(repr(top) for top in self.tops)
            raise refuse(entry, f"its {what} is not under what was asked for ({asked})")
        return (self.tops[parts[0]], *parts[1:])

    def _check_kind(self, info: tarfile.TarInfo, entry: str) -> None:
        if info.ischr() or info.isblk():
            raise refuse(entry, f"it is a device node ({info.devmajor}, {info.devminor})")
        if info.isfifo():
            raise refuse(entry, "it is a FIFO")
        if not (info.isdir() or info.isreg() or info.issym() or info.islnk()):
            raise refuse(entry, f"it has an unsupported tar type {info.type!r}")
        special = info.mode & (stat.S_ISUID | stat.S_ISGID) and not info.isdir()
        if special and not (self.preserve and self.is_root):
            raise refuse(
                entry,
                f"it has the setuid/setgid bit (mode {info.mode & 0o7777:04o}), only kept "
                "with -p as root",
            )

    def _dir_fd(self, parts: tuple[str, ...], entry: str) -> int:
        """The directory ``parts`` under DST, never reached through a symlink: from the
        deepest one already open, down a level at a time (no recursion: a hostile stream
        may name an entry a thousand levels below anything it listed)."""
        known = len(parts)
        while known and parts[:known] not in self._dirs:
            known -= 1
        fd = self._dirs[parts[:known]] if known else self._root_fd
        for level in range(known + 1, len(parts) + 1):
            fd = self._open_dir(fd, parts[:level], entry)
        return fd

    def _open_dir(self, parent: int, parts: tuple[str, ...], entry: str) -> int:
        try:
            child = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            # A parent the stream did not list: made like tar does, then opened safely.
            os.mkdir(parts[-1], 0o755, dir_fd=parent)
            self._created.add(parts)
            child = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            where = "/".join(parts)
            raise refuse(
                entry, f"it lies under {where!r}, which is a symlink or not a directory"
            ) from None
        self._dirs[parts] = child
        return child

    def _free_name(self, parent: int, parts: tuple[str, ...], incoming: str) -> None:
        """Make room for a non-directory: an old file or symlink goes, a dir stays."""
        name = parts[-1]
        try:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            raise self._conflict(parts, "a directory", incoming)
        os.unlink(name, dir_fd=parent)

    def _directory(self, parent: int, parts: tuple[str, ...], entry: str) -> None:
        name = parts[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
            self._created.add(parts)
        except FileExistsError:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode):
                # As cp -r and tar refuse: it may be the user's own file (DST itself).
                kind = "a file" if stat.S_ISREG(info.st_mode) else "an entry"
                raise self._conflict(parts, kind, "directory") from None
        self._dir_fd(parts, entry)

    def _conflict(self, parts: tuple[str, ...], what: str, incoming: str) -> VaultError:
        """An entry in the way: one this copy made is the vault naming a path twice (as a
        symlink, then as a directory: refused as any unsafe entry); one that was here
        before is the user's, kept (``_in_the_way``)."""
        if parts in self._created or parts in self._files:
            return refuse("/".join(parts), f"it names {what} this copy made again, as a {incoming}")
        return _in_the_way(os.path.join(self.destination, *parts), what, incoming)

    def _start_file(
        self, info: tarfile.TarInfo, mtime_ns: int, parent: int, parts: tuple[str, ...]
    ) -> None:
        self._made += 1  # unique with the writer's random nonce; O_EXCL guards the rest
        temp = f"{TEMP_PREFIX}{self._nonce}-{self._made}"
        # Without -p the file's final mode is its mode less the umask, which open(2) applies
        # itself: one fchmod less per file. With -p the mode is set once the digest matched.
        mode = 0o600 if self.preserve else info.mode & 0o777
        fd = os.open(temp, FILE_FLAGS, mode, dir_fd=parent)
        writer = SparseWriter(fd)
        self._pending = _Pending(info, mtime_ns, parent, parts, temp, writer, not self.preserve)

    def _land(self) -> None:
        """The digest matched: metadata, then the rename that makes the file appear."""
        pending, self._pending = self._pending, None
        assert pending is not None
        fd = pending.writer.fd
        try:
            self._metadata(pending.info, pending.mtime_ns, fd=fd, mode_set=pending.mode_set)
            name = pending.parts[-1]
            try:
                os.rename(pending.temp, name, src_dir_fd=pending.parent, dst_dir_fd=pending.parent)
            except IsADirectoryError:  # rename(2) never replaces a directory with a file
                raise self._conflict(pending.parts, "a directory", "file") from None
            self._created.add(pending.parts)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(pending.temp, dir_fd=pending.parent)
            raise
        os.close(fd)
        self._files.add(pending.parts)
        self.counts.files += 1

    def _hardlink(
        self, info: tarfile.TarInfo, parent: int, parts: tuple[str, ...], entry: str
    ) -> None:
        target = self._parts(info.linkname, entry, "hardlink target")
        if target not in self._files:
            raise refuse(
                entry,
                f"it is a hardlink to {info.linkname!r}, which is not a file of this copy",
            )
        target_parent = self._dir_fd(target[:-1], entry)
        self._free_name(parent, parts, "hardlink")
        os.link(
            target[-1],
            parts[-1],
            src_dir_fd=target_parent,
            dst_dir_fd=parent,
            follow_symlinks=False,
        )
        self._files.add(parts)
        self.counts.files += 1

    def _metadata(
        self,
        info: tarfile.TarInfo,
        mtime_ns: int,
        *,
        fd: int | None = None,
        name: str | None = None,
        dir_fd: int | None = None,
        link: bool = False,
        mode_set: bool = False,
    ) -> None:
        """``mode_set``: the file was created with its final mode (see ``_start_file``)."""
        if self.preserve and self.is_root:
            if fd is not None:
                os.fchown(fd, info.uid, info.gid)
            else:
                os.chown(name or "", info.uid, info.gid, dir_fd=dir_fd, follow_symlinks=False)
        if link:
            if self.preserve:
                os.utime(name or "", ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
            return
        assert fd is not None
        if not mode_set:
            mode = info.mode & 0o7777 if self.preserve else info.mode & 0o777 & ~self._umask
            os.fchmod(fd, mode)
        if self.preserve:
            os.utime(fd, ns=(mtime_ns, mtime_ns))

    def _finish(self) -> None:
        """Directories' metadata last, deepest first, so their mtimes and modes hold."""
        if self._pending is not None:
            raise refuse(self._pending.info.name, "the stream ended before its digest")
        for parts in sorted(self._deferred, key=len, reverse=True):
            info, mtime_ns = self._deferred[parts]
            self._entry = info.name
            fd = self._dir_fd(parts, info.name)
            if self.preserve and self.is_root:
                os.fchown(fd, info.uid, info.gid)
            os.fchmod(fd, info.mode & 0o7777 if self.preserve else info.mode & 0o777 & ~self._umask)
            if self.preserve:
                os.utime(fd, ns=(mtime_ns, mtime_ns))


@dataclass
class _Pending:
    info: tarfile.TarInfo
    mtime_ns: int
    parent: int
    parts: tuple[str, ...]
    temp: str
    writer: SparseWriter
    #: Created with its final mode (``_start_file`` without -p): no chmod when it lands.
    mode_set: bool = False


def _in_the_way(path: str, what: str, incoming: str = "directory") -> VaultError:
    """A local entry the vault's would replace, which a copy does not do (cp -r refuses
    to overwrite a directory with a non-directory, or the other way): a conflict here,
    not a hostile vault."""
    from flyvault.errors import FileOpError

    return FileOpError(
        f"{path}: {what} of that name is here, and the vault's {incoming} would replace it; "
        "nothing was removed",
        hint="move or remove it, or copy to another DST",
    )


def local_error(entry: str, exc: OSError) -> VaultError:
    """A file system error on this machine while ``entry`` was created or written."""
    from flyvault.errors import FileOpError

    code = errno.errorcode.get(exc.errno or 0, "EIO")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return FileOpError(
            f"{entry}: the local disk is full ({code})",
            hint="free some space on this machine, then run the same copy again",
        )
    words = (exc.strerror or str(exc)).lower()
    return FileOpError(f"{entry}: could not be written here: {words} ({code})")
