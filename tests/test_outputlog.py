"""The output ring buffer: absolute offsets, exact replay, exact loss accounting."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flyvault.server.outputlog import COALESCE_LIMIT, STDERR, STDOUT, OutputLog, ReadResult


class Model:
    """Everything ever appended, byte by byte with its channel: the obvious oracle."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.channels: list[int] = []

    def append(self, channel: int, data: bytes) -> None:
        self.data += data
        self.channels += [channel] * len(data)

    def chunks(self, start: int, stop: int) -> list[tuple[int, bytes]]:
        """Runs of one channel between two absolute offsets."""
        runs: list[tuple[int, bytes]] = []
        for offset in range(start, stop):
            channel = self.channels[offset]
            byte = self.data[offset : offset + 1]
            if runs and runs[-1][0] == channel:
                runs[-1] = (channel, runs[-1][1] + byte)
            else:
                runs.append((channel, bytes(byte)))
        return runs


def flatten(chunks: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    return [(channel, byte) for channel, data in chunks for byte in data]


def read_all(log: OutputLog, offset: int, step: int) -> tuple[list[tuple[int, bytes]], int]:
    """Read from ``offset`` to the end in steps of ``step``; return the chunks and dropped."""
    first = log.read(offset, step)
    chunks = list(first.chunks)
    position = first.next_offset
    while position < log.end:
        result = log.read(position, step)
        assert result.dropped == 0
        assert result.start_offset == position
        assert result.next_offset > position
        chunks += result.chunks
        position = result.next_offset
    return chunks, first.dropped


appends = st.lists(
    st.tuples(st.sampled_from([STDOUT, STDERR]), st.binary(min_size=0, max_size=300)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=700),
    writes=appends,
    offset_fraction=st.floats(min_value=0, max_value=1.2),
    step=st.integers(min_value=1, max_value=900),
)
def test_reads_reproduce_the_retained_suffix_exactly(
    capacity: int, writes: list[tuple[int, bytes]], offset_fraction: float, step: int
) -> None:
    log = OutputLog(capacity)
    model = Model()
    for channel, data in writes:
        log.append(channel, data)
        model.append(channel, data)
        assert log.end == len(model.data)
        assert log.retained <= capacity
        assert log.start == max(0, log.end - capacity)
    offset = int(offset_fraction * (log.end + 1))
    chunks, dropped = read_all(log, offset, step)
    begin = min(max(offset, log.start), log.end)
    assert flatten(chunks) == flatten(model.chunks(begin, log.end))
    assert dropped == (log.start - offset if offset < log.start else 0)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=500),
    writes=appends,
    reads=st.lists(
        st.tuples(st.integers(min_value=0, max_value=20000), st.integers(0, 600)), max_size=20
    ),
)
def test_single_reads_match_the_model(
    capacity: int, writes: list[tuple[int, bytes]], reads: list[tuple[int, int]]
) -> None:
    log = OutputLog(capacity)
    model = Model()
    for channel, data in writes:
        log.append(channel, data)
        model.append(channel, data)
    for offset, limit in reads:
        result = log.read(offset, limit)
        begin = min(max(offset, log.start), log.end)
        stop = min(begin + limit, log.end)
        assert result.start_offset == begin
        assert result.next_offset == stop
        assert result.size == stop - begin
        assert result.dropped == max(0, log.start - offset)
        # Chunks are merged runs: never empty, never two of one channel in a row.
        assert result.chunks == model.chunks(begin, stop)
        assert all(data for _, data in result.chunks)
        assert all(a[0] != b[0] for a, b in zip(result.chunks, result.chunks[1:], strict=False))


@settings(max_examples=100, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=400),
    writes=appends,
    checkpoints=st.sets(st.integers(min_value=0, max_value=60)),
)
def test_live_reader_sees_every_byte_once_or_counts_the_gap(
    capacity: int, writes: list[tuple[int, bytes]], checkpoints: set[int]
) -> None:
    """A client reading now and then: received + dropped == produced, in order."""
    log = OutputLog(capacity)
    model = Model()
    received: list[tuple[int, int]] = []
    lost = 0
    position = 0
    for index, (channel, data) in enumerate(writes):
        log.append(channel, data)
        model.append(channel, data)
        if index in checkpoints:
            result = log.read(position, 1 << 30)
            # The gap is exactly the bytes between the old watermark and the replay start.
            assert result.start_offset == position + result.dropped
            lost += result.dropped
            assert flatten(result.chunks) == flatten(
                model.chunks(result.start_offset, result.next_offset)
            )
            received += flatten(result.chunks)
            position = result.next_offset
    result = log.read(position, 1 << 30)
    assert result.start_offset == position + result.dropped
    assert flatten(result.chunks) == flatten(model.chunks(result.start_offset, log.end))
    lost += result.dropped
    received += flatten(result.chunks)
    assert result.next_offset == log.end
    # Nothing duplicated, nothing silently skipped: received + counted gaps == produced.
    assert len(received) + lost == log.end


def test_ten_megabytes_while_detached_keeps_exactly_the_last_capacity_bytes() -> None:
    capacity = 1024 * 1024
    log = OutputLog(capacity)
    produced = bytearray()
    for index in range(10 * 16):
        block = os.urandom(64 * 1024)
        log.append(STDOUT if index % 3 else STDERR, block)
        produced += block
    total = 10 * 1024 * 1024
    assert log.end == total
    assert log.retained == capacity
    assert log.start == total - capacity
    result = log.read(0, 2 * capacity)
    assert result.dropped == total - capacity
    assert result.start_offset == total - capacity
    assert result.next_offset == total
    assert b"".join(data for _, data in result.chunks) == produced[-capacity:]


def test_tiny_appends_are_coalesced_and_stay_exact() -> None:
    log = OutputLog(100_000)
    produced = bytearray()
    for index in range(300_000):
        byte = bytes([index % 251])
        log.append(STDOUT, byte)
        produced += byte
    # One entry per COALESCE_LIMIT bytes, not one per append.
    live = len(log._entries) - log._head
    assert live <= 100_000 // COALESCE_LIMIT + 2
    result = log.read(0, 1 << 20)
    assert result.dropped == 200_000
    assert result.chunks == [(STDOUT, bytes(produced[-100_000:]))]


def test_huge_single_append_keeps_its_tail() -> None:
    log = OutputLog(10)
    log.append(STDOUT, b"abc")
    log.append(STDERR, b"0123456789ABCDEF")
    assert (log.start, log.end, log.retained) == (9, 19, 10)
    assert log.read(0, 100) == ReadResult([(STDERR, b"6789ABCDEF")], 9, 19, 9)


def test_split_chunk_at_the_front_and_at_the_limit() -> None:
    log = OutputLog(8)
    log.append(STDOUT, b"aaaa")
    log.append(STDERR, b"bbbb")
    log.append(STDOUT, b"cc")
    assert log.start == 2
    assert log.read(0, 3) == ReadResult([(STDOUT, b"aa"), (STDERR, b"b")], 2, 5, 2)
    assert log.read(5, 3) == ReadResult([(STDERR, b"bbb")], 5, 8, 0)
    assert log.read(8, 3) == ReadResult([(STDOUT, b"cc")], 8, 10, 0)


def test_offset_beyond_end_is_clamped_to_end() -> None:
    log = OutputLog(16)
    log.append(STDOUT, b"hello")
    assert log.read(999, 10) == ReadResult([], 5, 5, 0)
    log.append(STDOUT, b"!")
    # The clamped client resumes from the real end, not from its bogus claim.
    assert log.read(5, 10) == ReadResult([(STDOUT, b"!")], 5, 6, 0)


def test_empty_appends_and_empty_log() -> None:
    log = OutputLog(4)
    log.append(STDOUT, b"")
    assert (log.start, log.end, log.retained) == (0, 0, 0)
    assert log.read(0, 10) == ReadResult([], 0, 0, 0)
    assert log.read(0, 0) == ReadResult([], 0, 0, 0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        OutputLog(0)
    log = OutputLog(4)
    with pytest.raises(ValueError):
        log.read(-1, 1)
    with pytest.raises(ValueError):
        log.read(0, -1)


def test_appended_buffers_are_copied_when_mutable() -> None:
    log = OutputLog(64)
    buffer = bytearray(b"abc")
    log.append(STDOUT, buffer)
    buffer[:] = b"xyz"
    log.append(STDOUT, memoryview(b"def"))
    assert log.read(0, 10).chunks == [(STDOUT, b"abcdef")]
    # Returned chunks are immutable snapshots, untouched by later appends.
    first = log.read(0, 10).chunks[0][1]
    log.append(STDOUT, b"ghi")
    assert isinstance(first, bytes)
    assert first == b"abcdef"
