"""The MCP server's output bounding and buffering, without a vault (pure functions)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flyvault.mcp_server.output import WINDOW, OutputBuffer, bounded_streams, plain_text, render
from flyvault.mcp_server.server import compact_schema

REREAD = 'read_output(vault="v", session_id="s", offset={offset}, length={length})'


def test_small_output_is_returned_whole() -> None:
    rendered = render(b"hello\n", 10, 100, REREAD)
    assert (rendered.text, rendered.returned_bytes, rendered.omitted_bytes) == ("hello\n", 6, 0)


@given(st.text(min_size=0, max_size=3000), st.integers(min_value=64, max_value=2000))
def test_bounded_output_never_splits_characters_and_accounts_for_every_byte(
    value: str, cap: int
) -> None:
    data = value.encode()
    rendered = render(data, 1000, cap, REREAD)
    if len(data) <= cap:
        assert rendered.text == value
        return
    assert rendered.returned_bytes <= cap
    assert rendered.returned_bytes + rendered.omitted_bytes == len(data)
    head, marker, tail = re.split(r"(\n\[\.\.\. .*? \.\.\.\]\n)", rendered.text, maxsplit=1)
    # Both parts decode cleanly (no U+FFFD from a split character) and are the real bytes.
    assert "\ufffd" not in head + tail or "\ufffd" in value
    assert data.startswith(head.encode()) and data.endswith(tail.encode())
    assert f"offset={rendered.omitted_from}, length={rendered.omitted_bytes}" in marker
    assert rendered.omitted_from == 1000 + len(head.encode())


def test_cuts_prefer_line_ends() -> None:
    data = b"".join(b"line %04d\n" % i for i in range(1000))
    rendered = render(data, 0, 1000, REREAD)
    head, _, tail = rendered.text.partition("\n[... ")
    assert head.endswith("\n") and tail.split(" ...]\n", 1)[1].startswith("line ")


def test_without_a_spill_file_the_oldest_bytes_go_and_reads_are_told() -> None:
    buffer = OutputBuffer(capacity=1000, spill_bytes=0)
    for i in range(30):
        buffer.append(bytes([65 + i % 26]) * 100, stderr=i % 2 == 1)
    assert buffer.end == 3000 and buffer.stdout_bytes == buffer.stderr_bytes == 1500
    assert 1000 <= buffer.end - buffer.start <= 1250 and buffer.spilled == 0
    start, data, dropped = buffer.read(0)
    assert start == buffer.start and dropped == buffer.start and len(data) == 3000 - start
    start, data, dropped = buffer.read(2900, 2950)
    assert (start, len(data), dropped) == (2900, 50, 0)
    buffer.skip_to(4000)  # the vault's replay started later: 1000 bytes were lost upstream
    assert buffer.lost_upstream == 1000 and buffer.read(3500)[2] == 500


def test_old_output_spills_to_disk_and_is_read_back_by_offset() -> None:
    buffer = OutputBuffer(capacity=1000, spill_bytes=10_000)
    produced = b"".join(b"line %05d\n" % i for i in range(800))  # 8,800 bytes
    for index in range(0, len(produced), 70):
        buffer.append(produced[index : index + 70])
    assert buffer.start == 0 and buffer.end == len(produced)
    assert buffer.held - buffer.spilled <= 1250  # memory stays bounded
    assert buffer.read(0) == (0, produced, 0)
    assert buffer.read(10, 30) == (10, produced[10:30], 0)
    buffer.close()  # the spill file is gone: only memory is left
    start, data, dropped = buffer.read(0)
    assert start == buffer.start > 0 and dropped == start and data == produced[start:]


def test_past_the_spill_limit_the_head_and_the_tail_stay_and_the_middle_is_counted() -> None:
    buffer = OutputBuffer(capacity=1000, spill_bytes=2000)
    produced = bytes(range(256)) * 40  # 10,240 bytes
    for index in range(0, len(produced), 100):
        buffer.append(produced[index : index + 100])
    assert buffer.start == 0 and 0 < buffer.file_end < buffer.mem_start
    head = buffer.read(0, 500)
    assert head == (0, produced[:500], 0)  # the real start, long after memory moved on
    start, data, dropped = buffer.read(0)  # a read across the lost part keeps the tail
    assert start == buffer.mem_start and data == produced[start:]
    assert dropped == buffer.mem_start - buffer.file_end
    start, data, dropped = buffer.read(buffer.file_end - 10, buffer.file_end + 10)
    assert (start, data, dropped) == (buffer.file_end - 10, produced[start : start + 10], 0)


@given(
    st.lists(st.tuples(st.booleans(), st.binary(min_size=0, max_size=300)), max_size=60),
    st.integers(min_value=64, max_value=2000),
    st.integers(min_value=0, max_value=20_000),
    st.data(),
)
def test_reads_and_stream_splits_match_what_was_appended(
    appends: list[tuple[bool, bytes]], capacity: int, spill: int, data: st.DataObject
) -> None:
    buffer = OutputBuffer(capacity=capacity, spill_bytes=spill)
    produced = bytearray()
    streams = bytearray()  # which stream every byte came on: b"e" or b"o"
    for is_stderr, chunk in appends:
        buffer.append(chunk, stderr=is_stderr)
        produced += chunk
        streams += (b"e" if is_stderr else b"o") * len(chunk)
    first = data.draw(st.integers(min_value=0, max_value=len(produced)))
    last = data.draw(st.integers(min_value=first, max_value=len(produced)))
    start, got, dropped = buffer.read(first, last)
    assert got == bytes(produced[start : start + len(got)])
    assert start + len(got) <= last and (start >= first)
    # Whatever was skipped is either counted as lost or was held (a read across a gap).
    assert dropped <= start - first
    out, err = buffer.split(start, got)
    picked = range(start, start + len(got))
    assert bytes(out.data) == bytes(produced[i] for i in picked if streams[i] == ord("o"))
    assert bytes(err.data) == bytes(produced[i] for i in picked if streams[i] == ord("e"))
    for part, mark in ((out, ord("o")), (err, ord("e"))):
        offsets = [i for i in picked if streams[i] == mark]
        for index in range(0, len(offsets), 37):
            assert part.offset_of(index) == offsets[index]


def test_a_marker_in_one_stream_names_session_offsets_and_the_stream() -> None:
    buffer = OutputBuffer(capacity=1 << 20)
    for i in range(200):
        buffer.append(b"out %03d\n" % i)
        buffer.append(b"err %03d\n" % i, stderr=True)
    start, got, _ = buffer.read(0)
    out, _err = buffer.split(start, got)
    reread = 'read_output(offset={offset}, length={length}, stream="stdout")'
    rendered = render(bytes(out.data), out.offset_of(0), 400, reread, out.offset_of)
    first, last = rendered.omitted_from, rendered.omitted_to
    assert first is not None and last is not None
    assert f"offset={first}, length={last - first}" in rendered.text
    left_out = buffer.read(first, last)[1]
    assert buffer.split(first, left_out)[0].data.startswith(b"out ")
    assert (
        bytes(buffer.split(first, left_out)[0].data)
        == bytes(out.data)[
            rendered.returned_bytes - len(rendered.text.split(" ...]\n", 1)[1].encode()) :
        ][: rendered.omitted_bytes]
    )


def test_terminal_output_as_plain_text() -> None:
    raw = (
        "\x1b[?2004h\x1b]0;root@vault: ~\x07root@vault:~# echo $((6*7))\r\n42\r\n"
        "\x1b[01;32mgreen\x1b[0m \x1b(Bdone\r\n10%\r55%\r100%\r\nab\bc\x1b[?2004l"
    )
    assert plain_text(raw) == "root@vault:~# echo $((6*7))\n42\ngreen done\n100%\nac"


def test_compact_schema_keeps_meaning_and_property_named_title() -> None:
    schema = {
        "title": "Args",
        "type": "object",
        "properties": {
            "title": {"title": "Title", "anyOf": [{"type": "string"}, {"type": "null"}]},
            "n": {"title": "N", "type": "integer"},
        },
    }
    assert compact_schema(schema) == {
        "type": "object",
        "properties": {"title": {"type": ["string", "null"]}, "n": {"type": "integer"}},
    }


def test_a_gap_from_the_vault_keeps_what_is_held() -> None:
    buffer = OutputBuffer(capacity=1000, spill_bytes=10_000)
    buffer.append(b"head line\n" * 150)  # 1,500 bytes: some on disk, some in memory
    buffer.skip_to(buffer.end + 500)  # the vault's ring lost 500 bytes before its replay
    buffer.append(b"after the gap\n")
    assert buffer.read(0, 10) == (0, b"head line\n", 0)
    start, data, dropped = buffer.read(1400)
    assert (start, data, dropped) == (2000, b"after the gap\n", 500)
    assert buffer.lost_upstream == 500


def test_a_spill_that_cannot_be_written_drops_the_oldest_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import tempfile

    def full(*args: object, **kwargs: object) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    buffer = OutputBuffer(capacity=1000, spill_bytes=10_000)
    for _ in range(30):
        buffer.append(b"x" * 100)  # no exception: the session is still followed
    start, data, dropped = buffer.read(0)
    assert start > 0 and dropped == start and len(data) == buffer.end - start
    assert "cannot go to disk" in caplog.text


def test_a_large_range_reads_only_its_ends_and_accounts_for_every_stream_byte() -> None:
    buffer = OutputBuffer(capacity=1 << 20, spill_bytes=64 << 20)
    buffer.append(b"ERR first\n", stderr=True)
    for i in range(300_000):  # ~4.5 MB of stdout, stderr lines at the start, middle, end
        buffer.append(b"line %07d\n" % i)
        if i == 150_000:
            buffer.append(b"ERR middle\n", stderr=True)
    buffer.append(b"ERR last\n", stderr=True)
    reads: list[int] = []
    slice_whole = buffer.slice
    buffer.slice = lambda a, b: reads.append(b - a) or slice_whole(a, b)  # type: ignore[method-assign]

    def reread(name: str) -> str:
        return f"read_output(offset={{offset}}, length={{length}}, stream={name!r})"

    view = bounded_streams(buffer, 0, None, 4096, reread)
    assert max(reads) <= 2 * WINDOW < buffer.end  # the middle was never loaded
    assert view.stdout.text.startswith("line 0000000\n")
    assert view.stdout.text.endswith("line 0299999\n")
    assert (view.stdout_bytes, view.stderr_bytes) == (300_000 * 13, 30)
    assert view.stdout.returned_bytes + view.stdout.omitted_bytes == view.stdout_bytes
    assert view.stderr.returned_bytes + view.stderr.omitted_bytes == 30
    assert "ERR first\n" in view.stderr.text and "ERR last\n" in view.stderr.text
    # The middle stderr line is left out, and the marker's call reads exactly it.
    first, last = view.stderr.omitted_from, view.stderr.omitted_to
    assert first is not None and last is not None and view.stderr.omitted_bytes == 11
    start, data, _ = buffer.read(first, last)
    assert bytes(buffer.split(start, data)[1].data) == b"ERR middle\n"
