"""Streaming, safe extraction of a rootfs archive into a staging directory.

The upload is fed chunk by chunk (``feed``) into a bounded pipe; a worker thread
decompresses it and unpacks it with stdlib ``tarfile`` in stream mode while the upload is
still arriving. The archive is never held whole in memory nor spooled to disk.

tarfile is only used to *parse* the archive: every member is created by our own code,
because none of tarfile's extraction paths fits a rootfs. Its filters strip setuid bits or
refuse absolute symlinks, and its unfiltered ``extract`` opens regular files through an
existing symlink of the same name (a planted ``etc/passwd -> /etc/passwd`` would be
written through). Here:

* names must be relative, without ``..``; every parent directory is opened component by
  component with ``O_NOFOLLOW`` relative to the destination's fd, so no entry is ever
  reached through a symlink (an archive made from a real tree never needs that), and files
  are created with ``O_EXCL | O_NOFOLLOW``: nothing outside the destination is touched,
  whatever symlinks earlier entries planted;
* hard links must point at an entry already extracted, through the same checks;
* owners are kept numerically and the full mode (setuid, setgid, sticky) is applied after
  ``chown`` (which clears setuid); xattrs from PAX ``SCHILY.xattr.*`` after that (``chown``
  also clears file capabilities); directory metadata is applied at the end, deepest first,
  so a read-only directory still receives its children and keeps its mtime;
* device nodes are refused unless the provisioning allows them (``allow_devices``), and
  even then are only made under ``dev/``; where the kernel does not permit ``mknod`` they
  are skipped and reported. FIFOs are harmless, need no privilege and are always made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, cast

from flyvault.errors import ProvisionError

from .members import (
    COPY_CHUNK,
    REBUILD,
    ExtractLimits,
    TreeWriter,
    archive_error,
)
from .streams import (
    Cancelled,
    ChunkPipe,
    RawReader,
    UnpackCounter,
    open_archive_stream,
)

__all__ = ["ExtractLimits", "ExtractReport", "StreamingExtractor"]

log = logging.getLogger("flyvault.server.provision")

MiB = 1024 * 1024
#: Bytes the pipe may hold between the upload and the worker.
QUEUE_BYTES = 4 * MiB
#: tarfile's read block in stream mode. Each small read (a header) copies the rest of its
#: buffer, so a huge value slows archives of many small files, and a tiny one costs Python
#: calls per large file; between 10 KiB and 256 KiB the difference was lost in the noise.
TAR_BUFSIZE = 64 * 1024
#: The GIL switch interval while an extraction runs (CPython's default is 5 ms). The
#: extraction thread makes a few syscalls per member (open, write, fchown, fchmod, utime,
#: close), each releasing the GIL; with the event loop busy receiving the upload (QUIC in
#: Python), every re-acquisition waited up to the whole interval, a convoy that made
#: receive+extract of the b5 archive take 12.7-13.3 s instead of 9.8-9.9 s at 0.5 ms
#: (0.1 ms and 1 ms: 10.8 s). Process-wide, so it is restored when the last one ends.
SWITCH_INTERVAL = 0.0005
_switching = threading.Lock()
_switch_users = 0
_switch_saved = 0.0
#: The zero block that ends an archive (missing from typeshed's tarfile).
EOF_HEADER: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]


@dataclass
class ExtractReport:
    entries: int
    bytes_written: int
    skipped_devices: list[str]
    duration: float
    #: Device nodes made (allowed ones only, under /dev), as paths in the rootfs.
    created_devices: list[str] = field(default_factory=list)
    compression: str = "none"
    archive_bytes: int = 0
    unpacked_bytes: int = 0
    sha256: str = ""
    xattr_failures: int = 0
    warnings: list[str] = field(default_factory=list)


class _TrackedTarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped: in stream mode a truncated or corrupt header after
    the first entry reads as a normal end of archive, and only a zero block is one."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            tarfile_.fv_stop = exc  # type: ignore[attr-defined]
            raise


class StreamingExtractor:
    """Unpacks one archive into ``destination`` (an existing, empty directory)."""

    def __init__(
        self,
        destination: Path,
        *,
        limits: ExtractLimits | None = None,
        can_make_devices: bool | None = None,
        allow_devices: bool = False,
        min_free_bytes: int = 64 * MiB,
        queue_bytes: int = QUEUE_BYTES,
    ) -> None:
        self.destination = Path(destination)
        self.limits = limits or ExtractLimits()
        self._allow_devices = allow_devices
        # None: try when root, and fall back to skipping if the kernel still says no (a
        # container without CAP_MKNOD).
        self._auto_devices = can_make_devices is None
        self._make_devices = os.geteuid() == 0 if can_make_devices is None else can_make_devices
        self._min_free = min_free_bytes
        self._pipe = ChunkPipe(queue_bytes)
        self._thread: threading.Thread | None = None
        self._done: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._report: ExtractReport | None = None
        self._closed = False
        self._received = 0
        self._raw: RawReader | None = None
        self._stream: UnpackCounter | None = None
        self._writer: TreeWriter | None = None

    @property
    def bytes_received(self) -> int:
        """Archive bytes fed so far."""
        return self._received

    @property
    def bytes_extracted(self) -> int:
        """File data written to the destination so far."""
        return self._writer.extracted if self._writer is not None else 0

    async def feed(self, chunk: bytes) -> None:
        """Queue a chunk of the archive; waits while the pipe is full (backpressure).

        Raises the extraction's error as soon as the worker has failed, so the caller can
        stop the upload early.
        """
        if self._closed:
            raise ProvisionError("feed() after finish() or abort()")
        if not chunk:
            return
        if not isinstance(chunk, bytes):  # queued as is: a reused buffer would change under us
            chunk = bytes(chunk)
        self._start()
        self._received += len(chunk)
        try:
            queued = await self._pipe.put(chunk)
        except asyncio.CancelledError:
            # The upload was torn down mid-chunk: the stream has a hole, so stop the worker
            # (the caller still awaits abort() before deleting the staging directory).
            self._pipe.cancel()
            raise
        if not queued:
            await self._wait_worker()
            self._raise_worker_error()
            raise ProvisionError("the extraction stopped before the archive ended")

    async def finish(
        self, expected_size: int | None = None, sha256: bytes | None = None
    ) -> ExtractReport:
        """Signal the end of the archive, wait for the worker, verify size and SHA-256."""
        if self._closed:
            raise ProvisionError("finish() after finish() or abort()")
        self._closed = True
        self._start()
        self._pipe.close()
        try:
            await self._wait_worker()
        except asyncio.CancelledError:
            self._pipe.cancel()
            raise
        raw = self._raw
        mismatch = None
        # Only compare when the worker read the whole upload; after an early refusal the
        # counts are partial and the refusal is the real problem.
        if raw is not None and raw.eof:
            if expected_size is not None and raw.count != expected_size:
                mismatch = ProvisionError(
                    f"the archive is {raw.count} bytes but {expected_size} were announced: "
                    "the upload was cut short or corrupted; send it again",
                    hint="send the archive again",
                )
            elif sha256 is not None and raw.hash.digest() != sha256:
                mismatch = ProvisionError(
                    f"the archive's SHA-256 is {raw.hash.hexdigest()}, not the announced "
                    f"{sha256.hex()}: the upload was corrupted or the file changed while it "
                    "was sent; send it again",
                    hint="send the archive again",
                )
        if mismatch is not None:
            raise mismatch from self._error
        self._raise_worker_error()
        assert self._report is not None
        return self._report

    async def abort(self) -> None:
        """Stop the worker and wait for it; the caller deletes the staging directory."""
        self._closed = True
        self._pipe.cancel()
        if self._thread is not None:
            await self._wait_worker()

    # -- worker plumbing ------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        done = self._done

        def notify() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                self._run()
            finally:
                _fast_switching(False)
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(notify)

        _fast_switching(True)

        self._thread = threading.Thread(target=run, name="rootfs-extract", daemon=True)
        self._thread.start()

    async def _wait_worker(self) -> None:
        assert self._done is not None
        await asyncio.shield(self._done)
        # The worker signals just before it returns: joining now is immediate, and after
        # it no thread of ours is left touching the staging directory.
        if self._thread is not None:
            self._thread.join()

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self._report = self._extract(started)
        except Cancelled:
            self._error = ProvisionError("the extraction was aborted")
        except ProvisionError as exc:
            self._error = exc
        except Exception as exc:  # a bug or an unexpected OS error: still a clean refusal
            log.exception("rootfs extraction failed")
            self._error = ProvisionError(f"the rootfs extraction failed: {exc!r}")
        finally:
            self._pipe.reader_done()  # wakes the prefetching thread if it waits for data
            if self._stream is not None:
                self._stream.close()
            if self._writer is not None:
                self._writer.close()

    # -- the archive ----------------------------------------------------------------------

    def _extract(self, started: float) -> ExtractReport:
        writer = self._writer = TreeWriter(
            self.destination,
            self.limits,
            make_devices=self._make_devices,
            auto_devices=self._auto_devices,
            min_free_bytes=self._min_free,
            allow_devices=self._allow_devices,
        )
        raw = self._raw = RawReader(self._pipe)
        stream = self._stream = open_archive_stream(
            raw,
            max_total=self.limits.max_total_bytes,
            max_ratio=self.limits.max_expansion_ratio,
            ratio_floor=self.limits.expansion_floor_bytes,
            prefetch=True,
        )
        tf = self._open_tar(stream, raw)
        last = ""
        while True:
            tf.fv_stop = None  # type: ignore[attr-defined]
            try:
                member = tf.next()
            except tarfile.TarError as exc:
                raise archive_error(str(exc), last) from None
            # Stream mode keeps every member in a list; we never look back, so do not let
            # a million-entry archive grow memory.
            tf.members.clear()  # type: ignore[attr-defined]
            if member is None:
                break
            last = member.name
            stream.current_entry = last
            writer.add(tf, member)
        stop = getattr(tf, "fv_stop", None)
        if writer.entries == 0:
            raise ProvisionError(
                "the archive contains no entries: it is an empty tar; build it from the "
                "rootfs directory, e.g. `tar -C rootfs -czf rootfs.tar.gz .`",
                hint=REBUILD,
            )
        if not isinstance(stop, EOF_HEADER):
            raise archive_error(str(stop) if stop else "unexpected end of data", last)
        # Read past the end-of-archive blocks: verifies the gzip CRC and length, and lets
        # the size and SHA-256 cover every byte that was sent.
        while stream.read(COPY_CHUNK):
            pass
        stream.close()  # the prefetching thread is done with the raw stream: drain it here
        raw.drain()
        writer.finish()
        return ExtractReport(
            entries=writer.entries,
            bytes_written=writer.extracted,
            skipped_devices=writer.skipped_devices,
            duration=time.monotonic() - started,
            created_devices=writer.created_devices,
            compression=stream.kind,
            archive_bytes=raw.count,
            unpacked_bytes=stream.count,
            sha256=raw.hash.hexdigest(),
            xattr_failures=writer.xattr_failures,
            warnings=writer.warnings,
        )

    def _open_tar(self, stream: UnpackCounter, raw: RawReader) -> tarfile.TarFile:
        try:
            opened = tarfile.open(  # noqa: SIM115 (closed with the worker's fds: nothing to close)
                fileobj=stream,  # type: ignore[call-overload]
                mode="r|",
                bufsize=TAR_BUFSIZE,
                tarinfo=_TrackedTarInfo,
            )
            return cast(tarfile.TarFile, opened)
        except tarfile.TarError as exc:
            if raw.count == 0:
                raise ProvisionError(
                    "the archive is empty (0 bytes received); send a tar, tar.gz or "
                    "tar.zst of the rootfs",
                    hint="send a tar, tar.gz or tar.zst of the rootfs",
                ) from None
            if stream.count == 0:
                message = f"the {stream.kind} data decompresses to nothing (0 bytes)"
            elif stream.kind == "none":
                message = f"the upload is not a tar archive ({exc}; it starts with {raw.head!r})"
            else:
                message = f"the {stream.kind} data does not contain a tar archive ({exc})"
            raise ProvisionError(
                f"{message}: send a tar, tar.gz or tar.zst of the rootfs, e.g. made with "
                "`tar -C rootfs -czf rootfs.tar.gz .`",
                hint=REBUILD,
            ) from None


def _fast_switching(on: bool) -> None:
    """Hand the GIL over every SWITCH_INTERVAL while at least one extraction runs."""
    global _switch_users, _switch_saved
    with _switching:
        if on:
            if _switch_users == 0:
                _switch_saved = sys.getswitchinterval()
                sys.setswitchinterval(SWITCH_INTERVAL)
            _switch_users += 1
        else:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)
