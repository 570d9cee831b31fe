"""The workload runtime: the user's rootfs in its own PID, mount, cgroup, UTS and IPC namespaces.

``WorkloadRuntime.start()`` makes the workload's cgroup subtree (``server.cgroups``), then
launches ``server/nsinit.py``: its ``launch`` step joins that cgroup and execs ``unshare
--pid --mount --cgroup --uts --ipc --fork`` (never ``fork()`` of this asyncio process for
the workload, §12 and flaw 18); nsinit becomes PID 1 of the new namespaces, sets the
hostname, mounts the workload's filesystems, pivots into the rootfs and execs its
``/sbin/init`` (or stays as a minimal reaper: FALLBACK_INIT).

Commands enter the workload with ``entry()``: the command's own process is forked straight
into the workload's PID namespace (the forking thread's ``pid_for_children`` is switched
for the duration of the fork) and joins the init's cgroup and the other namespaces and its
root before exec. No helper process stays in between: the util-linux ``nsenter`` that the
first versions used waits for its child and stops itself whenever the child is stopped,
and systemd's shutdown stops every process it sees, so nsenter stayed stopped forever,
holding its child's exit and with it the whole namespace (issue 11).

Processes: our only child of the workload itself is the launcher/unshare (reaped by
asyncio's child watcher, which waits for that pid only; nothing here calls
``waitpid(-1)``, §1.8). unshare's child is the namespace's init; we signal it through a
pidfd, so a recycled pid can never be hit. ``--kill-child`` ties the namespace to unshare
and ``PR_SET_PDEATHSIG`` ties unshare to us: if the server dies, the workload dies with it
instead of running on unsupervised next to a new one. What a generation was (its cgroups,
init, namespaces) is written to a state file; a new init ends whatever of it is still
there before its first start (``recover``).

A supervision task restarts the workload when it dies on its own (flaw 17: the original
restarted it only when a client happened to connect), with an exponential backoff while it
keeps dying young. Every deliberate stop first lets ``on_stop`` end the sessions with a
reason, then is graceful (SIGTERM, or SIGRTMIN+4 for systemd, which re-executes itself on
SIGTERM), then forcible (flaw 23); the cgroup subtree is removed after every stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flyvault.errors import ProvisionError
from flyvault.protocol.constants import RuntimeStatus

from . import cgroups
from .accounts import MAX_ACCOUNT_FILE, Account, parse_groups, parse_passwd, unknown_user
from .cgroups import Limits, WorkloadCgroups
from .nsinit import FALLBACK_MARKER, WORKLOAD_ENV
from .workload_entry import NAMESPACES, WorkloadEntry, not_running, open_inside

log = logging.getLogger("flyvault.server.runtime")

NSINIT = Path(__file__).with_name("nsinit.py")
#: A workload that ran at least this long before dying restarts after the initial delay;
#: one that dies younger doubles the delay (a crash loop must not spin).
STABLE_AFTER = 60.0

# ioctls for allocating a PTY in the workload's devpts instance (see openpty).
_TIOCSPTLCK = 0x40045431
_TIOCGPTPEER = 0x5441

#: The file (in the data directory) describing the running generation, for ``recover``.
STATE_FILE = "workload.json"
#: Hostnames: at most 63 bytes of letters, digits and '-' (other characters become '-').
_HOSTNAME_BAD = re.compile(r"[^A-Za-z0-9-]+")
DEFAULT_HOSTNAME = "fly-vault"


def hostname_for(name: str | None) -> str:
    """A valid hostname made of ``name`` (the vault's name), else ``fly-vault``."""
    text = _HOSTNAME_BAD.sub("-", name or "").strip("-")[:63].strip("-")
    return text or DEFAULT_HOSTNAME


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, its identity."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            text = file.read()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[19])


def _namespace(pid: int | str, kind: str) -> tuple[int, int] | None:
    try:
        info = os.stat(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: only its parent can reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            text = file.read()
    except OSError:
        return True
    return text[text.rindex(")") + 2 :].startswith(("Z", "X"))


def recover_leftovers(state: Mapping[str, Any], extra_tops: Sequence[Path] = ()) -> list[str]:
    """End whatever a previous init's workload left: its init, every process in its cgroups
    and every process sharing one of its namespaces (helpers such as a stopped ``nsenter``
    included); then delete its cgroups. Returns what was done, for the log."""
    own = {(kind, _namespace("self", kind)) for kind in NAMESPACES}
    tops = [Path(top) for top in state.get("cgroups", {}).get("tops", [])]
    tops += [top for top in extra_tops if top not in tops]
    suspects: set[int] = set()
    recorded: set[tuple[str, tuple[int, int]]] = set()
    for role in ("init", "launcher"):
        record = state.get(role) or {}
        pid = record.get("pid")
        if isinstance(pid, int) and pid > 1 and _start_time(pid) == record.get("start_time"):
            suspects.add(pid)
            if role == "init":
                # Its namespaces cannot have been freed and their numbers reused while it
                # is still there (even half-exited, waiting for a stopped helper): trust them.
                for kind, ns in (state.get("namespaces") or {}).items():
                    if kind in NAMESPACES and isinstance(ns, list) and len(ns) == 2:
                        recorded.add((kind, (int(ns[0]), int(ns[1]))))
    for top in tops:
        if top.is_dir():
            suspects |= cgroups.procs(top)
    namespaces = {
        (kind, ns)
        for pid in suspects
        for kind in NAMESPACES
        if (ns := _namespace(pid, kind)) is not None
    }
    namespaces = (namespaces | recorded) - own
    if namespaces:
        for pid in _all_pids():
            if any((kind, _namespace(pid, kind)) in namespaces for kind in NAMESPACES):
                suspects.add(pid)
    suspects.discard(os.getpid())
    notes = []
    if suspects:
        stopped = [pid for pid in suspects if _state(pid) in ("T", "t")]
        notes.append(
            f"ended {len(suspects)} process(es) left by the previous workload"
            + (f" ({len(stopped)} of them stopped)" if stopped else "")
        )
        cgroups.kill_processes(suspects)
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in suspects) and time.monotonic() < deadline:
            time.sleep(0.02)
    existing = [top for top in tops if top.is_dir()]
    if existing:
        if cgroups.kill_and_remove(existing, 10.0):
            notes.append(f"removed the previous workload's cgroups ({len(existing)} hierarchies)")
        else:
            notes.append("could not remove the previous workload's cgroups")
    for parent, controller in state.get("cgroups", {}).get("enabled", []):
        with contextlib.suppress(OSError):
            Path(parent, "cgroup.subtree_control").write_text(f"-{controller}")
    return notes


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as file:
            text = file.read()
    except OSError:
        return ""
    return text[text.rindex(")") + 2 :][:1]


def _pin_child(pid: int) -> list[int]:
    """``[child pid, pidfd]`` of unshare's only child, or [] if it is gone already.

    A pidfd names whatever has the pid when it is opened; the child is still the same
    process if unshare has it as a child afterwards (unshare reaps it, so until then the
    pid cannot be recycled). From then on signals go through the pidfd, never the pid.
    """
    for child in _children(pid):
        try:
            pidfd = os.pidfd_open(child)
        except ProcessLookupError:
            continue
        if child in _children(pid):
            return [child, pidfd]
        os.close(pidfd)
    return []


async def _exits(process: asyncio.subprocess.Process, timeout: float) -> bool:
    """Whether ``process`` exits within ``timeout`` seconds."""
    try:
        await asyncio.wait_for(asyncio.shield(process.wait()), timeout)
    except TimeoutError:
        return False
    return True


async def _kill_unadopted(process: asyncio.subprocess.Process, pinned: list[int]) -> None:
    """Kill a half-started workload and wait until all of it is gone."""
    if len(pinned) != 2:
        pinned += _pin_child(process.pid)
    if len(pinned) == 2:
        # The init: unshare then exits once the namespace is empty (see _terminate).
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pinned[1], signal.SIGKILL)
    else:  # no child (yet): nothing else to wait for
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    await asyncio.shield(process.wait())


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s children, from /proc (unshare has a single thread)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(word) for word in file.read().split()]
    except OSError:
        return []


class WorkloadRuntime:
    """The workload's namespaces, its init, and their supervision. Root only.

    ``rootfs`` is the host directory that becomes the workload's ``/``; ``persist_dir``
    holds ``root`` and ``home``, bind-mounted onto ``/root`` and ``/home``. ``init_binary``
    is a path inside the rootfs. The workload's stdout/stderr (the init's console) go to
    ``console`` (a file, appended) or else to the server's own.
    """

    def __init__(
        self,
        rootfs: str | os.PathLike[str],
        persist_dir: str | os.PathLike[str],
        *,
        init_binary: str = "/sbin/init",
        console: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
        restart_delay: float = 1.0,
        max_restart_delay: float = 30.0,
        hostname: str | None = None,
        limits: Limits | None = None,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.rootfs = Path(rootfs)
        self.persist_dir = Path(persist_dir)
        self.init_binary = init_binary
        self.console = Path(console) if console is not None else None
        self.start_timeout = start_timeout
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        #: The workload's hostname (its own UTS namespace): the vault's name.
        self.hostname = hostname_for(hostname)
        self.limits = limits or Limits()
        #: Where the running generation is described (``workload.json``), for ``recover``.
        self.state_dir = Path(state_dir) if state_dir is not None else self.persist_dir.parent
        self.cgroups = WorkloadCgroups(cgroups.subtree_name(self.state_dir), self.limits)
        #: Called with a reason before every deliberate stop (the server ends the sessions
        #: there), and after the workload died on its own.
        self.on_stop: Callable[[str], Awaitable[None]] | None = None
        #: How many times the supervisor restarted a workload that died on its own.
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None  # launcher, then unshare
        self._init_pid: int | None = None  # the namespace's PID 1, as seen from here
        self._pidfd: int | None = None
        self._fallback = False
        self._boot_id: str | None = None
        self._started_at = 0.0
        self._want_running = False
        self._stopping = False
        self._recovered = False
        self._lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike[str], **options: Any) -> WorkloadRuntime:
        """The layout of §6.1: ``DATA/rootfs`` and ``DATA/persist/{root,home}``."""
        data = Path(data_dir)
        return cls(data / "rootfs", data / "persist", **options)

    # State ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def boot_id(self) -> str | None:
        """A new identity per start of the workload; None while it has never run."""
        return self._boot_id

    @property
    def init_pid(self) -> int | None:
        """The outer pid of the namespace's PID 1, while the workload runs."""
        return self._init_pid if self.running else None

    @property
    def env(self) -> dict[str, str]:
        """The base environment for commands run inside (never the server's own)."""
        return dict(WORKLOAD_ENV)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def entry(
        self, cwd: str | None = None, *, strict: bool = True, account: Account | None = None
    ) -> WorkloadEntry:
        """How a command enters the workload now (for ``ManagedProcess.spawn(entry=...)``).

        ``cwd`` is a directory inside the workload (default ``/``); ``account`` the user it
        runs as (default: init's own credentials, root). Ask for every spawn: it names the
        current init, which changes on restart.
        """
        pid, pidfd = self.init_pid, self._pidfd
        if pid is None or pidfd is None:
            raise not_running()
        if self._stopping:
            raise ProvisionError(
                "the vault's workload is stopping", hint="try again once it has restarted"
            )
        files = self.cgroups.init_cgroup_files(pid) if self.cgroups.active else []
        return WorkloadEntry(pid, pidfd, files, cwd, strict=strict, account=account)

    def account(self, user: str = "root") -> Account:
        """``user``'s passwd entry in the running workload, with its groups from the
        workload's /etc/group. Root has defaults when the image has no entry for it; any
        other unknown user raises ``SpawnError`` (never root's account)."""
        passwd = self._read_inside("/etc/passwd")
        found = parse_passwd(passwd, user) if passwd is not None else None
        if found is None:
            if user != "root":
                raise unknown_user(user, "the vault's /etc/passwd")
            found = Account()
        groups = self._read_inside("/etc/group")
        return found.with_groups(parse_groups(groups or "", found.name, found.gid))

    def _read_inside(self, path: str) -> str | None:
        """A text file as the workload sees it (symlinks resolved inside), or None."""
        try:
            with self._root() as root:
                fd = open_inside(root, path)
                with os.fdopen(fd, "rb") as file:
                    return file.read(MAX_ACCOUNT_FILE).decode("utf-8", "replace")
        except (OSError, ProvisionError):
            return None

    def exists_inside(self, path: str) -> bool:
        """Whether ``path`` exists as the workload sees it (symlinks resolved inside)."""
        try:
            with self._root() as root:
                os.close(open_inside(root, path, os.O_PATH))
        except (OSError, ProvisionError):
            return False
        return True

    @contextlib.contextmanager
    def _root(self) -> Iterator[int]:
        pid = self.init_pid
        if pid is None:
            raise not_running()
        root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield root
        finally:
            os.close(root)

    def status(self) -> RuntimeStatus:
        if not self.running:
            return RuntimeStatus.NOT_STARTED
        return RuntimeStatus.FALLBACK_INIT if self._fallback else RuntimeStatus.SYSTEM_INIT

    def wrapper(self, cwd: str | None = None) -> list[str]:
        """An ``nsenter`` prefix that runs a command inside the workload (diagnostics and
        tests; sessions use ``entry()``, which leaves no helper process in between).

        nsenter joins the mount and PID namespaces of the workload's init (forking, so the
        command is a member of the PID namespace) and takes the init's root. The working
        directory is ``cwd`` resolved inside the workload, else the init's (``/``). Call it
        for every spawn: it names the current init's pid, which changes on restart.
        """
        pid = self.init_pid
        if pid is None:
            raise ProvisionError(
                "the workload is not running", hint="it restarts by itself; try again shortly"
            )
        where = f"--wdns={cwd}" if cwd else "--wd"
        return ["nsenter", f"--target={pid}", "--mount", "--pid", "--root", where, "--"]

    def host_path(self, path: str) -> Path:
        """A path inside the running workload, as reachable from the host."""
        pid = self.init_pid
        if pid is None:
            raise ProvisionError("the workload is not running")
        return Path(f"/proc/{pid}/root") / path.lstrip("/")

    def openpty(self) -> tuple[int, int]:
        """Like ``os.openpty()``, but the PTY belongs to the workload's ``/dev/pts``.

        A PTY from the host's devpts works through nsenter, but its slave has no name
        inside the workload (its /dev/pts is a private instance), so ``tty``, tmux, sudo
        and the like see "not a tty". Allocating from the workload's own ptmx (reached
        through /proc/PID/root) and getting the slave with TIOCGPTPEER (no path lookup)
        gives a slave that is ``/dev/pts/N`` in there. Both fds are non-inheritable.
        """
        master = os.open(self.host_path("/dev/pts/ptmx"), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))  # unlockpt
            slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except BaseException:
            os.close(master)
            raise
        return master, slave

    # Lifecycle ------------------------------------------------------------------------

    async def start(self, *, settle: float = 0.0) -> None:
        """Start the workload (if it is not running) and supervise it until ``stop()``.

        Returns once the init runs (or the fallback init, when the rootfs has none). With
        ``settle``, it must also stay up that long, else ProvisionError: the check a
        reprovision needs to roll back a rootfs whose init dies at once (flaw 16).
        """
        self._check_host()
        async with self._lock:
            await self._recover_once()
            if not self.running:
                await self._launch()
                if settle > 0:
                    await self._settle(settle)
            self._want_running = True
            self._ensure_supervisor()

    async def start_watched(self, *, settle: float, ready: float) -> asyncio.Future[None]:
        """Start the workload; return once it is demonstrably up, watching the rest of
        ``settle`` in the background (a reprovision answers its client at that point).

        Up means: the fallback init said so (it is our own reaper, nothing of the image's
        runs in it yet), or the image's init was exec'd and is still alive ``ready`` s
        later, which catches the deaths seen in practice (exec failures, missing
        libraries, a script that exits) before anything is answered. The returned task
        ends when ``settle`` s have passed since the start: with None if the init stayed
        up (or was stopped or replaced on purpose meanwhile), with ProvisionError if it
        died on its own, after which nothing of it is left. Supervision (restarts) only
        begins once the window has passed, so a death inside it is reported, never
        quietly restarted. Raises ProvisionError if it does not start or dies within
        ``ready``, like ``start(settle=...)``.
        """
        self._check_host()
        loop = asyncio.get_running_loop()
        async with self._lock:
            await self._recover_once()
            if self.running:  # nothing new was started: nothing to watch
                self._want_running = True
                self._ensure_supervisor()
                done: asyncio.Future[None] = loop.create_future()
                done.set_result(None)
                return done
            await self._launch()
            if not self._fallback and ready > 0:
                await self._settle(min(ready, settle))
            process = self._process
            assert process is not None
            return loop.create_task(
                self._watch(process, self._started_at + settle, settle), name="workload-settle"
            )

    async def _watch(
        self, process: asyncio.subprocess.Process, deadline: float, settle: float
    ) -> None:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        died = await _exits(process, remaining) if remaining > 0 else process.returncode is not None
        async with self._lock:
            if self._process is not process:
                return  # stopped or restarted on purpose inside the window: not a failure
            if died:
                lived = loop.time() - self._started_at
                if self.on_stop is not None:  # sessions started since the answer are told
                    with contextlib.suppress(Exception):
                        await self.on_stop(
                            "the vault's new workload stopped inside its settle window; "
                            "the previous rootfs is being restored"
                        )
                self._forget()
                await self._release()
                raise ProvisionError(
                    f"the workload's init {self.init_binary} exited {lived:.1f} s after its "
                    f"start, within the {settle:g} s settle window (status {process.returncode}; "
                    "see the server log)"
                )
            self._want_running = True
            self._ensure_supervisor()

    async def recover(self) -> None:
        """End what a previous init's workload left behind (see ``recover_leftovers``).

        Done once, before the first start; ``start`` calls it, and init at boot even when
        the vault has nothing to start.
        """
        async with self._lock:
            await self._recover_once()

    async def _recover_once(self) -> None:
        if self._recovered or self._process is not None:
            return
        self._recovered = True
        state: dict[str, Any] = {}
        path = self.state_dir / STATE_FILE
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(path.read_text())
            if not isinstance(state, dict):
                state = {}
        extra = cgroups.existing(self.cgroups.name)
        if not state and not extra:
            return
        notes = await asyncio.to_thread(recover_leftovers, state, extra)
        for note in notes:
            log.warning("recovery: %s", note)
        with contextlib.suppress(OSError):
            path.unlink()

    async def stop(
        self, grace: float = 10.0, reason: str = "the vault's workload is stopping"
    ) -> None:
        """Stop the workload: ``on_stop(reason)`` ends the sessions, then everything in its
        namespace ends (gracefully, then killed) and its cgroups are removed."""
        self._want_running = False
        await self._cancel_supervisor()  # it may hold the lock, half-way through a restart
        async with self._lock:
            # Again: a restart() that held the lock meanwhile may have wanted it running.
            self._want_running = False
            await self._cancel_supervisor()
            await self._terminate(grace, reason)

    async def _cancel_supervisor(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor

    async def restart(
        self, grace: float = 10.0, reason: str = "the vault's workload is restarting"
    ) -> None:
        """Stop and start again: a new boot_id once this returns."""
        self._check_host()
        async with self._lock:
            await self._terminate(grace, reason)
            await self._launch()
            self._want_running = True
            self._ensure_supervisor()

    def _ensure_supervisor(self) -> None:
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.get_running_loop().create_task(
                self._supervise(), name="workload-supervisor"
            )

    async def _settle(self, seconds: float) -> None:
        process = self._process
        assert process is not None
        if not await _exits(process, seconds):
            return
        self._forget()
        await self._release()
        raise ProvisionError(
            f"the workload's init {self.init_binary} exited within {seconds:g} s of its start "
            f"(status {process.returncode}; see the server log)"
        )

    def _check_host(self) -> None:
        if os.geteuid() != 0:
            raise ProvisionError(
                "the workload runtime needs root (namespaces, mounts, pivot_root)",
                hint="run fly-vault-init as root, or use --host-mode to run commands on "
                "this host without a rootfs",
            )
        for tool in ("unshare",):
            if shutil.which(tool) is None:
                raise ProvisionError(
                    f"the workload runtime needs {tool!r}, which is not on PATH",
                    hint="install util-linux",
                )
        if not self.rootfs.is_dir():
            raise ProvisionError(f"the rootfs {self.rootfs} is not a directory")

    def _command(self, status_path: str) -> list[str]:
        # -I: no PYTHON* variables, user site or cwd on sys.path; -S: no site-packages
        # (nsinit is stdlib only).
        python = [sys.executable, "-I", "-S", str(NSINIT)]
        # The launcher joins the workload's cgroups (so the cgroup namespace is rooted
        # there) and gets SIGKILL when this process dies, kept across its exec of unshare.
        launcher = [*python, "launch", "--status", status_path, "--parent", str(os.getpid())]
        for path in self.cgroups.join_files():
            launcher += ["--join", str(path)]
        # --kill-child: if unshare dies, so does its child, the namespace's PID 1, and with
        # it the whole namespace. Nothing outlives what we supervise.
        unshare = ["unshare", "--pid", "--mount", "--uts", "--ipc"]
        if self.cgroups.active:
            unshare.append("--cgroup")
        unshare += ["--fork", "--kill-child=KILL", "--propagation", "private", "--"]
        nsinit = [*python, str(self.rootfs.resolve()), str(self.persist_dir.resolve())]
        nsinit += ["--init", self.init_binary, "--status", status_path]
        nsinit += ["--hostname", self.hostname]
        if self.cgroups.active and self.cgroups.has_v2:
            nsinit.append("--cgroup2")
        return [*launcher, "--", *unshare, *nsinit]

    async def _launch(self) -> None:
        """Make the cgroups, start the workload, record it. Called with the lock held."""
        self.persist_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.cgroups.create)
        try:
            await self._launch_process()
        except BaseException:
            await self._release()
            raise
        self._write_state()

    async def _release(self) -> None:
        """After the workload ended: remove its cgroups and its state file."""
        if self.cgroups.active and not await asyncio.to_thread(self.cgroups.remove):
            return  # kept in the state file: the next start or init retries
        with contextlib.suppress(OSError):
            (self.state_dir / STATE_FILE).unlink()

    def _write_state(self) -> None:
        init_pid = self._init_pid
        process = self._process
        if init_pid is None or process is None:
            return
        state = {
            "boot_id": self._boot_id,
            "hostname": self.hostname,
            "init": {"pid": init_pid, "start_time": _start_time(init_pid)},
            "namespaces": {
                kind: list(ns) for kind in NAMESPACES if (ns := _namespace(init_pid, kind))
            },
            "launcher": {"pid": process.pid, "start_time": _start_time(process.pid)},
            "cgroups": self.cgroups.state(),
        }
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot record the workload in %s: %s", path, exc.strerror or exc)

    async def _launch_process(self) -> None:
        """Start the launcher (unshare + nsinit) and wait for the handshake."""
        with contextlib.suppress(OSError):
            (self.rootfs / FALLBACK_MARKER).unlink()
        loop = asyncio.get_running_loop()
        workdir = tempfile.mkdtemp(prefix="fly-vault-runtime-")
        dummy: list[int] = []

        def close_dummy(*_: object) -> None:
            while dummy:
                os.close(dummy.pop())

        process: asyncio.subprocess.Process | None = None
        transport: asyncio.BaseTransport | None = None
        watcher: asyncio.Task[int] | None = None
        console = status = None
        pinned: list[int] = []  # [outer pid, pidfd] of the namespace's init
        try:
            status_path = os.path.join(workdir, "status")
            os.mkfifo(status_path, 0o600)
            status = os.fdopen(os.open(status_path, os.O_RDONLY | os.O_NONBLOCK), "rb", 0)
            # A writer of our own until nsinit opens the FIFO: without one, the reader
            # would see end of file at once. It is closed at nsinit's hello or when unshare
            # exits; from then on end of file means "nsinit exec'd the init, or died".
            dummy.append(os.open(status_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            reader = asyncio.StreamReader()
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), status
            )
            if self.console is not None:
                console = open(self.console, "ab")  # noqa: SIM115
            process = await asyncio.create_subprocess_exec(
                *self._command(status_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                env=dict(WORKLOAD_ENV),  # not ours: no ACCESS_TOKEN anywhere near it
                cwd="/",
                # Our terminal's ^C and job control must not reach the workload.
                start_new_session=True,
            )
            watcher = loop.create_task(process.wait())
            watcher.add_done_callback(close_dummy)
            async with asyncio.timeout(self.start_timeout):
                fallback = await self._handshake(process, reader, close_dummy, pinned)
            # Adopted even if the init has died meanwhile: the supervisor sees to that
            # (and start(settle=...) reports it), as for any later death.
            self._adopt(process, pinned, fallback)
        except BaseException as exc:
            if process is not None:
                await _kill_unadopted(process, pinned)
            if len(pinned) == 2:
                os.close(pinned[1])
            if isinstance(exc, TimeoutError):
                raise ProvisionError(
                    f"the workload did not start within {self.start_timeout:g} s"
                ) from None
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            close_dummy()
            if transport is not None:
                transport.close()  # closes ``status`` too
            elif status is not None:
                status.close()
            if console is not None:
                console.close()
            shutil.rmtree(workdir, ignore_errors=True)

    async def _handshake(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        close_dummy: Callable[[], None],
        pinned: list[int],
    ) -> bool:
        """Read nsinit's status lines; True for the fallback init, False for a real one.

        At nsinit's hello, its outer pid and a pidfd on it go into ``pinned``.
        """
        exec_seen = False
        fallback: str | None = None
        while line := await reader.readline():
            word, _, detail = line.decode(errors="replace").strip().partition(" ")
            if word == "hello":
                close_dummy()
                pinned += _pin_child(process.pid)
            elif word == "error":
                raise ProvisionError(f"the workload could not start: {detail}")
            elif word == "exec":
                exec_seen = True
            elif word == "fallback":
                fallback = detail
        # End of file: nsinit exec'd the init (the FIFO is close-on-exec), said fallback
        # and closed it, or died.
        if pinned and fallback is not None:
            log.warning("workload: %s; the fallback init reaps its processes", fallback)
            return True
        if pinned and exec_seen:
            return False
        status = await process.wait()
        raise ProvisionError(
            f"the workload's namespace init exited before it was ready (status {status}; "
            "see the server log)"
        )

    def _adopt(
        self, process: asyncio.subprocess.Process, pinned: list[int], fallback: bool
    ) -> None:
        init_pid, pidfd = pinned
        self._process, self._init_pid, self._pidfd = process, init_pid, pidfd
        if self.cgroups.active:
            self.cgroups.park(process.pid)  # unshare: out of the workload's namespace root
        self._fallback = fallback
        self._boot_id = uuid.uuid4().hex
        self._started_at = asyncio.get_running_loop().time()
        log.info(
            "workload started: init pid %d (%s), boot %s",
            init_pid,
            "fallback init" if fallback else self.init_binary,
            self._boot_id,
        )

    def _signal_init(self, signo: int) -> None:
        if self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signo)

    def _stop_signal(self) -> int:
        # systemd re-executes itself on SIGTERM; SIGRTMIN+4 is its "poweroff" (in a
        # container: exit), as used by docker and podman for systemd images.
        try:
            with open(f"/proc/{self._init_pid}/comm") as comm:
                if comm.read().strip() == "systemd":
                    return signal.SIGRTMIN + 4
        except OSError:  # already gone: any signal will do
            pass
        return signal.SIGTERM

    async def _terminate(self, grace: float, reason: str) -> None:
        """End the sessions, stop the current workload and forget it. With the lock held."""
        process = self._process
        if process is None:
            return
        self._stopping = True  # no new session from here on
        try:
            if process.returncode is None and self.on_stop is not None:
                try:
                    await self.on_stop(reason)
                except Exception:  # the workload must stop whatever the sessions did
                    log.exception("ending the sessions before the stop failed")
            await self._stop_process(process, grace)
        finally:
            self._stopping = False
        await self._release()

    async def _stop_process(self, process: asyncio.subprocess.Process, grace: float) -> None:
        if process.returncode is None:
            self._signal_init(self._stop_signal())
            # unshare exits only once it has reaped the init, and the init of a PID
            # namespace is reapable only once every other process in it is gone: so
            # unshare's exit means the whole workload has ended.
            if not await _exits(process, grace):
                log.warning("workload did not stop within %g s; killing it", grace)
                self._signal_init(signal.SIGKILL)  # takes the whole namespace with it
                if not await _exits(process, 10.0):
                    process.kill()  # unshare itself stuck: last resort
                    await asyncio.shield(process.wait())
        log.info("workload stopped (boot %s, status %s)", self._boot_id, process.returncode)
        self._forget()

    def _forget(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
        self._process, self._init_pid, self._pidfd = None, None, None
        self._fallback = False
        with contextlib.suppress(OSError):
            (self.rootfs / FALLBACK_MARKER).unlink()

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.restart_delay
        while self._want_running:
            process = self._process
            if process is not None:
                await process.wait()
                async with self._lock:
                    if self._process is not process or not self._want_running:
                        continue  # stopped or restarted on purpose
                    # One that ran for a while gets the short delay again; one dying young
                    # keeps the doubled one (a crash loop must not spin).
                    if loop.time() - self._started_at >= STABLE_AFTER:
                        delay = self.restart_delay
                    log.warning(
                        "workload (boot %s) exited with status %s; restarting it in %.1f s",
                        self._boot_id,
                        process.returncode,
                        delay,
                    )
                    if self.on_stop is not None:
                        with contextlib.suppress(Exception):
                            await self.on_stop(
                                "the vault's workload stopped on its own (it restarts by itself)"
                            )
                    self._forget()
                    await self._release()
            await asyncio.sleep(delay)
            next_delay = min(delay * 2, self.max_restart_delay)
            async with self._lock:
                if not self._want_running or self.running:
                    continue
                try:
                    await self._launch()
                    self.restarts += 1
                except ProvisionError as exc:
                    log.error(
                        "restarting the workload failed: %s; next try in %.1f s", exc, next_delay
                    )
                except Exception:
                    # Whatever it was, the supervisor must survive it, or nothing restarts.
                    log.exception("restarting the workload failed; next try in %.1f s", next_delay)
                delay = next_delay
