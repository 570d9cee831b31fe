"""The local terminal: raw mode that is always restored, escape sequences, and I/O pumps.

Raw mode is restored on every exit path: normal return, exception, SIGTERM/SIGHUP (the
handlers restore before exiting) and interpreter exit (atexit), because a terminal left
raw is the most common complaint about remote shells (C2).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import queue
import signal
import termios
import threading
import tty
from collections.abc import Awaitable, Callable
from types import FrameType

from flyvault.client.escapes import RESET_MODES, EscapeDetector

# asyncio is imported inside the pumps below: the keeper's thin CLI path uses this module's
# raw mode and sizes, and must not load it.


class RawTerminal:
    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self._saved: list[object] | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> RawTerminal:
        self._saved = termios.tcgetattr(self.fd)
        atexit.register(self.restore)
        for signo in (signal.SIGTERM, signal.SIGHUP):
            self._previous[signo] = signal.signal(signo, self._on_signal)
        tty.setraw(self.fd)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()
        for signo, handler in self._previous.items():
            signal.signal(signo, handler)  # type: ignore[arg-type]
        atexit.unregister(self.restore)

    def restore(self) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSAFLUSH, self._saved)  # type: ignore[arg-type]

    def _on_signal(self, signo: int, frame: FrameType | None) -> None:
        self.restore()
        # The remote program is still running and may have left the alternate screen,
        # bracketed paste or a hidden cursor on. Writes can fail (EIO after a hang-up):
        # that must not stop the exit, or the error would unwind through the session.
        with contextlib.suppress(OSError):
            if isatty(1):
                os.write(1, RESET_MODES)
        with contextlib.suppress(OSError):
            os.write(2, f"\r\nfly-vault: terminated by signal {signo}\r\n".encode())
        os._exit(128 + signo)


def terminal_size(fd: int = 1) -> tuple[int, int]:
    """(rows, cols), or (0, 0) when unknown."""
    for candidate in (fd, 0, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(candidate)
            return size.lines, size.columns
    return 0, 0


class OutputSink:
    """Writes to a file descriptor from a thread, so a slow reader (``| less``) blocks the
    session's output, through a bounded queue, instead of the event loop."""

    def __init__(
        self, fd: int, capacity: int = 64, on_broken: Callable[[], None] | None = None
    ) -> None:
        self.fd = fd
        #: Called from the writer thread at each write that found the reader gone (EPIPE).
        self.on_broken = on_broken
        self._queue: queue.Queue[bytes | threading.Event | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name=f"sink-{fd}", daemon=True)
        self._thread.start()
        self.error: OSError | None = None

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if isinstance(data, threading.Event):  # a flush marker: all before it is written
                data.set()
                continue
            view = memoryview(data)
            try:
                while view:
                    written = os.write(self.fd, view)
                    view = view[written:]
            except OSError as exc:  # a closed pipe: drop the rest, remember why
                self.error = exc
                if isinstance(exc, BrokenPipeError) and self.on_broken is not None:
                    self.on_broken()

    async def write(self, data: bytes) -> None:
        await self._put(data)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything written so far has reached the descriptor, so a message
        printed next on another descriptor (stderr) really comes after it."""
        written = threading.Event()
        try:  # bounded: a terminal that stopped reading must not hang the exit
            await self._put(written, timeout)
        except queue.Full:
            return
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, written.wait, timeout)

    async def _put(self, item: bytes | threading.Event, timeout: float | None = None) -> None:
        """Queue ``item``, waiting for room (at most ``timeout`` s, then queue.Full)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            put = functools.partial(self._queue.put, item, True, timeout)
            import asyncio

            await asyncio.get_running_loop().run_in_executor(None, put)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


def start_stdin_reader(
    deliver: Callable[[bytes], Awaitable[None]], on_eof: Callable[[], None], fd: int = 0
) -> None:
    """Read ``fd`` in a daemon thread and hand each chunk to ``deliver`` on the loop.

    The thread waits until ``deliver`` has finished (which includes the stream's drain), so
    a large stdin is read no faster than the vault accepts it. A daemon thread, not the
    loop's executor, because a read blocked on a quiet terminal must not hold up exit.
    """
    import asyncio

    loop = asyncio.get_running_loop()

    def pump() -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                loop.call_soon_threadsafe(on_eof)
                return
            try:
                asyncio.run_coroutine_threadsafe(deliver(data), loop).result()
            except Exception:  # the loop is gone or the session ended: stop reading
                return

    threading.Thread(target=pump, name="stdin", daemon=True).start()


def isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


__all__ = [
    "RESET_MODES",
    "EscapeDetector",
    "OutputSink",
    "RawTerminal",
    "isatty",
    "start_stdin_reader",
    "terminal_size",
]
