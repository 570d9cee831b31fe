"""One forward stream joined to a byte source and a byte sink (``fly-vault forward --stdio``).

Theory of operation. ``pipe_forward`` opens one forward stream (tag 0x02) on the vault's
connection, sends OPEN(host, port) through the ``ForwardClient`` machine and pipelines the
source's bytes right behind it, as the listener's tunnels do: ssh speaks first, and a round
trip saved at every connect is worth having. The vault answers OPENED or an ERROR frame;
a refusal is raised as the class the frame names (``TargetUnreachable`` for "cannot connect
to HOST:PORT: connection refused"), never as an empty reply.

Two directions then run at once, with the TCP half-close rules of ``transport.relay``:
the source's end becomes a FIN (the vault shuts the write side of its TCP connection, the
target may still answer), and the vault's FIN closes the sink. The pipe ends cleanly when
both directions ended. One exception: once the target has finished sending, a reset of
our sending side means the target closed its socket entirely; that is the end of an
ordinary conversation (``ssh`` after ``exit``), not a failure.

Memory stays bounded both ways: the next chunk is read from the source only after the
previous one fell below the stream's high-water mark (``drain``), and the next chunk is read
from the stream only after the sink took the previous one, so a slow consumer leaves bytes
in the QUIC receive window, which the vault's sender then waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from flyvault.errors import RemoteError, StreamReset, Timeout, TransportError
from flyvault.protocol.constants import StreamTag
from flyvault.protocol.forward import (
    OPEN_TIMEOUT,
    ForwardClient,
    Opened,
    OpenTimedOut,
    Refused,
    format_address,
)
from flyvault.transport import QuicStream
from flyvault.transport.relay import CHUNK_SIZE, Relayed, held_data, next_opening_event

from .vault import Vault

log = logging.getLogger("flyvault.forward")


class TargetReset(RemoteError):
    """The target's TCP connection was reset after it opened (exit 10, as a refusal): the
    connection to the vault is not at fault."""


class ByteSource(Protocol):
    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; ``b""`` at the end."""
        ...


class ByteSink(Protocol):
    async def write(self, data: bytes) -> None:
        """Return once ``data`` is taken in full (this is where backpressure comes from)."""
        ...

    async def close(self) -> None:
        """The end of the data: the consumer sees end-of-file."""
        ...


async def pipe_forward(
    vault: Vault,
    host: str,
    port: int,
    source: ByteSource,
    sink: ByteSink,
    *,
    open_timeout: float = OPEN_TIMEOUT,
) -> Relayed:
    """Join ``source`` and ``sink`` to one TCP connection the vault opens to ``host:port``.

    Returns the byte counts (``tcp_to_quic`` = sent from the source) after a clean end of
    both directions. Raises the refusal's class (``TargetUnreachable``), ``Timeout`` when
    the vault does not answer, ``TransportError`` subclasses when the stream or the
    connection fails, and what the source or sink raise (``OSError``); the stream is reset
    on every failure.
    """
    connection = await vault.connection()
    machine = ForwardClient(open_timeout)
    stream = connection.open_stream(StreamTag.PORT_FORWARD)
    machine.open(host, port, asyncio.get_running_loop().time())
    stream.write(machine.data_to_send())
    target = format_address(host, port)
    counts = Relayed()
    pipe = _Pipe(stream, machine, target, counts)
    await pipe.run(source, sink)
    log.debug(
        "forward --stdio %s: done, %d bytes sent, %d received",
        target,
        counts.tcp_to_quic,
        counts.quic_to_tcp,
    )
    return counts


class _Pipe:
    def __init__(
        self, stream: QuicStream, machine: ForwardClient, target: str, counts: Relayed
    ) -> None:
        self.stream = stream
        self.machine = machine
        self.target = target
        self.counts = counts
        #: The opening is over (answered, refused or failed).
        self.settled = asyncio.Event()
        #: The vault's side finished sending (its FIN arrived and the sink was closed).
        self.remote_done = False
        #: The vault reached the target (OPENED).
        self.opened = False

    async def run(self, source: ByteSource, sink: ByteSink) -> None:
        # Download first: when both fail, its error (the vault's refusal) explains best.
        tasks = (
            asyncio.ensure_future(self._download(sink)),
            asyncio.ensure_future(self._upload(source)),
        )
        clean = False
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                error = task.exception() if task.done() else None
                if isinstance(error, StreamReset) and self.opened:
                    # The connection to the vault is fine (its loss is another error): the
                    # vault reset this one stream because the TCP connection it carried was.
                    raise TargetReset(
                        f"the connection to {self.target} was reset: the target closed it "
                        "abruptly (or the vault's side of it failed)"
                    ) from error
                if error is not None:
                    raise error
            clean = True
        finally:
            if not clean:
                self.stream.abort()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _opening(self) -> bytes:
        try:
            event = await next_opening_event(self.stream, self.machine)
        finally:
            self.settled.set()
        if isinstance(event, OpenTimedOut):
            raise Timeout(
                f"the vault did not answer the forward request within {event.seconds:g} s"
            )
        if isinstance(event, Refused):
            raise event.error.to_exception()
        assert isinstance(event, Opened), event
        self.opened = True
        log.debug("forward --stdio %s: connected (%s)", self.target, event.peer)
        return held_data(self.machine)

    async def _download(self, sink: ByteSink) -> None:
        data = await self._opening()
        while True:
            if data:
                await sink.write(data)
                self.counts.quic_to_tcp += len(data)
            data = await self.stream.read(CHUNK_SIZE)
            if not data:
                break
        self.remote_done = True
        await sink.close()

    async def _upload(self, source: ByteSource) -> None:
        try:
            while data := await source.read(CHUNK_SIZE):
                self.stream.write(data)
                self.counts.tcp_to_quic += len(data)
                await self.stream.drain()
            self.stream.write_eof()  # the source's end -> FIN -> shutdown(SHUT_WR) on the vault
        except StreamReset:
            if self.remote_done:
                log.debug("forward --stdio %s: the target closed its socket", self.target)
                return
            await self._let_refusal_win()
            raise
        except TransportError:
            await self._let_refusal_win()
            raise

    async def _let_refusal_win(self) -> None:
        # A refusing vault stops our stream; its ERROR frame, read by the download side,
        # says why far better than this reset does.
        if not self.settled.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.settled.wait(), OPEN_TIMEOUT)
