"""What this machine has shown of each named session, so a reattach shows only the rest.

The vault replays a session's output from any offset it still holds. Which offset a new
client should start from is this machine's business: ``cursors.json`` in the user's state
directory keeps, per vault and session, the offset shown up to and the session's process id
(a later session of the same name is another process: its offsets start again).

A plain reattach asks the vault to replay from the cursor (a named session's output may be
65 MiB on the vault's disk: replaying it only to drop it would cost that much and hold the
command up meanwhile). The process id in STARTED then tells whether the cursor was this
session's: if the name now belongs to another run, the output before the cursor was not
shown, and ``SeenFilter`` says so and how to see it (``--from-start``). A request that may
create the session replays from 0, and the filter drops what was shown.

Entries are bounded (the newest ``MAX_ENTRIES``); the file is replaced atomically, and a
damaged one is treated as empty (it only saves repeating output).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("flyvault.client")

FILE = "cursors.json"
MAX_ENTRIES = 256


@dataclass(frozen=True)
class Cursor:
    offset: int
    pid: int
    #: The vault's boot id when it was shown: after a restart pids repeat, so a pid alone
    #: could take another run of that name for this one (None: not known).
    boot: str | None = None


def _path() -> Path:
    from flyvault.paths import state_dir

    return state_dir() / FILE


def _key(vault: str, session_id: str) -> str:
    return f"{vault}/{session_id}"


def shown(vault: str, session_id: str) -> Cursor | None:
    """Where this machine stopped showing the session, if it ever showed it."""
    from flyvault.paths import load_state

    entry = load_state(FILE).get(_key(vault, session_id))
    if not isinstance(entry, dict):
        return None
    offset, pid, boot = entry.get("offset"), entry.get("pid"), entry.get("boot")
    if isinstance(offset, int) and isinstance(pid, int) and offset >= 0:
        return Cursor(offset, pid, boot if isinstance(boot, str) else None)
    return None


def remember(vault: str, session_id: str, cursor: Cursor, now: float | None = None) -> None:
    """Record what was shown (best effort: a read-only state directory only costs a
    repeat on the next reattach)."""
    from flyvault.paths import load_state, save_state

    entries = load_state(FILE)
    entries[_key(vault, session_id)] = {
        "offset": cursor.offset,
        "pid": cursor.pid,
        "boot": cursor.boot,
        "at": time.time() if now is None else now,
    }
    if len(entries) > MAX_ENTRIES:
        newest = sorted(entries.items(), key=lambda item: _age(item[1]), reverse=True)
        entries = dict(newest[:MAX_ENTRIES])
    try:
        save_state(FILE, entries)
    except OSError as exc:
        log.info("could not record what was shown of session %s: %s", session_id, exc)


def _age(entry: Any) -> float:
    at = entry.get("at") if isinstance(entry, dict) else None
    return float(at) if isinstance(at, (int, float)) else 0.0


Write = Callable[[bytes], Awaitable[None] | None]


class SeenFilter:
    """Output hooks that drop what this machine already showed of the session and count
    what they pass on, so ``cursor`` is where the next reattach takes over."""

    def __init__(
        self,
        previous: Cursor | None,
        stdout: Write,
        stderr: Write,
        notice: Callable[[str], None] = lambda message: None,
        from_start: str = "--from-start",
        boot: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._previous = previous
        self._boot = boot
        self._boot_seen: str | None = None
        self._stdout = stdout
        self._stderr = stderr
        self._notice = notice
        self._from_start = from_start
        self._skip_until = 0
        self._position = 0
        self._pid: int | None = None

    def started(self, started: Any) -> None:
        """STARTED: where the replay begins, and whether the cursor is this session's."""
        self._position = started.offset
        self._pid = started.pid
        self._boot_seen = self._boot()
        previous = self._previous
        if previous is None or started.created:
            self._skip_until = 0
        elif previous.pid == started.pid and _same_boot(previous.boot, self._boot_seen):
            self._skip_until = previous.offset
        else:
            self._skip_until = 0
            if started.offset > 0:  # replayed from the old run's cursor: say what is missing
                self._notice(
                    f"session {started.session_id} is another run than the one shown here "
                    f"before; its first {started.offset} bytes were not shown ({self._from_start} "
                    "shows them)"
                )
            self._previous = None  # said once

    async def stdout(self, data: bytes) -> None:
        await self._pass(self._stdout, data)

    async def stderr(self, data: bytes) -> None:
        await self._pass(self._stderr, data)

    async def _pass(self, write: Write, data: bytes) -> None:
        begin = self._position
        self._position += len(data)
        if self._position <= self._skip_until:
            return
        if begin < self._skip_until:
            data = data[self._skip_until - begin :]
        result = write(data)
        if result is not None:
            await result

    @property
    def cursor(self) -> Cursor | None:
        """What has been shown so far (None before STARTED)."""
        if self._pid is None:
            return None
        return Cursor(max(self._position, self._skip_until), self._pid, self._boot_seen)


def _same_boot(kept: str | None, now: str | None) -> bool:
    return kept is None or now is None or kept == now


__all__ = ["Cursor", "SeenFilter", "remember", "shown"]
