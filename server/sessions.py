"""The registry of exec sessions and shells, shared by every connection of one init server.

A session is one process plus its output log (a ring buffer with absolute offsets). At
most one client is attached at a time; a new attach displaces the old one, which is told
so (DETACHED) instead of seeing a bare end of stream. Read-only attachments (observers,
protocol 5: an agent following a person's session) follow beside it, displacing no one.

Memory is bounded: ``max_sessions`` sessions of at most ``buffer_size`` bytes of output
each. While a client (or an observer) is attached and a whole buffer behind what it has *acknowledged*
(bytes sent but unacknowledged die with a cut connection), the process's output is paused
(it blocks on a full pipe) instead of losing bytes the client has not got. When the
connection is lost rather than closed on purpose, the same hold lasts ``DETACH_HOLD``
seconds more, so a client that reconnects finds every byte it missed. After that, or after
a deliberate detach, nobody is attached: the oldest bytes are dropped and the next attach is
told how many.

Exited sessions stay until their exit was acknowledged by a client (anonymous one-shot
sessions), or until ``exited_ttl`` seconds passed (named sessions, so ``list-exec`` can
show their exit code). A shell nobody is attached to is hung up after ``shell_idle``
seconds.

Before the workload stops (reprovision, restart, init shutdown) ``end_all`` ends every
running session deliberately: SIGHUP and SIGTERM to its process group, SIGKILL after
``END_GRACE`` seconds, and the reason is kept with its exit (``end_reason``), which
attached clients are told along with the exit status.

In VM mode commands run as the image's root account, as a login would: in its home (unless
the request names a directory), with HOME, USER, LOGNAME, SHELL and PATH from its
``/etc/passwd`` entry; a shell is its login shell. A request that names a ``user`` (protocol
4) runs as that account of the workload's ``/etc/passwd`` instead, with its groups from
``/etc/group``, the same way; in host mode as that user of the host (init must be root to
switch). The request's variables go over the login's. A session keeps the user it was
started as: a reattach names none, and one that does is not asked to (the session exists).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flyvault.defaults import RECONNECT_TIMEOUT
from flyvault.errors import NotFoundError, RemoteProtocolError, TooManySessions, UsageError
from flyvault.protocol.console import OpenSession
from flyvault.protocol.limits import check_cwd, check_env

from .accounts import Account, host_account
from .defaults import DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_BUFFER, DEFAULT_SESSION_TTL
from .outputlog import OutputLog, ReadResult
from .process import Entry, ExitStatus, ManagedProcess
from .session_disk import DiskBudget, DiskLog, DiskLogLimits

log = logging.getLogger("flyvault.server.sessions")

#: ``end_all``: how long sessions get to end on SIGHUP/SIGTERM before SIGKILL, and then
#: how long their ends (exit and last output) are waited for at most.
END_GRACE = 3.0
END_KILL_WAIT = 2.0
#: After a lost connection, output is held this long for the client to reconnect: as long
#: as a client keeps trying by default (--reconnect-timeout).
DETACH_HOLD = RECONNECT_TIMEOUT


@dataclass
class SpawnPolicy:
    """How commands are started: on the host (host mode) or inside the workload."""

    #: Directory for commands that ask for none.
    default_cwd: str | None = None
    #: The base environment of every command.
    base_env: Mapping[str, str] = field(default_factory=dict)
    #: Where to look for bash (the workload's root in VM mode).
    root: str = "/"
    #: ``wrapper(cwd)``: the argv prefix that enters the workload (``nsenter ...``) and
    #: the cwd to hand to the spawner. Asked at every spawn: the workload's PID changes
    #: when it restarts. None: run on this host.
    enter: Callable[[str | None], tuple[list[str], str | None]] | None = None
    #: Allocates PTYs (from the workload's /dev/pts in VM mode).
    openpty: Callable[[], tuple[int, int]] | None = None
    #: VM mode: ``entry(cwd, strict, account)`` starts a command inside the workload with no
    #: process in between (``WorkloadRuntime.entry``), as ``account`` when given (else as
    #: init, root); asked at every spawn. Wins over ``enter``.
    entry: Callable[[str | None, bool, Account | None], Entry] | None = None
    #: VM mode: ``account(user)``, the workload's login account (``WorkloadRuntime.account``,
    #: root by default): its home is the default directory, its variables the environment,
    #: its shell the shell's. Raises ``SpawnError`` for an unknown user.
    account: Callable[[str], Account] | None = None
    #: VM mode: whether a path exists inside the workload (for the login shell).
    exists: Callable[[str], bool] | None = None

    def prepare(self, cwd: str | None) -> tuple[list[str], str | None]:
        cwd = cwd or self.default_cwd
        if self.enter is None:
            return [], cwd
        return self.enter(cwd)

    def shell_argv(self, login_shell: str | None = None) -> list[str]:
        if self.root == "/":
            bash = shutil.which("bash")
            return [bash, "-l"] if bash else ["/bin/sh", "-l"]
        exists = self.exists or (lambda path: os.path.exists(os.path.join(self.root, path[1:])))
        if login_shell and exists(login_shell):
            return [login_shell, "-l"]
        if exists("/bin/bash"):
            return ["/bin/bash", "-l"]
        return ["/bin/sh", "-l"]


def _start_in(env: dict[str, str], explicit: dict[str, str], directory: str | None) -> None:
    """PWD names the directory the command starts in, and OLDPWD goes, as a login's shell
    sets them; host mode's environment is init's own, whose PWD named init's directory (a
    Makefile's $(PWD), node's process.env.PWD read that). An --env value stays."""
    if "OLDPWD" not in explicit:
        env.pop("OLDPWD", None)
    if "PWD" in explicit:
        return
    if directory:
        env["PWD"] = directory
    else:
        env.pop("PWD", None)


#: Variables of the server's own login session, dropped when a session runs as another
#: account (sshd starts such a session without them too).
OWN_SESSION_VARS = (
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "XDG_STATE_HOME",
    "DBUS_SESSION_BUS_ADDRESS",
    "MAIL",
)


class Attachment:
    """One client's view of a session: how far it has been sent, and how much of that the
    client has confirmed (``unacked`` counts what is sent but not yet acknowledged by the
    client's QUIC stack: after a silent network cut those bytes never arrive)."""

    def __init__(
        self, offset: int, unacked: Callable[[], int] = lambda: 0, *, observer: bool = False
    ) -> None:
        self.offset = offset
        self.unacked = unacked
        #: A read-only attach: beside the attached client, never displacing it.
        self.observer = observer
        self.displaced = asyncio.Event()
        self.reason = ""

    def confirmed(self) -> int:
        """The offset up to which the client surely has the output."""
        return max(0, self.offset - self.unacked())

    def displace(self, reason: str) -> None:
        self.reason = reason
        self.displaced.set()


class Session:
    def __init__(
        self,
        request: OpenSession,
        argv: list[str],
        buffer_size: int,
        clock: Callable[[], float],
        disk: DiskLog | None = None,
    ) -> None:
        self.id = request.session_id
        self.argv = argv
        self.context = request.context
        #: The account it runs as (list-exec shows it); set when it is started.
        self.user: str | None = None
        self.pty = request.pty or request.shell
        self.kind = "shell" if request.shell else "exec"
        self.keep = request.keep
        self.started_at = time.time()
        self.log = OutputLog(buffer_size)
        #: Named sessions: the head and a long tail of the output on disk, past the ring.
        self.disk = disk
        self.process: ManagedProcess | None = None
        self.exit: ExitStatus | None = None
        #: Why the vault ended it (reprovision, restart, shutdown), when it did.
        self.end_reason: str | None = None
        self.exited_at: float | None = None
        self.exit_acknowledged = False
        #: Standard input bytes taken from clients (all attachments), for exact resends.
        self.stdin_handled = 0
        self.attachment: Attachment | None = None
        #: Read-only attachments (protocol 5): they follow the output and change nothing.
        self.observers: set[Attachment] = set()
        self.detached_since: float | None = clock()
        self._clock = clock
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()
        self._paused = False
        self._hold_until: float | None = None
        self._hold_offset = 0

    # Output ---------------------------------------------------------------------------

    def on_output(self, channel: int, data: bytes) -> None:
        self.log.append(channel, data)
        if self.disk is not None:
            self.disk.append(channel, data)
        self._apply_backpressure()
        self._notify()

    def first_held(self, offset: int) -> int:
        """``offset`` if its byte is still held (in the ring or on disk), else the next
        offset that is: where a replay from ``offset`` starts."""
        if offset >= self.log.start:
            return min(offset, self.log.end)
        disk = self.disk
        if disk is None or disk.failed:
            return self.log.start
        return min(disk.first_held(offset), self.log.start)

    def read(self, offset: int, max_bytes: int) -> ReadResult:
        """Output from ``offset``: from the ring, or from disk for what the ring no longer
        holds; ``dropped`` counts the bytes neither holds."""
        start = self.first_held(offset)
        if start >= self.log.start or self.disk is None:
            result = self.log.read(start, max_bytes)
        else:
            result = self.disk.read(start, min(max_bytes, self.log.start - start))
        return ReadResult(result.chunks, result.start_offset, result.next_offset, start - offset)

    def close(self) -> None:
        """The session is gone from the registry: its disk log goes too."""
        if self.disk is not None:
            self.disk.close()
            self.disk = None

    def _apply_backpressure(self) -> None:
        if self.process is None:
            return
        floor = self._kept_from()
        # Leave room for one more read before bytes the client may still need are dropped.
        should_pause = floor is not None and self.log.end - floor >= self._held_span() - 65536
        if should_pause and not self._paused:
            self.process.pause_output()
            self._paused = True
        elif not should_pause and self._paused:
            self.process.resume_output()
            self._paused = False

    def _held_span(self) -> int:
        """How far behind the newest byte a reader may be and lose nothing: the ring, or
        with a healthy disk log the disk tail (which always holds ``tail_bytes``), so a
        reader replaying from disk does not pause the command."""
        disk = self.disk
        if disk is None or disk.failed:
            return self.log.capacity
        limits = disk.limits
        return max(self.log.capacity, limits.tail_bytes)

    @property
    def output_held(self) -> bool:
        """The process's output is paused by backpressure (see ``_kept_from``)."""
        return self._paused

    def _kept_from(self) -> int | None:
        """The lowest offset the ring must keep, or None when the oldest may be dropped.

        Attached: what the client has confirmed (bytes sent but unacknowledged may be lost
        with the connection, and the client then resumes from before them). Just after a
        connection was lost: what that client had confirmed, until ``DETACH_HOLD`` passes,
        so a client that reconnects at once finds every byte it missed."""
        floors = [observer.confirmed() for observer in self.observers]
        if self.attachment is not None:
            floors.append(self.attachment.confirmed())
        elif self._hold_until is not None and self._clock() < self._hold_until:
            floors.append(self._hold_offset)
        return min(floors) if floors else None

    def release_hold(self, now: float) -> None:
        """The lost client did not come back in time: the oldest bytes may go again."""
        if self._hold_until is not None and now >= self._hold_until:
            self._hold_until = None
            self._apply_backpressure()

    def sent(self, attachment: Attachment, offset: int) -> None:
        attachment.offset = offset
        self._apply_backpressure()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def change_event(self) -> asyncio.Event:
        """The event the next change sets. Take it *before* checking the state, then wait:
        taking it later could miss a change made in between."""
        return self._changed

    # Lifecycle ------------------------------------------------------------------------

    async def supervise(self) -> None:
        assert self.process is not None
        status = await self.process.wait()
        self.exit = status
        self.exited_at = self._clock()
        log.info(
            "session %s exited: %s%s",
            self.id,
            status,
            f" ({self.end_reason})" if self.end_reason else "",
        )
        self._notify()
        self._ended.set()

    async def ended(self) -> None:
        """Return once the session's exit is recorded."""
        await self._ended.wait()

    def attach(self, offset: int, unacked: Callable[[], int] = lambda: 0) -> Attachment:
        if self.attachment is not None:
            self.attachment.displace("another client attached to this session")
        self.attachment = Attachment(offset, unacked)
        self.detached_since = None
        self._hold_until = None
        self._apply_backpressure()
        return self.attachment

    def observe(self, offset: int, unacked: Callable[[], int] = lambda: 0) -> Attachment:
        """A read-only attachment: it gets the output (held for it like for the attached
        client, so it loses nothing) and displaces no one."""
        observer = Attachment(offset, unacked, observer=True)
        self.observers.add(observer)
        self._apply_backpressure()
        return observer

    def detach(self, attachment: Attachment, *, lost_at: int | None = None) -> None:
        """``lost_at``: the connection went away (the client did not detach on purpose)
        with the client holding output up to this offset; output is then held for
        ``DETACH_HOLD`` seconds for it to reconnect."""
        if attachment.observer:
            self.observers.discard(attachment)
            self._apply_backpressure()
        elif self.attachment is attachment:
            if lost_at is not None and self.running:
                self._hold_until = self._clock() + DETACH_HOLD
                self._hold_offset = lost_at
            self.attachment = None
            self.detached_since = self._clock()
            self._apply_backpressure()

    @property
    def running(self) -> bool:
        return self.exit is None

    def info(self) -> dict[str, Any]:
        exit_status = self.exit
        return {
            "session_id": self.id,
            "kind": self.kind,
            "argv": self.argv,
            "context": self.context,
            "user": self.user,
            "pty": self.pty,
            "attached": self.attachment is not None,
            "observers": len(self.observers),
            "running": exit_status is None,
            "exit_code": exit_status.code if exit_status else None,
            "signal": exit_status.signal if exit_status else None,
            "exit_status": exit_status.exit_status if exit_status else None,
            "end_reason": self.end_reason if exit_status else None,
            "pid": self.process.pid if self.process else None,
            "started_at": self.started_at,
            "bytes": self.log.end,
            "retained_from": self.first_held(0),
        }


def _own_user_name() -> str | None:
    """Host mode without a named user: commands run as the server's own user."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


def _check_request(request: OpenSession) -> None:
    """What the client should have checked (``ExecRequest``): a relative cwd, a variable
    name with '=', too much environment. Refused as a bad request, naming the problem."""
    try:
        if request.cwd is not None:
            check_cwd(request.cwd)
        check_env(request.env)
    except RemoteProtocolError as exc:
        raise UsageError(f"exec request: {exc.message}") from None


class SessionRegistry:
    def __init__(
        self,
        policy: SpawnPolicy,
        *,
        buffer_size: int = DEFAULT_SESSION_BUFFER,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        exited_ttl: float = DEFAULT_SESSION_TTL,
        shell_idle: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        disk_root: Path | None = None,
        disk_limits: DiskLogLimits | None = None,
    ) -> None:
        self.policy = policy
        self.buffer_size = buffer_size
        #: Where named sessions' output logs go (None: memory only), and how much of each.
        self.disk_limits = disk_limits or DiskLogLimits()
        self.disk_budget = (
            DiskBudget(disk_root, self.disk_limits.total_bytes) if disk_root is not None else None
        )
        self._disk_logs = 0
        self.max_sessions = max_sessions
        self.exited_ttl = exited_ttl
        self.shell_idle = shell_idle
        self.sessions: dict[str, Session] = {}
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._collector: asyncio.Task[None] | None = None

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFoundError(
                f"exec session {session_id} not found",
                hint="list the vault's sessions with: fly-vault list-exec VAULT",
            )
        return session

    async def open(self, request: OpenSession) -> tuple[Session, bool]:
        """Find the session, or start it when the request may create one."""
        existing = self.sessions.get(request.session_id)
        if existing is not None:
            return existing, False
        if not request.create:
            self.get(request.session_id)  # raises NotFoundError
        self.collect()
        if len(self.sessions) >= self.max_sessions:
            raise TooManySessions(
                f"too many sessions on this vault ({self.max_sessions}); stop some with "
                "fly-vault kill VAULT SESSION"
            )
        _check_request(request)
        policy = self.policy
        env = dict(policy.base_env)
        # Who it runs as: the named user (switched to), else the login account (VM mode:
        # root, init's own credentials) or, in host mode, the server's user as it is.
        switch: Account | None = None
        account: Account | None = None
        if policy.account is not None:
            account = policy.account(request.user or "root")
            switch = account if request.user is not None else None
        elif request.user is not None:
            account = switch = host_account(request.user)
        if switch is not None:
            # The server's own per-user session (its runtime dir, its XDG dirs, its bus)
            # is not the switched-to user's: a program would use, or refuse, the wrong one.
            for name in OWN_SESSION_VARS:
                env.pop(name, None)
        if account is not None:
            env.update(account.environment())  # as sshd: HOME, USER, LOGNAME, SHELL, PATH
        if request.shell:
            argv = policy.shell_argv(account.shell if account is not None else None)
        else:
            argv = list(request.argv or ())
        session = Session(request, argv, self.buffer_size, self._clock, self._disk_log(request))
        session.user = account.name if account is not None else _own_user_name()
        explicit = dict(request.env)
        # --env TERM=... wins over the terminal's own, as any --env wins over the login's.
        term = None if "TERM" in explicit else request.term
        if term:
            env["TERM"] = term
        env.update(explicit)
        self.sessions[session.id] = session
        try:
            entry: Entry | None = None
            wrapper: list[str] = []
            cwd = request.cwd
            if policy.entry is not None:
                # The login's home unless the request names a directory (which must exist).
                home = account.home if account is not None else "/"
                # The entry starts in "/" when the home is missing: PWD says where it is.
                start = cwd or (home if policy.exists is None or policy.exists(home) else "/")
                _start_in(env, explicit, start)
                entry = policy.entry(cwd or home, cwd is not None, switch)
            else:
                if switch is not None and cwd is None:  # the login's home, if it has one
                    cwd = switch.home if os.path.isdir(switch.home) else "/"
                _start_in(env, explicit, cwd or policy.default_cwd)
                wrapper, cwd = policy.prepare(cwd)
            session.process = await ManagedProcess.spawn(
                argv,
                pty=session.pty,
                on_output=session.on_output,
                term=term,
                rows=request.rows,
                cols=request.cols,
                cwd=cwd,
                env=env,
                wrapper=wrapper,
                openpty=policy.openpty if session.pty else None,
                entry=entry,
                account=switch if entry is None else None,
            )
        except BaseException:
            self._remove(session)
            raise
        log.info(
            "session %s started: pid %d, %s%s",
            session.id,
            session.process.pid,
            session.kind,
            f", context: {session.context}" if session.context else "",
        )
        task = asyncio.get_running_loop().create_task(session.supervise())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._ensure_collector()
        return session, True

    def _disk_log(self, request: OpenSession) -> DiskLog | None:
        """A disk log for a named session, when init keeps them. Trouble creating one is
        said and costs the session only the disk log."""
        budget = self.disk_budget
        if not request.keep or budget is None or not self.disk_limits.enabled:
            return None
        self._disk_logs += 1
        directory = budget.root / f"{request.session_id}.{os.getpid()}.{self._disk_logs}"
        try:
            budget.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not budget.allows(self.disk_limits.head_bytes):
                log.info("session %s: no output log on disk (budget used up)", request.session_id)
                return None
            return DiskLog(directory, self.disk_limits, budget)
        except OSError as exc:
            log.warning("session %s: no output log on disk: %s", request.session_id, exc)
            return None

    def _remove(self, session: Session) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        session.close()

    def acknowledge_exit(self, session: Session) -> None:
        session.exit_acknowledged = True
        if not session.keep:
            self._remove(session)

    def kill(self, session_id: str, signo: int) -> Session:
        session = self.get(session_id)
        if session.process is not None and session.running:
            session.process.send_signal(signo)
        return session

    def list(self) -> list[dict[str, Any]]:
        return [self.sessions[key].info() for key in sorted(self.sessions)]

    def collect(self) -> None:
        """Drop finished sessions past their time; hang up shells left alone too long."""
        now = self._clock()
        for session in list(self.sessions.values()):
            session.release_hold(now)
            if session.exit is not None:
                assert session.exited_at is not None
                expired = now - session.exited_at >= self.exited_ttl
                done = session.exit_acknowledged and not session.keep
                followed = session.attachment is not None or session.observers
                if not followed and (expired or done):
                    self._remove(session)
            elif (
                session.kind == "shell"
                and session.detached_since is not None
                and now - session.detached_since >= self.shell_idle
                and session.process is not None
            ):
                log.info("hanging up shell %s: detached for %.0f s", session.id, self.shell_idle)
                session.process.send_signal(signal.SIGHUP)
                session.detached_since = None

    def _ensure_collector(self) -> None:
        if self._collector is None or self._collector.done():
            self._collector = asyncio.get_running_loop().create_task(self._collect_forever())

    async def _collect_forever(self) -> None:
        while self.sessions:
            await asyncio.sleep(5.0)
            self.collect()

    async def end_all(self, reason: str, grace: float = END_GRACE) -> None:
        """End every running session deliberately, with ``reason`` (the workload is about
        to stop): SIGHUP (what a shell gets when its terminal goes) and SIGTERM to each
        process group, SIGKILL after ``grace`` seconds. Returns once each has ended (its
        exit recorded and its output read, bounded), so attached clients get the exit
        with the reason before the workload goes."""
        running = [s for s in self.sessions.values() if s.running and s.process is not None]
        if not running:
            return
        log.info("ending %d session(s): %s", len(running), reason)
        waits = []
        for session in running:
            session.end_reason = reason
            assert session.process is not None
            for signo in (signal.SIGHUP, signal.SIGCONT, signal.SIGTERM):
                session.process.send_signal(signo)
            waits.append(asyncio.ensure_future(session.ended()))
        _, pending = await asyncio.wait(waits, timeout=grace)
        if pending:
            for session in running:
                if session.running and session.process is not None:
                    log.info("session %s did not end within %g s: killing it", session.id, grace)
                    session.process.kill()
            _, pending = await asyncio.wait(pending, timeout=END_KILL_WAIT)
        for waiter in pending:
            waiter.cancel()

    def close(self) -> None:
        """Stop every process (server shutdown)."""
        for session in self.sessions.values():
            if session.process is not None and session.running:
                session.process.kill()
            session.close()
        if self._collector is not None:
            self._collector.cancel()
