"""``python -m flyvault.cli.keeperd VAULT SOCKET READY_FD CALLER``: a connection keeper's
process, started by a CLI call or the MCP server (``flyvault.client.keeper_start.spawn``).

What it does first needs only the standard library, so it costs the machine next to
nothing while the call that started it runs: it detaches (its own session, ``/`` as its
directory, none of the caller's descriptors), takes the socket (``listen``) and writes its
pid file. Started in the background (READY_FD ``-``), it then waits for the call that
started it (pid CALLER) to end, for ``CALLER_HEAD_START`` seconds at most, before it
imports QUIC and connects: that work takes no CPU from the first call, which costs what a
direct call costs. A call that connects to the socket meanwhile ends the wait at once (it
is served as soon as the keeper is ready, instead of starting a keeper of its own), and so
do ``fly-vault mux status`` and ``mux stop``, which see the pid file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import socket
import sys
import time

#: The longest a keeper started in the background waits for its caller to end.
CALLER_HEAD_START = 1.0


def detach(keep: int | None) -> None:
    """Nothing of the caller (its terminal, pipes, locks, sockets, working directory) is
    held by the keeper, which may outlive it by minutes."""
    with contextlib.suppress(OSError):  # EPERM only if already a group leader
        os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    for fd in _open_fds():
        if fd > 2 and fd != keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 256))


def listen(socket_path: str) -> socket.socket | None:
    """Bind the keeper's socket (0600) and write the pid file, replacing a stale socket;
    None if a live keeper has it. A lock file makes this check-and-bind atomic between
    keepers starting at once."""
    stem = socket_path[: -len(".sock")]
    lock = os.open(f"{socket_path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)
        try:
            listener.bind(socket_path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            # Imported here: a first start (no socket yet) stays on the standard library.
            from flyvault.client.keeper_start import alive

            if alive(socket_path):
                listener.close()
                return None
            os.unlink(socket_path)  # stale: its keeper died without cleaning up
            listener.bind(socket_path)
        finally:
            os.umask(previous)
        os.chmod(socket_path, 0o600)
        listener.listen(64)
        _write_pid_file(f"{stem}.pid")
        return listener
    finally:
        os.close(lock)


def _write_pid_file(path: str) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps({"pid": os.getpid(), "started_at": time.time()}))
    os.replace(tmp, path)


def after_caller(pid: int, listener: socket.socket, limit: float) -> None:
    """Return once process ``pid`` has ended, a connection waits on ``listener``, or after
    ``limit`` seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # already gone, or no pidfd: wait for a caller only
        pidfd = None
    try:
        select.select([listener] + ([pidfd] if pidfd is not None else []), [], [], limit)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        sys.exit("usage: python -m flyvault.cli.keeperd VAULT SOCKET READY_FD CALLER_PID")
    name, socket_path, ready, caller = argv
    ready_fd = None if ready == "-" else int(ready)
    try:
        detach(ready_fd)
        listener = listen(socket_path)
    except BaseException as exc:
        answer(ready_fd, f"{exc}".encode()[:4000] or b"failed")
        os._exit(1)
    if listener is None:  # another keeper has the socket: the caller uses that one
        answer(ready_fd, b"ok")
        os._exit(0)
    if ready_fd is None:
        after_caller(int(caller), listener, CALLER_HEAD_START)
    from flyvault.cli.mux import keeper_process

    keeper_process(name, socket_path, ready_fd, listener)


def answer(ready_fd: int | None, message: bytes) -> None:
    """Tell the caller waiting on ``ready_fd`` (``FLY_VAULT_MUX=wait``), if any."""
    if ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, message)


if __name__ == "__main__":
    main(sys.argv[1:])
