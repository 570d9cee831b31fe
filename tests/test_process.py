"""ManagedProcess with real processes, real pipes and real PTYs."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_async

from flyvault.server.outputlog import STDERR, STDOUT
from flyvault.server.process import (
    OUTPUT_GRACE,
    READ_CHUNK,
    STDIN_HIGH_WATER,
    STDIN_LIMIT,
    ExitStatus,
    ManagedProcess,
    SpawnError,
)


class Output:
    """Collects on_output chunks; checks the chunk size bound on every delivery."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, bytes]] = []

    def __call__(self, channel: int, data: bytes) -> None:
        assert channel in (STDOUT, STDERR)
        assert 0 < len(data) <= READ_CHUNK
        self.chunks.append((channel, data))

    def channel(self, channel: int) -> bytes:
        return b"".join(data for ch, data in self.chunks if ch == channel)

    @property
    def stdout(self) -> bytes:
        return self.channel(STDOUT)

    @property
    def stderr(self) -> bytes:
        return self.channel(STDERR)

    @property
    def total(self) -> int:
        return sum(len(data) for _, data in self.chunks)

    async def until(self, predicate: Callable[[Output], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            assert time.monotonic() < deadline, f"timed out; output so far: {self.stdout!r}"
            await asyncio.sleep(0.01)


async def run(argv: list[str], *, pty: bool = False, **kwargs: Any) -> tuple[ExitStatus, Output]:
    output = Output()
    process = await ManagedProcess.spawn(argv, pty=pty, on_output=output, **kwargs)
    status = await process.wait()
    assert process.status == status
    return status, output


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


#: write(2) in /proc/PID/syscall, where known.
WRITE_SYSCALL = {"x86_64": 1, "aarch64": 64}.get(platform.machine())


def blocked_writing_stdout(pid: int) -> bool:
    """The process sleeps inside write(1, ...): its output is full (Linux /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        call = Path(f"/proc/{pid}/syscall").read_text().split()
    except (OSError, IndexError):
        return False
    if state != "S" or len(call) < 2 or call[0] == "running":
        return False
    return (WRITE_SYSCALL is None or call[0] == str(WRITE_SYSCALL)) and int(call[1], 16) == 1


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.01)


def open_fds() -> set[tuple[str, str]]:
    """This process's open fds with what each refers to. Compared as sets, an fd that
    something else (a collected socket of an earlier test) closes meanwhile is no leak."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            fds.add((name, os.readlink(f"/proc/self/fd/{name}")))
        except OSError:
            continue  # the listing's own fd, or one closed while we looked
    return fds


# ------------------------------------------------------------------ exit status


@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
@pytest.mark.parametrize("code", [0, 1, 4, 44, 255])
def test_exit_codes(code: int, pty: bool) -> None:
    status, _ = run_async(run(sh(f"exit {code}"), pty=pty))
    assert status == ExitStatus(code, None)
    assert status.exit_status == code


@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
def test_killed_by_its_own_signal(pty: bool) -> None:
    status, _ = run_async(run(sh("kill -TERM $$"), pty=pty))
    assert status == ExitStatus(None, signal.SIGTERM)
    assert status.exit_status == 143


# ------------------------------------------------------------------ pipes mode


def test_stdout_and_stderr_are_separate_and_binary_safe() -> None:
    code = (
        "import sys\n"
        "every = bytes(range(256))\n"
        "for _ in range(1000):\n"
        "    sys.stdout.buffer.write(every); sys.stderr.buffer.write(every[::-1])\n"
    )
    status, output = run_async(run(py(code)))
    assert status.exit_status == 0
    assert output.stdout == bytes(range(256)) * 1000
    assert output.stderr == bytes(range(256))[::-1] * 1000


def test_stdin_is_forwarded_with_backpressure_and_close_ends_cat() -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def scenario() -> None:
        output = Output()
        process = await ManagedProcess.spawn(["cat"], pty=False, on_output=output)
        for start in range(0, len(payload), 100_000):
            process.write_stdin(payload[start : start + 100_000])
            await process.drain_stdin()
        process.close_stdin()
        status = await asyncio.wait_for(process.wait(), 20)
        assert status.exit_status == 0
        assert output.stdout == payload
        assert output.stderr == b""

    run_async(scenario())


def test_drain_stdin_waits_for_a_child_that_does_not_read() -> None:
    async def scenario() -> None:
        process = await ManagedProcess.spawn(["sleep", "30"], pty=False, on_output=Output())
        process.write_stdin(b"x" * (STDIN_HIGH_WATER + 200_000))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(process.drain_stdin(), 0.5)
        drain = asyncio.ensure_future(process.drain_stdin())
        process.kill()
        # Once the child is gone the queue is dropped and the drainer released.
        await asyncio.wait_for(drain, 5)
        assert (await process.wait()).signal == signal.SIGKILL
        process.write_stdin(b"ignored after exit")

    run_async(scenario())


def test_stdin_queue_is_bounded() -> None:
    async def scenario() -> None:
        process = await ManagedProcess.spawn(["sleep", "30"], pty=False, on_output=Output())
        process.write_stdin(b"x" * STDIN_LIMIT)
        with pytest.raises(BufferError):
            process.write_stdin(b"x" * 100_000)
        process.kill()
        await process.wait()

    run_async(scenario())


def test_env_replaces_and_term_is_added() -> None:
    env = {"PATH": os.environ["PATH"], "ONLY_THIS": "yes"}
    status, output = run_async(run(["env"], env=env, term="vt100"))
    assert status.exit_status == 0
    lines = set(output.stdout.decode().splitlines())
    assert lines == {f"PATH={env['PATH']}", "ONLY_THIS=yes", "TERM=vt100"}


def test_wrapper_is_prepended_and_cwd_applies(tmp_path: Path) -> None:
    status, output = run_async(
        run(sh('echo "$WRAPPED $(pwd)"'), wrapper=["env", "WRAPPED=1"], cwd=str(tmp_path))
    )
    assert status.exit_status == 0
    assert output.stdout == f"1 {tmp_path}\n".encode()


# ------------------------------------------------------------------ PTY mode


def test_pty_child_has_a_terminal_with_the_given_size_and_term() -> None:
    script = 'tty; stty size; echo "TERM=$TERM"; test -t 0 && test -t 1 && test -t 2 && echo ok'
    status, output = run_async(run(sh(script), pty=True, term="xterm-256color", rows=33, cols=101))
    assert status.exit_status == 0
    lines = output.stdout.decode().split("\r\n")
    assert re.fullmatch(r"/dev/pts/\d+", lines[0])
    assert lines[1:4] == ["33 101", "TERM=xterm-256color", "ok"]
    assert output.stderr == b""


def test_pty_is_the_controlling_terminal_and_ctrl_c_interrupts() -> None:
    # /dev/tty only opens for a process with a controlling terminal, and ^C only becomes
    # SIGINT for the terminal's foreground process group.
    script = (
        "echo hi > /dev/tty; trap 'echo got-int; exit 5' INT; echo ready; "
        "while :; do sleep 0.05; done"
    )

    async def scenario() -> None:
        output = Output()
        process = await ManagedProcess.spawn(sh(script), pty=True, on_output=output)
        await output.until(lambda o: b"ready" in o.stdout)
        process.write_stdin(b"\x03")
        status = await asyncio.wait_for(process.wait(), 10)
        assert status == ExitStatus(5, None)
        assert output.stdout.startswith(b"hi\r\nready\r\n")
        assert b"got-int" in output.stdout

    run_async(scenario())


def test_resize_changes_stty_size_and_sends_sigwinch() -> None:
    async def scenario() -> None:
        output = Output()
        script = "trap 'echo winch' WINCH; stty size; read x; stty size"
        process = await ManagedProcess.spawn(
            sh(script), pty=True, on_output=output, rows=24, cols=80
        )
        await output.until(lambda o: b"24 80\r\n" in o.stdout)
        process.resize(50, 132)
        await output.until(lambda o: b"winch" in o.stdout)
        process.write_stdin(b"\n")
        status = await process.wait()
        assert status.exit_status == 0
        assert output.stdout.endswith(b"50 132\r\n")

    run_async(scenario())


@pytest.mark.parametrize("attempt", range(5))
def test_pty_tail_is_never_lost(attempt: int) -> None:
    # 200 KB printed, then an immediate exit: every byte must arrive before wait() returns.
    status, output = run_async(run(["seq", "1", "33000"], pty=True))
    assert status.exit_status == 0
    expected = "".join(f"{n}\r\n" for n in range(1, 33001)).encode()
    assert len(expected) > 200_000
    assert output.stdout == expected


@pytest.mark.parametrize("attempt", range(3))
def test_pipe_tail_is_never_lost(attempt: int) -> None:
    status, output = run_async(run(["head", "-c", "2000000", "/dev/zero"]))
    assert status.exit_status == 0
    assert output.stdout == bytes(2_000_000)


def test_pty_stdin_echo_and_close_stdin_ends_cat() -> None:
    async def scenario() -> None:
        output = Output()
        process = await ManagedProcess.spawn(["cat"], pty=True, on_output=output)
        process.write_stdin(b"hello\n")
        await output.until(lambda o: o.stdout.count(b"hello\r\n") == 2)  # echo + cat
        process.write_stdin(b"partial")
        process.close_stdin()  # mid-line: VEOF twice, flush then EOF
        status = await asyncio.wait_for(process.wait(), 10)
        assert status.exit_status == 0
        assert output.stdout.endswith(b"partialpartial")

    run_async(scenario())


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
def test_send_signal_reaches_the_process_group(pty: bool, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        output = Output()
        # The grandchild ignores the SIGHUP a PTY's group gets when the shell (the session
        # leader) dies, so only our SIGTERM can make it print; "ready" follows its traps.
        inner = (
            "trap '' HUP; trap 'echo inner-got-term; exit 3' TERM; echo ready; "
            "while :; do sleep 0.05; done"
        )
        script = f'sh -c "{inner}" & wait'
        process = await ManagedProcess.spawn(sh(script), pty=pty, on_output=output)
        await output.until(lambda o: b"ready" in o.stdout)
        process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(process.wait(), 10)
        assert status == ExitStatus(None, signal.SIGTERM)
        # The grandchild got it too: it printed, and nothing held the output open (wait
        # did not have to give up on it after OUTPUT_GRACE, which it would log).
        assert b"inner-got-term" in output.stdout

    with caplog.at_level(logging.DEBUG, logger="flyvault.server.process"):
        run_async(scenario())
    assert "still held open" not in caplog.text


def test_signals_after_exit_are_harmless() -> None:
    async def scenario() -> None:
        process = await ManagedProcess.spawn(["true"], pty=False, on_output=Output())
        await process.wait()
        process.send_signal(signal.SIGTERM)
        process.kill()
        process.resize(10, 10)
        process.close_stdin()
        process.write_stdin(b"x")
        await process.drain_stdin()

    run_async(scenario())


# ------------------------------------------------------------------ backpressure


@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
def test_pause_output_blocks_the_child_and_resume_continues(pty: bool, tmp_path: Path) -> None:
    counter = tmp_path / "written"
    # The child records how much it managed to write; a blocked write stops the count.
    code = (
        "import os, sys\n"
        f"path = {str(counter)!r}\n"
        "total = 0\n"
        "while True:\n"
        "    total += os.write(1, b'y' * 1024)\n"
        "    with open(path + '.tmp', 'w') as f: f.write(str(total))\n"
        "    os.replace(path + '.tmp', path)\n"
    )

    def written() -> int:
        return int(counter.read_text())

    async def scenario() -> None:
        output = Output()
        process = await ManagedProcess.spawn(py(code), pty=pty, on_output=output)
        await output.until(lambda o: o.total >= 200_000)
        process.pause_output()
        delivered = output.total
        # Not a fixed sleep: on a loaded machine the child may take long to fill the buffer.
        await until(lambda: blocked_writing_stdout(process.pid), "the child never blocked")
        blocked_at = written()
        await asyncio.sleep(0.5)  # it stays blocked: no time for more could be enough
        assert written() == blocked_at, "the child kept writing while output was paused"
        assert output.total == delivered
        # What it wrote beyond what we read is bounded by the kernel buffer.
        assert blocked_at - delivered < 512 * 1024
        process.resume_output()
        await output.until(lambda o: o.total >= blocked_at + 200_000)
        assert written() > blocked_at
        process.kill()
        assert (await process.wait()).signal == signal.SIGKILL

    run_async(scenario())


@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
def test_wait_does_not_return_while_paused_output_is_unread(pty: bool) -> None:
    # The whole output sits in the kernel buffer when the child exits: the exact situation
    # in which the original lost its tail (it stopped reading on exit). A PTY buffers less
    # than a pipe (about 17 KB here), so the PTY case writes less.
    size = 8000 if pty else 20000

    async def scenario() -> None:
        output = Output()
        process = await ManagedProcess.spawn(
            ["head", "-c", str(size), "/dev/zero"], pty=pty, on_output=output
        )
        process.pause_output()
        await asyncio.sleep(OUTPUT_GRACE + 0.5)  # the grace does not run while paused
        assert process.status is None
        process.resume_output()
        status = await asyncio.wait_for(process.wait(), 30)
        assert status.exit_status == 0
        assert output.stdout == bytes(size)

    run_async(scenario())


# ------------------------------------------------------------------ grandchildren


@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
def test_grandchild_holding_the_output_does_not_hang_wait(
    pty: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The background sleep ignores SIGHUP (sent to the PTY's group when the shell exits),
    # so it outlives the shell and keeps the output open. The shell waits until the trap
    # is in place, or a fast exit could kill the sleep first and prove nothing.
    flag = tmp_path / "trap-set"
    script = (
        f"(trap '' HUP; touch {flag}; exec sleep 30) & "
        f"while [ ! -e {flag} ]; do sleep 0.01; done; echo started; exit 7"
    )

    async def scenario() -> float:
        output = Output()
        process = await ManagedProcess.spawn(sh(script), pty=pty, on_output=output)
        await output.until(lambda o: b"started" in o.stdout)
        started = time.monotonic()
        status = await asyncio.wait_for(process.wait(), 20)  # well before the sleep ends
        elapsed = time.monotonic() - started
        process.kill()  # the group still has the sleep in it
        assert status == ExitStatus(7, None)
        assert output.stdout.strip() == b"started"
        return elapsed

    with caplog.at_level(logging.DEBUG, logger="flyvault.server.process"):
        elapsed = run_async(scenario())
    # It waited for the grace (the log says it gave up on the output then), and not for the
    # sleep: a hang would have hit the wait_for. No upper bound on a loaded machine's delay.
    assert elapsed > OUTPUT_GRACE - 0.2
    assert "still held open" in caplog.text


def test_output_written_by_a_grandchild_after_exit_is_still_collected() -> None:
    # The grandchild writes once the shell is gone (reaped), well within the grace: its
    # output is not cut off. ($$ is the shell's pid, also in the subshell; bounded wait.)
    script = (
        "(i=0; while kill -0 $$ 2>/dev/null && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1));"
        " done; echo late) & echo early"
    )
    status, output = run_async(run(sh(script)))
    assert status.exit_status == 0
    assert output.stdout == b"early\nlate\n"


# ------------------------------------------------------------------ spawn errors


def test_missing_program_raises_spawn_error() -> None:
    with pytest.raises(SpawnError) as caught:
        run_async(run(["no-such-program-xyz", "arg"]))
    assert caught.value.message == ("cannot run 'no-such-program-xyz': No such file or directory")
    assert caught.value.exit_code == 127


def test_missing_program_under_a_pty_raises_spawn_error() -> None:
    with pytest.raises(SpawnError, match="no-such-program-xyz"):
        run_async(run(["no-such-program-xyz"], pty=True))


def test_non_executable_file_is_126(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(SpawnError, match="Permission denied") as caught:
        run_async(run([str(script)]))
    assert caught.value.exit_code == 126


def test_missing_cwd_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone")
    with pytest.raises(SpawnError, match="cannot change directory") as caught:
        run_async(run(["true"], cwd=missing))
    assert missing in caught.value.message


def test_empty_command_and_bad_window_size() -> None:
    with pytest.raises(SpawnError):
        run_async(run([]))
    with pytest.raises(ValueError):
        run_async(run(["true"], pty=True, rows=70000))


# ------------------------------------------------------------------ fd hygiene


def test_no_fd_leaks_over_many_spawns(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int]:
        before = open_fds()
        for index in range(50):
            pty = index % 2 == 1
            status, output = await run(sh("echo out; echo err >&2"), pty=pty)
            assert status.exit_status == 0
            assert b"out" in output.stdout
        # Failure paths close their fds too.
        for _ in range(10):
            with pytest.raises(SpawnError):
                await run(["no-such-program-xyz"], pty=True)
            with pytest.raises(SpawnError):
                await run(["true"], cwd=str(tmp_path / "gone"))
        # A killed process with pending stdin and paused output.
        process = await ManagedProcess.spawn(["sleep", "30"], pty=False, on_output=Output())
        process.write_stdin(b"x" * 500_000)
        process.kill()
        await process.wait()
        return before, open_fds()

    before, after = run_async(scenario())
    assert after - before == set()


def test_pty_child_that_closes_its_tty_before_exit_keeps_its_status() -> None:
    """``cat`` after ^D closes its terminal then exits 0; closing the master on that EOF
    would hang the terminal up and turn the 0 into SIGHUP (129). Repeated: it is a race."""

    async def scenario() -> list[int]:
        statuses = []
        for _ in range(15):  # bounded
            output = Output()
            process = await ManagedProcess.spawn(["cat"], pty=True, on_output=output)
            process.write_stdin(b"x\n")
            await output.until(lambda o: b"x\r\n" in o.stdout)
            process.close_stdin()
            statuses.append((await asyncio.wait_for(process.wait(), 10)).exit_status)
        return statuses

    assert asyncio.run(scenario()) == [0] * 15
