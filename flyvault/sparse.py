"""Writing a file's data so that its zero blocks stay holes (sparse files), on both ends
of a copy: the client's downloads (``flyvault.client.copy_local``) and the vault's writes
(``server.files_worker``)."""

from __future__ import annotations

import os

from flyvault.writeback import Writeback

#: Zero runs of this size, aligned, are seeked over instead of written (sparse files).
SPARSE_BLOCK = 4096
#: Data held before writing: a file up to this size costs one write.
HOLD = 64 * 1024
ZERO_BLOCK = bytes(SPARSE_BLOCK)


class SparseWriter:
    """Writes a file's data at increasing offsets, seeking over aligned zero blocks.

    Data arrives in pieces of any size, so up to one block is carried to the next call:
    only whole aligned blocks are judged, and ``finish`` writes what is left."""

    def __init__(self, fd: int, position: int = 0, *, fsync_follows: bool = False) -> None:
        self.fd = fd
        self.position = position  # where the carried bytes begin
        self._carry = b""
        #: Started as it goes for a file fsynced at its end (``flyvault.writeback``).
        self._writeback = Writeback(fd, position) if fsync_follows else None
        #: The file's length as written so far (it is ``position`` long when handed over).
        self._length = position

    @property
    def size(self) -> int:
        return self.position + len(self._carry)

    def write(self, data: bytes) -> None:
        if self._carry:
            data = self._carry + data
        if len(data) < HOLD:  # a small file lands in one write, from ``finish``
            self._carry = data
            return
        cut = len(data) - (self.position + len(data)) % SPARSE_BLOCK
        data, self._carry = data[:cut], data[cut:]
        self._put(data)

    def _put(self, data: bytes) -> None:
        """``data`` at ``position``: aligned whole zero blocks are seeked over."""
        if ZERO_BLOCK not in data:  # the common case: no zero run worth a hole
            self._write_at(data)
            return
        view = memoryview(data)
        start = 0  # beginning of the run not yet written
        index = -self.position % SPARSE_BLOCK  # first aligned block inside data
        while index + SPARSE_BLOCK <= len(data):
            if data[index : index + SPARSE_BLOCK] == ZERO_BLOCK:
                if index > start:
                    self._write_at(view[start:index])
                self.position += SPARSE_BLOCK
                start = index + SPARSE_BLOCK
            index += SPARSE_BLOCK
        if start < len(data):
            self._write_at(view[start:])

    def _write_at(self, data: bytes | memoryview) -> None:
        if not data:
            # Nothing written: the length must not move. Taking ``position`` here, past a
            # trailing hole seeked over, hid that hole from ``finish``, which then skipped
            # the ftruncate and the file lost its zero tail (with its digest still "matching").
            return
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, self.position)
            self.position += written
            view = view[written:]
        self._length = max(self._length, self.position)
        if self._writeback is not None:
            self._writeback.wrote(self.position)

    def finish(self, size: int | None = None) -> None:
        """Write the carried bytes and set the length (a trailing hole is part of it)."""
        carry, self._carry = self._carry, b""
        self._put(carry)
        length = self.position if size is None else size
        if length != self._length:  # a trailing hole (or a shorter file): one more call
            os.ftruncate(self.fd, length)
            self._length = length


__all__ = ["HOLD", "SPARSE_BLOCK", "ZERO_BLOCK", "SparseWriter"]
