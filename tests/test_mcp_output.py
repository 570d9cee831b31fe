"""The MCP server's output bounding and buffering, without a vault (pure functions)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from flyvault.mcp_server.output import OutputBuffer, render
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


def test_buffer_trims_the_oldest_bytes_and_reports_drops() -> None:
    buffer = OutputBuffer(capacity=1000)
    for i in range(30):
        buffer.append(bytes([65 + i % 26]) * 100, stderr=i % 2 == 1)
    assert buffer.end == 3000 and buffer.stdout_bytes == buffer.stderr_bytes == 1500
    assert 1000 <= buffer.end - buffer.start <= 1250
    start, data, dropped = buffer.read(0)
    assert start == buffer.start and dropped == buffer.start and len(data) == 3000 - start
    start, data, dropped = buffer.read(2900, 2950)
    assert (start, len(data), dropped) == (2900, 50, 0)
    buffer.skip_to(4000)  # the vault's replay started later: 1000 bytes were lost upstream
    assert buffer.lost_upstream == 1000 and buffer.read(3500)[2] == 500


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
