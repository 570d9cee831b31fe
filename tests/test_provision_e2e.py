"""Provisioning end to end: the CLI, a real init process in VM mode, real namespaces.

A busybox rootfs (Debian's busybox-static, installed by ./run test) is uploaded to a cold
vault, commands run inside its PID and mount namespaces, a reprovision swaps the rootfs
while /root and /home survive, and bad archives or URLs change nothing.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, start_init, vault_entry

from flyvault.standins import OidcIssuer

BUSYBOX = Path("/bin/busybox")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and pivot_root need root"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox (busybox-static)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]

APPLETS = ("sh", "ls", "cat", "echo", "id", "sleep", "ps", "mount", "stat", "tty")


def make_rootfs(
    path: Path,
    version: str,
    *,
    extra: dict[str, bytes] | None = None,
    nodes: dict[str, tuple[int, int, int]] | None = None,
) -> Path:
    """A small bootable rootfs: busybox and its applets, no /sbin/init (minimal init).

    ``nodes``: real device nodes made in the tree, ``name -> (S_IFCHR|S_IFBLK, major, minor)``.
    """
    tree = path.with_suffix(".tree")
    for sub in ("bin", "etc", "root", "home/user", "tmp", "proc", "dev"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, tree / "bin/busybox")
    for applet in APPLETS:
        link = tree / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    (tree / "etc/version").write_text(version + "\n")
    (tree / "root/.profile").write_text("export PS1='vault# '\n")
    os.chmod(tree / "tmp", 0o1777)
    os.chown(tree / "home/user", 1000, 1000)
    for name, data in (extra or {}).items():
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    for name, (kind, major, minor) in (nodes or {}).items():
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.mknod(target, kind | 0o600, os.makedev(major, minor))
    with tarfile.open(path, "w:gz") as archive:
        archive.add(tree, arcname=".")
    return path


def evil_archive(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("../../escape.txt")
        data = b"gotcha"
        info.size = len(data)
        import io

        archive.addfile(info, io.BytesIO(data))
    return path


CLI = (sys.executable, "-m", "flyvault.cli.main")


def fv(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def configure(port: int, issuer: OidcIssuer, **rootfs: Any) -> None:
    from flyvault.config import save_vault

    save_vault(vault_entry(port, issuer, name="vm", **rootfs))


def test_cold_provision_exec_in_namespace_reprovision_keeps_homes(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    first = make_rootfs(tmp_path / "a.tar.gz", "A")
    configure(vm_init.port, issuer, rootfs=str(first))

    doctor = fv("doctor", "vm")
    assert doctor.returncode == 0, doctor.stdout
    assert b"the vault is cold" in doctor.stdout

    # The first exec provisions the cold vault, then runs inside the workload.
    result = fv("exec", "vm", "--", "sh", "-c", "echo pid=$$; cat /etc/version; ls -d /proc/1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().split()
    assert int(lines[0].removeprefix("pid=")) < 100  # inside a new PID namespace
    assert lines[1] == "A"
    assert (vm_init.data_dir / ".provisioned").exists()

    # The host's files are not visible inside; /dev/null and /tmp work.
    (Path("/tmp") / "fly-vault-host-marker").write_text("host")
    check = fv(
        "exec",
        "vm",
        "--",
        "sh",
        "-c",
        "test ! -e /tmp/fly-vault-host-marker && echo x > /dev/null && stat -c %a /tmp",
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == b"1777"

    write = fv(
        "exec", "vm", "--", "sh", "-c", "echo kept > /root/keep.txt; echo mine > /home/user/f"
    )
    assert write.returncode == 0, write.stderr
    assert (vm_init.data_dir / "persist/root/keep.txt").read_text() == "kept\n"

    # Reprovision with another image: new rootfs, same /root and /home.
    second = make_rootfs(tmp_path / "b.tar.gz", "B")
    configure(vm_init.port, issuer, rootfs=str(second))
    swap = fv("reprovision", "vm", "--yes")
    assert swap.returncode == 0, swap.stderr
    assert b"reprovisioned in" in swap.stdout and b"/root and /home kept" in swap.stdout
    after = fv("exec", "vm", "--", "sh", "-c", "cat /etc/version /root/keep.txt /home/user/f")
    assert after.stdout.split() == [b"B", b"kept", b"mine"]
    # The log says where the time went, phase by phase, once the settle window (which
    # the client no longer waits for) has ended.
    deadline = time.monotonic() + 30
    logged: list[str] = []
    while len(logged) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        logged = [ln for ln in vm_init.log.read_text().splitlines() if "provisioned for" in ln]
    assert re.search(
        r"provisioned for \S+ in [\d.]+ s \(receive_extract [\d.]+ s, stop_old [\d.]+ s, "
        r"sync [\d.]+ s, swap [\d.]+ s, marker [\d.]+ s, start [\d.]+ s, settle [\d.]+ s, "
        r"cleanup [\d.]+ s\)",
        logged[-1],
    ), logged
    # The previous rootfs, set aside at activation, is deleted after the answer.
    deadline = time.monotonic() + 30
    while (vm_init.data_dir / "rootfs.discard").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # workload.json describes the running workload (for the clean-up after a crash).
    assert sorted(os.listdir(vm_init.data_dir)) == [
        ".provisioned", "persist", "rootfs", "workload.json",
    ]  # fmt: skip

    # A malicious archive is refused; the active rootfs and homes are untouched.
    configure(vm_init.port, issuer, rootfs=str(evil_archive(tmp_path / "evil.tar.gz")))
    refused = fv("reprovision", "vm", "--yes")
    assert refused.returncode == 8
    assert b"setup failed" in refused.stderr and b".." in refused.stderr
    configure(vm_init.port, issuer, rootfs=str(second))
    still = fv("exec", "vm", "--", "sh", "-c", "cat /etc/version /root/keep.txt")
    assert still.stdout.split() == [b"B", b"kept"]
    assert not (tmp_path / "escape.txt").exists()


@pytest.fixture
def web_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_provision_from_url_and_url_errors(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer, web_root: tuple[str, Path]
) -> None:
    base, root = web_root
    make_rootfs(root / "image.tar.gz", "URL")
    configure(vm_init.port, issuer, rootfs_url=f"{base}/missing.tar.gz")
    missing = fv("exec", "vm", "--", "true")
    assert missing.returncode == 255
    assert b"HTTP 404" in missing.stderr
    assert not (vm_init.data_dir / ".provisioned").exists()  # still cold

    configure(vm_init.port, issuer, rootfs_url=f"{base}/image.tar.gz")
    result = fv("exec", "vm", "--", "cat", "/etc/version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"URL\n"


def test_cold_vault_without_rootfs_and_both_sources(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    configure(vm_init.port, issuer)
    none = fv("exec", "vm", "--", "true")
    assert none.returncode == 255
    assert b"either rootfs path or rootfs_url is required for cold boot" in none.stderr
    image = make_rootfs(tmp_path / "a.tar.gz", "A")
    configure(vm_init.port, issuer, rootfs=str(image), rootfs_url="https://example.invalid/x.tgz")
    both = fv("exec", "vm", "--", "true")
    assert both.returncode == 255
    assert b"both rootfs and rootfs_url are set" in both.stderr
    assert not (vm_init.data_dir / ".provisioned").exists()


def test_init_recovers_and_restarts_workload_after_restart(
    tmp_path: Path, fly_api: Any, issuer: OidcIssuer
) -> None:
    init = start_init(tmp_path, fly_api.path, host_mode=False)
    try:
        configure(init.port, issuer, rootfs=str(make_rootfs(tmp_path / "a.tar.gz", "A")))
        assert fv("exec", "vm", "--", "sh", "-c", "echo v > /root/v").returncode == 0
    finally:
        init.stop()
    # A new init on the same volume: Ready at once, the workload started at boot.
    again = start_init(tmp_path, fly_api.path, host_mode=False)
    try:
        configure(again.port, issuer)  # no rootfs needed: the vault is Ready
        result = fv("exec", "vm", "--", "cat", "/etc/version", "/root/v")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [b"A", b"v"]
    finally:
        again.stop()


def _processes_running(needle: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            # The workload's own process: its argv starts with the needle (the CLI that
            # asked for it carries the same words further along its own argv).
            if cmdline.startswith(needle) and state != "Z":
                found.append(int(entry.name))
    return found


def test_sigterm_to_init_stops_the_workload(
    tmp_path: Path, fly_api: Any, issuer: OidcIssuer
) -> None:
    import signal
    import time

    init = start_init(tmp_path, fly_api.path, host_mode=False)
    client: subprocess.Popen[bytes] | None = None
    try:
        configure(init.port, issuer, rootfs=str(make_rootfs(tmp_path / "a.tar.gz", "A")))
        client = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flyvault.cli.main",
                "exec",
                "vm",
                "--session",
                "long",
                "--",
                "sleep",
                "4242",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not _processes_running(b"sleep\x004242") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_running(b"sleep\x004242"), "the workload command never started"
        init.process.send_signal(signal.SIGTERM)
        assert init.process.wait(timeout=30) == 0
        deadline = time.monotonic() + 15
        while _processes_running(b"sleep\x004242") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _processes_running(b"sleep\x004242")
        client.wait(timeout=60)
    finally:
        init.stop()
        if client is not None and client.poll() is None:
            client.kill()


@pytest.fixture
def stalling_url() -> Iterator[str]:
    """An HTTP server that sends headers and a little data, then nothing."""
    import socket
    import time as time_module

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        held = []
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n" + b"\x1f\x8b")
            held.append(conn)
        for conn in held:
            conn.close()
        time_module.sleep(0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/image.tar.gz"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_url_that_stalls_or_is_too_big_is_refused(
    tmp_path: Path,
    fly_api: Any,
    issuer: OidcIssuer,
    stalling_url: str,
    web_root: tuple[str, Path],
) -> None:
    init = start_init(
        tmp_path,
        fly_api.path,
        host_mode=False,
        extra_args=("--url-timeout", "2", "--url-max-bytes", "100000"),
    )
    try:
        configure(init.port, issuer, rootfs_url=stalling_url)
        stalled = fv("exec", "vm", "--", "true")
        assert stalled.returncode == 255
        assert b"timed out (no data for 2 s)" in stalled.stderr
        base, root = web_root
        make_rootfs(root / "big.tar.gz", "BIG", extra={"blob": os.urandom(300_000)})
        configure(init.port, issuer, rootfs_url=f"{base}/big.tar.gz")
        big = fv("exec", "vm", "--", "true")
        assert big.returncode == 255
        assert b"larger than the vault's limit of 100000 bytes" in big.stderr
        assert not (init.data_dir / ".provisioned").exists()
        assert not (init.data_dir / "rootfs.staging").exists()
    finally:
        init.stop()


def test_sigkill_of_init_during_reprovision_keeps_the_old_rootfs(
    tmp_path: Path, fly_api: Any, issuer: OidcIssuer
) -> None:
    """The real init, killed with SIGKILL while a large image is arriving: a new init on the
    same volume recovers and runs the old rootfs, with /root intact."""
    import time

    init = start_init(tmp_path, fly_api.path, host_mode=False)
    try:
        configure(init.port, issuer, rootfs=str(make_rootfs(tmp_path / "a.tar.gz", "A")))
        assert fv("exec", "vm", "--", "sh", "-c", "echo v > /root/v").returncode == 0
        big = make_rootfs(tmp_path / "b.tar.gz", "B", extra={"blob": os.urandom(40_000_000)})
        configure(init.port, issuer, rootfs=str(big))
        swap = subprocess.Popen(
            [sys.executable, "-m", "flyvault.cli.main", "reprovision", "vm", "--yes"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        staging = init.data_dir / "rootfs.staging"

        def staged_bytes() -> int:
            try:
                return sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
            except OSError:  # not there yet, or a file went while we looked
                return 0

        # Mid-upload: part of the 40 MB image is on disk and the swap is still to come. A
        # condition, not a fixed sleep (too short on a loaded machine, too long on a fast one).
        deadline = time.monotonic() + 60
        while staged_bytes() < 1_000_000:
            assert time.monotonic() < deadline, "the upload did not get going"
            assert swap.poll() is None, "reprovision ended before the kill"
            time.sleep(0.02)
        init.process.kill()
        init.process.wait(timeout=10)
        swap.wait(timeout=90)
        assert swap.returncode != 0
    finally:
        init.stop()
    again = start_init(tmp_path, fly_api.path, host_mode=False)
    try:
        configure(again.port, issuer)
        result = fv("exec", "vm", "--", "cat", "/etc/version", "/root/v")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [b"A", b"v"]
        assert not (again.data_dir / "rootfs.staging").exists()
    finally:
        again.stop()


# -- device nodes, decompression bombs and a full volume, over real QUIC ---------------------

NULL = (stat.S_IFCHR, 1, 3)
LOOP = (stat.S_IFBLK, 7, 0)


def _running_version() -> bytes:
    result = fv("exec", "vm", "--", "cat", "/etc/version")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _no_leftovers(data_dir: Path) -> None:
    deadline = time.monotonic() + 30  # the previous rootfs is deleted in the background
    while (data_dir / "rootfs.discard").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(os.listdir(data_dir)) == [".provisioned", "persist", "rootfs", "workload.json"]


def test_device_nodes_refused_by_default_allowed_under_dev_only(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    with_devices = make_rootfs(
        tmp_path / "a.tar.gz", "A", nodes={"dev/null": NULL, "dev/loop0": LOOP}
    )
    # Cold boot: refused by default, with the member named; the vault stays cold.
    configure(vm_init.port, issuer, rootfs=str(with_devices))
    cold = fv("exec", "vm", "--", "true")
    assert cold.returncode == 255
    assert b"'./dev/loop0' is a block device node (7, 0)" in cold.stderr, cold.stderr
    assert b"device nodes are refused by default" in cold.stderr
    assert not (vm_init.data_dir / ".provisioned").exists()
    assert not (vm_init.data_dir / "rootfs.staging").exists()

    # The config key allows them: created under /dev, and the client says which.
    configure(vm_init.port, issuer, rootfs=str(with_devices), rootfs_allow_devices=True)
    first = fv("exec", "vm", "--", "cat", "/etc/version")
    assert first.returncode == 0, first.stderr
    assert first.stdout == b"A\n"
    assert b"created 2 device nodes under /dev: /dev/loop0, /dev/null" in first.stderr
    null = (vm_init.data_dir / "rootfs/dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK((vm_init.data_dir / "rootfs/dev/loop0").lstat().st_mode)

    # A reprovision without the flag is refused; the old rootfs keeps running.
    second = make_rootfs(tmp_path / "b.tar.gz", "B", nodes={"dev/null": NULL})
    configure(vm_init.port, issuer, rootfs=str(second))
    refused = fv("reprovision", "vm", "--yes")
    assert refused.returncode == 8
    assert b"'./dev/null' is a character device node (1, 3)" in refused.stderr, refused.stderr
    assert _running_version() == b"A"
    _no_leftovers(vm_init.data_dir)

    # --allow-devices on the command line: the result names what was created.
    allowed = fv("reprovision", "vm", "--yes", "--allow-devices")
    assert allowed.returncode == 0, allowed.stderr
    assert b"created 1 device node under /dev: /dev/null" in allowed.stdout, allowed.stdout
    assert b"reprovisioned in" in allowed.stdout
    assert _running_version() == b"B"

    # Outside /dev a device node is refused even with the flag; B keeps running.
    outside = make_rootfs(
        tmp_path / "c.tar.gz", "C", nodes={"dev/null": NULL, "home/user/disk": LOOP}
    )
    configure(vm_init.port, issuer, rootfs=str(outside))
    escaped = fv("reprovision", "vm", "--yes", "--allow-devices")
    assert escaped.returncode == 8
    assert b"'./home/user/disk' is a block device node (7, 0) outside /dev" in escaped.stderr
    assert _running_version() == b"B"
    _no_leftovers(vm_init.data_dir)
    assert not (vm_init.data_dir / "persist/home/user/disk").exists()


def test_gzip_bomb_refused_with_sizes_and_the_old_rootfs_runs_on(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    configure(vm_init.port, issuer, rootfs=str(make_rootfs(tmp_path / "a.tar.gz", "A")))
    assert _running_version() == b"A"
    assert fv("exec", "vm", "--", "sh", "-c", "echo mine > /root/keep").returncode == 0
    # 80 MiB of zeros after busybox: about 60x overall at the 64 MiB floor, under the
    # default 100x ceiling; the option lowers it to 20x, so this small image is a bomb.
    bomb = make_rootfs(tmp_path / "bomb.tar.gz", "BOMB", extra={"zeros": bytes(80 * 1024**2)})
    assert bomb.stat().st_size < 4 * 1024**2
    configure(vm_init.port, issuer, rootfs=str(bomb))
    refused = fv("reprovision", "vm", "--yes", "--max-expansion-ratio", "20")
    assert refused.returncode == 8
    message = refused.stderr.decode()
    assert re.search(
        r"the archive expands more than 20x: 64\.\d MiB unpacked so far from [\d.]+ "
        r"(MiB|bytes) received \(at entry '\./zeros'\); refused as a possible decompression "
        r"bomb",
        message,
    ), message
    assert "--max-expansion-ratio" in message
    assert _running_version() == b"A"
    keep = fv("exec", "vm", "--", "cat", "/root/keep")
    assert keep.stdout == b"mine\n"
    _no_leftovers(vm_init.data_dir)


@pytest.fixture
def small_volume_init(tmp_path: Path, fly_api: Any) -> Iterator[InitProcess]:
    """A vm-mode init whose data dir is an 80 MiB tmpfs (a small Fly volume)."""
    volume = tmp_path / "init-data"
    volume.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(volume)], check=True)
    try:
        init = start_init(tmp_path, fly_api.path, host_mode=False)
        try:
            yield init
        finally:
            init.stop()
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)


def test_full_volume_refused_with_sizes_and_the_old_rootfs_runs_on(
    tmp_path: Path, small_volume_init: InitProcess, issuer: OidcIssuer
) -> None:
    init = small_volume_init
    configure(init.port, issuer, rootfs=str(make_rootfs(tmp_path / "a.tar.gz", "A")))
    assert _running_version() == b"A"
    # 24 MiB that do not compress: past the volume's free space minus the 64 MiB reserve.
    big = make_rootfs(tmp_path / "big.tar.gz", "BIG", extra={"usr/blob": os.urandom(24 * 1024**2)})
    configure(init.port, issuer, rootfs=str(big))
    refused = fv("reprovision", "vm", "--yes")
    assert refused.returncode == 8
    message = refused.stderr.decode()
    assert re.search(
        r"the volume is full: \d+ MiB free on \S+ with [\d.]+ (MiB|bytes) of the new rootfs "
        r"unpacked so far; entry '\./usr/blob' needs 24\.0 MiB more and 64 MiB are kept in "
        r"reserve",
        message,
    ), message
    assert _running_version() == b"A"
    _no_leftovers(init.data_dir)


# -- sessions across a reprovision; host mode ------------------------------------------------


def test_reprovision_ends_sessions_with_the_reason_and_starts_them_as_a_login(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    passwd = b"root:x:0:0:root:/root:/bin/sh\n"
    configure(
        vm_init.port,
        issuer,
        rootfs=str(make_rootfs(tmp_path / "a.tar.gz", "A", extra={"etc/passwd": passwd})),
    )
    login = fv("exec", "vm", "--", "sh", "-c", 'pwd; echo "$HOME $USER $LOGNAME $SHELL"')
    assert login.returncode == 0, login.stderr
    assert login.stdout.decode().splitlines() == ["/root", "/root root root /bin/sh"]
    elsewhere = fv("exec", "vm", "--cwd", "/etc", "--", "sh", "-c", "pwd")
    assert elsewhere.stdout == b"/etc\n", elsewhere.stderr
    missing = fv("exec", "vm", "--cwd", "/nope", "--", "sh", "-c", "pwd")
    assert missing.returncode == 127  # as a shell gives for a missing directory
    assert b"cannot change directory to '/nope'" in missing.stderr
    no_program = fv("exec", "vm", "--", "no-such-program-zz")
    assert no_program.returncode == 127, no_program.stderr
    assert b"cannot run 'no-such-program-zz' in the workload" in no_program.stderr
    not_runnable = fv("exec", "vm", "--", "/etc/passwd")
    assert not_runnable.returncode == 126, not_runnable.stderr

    named = subprocess.Popen(
        [*CLI, "exec", "vm", "--session", "s1", "-T", "--", "sleep", "300"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while b"s1" not in fv("list-exec", "vm").stdout:
            assert time.monotonic() < deadline, "the session did not start"
            time.sleep(0.1)
        swap = fv("reprovision", "vm", "--yes")
        assert swap.returncode == 0, swap.stderr
        _, err = named.communicate(timeout=60)
    finally:
        if named.poll() is None:
            named.kill()
            named.wait()
    assert named.returncode == 129, err
    assert (
        b"fly-vault: session s1 was ended by the vault: the vault is being reprovisioned "
        b"(exit status 129)" in err
    ), err
    listed = {s["session_id"]: s for s in json.loads(fv("list-exec", "vm", "--json").stdout)}
    assert listed["s1"]["end_reason"] == "the vault is being reprovisioned"
    assert listed["s1"]["signal"] == 1


def test_reprovision_of_a_host_mode_vault_is_refused_at_once_with_the_fix(
    tmp_path: Path, init_process: InitProcess, issuer: OidcIssuer
) -> None:
    image = make_rootfs(tmp_path / "a.tar.gz", "A")
    configure(init_process.port, issuer, rootfs=str(image))
    for command in (("reprovision", "vm", "--yes"), ("connect", "vm", "--reprovision")):
        began = time.monotonic()
        result = fv(*command, timeout=60)
        assert time.monotonic() - began < 10, command  # not an authentication timeout
        assert result.returncode in (8, 255), (command, result.stderr)
        assert b"runs in host mode" in result.stderr, result.stderr
        assert b"fly-vault local up --rootfs IMAGE" in result.stderr, result.stderr


def test_verbose_log_records_the_provisioning_phases_and_no_token(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    """``-v --log-file`` during a cold provision: the upload and the vault's phases, each
    with its time, and no secret anywhere in the log or the output."""
    from conftest import TOKEN

    configure(vm_init.port, issuer, rootfs=str(make_rootfs(tmp_path / "a.tar.gz", "A")))
    log = tmp_path / "provision.log"
    result = fv("-v", "--log-file", str(log), "exec", "vm", "--", "cat", "/etc/version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"A\n"
    messages = [json.loads(line)["msg"] for line in log.read_text().splitlines() if line]
    for fragment in (
        "handshake: ok in",
        "attestation: ok in",
        "provision: upload started",
        "provision: upload done in",
        "provision: ok in",
        "stream 4 open: console",
    ):
        assert any(fragment in message for message in messages), (fragment, messages)
    phases = [m for m in messages if m.startswith("provision: ") and " done in " in m]
    assert len(phases) >= 2, phases  # the upload and at least one of the vault's phases
    for text in (log.read_text(), result.stdout.decode(), result.stderr.decode()):
        assert TOKEN not in text


def test_reprovision_of_a_cold_vault_uploads_the_rootfs_once(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    """Regression (issue 13): ``reprovision`` of a never-provisioned vault provisioned it
    while connecting, then uploaded and activated the same rootfs a second time."""
    image = make_rootfs(tmp_path / "a.tar.gz", "A")
    configure(vm_init.port, issuer, rootfs=str(image))
    result = fv("reprovision", "vm", "--yes")
    assert result.returncode == 0, result.stderr
    # init logs one line per rootfs it received (before the answer; "provisioned for"
    # comes at the end of the settle window, which the client does not wait for).
    logged = [line for line in vm_init.log.read_text().splitlines() if "rootfs staged" in line]
    assert len(logged) == 1, logged
    assert b"was cold" in result.stdout, result.stdout
    after = fv("exec", "vm", "--", "cat", "/etc/version")
    assert after.returncode == 0, after.stderr
    assert after.stdout == b"A\n"


def test_a_workload_dying_inside_the_settle_window_is_rolled_back_after_the_answer(
    tmp_path: Path, fly_api: Any, issuer: OidcIssuer
) -> None:
    """The client is answered once the new workload is up, before its settle window ends;
    a death inside the window (made to happen by a trigger file, and a window of 600 s,
    so no timing is involved) still rolls back, and the client learns it on the same
    stream. Here a cold vault's first image: rolled back to cold."""
    from conftest import run_async

    from flyvault.client.connection import open_vault
    from flyvault.errors import ProvisionError

    init = start_init(
        tmp_path, fly_api.path, host_mode=False, extra_args=("--settle-seconds", "600")
    )
    try:
        script = b"#!/bin/sh\nwhile [ ! -e /trigger/die ]; do sleep 0.02; done\nexit 7\n"
        image = make_rootfs(
            tmp_path / "dies.tar.gz", "D", extra={"sbin/init": script, "trigger/.keep": b""}
        )
        os.chmod(image.with_suffix(".tree") / "sbin/init", 0o755)
        with tarfile.open(image, "w:gz") as archive:  # again, with the init executable
            archive.add(image.with_suffix(".tree"), arcname=".")
        entry = vault_entry(init.port, issuer, name="vm", rootfs=str(image))

        async def scenario() -> None:
            connection = await open_vault(entry)
            try:
                assert connection.settled is not None
                assert not connection.settled.done()  # answered inside the window
                (init.data_dir / "rootfs/trigger/die").touch()
                with pytest.raises(
                    ProvisionError,
                    match=r"setup rolled back: .*exited .* within "
                    r"the 600 s settle window \(status 7.*stays cold",
                ):
                    await connection.settled
            finally:
                connection.close()

        run_async(scenario(), timeout=120)
        assert not (init.data_dir / ".provisioned").exists()
        assert not (init.data_dir / "rootfs").exists()
        assert "rolled back" in init.log.read_text()
    finally:
        init.stop()
