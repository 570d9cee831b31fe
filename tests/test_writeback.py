"""The writeback kick (flyvault.writeback): its steps, the real sync_file_range call, and
the download writer using it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from flyvault import writeback
from flyvault.sparse import SparseWriter
from flyvault.writeback import STEP, Writeback, start_writeback


def test_kicks_come_every_step_and_cover_what_was_written_since_the_last() -> None:
    kicks: list[tuple[int, int, int]] = []

    def record(fd: int, offset: int, length: int) -> bool:
        kicks.append((fd, offset, length))
        return True

    follow = Writeback(7, 100, kick=record)
    follow.wrote(100 + STEP - 1)
    assert kicks == []
    follow.wrote(100 + STEP + 5)
    assert kicks == [(7, 100, STEP + 5)]
    follow.wrote(100 + 2 * STEP)
    assert kicks == [(7, 100, STEP + 5)]
    follow.wrote(100 + 3 * STEP)
    assert kicks[1:] == [(7, 100 + STEP + 5, 2 * STEP - 5)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_real_call_starts_writeback_of_a_file_and_refuses_a_pipe(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with open(path, "wb") as out:
        out.write(os.urandom(1 << 20))
        out.flush()
        assert start_writeback(out.fileno(), 0, 1 << 20) is True
    read, write = os.pipe()
    try:
        assert start_writeback(write, 0, 10) is False  # ESPIPE: the fsync does the work
    finally:
        os.close(read)
        os.close(write)


def test_the_download_writer_kicks_as_it_writes_a_file_to_be_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kicks: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int) -> bool:
        kicks.append((offset, length))
        return True

    monkeypatch.setattr(writeback, "_kick", record)  # the system call, not our code
    piece = os.urandom(1 << 20)
    with open(tmp_path / "big", "wb") as out:
        writer = SparseWriter(out.fileno(), fsync_follows=True)
        for _ in range(2 * STEP // len(piece) + 3):
            writer.write(piece)
        writer.finish()
        tree_member = SparseWriter(out.fileno())  # not fsynced: no kick
        for _ in range(2 * STEP // len(piece)):
            tree_member.write(piece)
    assert [offset for offset, _ in kicks] == [0, kicks[0][1]]
    assert all(length >= STEP for _, length in kicks)
    assert sum(length for _, length in kicks) <= (tmp_path / "big").stat().st_size
