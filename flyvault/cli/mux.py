"""The connection keeper from the command line: use one, start one, ``fly-vault mux``.

``exec``, ``list-exec`` and ``kill`` go through the vault's keeper when one may be used
(``mux_mode``): the first call connects directly and starts the keeper beside it, so it pays
nothing for it; later calls reuse the keeper's connection. ``FLY_VAULT_MUX=wait`` makes the
first call wait for the keeper it starts and go through it too. Whatever goes wrong before
the keeper accepted a request (none could be started, the directory is unsafe, the socket
is stale) falls back to a direct connection, so the keeper can only make a call faster,
never make it fail. This module is light: the thin path imports no asyncio,
QUIC or crypto (``tests/test_keeper.py`` checks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from flyvault.cli.console import Console
from flyvault.cli.output import report_error
from flyvault.cli.terminal import RawTerminal, terminal_size
from flyvault.client.exec_request import (
    INTERRUPT_EXIT,
    READER_GONE_EXIT,
    READER_GONE_GRACE,
    detached_notice,
    reader_gone_signal,
)
from flyvault.client.keeper_start import (
    WAIT,
    alive,
    locate,
    mux_mode,
    spawn,
    start_and_wait,
)
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
    keeper_lost,
    keeper_paths_at,
    keepers,
    next_event,
    resize_frame,
    runtime_dir,
    stdin_eof_frame,
    stdin_frame,
)
from flyvault.defaults import RECONNECT_TIMEOUT
from flyvault.envvars import env_float
from flyvault.errors import ConfigError, UsageError, VaultError

log = logging.getLogger("flyvault.mux")

#: How long a keeper waits, with no request in progress, before it exits.
IDLE_DEFAULT = 600.0
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
    A bad ``FLY_VAULT_MUX`` or ``FLY_VAULT_MUX_IDLE`` is a ``UsageError``."""
    if getattr(args, "no_mux", False):
        return "--no-mux"
    if not sys.platform.startswith("linux"):
        return "not on Linux (no SO_PEERCRED)"
    if mux_mode() is None:
        return f"FLY_VAULT_MUX={os.environ.get('FLY_VAULT_MUX', '').strip()}"
    # Read by the keeper, checked here too: a keeper started in the background reports
    # nothing, so a bad value must fail this call (exit 2) rather than go unnoticed.
    env_float("FLY_VAULT_MUX_IDLE", IDLE_DEFAULT, above=0, unit="seconds")
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


def open_link(args: argparse.Namespace, op: str, **fields: Any) -> KeeperLink | None:
    """A request accepted by the vault's keeper, or None: go direct. With no keeper
    running, one is started: in the background (this call goes direct), or with
    ``FLY_VAULT_MUX=wait`` waited for and used."""
    if not use_keeper(args):
        return None
    paths = _locate(args.vault)
    if paths is None or paths.off.exists():
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
    """The socket of ``vault_name``'s keeper for a client that opens streams through it
    (``cp``, ``forward``), or None: connect directly (a keeper is started as for
    ``open_link``)."""
    if not use_keeper(args):
        return None
    paths = _locate(vault_name)
    if paths is None or paths.off.exists():
        return None
    if alive(str(paths.socket)) or _start(paths, vault_name):
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
    """Start the keeper for ``paths``. True when it listens and this call may use it;
    False (the reason logged) when this call goes direct: always in the background mode,
    where the keeper's start overlaps this call's own connection instead of delaying it.

    The keeper is a fresh ``python -m flyvault.cli.keeperd`` process (so ``ps`` shows what it
    is, not the command that started it). It validates the config itself: this process
    stays thin. With ``FLY_VAULT_MUX=wait`` a config error it finds is raised here
    (exit 3), as the direct path would; in the background the direct call finds it.
    """
    if mux_mode() != WAIT:
        spawn(paths, vault_name, None)
        return False
    return start_and_wait(paths, vault_name)


def _open_log(paths: KeeperPaths) -> None:
    """Standard output and error to the keeper's log. Opened (and emptied) only by the
    keeper that won the socket: a keeper that lost must not wipe the winner's log."""
    log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)


def _serve(
    paths: KeeperPaths, config: Any, idle: float, listener: socket.socket, *, warm: bool
) -> int:
    import asyncio

    from flyvault.cli.output import configure_logging
    from flyvault.client.keeper import Keeper

    logging.getLogger("flyvault").handlers.clear()
    configure_logging(None, verbose=True)  # INFO to stderr, which is the keeper's log
    try:
        keeper = Keeper(config, listener, idle_seconds=idle, paths=(paths.pid, paths.socket))
        asyncio.run(keeper.serve(warm=warm))
        return 0
    except BaseException:
        log.exception("the connection keeper failed")
        for path in (paths.pid, paths.socket):
            with contextlib.suppress(OSError):
                path.unlink()
        return 1


def keeper_process(
    name: str, socket_path: str, ready_fd: int | None, listener: socket.socket
) -> None:
    """The keeper, once ``flyvault.cli.keeperd`` took the socket: check the config and the
    switches, answer on ``ready_fd`` (``ok``, ``off`` or ``error:`` with the error as JSON;
    None: nobody waits, connect at once), then serve. A keeper that must not run gives the
    socket up: calls waiting in its backlog see it close and go direct."""
    from flyvault.cli.keeperd import answer  # the keeper's side only: not on the thin path
    from flyvault.redact import ScrubbingStream

    sys.stdout, sys.stderr = ScrubbingStream(sys.stdout), ScrubbingStream(sys.stderr)  # type: ignore[assignment]
    paths = keeper_paths_at(Path(socket_path))
    try:
        config, idle = _keeper_config(name, paths)
    except VaultError as exc:
        _give_up(paths, listener)
        detail = {"message": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}
        answer(ready_fd, b"error:" + json.dumps(detail).encode()[:8000])
        os._exit(1)
    if config is None:
        _give_up(paths, listener)
        answer(ready_fd, b"off")
        os._exit(0)
    _open_log(paths)
    answer(ready_fd, b"ok")
    if ready_fd is not None:
        os.close(ready_fd)
    os._exit(_serve(paths, config, idle, listener, warm=ready_fd is None))


def _give_up(paths: KeeperPaths, listener: socket.socket) -> None:
    """Leave the socket this keeper took (it must not run after all). The pid file goes
    first: once the socket is gone a new keeper may bind and write its own."""
    for path in (paths.pid, paths.socket):
        with contextlib.suppress(OSError):
            path.unlink()
    listener.close()


def _keeper_config(name: str, paths: KeeperPaths) -> tuple[Any, float]:
    """The vault's validated config and the idle time; (None, 0) when this keeper must not
    run: ``mux = false``, or the config changed since the CLI named the keeper after it."""
    from flyvault.config import load_vault

    config = load_vault(name)
    if _locate(name) != paths:  # edited in between: the name would not match the content
        return None, 0.0
    if not config.mux:
        # Remembered for this exact config: later calls go direct without starting one.
        paths.off.touch(mode=0o600)
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
        from_start=bool(getattr(args, "from_start", False)),
    )
    if link is None:
        return None
    try:
        return _ThinSession(link, request, interactive, forward_stdin, args.vault).run()
    finally:
        link.close()


#: How long the signal for a command whose reader left may take through the keeper.
KILL_TIMEOUT = 5.0


class _Detach(Exception):
    """Raised by the second Ctrl-C in the thin path's receive loop."""


class _ThinSession:
    """The CLI's end of an exec served by the keeper: the terminal and the byte pumps."""

    def __init__(
        self, link: KeeperLink, request: Any, interactive: bool, forward_stdin: bool, vault: str
    ):
        from flyvault.cli.progress import ProgressLine

        self.link = link
        self.request = request
        self.vault = vault
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
        self.reader_gone = False
        self.escalation: threading.Timer | None = None
        self.interrupts = 0
        self.following = True

    def run(self) -> int:
        threading.Thread(target=self._send_loop, name="keeper-send", daemon=True).start()
        if self.forward_stdin and not self.interactive:
            self._start_stdin()
        plain = not self.interactive and not self.request.keep  # as in session_runner
        previous = signal.signal(signal.SIGINT, self._interrupted) if plain else None
        try:
            try:
                return self._receive_loop()
            finally:
                self.following = False  # a Ctrl-C from here on is not ours to act on
        except _Detach:  # a second Ctrl-C: the session goes on without us
            self.progress.close()
            self.console.notice(detached_notice(self.request, self.vault))
            return INTERRUPT_EXIT
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if self.escalation is not None:  # decided: nothing signals the command any more
                self.escalation.cancel()
            self._leave_raw()
            self.progress.close()

    def _interrupted(self, signo: int, frame: Any) -> None:
        """Ctrl-C as the direct path (``session_runner``) takes it: the first goes to the
        command as SIGINT (a ``kill`` request from a thread), the second leaves."""
        if not self.following:
            return
        self.interrupts += 1
        if self.interrupts > 1:
            raise _Detach
        threading.Thread(target=self._signal_remote, args=(signal.SIGINT,), daemon=True).start()

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
                if self.reader_gone and self.request.keep:
                    return self._reader_left()
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

    def _reader_left(self) -> int:
        """A kept session nobody here reads any more: leave it running (closing the link
        detaches it in the keeper), as the direct path does."""
        self.console.notice(
            f"the reader of the output left; session {self.request.session_id} keeps running "
            f"(reattach: fly-vault exec {self.vault} --session {self.request.session_id})"
        )
        return READER_GONE_EXIT

    def _fail(self, error: VaultError) -> int:
        from flyvault.client.exec_request import failure_status

        self._leave_raw()
        self.progress.close()
        report_error(error)
        return failure_status(error)

    def _write(self, fd: int, data: bytes) -> None:
        if fd in self.broken:  # a closed pipe: drop the rest, as the direct path does
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            self.broken.add(fd)
            if isinstance(exc, BrokenPipeError) and not self.reader_gone:
                self._reader_gone()

    def _reader_gone(self) -> None:
        """The reader of our output left: as the direct path (``session_runner``). A kept
        session is left running (the receive loop ends, closing the link: the keeper
        detaches); a command of ours gets its signal through a ``kill`` request of its own,
        from a thread (the receive loop keeps draining), and SIGTERM after the grace."""
        self.reader_gone = True
        if self.request.keep:
            return
        signo = reader_gone_signal(self.request)
        threading.Thread(target=self._signal_remote, args=(signo,), daemon=True).start()
        self.escalation = threading.Timer(READER_GONE_GRACE, self._signal_remote, (signal.SIGTERM,))
        self.escalation.daemon = True
        self.escalation.start()

    def _signal_remote(self, signo: int) -> None:
        try:
            call(
                self.link.path,
                "kill",
                answer_timeout=KILL_TIMEOUT,
                session_id=self.request.session_id,
                signal=int(signo),
            )
        except (KeeperUnavailable, VaultError, OSError) as exc:
            log.info("could not signal session %s: %s", self.request.session_id, exc)

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
        if args.vault is None or _vault_of(paths.socket) == args.vault[:40]
    ]
    # ``mux = false`` marks (``<vault>-<key>.off``): shown by status, cleared by stop.
    marks = [
        mark
        for mark in sorted(directory.glob("*.off"))
        if args.vault is None or _vault_of(mark) == args.vault[:40]
    ]
    if args.mux_command == "stop":
        _clear_marks(marks)
        return _stop(found)
    return _status(found, marks, args.json)


def _clear_marks(marks: list[Path]) -> None:
    for mark in marks:
        with contextlib.suppress(FileNotFoundError):
            mark.unlink()
        vault = _vault_of(mark)
        print(f"cleared the mux = false mark of vault {vault} ({mark.name})")


def _vault_of(path: Path) -> str:
    """The vault name (its first 40 characters) in ``<vault>-<key>.sock`` (or ``.off``):
    exact, so that ``mux stop a`` leaves vault ``a-b``'s keeper alone."""
    return path.stem.rsplit("-", 1)[0]


def _status(
    found: list[tuple[KeeperPaths, dict[str, Any]]], marks: list[Path], as_json: bool
) -> int:
    rows = []
    for paths, info in found:
        try:
            status = call(paths.socket, "status")
        except (KeeperUnavailable, VaultError, OSError) as exc:
            status = {"pid": info.get("pid"), "error": f"not answering ({exc})"}
        status["socket"] = str(paths.socket)
        rows.append(status)
    offs = [{"vault": _vault_of(m), "off": str(m)} for m in marks]
    if as_json:
        print(json.dumps(rows + offs, indent=2))
        return 0
    for off in offs:
        print(f"vault {off['vault']}: no keeper (mux = false in its entry; {off['off']})")
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
