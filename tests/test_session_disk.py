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
from flyvault.server.session_disk import MIN_SEGMENT, DiskLog, DiskLogLimits

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
        assert disk.read(0, head).next_offset == head  # the head is always whole
        if limits.tail_bytes:  # at least the tail's worth of the newest bytes (or all)
            newest = min(len(data) - head, limits.tail_bytes - limits.segment_bytes)
            assert disk.first_held(len(data) - max(newest, 0)) == len(data) - max(newest, 0)
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
