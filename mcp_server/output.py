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

import bisect
import logging
import re
import tempfile
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Literal

from .defaults import SPILL_BYTES

log = logging.getLogger("mcp_server")

#: Share of a bounded result given to the head; the tail (where errors usually are) gets
#: the rest.
HEAD_SHARE = 0.4
#: A cut moves to a line end when one is this close (a fraction of the part's length).
LINE_SLACK = 0.25


class OutputBuffer:
    """A session's output at its absolute offsets, with the stream each byte came on.

    The newest ``capacity`` bytes are in memory. Older ones are not dropped but moved to an
    unlinked temporary file (mode 0600) of at most ``spill_bytes``, so the head of a large
    output stays readable by offset after memory has moved on. Only past that limit are
    bytes lost: the file keeps the head, memory the tail, and a read of the bytes between
    is told how many it lost (``dropped``).

    Regions: the file holds ``[start, file_end)``, memory ``[mem_start, end)``; between
    them is the gap of lost bytes (empty until the file is full).
    """

    def __init__(self, capacity: int, start: int = 0, *, spill_bytes: int = SPILL_BYTES) -> None:
        self.capacity = capacity
        self.spill_bytes = spill_bytes
        #: Offset of the oldest byte still held (on disk or in memory).
        self.start = start
        self.file_end = start
        self.mem_start = start
        self._file: BinaryIO | None = None
        self._data = bytearray()
        #: ``(offset, is_stderr)`` at every change of stream, oldest first.
        #: Where the stream changes (offsets) and to which (1: stderr): arrays, not tuples,
        #: since an interleaving command changes stream at every line (9 bytes a change).
        self._run_offsets = array("Q")
        self._run_stderr = bytearray()
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        #: Bytes the vault's own buffer had lost before it could replay them to us.
        self.lost_upstream = 0

    @property
    def end(self) -> int:
        """Offset just past the newest byte: the output produced so far."""
        return self.mem_start + len(self._data)

    @property
    def spilled(self) -> int:
        """Bytes held on disk."""
        return self.file_end - self.start

    @property
    def held(self) -> int:
        """Bytes held, on disk and in memory."""
        return self.spilled + len(self._data)

    def append(self, data: bytes, *, stderr: bool = False) -> None:
        if not data:
            return
        if not self._run_stderr or self._run_stderr[-1] != stderr:
            self._run_offsets.append(self.end)
            self._run_stderr.append(stderr)
        self._data += data
        if stderr:
            self.stderr_bytes += len(data)
        else:
            self.stdout_bytes += len(data)
        # Move out in batches: deleting from the front moves the whole buffer.
        excess = len(self._data) - self.capacity
        if excess > self.capacity // 4:
            self._evict(excess)

    def _evict(self, count: int) -> None:
        """Move the ``count`` oldest bytes of memory to the file, or drop them."""
        spilled = self.spilled
        room = self.file_end == self.mem_start and spilled + count <= self.spill_bytes
        if room and self._spill(self._data[:count]):
            self.file_end += count
        del self._data[:count]
        self.mem_start += count
        if spilled == 0 and self.file_end != self.mem_start:
            self.start = self.file_end = self.mem_start  # nothing on disk: they are gone
        self._trim_runs()

    def _spill(self, data: bytearray) -> bool:
        """Append ``data`` to the spill file. A disk error ends spilling (said once), not
        the session: from then on the oldest bytes go, counted as dropped."""
        try:
            if self._file is None:
                # Lives as long as the buffer: closed by ``close`` (or with the process).
                self._file = tempfile.TemporaryFile(prefix="fly-vault-mcp-")  # noqa: SIM115
            self._file.seek(self.spilled)
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            log.warning("session output past memory cannot go to disk (%s); it is dropped", exc)
            self.spill_bytes = 0
            return False
        return True

    def _trim_runs(self) -> None:
        """Forget stream changes no byte held needs: before the oldest byte held, and inside
        the gap of lost bytes (each time keeping the one a held byte lies in)."""
        keep = bisect.bisect_right(self._run_offsets, self.start) - 1
        if keep > 0:
            self._forget_runs(0, keep)
        if self.file_end < self.mem_start:
            first = bisect.bisect_right(self._run_offsets, self.file_end)
            last = bisect.bisect_right(self._run_offsets, self.mem_start) - 1
            if last > first:
                self._forget_runs(first, last)

    def _forget_runs(self, first: int, last: int) -> None:
        del self._run_offsets[first:last]
        del self._run_stderr[first:last]

    def skip_to(self, offset: int) -> None:
        """The vault replays from ``offset``; anything between ``end`` and it is lost. What
        is held stays readable: memory goes to the spill file if it can."""
        if offset <= self.end:
            return
        self.lost_upstream += offset - self.end
        held = len(self._data)
        if held:
            contiguous = self.file_end == self.mem_start
            if contiguous and self.spilled + held <= self.spill_bytes and self._spill(self._data):
                self.file_end += held
            self._data.clear()
        if self.spilled == 0:
            self.start = self.file_end = offset
        self.mem_start = offset
        self._trim_runs()

    def close(self) -> None:
        """Delete the spill file (what was on disk is gone)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.start = self.file_end = self.mem_start
        self._trim_runs()

    def read(self, offset: int, end: int | None = None) -> tuple[int, bytes, int]:
        """Contiguous bytes from ``offset`` to ``end`` (default: all); returns (start, data,
        dropped). A range that spans lost bytes keeps its newest part: ``offset`` plus
        ``length`` in the head reads the head."""
        begin, stop, dropped = self.span(offset, end)
        return begin, self.slice(begin, stop), dropped

    def span(self, offset: int, end: int | None = None) -> tuple[int, int, int]:
        """What ``read`` would return, without the bytes: (start, stop, dropped)."""
        stop = self.end if end is None else min(end, self.end)
        begin = max(offset, self.start)
        if self.file_end < self.mem_start:  # a gap of lost bytes
            if self.file_end <= begin < self.mem_start:
                begin = self.mem_start
            elif begin < self.file_end < stop:
                if stop <= self.mem_start:
                    stop = self.file_end
                else:
                    begin = self.mem_start
        # A range wholly in what was lost reads as empty at its end (all of it dropped),
        # never as the first held byte past it.
        begin = stop if stop < self.start else min(begin, stop)
        stop = max(stop, begin)
        dropped = (begin - offset) - self._held(offset, begin) if begin > offset else 0
        return begin, stop, dropped

    def stream_sizes(self, begin: int, stop: int) -> tuple[int, int]:
        """How many of the bytes in ``[begin, stop)`` came on stdout and on stderr."""
        sizes = [0, 0]
        offsets, kinds = self._run_offsets, self._run_stderr
        index = max(0, bisect.bisect_right(offsets, begin) - 1)
        while index < len(offsets) and offsets[index] < stop:
            start = max(begin, offsets[index])
            upto = offsets[index + 1] if index + 1 < len(offsets) else stop
            sizes[kinds[index]] += max(0, min(upto, stop) - start)
            index += 1
        return sizes[0], sizes[1]

    def _held(self, first: int, last: int) -> int:
        """Bytes held in ``[first, last)``."""
        on_disk = max(0, min(last, self.file_end) - max(first, self.start))
        return on_disk + max(0, min(last, self.end) - max(first, self.mem_start))

    def slice(self, begin: int, stop: int) -> bytes:
        """The bytes of ``[begin, stop)``, a range ``span`` returned (so all held)."""
        pieces = []
        if begin < min(stop, self.file_end) and self._file is not None:
            upto = min(stop, self.file_end)
            self._file.seek(begin - self.start)
            pieces.append(self._file.read(upto - begin))
            begin = upto
        if begin < stop:
            pieces.append(bytes(self._data[begin - self.mem_start : stop - self.mem_start]))
        return b"".join(pieces)

    def split(self, begin: int, data: bytes) -> tuple[StreamBytes, StreamBytes]:
        """``data`` (read from ``begin``) as its stdout part and its stderr part."""
        parts = (StreamBytes(begin), StreamBytes(begin))
        stop = begin + len(data)
        offsets, kinds = self._run_offsets, self._run_stderr
        index = max(0, bisect.bisect_right(offsets, begin) - 1)
        position = begin
        while position < stop:
            is_stderr = bool(kinds[index]) if index < len(kinds) else False
            upto = offsets[index + 1] if index + 1 < len(offsets) else stop
            upto = min(max(upto, position), stop)
            parts[is_stderr].add(position, data[position - begin : upto - begin])
            position = upto
            index += 1
        return parts


class StreamBytes:
    """One stream's bytes out of a range of the session's output, with where each piece
    was in the session's offsets (to name the offsets of a part left out)."""

    def __init__(self, base: int = 0) -> None:
        self.data = bytearray()
        #: ``(index in data, session offset)`` at the start of every piece.
        self._pieces: list[tuple[int, int]] = []
        #: Where the range these bytes were picked from begins (when none were).
        self._base = base

    def add(self, offset: int, piece: bytes) -> None:
        if piece:
            self._pieces.append((len(self.data), offset))
            self.data += piece

    def offset_of(self, index: int) -> int:
        """The session offset of byte ``index`` of ``data`` (``len(data)``: past the end)."""
        if not self._pieces:
            return self._base
        at = max(0, bisect.bisect_right(self._pieces, index, key=lambda piece: piece[0]) - 1)
        first, offset = self._pieces[at]
        return offset + index - first


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
    locate: Callable[[int], int] | None = None,
) -> Rendered:
    """Text for ``data`` (which starts at ``offset``), at most about ``max_bytes``.

    ``reread`` is a format string with ``{offset}`` and ``{length}``: the call that reads
    the part left out. ``locate`` maps an index of ``data`` to its session offset when
    ``data`` is one stream picked out of the session's output (default: ``offset`` + it).
    """
    if len(data) <= max_bytes:
        return Rendered(decode(data), len(data), 0, None, None)
    where = locate or (lambda index: offset + index)
    return render_ends(Part(data, where), Part(data, where), len(data), max_bytes, reread)


@dataclass(frozen=True)
class Part:
    """Bytes of one stream and where each lies in the session's offsets."""

    data: bytes
    locate: Callable[[int], int]


def render_ends(head: Part, tail: Part, total: int, max_bytes: int, reread: str) -> Rendered:
    """Text for a stream of ``total`` bytes from its first bytes (``head``) and its last
    (``tail``; the same bytes when the stream was read whole): the head's start and the
    tail's end within ``max_bytes``, cut at line ends where that costs little, and a
    marker for whatever lies between."""
    head_budget = int(max_bytes * HEAD_SHARE)
    tail_budget = max_bytes - head_budget
    data = head.data
    head_end = len(data) if len(data) <= head_budget else _char_end(data, head_budget)
    newline = data.rfind(b"\n", 0, head_end)
    cut = head_end < len(data) and newline >= 0
    if cut and head_end - (newline + 1) <= head_budget * LINE_SLACK:
        head_end = newline + 1
    data = tail.data
    tail_start = 0 if len(data) <= tail_budget else _char_start(data, len(data) - tail_budget)
    newline = data.find(b"\n", tail_start, len(data))
    if tail_start > 0 and newline >= 0 and (newline + 1) - tail_start <= tail_budget * LINE_SLACK:
        tail_start = newline + 1
    if head.data is not data and total == len(head.data) + len(data) <= max_bytes:
        return Rendered(decode(head.data + data), total, 0, None, None)  # two ends, all of it
    returned = head_end + len(data) - tail_start
    omitted = total - returned
    if omitted <= 0:
        return Rendered(decode(head.data[:head_end] + data[tail_start:]), returned, 0, None, None)
    first, last = head.locate(head_end), tail.locate(tail_start)
    marker = (
        f"\n[... {omitted} bytes left out here (offsets {first} to {last}); read them with "
        + reread.format(offset=first, length=last - first)
        + " ...]\n"
    )
    text = decode(head.data[:head_end]) + marker + decode(data[tail_start:])
    return Rendered(text, returned, omitted, first, last)


#: A result reads at most this much of each end of a large range (or 4 times its cap):
#: the middle is left out anyway, so it is never loaded (a 200 MiB output on disk).
WINDOW = 1024 * 1024

Stream = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class Streams:
    """One result's output: a range of the session's offsets, each stream bounded."""

    begin: int
    next_offset: int
    dropped: int
    stdout: Rendered
    stderr: Rendered
    stdout_bytes: int
    stderr_bytes: int


_EMPTY = Rendered("", 0, 0, None, None)


def bounded_streams(
    buffer: OutputBuffer,
    offset: int,
    stop: int | None,
    max_bytes: int,
    reread: Callable[[str], str],
    pick: Stream | None = None,
) -> Streams:
    """``[offset, stop)`` of ``buffer`` as stdout and stderr apart, sharing ``max_bytes``
    (``_budgets``), each head and tail around a marker whose call (``reread(stream)``, a
    format string with ``{offset}`` and ``{length}``) reads what was left out. Only the
    ends of a large range are read. ``pick``: that stream only."""
    begin, end, dropped = buffer.span(offset, stop)
    sizes = list(buffer.stream_sizes(begin, end))
    if pick is not None:
        sizes[pick == "stdout"] = 0  # the other one
    edge = max(WINDOW, 4 * max_bytes)
    whole = end - begin <= 2 * edge
    if whole:
        heads = tails = buffer.split(begin, buffer.slice(begin, end))
    else:
        heads = buffer.split(begin, buffer.slice(begin, begin + edge))
        tails = buffer.split(end - edge, buffer.slice(end - edge, end))
    budgets = _budgets(sizes[0], sizes[1], max_bytes)
    rendered = []
    for index, name in enumerate(("stdout", "stderr")):
        head, tail = heads[index], tails[index]
        if not sizes[index]:
            rendered.append(_EMPTY)
        elif whole:
            data = bytes(head.data)
            rendered.append(
                render(data, head.offset_of(0), budgets[index], reread(name), head.offset_of)
            )
        else:
            first, last = (
                Part(bytes(head.data), head.offset_of),
                Part(bytes(tail.data), tail.offset_of),
            )
            rendered.append(render_ends(first, last, sizes[index], budgets[index], reread(name)))
    return Streams(begin, end, dropped, rendered[0], rendered[1], sizes[0], sizes[1])


def _budgets(stdout_size: int, stderr_size: int, max_bytes: int) -> tuple[int, int]:
    """``max_bytes`` shared by the two streams: what one does not need goes to the other,
    and stderr (short, and where the errors are) is never squeezed below a quarter."""
    if stdout_size + stderr_size <= max_bytes:
        return max_bytes, max_bytes
    stderr_budget = max(max_bytes // 4, max_bytes - stdout_size)
    stderr_budget = min(stderr_budget, stderr_size)
    return max_bytes - stderr_budget, max(stderr_budget, 1)


#: Terminal control sequences: CSI (colours, cursor, modes such as ``ESC[?2004h``), OSC
#: (window titles, hyperlinks; ended by BEL or ST), and two-byte escapes (``ESC =``,
#: charset selection ``ESC ( B``).
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[()*+][0-9A-Za-z]"
    r"|\x1b[@-Z\\-_=>78]"
    r"|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
)


def plain_text(text: str) -> str:
    """Terminal output as an agent wants to read it: control sequences removed, ``\\r\\n``
    as ``\\n``, a line rewritten with ``\\r`` (a progress bar) as its last state, and
    backspaces applied."""
    text = text.replace("\r\n", "\n")
    lines = []
    for line in text.split("\n"):
        if "\r" in line:
            parts = [part for part in line.split("\r") if part]
            line = parts[-1] if parts else ""
        if "\b" in line:
            line = _backspace(line)
        lines.append(line)
    return _ESCAPES.sub("", "\n".join(lines))


def _backspace(line: str) -> str:
    out: list[str] = []
    for char in line:
        if char == "\b":
            if out:
                out.pop()
        else:
            out.append(char)
    return "".join(out)
