"""The connection keeper from the command line: use one, start one, ``fly-vault mux``.

``exec``, ``list-exec`` and ``kill`` go through the vault's keeper when one may be used
(``use_keeper``): the first call starts it, later calls reuse its connection. Whatever goes
wrong before the keeper accepted a request (none could be started, the directory is unsafe,
the socket is stale) falls back to a direct connection, so the keeper can only make a
call faster, never make it fail. This module is light: the thin path imports no asyncio,
QUIC or crypto (``tests/test_keeper.py`` checks).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flyvault.cli.console import Console
from flyvault.cli.output import report_error
from flyvault.cli.terminal import RawTerminal, terminal_size
from flyvault.client.mux import (
    STDIN_IN_FLIGHT,
    KeeperLink,
    KeeperNotice,
    KeeperOutput,
    KeeperPaths,
    KeeperProgress,
    KeeperRaw,
    KeeperStdinTaken,
    KeeperUnavailable,
    call,
    keeper_key,
    keeper_lost,
    keeper_paths,
    keepers,
    next_event,
    resize_frame,
    runtime_dir,
    stdin_eof_frame,
    stdin_frame,
)
from flyvault.defaults import RECONNECT_TIMEOUT
from flyvault.envvars import env_flag, env_float
from flyvault.errors import ConfigError, UsageError, VaultError

log = logging.getLogger("flyvault.mux")

#: How long a keeper waits, with no request in progress, before it exits.
IDLE_DEFAULT = 600.0
#: How long a CLI call waits for a keeper it started to listen.
START_TIMEOUT = 10.0
#: Set by ``entry()``: this process is the ``fly-vault`` CLI's own, so it may fork the
#: keeper off itself (no interpreter start, nothing imported twice). Elsewhere (tests that
#: call ``main()``, a host program) the keeper starts as a fresh process instead.
FORK_ALLOWED = False
_NOT_USED = object()


def use_keeper(args: argparse.Namespace) -> bool:
    """Whether this call may go through a keeper. Not with ``--no-mux`` or
    ``FLY_VAULT_MUX=0`` (the config's ``mux = false`` is read when one is started), not
    with ``-v``/``--log-file`` (they show the connection's own steps), not with a
    non-default ``--reconnect-timeout`` (the keeper's connection has its own budget), and
    only where ``SO_PEERCRED`` exists (Linux)."""
    return keeper_off_reason(args) is None


def keeper_off_reason(args: argparse.Namespace) -> str | None:
    """Why this call may not go through a keeper (see ``use_keeper``), or None when it may.
    A bad ``FLY_VAULT_MUX`` is a ``UsageError``."""
    if getattr(args, "no_mux", False):
        return "--no-mux"
    if not sys.platform.startswith("linux"):
        return "not on Linux (no SO_PEERCRED)"
    value = os.environ.get("FLY_VAULT_MUX", "").strip()
    if value and not env_flag("FLY_VAULT_MUX"):
        return f"FLY_VAULT_MUX={value}"
    if args.verbose or args.log_file:
        return "-v/--log-file"
    if getattr(args, "reconnect_timeout", RECONNECT_TIMEOUT) != RECONNECT_TIMEOUT:
        return "--reconnect-timeout"
    return None


def _locate(vault_name: str) -> KeeperPaths | None:
    try:
        return locate(vault_name)
    except (OSError, ConfigError) as exc:  # the direct path reports a config problem itself
        log.info("no connection keeper: %s", exc)
        return None


def locate(vault_name: str, *, create: bool = True) -> KeeperPaths:
    """Where the keeper for ``vault_name`` (as the config reads now) listens, whether or not
    one does. ``OSError`` (``FileNotFoundError`` for a missing directory when ``create`` is
    false) or ``ConfigError`` when no keeper can be there."""
    from flyvault.paths import config_file

    path = config_file()
    data = path.read_bytes()
    directory = runtime_dir(create=create)
    return keeper_paths(directory, vault_name, keeper_key(vault_name, path, data))


def open_link(args: argparse.Namespace, op: str, **fields: Any) -> KeeperLink | None:
    """A request accepted by the vault's keeper (started if needed), or None: go direct."""
    if not use_keeper(args):
        return None
    paths = _locate(args.vault)
    if paths is None:
        return None
    try:
        return KeeperLink.open(paths.socket, op, **fields)
    except KeeperUnavailable as exc:
        log.info("%s", exc)
    if not _start(paths, args.vault):
        return None
    try:
        return KeeperLink.open(paths.socket, op, **fields)
    except KeeperUnavailable as exc:
        log.info("%s; connecting directly", exc)
        return None


def keeper_socket(args: argparse.Namespace, vault_name: str) -> Path | None:
    """The socket of ``vault_name``'s keeper (started if needed) for a client that opens
    streams through it (``cp``, ``forward``), or None: connect directly."""
    if not use_keeper(args):
        return None
    paths = _locate(vault_name)
    if paths is None:
        return None
    if _alive(paths.socket) or _start(paths, vault_name):
        return paths.socket
    return None


def call_through_keeper(args: argparse.Namespace, op: str, **fields: Any) -> Any:
    """The request's value, or ``NOT_USED`` when it must go direct."""
    link = open_link(args, op, **fields)
    if link is None:
        return _NOT_USED
    try:
        return link.result(Console().notice)
    except OSError:
        raise keeper_lost() from None
    finally:
        link.close()


def not_used(value: Any) -> bool:
    return value is _NOT_USED


# Starting a keeper ---------------------------------------------------------------------------


def _start(paths: KeeperPaths, vault_name: str) -> bool:
    """Start the keeper for ``paths``; False (with the reason logged) when none may run.

    The keeper is a fresh ``python -m flyvault.cli.mux`` process (so ``ps`` shows what it
    is, not the command that started it). It validates the config itself: this process
    stays thin, and the keeper's start overlaps nothing it would not have done anyway. A
    config error it finds is raised here (exit 3), as the direct path would.
    """
    read_fd, write_fd = os.pipe()
    try:
        _exec_keeper(paths, vault_name, write_fd)
    finally:
        os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], START_TIMEOUT)
        answer = os.read(read_fd, 8192) if ready else b"no answer in time"
    finally:
        os.close(read_fd)
    if answer == b"ok":
        return True
    if answer.startswith(b"error:"):
        detail = json.loads(answer[len(b"error:") :])
        code = int(detail.get("exit_code") or 1)
        # A bad variable is a usage error (exit 2, before any connection) wherever found.
        kind = UsageError if code == 2 else VaultError
        error = kind(detail["message"], hint=detail.get("hint"))
        error.exit_code = code
        raise error
    log.info("the connection keeper did not start: %s", answer.decode(errors="replace"))
    return False


def _exec_keeper(paths: KeeperPaths, vault_name: str, write_fd: int) -> None:
    import subprocess

    subprocess.Popen(
        [sys.executable, "-m", "flyvault.cli.mux", vault_name, str(paths.socket), str(write_fd)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(write_fd,),
        start_new_session=True,
    )


def _become_keeper(paths: KeeperPaths, config: Any, idle: float, ready_fd: int) -> None:
    """In the keeper's own process: listen, say so on ``ready_fd``, serve, exit."""
    try:
        log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        for fd in _open_fds():  # nothing of the CLI's caller (pipes, sockets) stays open
            if fd > 2 and fd != ready_fd:
                with contextlib.suppress(OSError):
                    os.close(fd)
        listener = _listen(paths)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(ready_fd, f"{exc}".encode()[:4000] or b"failed")
        os._exit(1)
    if listener is None:  # another keeper took the socket first: use that one
        os.write(ready_fd, b"ok")
        os._exit(0)
    os.write(ready_fd, b"ok")
    os.close(ready_fd)
    os._exit(_serve(paths, config, idle, listener))


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 256))


def _listen(paths: KeeperPaths) -> socket.socket | None:
    """Bind the keeper's socket (0600), replacing a stale one; None if a live keeper has it.
    A lock file makes this check-and-bind atomic between keepers starting at once."""
    lock = os.open(f"{paths.socket}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)
        try:
            listener.bind(str(paths.socket))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if _alive(paths.socket):
                listener.close()
                return None
            paths.socket.unlink()  # stale: its keeper died without cleaning up
            listener.bind(str(paths.socket))
        finally:
            os.umask(previous)
        os.chmod(paths.socket, 0o600)
        listener.listen(64)
        tmp = paths.pid.with_suffix(".pid.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "started_at": time.time()}))
        tmp.chmod(0o600)
        tmp.replace(paths.pid)
        return listener
    finally:
        os.close(lock)


def _alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _serve(paths: KeeperPaths, config: Any, idle: float, listener: socket.socket) -> int:
    import asyncio

    from flyvault.cli.output import configure_logging
    from flyvault.client.keeper import Keeper

    logging.getLogger("flyvault").handlers.clear()
    configure_logging(None, verbose=True)  # INFO to stderr, which is the keeper's log
    try:
        keeper = Keeper(config, listener, idle_seconds=idle, paths=(paths.socket, paths.pid))
        asyncio.run(keeper.serve())
        return 0
    except BaseException:
        log.exception("the connection keeper failed")
        for path in (paths.socket, paths.pid):
            with contextlib.suppress(OSError):
                path.unlink()
        return 1


def _keeper_process(argv: list[str]) -> None:
    """``python -m flyvault.cli.mux VAULT SOCKET READY_FD`` (started by ``_start``): check
    the config and the switches, answer on READY_FD (``ok``, ``off``, ``changed`` or
    ``error:`` with the error as JSON), then serve."""
    from flyvault.redact import ScrubbingStream

    name, socket_path, ready = argv
    ready_fd = int(ready)
    sys.stdout, sys.stderr = ScrubbingStream(sys.stdout), ScrubbingStream(sys.stderr)  # type: ignore[assignment]
    paths = KeeperPaths(
        Path(socket_path), Path(socket_path[:-5] + ".pid"), Path(socket_path[:-5] + ".log")
    )
    try:
        config, idle = _keeper_config(name, paths)
    except VaultError as exc:
        detail = {"message": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}
        os.write(ready_fd, b"error:" + json.dumps(detail).encode()[:8000])
        os._exit(1)
    if config is None:
        os.write(ready_fd, b"off")
        os._exit(0)
    _become_keeper(paths, config, idle, ready_fd)


def _keeper_config(name: str, paths: KeeperPaths) -> tuple[Any, float]:
    """The vault's validated config and the idle time; (None, 0) when this keeper must not
    run: ``mux = false``, or the config changed since the CLI named the keeper after it."""
    from flyvault.config import load_vault

    config = load_vault(name)
    if not config.mux:
        return None, 0.0
    if _locate(name) != paths:  # edited in between: the name would not match the content
        return None, 0.0
    idle = env_float("FLY_VAULT_MUX_IDLE", float(config.mux_idle), above=0, unit="seconds")
    return config, idle


# exec through a keeper -----------------------------------------------------------------------


def exec_through_keeper(args: argparse.Namespace, request: Any, forward_stdin: bool) -> int | None:
    """Run the exec request through the keeper; its exit status, or None: go direct."""
    from flyvault.cli.terminal import isatty

    interactive = request.pty and isatty(0)
    link = open_link(
        args,
        "exec",
        request=request.to_fields(),
        forward_stdin=forward_stdin,
        interactive=interactive,
    )
    if link is None:
        return None
    try:
        return _ThinSession(link, request, interactive, forward_stdin).run()
    finally:
        link.close()


class _ThinSession:
    """The CLI's end of an exec served by the keeper: the terminal and the byte pumps."""

    def __init__(self, link: KeeperLink, request: Any, interactive: bool, forward_stdin: bool):
        from flyvault.cli.progress import ProgressLine

        self.link = link
        self.request = request
        self.interactive = interactive
        self.forward_stdin = forward_stdin
        self.console = Console()
        self.progress = ProgressLine()
        self.raw: RawTerminal | None = None
        #: Frames for the keeper, sent in order by one thread.
        self.outbox: queue.Queue[bytes | None] = queue.Queue()
        #: Stdin chunks sent and not yet handed on by the keeper (STDIN_TAKEN frees one).
        self.in_flight = threading.Semaphore(STDIN_IN_FLIGHT)
        self._winch: Any = None
        self.broken: set[int] = set()

    def run(self) -> int:
        threading.Thread(target=self._send_loop, name="keeper-send", daemon=True).start()
        if self.forward_stdin and not self.interactive:
            self._start_stdin()
        try:
            return self._receive_loop()
        finally:
            self._leave_raw()
            self.progress.close()

    def _receive_loop(self) -> int:
        while True:
            try:
                event = next_event(self.link)
            except VaultError as exc:
                return self._fail(exc)
            if event is None:
                return self._fail(_with_session_hint(keeper_lost(), self.request))
            if isinstance(event, KeeperOutput):
                self._write(event.fd, event.data)
            elif isinstance(event, KeeperNotice):
                self.progress.close()
                self.console.notice(event.message)
            elif isinstance(event, KeeperProgress):
                self.progress(event.phase, event.done, event.total)
            elif isinstance(event, KeeperRaw):
                self._raw(event.on)
            elif isinstance(event, KeeperStdinTaken):
                self.in_flight.release()
            else:
                return int(event.value)

    def _fail(self, error: VaultError) -> int:
        from flyvault.client.exec_request import CLIENT_FAILURE

        self._leave_raw()
        self.progress.close()
        report_error(error)
        return CLIENT_FAILURE

    def _write(self, fd: int, data: bytes) -> None:
        if fd in self.broken:  # a closed pipe: drop the rest, as the direct path does
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            self.broken.add(fd)

    def _raw(self, on: bool) -> None:
        if on and self.raw is None and self.interactive:
            self.progress.close()
            self.raw = RawTerminal()
            self.raw.__enter__()
            self.console.raw = True
            self._winch = signal.signal(signal.SIGWINCH, self._resized)
            # A resize while connecting came before the handler: catch it up now.
            if terminal_size() != (self.request.rows, self.request.cols):
                self._resized(signal.SIGWINCH, None)
            if self.forward_stdin:
                self._start_stdin()
        elif not on:
            self._leave_raw()

    def _leave_raw(self) -> None:
        if self.raw is not None:
            raw, self.raw = self.raw, None
            raw.__exit__(None, None, None)
            self.console.raw = False
            if self._winch is not None:
                signal.signal(signal.SIGWINCH, self._winch)
                self._winch = None

    def _resized(self, signo: int, frame: Any) -> None:
        rows, cols = terminal_size()
        self.outbox.put(resize_frame(rows, cols))

    def _start_stdin(self) -> None:
        threading.Thread(target=self._read_stdin, name="stdin", daemon=True).start()

    def _read_stdin(self) -> None:
        while True:
            self.in_flight.acquire()  # released when the keeper says it handed one on
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            if not data:
                self.outbox.put(stdin_eof_frame())
                return
            self.outbox.put(stdin_frame(data))

    def _send_loop(self) -> None:
        while (frame := self.outbox.get()) is not None:
            try:
                self.link.send(frame)
            except OSError:
                return  # the keeper is gone: the receive loop says so


def _with_session_hint(error: VaultError, request: Any) -> VaultError:
    if not request.shell and request.argv is not None:
        error.hint = (
            f"the command may still be running on the vault as session {request.session_id}: "
            f"fly-vault exec VAULT --session {request.session_id}"
        )
    return error


# fly-vault mux status|stop -------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        directory = runtime_dir()
    except OSError as exc:
        raise UsageError(
            f"connection keepers cannot be used here: {exc}",
            hint="fix the directory's owner and mode (0700), or set XDG_RUNTIME_DIR",
        ) from None
    found = [
        (paths, info)
        for paths, info in keepers(directory)
        if args.vault is None or paths.socket.name.startswith(f"{args.vault}-")
    ]
    return _stop(found) if args.mux_command == "stop" else _status(found, args.json)


def _status(found: list[tuple[KeeperPaths, dict[str, Any]]], as_json: bool) -> int:
    rows = []
    for paths, info in found:
        try:
            status = call(paths.socket, "status")
        except (KeeperUnavailable, VaultError, OSError) as exc:
            status = {"pid": info.get("pid"), "error": f"not answering ({exc})"}
        status["socket"] = str(paths.socket)
        rows.append(status)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no connection keepers running")
        return 0
    for row in rows:
        if "error" in row:
            print(f"pid {row.get('pid')}: {row['error']} ({row['socket']})")
            continue
        idle = "" if row["active"] else f", exits after {row['idle_seconds']:g} s idle"
        print(
            f"vault {row['vault']}: pid {row['pid']}, "
            f"{'connected' if row['connected'] else 'not connected'}, "
            f"{row['requests']} request(s), {row['active']} active{idle}"
        )
    return 0


def _stop(found: list[tuple[KeeperPaths, dict[str, Any]]]) -> int:
    if not found:
        print("no connection keepers running")
        return 0
    for paths, _info in found:
        try:
            status = call(paths.socket, "status")
            call(paths.socket, "stop")
            print(f"stopped the keeper of vault {status['vault']} (pid {status['pid']})")
        except (KeeperUnavailable, VaultError, OSError):
            # Not answering: a dead keeper's leftovers, or a keeper of another release
            # (its pid file says which process; only a fly-vault process is signalled).
            pid = _info.get("pid")
            if isinstance(pid, int) and _is_fly_vault(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
                print(f"stopped the keeper with pid {pid} (it did not answer)")
            for path in (paths.socket, paths.pid):
                with contextlib.suppress(OSError):
                    path.unlink()
            print(f"removed the keeper socket {paths.socket.name}")
    return 0


def _is_fly_vault(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    return owner == os.getuid() and (b"fly-vault" in cmdline or b"flyvault" in cmdline)


if __name__ == "__main__":
    _keeper_process(sys.argv[1:])
