"""What this machine has shown of each named session, so a reattach shows only the rest.

The vault replays a session's output from any offset it still holds. Which offset a new
client should start from is this machine's business: ``cursors.json`` in the user's state
directory keeps, per vault and session, the offset shown up to and the session's process id
(a later session of the same name is another process: its offsets start again).

A reattach still asks the vault for everything it holds (as before) and ``SeenFilter`` drops
what was shown: the process id in STARTED tells whether the cursor belongs to this session
before any byte is dropped, which a resume offset sent in the OPEN could not. The replay is
bounded by the vault's ring buffer (1 MiB by default). ``--from-start`` skips the filter.

Entries are bounded (the newest ``MAX_ENTRIES``); the file is replaced atomically, and a
damaged one is treated as empty (it only saves repeating output).
"""

from __future__ import annotations

import json
import logging
import os
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


def _path() -> Path:
    from flyvault.paths import state_dir

    return state_dir() / FILE


def _key(vault: str, session_id: str) -> str:
    return f"{vault}/{session_id}"


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def shown(vault: str, session_id: str) -> Cursor | None:
    """Where this machine stopped showing the session, if it ever showed it."""
    entry = _load(_path()).get(_key(vault, session_id))
    if not isinstance(entry, dict):
        return None
    offset, pid = entry.get("offset"), entry.get("pid")
    if isinstance(offset, int) and isinstance(pid, int) and offset >= 0:
        return Cursor(offset, pid)
    return None


def remember(vault: str, session_id: str, cursor: Cursor, now: float | None = None) -> None:
    """Record what was shown (best effort: a read-only state directory only costs a
    repeat on the next reattach)."""
    path = _path()
    entries = _load(path)
    entries[_key(vault, session_id)] = {
        "offset": cursor.offset,
        "pid": cursor.pid,
        "at": time.time() if now is None else now,
    }
    if len(entries) > MAX_ENTRIES:
        newest = sorted(entries.items(), key=lambda item: _age(item[1]), reverse=True)
        entries = dict(newest[:MAX_ENTRIES])
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = path.with_name(f".{FILE}.{os.getpid()}")
        temp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(temp, path)
    except OSError as exc:
        log.info("could not record what was shown of session %s: %s", session_id, exc)


def _age(entry: Any) -> float:
    at = entry.get("at") if isinstance(entry, dict) else None
    return float(at) if isinstance(at, (int, float)) else 0.0


Write = Callable[[bytes], Awaitable[None] | None]


class SeenFilter:
    """Output hooks that drop what this machine already showed of the session and count
    what they pass on, so ``cursor`` is where the next reattach takes over."""

    def __init__(self, previous: Cursor | None, stdout: Write, stderr: Write) -> None:
        self._previous = previous
        self._stdout = stdout
        self._stderr = stderr
        self._skip_until = 0
        self._position = 0
        self._pid: int | None = None

    def started(self, started: Any) -> None:
        """STARTED: where the replay begins, and whether the cursor is this session's."""
        self._position = started.offset
        self._pid = started.pid
        previous = self._previous
        same = previous is not None and previous.pid == started.pid and not started.created
        self._skip_until = previous.offset if same and previous is not None else 0

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
        return Cursor(max(self._position, self._skip_until), self._pid)


__all__ = ["Cursor", "SeenFilter", "remember", "shown"]
