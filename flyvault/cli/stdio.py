"""``fly-vault forward --stdio VAULT HOST:PORT``: standard input and output as one TCP
connection opened on the vault, like ``ssh -W`` (an ssh ``ProxyCommand``).

Standard output carries the pipe's bytes and nothing else: notices, logs and errors go to
stderr. Both descriptors are used with blocking calls, each in a thread of its own, one
call at a time: that works whatever they are (pipes, sockets, files, /dev/null, a terminal)
without switching a descriptor shared with other processes to non-blocking mode, and the
one call in flight is all the buffering there is, so a slow reader of stdout holds the QUIC
stream back instead of filling memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import select
import signal
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

from flyvault.errors import ConfigError, UsageError

STDIN, STDOUT = 0, 1


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT``, checked before anything connects."""
    from flyvault.config_values import parse_address

    if text.count(":") >= 2 and not text.startswith("["):
        raise UsageError(
            f"forward --stdio takes one HOST:PORT, got {text!r}",
            hint="no local port with --stdio (e.g. 'localhost:22'); write an IPv6 host "
            "in brackets ('[::1]:22')",
        )
    try:
        return parse_address(text)
    except ConfigError as exc:
        raise UsageError(
            f"forward --stdio: {exc.message}",
            hint="give the target as seen from the vault, e.g. 'localhost:22'",
        ) from None


def run(args: argparse.Namespace) -> int:
    if len(args.specs) != 1:
        raise UsageError(
            f"forward --stdio takes exactly one HOST:PORT, got {len(args.specs)}",
            hint="e.g. fly-vault forward --stdio VAULT localhost:22",
        )
    host, port = parse_target(args.specs[0])
    for fd, name in ((STDIN, "standard input"), (STDOUT, "standard output")):
        try:
            os.fstat(fd)
        except OSError:
            # Closed: the event loop's own descriptors would take its number, and the
            # pipe's bytes would go to (or come from) one of those.
            raise UsageError(
                f"forward --stdio: {name} is closed; it carries the connection's bytes",
                hint="give it a pipe, a file or /dev/null (e.g. </dev/null)",
            ) from None
    from flyvault.cli.mux import keeper_socket
    from flyvault.config import load_vault

    vault_config = load_vault(args.vault)
    return asyncio.run(_pipe(vault_config, host, port, keeper_socket(args, args.vault)))


async def _pipe(vault_config: Any, host: str, port: int, keeper: Any) -> int:
    from flyvault.cli.console import Console
    from flyvault.client import Vault, pipe_forward

    console = Console()
    # One connection, no reconnects: a lost connection breaks the TCP stream it carried
    # anyway, and ssh must hear that at once rather than after a reconnect budget.
    vault = Vault(vault_config, on_notice=console.notice, on_event=console.event, keeper=keeper)
    task = asyncio.ensure_future(pipe_forward(vault, host, port, FdSource(STDIN), FdSink(STDOUT)))
    # ssh ends its ProxyCommand with SIGHUP when it leaves, often before our stdin's end
    # arrives. Dying there would leave the vault's side to notice only at the idle timeout
    # (sshd sessions lingering for seconds); instead the stream is reset and the connection
    # closed, so the target's TCP connection ends at once.
    caught: list[int] = []
    loop = asyncio.get_running_loop()

    def stop(signo: int) -> None:
        caught.append(signo)
        task.cancel()

    for signo in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stop, signo)
    try:
        await task
    except asyncio.CancelledError:
        if not caught:
            raise
        return 128 + caught[0]
    finally:
        for signo in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signo)
        await vault.close()
    return 0


class _Worker:
    """One daemon thread that runs the blocking calls on one descriptor, in order.

    A daemon, because a read of a terminal or an idle pipe cannot be interrupted: the
    process ends without waiting for it (``entry`` leaves through ``os._exit``).
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]]
        ] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    async def call(self, function: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put((loop, future, function))
        return await future

    def _serve(self) -> None:
        while True:
            loop, future, function = self._calls.get()
            try:
                result, error = function(), None
            except BaseException as exc:  # handed to the caller, not lost in this thread
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled while the call ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _stdio_error(name: str, exc: OSError) -> Exception:
    """A failed read or write of stdin/stdout (a full disk, an I/O error): one line, not
    a traceback."""
    import errno

    from flyvault.errors import FileOpError

    code = errno.errorcode.get(exc.errno or 0, "EIO")
    words = (exc.strerror or str(exc)).lower()
    return FileOpError(f"forward --stdio: {name}: {words} ({code})")


def _wait_ready(fd: int, *, write: bool) -> None:
    # A descriptor inherited in non-blocking mode (some IDEs hand those out): wait, then
    # retry, instead of failing with EAGAIN.
    select.select([], [fd], []) if write else select.select([fd], [], [])


class FdSource:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._worker = _Worker(f"fd{fd}-reader")

    async def read(self, size: int) -> bytes:
        data: bytes = await self._worker.call(lambda: self._read(size))
        return data

    def _read(self, size: int) -> bytes:
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                _wait_ready(self.fd, write=False)
            except OSError as exc:
                raise _stdio_error("standard input", exc) from None


class FdSink:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._worker = _Worker(f"fd{fd}-writer")

    async def write(self, data: bytes) -> None:
        await self._worker.call(lambda: self._write(data))

    async def close(self) -> None:
        await self._worker.call(self._close)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                _wait_ready(self.fd, write=True)
            except BrokenPipeError:
                raise  # the reader left: exit 141, as any pipe's writer
            except OSError as exc:
                raise _stdio_error("standard output", exc) from None

    def _close(self) -> None:
        # A socket may be stdin too (one socketpair end for both): only a shutdown tells
        # the reader. Then /dev/null takes the descriptor's place rather than leaving its
        # number free, so nothing opened later can land on standard output.
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.fstat(self.fd).st_mode):
                sock = socket.socket(fileno=os.dup(self.fd))
                with contextlib.closing(sock):
                    sock.shutdown(socket.SHUT_WR)
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self.fd)
        finally:
            os.close(null)
