"""A named session's output on disk, beyond the memory ring: the head kept whole, the tail
rotating.

The ring (``OutputLog``) holds the newest bytes in memory, 1 MiB by default. A long job's
first lines (the command echoed, the versions it found, the first error) are what one reads
back days later, and they are the first to leave the ring. So every byte of a named session
also goes to disk, under the session's own directory:

- ``head``: the first ``head_bytes`` of output, kept whole for the session's life;
- ``tail-<offset>``: segments (a sixteenth of the tail, 64 KiB to 4 MiB) after the head;
  at least the newest ``tail_bytes`` are kept (at most two segments more on disk), the
  oldest segment going when a new one starts.

Offsets are the log's own (absolute), and which stream each byte came on is kept too (a
list of the offsets where the stream changes, trimmed with the segments). A read that falls
between the head and the oldest segment (bytes dropped from disk too) skips to the oldest
byte held, with the count dropped, as the ring does.

All logs together stay within a budget (``--session-log-total``, 1 GiB) and leave
``FREE_FLOOR`` free on the volume (the workload's files live there too): a log that would
go past either rotates its own tail without growing, or stops. Disk trouble (full,
read-only) never stops a session: the log stops writing, says so once, and the ring goes
on alone. The directory goes when the session does. The files are 0600 in 0700
directories: a copy at rest of what the commands printed.
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from .defaults import (
    DEFAULT_SESSION_LOG_HEAD,
    DEFAULT_SESSION_LOG_TAIL,
    DEFAULT_SESSION_LOG_TOTAL,
)
from .outputlog import ReadResult

log = logging.getLogger("flyvault.server.sessions")

#: Tail segments: a sixteenth of the tail, within these bounds (the tail is dropped a
#: segment at a time, so it holds at least ``tail_bytes`` and at most two segments more).
MIN_SEGMENT = 64 * 1024
MAX_SEGMENT = 4 * 1024 * 1024


#: Room a new segment must leave free on the volume.
FREE_FLOOR = 256 * 1024 * 1024


class DiskBudget:
    """The bytes all session logs of one init may hold, and the room they must leave."""

    def __init__(self, root: Path, total: int, free_floor: int = FREE_FLOOR) -> None:
        self.root = root
        self.total = total
        self.free_floor = free_floor
        self.used = 0

    def allows(self, size: int) -> bool:
        if self.used + size > self.total:
            return False
        try:
            stats = os.statvfs(self.root)
        except OSError:
            return False
        return stats.f_bavail * stats.f_frsize - size >= self.free_floor


@dataclass(frozen=True)
class DiskLogLimits:
    """How much of each named session's output init keeps on disk (``--session-log-*``)."""

    head_bytes: int = DEFAULT_SESSION_LOG_HEAD
    tail_bytes: int = DEFAULT_SESSION_LOG_TAIL
    total_bytes: int = DEFAULT_SESSION_LOG_TOTAL

    @property
    def segment_bytes(self) -> int:
        return min(MAX_SEGMENT, max(MIN_SEGMENT, self.tail_bytes // 16))

    @property
    def enabled(self) -> bool:
        return self.head_bytes > 0 or self.tail_bytes > 0


@dataclass
class _Segment:
    start: int
    path: Path
    size: int = 0
    fd: int | None = field(default=None, repr=False)


class DiskLog:
    """One session's output on disk (see the module's docstring)."""

    def __init__(
        self, directory: Path, limits: DiskLogLimits, budget: DiskBudget | None = None
    ) -> None:
        self.directory = directory
        self.limits = limits
        self.budget = budget
        directory.mkdir(mode=0o700, parents=True, exist_ok=False)
        self._head = _Segment(0, directory / "head")
        self._head.fd = _create(self._head.path)
        self._tail: list[_Segment] = []
        self.end = 0
        #: Offsets where the stream changes, and the stream from there on.
        self._run_offsets = array("Q")
        self._run_channels = bytearray()
        self.failed = False
        #: The budget stopped the tail: past the head, only the offsets move.
        self._stopped = False

    # Writing ---------------------------------------------------------------------------

    def append(self, channel: int, data: bytes | bytearray | memoryview) -> None:
        if self.failed or not data:
            return
        storing = not self._stopped and (
            self._head.size < self.limits.head_bytes or self.limits.tail_bytes > 0
        )
        if storing and (not self._run_channels or self._run_channels[-1] != channel):
            self._run_offsets.append(self.end)
            self._run_channels.append(channel)
        view = memoryview(data)
        try:
            while view:
                segment = self._writable()
                if segment is None:  # no tail kept: past the head, only the offsets move
                    self.end += len(view)
                    break
                room = self._room(segment)
                piece = view[:room]
                _write_all(segment, piece)
                if self.budget is not None:
                    self.budget.used += len(piece)
                self.end += len(piece)
                view = view[len(piece) :]
        except OSError as exc:
            self._fail(exc)

    def _room(self, segment: _Segment) -> int:
        limit = self.limits.head_bytes if segment is self._head else self.limits.segment_bytes
        return limit - segment.size

    def _writable(self) -> _Segment | None:
        if self._head.size < self.limits.head_bytes:
            return self._head
        self._close_fd(self._head)
        if self.limits.tail_bytes <= 0 or self._stopped:
            return None
        if self._tail and self._tail[-1].size < self.limits.segment_bytes:
            return self._tail[-1]
        if self._tail:
            self._close_fd(self._tail[-1])
        if not self._room_for_a_segment():
            return None
        segment = _Segment(self.end, self.directory / f"tail-{self.end:020d}")
        segment.fd = _create(segment.path)
        self._tail.append(segment)
        self._drop_old_segments()
        return segment

    def _room_for_a_segment(self) -> bool:
        """Within the budget, a new segment may grow the log; past it, the oldest segment
        makes room (the tail rotates without growing); with none to give, the tail stops."""
        budget = self.budget
        size = self.limits.segment_bytes
        if budget is None or budget.allows(size):
            return True
        if len(self._tail) > 1:  # the newest is full: the oldest goes first
            self._drop(self._tail.pop(0))
            self._trim_runs()
            return True
        log.warning(
            "session output log %s: the logs' budget or the volume's free space is used up; "
            "past its first %d bytes this session's output is kept in memory only",
            self.directory,
            self._head.size,
        )
        self._stopped = True
        return False

    def _drop(self, segment: _Segment) -> None:
        self._close_fd(segment)
        segment.path.unlink(missing_ok=True)
        if self.budget is not None:
            self.budget.used -= segment.size

    def _drop_old_segments(self) -> None:
        """Keep at least the newest ``tail_bytes``: enough full segments to hold them, and
        the one being written."""
        segment = max(1, self.limits.segment_bytes)
        keep = -(-self.limits.tail_bytes // segment) + 1
        while len(self._tail) > keep:
            self._drop(self._tail.pop(0))
        self._trim_runs()

    def _trim_runs(self) -> None:
        """Forget stream changes inside the dropped part (keep the one the tail starts in)."""
        if not self._tail or self._tail[0].start <= self._head.size:
            return
        first = bisect.bisect_right(self._run_offsets, self._head.size)
        last = bisect.bisect_right(self._run_offsets, self._tail[0].start) - 1
        if last > first:
            del self._run_offsets[first:last]
            del self._run_channels[first:last]

    def _fail(self, exc: OSError) -> None:
        log.warning(
            "session output log %s: %s; the session goes on with its memory buffer only",
            self.directory,
            exc,
        )
        self.failed = True
        self.close(remove=False)

    # Reading ---------------------------------------------------------------------------

    def first_held(self, offset: int) -> int:
        """``offset`` if the log holds it, else the next offset it holds (``end`` if none)."""
        if offset < self._head.size:
            return offset
        for segment in self._tail:
            if offset < segment.start + segment.size:
                return max(offset, segment.start)
        return self.end

    def read(self, offset: int, max_bytes: int) -> ReadResult:
        """Up to ``max_bytes`` from ``offset`` (moved to ``first_held``), from one file."""
        start = self.first_held(offset)
        dropped = start - offset
        segment = self._segment_at(start)
        if segment is None or self.failed:
            return ReadResult([], start, start, dropped)
        count = min(max_bytes, segment.start + segment.size - start)
        with open(segment.path, "rb", buffering=0) as file:
            data = os.pread(file.fileno(), count, start - segment.start)
        stop = start + len(data)
        return ReadResult(self._chunks(start, data), start, stop, dropped)

    def _segment_at(self, offset: int) -> _Segment | None:
        if offset < self._head.size:
            return self._head
        for segment in self._tail:
            if segment.start <= offset < segment.start + segment.size:
                return segment
        return None

    def _chunks(self, start: int, data: bytes) -> list[tuple[int, bytes]]:
        chunks: list[tuple[int, bytes]] = []
        index = max(0, bisect.bisect_right(self._run_offsets, start) - 1)
        position, stop = start, start + len(data)
        while position < stop:
            channel = self._run_channels[index] if index < len(self._run_channels) else 1
            following = index + 1 < len(self._run_offsets)
            upto = min(stop, self._run_offsets[index + 1]) if following else stop
            if upto > position:
                chunks.append((channel, data[position - start : upto - start]))
            position = max(position, upto)
            index += 1
        return chunks

    # Ending ----------------------------------------------------------------------------

    def close(self, *, remove: bool = True) -> None:
        for segment in (self._head, *self._tail):
            self._close_fd(segment)
        if remove:
            if self.budget is not None:
                self.budget.used -= self._head.size + sum(s.size for s in self._tail)
                self._head.size = 0
                self._tail = []
            shutil.rmtree(self.directory, ignore_errors=True)

    @staticmethod
    def _close_fd(segment: _Segment) -> None:
        if segment.fd is not None:
            os.close(segment.fd)
            segment.fd = None


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _write_all(segment: _Segment, data: memoryview) -> None:
    assert segment.fd is not None
    while data:
        written = os.write(segment.fd, data)
        segment.size += written
        data = data[written:]


def clear_stale(directory: Path) -> None:
    """Init starts with no sessions: logs left by an earlier run are removed."""
    shutil.rmtree(directory, ignore_errors=True)


__all__ = ["DiskBudget", "DiskLog", "DiskLogLimits", "clear_stale"]
