"""The streaming extractor: fidelity, streaming and backpressure, and every bad archive."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rootfs_fixtures import (
    BUSYBOX,
    MTIME,
    PING_CAPABILITY,
    Member,
    basic_rootfs,
    busybox_archive,
    directory,
    generated_tree_archive,
    hardlink,
    manifest,
    regular,
    symlink,
    tar_bytes,
    write_archive,
)

from flyvault.errors import ProvisionError
from flyvault.server.provision.extract import ExtractLimits, ExtractReport, StreamingExtractor
from flyvault.server.provision.members import TreeWriter

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (owners, device nodes, mounts)")
MiB = 1024 * 1024


async def _extract(
    dest: Path, data: bytes, chunk: int = 64 * 1024, finish: dict[str, Any] | None = None, **kw: Any
) -> ExtractReport:
    extractor = StreamingExtractor(dest, **kw)
    for offset in range(0, len(data), chunk):
        await extractor.feed(data[offset : offset + chunk])
    return await extractor.finish(**(finish or {}))


def extract(dest: Path, data: bytes, **kw: Any) -> ExtractReport:
    dest.mkdir(exist_ok=True)
    return asyncio.run(_extract(dest, data, **kw))


def refused(dest: Path, data: bytes, *words: str, **kw: Any) -> str:
    """Extract, expect a ProvisionError, check its message names ``words``; return it."""
    with pytest.raises(ProvisionError) as caught:
        extract(dest, data, **kw)
    message = str(caught.value)
    for word in words:
        assert word in message, message
    return message


# -- fidelity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gz", "none"])
def test_basic_rootfs_keeps_everything(tmp_path: Path, compression: str) -> None:
    archive = write_archive(tmp_path / "a.tar", basic_rootfs(devices=True), compression)
    dest = tmp_path / "dest"
    report = extract(dest, archive.read_bytes(), chunk=1000, allow_devices=True)
    assert report.compression == ("gzip" if compression == "gz" else "none")
    assert report.entries == len(basic_rootfs(devices=True))
    assert report.archive_bytes == archive.stat().st_size
    assert report.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()

    def mode(path: str) -> int:
        return stat.S_IMODE((dest / path).lstat().st_mode)

    assert mode("usr/bin/passwd") == 0o4755
    assert mode("usr/bin/wall") == 0o2755
    assert mode("tmp") == 0o1777
    assert mode("root") == 0o700
    assert mode("var/ro") == 0o555  # applied after its child was written
    assert (dest / "var/ro/inside").read_bytes().startswith(b"a file")
    assert os.readlink(dest / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert (dest / "bin/ash").stat().st_ino == (dest / "bin/sh").stat().st_ino
    assert stat.S_ISFIFO((dest / "run/initctl").lstat().st_mode)
    assert (dest / "sbin/init").stat().st_mtime == MTIME
    assert (dest / "var/ro").stat().st_mtime == MTIME
    assert os.getxattr(dest / "usr/share/note", "user.fly-vault") == b"kept"
    if ROOT:
        home = (dest / "home/user/notes.txt").stat()
        assert (home.st_uid, home.st_gid) == (1000, 1000)
        assert (dest / "home/user").stat().st_uid == 1000
        assert (dest / "usr/bin/wall").stat().st_gid == 5
        assert os.getxattr(dest / "usr/bin/ping", "security.capability") == PING_CAPABILITY
        null = (dest / "dev/null").lstat()
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert stat.S_IMODE(null.st_mode) == 0o666
        loop = (dest / "dev/loop0").lstat()
        assert stat.S_ISBLK(loop.st_mode) and loop.st_gid == 6
        assert report.skipped_devices == []
        assert report.created_devices == ["/dev/null", "/dev/loop0"]
        assert report.xattr_failures == 0


def test_devices_skipped_and_reported_without_privilege(tmp_path: Path) -> None:
    data = tar_bytes(basic_rootfs(devices=True))
    report = extract(tmp_path / "dest", data, can_make_devices=False, allow_devices=True)
    assert report.skipped_devices == ["dev/null", "dev/loop0"]
    assert report.created_devices == []
    assert not (tmp_path / "dest/dev/null").exists()
    assert stat.S_ISFIFO((tmp_path / "dest/run/initctl").lstat().st_mode)  # needs no privilege


@pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is not installed (/bin/busybox)")
@needs_root
def test_busybox_rootfs_runs(tmp_path: Path) -> None:
    archive = busybox_archive(tmp_path / "busybox.tar.gz")
    dest = tmp_path / "dest"
    extract(dest, archive.read_bytes())
    result = subprocess.run(
        ["chroot", str(dest), "/bin/sh", "-c", "echo hello from $(id -u); ls /home/user"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello from 0"
    assert os.readlink(dest / "sbin/init") == "../bin/busybox"


def test_multi_member_gzip_and_trailing_zeros(tmp_path: Path) -> None:
    data = tar_bytes(basic_rootfs())
    half = len(data) // 2
    archive = gzip.compress(data[:half]) + gzip.compress(data[half:]) + b"\0" * 1000
    report = extract(tmp_path / "dest", archive)
    assert report.entries == len(basic_rootfs())


def test_zstd(tmp_path: Path) -> None:
    pytest.importorskip("zstandard", reason="the optional zstandard module is not installed")
    if shutil.which("zstd") is None:
        pytest.skip("the zstd command is not installed")
    archive = write_archive(tmp_path / "a.tar.zst", basic_rootfs(blob_size=300_000), "zst")
    report = extract(tmp_path / "dest", archive.read_bytes())
    assert report.compression == "zstd"
    assert (tmp_path / "dest/usr/share/blob").stat().st_size == 300_000


def test_zstd_without_the_module_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails even if installed
    refused(tmp_path / "d", b"\x28\xb5\x2f\xfd" + b"\0" * 100, "zstd", "pip install zstandard")


def test_xz_names_the_fix(tmp_path: Path) -> None:
    refused(tmp_path / "d", b"\xfd7zXZ\x00" + b"\0" * 100, "xz", "recompress")


# -- streaming --------------------------------------------------------------------------------


def test_extraction_runs_while_the_upload_arrives(tmp_path: Path) -> None:
    members = [directory("./"), regular("first", b"x" * 100_000)]
    members += [regular(f"later{index}", os.urandom(50_000)) for index in range(40)]
    data = tar_bytes(members)
    dest = tmp_path / "dest"
    dest.mkdir()

    async def run() -> None:
        extractor = StreamingExtractor(dest)
        await extractor.feed(data[: len(data) // 2])
        deadline = time.monotonic() + 10
        while extractor.bytes_extracted == 0:  # before the end of the archive was sent
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert (dest / "first").exists()
        assert extractor.bytes_received == len(data) // 2
        await extractor.feed(data[len(data) // 2 :])
        await extractor.finish(len(data), hashlib.sha256(data).digest())

    asyncio.run(run())
    assert (dest / "later39").stat().st_size == 50_000


def test_backpressure_bounds_what_is_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tar_bytes([regular(f"f{index}", os.urandom(MiB)) for index in range(12)])
    dest = tmp_path / "dest"
    dest.mkdir()
    queue = 512 * 1024
    # A disk that cannot keep up: the worker blocks on its first file until released.
    release = threading.Event()
    write_file = TreeWriter._write_file

    def stalled(self: TreeWriter, *args: Any) -> None:
        release.wait(30)
        write_file(self, *args)

    monkeypatch.setattr(TreeWriter, "_write_file", stalled)

    async def run() -> None:
        extractor = StreamingExtractor(dest, queue_bytes=queue)

        async def upload() -> None:
            for offset in range(0, len(data), 64 * 1024):
                await extractor.feed(data[offset : offset + 64 * 1024])

        task = asyncio.create_task(upload())
        # Once the pipe is full (however long a loaded machine takes to get there)...
        deadline = time.monotonic() + 30
        while extractor.bytes_received < queue:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # ...it stays so: time for a missing bound to show
        assert not task.done()  # the upload waits for the disk
        # The pipe holds at most `queue`; the worker has taken at most its read buffers.
        assert extractor._pipe.buffered <= queue
        assert extractor.bytes_received <= queue + 2 * MiB
        release.set()
        await task
        await extractor.finish(len(data))

    asyncio.run(run())
    assert len(os.listdir(dest)) == 12


def test_failure_reaches_the_uploader_early(tmp_path: Path) -> None:
    data = tar_bytes(
        [regular("../evil", b"x")] + [regular(f"f{i}", os.urandom(MiB)) for i in range(20)]
    )
    dest = tmp_path / "dest"
    dest.mkdir()

    async def run() -> int:
        extractor = StreamingExtractor(dest, queue_bytes=256 * 1024)
        with pytest.raises(ProvisionError, match=r"\.\./evil"):
            for offset in range(0, len(data), 64 * 1024):
                await extractor.feed(data[offset : offset + 64 * 1024])
        return extractor.bytes_received

    received = asyncio.run(run())
    assert received < len(data) // 2
    assert not (tmp_path / "evil").exists()


def test_abort_stops_the_worker(tmp_path: Path) -> None:
    data = tar_bytes([regular(f"f{index}", os.urandom(MiB)) for index in range(8)])
    dest = tmp_path / "dest"
    dest.mkdir()

    async def run() -> None:
        extractor = StreamingExtractor(dest)
        await extractor.feed(data[: 3 * MiB])
        await extractor.abort()
        assert extractor._thread is not None and not extractor._thread.is_alive()
        with pytest.raises(ProvisionError):
            await extractor.feed(b"more")
        before = sorted(os.listdir(dest))
        await asyncio.sleep(0.1)
        assert sorted(os.listdir(dest)) == before  # nothing more is written after abort

    asyncio.run(run())


def test_size_and_sha256_are_verified(tmp_path: Path) -> None:
    data = gzip.compress(tar_bytes(basic_rootfs()))
    digest = hashlib.sha256(data).digest()
    extract(tmp_path / "ok", data, finish={"expected_size": len(data), "sha256": digest})
    refused(tmp_path / "size", data, "announced", finish={"expected_size": len(data) + 1})
    refused(tmp_path / "sha", data, "SHA-256", finish={"sha256": hashlib.sha256(b"x").digest()})


# -- malicious archives: each refused with the entry named, nothing written outside ---------


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "victim").write_text("original")
    return outside


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../evil", ["'../evil'", "'..'"]),
        ("a/../../evil", ["a/../../evil", "'..'"]),
        ("/etc/evil", ["'/etc/evil'", "absolute"]),
    ],
)
def test_traversal_and_absolute_names(tmp_path: Path, name: str, words: list[str]) -> None:
    data = tar_bytes([directory("a"), regular(name, b"pwned")])
    refused(tmp_path / "dest", data, *words, "rebuild" if "absolute" not in words else "relative")
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("target", ["/", "ABS_OUTSIDE", "../..", "../outside"])
def test_symlink_escape(tmp_path: Path, target: str) -> None:
    outside = _outside(tmp_path)
    target = str(outside) if target == "ABS_OUTSIDE" else target
    escape = f"link/{outside.relative_to('/')}/victim" if target == "/" else "link/victim"
    data = tar_bytes([symlink("link", target), regular(escape, b"pwned")])
    refused(tmp_path / "dest", data, repr(escape), "'link'", "symlink")
    assert (outside / "victim").read_text() == "original"


def test_symlink_then_file_of_the_same_name_stays_inside(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    data = tar_bytes([symlink("victim", str(outside / "victim")), regular("victim", b"pwned")])
    extract(tmp_path / "dest", data)
    assert (outside / "victim").read_text() == "original"
    assert (tmp_path / "dest/victim").read_bytes() == b"pwned"
    assert not (tmp_path / "dest/victim").is_symlink()


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([hardlink("h", "../outside/victim")], ["'h'", "'..'"]),
        ([hardlink("h", "ABS_VICTIM")], ["'h'", "absolute"]),
        ([hardlink("h", "later"), regular("later", b"x")], ["'h'", "not (yet) extracted"]),
        ([symlink("link", "ABS_OUTSIDE"), hardlink("h", "link/victim")], ["'h'", "symlink"]),
        ([directory("d"), hardlink("h", "d")], ["'h'", "directory"]),
    ],
)
def test_hardlink_escape(tmp_path: Path, members: list[Member], words: list[str]) -> None:
    outside = _outside(tmp_path)
    for member in members:
        member.linkname = member.linkname.replace("ABS_VICTIM", str(outside / "victim"))
        member.linkname = member.linkname.replace("ABS_OUTSIDE", str(outside))
    refused(tmp_path / "dest", tar_bytes(members), *words)
    assert (outside / "victim").read_text() == "original"
    assert os.stat(outside / "victim").st_nlink == 1


def test_directory_not_replaced_by_a_file(tmp_path: Path) -> None:
    data = tar_bytes([directory("d"), regular("d/keep", b"x"), regular("d", b"file")])
    refused(tmp_path / "dest", data, "'d'", "replace a directory")


# -- device nodes -----------------------------------------------------------------------------


def _node(name: str, kind: bytes = tarfile.CHRTYPE, major: int = 1, minor: int = 3) -> Member:
    return Member(name, kind, mode=0o666, major=major, minor=minor)


def test_device_nodes_refused_by_default_naming_the_member(tmp_path: Path) -> None:
    message = refused(
        tmp_path / "chr",
        tar_bytes(basic_rootfs(devices=True)),
        "'dev/null'",
        "character device node (1, 3)",
        "refused by default",
        "--allow-devices",
        "--exclude='./dev/*'",
    )
    assert "loop0" not in message  # the first one stops the extraction
    assert not (tmp_path / "chr/dev/null").exists()
    block = tar_bytes([directory("dev"), _node("dev/sda", tarfile.BLKTYPE, 8, 0)])
    refused(tmp_path / "blk", block, "'dev/sda'", "block device node (8, 0)", "refused by default")
    # FIFOs are harmless: kept by default, anywhere.
    report = extract(tmp_path / "fifo", tar_bytes([Member("home/pipe", tarfile.FIFOTYPE)]))
    assert stat.S_ISFIFO((tmp_path / "fifo/home/pipe").lstat().st_mode)
    assert report.created_devices == report.skipped_devices == []


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([_node("null")], ["'null'", "outside /dev"]),
        ([directory("home"), _node("home/disk", tarfile.BLKTYPE, 8, 0)], ["'home/disk'"]),
        ([_node("dev")], ["'dev'", "outside /dev"]),  # /dev itself is not under /dev
        ([_node("./etc/../dev/x")], ["'..'"]),
        (
            [
                directory("dev"),
                _node("dev/null"),
                directory("root"),
                hardlink("root/n", "dev/null"),
            ],
            ["'root/n'", "hardlink to the device node 'dev/null' outside /dev"],
        ),
    ],
)
def test_devices_outside_dev_refused_even_when_allowed(
    tmp_path: Path, members: list[Member], words: list[str]
) -> None:
    refused(tmp_path / "dest", tar_bytes(members), *words, allow_devices=True)


@needs_root
def test_allowed_devices_are_created_under_dev_only(tmp_path: Path) -> None:
    members = [
        directory("./"),
        directory("dev"),
        _node("./dev/null"),
        directory("dev/net"),
        _node("dev/net/tun", major=10, minor=200),
        _node("dev/loop0", tarfile.BLKTYPE, 7, 0),
        hardlink("dev/null2", "dev/null"),  # a second name inside /dev is fine
        Member("run/fifo", tarfile.FIFOTYPE),
    ]
    dest = tmp_path / "dest"
    report = extract(dest, tar_bytes(members), allow_devices=True)
    assert report.created_devices == ["/dev/null", "/dev/net/tun", "/dev/loop0"]
    assert report.skipped_devices == []
    tun = (dest / "dev/net/tun").lstat()
    assert stat.S_ISCHR(tun.st_mode) and tun.st_rdev == os.makedev(10, 200)
    assert stat.S_IMODE(tun.st_mode) == 0o666
    assert stat.S_ISBLK((dest / "dev/loop0").lstat().st_mode)
    assert (dest / "dev/null2").lstat().st_ino == (dest / "dev/null").lstat().st_ino
    assert stat.S_ISFIFO((dest / "run/fifo").lstat().st_mode)


# -- bombs ------------------------------------------------------------------------------------


def test_gzip_bomb(tmp_path: Path) -> None:
    # 256 MiB of zeros gzip to ~250 KiB; the limit is 8 MiB.
    bomb = tar_bytes([Member("zeros", data=b"\0" * (256 * MiB))])
    data = gzip.compress(bomb, compresslevel=9)
    del bomb
    assert len(data) < MiB
    limits = ExtractLimits(max_total_bytes=8 * MiB)
    refused(tmp_path / "dest", data, "more than 8.0 MiB", "'zeros'", "bomb", limits=limits)
    assert (tmp_path / "dest/zeros").stat().st_size <= 8 * MiB


def test_expansion_ratio_guard(tmp_path: Path) -> None:
    data = gzip.compress(tar_bytes([Member("zeros", data=b"\0" * (32 * MiB))]))
    refused(
        tmp_path / "dest",
        data,
        "expands more than 50x",
        limits=ExtractLimits(max_expansion_ratio=50, expansion_floor_bytes=MiB),
    )


def test_expansion_ceiling_is_on_by_default_past_its_floor(tmp_path: Path) -> None:
    limits = ExtractLimits()
    assert limits.max_expansion_ratio == 100 and limits.expansion_floor_bytes == 64 * MiB
    # Under the floor, even 1000x is fine: small archives are mostly headers and padding.
    small = gzip.compress(tar_bytes([Member("zeros", data=bytes(16 * MiB))]))
    assert len(small) * 500 < 16 * MiB
    assert extract(tmp_path / "small", small).unpacked_bytes > 16 * MiB
    # Past it, a bomb is refused with both sizes named, by default.
    bomb = gzip.compress(tar_bytes([Member("zeros", data=bytes(80 * MiB))]))
    message = refused(
        tmp_path / "bomb",
        bomb,
        "expands more than 100x",
        "received (at entry 'zeros')",
        "decompression bomb",
        "--max-expansion-ratio",
    )
    assert re.search(r"100x: 64\.\d MiB unpacked so far from \d+ bytes received", message), message
    # Lifted (what --max-expansion-ratio 0 asks for), the same archive unpacks.
    lifted = extract(tmp_path / "lifted", bomb, limits=ExtractLimits(max_expansion_ratio=None))
    assert (tmp_path / "lifted/zeros").stat().st_size == 80 * MiB
    assert lifted.unpacked_bytes > 80 * MiB


def test_entry_count_size_and_path_limits(tmp_path: Path) -> None:
    many = tar_bytes([regular(f"f{index}") for index in range(20)])
    refused(tmp_path / "a", many, "'f10'", "10 entries", limits=ExtractLimits(max_entries=10))
    big = tar_bytes([regular("big", b"x" * 5000)])
    refused(
        tmp_path / "b", big, "'big'", "per-entry limit", limits=ExtractLimits(max_entry_bytes=4096)
    )
    deep = "d/" * 40 + "f"
    refused(
        tmp_path / "c",
        tar_bytes([regular(deep)]),
        "81 characters",
        limits=ExtractLimits(max_path_length=80),
    )


def test_truncated_archives(tmp_path: Path) -> None:
    data = tar_bytes(basic_rootfs(blob_size=200_000))
    compressed = gzip.compress(data)
    refused(tmp_path / "gz", compressed[: len(compressed) // 2], "truncated")
    refused(tmp_path / "mid", data[: len(data) // 2], "truncated")
    refused(
        tmp_path / "boundary",
        tar_bytes(basic_rootfs(devices=True), end=False),
        "truncated",
        "'dev/loop0'",
        allow_devices=True,
    )


def test_not_an_archive_empty_and_corrupt(tmp_path: Path) -> None:
    refused(tmp_path / "text", b"hello, this is not a tar file\n" * 100, "not a tar archive")
    refused(tmp_path / "random", os.urandom(10_000), "not a tar archive")
    refused(
        tmp_path / "gztext", gzip.compress(b"just text\n" * 100), "gzip data does not contain a tar"
    )
    refused(tmp_path / "empty", b"", "empty (0 bytes")
    refused(tmp_path / "zeros", b"\0" * 10240, "no entries")
    refused(tmp_path / "gzempty", gzip.compress(b""), "decompresses to nothing")
    data = bytearray(tar_bytes([regular("one", b"1"), regular("two", b"2")]))
    second = data.index(b"two")  # the second member's header: break its checksum
    data[second + 10] ^= 0xFF
    refused(tmp_path / "corrupt", bytes(data), "corrupt", "'one'")
    bad = bytearray(gzip.compress(tar_bytes(basic_rootfs())))
    bad[len(bad) // 2] ^= 0xFF
    refused(tmp_path / "badgz", bytes(bad), "gzip")


# -- throughput (printed, not asserted) --------------------------------------------------------


def test_throughput_against_tar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = generated_tree_archive(tmp_path / "big.tar.gz", 50 * MiB)
    data_size = archive.stat().st_size

    def ours(dest: Path) -> float:
        async def run() -> None:
            extractor = StreamingExtractor(dest)
            with archive.open("rb") as source:
                while chunk := source.read(256 * 1024):
                    await extractor.feed(chunk)
            await extractor.finish()

        dest.mkdir()
        os.sync()
        started = time.perf_counter()
        asyncio.run(run())
        return time.perf_counter() - started

    def gnu_tar(dest: Path) -> float:
        dest.mkdir()
        os.sync()
        started = time.perf_counter()
        subprocess.run(["tar", "-xzf", str(archive), "-C", str(dest)], check=True)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"ours": [], "tar": []}
    for run_index in range(2):  # interleaved against drift
        for name, function in (("ours", ours), ("tar", gnu_tar)):
            times[name].append(function(tmp_path / f"{name}{run_index}"))
        if run_index == 0:  # same tree as GNU tar's, owners, modes and mtimes included
            assert manifest(tmp_path / "ours0") == manifest(tmp_path / "tar0")
        for name in times:
            shutil.rmtree(tmp_path / f"{name}{run_index}")
    best_ours, best_tar = min(times["ours"]), min(times["tar"])
    with capsys.disabled():
        print(
            f"\n[provision throughput] {data_size / MiB:.1f} MiB tar.gz: ours {best_ours:.2f}s "
            f"({data_size / MiB / best_ours:.1f} MiB/s), tar xzf {best_tar:.2f}s, "
            f"ratio {best_ours / best_tar:.2f}x (runs: {times})"
        )


def test_the_gil_switch_interval_is_lowered_while_extracting_and_restored(tmp_path: Path) -> None:
    """The convoy fix is process-wide: on while an extraction runs, restored after it,
    whether it succeeds or is refused."""
    from flyvault.server.provision.extract import SWITCH_INTERVAL

    before = sys.getswitchinterval()
    assert before != SWITCH_INTERVAL
    good = gzip.compress(tar_bytes([regular("a", b"x" * 100)]))
    seen: list[float] = []

    async def run(dest: Path, data: bytes) -> None:
        dest.mkdir()
        extractor = StreamingExtractor(dest)
        await extractor.feed(data[:10])
        seen.append(sys.getswitchinterval())
        await extractor.feed(data[10:])
        await extractor.finish()

    asyncio.run(run(tmp_path / "ok", good))
    assert seen == [SWITCH_INTERVAL]
    assert sys.getswitchinterval() == before
    with pytest.raises(ProvisionError):
        asyncio.run(run(tmp_path / "bad", b"\x1f\x8b" + b"not gzip at all" * 100))
    assert seen == [SWITCH_INTERVAL, SWITCH_INTERVAL]
    assert sys.getswitchinterval() == before
