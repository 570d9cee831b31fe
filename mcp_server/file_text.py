"""The pure parts of the file tools: binary detection, line windows, edits, diffs.

No I/O here, so every rule is tested without a vault. The tools (``tools_files``) feed
these with bytes read through ``RemoteFiles``.

Text is kept byte-exact: a window's ``content`` is a slice of the file's own text with its
line endings, so an agent can copy any part of it into ``edit_file`` and a read followed by
a write of the same content changes nothing. Anything that is not valid UTF-8, or holds a
NUL byte, is binary and never decoded with replacement characters (that is how `cat`
through exec silently corrupted files).
"""

from __future__ import annotations

import codecs
import difflib
from dataclasses import dataclass, field

from flyvault.errors import UsageError

#: Lines and diff excerpts are shown to the model; this is the most a diff result holds.
MAX_DIFF_CHARS = 4000


def decode_text(data: bytes) -> str | None:
    """``data`` as text, or None when it is binary (a NUL byte, or invalid UTF-8)."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def first_character(data: bytes) -> int:
    """Where the first whole character starts in ``data``, a window of a file that may
    begin inside a UTF-8 sequence (at most 3 continuation bytes come before it)."""
    for index, byte in enumerate(data[:4]):
        if byte & 0xC0 != 0x80:
            return index
    return len(data) if len(data) < 4 else 0  # four in a row: not UTF-8, let decoding say so


def window_is_text(data: bytes, *, starts_inside: bool, ends_inside: bool) -> bool:
    """Whether a byte window of a file is text (no NUL, valid UTF-8), though it may start
    (``starts_inside``: not at the file's start) or end (``ends_inside``: before the file's
    end) inside a character: a window cut through an "é" is still text."""
    if b"\0" in data:
        return False
    body = data[first_character(data) :] if starts_inside else data
    try:
        codecs.getincrementaldecoder("utf-8")().decode(body, final=not ends_inside)
    except UnicodeDecodeError:
        return False
    return True


class TextSniffer:
    """Binary detection over a stream: chunks may split a UTF-8 sequence anywhere."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.binary = False

    def feed(self, chunk: bytes, *, final: bool = False) -> bool:
        """Feed the next chunk; True once the data is known to be binary."""
        if self.binary:
            return True
        if b"\0" in chunk:
            self.binary = True
            return True
        try:
            self._decoder.decode(chunk, final)
        except UnicodeDecodeError:
            self.binary = True
        return self.binary


def count_lines(data: bytes) -> int:
    """Lines as editors count them: a last line without a newline still counts."""
    if not data:
        return 0
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


@dataclass
class LineWindow:
    """Lines ``first`` (0-based) onward, collected from a stream of chunks.

    ``feed`` returns True once the window is full (``limit`` lines, or ``max_bytes``
    reached), so a reader of a big file can stop early; a reader that goes on to the end
    learns ``total``. A window never splits a line unless a single line is longer than
    ``max_bytes`` (then ``cut_line`` is set and the content ends mid-line, on a character
    boundary).
    """

    first: int
    limit: int
    max_bytes: int
    lines: list[bytes] = field(default_factory=list)
    seen: int = 0  # complete lines passed so far
    size: int = 0  # bytes in ``lines``
    full: bool = False
    cut_line: bool = False
    _partial: bytearray = field(default_factory=bytearray)

    def feed(self, chunk: bytes) -> bool:
        self._partial += chunk
        start = 0
        while True:
            end = self._partial.find(b"\n", start)
            if end < 0:
                break
            self._line(bytes(self._partial[start : end + 1]))
            start = end + 1
        del self._partial[:start]
        if self.seen < self.first:
            # A line that will be skipped: only its end matters, not its bytes.
            self._partial.clear()
        elif not self.full and len(self._partial) > self.max_bytes - self.size:
            # The line in progress cannot fit any more: the window is full. If it is the
            # first line of the window, show its start rather than nothing.
            if not self.lines:
                self.lines.append(_cut(bytes(self._partial), self.max_bytes))
                self.size = len(self.lines[0])
                self.cut_line = True
            self.full = True
        return self.full

    def finish(self) -> None:
        """End of the file: a last line without a newline counts too."""
        if self._partial:
            self._line(bytes(self._partial))
            self._partial.clear()

    def _line(self, line: bytes) -> None:
        index = self.seen
        self.seen += 1
        if self.full or index < self.first:
            return
        if len(self.lines) >= self.limit:
            self.full = True
            return
        if self.size + len(line) > self.max_bytes:
            self.full = True
            if not self.lines:
                self.lines.append(_cut(line, self.max_bytes))
                self.size = len(self.lines[0])
                self.cut_line = True
            return
        self.lines.append(line)
        self.size += len(line)

    @property
    def content(self) -> bytes:
        return b"".join(self.lines)


def _cut(line: bytes, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of ``line``, never ending inside a UTF-8 sequence."""
    return line[:max_bytes].decode("utf-8", "ignore").encode()


def split_lines(data: bytes) -> list[bytes]:
    """``data``'s lines with their ends, split at ``\\n`` only, as ``count_lines`` counts
    them (``bytes.splitlines`` also splits at a lone ``\\r``, which a progress bar's log
    is full of: the numbers shown would not be the file's)."""
    lines = data.split(b"\n")
    last = lines.pop()
    out = [line + b"\n" for line in lines]
    if last:
        out.append(last)
    return out


def split_text_lines(text: str) -> list[str]:
    """``split_lines`` for text: ``str.splitlines`` also splits at \\f, \\x1c-\\x1e, \\x85,
    U+2028 and U+2029."""
    lines = text.split("\n")
    last = lines.pop()
    out = [line + "\n" for line in lines]
    if last:
        out.append(last)
    return out


def tail_lines(
    data: bytes, count: int, max_bytes: int, *, from_start: bool
) -> tuple[list[bytes], bool]:
    """The last ``count`` lines of ``data`` (a file's tail), within ``max_bytes``; and
    whether the first of them is only the end of its line, because that line is longer
    than ``max_bytes`` (or than ``data``, when ``data`` is not the file's start).

    Unless ``data`` starts at the file's start, its first line may be partial: it is
    dropped, unless it is all there is."""
    lines = split_lines(data)
    partial = lines.pop(0) if not from_start and lines else None
    picked: list[bytes] = []
    size = 0
    for line in reversed(lines[-count:] if count else []):
        if size + len(line) > max_bytes:
            if not picked:
                return [_cut_tail(line, max_bytes)], True
            break
        picked.append(line)
        size += len(line)
    if partial and count and not picked:  # no line starts inside data: show its end
        return [_cut_tail(partial, max_bytes)], True
    picked.reverse()
    return picked, False


def _cut_tail(line: bytes, max_bytes: int) -> bytes:
    return line[-max_bytes:].decode("utf-8", "ignore").encode()


def numbered(text: str, first_line: int | None) -> str:
    """``cat -n`` style, the form agents know from their own read tools: the number, a
    tab, the line. Without a known line number the lines are shown as they are."""
    # A CRLF file's \r is not shown, as before; other separators stay inside their line.
    lines = [line.rstrip("\n").removesuffix("\r") for line in split_text_lines(text)]
    if first_line is None:
        return "\n".join(lines)
    return "\n".join(f"{n:>6}\t{line}" for n, line in enumerate(lines, first_line))


def apply_edit(text: str, old: str, new: str, *, replace_all: bool, path: str) -> tuple[str, int]:
    """``text`` with ``old`` replaced by ``new``; the number of replacements.

    ``old`` must occur exactly once unless ``replace_all``: an edit that could land in
    the wrong place is refused, saying how often the string occurs."""
    if not old:
        raise UsageError(
            "old_string is empty",
            hint="give the exact text to replace; write_file replaces a whole file",
        )
    if old == new:
        raise UsageError("old_string and new_string are the same: nothing to change")
    count = text.count(old) if replace_all else occurrences(text, old, stop_at=2)
    if count == 0:
        raise UsageError(
            f"old_string not found in {path}",
            hint="copy the text exactly as read_file shows it, whitespace included and "
            "without the line-number prefix",
        )
    if count > 1 and not replace_all:
        count = occurrences(text, old, stop_at=MAX_COUNTED + 1)
        times = f"{count} times" if count <= MAX_COUNTED else f"over {MAX_COUNTED} times"
        raise UsageError(
            f"old_string occurs {times} in {path} (overlaps counted); it must occur exactly once",
            hint="add surrounding lines to make it unique, or pass replace_all=true",
        )
    # replace_all: the count is what replace does, left to right without overlaps.
    return text.replace(old, new), count


#: Occurrences counted for an error message, at most (a Python loop on the event loop).
MAX_COUNTED = 1000


def occurrences(text: str, old: str, *, stop_at: int | None) -> int:
    """How often ``old`` occurs in ``text``, overlapping ones too (``"aa"`` is twice in
    ``"aaa"``: an edit meant for one of them is ambiguous); counting stops at ``stop_at``."""
    count = 0
    start = text.find(old)
    while start >= 0:
        count += 1
        if count == stop_at:
            break
        start = text.find(old, start + 1)
    return count


def short_diff(before: str, after: str, path: str, *, max_chars: int = MAX_DIFF_CHARS) -> str:
    """A unified diff with two lines of context, cut after ``max_chars`` with a marker."""
    lines = difflib.unified_diff(
        split_text_lines(before),
        split_text_lines(after),
        f"a{path}" if path.startswith("/") else f"a/{path}",
        f"b{path}" if path.startswith("/") else f"b/{path}",
        n=2,
    )
    out: list[str] = []
    size = 0
    rest = 0
    for line in lines:
        if not line.endswith("\n"):
            line += "\n\\ No newline at end of file\n"
        if rest or size + len(line) > max_chars:
            rest += 1
            continue
        out.append(line)
        size += len(line)
    if rest:
        out.append(f"[... {rest} more diff lines left out ...]\n")
    return "".join(out)


__all__ = [
    "LineWindow",
    "TextSniffer",
    "apply_edit",
    "count_lines",
    "decode_text",
    "numbered",
    "occurrences",
    "short_diff",
    "split_lines",
    "split_text_lines",
    "tail_lines",
]
