"""Named sessions' output logs on disk (``flyvault.server.session_disk``): what is kept,
read back by offset with each byte's stream, against a model of everything produced."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flyvault.server.outputlog import STDERR, STDOUT
from flyvault.server.session_disk import MIN_SEGMENT, DiskBudget, DiskLog, DiskLogLimits

_LIMITS = st.builds(
    DiskLogLimits,
    head_bytes=st.integers(min_value=0, max_value=3 * MIN_SEGMENT),
    tail_bytes=st.integers(min_value=0, max_value=6 * MIN_SEGMENT),
)
_APPENDS = st.lists(
    st.tuples(st.sampled_from([STDOUT, STDERR]), st.integers(min_value=1, max_value=40_000)),
    max_size=30,
)


def _produce(disk: DiskLog, appends: list[tuple[int, int]]) -> tuple[bytes, bytes]:
    data, channels = bytearray(), bytearray()
    for channel, size in appends:
        chunk = bytes((len(data) + i) % 251 for i in range(size))
        disk.append(channel, chunk)
        data += chunk
        channels += bytes([channel]) * size
    return bytes(data), bytes(channels)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(limits=_LIMITS, appends=_APPENDS, where=st.floats(min_value=0, max_value=1))
def test_reads_return_the_bytes_at_their_offsets_with_their_streams(
    tmp_path: Path, limits: DiskLogLimits, appends: list[tuple[int, int]], where: float
) -> None:
    directory = tmp_path / f"log-{os.urandom(4).hex()}"
    disk = DiskLog(directory, limits)
    try:
        data, channels = _produce(disk, appends)
        assert disk.end == len(data)
        offset = int(where * len(data))
        kept = 0
        while offset < len(data):  # bounded: each read moves forward or ends
            result = disk.read(offset, 10_000)
            if result.next_offset == result.start_offset:
                assert disk.first_held(offset) == disk.end  # nothing held from here on
                break
            assert result.start_offset == offset + result.dropped
            got = b"".join(piece for _, piece in result.chunks)
            assert got == data[result.start_offset : result.next_offset]
            position = result.start_offset
            for channel, piece in result.chunks:
                assert set(channels[position : position + len(piece)]) == {channel}
                position += len(piece)
            kept += len(got)
            offset = result.next_offset
        head = min(limits.head_bytes, len(data))
        if head:
            assert disk.read(0, head).next_offset == head  # the head is always whole
        if limits.tail_bytes:  # at least the tail's worth of the newest bytes (or all)
            newest = min(len(data) - head, limits.tail_bytes)
            assert disk.first_held(len(data) - newest) == len(data) - newest
            on_disk = sum(p.stat().st_size for p in directory.glob("tail-*"))
            assert on_disk <= limits.tail_bytes + 2 * limits.segment_bytes
    finally:
        disk.close()
    assert not directory.exists()


def test_a_disk_error_stops_the_log_not_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskLog(tmp_path / "log", DiskLogLimits(head_bytes=1000, tail_bytes=0))
    disk.append(STDOUT, b"x" * 100)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    disk.append(STDOUT, b"y" * 100)  # no exception: the ring goes on alone
    monkeypatch.undo()
    assert disk.failed
    disk.append(STDOUT, b"z")
    disk.close()


def test_all_logs_share_a_budget_and_leave_the_volume_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limits = DiskLogLimits(head_bytes=1000, tail_bytes=4 * MIN_SEGMENT, total_bytes=0)
    budget = DiskBudget(tmp_path, total=1000 + 3 * MIN_SEGMENT, free_floor=0)
    first = DiskLog(tmp_path / "first", limits, budget)
    first.append(STDOUT, b"a" * (1000 + 3 * MIN_SEGMENT))  # head + 3 segments: the budget
    assert budget.used == 1000 + 3 * MIN_SEGMENT
    first.append(STDOUT, b"b" * MIN_SEGMENT)  # past it: its own oldest segment goes first
    assert budget.used == 1000 + 3 * MIN_SEGMENT and first.first_held(1000) == 1000 + MIN_SEGMENT
    second = DiskLog(tmp_path / "second", limits, budget)
    second.append(STDOUT, b"c" * 1000)  # the head was allowed when the log was made
    second.append(STDOUT, b"d" * 10)  # no segment to give up: this log's tail stops
    assert "budget or the volume's free space is used up" in caplog.text
    assert second.read(0, 2000).next_offset == 1000 and second.end == 1010
    first.close()
    second.close()
    assert budget.used == 0


def test_a_volume_short_of_room_gets_no_tail(tmp_path: Path) -> None:
    huge = 1 << 62  # more free space than any disk has: every new segment is refused
    budget = DiskBudget(tmp_path, total=1 << 40, free_floor=huge)
    disk = DiskLog(tmp_path / "log", DiskLogLimits(head_bytes=10, tail_bytes=MIN_SEGMENT), budget)
    disk.append(STDERR, b"e" * 100)
    assert disk.first_held(10) == disk.end == 100 and not list(disk.directory.glob("tail-*"))
    disk.close()
