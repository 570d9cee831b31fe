"""The rootfs layout on the data volume, atomic activation, and recovery after a crash.

Layout under the data dir (``/data`` on a Fly machine)::

    rootfs/            the active rootfs
    rootfs.staging/    a new rootfs being extracted (garbage unless an activation needs it)
    rootfs.previous/   the old rootfs, kept until the new runtime has started
    rootfs.discard/    a tree being deleted (renamed here first, so deletion is atomic)
    .provisioned       the marker: Ready if and only if it exists (content "1")
    .activation        the journal of an activation in progress (JSON, fsync + rename)
    persist/root, persist/home   the persistent /root and /home, bind-mounted at run time

The original had no fsync and nothing at boot looked at ``rootfs.previous``: a crash
between its two renames left a marker and no rootfs, forever (§6.5, flaw 16). Here every
activation is journalled before it touches anything, each step is a rename, and
``recover()`` at init start reads the journal and either finishes or undoes the work:

* ``activating`` with an old rootfs: undo (the new rootfs never proved it starts; the old
  one did). Without an old rootfs (first provision): finish, since the staged tree is
  complete and durable before the journal is written, and there is nothing to go back to.
* ``rolling-back``: the new runtime failed to start; finish the undo.
* ``committing``: the new runtime started; finish deleting the old rootfs.

Every step is idempotent and derivable from what is on disk, so a crash during
``recover()`` is recovered by the next one. The persistent homes are never deleted: the
only change ever made to them is seeding an *empty* one from the image (and undoing
exactly that seed), so the user's files stay byte-identical across any crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flyvault.errors import ProvisionError

log = logging.getLogger("flyvault.server.provision")

PERSISTENT = ("root", "home")
#: Where ``prepare_persistence`` parks the image's /root and /home inside the staging tree
#: (so deleting the staging deletes them too) until activation decides whether they seed.
SEED_DIR = ".fly-vault-seed"
#: Mode of a mountpoint or persistent directory the image did not provide.
DEFAULT_MODES = {"root": 0o700, "home": 0o755}


@dataclass
class ActivationResult:
    had_previous: bool
    seeded: list[str]
    #: Seconds per phase: sync, swap, marker, start, cleanup.
    timings: dict[str, float] = field(default_factory=dict)
    total: float = 0.0


class RootfsStore:
    """The rootfs state of one data volume. Not thread-safe: one provision at a time."""

    def __init__(self, data_dir: Path, *, checkpoint: Callable[[str], None] | None = None) -> None:
        self.data_dir = Path(data_dir)
        # A test hook called between steps; the crash tests SIGKILL the process from it.
        self._checkpoint = checkpoint or (lambda step: None)
        # Serialises removals of rootfs.discard: the previous rootfs is deleted in the
        # background after a reprovision answers, and the next activation waits for it.
        self._discard_lock = threading.Lock()

    # -- paths ----------------------------------------------------------------------------

    @property
    def rootfs(self) -> Path:
        return self.data_dir / "rootfs"

    @property
    def staging(self) -> Path:
        return self.data_dir / "rootfs.staging"

    @property
    def previous(self) -> Path:
        return self.data_dir / "rootfs.previous"

    @property
    def discard_dir(self) -> Path:
        return self.data_dir / "rootfs.discard"

    @property
    def marker(self) -> Path:
        return self.data_dir / ".provisioned"

    @property
    def journal(self) -> Path:
        return self.data_dir / ".activation"

    @property
    def persist(self) -> Path:
        return self.data_dir / "persist"

    @property
    def persist_root(self) -> Path:
        return self.persist / "root"

    @property
    def persist_home(self) -> Path:
        return self.persist / "home"

    @property
    def provisioned(self) -> bool:
        return self.marker.exists()

    # -- staging --------------------------------------------------------------------------

    def new_staging(self) -> Path:
        """Delete any old staging (file, symlink or tree) and create it empty."""
        if self.journal.exists():
            raise ProvisionError(
                "an interrupted activation has not been recovered yet; run recover() first"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _remove(self.staging)
        self.staging.mkdir(mode=0o755)
        return self.staging

    def discard_staging(self) -> None:
        if not self.journal.exists():
            _remove(self.staging)

    def prepare_persistence(self, staging: Path) -> None:
        """Turn the image's /root and /home into empty mountpoints, parking their content.

        The content is kept in ``SEED_DIR`` inside the staging; ``activate`` moves it to
        ``persist/`` if the persistent directory is still empty (the first image seeds
        it) and deletes it otherwise (it would be hidden under the bind mount anyway).
        """
        seeds = staging / SEED_DIR
        if seeds.exists() or seeds.is_symlink():
            log.warning("the image has its own /%s; it is replaced", SEED_DIR)
            _remove(seeds)
        seeds.mkdir(mode=0o700)
        for name in PERSISTENT:
            path = staging / name
            try:
                info = path.lstat()
            except FileNotFoundError:
                path.mkdir(mode=DEFAULT_MODES[name])
                self._checkpoint(f"persistence:mountpoint-{name}")
                continue
            if not stat.S_ISDIR(info.st_mode):
                kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a directory"
                fix = (
                    f"make /{name} a real directory in the image and rebuild the archive "
                    "(/root and /home are bind-mounted from the persistent volume)"
                )
                raise ProvisionError(
                    f"the image's /{name} is {kind}; persistent target /{name} must be a "
                    f"directory: {fix}",
                    hint=fix,
                )
            os.rename(path, seeds / name)
            self._checkpoint(f"persistence:park-{name}")
            path.mkdir(mode=0o700)
            # The mountpoint keeps the image's owner and mode, which show until the bind
            # mount covers them (and matter if it ever does not).
            os.chown(path, info.st_uid, info.st_gid)
            os.chmod(path, stat.S_IMODE(info.st_mode))
            self._checkpoint(f"persistence:mountpoint-{name}")

    # -- activation -----------------------------------------------------------------------

    def activate(
        self,
        start_runtime: Callable[[Path], bool],
        *,
        started: Callable[[], None] | None = None,
        settled: Callable[[], str | None] | None = None,
    ) -> ActivationResult:
        """Swap staging in; keep the old rootfs until ``start_runtime(rootfs)`` is True
        (and, with ``settled``, until that returns None: the new workload stayed up).

        The caller has stopped the old runtime. If the new one does not start, the old
        rootfs is restored and ``start_runtime`` is called again on it, then a
        ProvisionError says so. ``started`` is called once the new one is up (the client
        is answered there), ``settled`` then waits for the end of the settle window and
        returns why the workload did not stay up, if it did not: that too rolls back, as
        the journal still says "activating" until the window has passed. Persistence
        seeding happens here, under the journal.
        """
        begun = time.monotonic()
        timings: dict[str, float] = {}
        if self.journal.exists():
            raise ProvisionError(
                "an interrupted activation has not been recovered yet; run recover() first"
            )
        if not self.staging.is_dir():
            raise ProvisionError("there is no staged rootfs to activate")
        had_root = self.marker.exists() and self.rootfs.is_dir()
        if not had_root and _exists(self.rootfs):
            # A rootfs without a marker never finished provisioning: not a fallback.
            self._discard(self.rootfs)
        self._discard(self.previous)
        self._discard(self.discard_dir)
        seed = [
            name
            for name in PERSISTENT
            if (self.staging / SEED_DIR / name).is_dir() and _empty_or_missing(self.persist / name)
        ]
        phase = time.monotonic()
        # The staged tree must be on disk before the journal makes it part of the state.
        _syncfs(self.data_dir)
        timings["sync"] = time.monotonic() - phase
        self._write_journal({"state": "activating", "had_root": had_root, "seed": seed})
        self._checkpoint("activate:journal")

        phase = time.monotonic()
        self._seed(seed)
        if had_root:
            os.rename(self.rootfs, self.previous)
            self._checkpoint("activate:rootfs-to-previous")
        os.rename(self.staging, self.rootfs)
        self._checkpoint("activate:staging-to-rootfs")
        _fsync_dir(self.data_dir)
        timings["swap"] = time.monotonic() - phase

        phase = time.monotonic()
        self._write_marker()
        self._checkpoint("activate:marker")
        timings["marker"] = time.monotonic() - phase

        phase = time.monotonic()
        failure = _start(start_runtime, self.rootfs)
        timings["start"] = time.monotonic() - phase
        self._checkpoint("activate:started")
        if failure is None and (started is not None or settled is not None):
            phase = time.monotonic()
            if started is not None:
                started()
            failure = _settled(settled) if settled is not None else None
            timings["settle"] = time.monotonic() - phase
            self._checkpoint("activate:settled")
        if failure is None:
            phase = time.monotonic()
            self._write_journal({"state": "committing"})
            self._checkpoint("activate:committing")
            # Only set aside here: deleting a whole rootfs takes a second or more, and the
            # reprovision need not wait for it (purge_discarded, run after the answer; a
            # crash before it leaves rootfs.discard, which recovery deletes).
            self._discard(self.previous, remove=False)
            self._checkpoint("activate:previous-deleted")
            self._remove_journal()
            timings["cleanup"] = time.monotonic() - phase
            return ActivationResult(had_root, seed, timings, time.monotonic() - begun)

        self._write_journal({"state": "rolling-back", "had_root": had_root, "seed": seed})
        self._checkpoint("activate:rolling-back")
        self._undo(had_root, seed)
        restarted = _start(start_runtime, self.rootfs) if had_root else None
        self._remove_journal()
        if had_root:
            again = "restarted" if restarted is None else f"failed to restart too ({restarted})"
            outcome = f"the previous rootfs was restored and its runtime {again}"
        else:
            outcome = "the vault stays cold (no rootfs)"
        raise ProvisionError(
            f"the new rootfs did not start ({failure}); {outcome}. Check that the image has "
            "a working /sbin/init (or none, for the minimal init) and provision again",
            hint="check the image's /sbin/init and provision again",
        )

    # -- recovery -------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """At init start: finish or undo an interrupted activation, delete leftovers."""
        notes: list[str] = []
        if not self.data_dir.is_dir():
            return notes
        journal = self._read_journal(notes)
        if journal is not None:
            state = journal.get("state")
            had_root = bool(journal.get("had_root"))
            seed = [name for name in journal.get("seed", []) if name in PERSISTENT]
            if state == "committing":
                self._discard(self.previous)
                notes.append("finished an activation whose runtime had started")
            elif state == "activating" and not had_root:
                self._finish_first(seed, notes)
            elif state in ("activating", "rolling-back"):
                self._undo(had_root, seed)
                notes.append(
                    "rolled back an interrupted reprovision: the previous rootfs is active"
                    if had_root
                    else "undid a first provision whose runtime failed: the vault is cold"
                )
            else:
                notes.append(f"ignored a journal with unknown state {state!r}")
            self._remove_journal()
            self._checkpoint("recover:journal-removed")
        self._clean(notes)
        return notes

    def _finish_first(self, seed: list[str], notes: list[str]) -> None:
        if self.staging.is_dir():
            self._seed(seed)
            os.rename(self.staging, self.rootfs)
            self._checkpoint("recover:staging-to-rootfs")
            _fsync_dir(self.data_dir)
        if self.rootfs.is_dir():
            self._write_marker()
            notes.append("finished an interrupted first provision: the new rootfs is active")
        else:
            notes.append("an interrupted first provision left no rootfs: the vault is cold")

    def _clean(self, notes: list[str]) -> None:
        for leftover in (_temporary(self.journal), _temporary(self.marker)):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        if _exists(self.previous):
            if self.rootfs.is_dir():
                self._discard(self.previous)
                notes.append("deleted a leftover rootfs.previous")
            else:  # not produced by this code; restoring it is the only safe choice
                os.rename(self.previous, self.rootfs)
                self._write_marker()
                notes.append("restored rootfs.previous, found without a rootfs")
        if _exists(self.staging):
            _remove(self.staging)
            notes.append("deleted an unfinished staging rootfs")
        if _exists(self.discard_dir):
            _remove(self.discard_dir)
        if self.marker.exists() and not self.rootfs.is_dir():
            self.marker.unlink()
            _fsync_dir(self.data_dir)
            notes.append("removed the provisioned marker: there is no rootfs; the vault is cold")
        for name in PERSISTENT:
            stray = self.persist / f"{name}.discard"
            if _exists(stray):
                _remove(stray)

    # -- steps ----------------------------------------------------------------------------

    def _seed(self, seed: list[str]) -> None:
        """Move the parked image dirs into the empty persistent dirs (idempotent)."""
        self.persist.mkdir(mode=0o755, exist_ok=True)
        for name in seed:
            source = self.staging / SEED_DIR / name
            target = self.persist / name
            if not source.is_dir():
                continue  # moved already
            if target.is_dir():
                target.rmdir()  # empty when the journal was written, and untouched since
            os.rename(source, target)
            self._checkpoint(f"activate:seeded-{name}")
        for name in PERSISTENT:
            target = self.persist / name
            if not target.is_dir():
                target.mkdir(mode=DEFAULT_MODES[name])
        _fsync_dir(self.persist)
        if _exists(self.staging / SEED_DIR):
            _remove(self.staging / SEED_DIR)  # the image dirs that did not seed anything
            self._checkpoint("activate:seeds-removed")

    def _undo(self, had_root: bool, seed: list[str]) -> None:
        """Back to the state before the activation (idempotent)."""
        for name in seed:
            # Still parked in staging: never moved. Otherwise the seed is in persist/ and
            # persist/<name> was empty before: make it empty again.
            if (self.staging / SEED_DIR / name).is_dir():
                continue
            target = self.persist / name
            if target.is_dir():
                stray = self.persist / f"{name}.discard"
                _remove(stray)
                os.rename(target, stray)
                self._checkpoint(f"undo:unseeded-{name}")
                target.mkdir(mode=DEFAULT_MODES[name])
                _remove(stray)
        if had_root:
            if _exists(self.previous):
                if _exists(self.rootfs):  # the new one
                    self._discard(self.rootfs)
                os.rename(self.previous, self.rootfs)
                self._checkpoint("undo:previous-to-rootfs")
                _fsync_dir(self.data_dir)
            self._write_marker()
        else:
            if self.marker.exists():
                self.marker.unlink()
                _fsync_dir(self.data_dir)
                self._checkpoint("undo:marker-removed")
            self._discard(self.rootfs)
        self._discard(self.staging)

    def _discard(self, path: Path, *, remove: bool = True) -> None:
        """Delete a tree atomically: rename it aside first, then remove it (now, or later
        with ``purge_discarded``)."""
        with self._discard_lock:
            if not _exists(path):
                return
            if path != self.discard_dir:
                _remove(self.discard_dir)
                os.rename(path, self.discard_dir)
                _fsync_dir(self.data_dir)
                self._checkpoint(f"discard:{path.name}")
            if remove:
                _remove(self.discard_dir)

    def purge_discarded(self) -> None:
        """Delete what an activation set aside (the previous rootfs)."""
        with self._discard_lock:
            _remove(self.discard_dir)

    def _write_marker(self) -> None:
        _write_atomic(self.marker, b"1")

    def _write_journal(self, content: dict[str, Any]) -> None:
        content = {"version": 1, **content, "time": time.time()}
        _write_atomic(self.journal, json.dumps(content).encode())

    def _remove_journal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.journal.unlink()
        _fsync_dir(self.data_dir)

    def _read_journal(self, notes: list[str]) -> dict[str, Any] | None:
        try:
            content = json.loads(self.journal.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # Written by rename, so a torn journal means disk damage: fall back to the
            # no-journal rules, which keep whatever complete rootfs exists.
            notes.append(f"ignored an unreadable activation journal ({exc})")
            return {}
        if not isinstance(content, dict):
            notes.append("ignored a malformed activation journal")
            return {}
        return content


# -- helpers ---------------------------------------------------------------------------------


def _start(start_runtime: Callable[[Path], bool], rootfs: Path) -> str | None:
    """None when the runtime started, else why not."""
    try:
        if start_runtime(rootfs):
            return None
        return "the runtime did not come up"
    except Exception as exc:
        log.exception("starting the runtime failed")
        return f"starting the runtime raised {exc!r}"


def _settled(settled: Callable[[], str | None]) -> str | None:
    """None when the new runtime stayed up through its settle window, else why not."""
    try:
        return settled()
    except Exception as exc:
        log.exception("watching the new runtime failed")
        return f"watching the runtime raised {exc!r}"


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _empty_or_missing(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except FileNotFoundError:
        return True
    except NotADirectoryError:
        return False


def _remove(path: Path) -> None:
    """Remove a file, symlink or tree (never following symlinks), read-only dirs included."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        path.unlink()
        return

    def retry(function: Callable[..., Any], failed: str, _info: Any) -> None:
        # Without root a read-only directory (0555 in the image) refuses unlinks in it.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
        function(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = _temporary(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_dir(path.parent)


_libc: Any = None


def _syncfs(path: Path) -> None:
    """Flush one filesystem (the data volume): one call instead of an fsync per file."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # the process already has libc loaded
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)
