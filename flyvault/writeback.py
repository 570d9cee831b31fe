"""Starting the kernel's writeback of a file while it is being written.

A copy that ends with ``fsync`` (a file downloaded by ``cp``, a file written on the vault
with ``fsync``) would otherwise leave every byte dirty in the page cache until that call:
Linux starts writing a file back on its own only once dirty pages pass
``dirty_background_ratio`` (gigabytes on a large machine), so the fsync of a 1 GB file
waited for all of it at the end (0.3-0.4 s here, with the disk idle meanwhile).
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` every ``STEP`` bytes starts that writeback as
the data arrives, without waiting for it; the final fsync then waits for the tail only,
and still reports any error (the kick's own result is ignored for that reason).
Elsewhere than Linux there is no such call, and nothing is done.

The kick runs on the writer's thread (the client's event loop); it only queues the I/O, but
on a device whose queue is full that queuing can take a moment, once every ``STEP`` bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

#: Bytes between two kicks: large enough that the calls cost nothing, small enough that
#: the tail left to the final fsync is short.
STEP = 32 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2

Kick = Callable[[int, int, int], bool]
_kick: Kick | None = None


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Start writing back ``length`` bytes of ``fd`` from ``offset``; False when it could
    not be started (not Linux, not a regular file): the final fsync does the work then."""
    return prepare()(fd, offset, length)


def prepare() -> Kick:
    """Find the system call now (the first use would otherwise): init does so before it
    forks workers, which then look up nothing after entering the workload's root."""
    global _kick
    if _kick is None:
        _kick = _load()
    return _kick


def _load() -> Kick:
    if not sys.platform.startswith("linux"):
        return lambda fd, offset, length: False
    import ctypes

    try:
        call = ctypes.CDLL(None).sync_file_range
    except (OSError, AttributeError):  # a libc without it
        return lambda fd, offset, length: False
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int

    def kick(fd: int, offset: int, length: int) -> bool:
        return bool(call(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0)

    return kick


class Writeback:
    """Follows a file written at increasing offsets from ``start``: ``wrote(end)`` after
    each write starts the writeback of what was written since the last kick, once that
    reaches ``STEP`` bytes."""

    def __init__(self, fd: int, start: int = 0, *, kick: Kick = start_writeback) -> None:
        self.fd = fd
        self.kicked_to = start
        self._kick = kick

    def wrote(self, end: int) -> None:
        if end - self.kicked_to >= STEP:
            self._kick(self.fd, self.kicked_to, end - self.kicked_to)
            self.kicked_to = end
