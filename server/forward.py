"""Forward streams (tag 0x02): connect to a TCP target and relay raw bytes.

The client sends OPEN(host, port) and may pipeline raw bytes right behind it. We connect
(10 s at most) from the init process, so ``localhost`` reaches services of the workload,
then answer OPENED with the peer address actually reached, or an ERROR frame with a reason
the user can act on ("connection refused", "name does not resolve", "timed out"): the
original closed the stream silently and a refusal looked like an empty reply.

The opening's rules (what may arrive, what to answer, its deadlines) are the sans-I/O
``flyvault.protocol.forward.ForwardServer``; this module is its glue (reads, the TCP
connect, writes). The relay itself (``flyvault.transport.relay``) is shared with the client: half-close
in both directions, the bridge ends only when both directions ended (flaw B3 of the
original tore it down at the first EOF), bounded buffers, resets propagated as resets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from typing import TYPE_CHECKING

from flyvault.errors import RemoteProtocolError, TargetUnreachable, TransportError
from flyvault.protocol.forward import (
    ConnectTimedOut,
    ForwardServer,
    OpenRequested,
    OpenTimedOut,
    format_address,
)
from flyvault.transport import QuicStream
from flyvault.transport.relay import abort_tcp, held_data, next_opening_event, relay

if TYPE_CHECKING:
    from .app import ServerConnection

log = logging.getLogger("flyvault.server.forward")


class ConnectFailed(Exception):
    """The TCP connect failed; ``reason`` is short and lower case, for the error frame."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def handle_forward(connection: ServerConnection, stream: QuicStream, initial: bytes) -> None:
    """Glue around ``ForwardServer``: the machine says what to answer and when to give up."""
    source = connection.source
    loop = asyncio.get_running_loop()
    machine = ForwardServer(loop.time())
    machine.receive_data(initial)
    try:
        event = await next_opening_event(stream, machine)
    except RemoteProtocolError as exc:
        log.debug("forward stream from %s: %s", source, exc)
        await _refuse(stream, machine)
        return
    if isinstance(event, OpenTimedOut):
        await _refuse(stream, machine)
        return
    assert isinstance(event, OpenRequested), event
    target = format_address(event.host, event.port)
    machine.connecting(loop.time())
    try:
        reader, writer = await open_tcp(event.host, event.port, machine.next_deadline())
    except ConnectFailed as exc:
        log.debug("forward from %s to %s failed: %s", source, target, exc.reason)
        machine.refuse(TargetUnreachable(f"cannot connect to {target}: {exc.reason}"))
        await _refuse(stream, machine)
        return
    except TimeoutError:
        machine.handle_timer(loop.time())
        assert isinstance(machine.next_event(), ConnectTimedOut)
        log.debug("forward from %s to %s failed: timed out", source, target)
        await _refuse(stream, machine)
        return

    peer = _peer(writer)
    log.debug("forward from %s to %s: connected to %s", source, target, peer)
    try:
        machine.accept(peer)
        stream.write(machine.data_to_send())
        pending = held_data(machine)
    except BaseException:
        abort_tcp(writer)
        raise
    try:
        counts = await relay(stream, reader, writer, pending=pending)
    except (TransportError, OSError) as exc:
        # Resets and lost connections are ordinary here; both sides are already torn down.
        log.debug("forward from %s to %s ended: %s", source, target, exc)
    else:
        log.debug(
            "forward from %s to %s done: %d bytes to the target, %d back",
            source,
            target,
            counts.quic_to_tcp,
            counts.tcp_to_quic,
        )


async def _refuse(stream: QuicStream, machine: ForwardServer) -> None:
    """Send the machine's error frame and finish; stop reading what the client pipelined."""
    with contextlib.suppress(TransportError):
        await stream.send(machine.data_to_send(), end_stream=True)
    # The client may have sent data behind OPEN: drop it and tell it to stop sending.
    stream.stop()


async def open_tcp(
    host: str, port: int, deadline: float | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Resolve and try each address in turn until ``deadline`` (loop time), then raise
    ``TimeoutError``; raise ``ConnectFailed`` with a short reason.

    Done by hand rather than with ``asyncio.open_connection(host, port)`` so that a
    refusal on every address reads "connection refused", not "Multiple exceptions: ...",
    and so that no half-made socket survives a timeout.
    """
    loop = asyncio.get_running_loop()
    errors: list[OSError] = []
    async with asyncio.timeout_at(deadline):
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConnectFailed(_resolve_reason(exc)) from None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
                return await asyncio.open_connection(sock=sock)
            except OSError as exc:
                sock.close()
                errors.append(exc)
            except BaseException:
                sock.close()  # timeout or cancellation: never leak the socket
                raise
    raise ConnectFailed(_best_reason(errors))


def _best_reason(errors: list[OSError]) -> str:
    if not errors:
        return "name does not resolve to any address"
    # Report the most telling failure: a refusal says "the host is there, nothing listens",
    # which helps more than an unreachable IPv6 address that happened to be tried first.
    for wanted in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH):
        for exc in errors:
            if exc.errno == wanted:
                return _errno_reason(exc)
    return _errno_reason(errors[0])


_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host is unreachable",
    errno.ENETUNREACH: "network is unreachable",
    errno.EADDRNOTAVAIL: "address not available",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted (firewall?)",
}


def _errno_reason(exc: OSError) -> str:
    if exc.errno in _REASONS:
        return _REASONS[exc.errno]
    return (exc.strerror or str(exc)).lower()


def _resolve_reason(exc: socket.gaierror) -> str:
    unresolvable = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
    if exc.errno in unresolvable:
        return "name does not resolve"
    if exc.errno == socket.EAI_AGAIN:
        return "name resolution failed temporarily (DNS unreachable?)"
    return f"name resolution failed ({exc.strerror})"


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_address(str(peer[0]), int(peer[1]))
    return str(peer)
