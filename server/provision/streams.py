"""The byte plumbing under the extractor: a bounded pipe and the decompressing reader.

``ChunkPipe`` carries archive chunks from the event loop (the upload) to the extraction
thread. It holds at most ``capacity`` bytes: when it is full, ``put`` waits, so a slow disk
slows the upload down instead of growing memory (the original held the whole image in RAM).

``open_archive_stream`` sits on the thread side. It reads raw chunks from the pipe, counts
and hashes them (so ``finish`` can check the size and SHA-256 the client announced), sniffs
the compression from the magic bytes and returns a ``read(n)`` object of decompressed tar
bytes that never returns more than ``n`` bytes: a decompression bomb can only ever
materialise one bounded buffer at a time, and ``UnpackCounter`` stops it at the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import threading
import zlib
from collections import deque
from typing import Any, Protocol

from flyvault.errors import ProvisionError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"

MiB = 1024 * 1024
#: What the prefetching thread decompresses per step (its queue holds 16 of them).
PREFETCH_CHUNK = 256 * 1024


class Cancelled(Exception):
    """The extraction was aborted by the caller; raised inside the worker thread only."""


class ChunkPipe:
    """A bounded FIFO of byte chunks from one asyncio writer to one thread reader."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._lock = threading.Lock()
        self._readable = threading.Condition(self._lock)
        self._closed = False  # the writer is done: the reader sees EOF after the last chunk
        self._cancelled = False  # abort: the reader raises Cancelled at its next read
        self._reader_gone = False  # the worker stopped reading (error or abort)
        self._writer_waiting = False
        self._space = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def buffered(self) -> int:
        return self._buffered

    async def put(self, chunk: bytes) -> bool:
        """Queue ``chunk``, waiting for room. False when the reader is gone (it failed)."""
        self._loop = asyncio.get_running_loop()
        while True:
            # Clear before checking: a wake-up scheduled after the check sets it again.
            self._space.clear()
            with self._lock:
                if self._reader_gone:
                    return False
                # An empty pipe takes any chunk, so one oversized chunk cannot deadlock.
                if not self._chunks or self._buffered + len(chunk) <= self._capacity:
                    self._chunks.append(chunk)
                    self._buffered += len(chunk)
                    self._readable.notify()
                    return True
                self._writer_waiting = True
            await self._space.wait()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._readable.notify()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            self._chunks.clear()
            self._buffered = 0
            self._readable.notify()

    def get(self) -> bytes:
        """The next chunk (thread side), b"" at EOF. Blocks while the pipe is empty."""
        with self._lock:
            while (
                not self._chunks
                and not self._closed
                and not self._cancelled
                and not self._reader_gone
            ):
                self._readable.wait()
            if self._cancelled or self._reader_gone:
                raise Cancelled
            if not self._chunks:
                return b""
            chunk = self._chunks.popleft()
            self._buffered -= len(chunk)
            wake = self._writer_waiting
            self._writer_waiting = False
        if wake:
            self._wake_writer()
        return chunk

    def reader_done(self) -> None:
        """The worker stopped: drop what is queued and release a waiting writer (and a
        reading thread of the worker's that is still waiting for data)."""
        with self._lock:
            self._reader_gone = True
            self._chunks.clear()
            self._buffered = 0
            self._readable.notify_all()
        self._wake_writer()

    def _wake_writer(self) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._space.set)


class RawReader:
    """Raw archive bytes from the pipe, counted and hashed, with a one-chunk push-back."""

    def __init__(self, pipe: ChunkPipe) -> None:
        self._pipe = pipe
        self._pushed: list[bytes] = []
        self.count = 0
        self.hash = hashlib.sha256()
        self.eof = False
        #: The first bytes, to show in a "not an archive" message (never the payload).
        self.head = b""

    def chunk(self) -> bytes:
        if self._pushed:
            return self._pushed.pop()
        data = self._pipe.get()
        if not data:
            self.eof = True
            return b""
        if not self.count:
            self.head = data[:16]
        self.count += len(data)
        self.hash.update(data)
        return data

    def push_back(self, data: bytes) -> None:
        if data:
            self._pushed.append(data)

    def peek(self, size: int) -> bytes:
        """At least ``size`` bytes (fewer only at EOF), left in place for the next read."""
        head = b""
        while len(head) < size:
            data = self.chunk()
            if not data:
                break
            head += data
        self.push_back(head)
        return head

    def read(self, size: int = -1) -> bytes:
        """File-like read of at most ``size`` bytes (for zstandard's stream reader)."""
        data = self.chunk()
        if size >= 0 and len(data) > size:
            self.push_back(data[size:])
            data = data[:size]
        return data

    def drain(self) -> None:
        """Read to EOF, so that the count and the hash cover the whole upload."""
        while self.chunk():
            pass


class Readable(Protocol):
    def read(self, size: int) -> bytes: ...


class Prefetch:
    """Runs ``source.read`` in a thread of its own, at most ``depth`` chunks ahead.

    Decompression (zlib and zstd release the GIL) and the SHA-256 of the upload then run
    on one core while the extraction thread parses headers and creates files on another,
    as ``gzip -dc | tar x`` does. Memory stays bounded (``depth * chunk`` bytes), and
    the bomb checks stay with the reader (``UnpackCounter``), where the entry is known.
    An error of the source's (a corrupt gzip, an abort) is raised to the reader in order,
    after the data that came before it.
    """

    def __init__(self, source: Readable, chunk: int = PREFETCH_CHUNK, depth: int = 16) -> None:
        self._source = source
        self._chunk = chunk
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stopped = False
        self._current = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="rootfs-unpack", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        item: bytes | BaseException
        while not self._stopped:
            try:
                item = self._source.read(self._chunk)
            except BaseException as exc:  # handed over to the reader, which raises it
                item = exc
            while not self._stopped:
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, bytes) or not item:
                return

    def read(self, size: int) -> bytes:
        while not self._current:
            if self._eof:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return b""
            self._current = memoryview(item)
        data = self._current[:size]
        self._current = self._current[size:]
        return bytes(data)

    def close(self) -> None:
        """Stop the thread and wait for it (after this, only the caller reads the source)."""
        self._stopped = True
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:
                    self._queue.get_nowait()
            self._thread.join(0.05)


class UnpackCounter:
    """Counts decompressed bytes and stops a decompression bomb at the configured limits."""

    def __init__(
        self,
        source: Readable,
        raw: RawReader,
        max_total: int,
        max_ratio: float | None,
        kind: str,
        ratio_floor: int = 0,
    ) -> None:
        self._source = source
        self._raw = raw
        self._max_total = max_total
        self._max_ratio = max_ratio
        self._ratio_floor = ratio_floor
        self.kind = kind
        self.count = 0
        #: Set by the extractor so that limit errors can name the entry being unpacked.
        self.current_entry = ""

    def close(self) -> None:
        """Stop a prefetching source's thread (idempotent)."""
        if isinstance(self._source, Prefetch):
            self._source.close()

    def read(self, size: int) -> bytes:
        data = self._source.read(size)
        self.count += len(data)
        if self.count > self._max_total:
            raise ProvisionError(
                f"the archive unpacks to more than {human_size(self._max_total)} (limit reached "
                f"at entry {self.current_entry!r}): refused as a possible decompression bomb; "
                "use a smaller image or raise ExtractLimits.max_total_bytes",
                hint="use a smaller image or raise the unpacked-size limit",
            )
        # The floor keeps small archives (mostly headers and padding) from tripping it.
        if (
            self._max_ratio is not None
            and self.count > self._ratio_floor
            and self.count > self._max_ratio * self._raw.count
        ):
            fix = (
                "if the image is genuine, provision again with a higher --max-expansion-ratio "
                "(0: no limit)"
            )
            raise ProvisionError(
                f"the archive expands more than {self._max_ratio:g}x: "
                f"{human_size(self.count)} unpacked so far from {human_size(self._raw.count)} "
                f"received (at entry {self.current_entry!r}); refused as a possible "
                f"decompression bomb; {fix}",
                hint=fix,
            )
        return data


class _Plain:
    def __init__(self, raw: RawReader) -> None:
        self._raw = raw

    def read(self, size: int) -> bytes:
        return self._raw.read(size)


class _Gzip:
    """gzip (any number of concatenated members), output bounded per call."""

    def __init__(self, raw: RawReader) -> None:
        self._raw = raw
        self._inflater = zlib.decompressobj(wbits=31)  # 16 + 15: gzip header and trailer
        self._pending = b""  # compressed input zlib has not consumed yet
        self._more_output = False  # the last call filled ``size``: zlib may hold more
        self._done = False

    def read(self, size: int) -> bytes:
        while not self._done:
            if self._inflater.eof:
                self._next_member(self._inflater.unused_data)
                continue
            if not self._pending and not self._more_output:
                self._pending = self._raw.chunk()
                if not self._pending:
                    raise ProvisionError(
                        "the gzip stream is truncated (it ends before its end marker): the "
                        "upload was cut short or the file is incomplete; check the file and "
                        "send it again",
                        hint="check the archive file and send it again",
                    )
            try:
                out = self._inflater.decompress(self._pending, size)
            except zlib.error as exc:
                raise ProvisionError(
                    f"the gzip data is corrupt ({exc}); check the file (gzip -t) and send it again",
                    hint="check the archive with gzip -t and send it again",
                ) from None
            self._pending = self._inflater.unconsumed_tail
            self._more_output = len(out) == size
            if out:
                return out
        return b""

    def _next_member(self, leftover: bytes) -> None:
        head = leftover
        while len(head) < 2:
            data = self._raw.chunk()
            if not data:
                break
            head += data
        if head[:2] == GZIP_MAGIC:
            self._inflater = zlib.decompressobj(wbits=31)
            self._pending = head
            self._more_output = False
            return
        # gzip(1) ignores trailing zero padding (tape blocking); anything else is garbage.
        while head:
            if head.strip(b"\0"):
                raise ProvisionError(
                    "the gzip file has trailing garbage after its last member; check the file "
                    "and send it again",
                    hint="check the archive with gzip -t and send it again",
                )
            head = self._raw.chunk()
        self._done = True


class _Zstd:
    def __init__(self, raw: RawReader, zstandard: Any) -> None:
        self._error = zstandard.ZstdError
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_size=256 * 1024, read_across_frames=True, closefd=False
        )

    def read(self, size: int) -> bytes:
        try:
            data: bytes = self._reader.read(size)
        except self._error as exc:
            raise ProvisionError(
                f"the zstd data is corrupt ({exc}); check the file (zstd -t) and send it again",
                hint="check the archive with zstd -t and send it again",
            ) from None
        return data


def open_archive_stream(
    raw: RawReader,
    *,
    max_total: int,
    max_ratio: float | None,
    ratio_floor: int = 0,
    prefetch: bool = False,
) -> UnpackCounter:
    """Sniff the compression and return the decompressed tar stream (with ``prefetch``,
    decompressed ahead in a thread of its own: ``close()`` it when done)."""
    head = raw.peek(6)
    source: Readable
    if head.startswith(GZIP_MAGIC):
        source, kind = _Gzip(raw), "gzip"
    elif head.startswith(ZSTD_MAGIC):
        try:
            import zstandard  # type: ignore[import-not-found]  # an optional dependency: only zstd images need it
        except ImportError:
            raise ProvisionError(
                "the archive is zstd-compressed but this server has no zstd support (the "
                "'zstandard' Python module is missing): install it in init's environment "
                "(pip install zstandard) or send a gzip or plain tar archive",
                hint="pip install zstandard on the server, or send a .tar.gz",
            ) from None
        source, kind = _Zstd(raw, zstandard), "zstd"
    elif head.startswith(XZ_MAGIC) or head.startswith(BZIP2_MAGIC):
        name = "xz" if head.startswith(XZ_MAGIC) else "bzip2"
        raise ProvisionError(
            f"the archive is {name}-compressed, which is not supported: recompress it as "
            f"gzip or zstd (e.g. `{name} -dc image.tar.{'xz' if name == 'xz' else 'bz2'} | "
            "gzip > image.tar.gz`)",
            hint="recompress the archive as gzip or zstd",
        )
    else:
        source, kind = _Plain(raw), "none"
    if prefetch:
        source = Prefetch(source)
    return UnpackCounter(source, raw, max_total, max_ratio, kind, ratio_floor)


def human_size(size: int | float) -> str:
    if size >= 1024**3:
        return f"{size / 1024**3:.1f} GiB"
    if size >= MiB:
        return f"{size / MiB:.1f} MiB"
    return f"{int(size)} bytes"
