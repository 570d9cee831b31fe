"""How one command enters the running workload: straight into its namespaces, no process in
between (``WorkloadEntry``), and the ``setns`` it takes to get there.

Split from ``runtime`` (which starts and supervises the workload) because exec sessions and
the file worker enter it the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from flyvault.errors import ProvisionError, SpawnError, shell_status, spawn_error
from flyvault.protocol.codec import quoted

from .accounts import Account, switch_to

log = logging.getLogger("flyvault.server.runtime")

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
#: The namespaces a command joins, in this order (mount last: it changes what paths mean).
_ENTER = (("cgroup", CLONE_NEWCGROUP), ("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS))
NAMESPACES = ("pid", "mnt", "cgroup", "uts", "ipc")
_libc = ctypes.CDLL(None, use_errno=True)
_setns_function = _libc.setns


def setns(fd: int, nstype: int) -> None:
    if _setns_function(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def open_inside(root: int, path: str, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` as the workload would see it: every component, symlinks included, is
    resolved inside the directory ``root`` (an fd), never above it. Raises OSError."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    current = os.dup(root)
    stack: list[int] = []  # directories above ``current``, for ".."
    links = 0
    try:
        while parts:
            part = parts.pop(0)
            if part == "..":
                if stack:
                    os.close(current)
                    current = stack.pop()
                continue
            last = not parts
            try:
                target = os.readlink(part, dir_fd=current)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                target = None
            if target is not None:
                links += 1
                if links > 40:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                if target.startswith("/"):
                    for fd in stack:
                        os.close(fd)
                    stack.clear()
                    os.close(current)
                    current = os.dup(root)
                continue
            mode = flags if last else os.O_RDONLY | os.O_DIRECTORY
            opened = os.open(part, mode | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            stack.append(current)
            current = opened
        result, current = current, -1
        return result
    finally:
        if current >= 0:
            os.close(current)
        for fd in stack:
            os.close(fd)


@contextlib.contextmanager
def _children_born_in(pid_namespace: int) -> Iterator[None]:
    """Processes this thread forks meanwhile are born in ``pid_namespace`` (an fd).

    ``setns(CLONE_NEWPID)`` only changes the calling thread's ``pid_for_children``; it is
    set back to our own (always allowed) before anything else can run on this thread.
    """
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(pid_namespace, CLONE_NEWPID)
        try:
            yield
        finally:
            try:
                setns(own, CLONE_NEWPID)
            except OSError:  # pragma: no cover - the kernel always allows this
                log.critical("cannot leave the workload's PID namespace; exiting")
                os._exit(70)
    finally:
        os.close(own)


class WorkloadEntry:
    """How one command enters the running workload, with no process in between.

    ``popen`` forks the command straight into the workload's PID namespace; the child
    joins the cgroup of the workload's init (so limits and clean-up cover it), then its
    cgroup, IPC, UTS and mount namespaces and its root, becomes ``account`` (when given:
    its groups, gid and uid), changes to ``cwd`` (as that user, so a directory it may not
    enter is refused as for a login) and execs. If ``cwd`` does not exist: with ``strict``
    the command is refused (SpawnError naming it), otherwise it starts in ``/``, as a login
    whose home is missing does.
    """

    def __init__(
        self,
        init_pid: int,
        pidfd: int,
        cgroup_files: Sequence[Path],
        cwd: str | None,
        *,
        strict: bool = True,
        account: Account | None = None,
    ) -> None:
        self.account = account
        self.init_pid = init_pid
        self.pidfd = pidfd
        self.cgroup_files = list(cgroup_files)
        self.cwd = cwd or "/"
        self.strict = strict

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        env: Mapping[str, str],
        preexec: Callable[[], None] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside. Raises SpawnError (bad cwd, no such program) or
        ProvisionError (the workload is gone or stopping)."""
        fds: list[int] = []

        def keep(fd: int) -> int:
            fds.append(fd)
            return fd

        try:
            try:
                namespaces = {
                    kind: keep(
                        os.open(f"/proc/{self.init_pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
                    )
                    for kind in NAMESPACES
                }
                root = keep(
                    os.open(
                        f"/proc/{self.init_pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                    )
                )
                # The pid may have been recycled before the opens: the pidfd cannot be.
                signal.pidfd_send_signal(self.pidfd, 0)
                joins = [
                    keep(os.open(path, os.O_WRONLY | os.O_CLOEXEC)) for path in self.cgroup_files
                ]
            except OSError:
                raise not_running() from None
            error_read, error_write = os.pipe()
            keep(error_read)
            keep(error_write)
            cwd, strict, account = self.cwd, self.strict, self.account

            def fail(message: str, code: int) -> None:  # pragma: no cover - in the child
                os.write(error_write, f"{code} {message}".encode(errors="replace"))
                os._exit(code)

            def enter() -> None:  # pragma: no cover - runs in the child, before exec
                try:
                    score = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
                    os.write(score, b"0")  # init lowers its own; the workload's is the default
                    os.close(score)
                    for fd in joins:
                        os.write(fd, b"0")
                    for kind, flag in _ENTER:
                        setns(namespaces[kind], flag)
                    setns(namespaces["mnt"], CLONE_NEWNS)
                    os.fchdir(root)
                    os.chroot(".")
                except OSError as exc:
                    fail(f"cannot enter the workload: {exc.strerror or exc}", 1)
                if account is not None:
                    try:
                        switch_to(account)
                    except OSError as exc:
                        fail(f"cannot switch to user {account.name!r}: {exc.strerror or exc}", 1)
                try:
                    os.chdir(cwd)
                except OSError as exc:
                    if strict:
                        fail(
                            f"cannot change directory to {quoted(cwd)}: {exc.strerror or exc}",
                            shell_status(exc),
                        )
                    os.chdir("/")
                if preexec is not None:
                    preexec()

            try:
                with _children_born_in(namespaces["pid"]):
                    process = subprocess.Popen(
                        list(argv),
                        stdin=stdin,
                        stdout=stdout,
                        stderr=stderr,
                        env=dict(env),
                        start_new_session=True,
                        preexec_fn=enter,
                    )
            except OSError as exc:
                if exc.errno == errno.ENOMEM:  # fork into a namespace whose init is gone
                    raise not_running() from None
                raise _spawn_error(argv, exc) from None
            except subprocess.SubprocessError as exc:  # the PTY hook failed
                raise SpawnError(f"cannot run {quoted(argv[0])}: {exc}") from None
            os.close(error_write)
            fds.remove(error_write)
            report = b""
            while chunk := os.read(error_read, 4096):
                report += chunk
            if report:
                process.wait()
                code, _, message = report.decode(errors="replace").partition(" ")
                if code in ("126", "127"):
                    raise spawn_error(message, int(code))
                raise SpawnError(message)  # entering or switching failed: ours, not the command's
            return process
        finally:
            for fd in fds:
                os.close(fd)


def not_running() -> ProvisionError:
    return ProvisionError(
        "the vault's workload is not running",
        hint="it restarts by itself; if it keeps failing, reprovision the vault",
    )


def _spawn_error(argv: Sequence[str], exc: OSError) -> SpawnError:
    message = f"cannot run {quoted(argv[0])} in the workload: {exc.strerror or exc}"
    return spawn_error(message, shell_status(exc))
