"""Forward streams (tag 0x02): connect to a TCP target and relay raw bytes.

The client sends OPEN(host, port) and may pipeline raw bytes right behind it. We connect
(10 s at most) from the init process, so ``localhost`` reaches services of the workload,
then answer OPENED with the peer address actually reached, or an ERROR frame with a reason
the user can act on ("connection refused", "name does not resolve", "timed out"): the
original closed the stream silently and a refusal looked like an empty reply.

The relay itself (``flyvault.client.forward.relay``) is shared with the client: half-close
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

from flyvault.errors import RemoteProtocolError, TransportError
from flyvault.protocol.console import ForwardFrame, ForwardOpen, error_frame, frame
from flyvault.protocol.constants import ErrorCode
from flyvault.transport import QuicStream
from flyvault.transport.relay import abort_tcp, format_address, read_first_frame, relay

if TYPE_CHECKING:
    from .app import ServerConnection

log = logging.getLogger("flyvault.server.forward")

CONNECT_TIMEOUT = 10.0
#: The OPEN frame normally arrives with the tag; a client that never sends it is dropped.
OPEN_TIMEOUT = 10.0
#: OPEN holds a host of at most 255 bytes and a port.
MAX_OPEN_PAYLOAD = 1024


class ConnectFailed(Exception):
    """The TCP connect failed; ``reason`` is short and lower case, for the error frame."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def handle_forward(connection: ServerConnection, stream: QuicStream, initial: bytes) -> None:
    source = connection.source
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            first, pending = await read_first_frame(stream, initial, MAX_OPEN_PAYLOAD)
        if first.type != ForwardFrame.OPEN:
            raise RemoteProtocolError(
                f"expected a forward OPEN frame, got frame type 0x{first.type:02x}"
            )
        request = ForwardOpen.decode(first.payload)
    except TimeoutError:
        await _refuse(stream, ErrorCode.PROTOCOL, f"no forward OPEN within {OPEN_TIMEOUT:g} s")
        return
    except RemoteProtocolError as exc:
        log.debug("forward stream from %s: %s", source, exc)
        await _refuse(stream, ErrorCode.PROTOCOL, f"forward stream: {exc.message}")
        return

    target = format_address(request.host, request.port)
    try:
        reader, writer = await open_tcp(request.host, request.port, CONNECT_TIMEOUT)
    except ConnectFailed as exc:
        log.debug("forward from %s to %s failed: %s", source, target, exc.reason)
        await _refuse(stream, ErrorCode.CONNECT_FAILED, f"cannot connect to {target}: {exc.reason}")
        return

    peer = _peer(writer)
    log.debug("forward from %s to %s: connected to %s", source, target, peer)
    try:
        stream.write(frame(ForwardFrame.OPENED, peer.encode("utf-8")))
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


async def _refuse(stream: QuicStream, code: ErrorCode, message: str) -> None:
    """Send the error and finish the stream; stop reading what the client pipelined."""
    with contextlib.suppress(TransportError):
        await stream.send(error_frame(code, message), end_stream=True)
    # The client may have sent data behind OPEN: drop it and tell it to stop sending.
    stream.stop()


async def open_tcp(
    host: str, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Resolve and try each address in turn; raise ``ConnectFailed`` with a short reason.

    Done by hand rather than with ``asyncio.open_connection(host, port)`` so that a
    refusal on every address reads "connection refused", not "Multiple exceptions: ...",
    and so that no half-made socket survives a timeout.
    """
    loop = asyncio.get_running_loop()
    errors: list[OSError] = []
    try:
        async with asyncio.timeout(timeout):
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
    except TimeoutError:
        raise ConnectFailed(f"timed out after {timeout:g} s") from None
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
