"""The pure rules of the MCP file tools: binary detection, line windows, edits, diffs."""

from __future__ import annotations

import os

import pytest

from flyvault.errors import UsageError
from flyvault.mcp_server.file_text import (
    LineWindow,
    TextSniffer,
    apply_edit,
    count_lines,
    decode_text,
    first_character,
    numbered,
    occurrences,
    short_diff,
    split_lines,
    tail_lines,
    window_is_text,
)


def test_binary_is_a_nul_byte_or_invalid_utf8_and_text_is_kept_exact() -> None:
    assert decode_text("héllo\r\nwörld\n".encode()) == "héllo\r\nwörld\n"
    assert decode_text(b"abc\0def") is None
    assert decode_text(b"\xff\xfe") is None
    assert decode_text(bytes(range(256)) * 4) is None
    assert decode_text(b"") == ""


def test_the_sniffer_accepts_utf8_split_across_chunks_but_not_a_truncated_end() -> None:
    data = "€uro".encode()
    sniffer = TextSniffer()
    assert not sniffer.feed(data[:1]) and not sniffer.feed(data[1:2])
    assert not sniffer.feed(data[2:], final=True)
    cut = TextSniffer()
    assert not cut.feed(data[:2])
    assert cut.feed(b"", final=True)
    assert TextSniffer().feed(b"text\0")
    random = TextSniffer()
    assert random.feed(os.urandom(1024) + b"\xff")


def test_a_window_cut_through_a_character_is_still_text() -> None:
    text = "é€𝄞".encode()  # 2, 3 and 4 bytes
    for start in range(len(text)):
        for end in range(start + 1, len(text) + 1):
            inside = {"starts_inside": start > 0, "ends_inside": end < len(text)}
            assert window_is_text(text[start:end], **inside), (start, end)
    # Cut only where the file goes on: a file that ends inside a character is not text.
    assert not window_is_text(text[:-1], starts_inside=False, ends_inside=False)
    assert not window_is_text(text[1:], starts_inside=False, ends_inside=True)
    assert not window_is_text(b"ab\0c", starts_inside=True, ends_inside=True)
    assert not window_is_text(b"\xff" + b"a" * 10, starts_inside=True, ends_inside=True)
    assert not window_is_text(b"\x80" * 4 + b"a", starts_inside=True, ends_inside=True)
    assert first_character(b"\x80\x80abc") == 2 and first_character(b"abc") == 0
    assert first_character(b"\x80\x80") == 2  # all continuation, fewer than four


def test_count_lines_counts_a_last_line_without_newline() -> None:
    assert count_lines(b"") == 0
    assert count_lines(b"a") == 1
    assert count_lines(b"a\n") == 1
    assert count_lines(b"a\nb") == 2
    assert count_lines(b"\n\n") == 2


def _window(
    data: bytes, first: int, limit: int, max_bytes: int = 1 << 20, step: int = 3
) -> LineWindow:
    window = LineWindow(first, limit, max_bytes)
    for start in range(0, len(data), step):
        if window.feed(data[start : start + step]):
            return window
    window.finish()
    return window


def test_a_window_keeps_exact_lines_from_any_chunking() -> None:
    data = b"".join(
        f"line {n}\r\n".encode() if n % 2 else f"line {n}\n".encode() for n in range(1, 11)
    )
    for step in (1, 2, 7, 1000):
        window = _window(data, 2, 3, step=step)
        assert window.content == b"line 3\r\nline 4\nline 5\r\n"
        assert window.full or step == 1000
    whole = _window(data + b"tail", 9, 100, step=4)
    assert whole.content == b"line 10\ntail" and whole.seen == 11 and not whole.full


def test_a_window_stops_at_the_byte_cap_on_a_line_boundary() -> None:
    data = b"".join(b"%03d %s\n" % (n, b"x" * 20) for n in range(100))
    window = _window(data, 0, 1000, max_bytes=100)
    assert window.full and not window.cut_line
    assert len(window.lines) == 4 and window.size <= 100
    assert window.content.endswith(b"\n")


def test_a_line_longer_than_the_cap_is_cut_on_a_character_boundary() -> None:
    data = ("é" * 100 + "\nnext\n").encode()
    window = _window(data, 0, 10, max_bytes=51)
    assert window.cut_line and window.full
    assert window.content == ("é" * 25).encode()
    # Skipped lines cost no memory and do not count against the cap.
    later = _window(b"x" * 5000 + b"\nwanted\n", 1, 10, max_bytes=10)
    assert later.content == b"wanted\n" and not later.cut_line


def test_tail_lines_drops_a_partial_first_line_unless_it_is_all_there_is() -> None:
    data = b"partial line\nb\nc\nd"
    assert tail_lines(data, 2, 100, from_start=False) == ([b"c\n", b"d"], False)
    assert tail_lines(data, 10, 100, from_start=False) == ([b"b\n", b"c\n", b"d"], False)
    # No line starts inside the bytes read: the end of the one they are part of, as cut.
    assert tail_lines(b"...end of a long line\n", 3, 100, from_start=False) == (
        [b"...end of a long line\n"],
        True,
    )
    assert tail_lines(data, 10, 100, from_start=True) == (
        [b"partial line\n", b"b\n", b"c\n", b"d"],
        False,
    )
    assert tail_lines(data, 10, 4, from_start=True) == ([b"c\n", b"d"], False)
    assert tail_lines(b"x" * 50, 1, 10, from_start=True) == ([b"x" * 10], True)
    assert tail_lines(b"x" * 50, 1, 10, from_start=False) == ([b"x" * 10], True)
    assert tail_lines(data, 0, 100, from_start=True) == ([], False)


def test_lines_split_at_newlines_only_as_they_are_counted() -> None:
    """A lone \\r (a progress bar's log), \\f or U+2028 ends no line: the numbers shown
    must be the file's, which count_lines counts by \\n."""
    data = b"a\rb\nform\x0cfeed\nsep\xe2\x80\xa8x\nlast"
    assert split_lines(data) == [b"a\rb\n", b"form\x0cfeed\n", b"sep\xe2\x80\xa8x\n", b"last"]
    assert len(split_lines(data)) == count_lines(data) == 4
    assert tail_lines(data, 2, 100, from_start=True)[0] == [b"sep\xe2\x80\xa8x\n", b"last"]
    text = data.decode()
    assert numbered(text, 1).count("\n") == 3
    assert numbered("crlf\r\nfile\r\n", 1) == "     1\tcrlf\n     2\tfile"
    diff = short_diff("a\x0cb\nc\n", "a\x0cb\nd\n", "/f")
    assert "No newline" not in diff and "@@ -1,2 +1,2 @@" in diff


def test_an_overlapping_second_occurrence_makes_an_edit_ambiguous() -> None:
    with pytest.raises(UsageError, match="occurs 2 times"):
        apply_edit("aaa", "aa", "b", replace_all=False, path="/f")
    assert apply_edit("aaa", "aa", "b", replace_all=True, path="/f") == ("ba", 1)
    assert occurrences("aaaa", "aa", stop_at=None) == 3
    with pytest.raises(UsageError, match="over 1000 times"):  # counted with a bound
        apply_edit("a" * 5000, "a", "b", replace_all=False, path="/f")


def test_numbered_lines_look_like_cat_n() -> None:
    assert numbered("a\nb\n", 9) == "     9\ta\n    10\tb"
    assert numbered("a\nb", None) == "a\nb"


def test_an_edit_must_match_exactly_once_unless_replace_all() -> None:
    text = "alpha\nbeta\nalpha\n"
    assert apply_edit(text, "beta", "gamma", replace_all=False, path="/f") == (
        "alpha\ngamma\nalpha\n",
        1,
    )
    with pytest.raises(UsageError, match="old_string occurs 2 times in /f") as many:
        apply_edit(text, "alpha", "x", replace_all=False, path="/f")
    assert "replace_all=true" in (many.value.hint or "")
    assert apply_edit(text, "alpha", "x", replace_all=True, path="/f") == ("x\nbeta\nx\n", 2)
    with pytest.raises(UsageError, match="old_string not found in /f") as missing:
        apply_edit(text, "delta", "x", replace_all=False, path="/f")
    assert "line-number prefix" in (missing.value.hint or "")
    with pytest.raises(UsageError, match="old_string is empty"):
        apply_edit(text, "", "x", replace_all=False, path="/f")
    with pytest.raises(UsageError, match="the same"):
        apply_edit(text, "beta", "beta", replace_all=False, path="/f")


def test_the_diff_is_unified_and_bounded() -> None:
    before = "".join(f"{n}\n" for n in range(10))
    after = before.replace("5\n", "five\n")
    diff = short_diff(before, after, "/srv/a.txt")
    assert diff.splitlines() == [
        "--- a/srv/a.txt",
        "+++ b/srv/a.txt",
        "@@ -4,5 +4,5 @@",
        " 3",
        " 4",
        "-5",
        "+five",
        " 6",
        " 7",
    ]
    assert "No newline at end of file" in short_diff("a", "b", "x")
    big_before = "".join(f"{n}\n" for n in range(2000))
    big = short_diff(big_before, big_before.replace("\n", " changed\n"), "/f", max_chars=500)
    assert len(big) < 600 and big.rstrip().endswith("more diff lines left out ...]")
