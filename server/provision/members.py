"""Creating tar members inside a destination directory without ever leaving it.

``TreeWriter`` turns one parsed ``TarInfo`` at a time into a file, directory, link or node
under the destination. Every parent is opened component by component with ``O_NOFOLLOW``
relative to the destination's fd (an fd cache keeps that cheap), so an entry is never
reached through a symlink, and nothing is created by a path that a symlink could redirect:
files with ``O_EXCL | O_NOFOLLOW``, everything else with ``*at`` calls on a trusted parent fd.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flyvault.errors import ProvisionError

from .streams import human_size

log = logging.getLogger("flyvault.server.provision")

MiB = 1024 * 1024
GiB = 1024 * MiB
COPY_CHUNK = 1 * MiB
#: Free space is asked of the kernel at least every this many files...
SPACE_CHECK_EVERY = 256
#: ... and whenever the running estimate comes this close to the reserve.
SPACE_SLACK = 32 * MiB
#: Open directory fds kept for the next entries (archives list a directory's files together).
DIR_CACHE = 256
MAX_WARNINGS = 20
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
REBUILD = (
    "rebuild the archive from a real directory tree, e.g. `tar -C rootfs -czf rootfs.tar.gz .`"
)
#: Device nodes are made only here, and only when the provisioning allows them.
DEVICE_DIR = "dev"
NO_DEVICES = (
    "leave device nodes out of the image (the vault mounts its own /dev with the usual "
    "nodes at run time), e.g. `tar --exclude='./dev/*' -C rootfs -czf rootfs.tar.gz .`, "
    "or provision with --allow-devices to create the ones under /dev"
)


@dataclass(frozen=True)
class ExtractLimits:
    max_entries: int = 1_000_000
    #: Bound on the decompressed tar stream: the gzip-bomb guard.
    max_total_bytes: int = 64 * GiB
    max_entry_bytes: int = 16 * GiB
    max_path_length: int = 4096
    #: Bomb guard: unpacked bytes per archive byte received so far (None: off). Real
    #: images compress 2-5x (gzip, zstd); deflate cannot exceed ~1032x, so 100x leaves a
    #: genuine image 20x headroom while a bomb can no longer fill a volume from an upload
    #: 1000x smaller than the damage.
    max_expansion_ratio: float | None = 100.0
    #: ... checked only past this many unpacked bytes: tar headers and padding make small
    #: archives compress 100x and more, and this much is kept free on the volume anyway.
    expansion_floor_bytes: int = 64 * MiB


def refuse(entry: str, problem: str, fix: str) -> ProvisionError:
    return ProvisionError(f"rootfs archive entry {entry!r} {problem}; {fix}", hint=fix)


def archive_error(reason: str, last: str) -> ProvisionError:
    """A tar-level failure: truncated (most often) or a corrupt header."""
    after = f" after entry {last!r}" if last else ""
    if "unexpected end of data" in reason or "truncated" in reason or "empty" in reason:
        return ProvisionError(
            f"the archive is truncated: it ends{after} without the tar end-of-archive "
            "marker; the upload was cut short or the file is incomplete: check the file "
            "and send it again",
            hint="check the archive file and send it again",
        )
    return ProvisionError(
        f"the archive is corrupt: a bad tar header{after} ({reason}); check the file "
        "(tar -tvf) and send it again",
        hint="check the archive with tar -tvf and send it again",
    )


class TreeWriter:
    """Writes members under ``destination``; owns the fds it opens (``close``)."""

    def __init__(
        self,
        destination: Path,
        limits: ExtractLimits,
        *,
        make_devices: bool,
        auto_devices: bool,
        min_free_bytes: int,
        allow_devices: bool = False,
    ) -> None:
        self.destination = destination
        self.limits = limits
        # Policy (the provisioning's --allow-devices) first, then capability (root, mknod).
        self._allow_devices = allow_devices
        self._make_devices = make_devices
        # Auto mode: when the kernel refuses mknod (no CAP_MKNOD), skip instead of failing.
        self._auto_devices = auto_devices
        self._min_free = min_free_bytes
        try:
            self._root_fd = os.open(destination, DIR_FLAGS)
        except OSError as exc:
            raise ProvisionError(
                f"cannot open the staging directory {destination}: {exc.strerror}"
            ) from None
        self._dirs: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self._deferred: dict[tuple[str, ...], tarfile.TarInfo] = {}
        self._entries = 0
        self._extracted = 0
        self._skipped: list[str] = []
        self._devices: list[str] = []
        self._warnings: list[str] = []
        self._xattr_failures = 0
        self._free = 0  # forces a statvfs on the first file
        self._written_since = 0
        self._files_since = 0

    @property
    def entries(self) -> int:
        return self._entries

    @property
    def extracted(self) -> int:
        return self._extracted

    @property
    def skipped_devices(self) -> list[str]:
        return self._skipped

    @property
    def created_devices(self) -> list[str]:
        """Device nodes made, as absolute paths in the rootfs (``/dev/null``)."""
        return self._devices

    @property
    def warnings(self) -> list[str]:
        return self._warnings

    @property
    def xattr_failures(self) -> int:
        return self._xattr_failures

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def add(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Create one member under the destination, or refuse it."""
        entry = member.name
        self._entries += 1
        limits = self.limits
        if self._entries > limits.max_entries:
            raise refuse(
                entry,
                f"is past the limit of {limits.max_entries} entries",
                "slim the image or raise ExtractLimits.max_entries",
            )
        if member.size > limits.max_entry_bytes:
            raise refuse(
                entry,
                f"is {human_size(member.size)}, over the per-entry limit of "
                f"{human_size(limits.max_entry_bytes)}",
                "leave the file out of the image or raise ExtractLimits.max_entry_bytes",
            )
        parts = self._split(entry, entry, "name")
        try:
            self._create(tf, member, entry, parts)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._volume_full(entry, member.size) from None
            raise refuse(entry, f"could not be created: {exc.strerror or exc}", REBUILD) from None

    def _split(self, name: str, entry: str, what: str) -> tuple[str, ...]:
        if len(name) > self.limits.max_path_length:
            raise refuse(
                entry,
                f"has a {what} of {len(name)} characters, over the limit of "
                f"{self.limits.max_path_length}",
                "shorten the path or raise ExtractLimits.max_path_length",
            )
        if name.startswith("/"):
            raise refuse(
                entry,
                f"has an absolute {what} ({name!r}), which could write outside the rootfs",
                "make the archive's paths relative, e.g. `tar -C rootfs -czf rootfs.tar.gz .`",
            )
        parts = _split_name(name)
        if ".." in parts:
            raise refuse(
                entry,
                f"has a '..' component in its {what} ({name!r}), which could reach outside "
                "the rootfs",
                REBUILD,
            )
        return parts

    def _create(
        self, tf: tarfile.TarFile, member: tarfile.TarInfo, entry: str, parts: tuple[str, ...]
    ) -> None:
        if not parts:  # "./": the rootfs's own top directory
            if not member.isdir():
                raise refuse(entry, "names the rootfs top but is not a directory", REBUILD)
            self._deferred[parts] = member
            return
        parent = self._dir_fd(parts[:-1], entry, create=True)
        name = parts[-1]
        if member.isdir():
            self._make_directory(parent, name, entry)
            self._deferred[parts] = member
        elif member.isreg():
            self._write_file(tf, member, parent, name, entry)
        elif member.issym():
            if len(member.linkname) > self.limits.max_path_length:
                raise refuse(
                    entry,
                    f"is a symlink whose target has {len(member.linkname)} characters, over "
                    f"the limit of {self.limits.max_path_length}",
                    "shorten the target or raise ExtractLimits.max_path_length",
                )
            # Verbatim, absolute targets included: they are only ever resolved inside the
            # workload's namespace, never while extracting.
            self._replace(
                lambda: os.symlink(member.linkname, name, dir_fd=parent), parent, name, entry
            )
            self._set_owner(member, entry, name=name, dir_fd=parent)
            self._set_times(member, name=name, dir_fd=parent)
        elif member.islnk():
            self._hardlink(member, parts, parent, entry)
        elif member.ischr() or member.isblk():
            self._check_device(member, parts, entry)
            self._node(member, parent, name, entry)
        elif member.isfifo():
            self._node(member, parent, name, entry)
        else:
            raise refuse(entry, f"has an unsupported tar type {member.type!r}", REBUILD)

    def _dir_fd(self, parts: tuple[str, ...], entry: str, *, create: bool) -> int:
        """An fd for the directory ``parts`` under the destination, never via a symlink."""
        if not parts:
            return self._root_fd
        cached = self._dirs.get(parts)
        if cached is not None:
            self._dirs.move_to_end(parts)
            return cached
        depth = len(parts) - 1
        while depth > 0 and parts[:depth] not in self._dirs:
            depth -= 1
        fd = self._dirs[parts[:depth]] if depth else self._root_fd
        for index in range(depth, len(parts)):
            component = parts[index]
            try:
                child = os.open(component, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                # Archives need not list every parent; like tar, make it root-owned 0755.
                os.mkdir(component, 0o755, dir_fd=fd)
                child = os.open(component, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = "/".join(parts[: index + 1])
                # With O_DIRECTORY, Linux reports a symlink as ENOTDIR: ask which it is.
                info = os.stat(component, dir_fd=fd, follow_symlinks=False)
                kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a directory"
                raise refuse(
                    entry,
                    f"lies under {where!r}, which is {kind} (made by an earlier entry); "
                    "following it could write outside the rootfs",
                    REBUILD,
                ) from None
            self._dirs[parts[: index + 1]] = child
            if len(self._dirs) > DIR_CACHE:
                _, old = self._dirs.popitem(last=False)
                os.close(old)
            fd = child
        return fd

    def _replace(self, make: Callable[[], object], parent: int, name: str, entry: str) -> None:
        """Run ``make``; if the name exists, remove it (never a directory) and retry."""
        try:
            make()
            return
        except FileExistsError:
            pass
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            raise refuse(entry, "would replace a directory of the same name", REBUILD)
        os.unlink(name, dir_fd=parent)
        make()

    def _make_directory(self, parent: int, name: str, entry: str) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode):
                os.unlink(name, dir_fd=parent)
                os.mkdir(name, 0o700, dir_fd=parent)

    def _write_file(
        self, tf: tarfile.TarFile, member: tarfile.TarInfo, parent: int, name: str, entry: str
    ) -> None:
        self._check_space(member.size, entry)
        fds: list[int] = []
        self._replace(
            lambda: fds.append(os.open(name, FILE_FLAGS, 0o600, dir_fd=parent)), parent, name, entry
        )
        fd = fds[0]
        try:
            # Fast path: read the data straight off tarfile's stream (the member's data
            # starts where the header ended); sparse members need tarfile's map.
            source: Any = tf.fileobj
            if member.sparse is not None or source is None or source.tell() != member.offset_data:
                source = tf.extractfile(member)
            assert source is not None
            remaining = member.size
            while remaining:
                data = source.read(min(remaining, COPY_CHUNK))
                if not data:
                    raise archive_error("unexpected end of data", member.name)
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                remaining -= len(data)
                self._extracted += len(data)
            self._set_owner(member, entry, fd=fd)
            os.fchmod(fd, member.mode & 0o7777)
            self._set_xattrs(member, entry, fd)
            self._set_times(member, fd=fd)
        except tarfile.TarError as exc:
            raise archive_error(str(exc), member.name) from None
        finally:
            os.close(fd)

    def _hardlink(
        self, member: tarfile.TarInfo, parts: tuple[str, ...], parent: int, entry: str
    ) -> None:
        name = parts[-1]
        target = self._split(member.linkname, entry, "hardlink target")
        fix = "hardlinks must point at a file that appears earlier in the archive; " + REBUILD
        if not target:
            raise refuse(entry, "is a hardlink to the rootfs top directory", fix)
        try:
            target_parent = self._dir_fd(target[:-1], entry, create=False)
            info = os.stat(target[-1], dir_fd=target_parent, follow_symlinks=False)
        except FileNotFoundError:
            raise refuse(
                entry, f"is a hardlink to {member.linkname!r}, which is not (yet) extracted", fix
            ) from None
        if stat.S_ISDIR(info.st_mode):
            raise refuse(entry, f"is a hardlink to the directory {member.linkname!r}", fix)
        if (stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)) and not _under_dev(parts):
            # The target was allowed under /dev: a second name must not carry it elsewhere.
            raise refuse(
                entry,
                f"is a hardlink to the device node {member.linkname!r} outside /dev",
                NO_DEVICES,
            )
        if target == parts:  # a link to itself: already there
            return

        def link() -> None:
            os.link(
                target[-1],
                name,
                src_dir_fd=target_parent,
                dst_dir_fd=parent,
                follow_symlinks=False,
            )

        self._replace(link, parent, name, entry)

    def _check_device(self, member: tarfile.TarInfo, parts: tuple[str, ...], entry: str) -> None:
        """Device nodes are refused unless allowed, and even then only under /dev."""
        kind = "character" if member.ischr() else "block"
        what = f"is a {kind} device node ({member.devmajor}, {member.devminor})"
        if not self._allow_devices:
            raise refuse(entry, f"{what}; device nodes are refused by default", NO_DEVICES)
        if not _under_dev(parts):
            raise refuse(
                entry,
                f"{what} outside /dev; device nodes are only created under /dev, even with "
                "--allow-devices",
                "leave it out of the image or move it under /dev",
            )

    def _node(self, member: tarfile.TarInfo, parent: int, name: str, entry: str) -> None:
        mode = member.mode & 0o7777
        if member.isfifo():
            self._replace(lambda: os.mkfifo(name, 0o600, dir_fd=parent), parent, name, entry)
        else:
            if not self._make_devices:
                self._skipped.append(entry)
                return
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            try:
                self._replace(
                    lambda: os.mknod(name, kind | 0o600, device, dir_fd=parent), parent, name, entry
                )
            except PermissionError:
                if not self._auto_devices:
                    raise
                self._make_devices = False  # not permitted here: skip the rest quietly
                self._skipped.append(entry)
                return
            self._devices.append("/" + "/".join(_split_name(entry)))
        self._set_owner(member, entry, name=name, dir_fd=parent)
        # The node was just created by us, so following the name cannot leave the tree.
        os.chmod(name, mode, dir_fd=parent)
        self._set_times(member, name=name, dir_fd=parent)

    # -- metadata -------------------------------------------------------------------------

    def _set_owner(
        self,
        member: tarfile.TarInfo,
        entry: str,
        *,
        fd: int | None = None,
        name: str | None = None,
        dir_fd: int | None = None,
    ) -> None:
        try:
            if fd is not None:
                os.fchown(fd, member.uid, member.gid)
            else:
                assert name is not None
                os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
        except PermissionError:
            # Only root can give files away; unprivileged dev runs keep their own uid.
            self._warn(f"{entry}: owner {member.uid}:{member.gid} not kept (not root)")

    def _set_xattrs(self, member: tarfile.TarInfo, entry: str, fd: int) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            xattr = key[len("SCHILY.xattr.") :]
            try:
                os.setxattr(fd, xattr, value.encode("utf-8", "surrogateescape"))
            except OSError as exc:
                # A filesystem without that namespace (user.* on old tmpfs) must not fail
                # the whole rootfs: count it and report it.
                self._xattr_failures += 1
                self._warn(f"{entry}: xattr {xattr} not set: {exc.strerror}")

    def _set_times(
        self,
        member: tarfile.TarInfo,
        *,
        fd: int | None = None,
        name: str | None = None,
        dir_fd: int | None = None,
    ) -> None:
        try:
            mtime = int(member.mtime * 1_000_000_000)
            if fd is not None:
                os.utime(fd, ns=(mtime, mtime))
            else:
                assert name is not None
                os.utime(name, ns=(mtime, mtime), dir_fd=dir_fd, follow_symlinks=False)
        except (OverflowError, ValueError):
            self._warn(f"{member.name}: mtime {member.mtime} out of range, not kept")

    def finish(self) -> None:
        """Apply the directories' metadata, once every entry is in place."""
        # Deepest first: setting a directory's mode and mtime after all its children.
        for parts in sorted(self._deferred, key=len, reverse=True):
            member = self._deferred[parts]
            fd = self._dir_fd(parts, member.name, create=False)
            self._set_owner(member, member.name, fd=fd)
            os.fchmod(fd, member.mode & 0o7777)
            self._set_xattrs(member, member.name, fd)
            self._set_times(member, fd=fd)

    # -- space ----------------------------------------------------------------------------

    def _check_space(self, size: int, entry: str) -> None:
        # statvfs per file costs ~10% of the extraction time, so trust the last figure
        # minus what was written since, with a slack for metadata, and ask again every
        # SPACE_CHECK_EVERY files or when the estimate gets close. ENOSPC is still caught.
        estimate = self._free - self._written_since - size
        self._files_since += 1
        if estimate >= self._min_free + SPACE_SLACK and self._files_since < SPACE_CHECK_EVERY:
            self._written_since += size
            return
        info = os.statvfs(self._root_fd)
        self._free = info.f_bavail * info.f_frsize
        self._written_since = size
        self._files_since = 0
        if self._free - size < self._min_free:
            raise self._volume_full(entry, size, self._free)

    def _volume_full(self, entry: str, size: int, free: int | None = None) -> ProvisionError:
        if free is None:
            info = os.statvfs(self._root_fd)
            free = info.f_bavail * info.f_frsize
        fix = (
            "free space on the volume (or extend it: `fly volumes extend`) or use a smaller "
            "image; the previous rootfs is untouched"
        )
        return ProvisionError(
            f"the volume is full: {free // MiB} MiB free on {self.destination.parent} with "
            f"{human_size(self._extracted)} of the new rootfs unpacked so far; entry {entry!r} "
            f"needs {human_size(size)} more and {self._min_free // MiB} MiB are kept in "
            f"reserve; {fix}",
            hint=fix,
        )

    def _warn(self, message: str) -> None:
        # Bounded: an unprivileged run would otherwise log one line per entry.
        if len(self._warnings) < MAX_WARNINGS:
            self._warnings.append(message)
            log.warning("rootfs extraction: %s", message)


def _split_name(name: str) -> tuple[str, ...]:
    return tuple(part for part in name.split("/") if part not in ("", "."))


def _under_dev(parts: tuple[str, ...]) -> bool:
    """``dev/...``: inside the rootfs's /dev, not /dev itself."""
    return len(parts) >= 2 and parts[0] == DEVICE_DIR
