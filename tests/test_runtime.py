"""The workload runtime in real PID and mount namespaces, on a busybox rootfs (root only)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import run_async

from flyvault.errors import ProvisionError, SpawnError
from flyvault.protocol.constants import RuntimeStatus
from flyvault.server import cgroups
from flyvault.server.cgroups import Limits
from flyvault.server.nsinit import FALLBACK_MARKER
from flyvault.server.outputlog import STDOUT
from flyvault.server.process import ExitStatus, ManagedProcess
from flyvault.server.runtime import STATE_FILE, Account, WorkloadRuntime

BUSYBOX = Path("/bin/busybox")

if os.geteuid() != 0:
    pytest.skip("the workload runtime needs root (namespaces, mounts)", allow_module_level=True)
_missing = [tool for tool in ("unshare", "nsenter") if shutil.which(tool) is None]
if _missing:
    pytest.skip(f"util-linux tools missing: {', '.join(_missing)}", allow_module_level=True)
if not BUSYBOX.is_file():
    pytest.skip(
        "no /bin/busybox to build a rootfs from (apt-get install busybox-static)",
        allow_module_level=True,
    )

APPLETS = (
    "sh ls cat ps mount sleep id tty echo env test wc head stat stty kill true grep dd hostname "
    "pwd ipcs"
)

#: An init that stops cleanly on SIGTERM (busybox sh runs the trap once `wait` returns).
GRACEFUL_INIT = "#!/bin/sh\ntrap 'exit 0' TERM\nwhile :; do sleep 1 & wait; done\n"
#: An init that ignores SIGTERM: PID 1 drops signals it has no handler for.
STUBBORN_INIT = "#!/bin/sh\nexec sleep 100000\n"


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A tiny rootfs: static busybox plus applet links, no /sbin/init."""
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "sbin").mkdir()
    (root / "etc").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS.split():
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return root


def install_init(rootfs: Path, script: str) -> None:
    init = rootfs / "sbin" / "init"
    init.write_text(script)
    init.chmod(0o755)


@pytest.fixture
def make_runtime(tmp_path: Path, rootfs: Path) -> Iterator[Callable[..., WorkloadRuntime]]:
    made: list[WorkloadRuntime] = []

    def make(**options: Any) -> WorkloadRuntime:
        options.setdefault("console", tmp_path / "console.log")
        options.setdefault("restart_delay", 0.1)
        made.append(WorkloadRuntime(rootfs, tmp_path / "persist", **options))
        return made[-1]

    yield make
    # A test that failed half-way leaves its workload running: kill its init (the whole
    # namespace goes with it, then unshare exits) and reap that one pid, so later tests
    # see no stray process or zombie.
    for runtime in made:
        process, pidfd = runtime._process, runtime._pidfd
        if process is not None and process.returncode is None and pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(process.pid, 0)
        runtime.cgroups.remove(timeout=10)  # and its cgroups: the host's tree as it was
    console = tmp_path / "console.log"
    if console.exists():
        print(console.read_text(errors="replace"))  # shown by pytest when the test failed


@asynccontextmanager
async def started(runtime: WorkloadRuntime) -> AsyncIterator[WorkloadRuntime]:
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop(grace=2)
        assert runtime.status() is RuntimeStatus.NOT_STARTED


class Collected:
    def __init__(self) -> None:
        self.chunks: list[tuple[int, bytes]] = []

    def __call__(self, channel: int, data: bytes) -> None:
        self.chunks.append((channel, data))

    def text(self, channel: int = STDOUT) -> str:
        return b"".join(d for c, d in self.chunks if c == channel).decode(errors="replace")


async def spawn(
    runtime: WorkloadRuntime, script: str, *, pty: bool = False
) -> tuple[ManagedProcess, Collected]:
    output = Collected()
    process = await ManagedProcess.spawn(
        ["/bin/sh", "-c", script],
        pty=pty,
        on_output=output,
        env=runtime.env,
        wrapper=runtime.wrapper(),
    )
    return process, output


async def run(
    runtime: WorkloadRuntime, script: str, *, pty: bool = False
) -> tuple[ExitStatus, str]:
    process, output = await spawn(runtime, script, pty=pty)
    status = await asyncio.wait_for(process.wait(), 20)
    return status, output.text()


async def output_of(runtime: WorkloadRuntime, script: str, *, pty: bool = False) -> str:
    """Run ``script`` inside; it must succeed."""
    status, out = await run(runtime, script, pty=pty)
    assert status.exit_status == 0, out
    return out


def zombies_of(pid: int) -> list[int]:
    """Our children that are zombies (exited and not reaped)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


class Watched:
    """A process watched through a pidfd: unlike a pid, it cannot be confused with a later
    process or thread that reuses the number."""

    def __init__(self, pid: int) -> None:
        self.fd = os.pidfd_open(pid)

    def alive(self) -> bool:
        # A pidfd polls readable once its process has exited.
        readable, _, _ = select.select([self.fd], [], [], 0)
        return not readable

    def close(self) -> None:
        os.close(self.fd)


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ the environment


def test_fallback_init_gives_a_usable_isolated_system(
    make_runtime: Callable[..., WorkloadRuntime],
    tmp_path: Path,
    rootfs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACCESS_TOKEN", "must-never-reach-the-workload")
    host_marker = tempfile.NamedTemporaryFile(dir="/tmp", prefix="fly-vault-host-")  # noqa: SIM115
    script = (
        "echo pid=$$; cat /proc/1/cmdline; echo; ls /dev; ls -ld /tmp; mount;"
        "echo x > /dev/null && echo devnull-ok;"
        "echo pts=$(test -d /dev/pts && echo yes);"
        "echo urandom=$(head -c 16 /dev/urandom | wc -c);"
        "echo persisted > /root/in-root; echo persisted > /home/in-home;"
        f"echo host-tmp=$(test -e {host_marker.name} && echo visible || echo absent);"
        f"echo host-test-dir=$(test -e {tmp_path} && echo visible || echo absent);"
        "echo uid=$(id -u); echo root-entries=$(ls /);"
        "cat /proc/1/environ | tr '\\0' '\\n'; env"
    )

    async def scenario() -> None:
        runtime = make_runtime()
        assert runtime.status() is RuntimeStatus.NOT_STARTED
        assert runtime.boot_id is None
        async with started(runtime):
            assert runtime.status() is RuntimeStatus.FALLBACK_INIT
            assert (rootfs / FALLBACK_MARKER).exists()
            assert runtime.boot_id
            out = await output_of(runtime, script)
            lines = out.splitlines()
            # The shell is inside the new PID namespace: a tiny pid, and PID 1 is nsinit.
            assert int(lines[0].removeprefix("pid=")) < 20
            assert "nsinit" in lines[1]
            for node in ("null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm"):
                assert node in lines, node
            assert any(line.startswith("drwxrwxrwt") and line.endswith("/tmp") for line in lines)
            for mounted in (
                "proc on /proc type proc",
                "sysfs on /sys type sysfs (ro",
                "on /dev type tmpfs",
                "devpts on /dev/pts type devpts",
                "on /dev/shm type tmpfs",
                "tmpfs on /run type tmpfs",
                "tmpfs on /tmp type tmpfs",
                " on /root type ",
                " on /home type ",
            ):
                assert mounted in out, mounted
            for expected in (
                "devnull-ok",
                "pts=yes",
                "urandom=16",
                "host-tmp=absent",
                "host-test-dir=absent",
                "uid=0",
                "container=fly-vault",
                "HOME=/root",
            ):
                assert expected in lines, expected
            assert "ACCESS_TOKEN" not in out
            entries = next(line for line in lines if line.startswith("root-entries="))
            assert set(entries.split("=")[1].split()) == {
                "bin", "sbin", "etc", "dev", "proc", "sys", "run", "tmp", "root", "home",
            }  # fmt: skip
        # Written inside, persisted on the host; the marker goes with the runtime.
        assert (tmp_path / "persist" / "root" / "in-root").read_text() == "persisted\n"
        assert (tmp_path / "persist" / "home" / "in-home").read_text() == "persisted\n"
        assert not (rootfs / FALLBACK_MARKER).exists()
        assert zombies_of(os.getpid()) == []

    with host_marker:
        run_async(scenario())
    # Nothing the runtime mounted leaked into the host's mount table.
    # (Compared by path, not whole: other tests on this machine may mount things meanwhile.)
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


def test_an_init_that_cannot_be_executed_gives_the_fallback_init(
    make_runtime: Callable[..., WorkloadRuntime], rootfs: Path, tmp_path: Path
) -> None:
    install_init(rootfs, GRACEFUL_INIT)
    (rootfs / "sbin" / "init").chmod(0o644)

    async def scenario() -> None:
        async with started(make_runtime()) as runtime:
            assert runtime.status() is RuntimeStatus.FALLBACK_INIT
            assert "nsinit" in await output_of(runtime, "cat /proc/1/cmdline")
        log = (tmp_path / "console.log").read_text()
        assert "cannot run /sbin/init: Permission denied; fallback init active" in log

    run_async(scenario())


def test_pty_spawn_inside(make_runtime: Callable[..., WorkloadRuntime]) -> None:
    async def scenario() -> None:
        async with started(make_runtime()) as runtime:
            # A host PTY works for I/O and size, but has no name inside: the workload's
            # /dev/pts is its own instance.
            out = await output_of(runtime, "test -t 0 && echo terminal; stty size", pty=True)
            assert "terminal" in out
            # A PTY from the workload's own devpts: `tty` names it.
            master, slave = runtime.openpty()
            os.close(master)
            os.close(slave)
            with pytest.MonkeyPatch.context() as patch:
                # ManagedProcess has no hook for the PTY allocator yet (see the runtime's
                # openpty), so the test swaps os.openpty for the one spawn.
                patch.setattr(os, "openpty", runtime.openpty)
                out = await output_of(runtime, "tty; test -t 0 && echo terminal", pty=True)
            assert out.splitlines()[0].strip().startswith("/dev/pts/"), out
            assert "terminal" in out

    run_async(scenario())


def test_wrapper_cwd_is_inside_the_workload(make_runtime: Callable[..., WorkloadRuntime]) -> None:
    async def scenario() -> None:
        async with started(make_runtime()) as runtime:
            output = Collected()
            process = await ManagedProcess.spawn(
                ["/bin/sh", "-c", "pwd; ls"],
                pty=False,
                on_output=output,
                env=runtime.env,
                wrapper=runtime.wrapper(cwd="/etc"),
            )
            assert (await process.wait()).exit_status == 0
            assert output.text().splitlines() == ["/etc", "passwd"]
            out = await output_of(runtime, "pwd")
            assert out.strip() == "/"

    run_async(scenario())


# ------------------------------------------------------------------ init, stop, restart


#: What ``WorkloadRuntime`` logs when the grace ran out and it had to SIGKILL the workload.
KILLED_AFTER_GRACE = "did not stop within"


def test_system_init_runs_and_stops_gracefully(
    make_runtime: Callable[..., WorkloadRuntime], rootfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    install_init(rootfs, GRACEFUL_INIT)

    async def scenario() -> None:
        runtime = make_runtime()
        await runtime.start()
        try:
            assert runtime.status() is RuntimeStatus.SYSTEM_INIT
            assert not (rootfs / FALLBACK_MARKER).exists()
            out = await output_of(runtime, "cat /proc/1/cmdline | tr '\\0' ' '")
            assert out.strip() == "/bin/sh /sbin/init"
        finally:
            await runtime.stop(grace=20)
        # It ended on SIGTERM, before the grace ran out (else the runtime says it killed it).
        assert KILLED_AFTER_GRACE not in caplog.text
        assert runtime.status() is RuntimeStatus.NOT_STARTED
        assert zombies_of(os.getpid()) == []

    run_async(scenario())


def test_stop_kills_an_init_that_ignores_sigterm_after_the_grace(
    make_runtime: Callable[..., WorkloadRuntime], rootfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    install_init(rootfs, STUBBORN_INIT)

    async def scenario() -> None:
        runtime = make_runtime()
        await runtime.start()
        assert runtime.status() is RuntimeStatus.SYSTEM_INIT
        assert runtime.init_pid is not None
        init = Watched(runtime.init_pid)
        began = time.monotonic()
        await runtime.stop(grace=1)
        # After the grace, and by the SIGKILL to the init: not the last resort 10 s later.
        assert 1 <= time.monotonic() - began < 10
        assert f"{KILLED_AFTER_GRACE} 1 s" in caplog.text
        assert not init.alive()
        init.close()
        assert zombies_of(os.getpid()) == []

    run_async(scenario())


def test_stop_ends_every_process_of_the_namespace(
    make_runtime: Callable[..., WorkloadRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        runtime = make_runtime()
        await runtime.start()
        # One sleeper run directly, one orphaned (reparented to the namespace's init). The
        # duration tells ours from any other test's sleepers.
        seconds = str(random.randrange(100_000, 1_000_000))
        sleeper, _ = await spawn(runtime, f"exec sleep {seconds}")
        orphan = (await output_of(runtime, f"sleep {seconds} & echo $!")).strip()
        await until(lambda: bool(Path(f"/proc/{sleeper.pid}/task").exists()))
        children = Path(f"/proc/{sleeper.pid}/task/{sleeper.pid}/children").read_text().split()
        assert len(children) == 1  # nsenter's child, the sleep inside the namespace
        inner = Watched(int(children[0]))
        assert inner.alive()
        # The orphan: in the namespace, its parent is the init (inner pid 1).
        out = await output_of(runtime, f"cat /proc/{orphan}/stat")
        assert out.split(") ")[1].split()[1] == "1"
        await runtime.stop(grace=5)
        # The fallback init forwarded SIGTERM (a graceful stop, not the SIGKILL after the
        # grace): the sleeper died of it and nsenter passed that on.
        assert KILLED_AFTER_GRACE not in caplog.text
        assert (await asyncio.wait_for(sleeper.wait(), 30)).signal == signal.SIGTERM
        assert not inner.alive()
        inner.close()
        # Nothing in any PID namespace but ours is left of the workload.
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                assert cmdline != f"sleep\0{seconds}\0".encode(), entry
        assert zombies_of(os.getpid()) == []

    run_async(scenario())


def test_the_fallback_init_reaps_orphans(make_runtime: Callable[..., WorkloadRuntime]) -> None:
    async def scenario() -> None:
        async with started(make_runtime()) as runtime:
            # Orphans that exit at once: without a reaper they would stay zombies.
            for _ in range(5):
                await output_of(runtime, "sleep 0.05 &")
            # Wait (bounded) until the orphans are gone, reaped: not a fixed sleep, after
            # which a slow machine may show one that exited a moment ago and is not yet
            # reaped. Without a reaper they stay zombies, "(sleep) Z", and this times out.
            out = ""

            async def reaped() -> bool:
                nonlocal out
                # Each file on its own: a process that exits between the glob and the
                # read (one of the orphans) must not fail the whole listing.
                out = await output_of(
                    runtime, 'for f in /proc/[0-9]*/stat; do cat "$f" 2>/dev/null; done; true'
                )
                lines = [line.split(") ", 1) for line in out.splitlines() if ") " in line]
                states = [rest.split()[0] for _, rest in lines]
                sleeping = [head for head, _ in lines if head.endswith("(sleep")]
                return bool(states) and "Z" not in states and not sleeping

            deadline = time.monotonic() + 30
            while not await reaped():
                assert time.monotonic() < deadline, out
                await asyncio.sleep(0.05)

    run_async(scenario())


def test_supervisor_restarts_a_dead_workload_with_a_new_boot_id(
    make_runtime: Callable[..., WorkloadRuntime],
) -> None:
    async def scenario() -> None:
        async with started(make_runtime()) as runtime:
            first_boot, first_pid = runtime.boot_id, runtime.init_pid
            assert first_pid is not None
            os.kill(first_pid, signal.SIGKILL)  # from outside, as a crash would
            await until(lambda: runtime.running and runtime.boot_id != first_boot)
            assert runtime.restarts == 1
            assert runtime.init_pid != first_pid
            assert runtime.status() is RuntimeStatus.FALLBACK_INIT
            out = await output_of(runtime, "echo alive again")
            assert out.strip() == "alive again"
            assert zombies_of(os.getpid()) == []

    run_async(scenario())


def test_restart_gives_a_new_boot_and_keeps_persisted_homes(
    make_runtime: Callable[..., WorkloadRuntime],
) -> None:
    async def scenario() -> None:
        async with started(make_runtime()) as runtime:
            await output_of(runtime, "echo kept > /root/note")
            first_boot = runtime.boot_id
            await runtime.restart(grace=2)
            assert runtime.boot_id != first_boot
            assert runtime.restarts == 0  # on purpose, not by the supervisor
            out = await output_of(runtime, "cat /root/note; ls /tmp | wc -l")
            assert out.split() == ["kept", "0"]  # /root survives, /tmp is new

    run_async(scenario())


def test_a_crash_looping_init_is_restarted_with_a_growing_delay(
    make_runtime: Callable[..., WorkloadRuntime], rootfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    install_init(rootfs, "#!/bin/sh\nexit 3\n")

    async def scenario() -> None:
        runtime = make_runtime(restart_delay=0.05, max_restart_delay=0.4)
        began = time.monotonic()
        await runtime.start()
        await until(lambda: runtime.restarts >= 5, timeout=60)
        elapsed = time.monotonic() - began
        await runtime.stop(grace=1)
        # The delay doubles from 0.05 s (logged as 0.1) up to the 0.4 s cap, whatever the
        # machine's speed; without the backoff it would stay at 0.05 s.
        delays = re.findall(r"exited with status 3; restarting it in (\S+) s", caplog.text)
        assert delays[:5] == ["0.1", "0.1", "0.2", "0.4", "0.4"], delays
        assert elapsed >= 0.05 + 0.1 + 0.2 + 0.4 + 0.4 - 0.01  # and it did wait them out
        assert zombies_of(os.getpid()) == []

    run_async(scenario())


def test_start_with_settle_refuses_an_init_that_dies_at_once(
    make_runtime: Callable[..., WorkloadRuntime], rootfs: Path
) -> None:
    install_init(rootfs, "#!/bin/sh\nexit 3\n")

    async def scenario() -> None:
        runtime = make_runtime()
        with pytest.raises(ProvisionError, match=r"exited within 1 s .*status 3"):
            await runtime.start(settle=1)
        assert runtime.status() is RuntimeStatus.NOT_STARTED
        await asyncio.sleep(0.3)
        assert runtime.restarts == 0  # a failed start is not supervised
        await runtime.stop()

    run_async(scenario())


def test_no_fd_is_leaked_across_starts_and_stops(
    make_runtime: Callable[..., WorkloadRuntime],
) -> None:
    async def scenario() -> None:
        runtime = make_runtime()
        await runtime.start()
        await runtime.stop()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            await runtime.start()
            await output_of(runtime, "true")
            await runtime.restart(grace=1)
            await runtime.stop()
        assert len(os.listdir("/proc/self/fd")) == before

    run_async(scenario())


def test_the_workload_dies_with_the_server(rootfs: Path, tmp_path: Path) -> None:
    """A server killed with SIGKILL takes its workload along (nothing runs unsupervised)."""
    code = (
        "import asyncio, sys\n"
        "from flyvault.server.runtime import WorkloadRuntime\n"
        "async def main():\n"
        f"    runtime = WorkloadRuntime({str(rootfs)!r}, {str(tmp_path / 'persist')!r})\n"
        "    await runtime.start()\n"
        "    print(runtime.init_pid, flush=True)\n"
        "    await asyncio.sleep(100)\n"
        "asyncio.run(main())\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parents[1]
    )
    try:
        assert server.stdout is not None
        init = Watched(int(server.stdout.readline()))
        assert init.alive()
    finally:
        server.kill()
        server.wait()
    try:
        deadline = time.monotonic() + 10
        while init.alive():
            assert time.monotonic() < deadline, "the workload outlived the server"
            time.sleep(0.02)
    finally:
        if init.alive():  # do not leave it running for the next tests
            signal.pidfd_send_signal(init.fd, signal.SIGKILL)
        init.close()
    # Its cgroups stay (nobody was left to remove them): the next init's recovery does.
    runtime = WorkloadRuntime(rootfs, tmp_path / "persist")
    assert cgroups.existing(runtime.cgroups.name)
    run_async(runtime.recover())
    assert cgroups.existing(runtime.cgroups.name) == []
    assert not (tmp_path / STATE_FILE).exists()


# ------------------------------------------------------------------ isolation and entry


def cgroup_tree() -> set[str]:
    """Every cgroup directory of every hierarchy (the host's tree, as a set of paths)."""
    found = set()
    for hierarchy in cgroups.discover():
        for current, _dirs, _files in os.walk(hierarchy.mount):
            found.add(current)
    return found


def ours_or_top(path: str, tag: str) -> bool:
    """Whether a changed cgroup path can be ours: our subtree, or a top-level entry (where
    a workload's systemd would create system.slice). Other processes of this machine make
    and remove cgroups of their own meanwhile: not counted."""
    if tag in path:
        return True
    return any(Path(path).parent == h.mount for h in cgroups.discover())


async def entered(
    runtime: WorkloadRuntime, script: str, *, cwd: str | None = None, strict: bool = True
) -> tuple[ManagedProcess, Collected]:
    output = Collected()
    process = await ManagedProcess.spawn(
        ["/bin/sh", "-c", script],
        pty=False,
        on_output=output,
        env=runtime.env,
        entry=runtime.entry(cwd, strict=strict),
    )
    return process, output


def test_entry_runs_inside_every_namespace_with_no_process_in_between(
    make_runtime: Callable[..., WorkloadRuntime], rootfs: Path
) -> None:
    (rootfs / "etc" / "hostname").write_text("from-the-image\n")
    host_name = Path("/proc/sys/kernel/hostname").read_text()
    before = cgroup_tree()

    async def scenario() -> None:
        runtime = make_runtime(hostname="my_vault.dev")
        async with started(runtime):
            script = (
                "echo pid=$$; pwd; hostname; cat /etc/hostname; cat /proc/self/cgroup;"
                "ls /sys/fs/cgroup >/dev/null && echo cgroupfs; touch /sys/x 2>/dev/null || "
                "echo sys-ro"
            )
            process, output = await entered(runtime, script, cwd="/etc")
            # The command itself is our child: no nsenter (or anything) between us.
            assert Path(f"/proc/{process.pid}/stat").read_text().split(") ")[1].split()[1] == str(
                os.getpid()
            )
            for kind in ("pid", "mnt", "cgroup", "uts", "ipc"):
                ours = os.stat(f"/proc/self/ns/{kind}").st_ino
                theirs = os.stat(f"/proc/{runtime.init_pid}/ns/{kind}").st_ino
                assert ours != theirs, kind
                assert os.stat(f"/proc/{process.pid}/ns/{kind}").st_ino == theirs, kind
            host_cgroup = Path(f"/proc/{process.pid}/cgroup").read_text()
            assert (await process.wait()).exit_status == 0, output.text(2)
            lines = output.text().splitlines()
            assert int(lines[0].removeprefix("pid=")) < 20
            # The vault's name (made a valid hostname), also in place of the image's file.
            assert lines[1:4] == ["/etc", "my-vault-dev", "my-vault-dev"]
            assert "0::/" in lines  # the cgroup namespace is rooted at the workload's cgroup
            assert "cgroupfs" in lines and "sys-ro" in lines
            assert runtime.cgroups.name in host_cgroup  # seen from here: in its subtree
            # A directory that does not exist: refused with the reason, or / for a login.
            with pytest.raises(SpawnError, match="cannot change directory to '/nope'"):
                await entered(runtime, "pwd", cwd="/nope")
            process, output = await entered(runtime, "pwd", cwd="/nope", strict=False)
            assert (await process.wait()).exit_status == 0
            assert output.text().strip() == "/"
            with pytest.raises(SpawnError, match="cannot run 'no-such-program'"):
                await ManagedProcess.spawn(
                    ["no-such-program"],
                    pty=False,
                    on_output=Collected(),
                    env=runtime.env,
                    entry=runtime.entry(),
                )
        assert cgroups.existing(runtime.cgroups.name) == []
        assert zombies_of(os.getpid()) == []

    run_async(scenario())
    # The host's hostname and cgroup tree are as they were.
    assert Path("/proc/sys/kernel/hostname").read_text() == host_name
    tag = cgroups.subtree_name(rootfs.parent)
    changed = before ^ cgroup_tree()
    assert not [path for path in changed if ours_or_top(path, tag)], changed


def test_login_account_from_the_images_passwd_resolved_inside(
    make_runtime: Callable[..., WorkloadRuntime], rootfs: Path
) -> None:
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/ash\nuser:x:1000:1000::/home/user:/bin/sh\n"
    )
    (rootfs / "bin" / "ash").symlink_to("/bin/busybox")  # absolute: resolved inside
    (rootfs / "bin" / "escape").symlink_to("/proc/self/root/etc/hostname")

    async def scenario() -> None:
        async with started(make_runtime()) as runtime:
            account = runtime.account()
            assert account.home == "/root" and account.shell == "/bin/ash"
            assert account.environment() == {
                "HOME": "/root",
                "USER": "root",
                "LOGNAME": "root",
                "SHELL": "/bin/ash",
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            }
            assert runtime.account("user").environment()["PATH"] == "/usr/local/bin:/usr/bin:/bin"
            assert runtime.exists_inside("/bin/ash")
            assert not runtime.exists_inside("/bin/missing")
            # /etc/passwd as a symlink out of the rootfs is not followed on the host.
            (rootfs / "etc" / "passwd").unlink()
            (rootfs / "etc" / "passwd").symlink_to("../../../../../../../../etc/shadow")
            assert runtime.account() == Account(groups=(0,))  # defaults, nothing of the host's
            # Any other user must be in the image's passwd: never root's account instead.
            with pytest.raises(SpawnError, match="no such user in the vault's /etc/passwd"):
                runtime.account("user")

    run_async(scenario())


def test_a_command_stopped_by_the_workload_cannot_strand_the_stop(
    make_runtime: Callable[..., WorkloadRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    """What systemd's shutdown does to every process it sees: SIGSTOP. With nsenter in
    between, nsenter stopped itself too and the namespace could never end."""

    async def scenario() -> None:
        runtime = make_runtime()
        await runtime.start()
        process, _ = await entered(runtime, "exec sleep 1000")
        inner = Watched(process.pid)
        await output_of(runtime, "kill -STOP 2")  # the first command's pid inside
        await until(lambda: Path(f"/proc/{process.pid}/stat").read_text().split(") ")[1][0] == "T")
        began = time.monotonic()
        await runtime.stop(grace=5)
        assert time.monotonic() - began < 5
        assert KILLED_AFTER_GRACE not in caplog.text
        assert (await asyncio.wait_for(process.wait(), 30)).signal is not None
        assert not inner.alive()
        inner.close()
        assert zombies_of(os.getpid()) == []
        assert cgroups.existing(runtime.cgroups.name) == []

    run_async(scenario())


def test_on_stop_gets_the_reason_before_the_workload_stops(
    make_runtime: Callable[..., WorkloadRuntime],
) -> None:
    async def scenario() -> None:
        runtime = make_runtime()
        seen: list[tuple[str, bool]] = []

        async def on_stop(reason: str) -> None:
            seen.append((reason, runtime.running))
            with pytest.raises(ProvisionError, match="stopping"):
                runtime.entry()  # no new command while the workload stops

        runtime.on_stop = on_stop
        await runtime.start()
        await runtime.restart(grace=2)
        await runtime.stop(grace=2, reason="the vault is being reprovisioned")
        assert seen == [
            ("the vault's workload is restarting", True),
            ("the vault is being reprovisioned", True),
        ]

    run_async(scenario())


def test_memory_limit_kills_inside_the_workload_only(
    make_runtime: Callable[..., WorkloadRuntime],
) -> None:
    async def scenario() -> None:
        runtime = make_runtime(limits=Limits(memory=32 * 1024 * 1024, cpus=0.5))
        async with started(runtime):
            process, _ = await entered(runtime, "exec dd if=/dev/zero of=/dev/null bs=256M count=1")
            status = await asyncio.wait_for(process.wait(), 60)
            assert status.signal == signal.SIGKILL  # the OOM killer, within the workload
            assert runtime.running  # init and the workload's own init are untouched
            assert (await output_of(runtime, "echo still here")).strip() == "still here"
            limits = {
                name: (top / name).read_text().split()[0]
                for top in runtime.cgroups.tops
                for name in ("memory.max", "memory.limit_in_bytes", "cpu.max", "cpu.cfs_quota_us")
                if (top / name).exists()
            }
            assert limits.get("memory.max", limits.get("memory.limit_in_bytes")) == str(32 << 20)
            assert limits.get("cpu.max", limits.get("cpu.cfs_quota_us")) == "50000"

    run_async(scenario())


def test_recovery_ends_a_stopped_helper_left_by_a_killed_init(rootfs: Path, tmp_path: Path) -> None:
    """The issue's leftover: init SIGKILLed while a stopped nsenter held its child's exit.
    The old namespace's init cannot finish exiting; the next init's recovery ends it all."""
    code = (
        "import asyncio\n"
        "from flyvault.server.runtime import WorkloadRuntime\n"
        "async def main():\n"
        f"    runtime = WorkloadRuntime({str(rootfs)!r}, {str(tmp_path / 'persist')!r})\n"
        "    await runtime.start()\n"
        "    print(runtime.init_pid, flush=True)\n"
        "    await asyncio.sleep(100)\n"
        "asyncio.run(main())\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parents[1]
    )
    helper: subprocess.Popen[bytes] | None = None
    try:
        assert server.stdout is not None
        init_pid = int(server.stdout.readline())
        init = Watched(init_pid)
        helper = subprocess.Popen(
            ["nsenter", f"--target={init_pid}", "--mount", "--pid", "--root", "--", "sleep", "1000"]
        )
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{helper.pid}/task/{helper.pid}/children").read_text().split():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        child = int(Path(f"/proc/{helper.pid}/task/{helper.pid}/children").read_text().split()[0])
        os.kill(child, signal.SIGSTOP)  # nsenter stops itself when its child stops
        deadline = time.monotonic() + 10
        while Path(f"/proc/{helper.pid}/stat").read_text().split(") ")[1][0] != "T":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.kill()
        server.wait()
        time.sleep(0.5)
        assert init.alive()  # stuck: its namespace waits for the stopped helper
        run_async(WorkloadRuntime(rootfs, tmp_path / "persist").recover())
        assert helper.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while init.alive():
            assert time.monotonic() < deadline, "the old namespace's init stayed"
            time.sleep(0.02)
        init.close()
        assert cgroups.existing(cgroups.subtree_name(tmp_path)) == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if helper is not None and helper.poll() is None:
            helper.kill()
            helper.wait()


# ------------------------------------------------------------------ refusals


def test_a_symlinked_mountpoint_is_refused_clearly(
    make_runtime: Callable[..., WorkloadRuntime], rootfs: Path
) -> None:
    (rootfs / "proc").symlink_to("/etc")

    async def scenario() -> None:
        runtime = make_runtime()
        with pytest.raises(ProvisionError, match="proc must be a directory"):
            await runtime.start()
        assert runtime.status() is RuntimeStatus.NOT_STARTED
        await runtime.stop()
        assert zombies_of(os.getpid()) == []

    run_async(scenario())


def test_needs_root_and_a_rootfs(
    make_runtime: Callable[..., WorkloadRuntime], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(os, "geteuid", lambda: 1000)
        with pytest.raises(ProvisionError, match="needs root"):
            run_async(make_runtime().start())
    runtime = WorkloadRuntime(tmp_path / "absent", tmp_path / "persist")
    with pytest.raises(ProvisionError, match="not a directory"):
        run_async(runtime.start())
    with pytest.raises(ProvisionError, match="not running"):
        runtime.wrapper()


def test_start_watched_answers_once_up_and_reports_a_death_inside_the_window(
    make_runtime: Callable[..., WorkloadRuntime], rootfs: Path
) -> None:
    """Answered after the short ready check; a death later inside the window (made to
    happen by a trigger file, not by time) fails the watch and is not restarted."""
    install_init(rootfs, "#!/bin/sh\nwhile [ ! -e /die ]; do sleep 0.02; done\nexit 4\n")

    async def scenario() -> None:
        runtime = make_runtime()
        watch = await runtime.start_watched(settle=600, ready=0.05)
        assert runtime.status() is RuntimeStatus.SYSTEM_INIT
        assert not watch.done()
        (rootfs / "die").touch()
        with pytest.raises(ProvisionError, match=r"exited .* within the 600 s settle window"):
            await asyncio.wait_for(watch, 30)
        assert "status 4" in str(watch.exception())
        assert runtime.status() is RuntimeStatus.NOT_STARTED
        assert runtime.restarts == 0  # reported, never quietly restarted
        await runtime.stop()

    run_async(scenario())


def test_start_watched_refuses_an_init_that_dies_before_it_is_up(
    make_runtime: Callable[..., WorkloadRuntime], rootfs: Path
) -> None:
    install_init(rootfs, "#!/bin/sh\nexit 3\n")

    async def scenario() -> None:
        runtime = make_runtime()
        with pytest.raises(ProvisionError, match=r"status 3"):
            await runtime.start_watched(settle=600, ready=60)
        assert runtime.status() is RuntimeStatus.NOT_STARTED
        await runtime.stop()

    run_async(scenario())


def test_start_watched_commits_a_workload_stopped_on_purpose_or_that_stays_up(
    make_runtime: Callable[..., WorkloadRuntime], rootfs: Path
) -> None:
    install_init(rootfs, "#!/bin/sh\nexec sleep 1000\n")

    async def scenario() -> None:
        runtime = make_runtime()
        watch = await runtime.start_watched(settle=600, ready=0)
        await runtime.stop()  # inside the window, on purpose: not a failure
        assert await asyncio.wait_for(watch, 30) is None
        # A window that has passed (settle 0): supervised from then on.
        watch = await runtime.start_watched(settle=0, ready=0)
        assert await asyncio.wait_for(watch, 30) is None
        assert runtime.running and runtime._supervisor is not None
        await runtime.stop()

    run_async(scenario())
