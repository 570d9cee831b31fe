"""Run one exec/connect session against a terminal-like frontend, as ssh does.

The rules a user sees are here once: ssh-style escapes on an interactive terminal (``~.``
leaves the session running and says how to reattach), raw mode only while the session
runs, the modes reset when a session ends abnormally, the vault's reason for ending a
session as the last word, and the exit status (the remote command's own, or 255 when
fly-vault failed or the user left). Two frontends drive it: the CLI's own terminal
(``flyvault.cli.remote``) and a CLI process served through the connection keeper
(``flyvault.client.keeper``), so both behave exactly alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from flyvault.client import cursors
from flyvault.client.cursors import SeenFilter
from flyvault.client.escapes import RESET_MODES, EscapeDetector
from flyvault.client.exec_request import (
    CLIENT_FAILURE,
    INTERRUPT_EXIT,
    READER_GONE_EXIT,
    READER_GONE_GRACE,
    ExecRequest,
    detached_notice,
    reader_gone_signal,
)
from flyvault.errors import ConnectionLost, VaultError


class SessionFrontend(Protocol):
    """Where a session's bytes and notices go, and where its input comes from."""

    #: A PTY session on a real terminal: raw mode, escapes, resizes.
    interactive: bool

    def notice(self, message: str) -> None: ...

    async def write_stdout(self, data: bytes) -> None: ...

    async def write_stderr(self, data: bytes) -> None: ...

    async def flush(self) -> None:
        """Everything written so far has reached its descriptor."""

    def raw(self) -> contextlib.AbstractContextManager[Any]:
        """The terminal in raw mode for the block (entered only when ``interactive``)."""

    def terminal_size(self) -> tuple[int, int]: ...

    def on_resize(self, callback: Callable[[int, int], None]) -> None: ...

    def start_stdin(
        self, deliver: Callable[[bytes], Awaitable[None]], on_eof: Callable[[], None]
    ) -> None: ...

    def on_reader_gone(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the loop, once) when the reader of our output left (EPIPE);
        a frontend that cannot tell never calls it."""

    def on_interrupt(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the loop) at each Ctrl-C (SIGINT) this process gets while
        the session is not on a raw terminal; a frontend without one never calls it."""


async def run_attached(
    session: Any,
    request: ExecRequest,
    frontend: SessionFrontend,
    vault_name: str,
    forward_stdin: bool,
) -> int:
    """Run ``session`` (an ``ExecSession`` on a connected vault) to its end; the exit status."""
    left: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    interactive = frontend.interactive
    escalation: list[asyncio.TimerHandle] = []
    frontend.on_reader_gone(lambda: _reader_gone(session, request, left, escalation))
    # A plain exec only: on a raw terminal Ctrl-C is a byte for the remote's terminal, and
    # following a named session (``--session``) Ctrl-C only stops following, as before.
    if not interactive and not request.keep:
        frontend.on_interrupt(_interrupter(session, left))
    with frontend.raw() if interactive else contextlib.nullcontext():
        if interactive:
            frontend.on_resize(session.resize)
            # A resize while connecting came before the handler: catch it up now.
            size = frontend.terminal_size()
            if size != (request.rows, request.cols):
                session.resize(*size)
        escapes = EscapeDetector() if interactive else None

        async def deliver(data: bytes) -> None:
            if escapes is not None:
                data, action = escapes.feed(data)
                if action == "disconnect" and not left.done():
                    left.set_result("escape")
                elif action == "help":
                    await frontend.write_stderr(EscapeDetector.HELP)
            if data:
                session.send_stdin(data)
                await session.drain()

        if forward_stdin:
            frontend.start_stdin(deliver, session.close_stdin)
        runner = asyncio.ensure_future(session.run())
        try:
            await asyncio.wait({runner, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for handle in escalation:  # decided: nothing signals the command any more
                handle.cancel()
            if not runner.done():  # left with ~., or our caller was cancelled
                runner.cancel()
                await asyncio.wait({runner}, timeout=2.0)  # no session output after this
        if left.done() and runner.cancelled():
            if left.result() == "reader":
                return await _reader_left(request, frontend, vault_name)
            if left.result() == "interrupt":
                await frontend.flush()
                frontend.notice(detached_notice(request, vault_name))
                return INTERRUPT_EXIT
            return await _left(request, frontend, vault_name)
        try:
            exited = runner.result()
        except VaultError as exc:
            if interactive:
                await frontend.write_stdout(RESET_MODES)
            raise _with_session_hint(exc, request, vault_name) from None
        if exited.reason:
            # After the session's own output, as its last word: why the vault ended it.
            await frontend.flush()
            what = "the shell" if request.shell else f"session {request.session_id}"
            frontend.notice(
                f"{what} was ended by the vault: {exited.reason} (exit status {exited.exit_status})"
            )
        return int(exited.exit_status)


def follow(
    vault_name: str,
    request: ExecRequest,
    frontend: SessionFrontend,
    notice: Callable[[str], None],
    *,
    from_start: bool = False,
    boot: Callable[[], str | None] = lambda: None,
) -> tuple[ExecRequest, Any, SeenFilter | None]:
    """The request and output hooks for a session. A named session shows only what this
    machine has not shown yet (``flyvault.client.cursors``), unless ``from_start``: a
    plain reattach asks the vault to replay from there, and the filter drops what a replay
    from earlier repeats (a creating request replays from 0: it may start the session).
    ``boot`` gives the vault's boot id (the cursor is that boot's). The filter is
    returned for ``remember_shown``."""
    from flyvault.client.session import ExecHooks

    if not request.keep:
        hooks = ExecHooks(frontend.write_stdout, frontend.write_stderr, notice=notice)
        return request, hooks, None
    previous = None if from_start else cursors.shown(vault_name, request.session_id)
    if previous is not None and not request.creates:
        fields = {**request.to_fields(), "resume_offset": previous.offset}
        request = ExecRequest.from_fields(fields)
    how = f"fly-vault exec {vault_name} --session {request.session_id} --from-start"
    seen = SeenFilter(previous, frontend.write_stdout, frontend.write_stderr, notice, how, boot)
    hooks = ExecHooks(seen.stdout, seen.stderr, started=seen.started, notice=notice)
    return request, hooks, seen


def remember_shown(vault_name: str, request: ExecRequest, seen: SeenFilter | None) -> None:
    """After a named session's run, however it ended: what this machine has shown."""
    cursor = seen.cursor if seen is not None else None
    if cursor is not None:
        cursors.remember(vault_name, request.session_id, cursor)


def _interrupter(session: Any, left: asyncio.Future[str]) -> Callable[[], None]:
    """Ctrl-C as ``ssh -t`` gives it: the first goes to the remote command as SIGINT; the
    second leaves the session running and says how to come back (``detached_notice``)."""
    count = 0

    def interrupted() -> None:
        nonlocal count
        count += 1
        if left.done():
            return
        if count == 1:
            with contextlib.suppress(Exception):  # ended meanwhile: nothing to interrupt
                session.signal(signal.SIGINT)
        else:
            left.set_result("interrupt")

    return interrupted


def _reader_gone(
    session: Any,
    request: ExecRequest,
    left: asyncio.Future[str],
    escalation: list[asyncio.TimerHandle],
) -> None:
    """The reader of our output left (``exec VAULT -- yes | head``). A command of this
    client gets what a local one would: SIGPIPE (SIGHUP for a terminal session, as a
    vanished terminal gives), then SIGTERM after ``READER_GONE_GRACE`` s for one that
    ignores it (its writes go to the vault's pipe, which stays open, so it never sees
    EPIPE). A kept session (``--session``) outlives its clients: stop following it, as
    ``~.`` does."""
    if request.keep:
        if not left.done():
            left.set_result("reader")
        return
    session.signal(reader_gone_signal(request))

    def escalate() -> None:
        with contextlib.suppress(Exception):  # ended meanwhile: nothing to signal
            session.signal(signal.SIGTERM)

    escalation.append(asyncio.get_running_loop().call_later(READER_GONE_GRACE, escalate))


async def _reader_left(request: ExecRequest, frontend: SessionFrontend, vault_name: str) -> int:
    """A kept session whose output nobody reads here any more: it keeps running."""
    frontend.notice(
        f"the reader of the output left; session {request.session_id} keeps running "
        f"(reattach: fly-vault exec {vault_name} --session {request.session_id})"
    )
    return READER_GONE_EXIT


async def _left(request: ExecRequest, frontend: SessionFrontend, vault_name: str) -> int:
    """The user typed ``~.``: reset the terminal, say how to come back, exit 255."""
    if frontend.interactive:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(frontend.write_stdout(RESET_MODES), 2.0)
    # Output that arrived before the escape is still queued for the terminal: write it
    # first, so the notice is the last thing the user sees.
    await frontend.flush()
    frontend.notice(
        f"disconnected; session {request.session_id} keeps running "
        f"(reattach: fly-vault exec {vault_name} --session {request.session_id})"
        if not request.shell
        else f"disconnected; the shell waits for you (10 minutes by default) before it is "
        f"hung up: fly-vault exec {vault_name} --session {request.session_id}"
    )
    return CLIENT_FAILURE


def _with_session_hint(error: VaultError, request: ExecRequest, vault_name: str) -> VaultError:
    if isinstance(error, ConnectionLost) and not request.shell and request.argv is not None:
        error.hint = (
            f"the command may still be running on the vault as session "
            f"{request.session_id}: fly-vault exec {vault_name} --session {request.session_id}"
        )
    return error


__all__ = ["CLIENT_FAILURE", "SessionFrontend", "run_attached"]
