"""TCP <-> QUIC stream relay shared by both ends of a port forward.

EOF in either direction becomes a half-close in that direction, and a tunnel ends only
when both directions have ended (the original tore the whole bridge down at the first
EOF, losing responses). Both directions wait on the other side's drain, so a slow reader
holds memory flat instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from flyvault.errors import TransportError
from flyvault.protocol.forward import (
    OPEN_TIMEOUT,
    DataReceived,
    ForwardClient,
    ForwardEvent,
    ForwardServer,
)
from flyvault.transport.channel import QuicStream

log = logging.getLogger("flyvault.forward")

CHUNK_SIZE = 64 * 1024
#: How long a finished tunnel may take to flush its last TCP bytes before it is aborted.
CLOSE_TIMEOUT = 10.0

ForwardMachine = ForwardClient | ForwardServer


# Shared by both ends -------------------------------------------------------------------


async def next_opening_event(stream: QuicStream, machine: ForwardMachine) -> ForwardEvent:
    """Feed the stream to an opening machine until it has an event.

    The machine's deadline bounds each read; when it passes, ``handle_timer`` turns it into
    the machine's ``...TimedOut`` event. Raises what the machine raises for a broken
    opening (``RemoteProtocolError``) and the stream's ``TransportError``.
    """
    loop = asyncio.get_running_loop()
    while (event := machine.next_event()) is None:
        try:
            async with asyncio.timeout_at(machine.next_deadline()):
                data = await stream.read(CHUNK_SIZE)
        except TimeoutError:
            machine.handle_timer(loop.time())
            continue
        if data:
            machine.receive_data(data)
        else:
            machine.receive_eof()
    return event


def held_data(machine: ForwardMachine) -> bytes:
    """The raw bytes the machine already holds once the opening is done."""
    chunks = []
    while (event := machine.next_event()) is not None:
        if isinstance(event, DataReceived):
            chunks.append(event.data)
    return b"".join(chunks)


@dataclass
class Relayed:
    """Byte counts of a finished relay, per direction."""

    tcp_to_quic: int = 0
    quic_to_tcp: int = 0


def abort_tcp(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, so the other program sees a reset rather than a clean end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def relay(
    stream: QuicStream,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    pending: bytes = b"",
    opening: Callable[[], Awaitable[bytes]] | None = None,
) -> Relayed:
    """Pump bytes both ways until both directions ended; always closes ``writer``.

    ``pending``: stream bytes already read, written to TCP first. ``opening``: awaited
    before the QUIC->TCP direction starts (the client's wait for OPENED) while TCP->QUIC
    already runs (pipelining); it returns the raw bytes that followed the answer.
    Raises the first failure (``TransportError``, ``OSError``, or what ``opening``
    raised) after both sides were torn down.
    """
    counts = Relayed()
    settled = asyncio.Event()

    async def tcp_to_quic() -> None:
        try:
            while data := await reader.read(CHUNK_SIZE):
                stream.write(data)
                counts.tcp_to_quic += len(data)
                await stream.drain()
            stream.write_eof()  # TCP EOF -> FIN: a half-close, the other way still runs
        except TransportError:
            if not settled.is_set():
                # A refusing server stops our stream; its ERROR frame, read by the other
                # direction, says why far better than this reset does. Let it win.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(settled.wait(), OPEN_TIMEOUT)
            raise

    async def quic_to_tcp() -> None:
        data = pending
        try:
            if opening is not None:
                data = await opening()
        finally:
            settled.set()
        while True:
            if data:
                writer.write(data)
                counts.quic_to_tcp += len(data)
                await writer.drain()
            data = await stream.read(CHUNK_SIZE)
            if not data:
                break
        if writer.can_write_eof():
            writer.write_eof()  # FIN -> TCP shutdown(SHUT_WR): the local side may still send

    # QUIC->TCP first: when both failed, its error (say the server's ERROR frame) is the
    # one that explains what happened.
    tasks = (asyncio.ensure_future(quic_to_tcp()), asyncio.ensure_future(tcp_to_quic()))
    clean = False
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            error = task.exception() if task.done() else None
            if error is not None:
                raise error
        clean = True
        return counts
    finally:
        if not clean:
            # A reset on one side is a reset on the other; cancellation (server or
            # listener shutting down) is handled the same way.
            stream.abort()
            abort_tcp(writer)
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            # Also when cancelled right here (listener closing): the socket must go.
            if clean:
                await close_tcp(writer)


async def close_tcp(writer: asyncio.StreamWriter) -> None:
    """Close gracefully (flushing what is buffered), but never wait forever for a peer."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except (TimeoutError, OSError):
        abort_tcp(writer)  # the peer does not take the last bytes: drop them
    except BaseException:
        abort_tcp(writer)  # cancelled while closing: never leak the socket
        raise
