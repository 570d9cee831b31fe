"""An exec session or shell, attached from this side: the asyncio glue around the
``ExecClient`` machine (``flyvault.protocol.exec_client``), resumed across reconnects.

Apart from ``vault.py`` so that the commands without sessions (``cp``, ``forward``) do not
import the exec protocol's modules: ~12 ms of every such command's start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flyvault.client.exec_request import ExecRequest
from flyvault.errors import (
    ConnectionLost,
    NotFoundError,
    SessionGone,
    SessionTakenOver,
    TransportError,
)
from flyvault.protocol.console import Exited, OpenSession, Started
from flyvault.protocol.constants import PROTOCOL_VERSION, StreamTag
from flyvault.protocol.exec_client import ExecClient
from flyvault.protocol.exec_session import (
    ClientEvent,
    ErrorReceived,
    OutputChannel,
    OutputReceived,
    SessionDisplaced,
    SessionExited,
    SessionStarted,
    StdinAcknowledged,
    StreamEndedEarly,
)

if TYPE_CHECKING:
    from flyvault.client.vault import Vault
    from flyvault.transport import QuicStream

log = logging.getLogger("flyvault.client")

Notice = Callable[[str], None]


@dataclass
class ExecHooks:
    """Where an exec session's output and notices go. Callbacks may be async."""

    stdout: Callable[[bytes], Awaitable[None] | None]
    stderr: Callable[[bytes], Awaitable[None] | None]
    started: Callable[[Started], None] = lambda started: None
    notice: Notice = lambda message: None


class ExecSession:
    """One attachment to an exec session or shell, resumed across reconnects.

    Input is queued with ``send_stdin`` / ``close_stdin`` / ``resize`` / ``signal`` and sent on
    whichever stream is current; ``run`` returns the ``Exited`` record. The wire rules
    (offsets, replay, stdin resends, the exit acknowledgement and its deadline) live in the
    ``ExecClient`` machine; this is the asyncio glue around it.
    """

    def __init__(
        self,
        vault: Vault,
        request: ExecRequest | OpenSession,
        hooks: ExecHooks,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(request, ExecRequest):
            request = request.open_session()
        self.vault = vault
        self.request = request
        self.hooks = hooks
        self.machine = ExecClient(request)
        self._clock = clock
        self._stream: QuicStream | None = None
        self._room = asyncio.Event()  # set when the vault acknowledges input
        self._boot_id: str | None = None  # the vault's workload when the session started

    @property
    def session_id(self) -> str:
        return self.request.session_id

    @property
    def offset(self) -> int:
        """Absolute offset of the next output byte."""
        return self.machine.output_offset

    @property
    def started(self) -> Started | None:
        return self.machine.started

    # Input ---------------------------------------------------------------------------

    def send_stdin(self, data: bytes) -> None:
        self.machine.send_stdin(data)
        self._flush()

    def close_stdin(self) -> None:
        self.machine.close_stdin()
        self._flush()

    def resize(self, rows: int, cols: int) -> None:
        self.machine.resize(rows, cols)
        self._flush()

    def signal(self, signo: int) -> None:
        self.machine.signal(signo)
        self._flush()

    async def drain(self) -> None:
        """Wait while the stream's send buffer is full, and while the input kept for a
        resend is over its bound (so a reconnect cannot make stdin pile up in memory)."""
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(TransportError):
                await stream.drain()
        while self.machine.stdin_backlog_full:
            self._room.clear()
            await self._room.wait()

    def _flush(self) -> None:
        """Write what the machine queued on the current stream, if one is up."""
        stream = self._stream
        if stream is None:
            return
        data = self.machine.data_to_send()
        if not data:
            return
        try:
            stream.write(data)
        except TransportError:
            # The stream is gone: the machine carries resizes and signals over to the next
            # one, and the reattach resends input from the vault's offset.
            self.machine.stream_lost(data)
            self._stream = None

    # The loop --------------------------------------------------------------------------

    async def run(self) -> Exited:
        while True:
            connection = await self.vault.connection()
            if self._boot_id is None:
                self._boot_id = getattr(connection, "boot_id", None)
            try:
                result = await self._attach(connection)
            except NotFoundError:
                gone = self._gone(connection)
                if gone is not None:
                    raise gone from None
                if not self._recreate(connection):
                    raise
                continue
            except TransportError as exc:
                log.info(
                    "exec session %s: stream lost (%s); reattaching from output offset %d",
                    self.session_id,
                    exc,
                    self.offset,
                )
                self._stream = None
                self.machine.stream_lost()
                self.vault.invalidate(connection)
                continue
            return result

    def _recreate(self, connection: Any) -> bool:
        """Whether the creating OPEN goes out again: the first one was lost in flight (the
        machine's rule), on the vault whose workload it was meant for (same boot id)."""
        if not self.machine.may_recreate or getattr(connection, "boot_id", None) != self._boot_id:
            return False
        log.info(
            "exec session %s: the vault never got the request; sending it again", self.session_id
        )
        self.machine.recreate()
        return True

    def _gone(self, connection: Any) -> SessionGone | None:
        """A reattach found no session: if the vault restarted while the connection was
        down, the session went with the old workload. Say so, not "not found"."""
        boot_id = getattr(connection, "boot_id", None)
        if self.machine.reattaching and self.started is not None and boot_id != self._boot_id:
            return SessionGone(
                f"session {self.session_id} ended: the vault restarted while the "
                "connection was down (its workload has a new boot id); how the "
                "command ended is not known",
                hint=f"check the vault with: fly-vault doctor {self.vault.config.name}",
            )
        return None

    async def _attach(self, connection: Any) -> Exited:
        """One stream: open (or reattach), then turn the machine's events into hooks until
        the session exits, this client is displaced, or the stream fails."""
        # What the connection negotiated decides which fields may be sent (checked before
        # a stream exists, so a refusal leaves nothing half open on the vault).
        version = getattr(connection, "protocol_version", PROTOCOL_VERSION)
        opening = self.machine.open_stream(version)
        stream = connection.open_stream(StreamTag.CONSOLE)
        stream.write(opening)
        self._stream = stream
        try:
            await stream.drain()
            while True:
                event = self.machine.next_event()
                if event is None:
                    data = await stream.read()
                    if data:
                        self.machine.receive_data(data)
                    else:
                        self.machine.receive_eof()
                    continue
                exited = await self._handle(event, stream)
                if exited is not None:
                    return exited
        except asyncio.CancelledError:
            # Our caller left (a keeper's CLI process was interrupted, an MCP call was
            # cancelled) while the connection lives on: abort the stream, so the vault
            # sees this client detach now, as it does when a CLI process dies.
            stream.abort()
            raise

    async def _handle(self, event: ClientEvent, stream: QuicStream) -> Exited | None:
        if isinstance(event, OutputReceived):
            channel = event.channel
            hook = self.hooks.stdout if channel is OutputChannel.STDOUT else self.hooks.stderr
            result = hook(event.data)
            if result is not None:
                await result
        elif isinstance(event, SessionStarted):
            self._on_started(event)
        elif isinstance(event, StdinAcknowledged):
            self._room.set()
        elif isinstance(event, SessionExited):
            await self._acknowledge_exit(event.exited, stream)
            return event.exited
        elif isinstance(event, SessionDisplaced):
            self._stream = None
            raise SessionTakenOver(
                f"session {self.session_id}: {event.reason}; detached here",
                hint="only one client can be attached to a session at a time",
            )
        elif isinstance(event, ErrorReceived):
            raise event.error.to_exception()
        elif isinstance(event, StreamEndedEarly):
            raise ConnectionLost("the vault ended the session stream without an exit")
        return None

    def _on_started(self, event: SessionStarted) -> None:
        started = event.started
        if started.dropped:
            self.hooks.notice(
                f"{started.dropped} bytes of output were dropped from the vault's "
                "buffer before they could be shown"
            )
        log.debug(
            "exec session %s: %s at output offset %d",
            self.session_id,
            "started" if event.first_attach else "reattached",
            started.offset,
        )
        self._flush()  # input flows from the vault's stdin offset now
        self._room.set()  # a reattach's STARTED acknowledges input too
        self.hooks.started(started)

    async def _acknowledge_exit(self, exited: Exited, stream: QuicStream) -> None:
        log.info(
            "exec session %s: exited with status %d (%d output bytes)",
            self.session_id,
            exited.exit_status,
            exited.total_bytes,
        )
        self.machine.acknowledge_exit(self._clock())
        self._stream = None
        with contextlib.suppress(TransportError):
            stream.write(self.machine.data_to_send(), end_stream=True)
            # Nothing but the server's end of stream can follow: stop reading so the
            # stream is released now, not kept for the connection's lifetime.
            stream.stop(0)
        # Input the command no longer read may be queued ahead of the EXIT_ACK. A one-shot
        # client closes the connection next, which would drop both, and the vault would
        # keep the finished session waiting for an acknowledgement. The machine says how
        # long delivery may take.
        while (deadline := self.machine.next_deadline()) is not None:
            try:
                await asyncio.wait_for(stream.wait_delivered(), max(0.0, deadline - self._clock()))
            except TimeoutError:
                self.machine.handle_timer(self._clock())
            except TransportError:
                self.machine.stream_lost()
            else:
                self.machine.delivery_confirmed()


__all__ = ["ExecHooks", "ExecSession"]
