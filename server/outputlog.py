"""A bounded log of a process's output, addressed by absolute byte offsets.

Every byte a session ever produced has an absolute offset: the first byte is 0, and
``end`` is the number of bytes appended so far. Only the last ``capacity`` bytes are kept;
``start`` is the offset of the oldest one still retained. A client that reattaches sends
the offset it has seen up to and gets exactly the bytes after it, or, if the log has moved
past it, the retained bytes plus an exact count of what it lost (``dropped``). Offsets never
restart, so a stale watermark can never select the wrong bytes (the original restarted at 0
on a respawn and silently skipped gaps, flaws 20 and 21).

Pure logic: no asyncio, no IO, no clock. The server feeds ``append`` from the process
reader and answers attaches with ``read``.

Storage is a list of ``(offset, channel, buffer)`` entries with a head index (a deque with
random access, so ``read`` can bisect). Two details keep it O(1) amortised per byte, however
small the appends are:

* Small appends are coalesced into the newest entry while it is on the same channel and
  smaller than ``COALESCE_LIMIT``; a PTY that echoes one keystroke at a time would otherwise
  cost one tuple per byte.
* Dropping the oldest bytes never copies: ``start`` simply moves into the oldest entry,
  which is popped once all of it is behind ``start``. The memory held is therefore at most
  ``capacity`` plus one entry (``COALESCE_LIMIT``, or one large append) of dead bytes; the
  *logical* content (what ``read`` can return, counted by ``retained``) never exceeds
  ``capacity``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .defaults import DEFAULT_SESSION_BUFFER

STDOUT, STDERR = 1, 2

#: Appends smaller than this are copied into a growable buffer that later appends on the
#: same channel can extend; larger ones are stored as they are (no copy for ``bytes``).
SMALL_APPEND = 4096
#: An entry stops absorbing small appends once it reaches this size.
COALESCE_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class ReadResult:
    """What ``OutputLog.read`` returns.

    ``chunks`` are ``(channel, data)`` in output order; adjacent pieces of the same channel
    are merged, so consecutive chunks always differ in channel. They cover the offsets
    ``start_offset`` up to ``next_offset``. ``dropped`` is how many bytes the caller asked
    for that are no longer retained (``start_offset - offset``, or 0).
    """

    chunks: list[tuple[int, bytes]]
    start_offset: int
    next_offset: int
    dropped: int

    @property
    def size(self) -> int:
        return self.next_offset - self.start_offset


class OutputLog:
    """The last ``capacity`` bytes of a process's output, with absolute offsets."""

    def __init__(self, capacity: int = DEFAULT_SESSION_BUFFER) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 byte, not {capacity}")
        self.capacity = capacity
        # Entries from self._head on are live; earlier ones are popped and compacted lazily.
        self._entries: list[tuple[int, int, bytes | bytearray]] = []
        self._head = 0
        self._start = 0
        self._end = 0

    @property
    def start(self) -> int:
        """Offset of the oldest retained byte (equals ``end`` when nothing is retained)."""
        return self._start

    @property
    def end(self) -> int:
        """Total bytes ever appended: the offset the next byte will get."""
        return self._end

    @property
    def retained(self) -> int:
        return self._end - self._start

    def append(self, channel: int, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` on ``channel``, dropping the oldest bytes beyond ``capacity``."""
        size = len(data)
        if size == 0:
            return
        if size >= self.capacity:
            # Only the tail of this append survives; everything older goes.
            keep = bytes(data[size - self.capacity :])
            self._entries = [(self._end + size - self.capacity, channel, keep)]
            self._head = 0
            self._end += size
            self._start = self._end - self.capacity
            return
        last = self._entries[-1] if self._head < len(self._entries) else None
        if (
            last is not None
            and last[1] == channel
            and isinstance(last[2], bytearray)
            and len(last[2]) + size <= COALESCE_LIMIT
        ):
            last[2].extend(data)
        elif size < SMALL_APPEND:
            self._entries.append((self._end, channel, bytearray(data)))
        else:
            self._entries.append((self._end, channel, bytes(data)))
        self._end += size
        if self._end - self._start > self.capacity:
            self._drop(self._end - self.capacity - self._start)

    def _drop(self, count: int) -> None:
        """Forget the ``count`` oldest retained bytes."""
        self._start += count
        # Entries wholly behind the new start go; the one it falls into stays, partly dead.
        while True:
            offset, _, buffer = self._entries[self._head]
            if offset + len(buffer) > self._start:
                break
            self._head += 1
        # Compact once the dead prefix is at least half the list: amortised O(1).
        if self._head > 32 and self._head * 2 > len(self._entries):
            del self._entries[: self._head]
            self._head = 0

    def read(self, offset: int, max_bytes: int) -> ReadResult:
        """Up to ``max_bytes`` bytes from ``offset`` on.

        An ``offset`` older than ``start`` reads from ``start`` and reports the gap in
        ``dropped``. An ``offset`` beyond ``end`` (a client claiming to have seen more than
        was ever produced, e.g. a watermark from another session) is clamped to ``end``: it
        gets nothing now, ``dropped`` 0, and ``next_offset == end``, so it resynchronises on
        the next byte instead of waiting for offsets that may never come.
        """
        if offset < 0:
            raise ValueError(f"offset must not be negative, not {offset}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, not {max_bytes}")
        dropped = self._start - offset if offset < self._start else 0
        position = min(max(offset, self._start), self._end)
        stop = min(position + max_bytes, self._end)
        # Pieces grouped by runs of one channel, joined once at the end (no quadratic +=).
        runs: list[tuple[int, list[bytes | bytearray]]] = []
        if position < stop:
            index = (
                bisect.bisect_right(self._entries, position, lo=self._head, key=_entry_offset) - 1
            )
            cursor = position
            while cursor < stop:
                entry_offset, channel, buffer = self._entries[index]
                piece = buffer[cursor - entry_offset : stop - entry_offset]
                if runs and runs[-1][0] == channel:
                    runs[-1][1].append(piece)
                else:
                    runs.append((channel, [piece]))
                cursor += len(piece)
                index += 1
        chunks = [(channel, b"".join(pieces)) for channel, pieces in runs]
        return ReadResult(chunks, position, stop, dropped)


def _entry_offset(entry: tuple[int, int, bytes | bytearray]) -> int:
    return entry[0]
