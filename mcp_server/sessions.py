"""Exec sessions followed by the MCP server, so no tool call has to outlive its wait.

Every exec is a session on the vault with an id (``mcp-<hex>`` unless the caller names
it). The MCP server attaches to it from a background task that copies its output into a
bounded ``OutputBuffer``; a tool call only *waits* on that record, for at most its
``wait_seconds``. When the wait ends first, the call returns the session id and the offset
to continue from, and ``read_output`` picks up from there. The command itself never
depends on a tool call being alive, except that cancelling the exec call that started it
stops it (SIGTERM, then SIGKILL after a grace period), as Ctrl-C would.

Sessions the caller names are kept by the vault after they exit (``list_exec`` shows
their exit status for an hour); unnamed ones are dropped by the vault once their exit was
delivered here, and this process remembers the newest finished ones itself. A session this
process does not follow (another MCP server started it, the CLI, or the connection was lost
for too long) is reattached by offset on demand: the vault replays exactly the missing
bytes, and the command never runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import shlex
import signal as signal_module
import time
from dataclasses import dataclass, field
from typing import Literal

from flyvault.client import (
    ExecHooks,
    ExecRequest,
    ExecSession,
    Exited,
    SessionTakenOver,
    Started,
    Vault,
    signal_name,
)
from flyvault.errors import NotFoundError, Timeout, UsageError, VaultError

from .defaults import BUFFER_BYTES, SPILL_BYTES
from .models import ExecResult, SessionInfo, SessionList
from .output import OutputBuffer, Stream, bounded_streams, plain_text
from .pool import VaultPool, tool_error
from .progress import Reporter, human_bytes

log = logging.getLogger("mcp_server")

#: How long a terminated command gets before SIGKILL.
KILL_GRACE = 5.0
#: Progress heartbeat while a call waits.
HEARTBEAT = 2.0
#: How long to wait for the vault to confirm a start, whatever ``wait_seconds`` says.
START_TIMEOUT = 30.0
#: Pattern matches look back this far into output seen before (a match split by chunks).
PATTERN_OVERLAP = 4096
MAX_FINISHED = 64
#: Output kept for finished sessions, all together, in memory and on disk; the oldest go
#: first.
MAX_FINISHED_BYTES = 64 * 1024 * 1024
MAX_FINISHED_DISK = 1024 * 1024 * 1024
FINISHED_TTL = 3600.0

Until = Literal["exit", "output"]


@dataclass(eq=False)
class ExecRecord:
    vault: str
    session_id: str
    buffer: OutputBuffer
    argv: list[str] | None = None
    context: str | None = None
    created: bool | None = None
    pid: int | None = None
    #: STARTED arrived on the current attachment (a failure before it is the call's error).
    attached_ok: bool = False
    exited: Exited | None = None
    timed_out: bool = False
    error: VaultError | None = None
    session: ExecSession | None = None
    task: asyncio.Task[None] | None = None
    stdin_closed: bool = False
    #: The command runs in a PTY: one stream, terminal control sequences in it.
    tty: bool = False
    #: Followed read-only (protocol 5): an attached CLI client stays attached.
    observing: bool = False
    cursor: int = 0
    started_at: float = field(default_factory=time.monotonic)
    #: The same moment as Unix time (list_exec shows it for sessions only this process has).
    started_wall: float = field(default_factory=time.time)
    finished_at: float | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    killer: asyncio.Task[None] | None = None

    @property
    def following(self) -> bool:
        return self.task is not None and not self.task.done()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> None:
        event = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()

    # ExecHooks ------------------------------------------------------------------------

    def on_stdout(self, data: bytes) -> None:
        self.buffer.append(data)
        self.notify()

    def on_stderr(self, data: bytes) -> None:
        self.buffer.append(data, stderr=True)
        self.notify()

    def on_started(self, started: Started) -> None:
        if self.created is None:
            self.created = started.created
        self.pid = started.pid
        self.tty = started.pty
        self.attached_ok = True
        self.buffer.skip_to(started.offset)
        self.started.set()
        self.notify()


class ExecRegistry:
    def __init__(
        self, pool: VaultPool, *, buffer_bytes: int = BUFFER_BYTES, spill_bytes: int = SPILL_BYTES
    ) -> None:
        self.pool = pool
        self.buffer_bytes = buffer_bytes
        self.spill_bytes = spill_bytes
        self._records: dict[tuple[str, str], ExecRecord] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Stops of cancelled foreground execs: given a moment to finish at shutdown.
        self._stopping: set[asyncio.Task[None]] = set()

    def _buffer(self, start: int = 0) -> OutputBuffer:
        return OutputBuffer(self.buffer_bytes, start, spill_bytes=self.spill_bytes)

    def get(self, vault: str, session_id: str) -> ExecRecord | None:
        return self._records.get((vault, session_id))

    # Starting and following ---------------------------------------------------------------

    async def connect(self, vault_name: str, wait_seconds: float) -> Vault:
        """The pooled vault, connected; a cold vault is provisioned here (in the background
        if it takes longer than the caller's wait)."""
        vault = await self.pool.get(vault_name)
        try:
            async with asyncio.timeout(max(wait_seconds, 10.0)):
                await vault.connection()
        except TimeoutError:
            raise Timeout(
                f"vault '{vault_name}' is still connecting (a cold vault is provisioned from "
                "its rootfs on first use, which can take minutes); the connect goes on in the "
                "background",
                hint=f'call vault_status(vault="{vault_name}") or retry the exec in a minute',
            ) from None
        return vault

    async def start(
        self,
        vault_name: str,
        request: ExecRequest,
        *,
        stdin: bytes | None,
        stdin_open: bool,
        timeout: float | None,
        wait_seconds: float,
    ) -> ExecRecord:
        vault = await self.connect(vault_name, wait_seconds)
        existing = self.get(vault_name, request.session_id)
        if request.keep and not request.shell:
            await self._refuse_other_command(vault, vault_name, request, existing)
        if existing is not None and (existing.following or existing.exited is not None):
            # Never attach twice from one process (the vault would detach our follower),
            # and never run a named command twice: report the session we have.
            existing.created = False
            return existing
        self._prune()
        record = ExecRecord(
            vault=vault_name,
            session_id=request.session_id,
            buffer=self._buffer(),
            argv=list(request.argv or ()),
            context=request.context,
        )
        session = ExecSession(vault, request, self._hooks(record))
        # A generated id cannot name an existing session: the input can go out with the
        # OPEN frame (one packet; `cat` sees EOF without another round trip).
        early = not request.keep
        if early:
            self._send_stdin(record, session, stdin, stdin_open)
        self._records[(vault_name, request.session_id)] = record
        self._follow(record, session)
        try:
            await self._await_start(record)
        except VaultError:
            self._records.pop((vault_name, request.session_id), None)
            await self._stop_following(record)  # no follower left behind, unlisted
            raise
        except asyncio.CancelledError:
            self.stop_in_background(record)
            raise
        # Only into a process we started: a named session that already existed is
        # reattached by the vault, and its stdin is not ours to write or close.
        if not early and record.created and record.session is not None:
            self._send_stdin(record, session, stdin, stdin_open)
        if timeout is not None and record.exited is None:
            record.killer = self._spawn(self._kill_after(record, vault, timeout))
        return record

    @staticmethod
    async def _refuse_other_command(
        vault: Vault, vault_name: str, request: ExecRequest, existing: ExecRecord | None
    ) -> None:
        """A named session that exists is followed, never run twice; but one that runs
        another command is an error, not a silent switch to the old command's output."""
        argv = list(request.argv or ())
        running: str | None = None  # what the existing session runs, in words
        if existing is not None and existing.argv:
            running = shlex.join(existing.argv) if existing.argv != argv else None
        else:
            sessions = await vault.list_sessions()
            found = [s for s in sessions if s.get("session_id") == request.session_id]
            if found and found[0].get("kind") == "shell":  # from connect: no command of ours
                running = "an interactive shell"
            elif found and list(found[0].get("argv") or ()) != argv:
                running = shlex.join(found[0].get("argv") or ())
        if running:
            where = f'vault="{vault_name}", session_id="{request.session_id}"'
            raise UsageError(
                f"session {request.session_id} already exists on vault '{vault_name}' and runs "
                f"{running}, not {shlex.join(argv)}",
                hint=f"follow it with read_output({where}), or give this command another "
                "session_id",
            )

    @staticmethod
    def _send_stdin(
        record: ExecRecord, session: ExecSession, stdin: bytes | None, stdin_open: bool
    ) -> None:
        if stdin:
            session.send_stdin(stdin)
        if not stdin_open:
            session.close_stdin()
            record.stdin_closed = True

    async def attach(
        self, vault_name: str, session_id: str, offset: int, *, take_over: bool = False
    ) -> ExecRecord:
        """Follow a session this process does not follow (yet, or any more): read-only
        where the vault can (a person's attached client stays attached), unless
        ``take_over`` (to send input: then this process becomes the attached client)."""
        record = self.get(vault_name, session_id)
        if record is not None and record.exited is not None:
            return record
        if record is not None and record.following:
            if not (take_over and record.observing):
                return record
            await self._stop_following(record)
        vault = await self.connect(vault_name, START_TIMEOUT)
        observe = not take_over and await vault.can_observe()
        if not take_over and not observe:
            await self._refuse_taking_over(vault, vault_name, session_id)
        new = record is None
        if record is None:
            record = ExecRecord(
                vault=vault_name,
                session_id=session_id,
                buffer=self._buffer(max(offset, 0)),
                cursor=max(offset, 0),
            )
            self._records[(vault_name, session_id)] = record
        record.error = None
        record.attached_ok = False
        record.observing = observe
        record.started = asyncio.Event()
        request = ExecRequest.reattach(session_id, record.buffer.end, observe=observe)
        self._follow(record, ExecSession(vault, request, self._hooks(record)))
        try:
            await self._await_start(record)
        except VaultError:
            await self._stop_following(record)
            if new:
                self._records.pop((vault_name, session_id), None)
            raise
        return record

    @staticmethod
    async def _refuse_taking_over(vault: Vault, vault_name: str, session_id: str) -> None:
        """A vault before protocol 5 has no read-only attach: reading a session another
        client is attached to would take it over, which a read must never do."""
        listing = {str(s.get("session_id")): s for s in await vault.list_sessions()}
        if listing.get(session_id, {}).get("attached"):
            where = f'vault="{vault_name}", session_id="{session_id}"'
            raise UsageError(
                f"session {session_id} has a client attached, and this vault's init "
                "(protocol 4) cannot follow it read-only: reading it would detach that client",
                hint=f"update the vault's image; or take the session over with "
                f"send_input({where}), which detaches the other client",
            )

    @staticmethod
    async def _stop_following(record: ExecRecord) -> None:
        task = record.task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _hooks(self, record: ExecRecord) -> ExecHooks:
        return ExecHooks(
            stdout=record.on_stdout,
            stderr=record.on_stderr,
            started=record.on_started,
            notice=lambda message: log.info("session %s: %s", record.session_id, message),
        )

    def _follow(self, record: ExecRecord, session: ExecSession) -> None:
        record.session = session
        record.task = asyncio.get_running_loop().create_task(self._run(record, session))

    async def _run(self, record: ExecRecord, session: ExecSession) -> None:
        try:
            record.exited = await session.run()
            record.finished_at = time.monotonic()
            if record.killer is not None:
                record.killer.cancel()
        except SessionTakenOver as exc:
            record.error = exc
        except VaultError as exc:
            record.error = exc
        except Exception as exc:  # a bug: keep the record usable and say so
            log.exception("session %s: follower failed", record.session_id)
            record.error = VaultError(f"internal error while following the session: {exc!r}")
        finally:
            record.session = None
            record.started.set()
            record.notify()

    async def _await_start(self, record: ExecRecord) -> None:
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await record.started.wait()
        except TimeoutError:
            raise UsageError(
                f"the vault did not confirm session {record.session_id} within {START_TIMEOUT:g} s",
                hint=f'check it with list_exec(vault="{record.vault}")',
            ) from None
        if record.error is not None and not record.attached_ok:
            error = record.error
            if isinstance(error, NotFoundError):
                error.hint = f'list the sessions with list_exec(vault="{record.vault}")'
            raise error

    def _spawn(self, coroutine: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _prune(self) -> None:
        """Forget finished sessions: past ``FINISHED_TTL``, beyond ``MAX_FINISHED``, or
        while their output together holds more than ``MAX_FINISHED_BYTES``."""
        now = time.monotonic()
        finished = [
            r
            for r in self._records.values()
            if not r.following and (r.exited is not None or r.error is not None)
        ]
        finished.sort(key=lambda r: r.finished_at or r.started_at, reverse=True)  # newest first
        in_memory = on_disk = 0
        for index, record in enumerate(finished):
            on_disk += record.buffer.spilled
            in_memory += record.buffer.held - record.buffer.spilled
            old = now - (record.finished_at or record.started_at) > FINISHED_TTL
            full = in_memory > MAX_FINISHED_BYTES or on_disk > MAX_FINISHED_DISK
            if index >= MAX_FINISHED or full or old:
                self._records.pop((record.vault, record.session_id), None)
                record.buffer.close()

    # Stopping ---------------------------------------------------------------------------

    async def _kill_after(self, record: ExecRecord, vault: Vault, timeout: float) -> None:
        await asyncio.sleep(timeout)
        if record.exited is None:
            record.timed_out = True
            await self.terminate(record, vault)

    async def terminate(self, record: ExecRecord, vault: Vault) -> None:
        """SIGTERM, then SIGKILL if it is still running after ``KILL_GRACE`` seconds."""
        for signo in (signal_module.SIGTERM, signal_module.SIGKILL):
            if record.exited is not None:
                return
            try:
                await vault.kill(record.session_id, signo)
            except NotFoundError:
                return
            except VaultError as exc:
                log.warning("session %s: could not signal: %s", record.session_id, exc.message)
                return
            deadline = time.monotonic() + KILL_GRACE
            while record.exited is None and time.monotonic() < deadline:
                await record.changed(deadline - time.monotonic())

    def stop_in_background(self, record: ExecRecord) -> None:
        """A foreground exec call was cancelled: stop its command, from a task of our own
        (the cancelled call cannot await anything any more)."""

        async def stop() -> None:
            vault = await self.pool.get(record.vault)
            await self.terminate(record, vault)

        if record.exited is None:
            log.info("session %s: exec call cancelled; stopping the command", record.session_id)
            task = self._spawn(stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def signal(self, vault_name: str, session_id: str, signo: int) -> None:
        vault = await self.pool.get(vault_name)
        try:
            await vault.kill(session_id, signo)
        except NotFoundError as exc:
            exc.hint = f'list the sessions with list_exec(vault="{vault_name}")'
            raise

    # Waiting and reading -------------------------------------------------------------------

    async def wait(
        self,
        record: ExecRecord,
        *,
        since: int,
        wait_seconds: float,
        until: Until,
        pattern: re.Pattern[str] | None,
        reporter: Reporter,
    ) -> None:
        """Until exit, or new output (``until="output"``), or a ``pattern`` match in output
        that arrived after ``since``, or ``wait_seconds``; heartbeats meanwhile."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + wait_seconds
        scanned = since
        while record.exited is None and record.following:
            end = record.buffer.end
            if until == "output" and end > since:
                return
            if pattern is not None and end > scanned:
                _, data, _ = record.buffer.read(max(since, scanned - PATTERN_OVERLAP))
                if pattern.search(data.decode("utf-8", "replace")):
                    return
                scanned = end
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await record.changed(min(remaining, HEARTBEAT))
            waited = loop.time() - began
            reporter.update(
                waited,
                wait_seconds,
                f"session {record.session_id} running, {waited:.0f} s waited, "
                f"{human_bytes(record.buffer.end)} of output",
            )

    @staticmethod
    async def wait_for(record: ExecRecord, offset: int, wait_seconds: float) -> None:
        """Until the output up to ``offset`` has arrived (or the session ended, or is no
        longer followed), at most ``wait_seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while record.following and record.exited is None and record.buffer.end < offset:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await record.changed(remaining)

    def result(
        self,
        record: ExecRecord,
        *,
        offset: int,
        length: int | None,
        max_bytes: int,
        stream: Stream | None = None,
        raw: bool = False,
        opened: bool = False,
    ) -> ExecResult:
        """The output from ``offset`` (``length`` bytes, default all so far) as one result:
        stdout and stderr apart, each bounded to its share of ``max_bytes`` (head and tail
        around a marker naming the call that reads the rest). A PTY's output is one stream
        (in ``stdout``), returned as plain text unless ``raw``."""
        stop = None if length is None else offset + length

        def reread(name: str) -> str:
            return (
                f'read_output(vault="{record.vault}", session_id="{record.session_id}", '
                f'offset={{offset}}, length={{length}}, stream="{name}")'
            )

        view = bounded_streams(record.buffer, offset, stop, max_bytes, reread, stream)
        stdout, stderr = view.stdout, view.stderr
        if record.tty and not raw:
            stdout = dataclasses.replace(stdout, text=plain_text(stdout.text))
            stderr = dataclasses.replace(stderr, text=plain_text(stderr.text))
        begin, dropped, next_offset = view.begin, view.dropped, view.next_offset
        record.cursor = max(record.cursor, next_offset)
        exited = record.exited
        return ExecResult(
            vault=record.vault,
            session_id=record.session_id,
            # Only the call that opened the session says whether it started the command.
            created=record.created if opened else None,
            running=exited is None,
            exit_code=exited.code if exited else None,
            signal=exited.signal if exited else None,
            signal_name=signal_name(exited.signal) if exited else None,
            exit_status=exited.exit_status if exited else None,
            # A vault that restarted has no exit to tell: the follower's error says why.
            end_reason=exited.reason if exited else getattr(record.error, "reason", None),
            timed_out=record.timed_out,
            tty=record.tty,
            stdout=stdout.text,
            stderr=stderr.text,
            offset=begin,
            next_offset=next_offset,
            total_bytes=record.buffer.end,
            stdout_bytes=view.stdout_bytes,
            stderr_bytes=view.stderr_bytes,
            omitted_bytes=stdout.omitted_bytes + stderr.omitted_bytes,
            dropped_bytes=dropped,
            elapsed_seconds=round(time.monotonic() - record.started_at, 3),
            next_step=self._next_step(record, next_offset),
        )

    @staticmethod
    def _next_step(record: ExecRecord, next_offset: int) -> str | None:
        where = f'vault="{record.vault}", session_id="{record.session_id}"'
        if record.exited is not None:
            if next_offset < record.buffer.end:
                return f"more output after offset {next_offset}: read_output({where}, offset={next_offset})"
            return None
        if record.error is not None:
            return (
                f"no longer following the session ({record.error.message}); the command may "
                f"still run: read_output({where}) reattaches, signal({where}) stops it"
            )
        return (
            f"still running; wait for more with read_output({where}, wait_seconds=30) "
            f"(continues at offset {next_offset}), stop it with signal({where})"
        )

    # Input ------------------------------------------------------------------------------

    async def send_input(
        self, vault_name: str, session_id: str, data: bytes, eof: bool
    ) -> ExecRecord:
        record = self.get(vault_name, session_id)
        if record is None or not record.following or record.observing:
            offset = record.buffer.end if record else 0
            record = await self.attach(vault_name, session_id, offset, take_over=True)
        if record.exited is not None or record.session is None:
            raise UsageError(
                f"session {session_id} has exited (status {record.exited.exit_status if record.exited else '?'}); "
                "it reads no more input"
            )
        if record.stdin_closed:
            raise UsageError(
                f"the standard input of session {session_id} is closed",
                hint="exec closes stdin after the stdin text unless stdin_open=true; start "
                "the command again with stdin_open=true to send input later",
            )
        session = record.session
        if data:
            session.send_stdin(data)
        if eof:
            session.close_stdin()
            record.stdin_closed = True
        await session.drain()
        return record

    # Listing ----------------------------------------------------------------------------

    async def list_sessions(self, vault_name: str) -> SessionList:
        vault = await self.pool.get(vault_name)
        remote = await vault.list_sessions()
        seen: set[str] = set()
        sessions = []
        for info in remote:
            sid = str(info["session_id"])
            seen.add(sid)
            record = self.get(vault_name, sid)
            sessions.append(
                SessionInfo(
                    session_id=sid,
                    kind=str(info.get("kind", "exec")),
                    argv=info.get("argv"),
                    context=info.get("context"),
                    running=bool(info.get("running")),
                    exit_code=info.get("exit_code"),
                    signal=info.get("signal"),
                    exit_status=info.get("exit_status"),
                    end_reason=info.get("end_reason"),
                    started_at=info.get("started_at"),
                    bytes=int(info.get("bytes", 0)),
                    attached=bool(info.get("attached")),
                    followed_here=record is not None and record.following,
                    read_offset=record.cursor if record is not None else None,
                    on_vault=True,
                )
            )
        for (name, sid), record in sorted(self._records.items()):
            if name != vault_name or sid in seen:
                continue
            exited = record.exited
            sessions.append(
                SessionInfo(
                    session_id=sid,
                    kind="exec",
                    argv=record.argv,
                    context=record.context,
                    running=exited is None and record.following,
                    exit_code=exited.code if exited else None,
                    signal=exited.signal if exited else None,
                    exit_status=exited.exit_status if exited else None,
                    end_reason=exited.reason if exited else None,
                    started_at=round(record.started_wall, 3),
                    bytes=record.buffer.end,
                    attached=record.following,
                    followed_here=record.following,
                    read_offset=record.cursor,
                    on_vault=False,
                )
            )
        return SessionList(vault=vault_name, sessions=sessions)

    async def close(self) -> None:
        """Stop following (the commands keep running on their vaults), after giving the
        stops of cancelled foreground execs (a client that went away mid-call) a moment."""
        stopping = [task for task in self._stopping if not task.done()]
        if stopping:
            await asyncio.wait(stopping, timeout=KILL_GRACE)
        tasks = [r.task for r in self._records.values() if r.task is not None]
        tasks += list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


__all__ = ["ExecRecord", "ExecRegistry", "tool_error"]
