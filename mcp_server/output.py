"""Session output kept in the MCP server, and how much of it goes into one tool result.

``OutputBuffer`` holds the newest bytes of one exec session at their absolute offsets (the
protocol's offsets: stdout and stderr together, counted from the first byte the command
wrote). It is bounded: past its capacity the oldest bytes go, and a read that asks for them
is told how many were lost (``dropped``).

``render`` turns a byte range into the text of one result. Past ``max_bytes`` it keeps the
head and the tail, cut at line ends where that costs little, around a marker that says how
many bytes were left out, at which offsets, and the exact ``read_output`` call that reads
them. Silent truncation in the middle is what hurts agents most (copilot-cli#1732).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Share of a bounded result given to the head; the tail (where errors usually are) gets
#: the rest.
HEAD_SHARE = 0.4
#: A cut moves to a line end when one is this close (a fraction of the part's length).
LINE_SLACK = 0.25


class OutputBuffer:
    """The newest ``capacity`` bytes of a session's output, addressed by absolute offset."""

    def __init__(self, capacity: int, start: int = 0) -> None:
        self.capacity = capacity
        #: Offset of the oldest byte still held.
        self.start = start
        self._data = bytearray()
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        #: Bytes the vault's own buffer had lost before it could replay them to us.
        self.lost_upstream = 0

    @property
    def end(self) -> int:
        """Offset just past the newest byte: the output produced so far."""
        return self.start + len(self._data)

    def append(self, data: bytes, *, stderr: bool = False) -> None:
        self._data += data
        if stderr:
            self.stderr_bytes += len(data)
        else:
            self.stdout_bytes += len(data)
        # Trim in batches: deleting from the front moves the whole buffer.
        excess = len(self._data) - self.capacity
        if excess > self.capacity // 4:
            del self._data[:excess]
            self.start += excess

    def skip_to(self, offset: int) -> None:
        """The vault replays from ``offset``; anything between ``end`` and it is lost."""
        if offset > self.end:
            self.lost_upstream += offset - self.end
            self._data.clear()
            self.start = offset

    def read(self, offset: int, end: int | None = None) -> tuple[int, bytes, int]:
        """Bytes from ``offset`` to ``end`` (default: all); returns (start, data, dropped)."""
        stop = self.end if end is None else min(end, self.end)
        dropped = max(0, self.start - offset)
        begin = min(max(offset, self.start), stop)
        return begin, bytes(self._data[begin - self.start : stop - self.start]), dropped


@dataclass(frozen=True)
class Rendered:
    text: str
    returned_bytes: int
    omitted_bytes: int
    omitted_from: int | None
    omitted_to: int | None


def _char_start(data: bytes, index: int) -> int:
    """Move ``index`` forward past UTF-8 continuation bytes (never split a character)."""
    while index < len(data) and (data[index] & 0xC0) == 0x80:
        index += 1
    return index


def _char_end(data: bytes, index: int) -> int:
    """Move ``index`` back so the cut before it does not split a UTF-8 character."""
    index = min(index, len(data))
    while 0 < index < len(data) and (data[index] & 0xC0) == 0x80:
        index -= 1
    return index


def decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def render(
    data: bytes,
    offset: int,
    max_bytes: int,
    reread: str,
) -> Rendered:
    """Text for ``data`` (which starts at ``offset``), at most about ``max_bytes``.

    ``reread`` is a format string with ``{offset}`` and ``{length}``: the call that reads
    the part left out.
    """
    if len(data) <= max_bytes:
        return Rendered(decode(data), len(data), 0, None, None)
    head_budget = int(max_bytes * HEAD_SHARE)
    tail_budget = max_bytes - head_budget
    head_end = _char_end(data, head_budget)
    newline = data.rfind(b"\n", 0, head_end)
    if newline >= 0 and head_end - (newline + 1) <= head_budget * LINE_SLACK:
        head_end = newline + 1
    tail_start = _char_start(data, len(data) - tail_budget)
    newline = data.find(b"\n", tail_start, len(data))
    if newline >= 0 and (newline + 1) - tail_start <= tail_budget * LINE_SLACK:
        tail_start = newline + 1
    omitted = tail_start - head_end
    first, last = offset + head_end, offset + tail_start
    marker = (
        f"\n[... {omitted} bytes left out here (offsets {first} to {last}); read them with "
        + reread.format(offset=first, length=omitted)
        + " ...]\n"
    )
    text = decode(data[:head_end]) + marker + decode(data[tail_start:])
    return Rendered(text, head_end + len(data) - tail_start, omitted, first, last)
