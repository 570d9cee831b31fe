"""The file stream in VM mode, as root: paths resolve inside the workload's mount namespace
(what the stream writes, exec sees; host paths are out of reach), and a named ``user`` acts
with that account's rights (owner of what it writes, EACCES in words where it may not)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
import shutil
import stat
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, run_async, vault_entry
from test_provision_e2e import BUSYBOX, configure, fv, make_rootfs

from flyvault.errors import FileOpError, NotFoundError, UsageError
from flyvault.standins import OidcIssuer

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and pivot_root need root"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox (busybox-static)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]


PASSWD = b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:U:/home/user:/bin/sh\n"
GROUP = b"root:x:0:\nuser:x:1000:\nstaff:x:50:user\n"


def test_paths_resolve_inside_the_workload_as_root_and_as_a_user(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    from flyvault.client import Vault

    rootfs = make_rootfs(
        tmp_path / "a.tar.gz", "A", extra={"etc/passwd": PASSWD, "etc/group": GROUP}
    )
    configure(vm_init.port, issuer, rootfs=str(rootfs))
    marker = Path("/tmp") / f"fly-vault-files-host-{os.getpid()}"
    marker.write_text("host only")

    async def body() -> dict[str, Any]:
        vault = Vault(vault_entry(vm_init.port, issuer, name="vm", rootfs=str(rootfs)))
        out: dict[str, Any] = {}
        try:
            files = vault.files()
            out["version"] = await files.read_bytes("/etc/version")
            out["written"] = await files.write("/tmp/from-stream.txt", b"via the stream\n")
            try:
                await files.stat(str(marker))
            except NotFoundError as exc:
                out["host"] = exc
            out["relative"] = await files.stat(".profile")  # root's home, /root
            user = vault.files(user="user")
            await user.write("/home/user/mine.txt", b"owned")
            out["mine"] = await user.stat("/home/user/mine.txt")
            out["user_relative"] = await user.read_bytes("mine.txt")
            try:
                await user.write("/etc/nope", b"x")
            except FileOpError as exc:
                out["denied"] = exc
            try:
                await vault.files(user="ghost").stat("/")
            except UsageError as exc:
                out["ghost"] = exc
        finally:
            await vault.close()
        return out

    try:
        out = run_async(body(), timeout=120)
    finally:
        marker.unlink()
    assert out["version"] == b"A\n"
    seen = fv("exec", "vm", "--", "cat", "/tmp/from-stream.txt")
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout == b"via the stream\n"
    assert str(out["host"]) == f"{marker}: no such file or directory (ENOENT)"
    assert out["relative"].path == "/root/.profile"
    mine = out["mine"]
    assert (mine.uid, mine.gid, mine.owner, mine.group) == (1000, 1000, "user", "user")
    assert out["user_relative"] == b"owned"
    assert str(out["denied"]) == "/etc/nope: permission denied (EACCES)"
    assert "no user 'ghost'" in str(out["ghost"])
    owner = fv("exec", "vm", "--", "stat", "-c", "%u:%g", "/home/user/mine.txt")
    assert owner.stdout.strip() == b"1000:1000"


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found.update(int(p) for p in (task / "children").read_text().split())
    return found


def _cgroups(pid: int) -> dict[str, str]:
    """hierarchy (controllers, "" for v2) -> path, as /proc/PID/cgroup says."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return {line.split(":", 2)[1]: line.split(":", 2)[2] for line in lines}


async def _file_worker(init: InitProcess, deadline: float) -> int:
    """The forked file worker: a child of init running init's own program, once it has
    entered the workload's cgroup (it does so first) and then its mount namespace. Until
    then its /proc/PID/root is the host's: a path through it would reach the host's /tmp
    (a run under load once wrote the host's /tmp/fifo that way, and the read hung)."""
    own = Path(f"/proc/{init.process.pid}/cmdline").read_bytes()
    host_mnt = os.readlink(f"/proc/{init.process.pid}/ns/mnt")
    while time.monotonic() < deadline:
        for child in _children(init.process.pid):
            with contextlib.suppress(OSError):
                if (
                    Path(f"/proc/{child}/cmdline").read_bytes() == own
                    and _cgroups(child) != _cgroups(init.process.pid)
                    and not _same_mnt(child, host_mnt)
                ):
                    return child
        await asyncio.sleep(0.02)  # polling a condition, bounded by the deadline
    raise AssertionError("no file worker appeared")


def test_the_file_worker_runs_in_the_workloads_cgroup(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    """While a read blocks on a FIFO inside the workload, the worker's pid is listed in the
    cgroup.procs of the workload's cgroup: the one the workload's own processes are in."""
    from flyvault.client import Vault

    rootfs = make_rootfs(tmp_path / "a.tar.gz", "A")
    configure(vm_init.port, issuer, rootfs=str(rootfs))
    made = fv("exec", "vm", "--", "/bin/busybox", "mkfifo", "/tmp/fifo")
    assert made.returncode == 0, made.stderr

    async def body() -> dict[str, Any]:
        vault = Vault(vault_entry(vm_init.port, issuer, name="vm", rootfs=str(rootfs)))
        try:
            reading = asyncio.ensure_future(vault.files().read_bytes("/tmp/fifo"))
            worker = await _file_worker(vm_init, time.monotonic() + 30)
            out: dict[str, Any] = {"worker": worker, "cgroups": _cgroups(worker)}
            mine = os.readlink(f"/proc/{worker}/ns/mnt")
            out["neighbours"] = {}
            for hierarchy, path in out["cgroups"].items():
                mount = "/sys/fs/cgroup" + (f"/{hierarchy}" if hierarchy else "")
                if hierarchy.startswith("name="):
                    mount = f"/sys/fs/cgroup/{hierarchy[5:]}"
                procs = Path(mount + path, "cgroup.procs")
                if procs.exists():
                    pids = {int(p) for p in procs.read_text().split()}
                    out["neighbours"][hierarchy] = pids
            out["workload"] = {
                p
                for pids in out["neighbours"].values()
                for p in pids
                if p != worker and _same_mnt(p, mine)
            }

            # The writer: the FIFO as the host sees it through the worker's root. Opened
            # without blocking, retried until the worker has it open for reading (a
            # blocking open would hold this loop, which the read request may still need).
            fifo = f"/proc/{worker}/root/tmp/fifo"
            await _step("writing the FIFO", _write_when_read(fifo, b"through the fifo"), vm_init)
            out["data"] = await _step("reading back", reading, vm_init)
        finally:
            await _step("closing the vault", vault.close(), vm_init)
        return out

    out = run_async(body(), timeout=110)
    assert out["data"] == b"through the fifo"
    init_cgroups = _cgroups(vm_init.process.pid)
    # Every mounted hierarchy the worker was moved in (the unified "0::" line of a host
    # without a cgroup2 mount has no cgroup.procs to read).
    moved = {
        h
        for h, path in out["cgroups"].items()
        if path != init_cgroups.get(h) and h in out["neighbours"]
    }
    assert moved, (out["cgroups"], init_cgroups)
    assert all("fly-vault-" in out["cgroups"][h] for h in moved), out["cgroups"]
    for hierarchy in moved:
        assert out["worker"] in out["neighbours"][hierarchy]
    assert out["workload"], "no process of the workload shares the worker's cgroup"


async def _step(what: str, awaitable: Any, init: InitProcess, timeout: float = 25) -> Any:
    """``awaitable``, bounded: a step that hangs fails naming itself, with init's log and
    its children (one whole-suite run once hung here, at an unknown step)."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        children = {c: _cmdline(c) for c in _children(init.process.pid)}
        log = init.log.read_text(errors="replace")[-6000:] if init.log.exists() else ""
        raise AssertionError(
            f"{what}: hung for {timeout} s; init's children {children}\n{log}"
        ) from None


async def _write_when_read(path: str, data: bytes) -> None:
    while True:
        try:
            if not stat.S_ISFIFO(os.stat(path).st_mode):  # never write anything but the FIFO
                raise AssertionError(f"{path} is not the workload's FIFO")
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            await asyncio.sleep(0.02)  # polling a condition, bounded by _step
            continue
        try:
            os.write(fd, data)  # a FIFO takes this much at once
        finally:
            os.close(fd)
        return


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return "?"


def _same_mnt(pid: int, namespace: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") == namespace
    except OSError:
        return False


def test_tree_streams_through_the_namespace_worker(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    """tar_put into the workload as a user (owner from the workload's accounts), then
    tar_get of it back: both through the worker inside the mount namespace."""
    from flyvault.client import MemberDigest, Vault

    rootfs = make_rootfs(
        tmp_path / "a.tar.gz", "A", extra={"etc/passwd": PASSWD, "etc/group": GROUP}
    )
    configure(vm_init.port, issuer, rootfs=str(rootfs))
    source = tmp_path / "src"
    (source / "app/sub").mkdir(parents=True)
    payload = os.urandom(300_000)
    (source / "app/sub/blob.bin").write_bytes(payload)
    (source / "app/readme").write_text("hello vm\n")
    (source / "app/link").symlink_to("sub/blob.bin")

    async def body() -> dict[str, Any]:
        vault = Vault(vault_entry(vm_init.port, issuer, name="vm", rootfs=str(rootfs)))
        out: dict[str, Any] = {}
        try:
            user = vault.files(user="user")
            # The tree as the client side packs it: a real tar_get of a host path is not
            # possible in VM mode (host paths are out of reach), so pack it here.
            pieces = _pack(source, "app")

            async def replay() -> AsyncIterator[Any]:
                for piece in pieces:
                    yield piece

            out["put"] = await user.tar_put("/home/user", replay())
            out["stat"] = await user.stat("/home/user/app/sub/blob.bin")
            out["got"] = [p async for p in vault.files().tar_get(["/home/user/app"])]
        finally:
            await vault.close()
        return out

    out = run_async(body(), timeout=120)
    assert (out["put"].files, out["put"].symlinks) == (2, 1)
    info = out["stat"]
    assert (info.owner, info.size) == ("user", len(payload))
    seen = fv("exec", "vm", "--", "/bin/busybox", "sha256sum", "/home/user/app/sub/blob.bin")
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    data = b"".join(p for p in out["got"] if not isinstance(p, MemberDigest))
    digests = {p.name: p.sha256 for p in out["got"] if isinstance(p, MemberDigest)}
    assert digests["app/sub/blob.bin"] == hashlib.sha256(payload).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert members["app/link"].issym() and members["app/link"].linkname == "sub/blob.bin"
        assert members["app/sub/blob.bin"].uname == "user"
        blob = archive.extractfile("app/sub/blob.bin")
        assert blob is not None and blob.read() == payload


def _pack(root: Path, top: str) -> list[Any]:
    """A pax tar of ``root/top`` with a MemberDigest after each regular file's data (plain
    "w" mode writes each member through at once; "w|" would hold data back in its buffer)."""
    from flyvault.client import MemberDigest

    pieces: list[Any] = []
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted([root / top, *(root / top).rglob("*")]):
            name = path.relative_to(root).as_posix()
            member = archive.gettarinfo(str(path), name)
            if member.isfile():
                data = path.read_bytes()
                archive.addfile(member, io.BytesIO(data))
                pieces.append(buffer.getvalue())
                buffer.seek(0)
                buffer.truncate()
                digest = hashlib.sha256(data).hexdigest()
                pieces.append(MemberDigest(name, len(data), digest))
            else:
                archive.addfile(member)
    pieces.append(buffer.getvalue())
    return [p for p in pieces if not isinstance(p, bytes) or p]
