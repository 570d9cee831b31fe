"""Real small rootfs archives for the provisioning tests, a tree manifest, and a crash driver.

Archives are written with ``tarfile`` from member descriptions, so they carry owners,
setuid bits, device nodes and xattrs without needing them on the machine that builds them.
``busybox_archive`` builds a rootfs that really runs, from Debian's busybox-static.

Run as a script, this module is the crash-test driver: it provisions an archive into a
data dir and SIGKILLs itself at the N-th checkpoint (see ``driver``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MTIME = 1_700_000_000
BUSYBOX = Path("/bin/busybox")
#: vfs_cap_data revision 2, effective, permitted = CAP_NET_RAW: what `setcap cap_net_raw+ep`
#: writes for ping.
PING_CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


@dataclass
class Member:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    major: int = 0
    minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    size: int | None = None  # a declared size other than len(data): for broken archives

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = self.type
        info.mode = self.mode
        info.uid, info.gid = self.uid, self.gid
        info.mtime = MTIME
        info.linkname = self.linkname
        info.devmajor, info.devminor = self.major, self.minor
        info.size = len(self.data) if self.size is None else self.size
        if self.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            info.size = 0
        for key, value in self.xattrs.items():
            info.pax_headers[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
        return info


def directory(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Member:
    return Member(name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid)


def symlink(name: str, target: str) -> Member:
    return Member(name, tarfile.SYMTYPE, mode=0o777, linkname=target)


def hardlink(name: str, target: str) -> Member:
    return Member(name, tarfile.LNKTYPE, linkname=target)


def regular(name: str, data: bytes = b"", mode: int = 0o644, **kwargs: Any) -> Member:
    return Member(name, tarfile.REGTYPE, data=data, mode=mode, **kwargs)


def basic_rootfs(variant: str = "a", *, blob_size: int = 0, devices: bool = False) -> list[Member]:
    """A small rootfs exercising everything a real image has; ``variant`` changes content.

    ``devices`` adds /dev/null and /dev/loop0, which the vault refuses unless the
    provisioning allows device nodes (``allow_devices``).
    """
    members = [
        directory("./"),
        directory("bin"),
        regular("bin/sh", f"#!fake shell {variant}\n".encode(), 0o755),
        hardlink("bin/ash", "bin/sh"),
        directory("sbin"),
        regular("sbin/init", f"#!fake init {variant}\n".encode(), 0o755),
        directory("etc"),
        regular("etc/os-release", f"NAME=fly-vault-test-{variant}\n".encode()),
        symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
        directory("usr"),
        directory("usr/bin"),
        regular("usr/bin/passwd", b"setuid binary\n", 0o4755),
        regular("usr/bin/wall", b"setgid binary\n", 0o2755, gid=5),
        regular("usr/bin/ping", b"ping\n", 0o755, xattrs={"security.capability": PING_CAPABILITY}),
        directory("usr/share"),
        regular("usr/share/note", b"xattr\n", xattrs={"user.fly-vault": b"kept"}),
        directory("root", 0o700),
        regular("root/.profile", f"# root profile {variant}\n".encode(), 0o600),
        directory("home"),
        directory("home/user", 0o750, uid=1000, gid=1000),
        regular(
            "home/user/notes.txt", f"user notes {variant}\n".encode(), 0o640, uid=1000, gid=1000
        ),
        directory("tmp", 0o1777),
        directory("var"),
        directory("var/ro", 0o555),
        regular("var/ro/inside", b"a file in a read-only directory\n", 0o444),
        directory("run"),
        Member("run/initctl", tarfile.FIFOTYPE, mode=0o600),
        directory("dev"),
    ]
    if devices:
        members += [
            Member("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
            Member("dev/loop0", tarfile.BLKTYPE, mode=0o660, gid=6, major=7, minor=0),
        ]
    if blob_size:
        rng = random.Random(variant)
        members.append(regular("usr/share/blob", rng.randbytes(blob_size)))
    return members


def tar_bytes(members: Iterable[Member], *, end: bool = True) -> bytes:
    """A plain PAX tar of ``members``; ``end=False`` leaves out the end-of-archive blocks."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member in members:
            archive.addfile(member.tarinfo(), io.BytesIO(member.data) if member.data else None)
    data = buffer.getvalue()
    if not end:
        data = data[: _end_of_members(data)]
    return data


def _end_of_members(data: bytes) -> int:
    """Offset of the end-of-archive zero blocks in a tar we just wrote."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        last = archive.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def write_archive(path: Path, members: Iterable[Member], compression: str = "gz") -> Path:
    """Write ``members`` as tar (``none``), tar.gz (``gz``) or tar.zst (``zst``, needs zstd)."""
    data = tar_bytes(members)
    if compression == "gz":
        data = subprocess.run(["gzip", "-c"], input=data, capture_output=True, check=True).stdout
    elif compression == "zst":
        data = subprocess.run(["zstd", "-c"], input=data, capture_output=True, check=True).stdout
    path.write_bytes(data)
    return path


def busybox_archive(path: Path) -> Path:
    """A bootable busybox rootfs (tar.gz): /bin/busybox with applet links, /sbin/init."""
    members = [
        directory("./"),
        directory("bin"),
        regular("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        *(symlink(f"bin/{applet}", "busybox") for applet in ("sh", "ls", "cat", "id", "echo")),
        directory("sbin"),
        symlink("sbin/init", "../bin/busybox"),
        directory("etc"),
        regular(
            "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
        ),
        directory("root", 0o700),
        regular("root/.profile", b"export PS1='vault# '\n", 0o600),
        directory("home"),
        directory("home/user", 0o750, uid=1000, gid=1000),
        directory("tmp", 0o1777),
        directory("proc"),
        directory("dev"),
    ]
    return write_archive(path, members, "gz")


def generated_tree_archive(path: Path, target_gz_bytes: int, seed: int = 7) -> Path:
    """A tar.gz of a made-up /usr-like tree that compresses about 2.6x, like a real image."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 6)).hex().encode() for _ in range(400)]
    # A pool of text to slice files from: generating every file's words would be slow.
    pool = b" ".join(rng.choices(words, k=600_000))
    tree = path.with_suffix(".tree")
    shutil.rmtree(tree, ignore_errors=True)
    written = 0
    index = 0
    while written < target_gz_bytes * 5 // 2:
        folder = tree / "usr" / f"lib{index // 200}"
        folder.mkdir(parents=True, exist_ok=True)
        size = min(int(rng.expovariate(1 / 24_000)) + 64, 4 * 1024 * 1024)
        # Some random bytes (binaries), the rest text: about the gzip ratio of an image.
        noise = rng.randbytes(size // 6)
        start = rng.randrange(len(pool) - size)
        (folder / f"file{index}").write_bytes(noise + pool[start : start + size - len(noise)])
        written += size
        index += 1
    subprocess.run(["tar", "-C", str(tree), "-czf", str(path), "."], check=True)
    shutil.rmtree(tree)
    return path


def manifest(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything that must survive: type, mode, owner, content, target, device, xattrs."""
    result: dict[str, tuple[Any, ...]] = {}

    def visit(path: Path, relative: str) -> None:
        info = path.lstat()
        kind = stat.S_IFMT(info.st_mode)
        common = (kind, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)
        if stat.S_ISDIR(info.st_mode):
            result[relative] = common
            for child in sorted(os.listdir(path)):
                visit(path / child, f"{relative}/{child}" if relative else child)
        elif stat.S_ISREG(info.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            result[relative] = (*common, digest, info.st_mtime_ns, _xattrs(path))
        elif stat.S_ISLNK(info.st_mode):
            result[relative] = (*common, os.readlink(path))
        else:
            result[relative] = (*common, info.st_rdev)

    visit(root, "")
    return result


def _xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((name, os.getxattr(path, name, follow_symlinks=False)) for name in names))


# -- the crash-test driver --------------------------------------------------------------------


def driver(argv: list[str]) -> int:
    """``provision DATA ARCHIVE KILL_AT START`` or ``recover DATA KILL_AT``.

    Counts checkpoints (one per fed chunk, one per store step) and SIGKILLs itself at
    checkpoint KILL_AT (0: never). Prints {"checkpoints": N} when it survives.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flyvault.errors import ProvisionError
    from flyvault.server.provision.extract import StreamingExtractor
    from flyvault.server.provision.store import RootfsStore

    operation, data_dir = argv[0], Path(argv[1])
    kill_at = int(argv[3] if operation == "provision" else argv[2])
    count = 0

    def checkpoint(step: str) -> None:
        nonlocal count
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    store = RootfsStore(data_dir, checkpoint=checkpoint)
    outcome = "ok"
    if operation == "recover":
        store.recover()
    else:
        archive, start = Path(argv[2]), argv[4]
        staging = store.new_staging()
        checkpoint("staging")

        async def extract() -> None:
            extractor = StreamingExtractor(staging)
            with archive.open("rb") as source:
                while chunk := source.read(16 * 1024):
                    checkpoint("feed")
                    await extractor.feed(chunk)
            await extractor.finish()

        asyncio.run(extract())
        checkpoint("extracted")
        store.prepare_persistence(staging)
        try:
            store.activate(lambda root: start == "ok" and (root / "sbin/init").exists())
        except ProvisionError:
            outcome = "rolled-back"
    print(json.dumps({"checkpoints": count, "outcome": outcome}))
    return 0


if __name__ == "__main__":
    sys.exit(driver(sys.argv[1:]))
