"""Provisioning on the server: the rootfs store, the workload runtime, and one job at a time.

A job stages the archive while it is still arriving (inline upload) or being downloaded
(``rootfs_url``), then stops the old workload, swaps the rootfs in atomically and starts the
new workload; if that does not stay up, the previous rootfs and workload come back. Only one
job runs at a time; a second client gets BUSY. ``/root`` and ``/home`` live in the
persistent store and are never touched by a reprovision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from flyvault.errors import Busy, ProvisionError
from flyvault.protocol.constants import RuntimeStatus, VmState
from flyvault.protocol.messages import RootfsOptions

from .accounts import Account
from .cgroups import Limits
from .defaults import SETTLE_SECONDS, URL_MAX_BYTES, URL_READ_TIMEOUT
from .provision.extract import ExtractLimits, ExtractReport, StreamingExtractor
from .provision.store import RootfsStore
from .runtime import WorkloadRuntime
from .sessions import SpawnPolicy
from .workload_entry import WorkloadEntry

log = logging.getLogger("flyvault.server.provision")

ProgressCallback = Callable[[str, int, int], None]

# SETTLE_SECONDS (defaults): the new workload must stay up this long before the old
# rootfs is deleted; a death inside the window rolls back, even after the answer.
#: The client is answered once the new workload is up: the fallback init at once, the
#: image's init once it has been alive this long (the deaths seen in practice, exec
#: failures, missing libraries, a script that exits, come well within it).
READY_SECONDS = 0.25
URL_CONNECT_TIMEOUT = 15.0
URL_MAX_REDIRECTS = 5
#: Device nodes named one by one in the result line; more are counted.
NOTE_DEVICES = 20
#: What the sessions a reprovision ends are told.
REPROVISION_REASON = "the vault is being reprovisioned"


class Provisioner:
    def __init__(
        self,
        data_dir: Path,
        *,
        init_binary: str = "/sbin/init",
        url_read_timeout: float = URL_READ_TIMEOUT,
        url_max_bytes: int = URL_MAX_BYTES,
        settle_seconds: float = SETTLE_SECONDS,
        hostname: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.store = RootfsStore(data_dir)
        self.runtime = WorkloadRuntime.from_data_dir(
            data_dir, init_binary=init_binary, hostname=hostname, limits=limits
        )
        self.lock = asyncio.Lock()
        self.url_read_timeout = url_read_timeout
        self.url_max_bytes = url_max_bytes
        self.settle_seconds = settle_seconds
        self._purge: asyncio.Future[None] | None = None
        #: A job holds the lock only to watch its answered workload's settle window.
        self.settling = False
        #: A client waits for that job to end (a second one is told BUSY).
        self.waiting = False

    async def boot(self) -> None:
        """At init start: recover an interrupted activation, start a provisioned workload."""
        notes = await asyncio.to_thread(self.store.recover)
        for note in notes:
            log.warning("recovery: %s", note)
        # What a previous init's workload left (processes, cgroups) goes before anything new.
        await self.runtime.recover()
        if self.store.provisioned:
            try:
                await self.runtime.start()
            except ProvisionError as exc:
                log.error("the workload did not start: %s", exc)

    def vm_state(self) -> VmState:
        return VmState.READY if self.store.provisioned else VmState.COLD

    def runtime_status(self) -> RuntimeStatus:
        return self.runtime.status()

    @property
    def boot_id(self) -> str:
        return self.runtime.boot_id or "not-started"

    def spawn_policy(self) -> SpawnPolicy:
        runtime = self.runtime

        def entry(cwd: str | None, strict: bool, account: Account | None) -> WorkloadEntry:
            return runtime.entry(cwd, strict=strict, account=account)

        return SpawnPolicy(
            base_env=runtime.env,
            root=str(self.store.rootfs),
            openpty=runtime.openpty,
            entry=entry,
            account=runtime.account,
            exists=runtime.exists_inside,
        )

    def purge_later(self) -> None:
        """Delete the set-aside previous rootfs in the background (after the answer)."""
        if self._purge is None or self._purge.done():
            self._purge = asyncio.ensure_future(self._purge_discarded())

    async def _purge_discarded(self) -> None:
        try:
            await asyncio.to_thread(self.store.purge_discarded)
        except OSError as exc:  # retried at the next activation or start
            log.warning("could not delete the previous rootfs: %s", exc)

    async def restart_workload(
        self, reason: str = "the vault's workload is restarting (a client asked)"
    ) -> None:
        """Stop the workload and start it again on the same rootfs: a new boot id when this
        returns. Refused on a cold vault and while a (re)provision holds the lock."""
        if not self.store.provisioned:
            raise ProvisionError(
                "the vault is cold: there is no workload to restart",
                hint="connect once to provision it",
            )
        if self.lock.locked() and not self.settling:
            raise Busy("a provisioning is running on this vault: restart once it has ended")
        async with self.lock:  # a settle window (a new workload being watched) is waited out
            await self.runtime.restart(reason=reason)

    async def stop(self, reason: str = "the vault is shutting down") -> None:
        await self.runtime.stop(reason=reason)
        if self._purge is not None:
            await asyncio.shield(self._purge)


class ProvisionJob:
    """One (re)provision. Call ``start``, then ``feed``/``download``, then ``complete``;
    ``abort`` on any failure (it leaves the active rootfs and homes untouched)."""

    def __init__(
        self,
        provisioner: Provisioner,
        progress: ProgressCallback,
        options: RootfsOptions | None = None,
    ) -> None:
        self.provisioner = provisioner
        self.progress = progress
        self.options = options or RootfsOptions()
        self.extractor: StreamingExtractor | None = None
        self.started_at = time.monotonic()
        self._last_report = 0.0
        #: Lines for the client (SETUP_COMPLETE notes): what the options made happen.
        self.notes: list[str] = []

    async def start(self) -> None:
        staging = await asyncio.to_thread(self.provisioner.store.new_staging)
        options = self.options
        ratio = options.max_expansion_ratio
        limits = ExtractLimits()
        if ratio is not None:  # 0: the client lifted the ceiling
            limits = ExtractLimits(max_expansion_ratio=float(ratio) if ratio else None)
        if not options.is_default:
            log.info(
                "rootfs options: devices under /dev %s, expansion ceiling %s",
                "allowed" if options.allow_devices else "refused",
                "off" if limits.max_expansion_ratio is None else f"{limits.max_expansion_ratio:g}x",
            )
        self.extractor = StreamingExtractor(
            staging, limits=limits, allow_devices=options.allow_devices
        )

    async def feed(self, chunk: bytes, total: int) -> None:
        assert self.extractor is not None
        await self.extractor.feed(chunk)
        now = time.monotonic()
        if now - self._last_report >= 0.5:
            self._last_report = now
            self.progress("extract", self.extractor.bytes_received, total)

    async def download(self, url: str) -> None:
        """Stream ``url`` into the extractor: http(s) only, bounded size, time and redirects."""
        import httpx

        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ProvisionError(
                f"rootfs URL scheme must be http or https, got {scheme}",
                hint="set rootfs_url to an http(s) URL",
            )
        read_timeout = self.provisioner.url_read_timeout
        max_bytes = self.provisioner.url_max_bytes
        timeout = httpx.Timeout(read_timeout, connect=URL_CONNECT_TIMEOUT)
        where = _redact_url(url)
        try:
            async with (
                httpx.AsyncClient(
                    timeout=timeout, follow_redirects=True, max_redirects=URL_MAX_REDIRECTS
                ) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise ProvisionError(
                        f"rootfs download from {where} failed: HTTP {response.status_code}",
                        hint="check rootfs_url (is the file there, is the link still valid?)",
                    )
                declared = int(response.headers.get("content-length") or 0)
                if declared > max_bytes:
                    raise _too_big(where, max_bytes)
                received = 0
                async for chunk in response.aiter_bytes(256 * 1024):
                    received += len(chunk)
                    if received > max_bytes:
                        raise _too_big(where, max_bytes)
                    await self.feed(chunk, declared)
        except httpx.TimeoutException:
            raise ProvisionError(
                f"rootfs download from {where} timed out (no data for {read_timeout:g} s)",
                hint="check that the URL is reachable from the vault",
            ) from None
        except httpx.TooManyRedirects:
            raise ProvisionError(
                f"rootfs download from {where}: more than {URL_MAX_REDIRECTS} redirects"
            ) from None
        except httpx.HTTPError as exc:
            raise ProvisionError(
                f"rootfs download from {where} failed: {type(exc).__name__}: {exc}",
                hint="check that the URL is reachable from the vault",
            ) from None

    async def complete(
        self,
        size: int | None,
        sha256: bytes | None,
        answer: Callable[[], Awaitable[None]] | None = None,
    ) -> dict[str, float]:
        """Finish extraction, then stop the old workload and activate the new rootfs.

        ``answer`` is awaited once the new workload is up, before the rest of the settle
        window: the caller answers its client there. A death inside the window still rolls
        back, and this then raises ProvisionError (after ``answer``)."""
        assert self.extractor is not None
        provisioner = self.provisioner
        report = await self.extractor.finish(size, sha256)
        received = time.monotonic() - self.started_at
        self.progress("extract", report.entries, report.entries)
        log.info(
            "rootfs staged: %d entries, %d bytes%s",
            report.entries,
            report.bytes_written,
            f", {len(report.skipped_devices)} device nodes skipped"
            if report.skipped_devices
            else "",
        )
        self.notes = _device_notes(report)
        for note in self.notes:
            log.info("rootfs: %s", note)
        await asyncio.to_thread(provisioner.store.prepare_persistence, provisioner.store.staging)
        self.progress("activate", 0, 1)
        # Everything in the old namespace ends here: sessions first (told why), then the
        # shells' and services' processes with the workload.
        stopping = time.monotonic()
        await provisioner.runtime.stop(reason=REPROVISION_REASON)
        stopped = time.monotonic() - stopping
        loop = asyncio.get_running_loop()
        runtime = provisioner.runtime
        watches: list[asyncio.Future[None]] = []
        calls: list[Path] = []

        def start_runtime(rootfs: Path) -> bool:
            # The first call starts the new rootfs (answered once up, watched after); a
            # second one restarts the previous rootfs after a rollback (checked in full).
            calls.append(rootfs)
            start: Coroutine[Any, Any, asyncio.Future[None] | None]
            settle = provisioner.settle_seconds
            if len(calls) > 1:
                start = runtime.start(settle=settle)
            else:
                start = runtime.start_watched(settle=settle, ready=READY_SECONDS)
            future = asyncio.run_coroutine_threadsafe(start, loop)
            try:
                watch = future.result()
            except ProvisionError as exc:
                log.warning("the workload did not start: %s", exc)
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(runtime.stop(), loop).result()
                return False
            if watch is not None:
                watches.append(watch)
            return True

        async def up() -> None:
            self.progress("activate", 1, 1)
            if answer is not None:
                await answer()

        def started() -> None:
            asyncio.run_coroutine_threadsafe(up(), loop).result()

        def settled() -> str | None:
            if not watches:
                return None
            try:
                asyncio.run_coroutine_threadsafe(_wait(watches[0]), loop).result()
            except ProvisionError as exc:
                log.warning("the new workload did not stay up: %s", exc)
                return exc.message
            return None

        try:
            result = await asyncio.to_thread(
                provisioner.store.activate, start_runtime, started=started, settled=settled
            )
        finally:
            for watch in watches:  # a cancelled job must not leave the watch unobserved
                if not watch.done():
                    watch.cancel()
        provisioner.purge_later()
        # Phases in order: receive and extract, stop the old workload, then activation's
        # (sync, swap, marker, start: includes the settle window, cleanup).
        timings = {"receive_extract": received, "stop_old": stopped, **result.timings}
        timings["total"] = time.monotonic() - self.started_at
        return timings

    async def abort(self) -> None:
        if self.extractor is not None:
            with contextlib.suppress(Exception):
                await self.extractor.abort()
        await asyncio.to_thread(self.provisioner.store.discard_staging)


async def _wait(watch: asyncio.Future[None]) -> None:
    await watch


def _device_notes(report: ExtractReport) -> list[str]:
    """What --allow-devices did, for the client to show."""

    def listed(paths: list[str]) -> str:
        names = ["/" + "/".join(p for p in path.split("/") if p not in ("", ".")) for path in paths]
        more = len(names) - NOTE_DEVICES
        return ", ".join(names[:NOTE_DEVICES]) + (f" and {more} more" if more > 0 else "")

    def count(paths: list[str]) -> str:
        return f"{len(paths)} device node{'' if len(paths) == 1 else 's'} under /dev"

    notes = []
    if report.created_devices:
        notes.append(f"created {count(report.created_devices)}: {listed(report.created_devices)}")
    if report.skipped_devices:
        notes.append(
            f"skipped {count(report.skipped_devices)} (this vault is not permitted to create "
            f"device nodes): {listed(report.skipped_devices)}"
        )
    return notes


def _too_big(where: str, limit: int) -> ProvisionError:
    return ProvisionError(
        f"rootfs download from {where} is larger than the vault's limit of {limit} bytes",
        hint="use a smaller image, or raise init's --url-max-bytes",
    )


def _redact_url(url: str) -> str:
    """Presigned URLs carry credentials in the query: never echo it."""
    return url.split("?", 1)[0]
