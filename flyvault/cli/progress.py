"""A one-line progress display for rootfs uploads on a terminal (quiet otherwise)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class ProgressLine:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._started = time.monotonic()
        self._last = 0.0
        self._phase = ""
        self._shown = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if phase == self._phase and now - self._last < 0.1 and done != total:
            return
        if phase != self._phase:
            self._phase = phase
            self._started = now
        self._last = now
        self.stream.write("\r\x1b[K" + self._render(phase, done, total, now - self._started))
        self.stream.flush()
        self._shown = True

    @staticmethod
    def _render(phase: str, done: int, total: int, elapsed: float) -> str:
        if phase in ("upload", "download"):
            rate = done / elapsed if elapsed > 0 else 0.0
            text = f"{phase:<8} {done / 1e6:8.1f}"
            if total:
                percent = 100.0 * done / total
                eta = (total - done) / rate if rate > 0 else 0.0
                text += f" / {total / 1e6:.1f} MB  {percent:5.1f}%  {rate / 1e6:6.1f} MB/s"
                text += f"  ETA {eta:4.0f} s"
            else:
                text += f" MB  {rate / 1e6:6.1f} MB/s"
            return text
        if phase == "extract":
            return f"extract  {done / 1e6:8.1f} MB received by the vault"
        if phase == "activate":
            return "activate starting the new workload..." if done < total else "activate done"
        return f"{phase} {done}/{total}"

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


class CopyProgressBar:
    """``cp``'s line on a terminal: bytes, rate, ETA and files (nothing when not a tty)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._started = time.monotonic()
        self._last = 0.0
        self._shown = False
        self._progress: Any = None

    def __call__(self, progress: Any) -> None:
        if not self.enabled:
            return
        self._progress = progress
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        self._draw(now)

    def _draw(self, now: float) -> None:
        self.stream.write("\r\x1b[K" + render_copy(self._progress, now - self._started))
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        # The last state, which the rate limit may have skipped (the final count).
        if self._shown and self._progress is not None:
            self._draw(time.monotonic())
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


#: Before this much of a copy has run, its rate says little (the connection, the first
#: round trip): no ETA is shown rather than one of days.
ETA_AFTER = 1.0


def render_copy(progress: Any, elapsed: float) -> str:
    done, total = progress.bytes_done, progress.bytes_total
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"{done / 1e6:8.1f}"
    if total:
        eta = f"{max((total - done) / rate, 0.0):4.0f}" if rate and elapsed >= ETA_AFTER else "  --"
        text += f" / {total / 1e6:.1f} MB {100.0 * done / total:5.1f}%"
        text += f"  {rate / 1e6:6.1f} MB/s  ETA {eta} s"
    else:
        text += f" MB  {rate / 1e6:6.1f} MB/s"
    files = f"{progress.files_done}"
    if progress.files_total:
        files += f"/{progress.files_total}"
    return f"{text}  files {files}"
