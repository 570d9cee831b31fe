"""Spawning and supervising one command: pipes or a PTY, output, stdin, signals, exit.

A ``ManagedProcess`` owns every fd it opens and closes each exactly once, on every path.
Output is read non-blocking with ``loop.add_reader`` and handed to ``on_output(channel,
data)`` in chunks of at most ``READ_CHUNK`` bytes. ``wait()`` returns only when the process
has exited AND every byte it wrote has been delivered: the PTY master is read until EIO and
pipes until EOF (the original cancelled its reader on exit and lost the tail, flaw 19).

Reaping uses asyncio's child watcher, which waits for our own pid only; nothing here ever
calls ``waitpid(-1)``, which would steal other children's statuses (§1.8). A command started
through an ``Entry`` (inside the workload, ``WorkloadRuntime.entry``) is a plain
``subprocess.Popen`` child watched through a pidfd, reaping its own pid only as well.

Every child runs in its own session (``start_new_session``), so its pid is also its process
group id and ``send_signal``/``kill`` reach the whole group, grandchildren included.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import struct
import subprocess
import termios
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from flyvault.errors import SpawnError, shell_status, spawn_error
from flyvault.protocol.codec import quoted

from .accounts import Account
from .outputlog import STDERR, STDOUT

log = logging.getLogger("flyvault.server.process")

#: Largest chunk handed to ``on_output``.
READ_CHUNK = 64 * 1024
#: ``drain_stdin`` waits while more than this is queued for the child.
STDIN_HIGH_WATER = 256 * 1024
#: Hard bound of the stdin queue: a caller that never drains is a bug, not a slow child.
STDIN_LIMIT = 4 * 1024 * 1024
#: How long output may stay open after the process exited (a background grandchild holding
#: the PTY or a pipe) before we stop waiting for EOF.
OUTPUT_GRACE = 2.0
#: After the grace, what is already buffered is still read, up to this much per fd.
FINAL_DRAIN_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How the process ended: ``code`` for a normal exit, else the ``signal`` that killed it."""

    code: int | None
    signal: int | None

    @property
    def exit_status(self) -> int:
        """The shell convention: the code, or 128 + the signal number."""
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 255

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        # asyncio reports death by signal N as -N.
        if returncode < 0:
            return cls(None, -returncode)
        return cls(returncode, None)


class Entry(Protocol):
    """Starts a command somewhere else than here (``WorkloadRuntime.entry``): inside the
    workload's namespaces, with no process in between."""

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        env: Mapping[str, str],
        preexec: Callable[[], None] | None = None,
    ) -> subprocess.Popen[bytes]: ...


class _Child(Protocol):
    pid: int

    async def wait(self) -> int: ...


class _WatchedPopen:
    """A ``subprocess.Popen`` child watched through a pidfd: ``wait()`` like asyncio's.

    Reaps its own pid only (``Popen.poll``), once the pidfd says it has exited.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.pid = popen.pid
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = self._loop.create_future()
        self._pidfd = os.pidfd_open(popen.pid)
        self._loop.add_reader(self._pidfd, self._check)
        self._check()

    def _check(self) -> None:
        code = self._popen.poll()
        if code is None or self._done.done():
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._done.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise ValueError(f"window size {rows}x{cols} is out of range 0-65535")
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_controlling_terminal() -> None:  # pragma: no cover - runs in the child
    # Runs after setsid() and after the slave was dup'ed onto 0/1/2. Kept to one syscall:
    # code between fork and exec must not touch locks another thread might hold.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _credentials(account: Account | None) -> dict[str, Any]:
    """Popen's arguments to become ``account`` (applied after the chdir, before exec)."""
    if account is None:
        return {}
    return {
        "user": account.uid,
        "group": account.gid,
        "extra_groups": list(account.groups or (account.gid,)),
    }


def _spawn_error(command: Sequence[str], cwd: str | None, exc: OSError) -> SpawnError:
    reason = exc.strerror or str(exc)
    # subprocess names the cwd as the failing filename when chdir failed.
    if cwd is not None and exc.filename == cwd:
        message = (
            f"cannot run {quoted(command[0])}: cannot change directory to {quoted(cwd)}: {reason}"
        )
    else:
        message = f"cannot run {quoted(command[0])}: {reason}"
    return spawn_error(message, shell_status(exc))


class ManagedProcess:
    """One running command. Create with ``await ManagedProcess.spawn(...)``."""

    pid: int
    pty: bool

    def __init__(
        self,
        process: _Child,
        *,
        pty: bool,
        on_output: Callable[[int, bytes], None],
        stdin_fd: int,
        outputs: dict[int, int],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._process = process
        self.pid = process.pid
        self.pty = pty
        self._on_output = on_output
        # Every fd we still own; closed exactly once by _close.
        self._owned = {stdin_fd, *outputs}
        self._outputs = dict(outputs)  # open output fd -> channel
        self._stdin_fd: int | None = stdin_fd  # the PTY master in PTY mode
        self._stdin_queue = bytearray()
        self._stdin_eof = False
        self._writer_registered = False
        self._last_stdin_byte = b"\n"
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._paused = False
        self._group_gone = False
        # Set whenever something _supervise waits on changes (fd closed, pause, resume).
        self._changed = asyncio.Event()
        self._status: ExitStatus | None = None
        for fd in self._outputs:
            self._loop.add_reader(fd, self._on_readable, fd)
        self._task = self._loop.create_task(self._supervise(), name=f"process-{self.pid}")

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        pty: bool,
        on_output: Callable[[int, bytes], None],
        term: str = "",
        rows: int = 0,
        cols: int = 0,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
        openpty: Callable[[], tuple[int, int]] | None = None,
        entry: Entry | None = None,
        account: Account | None = None,
    ) -> ManagedProcess:
        """Start ``wrapper + argv``, or ``argv`` through ``entry`` (inside the workload).

        ``openpty`` allocates the PTY pair; the workload runtime passes one that takes it
        from the workload's own ``/dev/pts`` so ``tty`` and ``sudo`` work inside. With an
        ``entry``, ``cwd`` is ignored (the entry has its own, inside the workload).

        ``env`` replaces the environment entirely (subprocess semantics); None inherits
        ours. ``term``, when given, sets TERM on top of either. ``rows``/``cols`` are the
        initial window size of the PTY (0x0 means unknown, as the kernel defaults to).
        In pipe mode stdout is channel 1 and stderr channel 2; a PTY merges both into 1.
        ``account`` (without ``entry``: host mode): the child takes its groups, gid and uid
        before exec (an entry switches inside the workload itself).
        """
        if not argv:
            raise SpawnError("cannot run an empty command")
        command = [*wrapper, *argv]
        child_env = None if env is None else dict(env)
        if term:
            child_env = dict(os.environ) if child_env is None else child_env
            child_env["TERM"] = term
        owned: list[int] = []  # closed on any failure below
        try:
            if pty:
                master, slave = (openpty or os.openpty)()  # non-inheritable (PEP 446)
                owned += [master, slave]
                # Before the child starts, so its very first `stty size` is right.
                _set_winsize(master, rows, cols)
                os.set_blocking(master, False)
                child_fds, parent_stdin, outputs = (slave, slave, slave), master, {master: STDOUT}
                preexec: Callable[[], None] | None = _take_controlling_terminal
            else:
                pipes = []
                for _ in range(3):
                    pipes.append(os.pipe())  # non-inheritable; the child gets dup2'ed copies
                    owned += pipes[-1]
                (stdin_r, stdin_w), (stdout_r, stdout_w), (stderr_r, stderr_w) = pipes
                for fd in (stdin_w, stdout_r, stderr_r):
                    os.set_blocking(fd, False)
                child_fds = (stdin_r, stdout_w, stderr_w)
                parent_stdin, outputs = stdin_w, {stdout_r: STDOUT, stderr_r: STDERR}
                preexec = None
            process: _Child
            try:
                if entry is not None:
                    popen = entry.popen(
                        command,
                        stdin=child_fds[0],
                        stdout=child_fds[1],
                        stderr=child_fds[2],
                        env=child_env if child_env is not None else os.environ,
                        preexec=preexec,
                    )
                    process = _WatchedPopen(popen)
                else:
                    process = await asyncio.create_subprocess_exec(
                        *command,
                        stdin=child_fds[0],
                        stdout=child_fds[1],
                        stderr=child_fds[2],
                        cwd=cwd,
                        env=child_env,
                        start_new_session=True,
                        preexec_fn=preexec,
                        **_credentials(account),
                    )
            except OSError as exc:
                raise _spawn_error(command, cwd, exc) from None
            except subprocess.SubprocessError as exc:  # the preexec hook failed
                raise SpawnError(f"cannot run {quoted(command[0])}: {exc}") from None
            # The child has its copies; ours must go or EOF/EIO would never come.
            for fd in set(child_fds):
                owned.remove(fd)
                os.close(fd)
            managed = cls(
                process, pty=pty, on_output=on_output, stdin_fd=parent_stdin, outputs=outputs
            )
        except BaseException:
            for fd in owned:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        # Only the program: arguments may carry secrets (the original logged them, flaw 4).
        log.debug("spawned pid %d (%s): %s", managed.pid, "pty" if pty else "pipes", command[0])
        return managed

    def _on_readable(self, fd: int) -> None:
        channel = self._outputs.get(fd)
        if channel is None:
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO on a PTY master means every slave fd is closed: that is the PTY's EOF.
            if exc.errno != errno.EIO:
                log.debug("pid %d: reading output failed: %s", self.pid, exc)
            self._end_output(fd)
            return
        if not data:
            self._end_output(fd)
            return
        self._deliver(channel, data)

    def _end_output(self, fd: int) -> None:
        """Stop reading ``fd`` but keep it open until the child has been reaped.

        Closing a PTY master hangs up the terminal: a child that closed its tty just before
        exiting (``cat`` after ^D does) would die of SIGHUP and report 129 instead of its
        own status. The fds are closed in ``_supervise`` once the child is gone.
        """
        if self._outputs.pop(fd, None) is not None:
            self._loop.remove_reader(fd)
        self._changed.set()

    def _deliver(self, channel: int, data: bytes) -> None:
        try:
            self._on_output(channel, data)
        except Exception:
            # A broken consumer must not stop the reader (the child would block forever).
            log.exception("pid %d: output callback failed", self.pid)

    def pause_output(self) -> None:
        """Stop reading output; the child blocks once the pipe or PTY buffer is full."""
        if self._paused:
            return
        self._paused = True
        for fd in self._outputs:
            self._loop.remove_reader(fd)
        self._changed.set()

    def resume_output(self) -> None:
        if not self._paused:
            return
        self._paused = False
        for fd in self._outputs:
            self._loop.add_reader(fd, self._on_readable, fd)
        self._changed.set()

    def write_stdin(self, data: bytes) -> None:
        """Queue ``data`` for the child without blocking; await ``drain_stdin`` after it.

        Ignored after ``close_stdin`` or once the child's stdin is gone (the child exited or
        closed it): input nobody can read is dropped, like a write to a closed terminal.
        Raises BufferError past ``STDIN_LIMIT`` queued bytes (a caller that never drains).
        """
        if not data or self._stdin_eof or self._stdin_fd is None:
            return
        if len(self._stdin_queue) + len(data) > STDIN_LIMIT:
            raise BufferError(f"more than {STDIN_LIMIT} bytes queued for pid {self.pid}")
        self._stdin_queue += data
        self._last_stdin_byte = bytes(data[-1:])
        self._flush_stdin()

    async def drain_stdin(self) -> None:
        """Wait while more than ``STDIN_HIGH_WATER`` bytes are queued (backpressure)."""
        while len(self._stdin_queue) > STDIN_HIGH_WATER and self._stdin_fd is not None:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def close_stdin(self) -> None:
        """Signal end of input, after whatever is still queued.

        Pipes: the child's stdin is closed, so ``cat`` sees EOF. PTY: there is nothing to
        close (the master is also the output), so the terminal's EOF character (VEOF,
        usually ^D) is written instead. In canonical mode VEOF only means EOF at the start
        of a line, so when the last byte sent was not a line end, VEOF is sent twice: the
        first pushes out the partial line, the second is the EOF. A program that put the
        terminal in raw mode just reads the ^D byte(s), as if a user had typed them.
        """
        if self._stdin_eof:
            return
        self._stdin_eof = True
        if self._stdin_fd is None:
            return
        if self.pty:
            try:
                eof = termios.tcgetattr(self._stdin_fd)[6][termios.VEOF]
            except termios.error:
                eof = b"\x04"
            if isinstance(eof, int):  # tcgetattr gives ints for some cc slots
                eof = bytes([eof])
            if eof == b"\x00":  # _POSIX_VDISABLE: the terminal has no EOF character
                return
            self._stdin_queue += eof if self._last_stdin_byte in (b"\n", b"\r") else eof * 2
        self._flush_stdin()

    def _flush_stdin(self) -> None:
        fd = self._stdin_fd
        if fd is None:
            return
        try:
            while self._stdin_queue:
                written = os.write(fd, self._stdin_queue[:READ_CHUNK])
                del self._stdin_queue[:written]
        except BlockingIOError:
            pass
        except OSError as exc:
            # EPIPE: the child closed its stdin; EIO: the PTY slave is gone. Drop the input.
            log.debug("pid %d: writing stdin failed: %s", self.pid, exc)
            self._stdin_queue.clear()
            if self.pty:
                self._stdin_eof = True  # reading the master will see EIO and close it
            else:
                self._close(fd)
                return
        if self._stdin_queue and not self._writer_registered:
            self._loop.add_writer(fd, self._flush_stdin)
            self._writer_registered = True
        elif not self._stdin_queue and self._writer_registered:
            self._loop.remove_writer(fd)
            self._writer_registered = False
        if not self._stdin_queue and self._stdin_eof and not self.pty:
            self._close(fd)
        if len(self._stdin_queue) <= STDIN_HIGH_WATER:
            self._wake_drainers()

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def resize(self, rows: int, cols: int) -> None:
        """Set the PTY's window size; the kernel sends SIGWINCH to its foreground group."""
        if self.pty and self._stdin_fd is not None:
            _set_winsize(self._stdin_fd, rows, cols)

    def send_signal(self, signo: int) -> None:
        """Signal the child's whole process group (it leads its own session).

        This still works after the child was reaped while grandchildren remain in the group
        (Linux keeps a pid number allocated while it names a group). Once the group is found
        empty we never signal that number again: it may be reused by an unrelated process.
        """
        if self._group_gone:
            return
        try:
            os.killpg(self.pid, signo)
        except ProcessLookupError:
            self._group_gone = self._status is not None

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    @property
    def status(self) -> ExitStatus | None:
        """The exit status once ``wait()`` would return it, else None."""
        return self._status

    async def wait(self) -> ExitStatus:
        """The exit status, once the process exited and all its output was delivered.

        While output is paused the remaining output is not read, so this does not return
        until ``resume_output``. If something else (a background grandchild) keeps the
        output open after the process exited, output is read for ``OUTPUT_GRACE`` more
        seconds, then what is already buffered is drained and the fds are closed.
        """
        return await asyncio.shield(self._task)

    async def _supervise(self) -> ExitStatus:
        try:
            status = ExitStatus.from_returncode(await self._process.wait())
            deadline: float | None = None
            while self._outputs:
                self._changed.clear()
                if self._paused:
                    # The grace only counts while we are actually reading.
                    deadline = None
                    await self._changed.wait()
                    continue
                now = self._loop.time()
                if deadline is None:
                    deadline = now + OUTPUT_GRACE
                if now >= deadline:
                    log.debug(
                        "pid %d exited but its output is still held open (a background "
                        "process?); stopped waiting for EOF after %.0f s",
                        self.pid,
                        OUTPUT_GRACE,
                    )
                    self._final_drain()
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), deadline - now)
            self._status = status
            return status
        finally:
            # Exited (or the loop is going away): nobody can use stdin or output any more.
            for fd in list(self._owned):
                self._close(fd)

    def _final_drain(self) -> None:
        """Read what is already buffered in each output (bounded), then close it."""
        for fd, channel in list(self._outputs.items()):
            budget = FINAL_DRAIN_LIMIT
            while budget > 0:
                try:
                    data = os.read(fd, min(READ_CHUNK, budget))
                except OSError:  # EAGAIN (nothing buffered), EIO, ...
                    break
                if not data:
                    break
                budget -= len(data)
                self._deliver(channel, data)
            self._close(fd)

    def _close(self, fd: int) -> None:
        if fd not in self._owned:
            return
        self._owned.discard(fd)
        if self._outputs.pop(fd, None) is not None:
            self._loop.remove_reader(fd)
        if fd == self._stdin_fd:
            if self._writer_registered:
                self._loop.remove_writer(fd)
                self._writer_registered = False
            self._stdin_fd = None
            self._stdin_queue.clear()
            self._wake_drainers()
        os.close(fd)
        self._changed.set()
