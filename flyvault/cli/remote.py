"""``exec``, ``connect``, ``forward``, ``list-exec`` and ``kill``.

``exec`` and ``connect`` exit with the remote command's own status (0-255; 128+N when it
died from signal N), or 255 when fly-vault itself failed or the session was left with the
``~.`` escape, as ssh does. The error message says which.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from flyvault.cli.console import Console
from flyvault.cli.output import report_error
from flyvault.cli.terminal import (
    OutputSink,
    RawTerminal,
    isatty,
    start_stdin_reader,
    terminal_size,
)
from flyvault.client.exec_request import failure_status
from flyvault.errors import TransportError, UsageError, VaultError
from flyvault.redact import outgoing, printable

# asyncio is imported where a direct connection is made: exec, list-exec and kill through
# the connection keeper (flyvault.cli.mux) must not load it.


def _load(name: str) -> Any:
    from flyvault.config import load_vault

    return load_vault(name)


def _parse_forwards(values: list[str], label: str) -> list[Any]:
    """The forwards given on the command line, checked before anything connects (a
    ``UsageError`` naming ``label``, the flag or argument they came from)."""
    from flyvault.config import parse_forward_spec
    from flyvault.errors import ConfigError

    specs: dict[int, Any] = {}
    for value in values:
        try:
            spec = parse_forward_spec(value)
        except ConfigError as exc:
            hint = exc.hint
            if label == "forward spec" and value.count(":") == 1:  # HOST:PORT: a pipe?
                hint = f"to join stdin/stdout to {value} (an ssh ProxyCommand): forward --stdio"
            raise UsageError(f"{label} {value!r}: {exc.message}", hint=hint) from None
        if spec.local_port in specs:
            raise UsageError(
                f"{label} {value!r}: local port {spec.local_port} is given twice",
                hint="give each local port once",
            )
        specs[spec.local_port] = spec
    return list(specs.values())


def _with_defaults(specs: list[Any], defaults: list[Any]) -> list[Any]:
    """The config's forwards plus the command line's; the command line wins for a port."""
    merged: dict[int, Any] = {spec.local_port: spec for spec in defaults}
    merged.update((spec.local_port, spec) for spec in specs)
    return list(merged.values())


# exec / connect --------------------------------------------------------------------------


def run_exec(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv and not args.session:
        report_error(
            UsageError(
                "exec requires a command unless --session is given",
                hint="fly-vault exec VAULT -- COMMAND [ARGS...]",
            )
        )
        return 2
    if args.from_start and not args.session:
        report_error(
            UsageError(
                "--from-start needs --session: only a named session is replayed",
                hint=f"fly-vault exec {args.vault} --session ID --from-start",
            )
        )
        return 2
    stdin_tty = isatty(0)
    try:
        request = _exec_request(args, argv, stdin_tty)
    except UsageError as exc:
        report_error(exc)
        return 2
    # Reattaching without a terminal must not forward (and close) our stdin.
    forward_stdin = bool(argv) or stdin_tty
    from flyvault.cli.mux import exec_through_keeper

    try:
        status = exec_through_keeper(args, request, forward_stdin)
    except UsageError as exc:  # FLY_VAULT_MUX, before any connection
        report_error(exc)
        return 2
    except VaultError as exc:  # e.g. the config error a starting keeper found: as direct
        report_error(exc)
        return failure_status(exc)
    if status is not None:
        return status
    import asyncio

    try:
        vault = _load(args.vault)
        return asyncio.run(_run_session(args, vault, request, forward_stdin, forwards=[]))
    except VaultError as exc:
        report_error(exc)
        return failure_status(exc)


def _exec_request(args: argparse.Namespace, argv: list[str], stdin_tty: bool) -> Any:
    """The session to open, checked by the client (a ``UsageError`` before connecting)."""
    from flyvault.client import ExecRequest, new_session_id

    pty = args.tty if args.tty is not None else stdin_tty
    rows, cols = terminal_size() if pty else (0, 0)
    return ExecRequest(
        session_id=args.session or new_session_id(),
        argv=tuple(argv) if argv else None,
        pty=pty,
        keep=bool(args.session),
        context=args.context if argv else None,
        term=os.environ.get("TERM", "xterm-256color") if pty else "",
        rows=rows,
        cols=cols,
        cwd=args.cwd,
        env=tuple(_parse_env(item) for item in args.env),
        user=args.user,
    )


def run_connect(args: argparse.Namespace) -> int:
    import asyncio

    from flyvault.client import ExecRequest, new_session_id

    rows, cols = terminal_size()
    try:  # checked before connecting (exit 2)
        request = ExecRequest(
            session_id=new_session_id("shell"),
            shell=True,
            pty=True,
            term=os.environ.get("TERM", "xterm-256color"),
            rows=rows,
            cols=cols,
            user=args.user,
        )
        cli_forwards = _parse_forwards(args.forward, "--forward")
    except UsageError as exc:
        report_error(exc)
        return 2
    try:
        vault = with_rootfs_options(_load(args.vault), args)
        forwards = _with_defaults(cli_forwards, vault.forwards())
        return asyncio.run(_run_session(args, vault, request, True, forwards=forwards))
    except VaultError as exc:
        report_error(exc)
        return failure_status(exc)


def _parse_env(item: str) -> tuple[str, str]:
    """``--env NAME=VALUE`` (the value may hold '='; the name is checked by ExecRequest)."""
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise UsageError(
            f"--env {item[:80]!r}: expected NAME=VALUE", hint="e.g. --env FOO=bar (repeatable)"
        )
    return name, value


class _LocalFrontend:
    """The session on this process's own terminal (``flyvault.client.session_runner``)."""

    def __init__(self, console: Console, interactive: bool) -> None:
        import asyncio

        self.console = console
        self.interactive = interactive
        loop = asyncio.get_running_loop()

        #: Told from a sink's writer thread the moment a write hit EPIPE (not at the next
        #: write, which may never come: `tail -f log | head`).
        def broken() -> None:
            with contextlib.suppress(RuntimeError):  # the loop already ended: nothing to do
                loop.call_soon_threadsafe(self._reader_left)

        self.stdout, self.stderr = OutputSink(1, on_broken=broken), OutputSink(2, on_broken=broken)
        self._reader_gone: Callable[[], None] | None = None
        self._reader_gone_told = False

    def notice(self, message: str) -> None:
        self.console.notice(message)

    async def write_stdout(self, data: bytes) -> None:
        await self.stdout.write(data)

    async def write_stderr(self, data: bytes) -> None:
        await self.stderr.write(data)

    def on_reader_gone(self, callback: Callable[[], None]) -> None:
        self._reader_gone = callback

    def on_interrupt(self, callback: Callable[[], None]) -> None:
        import asyncio

        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, callback)

    def _reader_left(self) -> None:
        if not self._reader_gone_told and self._reader_gone is not None:
            self._reader_gone_told = True
            self._reader_gone()

    async def flush(self) -> None:
        await self.stdout.flush()
        await self.stderr.flush()

    @contextlib.contextmanager
    def raw(self) -> Iterator[None]:
        with RawTerminal():
            self.console.raw = True
            try:
                yield
            finally:
                self.console.raw = False

    def terminal_size(self) -> tuple[int, int]:
        return terminal_size()

    def on_resize(self, callback: Callable[[int, int], None]) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGWINCH, lambda: callback(*terminal_size()))

    def start_stdin(
        self, deliver: Callable[[bytes], Awaitable[None]], on_eof: Callable[[], None]
    ) -> None:
        start_stdin_reader(deliver, on_eof)

    def close(self) -> None:
        self.stdout.close()
        self.stderr.close()


async def _run_session(
    args: argparse.Namespace,
    vault_config: Any,
    request: Any,
    forward_stdin: bool,
    forwards: list[Any],
) -> int:
    from flyvault.cli.progress import ProgressLine
    from flyvault.client import ExecSession, Vault
    from flyvault.client.session_runner import follow, remember_shown, run_attached

    console = Console()
    frontend = _LocalFrontend(console, interactive=request.pty and isatty(0))
    progress = ProgressLine()
    vault = Vault(
        vault_config,
        reconnect_timeout=args.reconnect_timeout,
        on_notice=console.notice,
        on_event=console.event,
        reprovision=getattr(args, "reprovision", False),
        progress=progress,
    )
    from_start = bool(getattr(args, "from_start", False))
    request, hooks, seen = follow(
        vault_config.name,
        request,
        frontend,
        console.notice,
        from_start=from_start,
        boot=lambda: getattr(vault.current, "boot_id", None),
    )
    session = ExecSession(vault, request, hooks)
    listeners = []
    try:
        try:
            await vault.connection()  # fail fast, before touching the terminal
        finally:
            progress.close()
        for spec in forwards:
            listeners.append(await _start_forward(spec, vault, console))
        return await run_attached(session, request, frontend, vault_config.name, forward_stdin)
    finally:
        remember_shown(vault_config.name, request, seen)
        for listener in listeners:
            await listener.close()
        await vault.close()
        frontend.close()


async def _start_forward(spec: Any, vault: Any, console: Console) -> Any:
    from flyvault.client.forward import ForwardListener

    listener = ForwardListener(spec, vault.connection, on_event=console.notice)
    await listener.start()
    console.notice(f"forwarding 127.0.0.1:{listener.port} -> {spec.target} on the vault")
    return listener


# reprovision --------------------------------------------------------------------------------


def run_reprovision(args: argparse.Namespace) -> int:
    import asyncio

    vault_config = with_rootfs_options(_load(args.vault), args)
    source = vault_config.rootfs_source("reprovision")  # config errors before any prompt
    what = getattr(source, "path", None) or getattr(source, "url", "")
    if not args.yes:
        if not isatty(0):
            raise UsageError(
                "reprovision replaces the vault's rootfs: refusing without --yes when stdin "
                "is not a terminal",
                hint=f"fly-vault reprovision {args.vault} --yes",
            )
        answer = input(
            f"Replace the rootfs of vault '{args.vault}' with {what}?\n"
            "/root and /home are kept; every process on the vault is stopped. [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("cancelled")
            return 1
    return asyncio.run(_reprovision(vault_config))


async def _reprovision(vault_config: Any) -> int:
    from flyvault.cli.progress import ProgressLine
    from flyvault.client import Vault

    console = Console()
    vault = Vault(vault_config, on_event=console.event)
    progress = ProgressLine()
    try:
        result = await vault.reprovision(progress)
        progress.close()
        # The server answered as soon as the new workload was up; it still watches the
        # rest of its settle window and rolls back a death inside it: learn that outcome
        # before saying it worked (a rollback is raised: exit 8).
        try:
            await result.wait_settled()
        except TransportError as exc:
            console.notice(
                f"the connection was lost during the new workload's settle window "
                f"({exc.message}); check it with: fly-vault doctor {vault_config.name}"
            )
    finally:
        progress.close()
        await vault.close()
    for note in result.notes:  # e.g. the device nodes --allow-devices created
        print(note)
    runtime = result.runtime_status.name.lower().replace("_", " ")
    if result.from_cold:
        print(
            f"vault '{vault_config.name}' was cold (never provisioned): provisioned in "
            f"{result.seconds:.1f} s: workload {result.new_boot_id[:12]} ({runtime})"
        )
        return 0
    print(
        f"vault '{vault_config.name}' reprovisioned in {result.seconds:.1f} s: new workload "
        f"{result.new_boot_id[:12]} ({runtime}), /root and /home kept"
    )
    return 0


def rootfs_option_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys set by --allow-devices and --max-expansion-ratio (given ones only)."""
    from flyvault.config import MAX_EXPANSION_RATIO

    values: dict[str, Any] = {}
    if getattr(args, "allow_devices", None):
        values["rootfs_allow_devices"] = True
    ratio = getattr(args, "max_expansion_ratio", None)
    if ratio is not None:
        if not 0 <= ratio <= MAX_EXPANSION_RATIO:
            raise UsageError(
                f"--max-expansion-ratio must be from 0 (no limit) to {MAX_EXPANSION_RATIO}"
            )
        values["rootfs_max_expansion_ratio"] = ratio
    return values


def with_rootfs_options(vault_config: Any, args: argparse.Namespace) -> Any:
    """The entry with the command line's rootfs options, which win over its own."""
    values = rootfs_option_values(args)
    if not values:
        return vault_config
    from flyvault.config import VaultConfig

    return VaultConfig(**{**vault_config.to_fields(), **values})


# forward / list-exec / kill ---------------------------------------------------------------


def run_forward(args: argparse.Namespace) -> int:
    import asyncio

    from flyvault.cli.mux import keeper_socket

    specs = _parse_forwards(args.specs, "forward spec")  # usage errors before the config
    if not specs:
        raise UsageError("forward needs at least one LOCAL_PORT:HOST:REMOTE_PORT")
    vault_config = _load(args.vault)
    return asyncio.run(_forward(vault_config, specs, keeper_socket(args, args.vault)))


async def _forward(vault_config: Any, specs: list[Any], keeper: Any = None) -> int:
    """Forward until Ctrl-C. With ``keeper`` (the vault's keeper socket) each forwarded
    connection is a stream the keeper relays on its connection: no handshake of our own,
    and the keeper stays while we run. If it goes, the next connection is made directly."""
    import asyncio

    from flyvault.client import Vault

    console = Console()
    vault = Vault(
        vault_config,
        on_notice=console.notice,
        on_event=console.event,
        reconnect_timeout=3600,
        keeper=keeper,
    )
    listeners = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signo, stop.set)
    try:
        await vault.connection()
        for spec in specs:
            listeners.append(await _start_forward(spec, vault, console))
        console.notice("press Ctrl-C to stop")
        await stop.wait()
    finally:
        for listener in listeners:
            await listener.close()
        await vault.close()
    return 0


def run_list_exec(args: argparse.Namespace) -> int:
    from flyvault.cli.mux import call_through_keeper, not_used

    sessions = call_through_keeper(args, "list")
    if not_used(sessions):
        import asyncio

        vault_config = _load(args.vault)
        sessions = asyncio.run(_with_vault(vault_config, lambda v: v.list_sessions()))
    if args.json:
        print(json.dumps(outgoing(sessions), indent=2))  # \xNN for bytes that are not UTF-8
        return 0
    if not sessions:
        print("no exec sessions")
        return 0
    rows = [("SESSION", "STATE", "ATTACHED", "STARTED", "BYTES", "COMMAND", "CONTEXT")]
    for info in sessions:
        if info["running"]:
            state = "running"
        elif info.get("signal"):
            state = f"killed ({signal.Signals(info['signal']).name})"
        else:
            state = f"exit {info['exit_code']}"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started_at"]))
        command = printable(" ".join(info["argv"])) if info["kind"] == "exec" else "(shell)"
        rows.append(
            (
                info["session_id"],
                state,
                "yes" if info["attached"] else "no",
                started,
                str(info["bytes"]),
                command[:60],
                (info.get("context") or "")[:40],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


#: How often ``kill`` looks whether the session ended while it waits.
KILL_POLL = 0.1


def run_kill(args: argparse.Namespace) -> int:
    """Send the signal; then wait up to ``--wait`` seconds and say whether the session
    ended (a shell ignores SIGTERM: the answer says which signal to try next)."""
    from flyvault.cli.mux import call_through_keeper, not_used
    from flyvault.client import parse_signal

    signo = parse_signal(args.signal)
    if not_used(call_through_keeper(args, "kill", session_id=args.session, signal=signo)):
        import asyncio

        async def kill_and_watch(vault: Any) -> Any:
            await vault.kill(args.session, signo)
            deadline = time.monotonic() + args.wait
            while args.wait:
                info = _session_info(await vault.list_sessions(), args.session)
                if not _still_running(info) or time.monotonic() >= deadline:
                    return info
                await asyncio.sleep(KILL_POLL)
            return None  # --wait 0: not looked at

        info = asyncio.run(_with_vault(_load(args.vault), kill_and_watch))
    else:
        info = None
        deadline = time.monotonic() + args.wait
        while args.wait:
            listing = call_through_keeper(args, "list")
            if not_used(listing):  # the keeper went away meanwhile: no answer to give
                print(_kill_outcome(args.session, signo, 0, None))
                return 0
            info = _session_info(listing, args.session)
            if not _still_running(info) or time.monotonic() >= deadline:
                break
            time.sleep(KILL_POLL)
    print(_kill_outcome(args.session, signo, args.wait, info))
    return 0


def _session_info(sessions: Any, session_id: str) -> dict[str, Any] | None:
    return next((s for s in sessions or () if s.get("session_id") == session_id), None)


def _still_running(info: dict[str, Any] | None) -> bool:
    return info is not None and bool(info.get("running"))


def _kill_outcome(session: str, signo: int, wait: float, info: dict[str, Any] | None) -> str:
    from flyvault.client import signal_name

    name = signal_name(signo)
    if wait == 0:
        return f"sent {name} to session {session}"
    if info is None:
        return f"sent {name}: session {session} ended"
    if not info.get("running"):
        ended = (
            f"killed by {signal_name(info['signal'])}"
            if info.get("signal")
            else f"exit status {info.get('exit_code')}"
        )
        return f"sent {name}: session {session} ended ({ended})"
    if info.get("kind") == "shell" and signo != signal.SIGHUP:
        advice = "a shell ignores SIGTERM and SIGINT: try --signal HUP, or --signal KILL"
    else:
        advice = "it may be handling the signal; --signal KILL ends it at once"
    return f"sent {name}: session {session} is still running after {wait:g} s ({advice})"


async def _with_vault(vault_config: Any, action: Any) -> Any:
    from flyvault.client import Vault

    vault = Vault(vault_config, on_event=Console().event)
    try:
        return await action(vault)
    finally:
        await vault.close()
