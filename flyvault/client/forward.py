"""Local port forwards: a TCP listener on this machine, one QUIC stream per connection.

Theory of operation. ``ForwardListener`` binds ``127.0.0.1:LOCAL`` once and keeps it bound
for its whole life, whatever happens to the QUIC connection: every accepted TCP connection
asks ``connection_provider`` for the current vault connection (which may reconnect), opens
one forward stream (tag 0x02), sends OPEN(host, port) and pipelines the local bytes right
behind it. The server answers OPENED (its TCP connect worked) or an ERROR frame that says
why not; the original had no answer at all and a refused connect looked like an empty reply.

``relay`` is shared with the server (``server.forward``). It pumps both directions at once
with the TCP half-close rules the original lacked (flaw B3): EOF on one side becomes FIN on
the other and the bridge ends only when BOTH directions have ended. A failure anywhere (TCP
reset, stream reset, connection lost) tears down both sides, as a reset: a TCP RST towards
the local program, RESET_STREAM + STOP_SENDING towards the peer. Memory stays bounded: a
QUIC write waits in ``drain`` (the stream's high/low-water marks) and a TCP write waits in
``StreamWriter.drain`` before the next 64 KiB is read from the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from flyvault.config import ForwardSpec
from flyvault.errors import (
    ConnectionLost,
    StreamReset,
    Timeout,
    UsageError,
    VaultError,
)
from flyvault.protocol.constants import StreamTag
from flyvault.protocol.forward import (
    ForwardClient,
    Opened,
    OpenTimedOut,
    Refused,
    format_address,
)
from flyvault.transport import QuicStream
from flyvault.transport.relay import (
    CHUNK_SIZE,
    CLOSE_TIMEOUT,
    abort_tcp,
    held_data,
    next_opening_event,
    relay,
)

from .connection import VaultConnection

log = logging.getLogger("flyvault.forward")


class ForwardListener:
    """Listens on ``bind_host:LOCAL`` and tunnels each connection to ``spec.target``.

    ``local_port`` overrides ``spec.local_port`` (0 picks a free port, for tests: a
    ``ForwardSpec`` only holds ports 1-65535).
    """

    def __init__(
        self,
        spec: ForwardSpec,
        connection_provider: Callable[[], Awaitable[VaultConnection]],
        *,
        on_event: Callable[[str], None] | None = None,
        bind_host: str = "127.0.0.1",
        local_port: int | None = None,
    ) -> None:
        self.spec = spec
        self._provider = connection_provider
        self._on_event = on_event
        self.bind_host = bind_host
        self._local_port = spec.local_port if local_port is None else local_port
        self._server: asyncio.Server | None = None
        self._tunnels: dict[asyncio.Task[None], _Tunnel] = {}
        #: How events name this forward: the port really bound, once listening.
        self.label = str(spec)
        #: Tunnels open now, and accepted since start.
        self.active = 0
        self.total = 0

    @property
    def buffered(self) -> int:
        """Bytes live tunnels hold in memory towards local programs (QUIC receive queues
        and TCP write buffers): bounded by backpressure, whatever the local side does."""
        return sum(tunnel.buffered for tunnel in self._tunnels.values())

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise UsageError(f"forward {self.spec} is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(
                self._accept, self.bind_host, self._local_port, limit=CHUNK_SIZE
            )
        except OSError as exc:
            raise _bind_error(self.bind_host, self._local_port, exc) from None
        self.label = f"{self.port}:{self.spec.target}"
        log.debug("forward %s listening on %s", self.label, self.bind_host)

    async def close(self) -> None:
        """Stop listening and tear down every live tunnel (their sockets get a reset)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tunnels = list(self._tunnels)
        for task in tunnels:
            task.cancel()
        await asyncio.gather(*tunnels, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT)

    async def __aenter__(self) -> ForwardListener:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _event(self, message: str) -> None:
        log.debug("%s", message)
        if self._on_event is not None:
            self._on_event(message)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that starts our own task: asyncio's wrapper task for a coroutine
        # callback logs an error when it is cancelled, and close() must cancel tunnels.
        if self._server is None:  # accepted just before close(): refuse, it would be orphaned
            abort_tcp(writer)
            return
        tunnel = _Tunnel(writer)
        task = asyncio.get_running_loop().create_task(self._tunnel(tunnel, reader, writer))
        self._tunnels[task] = tunnel
        self.active += 1
        self.total += 1
        task.add_done_callback(self._tunnel_done)

    def _tunnel_done(self, task: asyncio.Task[None]) -> None:
        self.active -= 1
        self._tunnels.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("forward %s: tunnel failed", self.label, exc_info=task.exception())

    async def _tunnel(
        self, tunnel: _Tunnel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        spec, label = self.spec, self.label
        machine = ForwardClient()
        try:
            connection = await self._provider()
            stream = tunnel.stream = connection.open_stream(StreamTag.PORT_FORWARD)
            machine.open(spec.host, spec.remote_port, asyncio.get_running_loop().time())
            stream.write(machine.data_to_send())
        except VaultError as exc:
            # The listener stays bound: the next local connection asks the provider again.
            self._event(f"forward {label}: {exc.message}")
            abort_tcp(writer)
            return
        except BaseException:
            abort_tcp(writer)
            raise

        async def opening() -> bytes:
            event = await next_opening_event(stream, machine)
            if isinstance(event, OpenTimedOut):
                raise Timeout(
                    f"the vault did not answer the forward request within {event.seconds:g} s"
                )
            if isinstance(event, Refused):
                raise event.error.to_exception()
            assert isinstance(event, Opened), event
            log.debug("forward %s: connected to %s", label, event.peer)
            return held_data(machine)

        try:
            counts = await relay(stream, reader, writer, opening=opening)
        except StreamReset as exc:
            # The target (or the server) reset the connection: ordinary TCP life.
            log.debug("forward %s: reset (%s)", label, exc)
        except ConnectionLost as exc:
            self._event(f"forward {label}: connection to the vault lost ({exc.message})")
        except VaultError as exc:
            self._event(f"forward {label}: {exc.message}")
        except OSError as exc:
            log.debug("forward %s: local connection failed: %s", label, exc)
        else:
            log.debug(
                "forward %s: done, %d bytes sent, %d received",
                label,
                counts.tcp_to_quic,
                counts.quic_to_tcp,
            )


@dataclass
class _Tunnel:
    writer: asyncio.StreamWriter
    stream: QuicStream | None = None

    @property
    def buffered(self) -> int:
        queued = self.stream.queued if self.stream is not None else 0
        return queued + self.writer.transport.get_write_buffer_size()


def _bind_error(host: str, port: int, exc: OSError) -> UsageError:
    where = format_address(host, port)
    if exc.errno == errno.EADDRINUSE:
        return UsageError(
            f"local port {port} is already in use ({where})",
            hint=f"pick another local port for the forward, or stop the program using it "
            f"(lsof -iTCP:{port} -sTCP:LISTEN)",
        )
    if exc.errno == errno.EACCES:
        return UsageError(
            f"no permission to listen on local port {port} ({where})",
            hint="ports below 1024 need privileges; pick a port of 1024 or more",
        )
    return UsageError(
        f"cannot listen on local port {port} ({where}): {exc.strerror or exc}",
        hint="check the local port of the forward spec",
    )
