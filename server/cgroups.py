"""The workload's cgroup subtree: created, limited, joined and removed by init.

Init makes one subtree per data volume in every cgroup hierarchy mounted on the host (cgroup
v2, and each v1 hierarchy on a legacy or hybrid host), below init's own cgroup::

    <init's cgroup>/fly-vault-<tag>             the subtree init owns; the limits are set here
    <init's cgroup>/fly-vault-<tag>/workload    the workload's cgroup-namespace root
    <init's cgroup>/fly-vault-<tag>/supervisor  unshare, once the workload runs

The workload joins ``workload`` in every hierarchy before its namespaces are made, so its
cgroup namespace is rooted there: systemd inside sees ``/`` and creates ``init.scope``,
``system.slice`` and the rest below it, never in the host's tree. The limits sit one level
up, out of the workload's reach (the files of a namespace's root cgroup are writable from
inside). Commands started by sessions join the cgroup of the workload's init, so the limits
and the clean-up cover them too, and every process of a generation can be found here after
a crash (``leftover_processes``). ``remove`` deletes the whole subtree once it is empty, so
the host's tree is the same after a stop as before the start.

The tag is derived from the data directory, so a restarted init finds the subtree of the
previous one; the paths used are also recorded in the runtime's state file, in case init's
own cgroup changed in between.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flyvault.errors import ProvisionError

log = logging.getLogger("flyvault.server.cgroups")

#: Mount options of a v1 hierarchy that are not controllers.
_V1_FLAGS = {"rw", "ro", "noprefix", "clone_children", "xattr", "cpuset_v2_mode", "favordynmods"}
#: The CFS period used for a CPU limit (the kernel's default).
CPU_PERIOD_US = 100_000
WORKLOAD = "workload"
SUPERVISOR = "supervisor"


@dataclass(frozen=True)
class Limits:
    """Optional resource limits for the whole workload (sessions included)."""

    #: Bytes of memory (``memory.max``, v1 ``memory.limit_in_bytes``); swap is not limited.
    memory: int | None = None
    #: CPUs' worth of time, e.g. 1.5 (``cpu.max``, v1 CFS quota over a 100 ms period).
    cpus: float | None = None

    def __post_init__(self) -> None:
        if self.memory is not None and self.memory < 4 * 1024 * 1024:
            raise ValueError("the memory limit must be at least 4 MiB")
        if self.cpus is not None and not 0.01 <= self.cpus <= 4096:
            raise ValueError("the CPU limit must be from 0.01 to 4096 CPUs")

    @property
    def any(self) -> bool:
        return self.memory is not None or self.cpus is not None

    def describe(self) -> str:
        parts = []
        if self.memory is not None:
            parts.append(f"memory {format_bytes(self.memory)}")
        if self.cpus is not None:
            parts.append(f"cpu {self.cpus:g}")
        return ", ".join(parts) or "none"


def format_bytes(value: int) -> str:
    for unit, size in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def parse_bytes(text: str) -> int:
    """``512M``, ``2G``, ``1073741824``: a size in bytes (K, M, G, T are powers of 1024)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = 1
    for unit, size in (("K", 1024), ("M", 1024**2), ("G", 1024**3), ("T", 1024**4)):
        if value.endswith(unit):
            value, factor = value[:-1], size
            break
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 512M, 2G)") from None
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError(f"{text!r} is not a positive size")
    return int(number * factor)


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy, as seen from init's mount and cgroup namespaces."""

    version: int  # 1 or 2
    #: The controllers of a v1 hierarchy (``{"cpu"}``, ``{"name=systemd"}``); empty for v2.
    controllers: frozenset[str]
    #: Where it is mounted, and which cgroup that mount shows at its top.
    mount: Path
    mount_root: str
    #: Init's own cgroup in this hierarchy.
    own: str

    @property
    def name(self) -> str:
        return "cgroup2" if self.version == 2 else ",".join(sorted(self.controllers))

    def path(self, cgroup: str) -> Path | None:
        """The directory of ``cgroup`` (a path in the hierarchy), or None if not mounted."""
        root = self.mount_root.rstrip("/")
        if cgroup != root and not cgroup.startswith(root + "/"):
            return None
        return self.mount / cgroup[len(root) :].lstrip("/")


def _mountinfo() -> Iterator[tuple[str, str, str, str]]:
    """(mount root, mount point, fstype, super options) of every mount."""
    with open("/proc/self/mountinfo") as file:
        for line in file:
            head, _, tail = line.partition(" - ")
            fields, rest = head.split(), tail.split()
            if len(fields) < 5 or len(rest) < 3:
                continue
            yield _unescape(fields[3]), _unescape(fields[4]), rest[0], rest[2]


def _unescape(text: str) -> str:
    for code in ("\\040", "\\011", "\\012", "\\134"):
        text = text.replace(code, chr(int(code[1:], 8)))
    return text


def _own_cgroups(pid: int | str = "self") -> dict[str, str]:
    """``{"0": path}`` for v2 and ``{"cpu,cpuacct": path}`` per v1 hierarchy of ``pid``."""
    result = {}
    with open(f"/proc/{pid}/cgroup") as file:
        for line in file:
            number, _, rest = line.rstrip("\n").partition(":")
            controllers, _, path = rest.partition(":")
            result["0" if number == "0" and not controllers else controllers] = path
    return result


def discover() -> list[Hierarchy]:
    """Every cgroup hierarchy mounted read-write in init's mount namespace, once each."""
    own = _own_cgroups()
    found: dict[str, Hierarchy] = {}
    for root, point, fstype, options in _mountinfo():
        words = set(options.split(","))
        if "ro" in words:
            continue
        if fstype == "cgroup2" and "0" in own:
            key, controllers, version = "0", frozenset[str](), 2
        elif fstype == "cgroup":
            controllers = frozenset(
                word
                for word in words
                if word not in _V1_FLAGS and not word.startswith("release_agent=")
            )
            key = next(
                (name for name in own if name != "0" and set(name.split(",")) == controllers), ""
            )
            version = 1
            if not key:
                continue
        else:
            continue
        if key in found:
            continue
        hierarchy = Hierarchy(version, controllers, Path(point), root, own[key])
        if hierarchy.path(hierarchy.own) is not None:
            found[key] = hierarchy
    return list(found.values())


def existing(name: str) -> list[Path]:
    """The subtrees called ``name`` below init's own cgroup that exist now (a previous
    generation's, when init was killed before it could remove them)."""
    try:
        hierarchies = discover()
    except OSError:
        return []
    found = []
    for hierarchy in hierarchies:
        own = hierarchy.path(hierarchy.own)
        if own is not None and (own / name).is_dir():
            found.append(own / name)
    return found


def subtree_name(data_dir: str | os.PathLike[str]) -> str:
    """``fly-vault-<12 hex>``, the same for every init that uses this data directory."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(data_dir))).hexdigest()
    return f"fly-vault-{digest[:12]}"


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def procs(directory: Path) -> set[int]:
    """The pids in ``directory`` and every cgroup below it."""
    pids: set[int] = set()
    for current, _dirs, _files in os.walk(directory):
        with contextlib.suppress(OSError):
            pids.update(int(word) for word in Path(current, "cgroup.procs").read_text().split())
    return pids


def _rmtree(directory: Path) -> None:
    """rmdir the cgroup and its descendants, deepest first (cgroupfs only has directories)."""
    for current, _dirs, _files in os.walk(directory, topdown=False):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(current)


@dataclass
class WorkloadCgroups:
    """The subtree of one workload generation; ``create`` it before the start, ``remove``
    it after the stop. Root only."""

    name: str
    limits: Limits = field(default_factory=Limits)
    hierarchies: list[Hierarchy] = field(default_factory=list)
    #: Directories of the subtree (``<own>/<name>``), one per hierarchy, once created.
    tops: list[Path] = field(default_factory=list)
    #: Controllers this subtree enabled in a parent's ``cgroup.subtree_control`` (cgroup v2
    #: only, when init runs in the root cgroup): given back by ``remove``.
    enabled: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.tops)

    @property
    def has_v2(self) -> bool:
        return any(h.version == 2 for h in self.hierarchies)

    def join_files(self) -> list[Path]:
        """``workload/cgroup.procs`` in every hierarchy: the workload's launcher joins them."""
        return [top / WORKLOAD / "cgroup.procs" for top in self.tops]

    def create(self) -> None:
        """Make the subtree in every hierarchy and apply the limits. Raises ProvisionError.

        A subtree left by a previous generation must have been emptied (``kill_leftovers``)
        first; an empty one is reused.
        """
        self.hierarchies = discover()
        self.tops, self.enabled = [], []
        if not self.hierarchies:
            if self.limits.any:
                raise ProvisionError(
                    f"the workload's limits ({self.limits.describe()}) need cgroups, and no "
                    "cgroup hierarchy is mounted on this machine"
                )
            log.warning("no cgroup hierarchy is mounted: the workload runs in init's cgroup")
            return
        try:
            for hierarchy in self.hierarchies:
                own = hierarchy.path(hierarchy.own)
                assert own is not None
                top = own / self.name
                self._mkdir(top, hierarchy)
                self.tops.append(top)
                self._mkdir(top / WORKLOAD, hierarchy)
            self._apply_limits()
        except OSError as exc:
            self.remove(timeout=1.0)
            where = f"{exc.filename}: " if exc.filename else ""
            raise ProvisionError(
                f"cannot set up the workload's cgroup: {where}{exc.strerror or exc}",
                hint="init needs root and read-write cgroup file systems",
            ) from None
        except BaseException:
            self.remove(timeout=1.0)
            raise
        log.info(
            "workload cgroup %s in %d hierarchies (%s); limits: %s",
            self.name,
            len(self.tops),
            ", ".join(h.name for h in self.hierarchies),
            self.limits.describe(),
        )

    def _mkdir(self, path: Path, hierarchy: Hierarchy) -> None:
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        if "cpuset" in hierarchy.controllers:
            # A v1 cpuset cgroup starts with no CPUs and no memory nodes: nothing could join.
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not _read(path / name).strip():
                    _write(path / name, _read(path.parent / name).strip() or "0")

    def _apply_limits(self) -> None:
        limits = self.limits
        v1 = set().union(*(h.controllers for h in self.hierarchies if h.version == 1))
        for hierarchy, top in zip(self.hierarchies, self.tops, strict=True):
            if hierarchy.version == 2:
                # A controller bound to a v1 hierarchy (hybrid hosts) is limited there.
                memory = limits.memory if "memory" not in v1 else None
                cpus = limits.cpus if "cpu" not in v1 else None
                self._enable(
                    top.parent,
                    {name for name, value in (("memory", memory), ("cpu", cpus)) if value},
                )
                if memory is not None:
                    _write(top / "memory.max", str(memory))
                if cpus is not None:
                    _write(top / "cpu.max", f"{_quota(cpus)} {CPU_PERIOD_US}")
                # Hand the controllers this subtree has on to the workload, so its systemd
                # can manage them below its own root.
                available = _read(top / "cgroup.controllers").split()
                if available:
                    with contextlib.suppress(OSError):
                        _write(top / "cgroup.subtree_control", " ".join("+" + c for c in available))
                continue
            if limits.memory is not None and "memory" in hierarchy.controllers:
                _write(top / "memory.limit_in_bytes", str(limits.memory))
            if limits.cpus is not None and "cpu" in hierarchy.controllers:
                _write(top / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(top / "cpu.cfs_quota_us", str(_quota(limits.cpus)))
        if not any(h.version == 2 for h in self.hierarchies):
            for value, controller in ((limits.memory, "memory"), (limits.cpus, "cpu")):
                if value is not None and controller not in v1:
                    raise ProvisionError(
                        f"the workload's {controller} limit needs the {controller} cgroup "
                        "controller, which no mounted hierarchy has"
                    )

    def _enable(self, parent: Path, controllers: set[str]) -> None:
        have = set(_read(parent / "cgroup.subtree_control").split())
        for controller in sorted(controllers - have):
            if controller not in _read(parent / "cgroup.controllers").split():
                raise ProvisionError(
                    f"the workload's {controller} limit needs the {controller} controller, which "
                    f"cgroup v2 does not offer in {parent} (it may be bound to a v1 hierarchy)",
                    hint="remove the limit, or run init where the controller is available",
                )
            try:
                _write(parent / "cgroup.subtree_control", f"+{controller}")
            except OSError as exc:
                reason = (
                    "init's own cgroup holds processes, so cgroup v2 cannot enable a "
                    "controller for its children"
                    if exc.errno == errno.EBUSY
                    else exc.strerror or str(exc)
                )
                raise ProvisionError(
                    f"the workload's {controller} limit cannot be applied: enabling "
                    f"{controller} in {parent}/cgroup.subtree_control failed: {reason}",
                    hint="run init in the root cgroup (as on a Fly Machine) or in a cgroup "
                    "whose controllers are delegated to it, or remove the limit",
                ) from None
            self.enabled.append((parent, controller))

    def park(self, pid: int) -> None:
        """Move ``pid`` (unshare, which stays outside the workload's namespaces) from
        ``workload`` to a leaf of its own, ``supervisor``: with cgroup v2 a cgroup with
        processes cannot hand controllers to its children, and the workload's systemd
        must, below the root of its namespace. Still under the limits."""
        for hierarchy, top in zip(self.hierarchies, self.tops, strict=True):
            try:
                self._mkdir(top / SUPERVISOR, hierarchy)
                _write(top / SUPERVISOR / "cgroup.procs", str(pid))
            except OSError as exc:
                log.warning("cannot move unshare out of the workload's cgroup in %s: %s", top, exc)

    def init_cgroup_files(self, pid: int) -> list[Path]:
        """``cgroup.procs`` of the cgroups ``pid`` (the workload's init) is in, in every
        hierarchy of the subtree: where a session's command joins. Its own ``workload``
        cgroup wherever the init's cannot be used (not inside the subtree)."""
        try:
            current = _own_cgroups(pid)
        except OSError:
            current = {}
        files = []
        for hierarchy, top in zip(self.hierarchies, self.tops, strict=True):
            key = (
                "0"
                if hierarchy.version == 2
                else next(
                    (k for k in current if k != "0" and set(k.split(",")) == hierarchy.controllers),
                    "",
                )
            )
            path = hierarchy.path(current[key]) if key in current else None
            if path is None or not (path == top or top in path.parents):
                path = top / WORKLOAD
            files.append(path / "cgroup.procs")
        return files

    def processes(self) -> set[int]:
        pids: set[int] = set()
        for top in self.tops:
            pids |= procs(top)
        return pids

    def remove(self, timeout: float = 10.0) -> bool:
        """Kill whatever is still inside, delete the subtree, give back enabled controllers.

        True when everything is gone; False (logged) if something stayed past ``timeout``.
        """
        if not self.tops:
            return True
        ok = kill_and_remove(self.tops, timeout)
        for parent, controller in reversed(self.enabled):
            with contextlib.suppress(OSError):  # another child may use it now: leave it
                _write(parent / "cgroup.subtree_control", f"-{controller}")
        self.enabled.clear()
        if ok:
            self.tops.clear()
        return ok

    def state(self) -> dict[str, object]:
        return {
            "tops": [str(top) for top in self.tops],
            "enabled": [[str(parent), controller] for parent, controller in self.enabled],
        }


def _quota(cpus: float) -> int:
    return max(1000, round(cpus * CPU_PERIOD_US))


def kill_processes(pids: Iterable[int]) -> None:
    """SIGKILL each (a stopped process dies of it too), then SIGCONT for good measure."""
    for pid in pids:
        for signo in (signal.SIGKILL, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signo)


def kill_and_remove(tops: Iterable[Path], timeout: float) -> bool:
    """Empty the cgroup subtrees ``tops`` (SIGKILL until no process is left), delete them."""
    tops = [top for top in tops if top.is_dir()]
    deadline = time.monotonic() + timeout
    while True:
        pids = set().union(*(procs(top) for top in tops)) if tops else set()
        if not pids:
            break
        if time.monotonic() > deadline:
            log.warning("processes %s stay in the workload's cgroup", sorted(pids)[:20])
            return False
        kill_processes(pids)
        time.sleep(0.02)
    while True:
        for top in tops:
            _rmtree(top)
        left = [top for top in tops if top.exists()]
        if not left:
            return True
        if time.monotonic() > deadline:
            log.warning("could not remove the workload's cgroup %s", ", ".join(map(str, left)))
            return False
        time.sleep(0.02)  # a cgroup is busy until its last zombie is reaped
