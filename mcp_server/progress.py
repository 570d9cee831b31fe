"""Progress notifications for one tool call.

``Reporter.update`` is synchronous, so the rootfs upload (a plain callback deep in the
client core) and the exec wait loop can both feed it. A small task sends the newest state
at most every ``MIN_INTERVAL`` seconds; notifications never slow the work down, and a
failure to send one is ignored (the caller may have gone). Progress values only ever
increase, as the protocol requires. With no progress token on the request the SDK drops
them, so reporting is unconditional.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Any

from flyvault.redact import outgoing

from .pool import PROGRESS

log = logging.getLogger("mcp_server")

MIN_INTERVAL = 0.2


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


class Reporter:
    def __init__(self, ctx: Any | None) -> None:
        self._ctx = ctx
        self._last = 0.0
        self._pending: tuple[float, float | None, str] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._token: Any = None
        #: The newest (phase, done, total) seen from the client core.
        self.phase: tuple[str, int, int] | None = None

    def update(self, progress: float, total: float | None, message: str) -> None:
        self._pending = (progress, total, message)
        self._wake.set()

    def on_phase(self, phase: str, done: int, total: int) -> None:
        """The client core's ``progress(phase, done, total)`` callback."""
        self.phase = (phase, done, total)
        if phase == "upload" and total:
            message = f"uploading the rootfs: {human_bytes(done)} of {human_bytes(total)}"
            self.update(done, total, message)
        else:
            amount = f" {done}/{total}" if total else (f" {done}" if done else "")
            self.update(done, total or None, f"provisioning: {phase}{amount}")

    async def __aenter__(self) -> Reporter:
        self._token = PROGRESS.set(self.on_phase)
        if self._ctx is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        PROGRESS.reset(self._token)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            # The newest state may still wait out MIN_INTERVAL: a call that ends within it
            # (a small copy) would otherwise report nothing at all.
            if exc is None and self._pending is not None:
                await self._send(*self._pending)
                self._pending = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            item, self._pending = self._pending, None
            if item is None:
                continue
            await self._send(*item)
            await asyncio.sleep(MIN_INTERVAL)

    async def _send(self, progress: float, total: float | None, message: str) -> None:
        progress = max(float(progress), self._last + 1e-3)
        if total is not None and total < progress:
            total = None
        self._last = progress
        try:
            # A file name in the message may hold bytes that are not UTF-8: see outgoing.
            text = outgoing(message)
            await self._ctx.report_progress(progress, total, text)  # type: ignore[union-attr]
        except Exception as exc:  # the caller went away: nothing to tell
            log.debug("progress notification failed: %s", exc)
