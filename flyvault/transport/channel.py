"""asyncio side of the QUIC transport: channels (connections) and streams with backpressure.

A ``QuicChannel`` wraps one ``VaultQuicConnection``. It pings the peer every
``keepalive_interval`` seconds (aioquic has no keep-alive setting), turns the connection's
events into per-stream queues, and fails every waiter with ``ConnectionLost`` when the
connection terminates, so nothing hangs when the far side dies.

``QuicStream`` is a bidirectional stream:

* reading consumes from a queue that is bounded by the stream's receive window, which the
  connection advances only as the application reads (see ``transport.connection``);
* ``write`` queues into aioquic's send buffer and ``drain`` waits while more than
  ``high_water`` bytes are unacknowledged, resuming below ``low_water``: aioquic's own
  writer has no backpressure at all;
* ``reset`` / ``stop`` abort one direction with an application error code.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events

from flyvault.errors import ConnectionLost, StreamReset, TransportError
from flyvault.transport.connection import VaultQuicConnection

log = logging.getLogger("flyvault.transport")

DEFAULT_HIGH_WATER = 512 * 1024
DEFAULT_LOW_WATER = 128 * 1024
#: A bulk stream's buffers (``QuicStream.use_bulk_buffers``). At the defaults a 1 GB file
#: stalled on them: with ~1 ms of loopback round trip, the sender paused at 512 KiB
#: unacknowledged and woke at 128 KiB, less than one round trip of data, and the 1 MiB
#: receive window capped what was in flight. Measured on 1 GB, these took a download from
#: ~8.6 s to ~6 s; larger ones gained nothing more.
BULK_RECEIVE_WINDOW = 4 * 1024 * 1024
BULK_HIGH_WATER = 2 * 1024 * 1024
BULK_LOW_WATER = 1024 * 1024

#: Application error code used when we abort a stream (RESET_STREAM / STOP_SENDING).
STREAM_ABORTED = 1
#: QUIC's transport error CONNECTION_REFUSED (RFC 9000 §20.1): the server is too busy for
#: this connection now. Sent when a pre-auth connection is evicted or expires under load.
BUSY_ERROR_CODE = 0x2


class QuicStream:
    def __init__(
        self,
        channel: QuicChannel,
        stream_id: int,
        *,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
    ) -> None:
        self._channel = channel
        self.stream_id = stream_id
        self._chunks: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._error: BaseException | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._write_closed = False
        self._read_done = False
        self._send_error: BaseException | None = None
        self._send_failed = asyncio.Event()  # set with _send_error
        self.high_water = high_water
        self.low_water = low_water
        #: What the stream carries ("control", "console", ...), when its opener said so;
        #: a named stream's close is logged.
        self.kind: str | None = None

    def __repr__(self) -> str:
        return f"<QuicStream {self.stream_id} on {self._channel!r}>"

    def use_bulk_buffers(self) -> None:
        """Buffers for a stream that moves bulk data (files): a wider receive window and
        higher write watermarks. Memory stays bounded per stream, at a few MiB, so only
        streams that need the throughput use them."""
        self.high_water = BULK_HIGH_WATER
        self.low_water = BULK_LOW_WATER
        self._channel.quic.set_receive_window(self.stream_id, BULK_RECEIVE_WINDOW)
        self._channel._transmit_soon()  # announce the wider window now, not with the next read

    # Reading -------------------------------------------------------------------------

    async def read(self, max_bytes: int = 256 * 1024) -> bytes:
        """Return up to ``max_bytes``; ``b""`` at the end of the stream."""
        while not self._chunks:
            if self._error is not None:
                self._maybe_done()
                raise self._error
            if self._eof:
                self._end_read()
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunks = self._chunks
        chunk = chunks.popleft()
        if len(chunk) > max_bytes:
            chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        elif chunks and len(chunk) + len(chunks[0]) <= max_bytes:
            # At 1200-byte datagrams each chunk is one packet's ~1150 bytes: hand the reader
            # all that has arrived (up to max_bytes) so that it writes to its pipe or
            # socket once, not once per packet.
            parts = [chunk]
            size = len(chunk)
            while chunks and size + len(chunks[0]) <= max_bytes:
                part = chunks.popleft()
                parts.append(part)
                size += len(part)
            chunk = b"".join(parts)
        self._channel._consumed(self.stream_id, len(chunk))
        if self._eof and not chunks:
            self._end_read()
        return chunk

    @property
    def queued(self) -> int:
        """Bytes received and not yet read (bounded by the stream's receive window)."""
        return sum(len(chunk) for chunk in self._chunks)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    @property
    def unacknowledged(self) -> int:
        """Bytes written to this stream that the peer has not acknowledged yet."""
        return self._channel.buffered(self.stream_id)

    @property
    def connection_closed(self) -> bool:
        """The whole connection is gone (not just this stream)."""
        return self._channel.is_closed

    # Writing -------------------------------------------------------------------------

    def write(self, data: bytes, end_stream: bool = False) -> None:
        if self._send_error is not None:
            raise self._send_error
        if self._write_closed:
            raise TransportError(f"stream {self.stream_id} is already closed for writing")
        self._write_closed = end_stream
        self._channel._send(self.stream_id, data, end_stream)
        if end_stream:
            self._maybe_done()

    def write_eof(self) -> None:
        if not self._write_closed and self._send_error is None:
            self.write(b"", end_stream=True)

    async def drain(self) -> None:
        """Wait until unacknowledged data has fallen to the low-water mark."""
        if self._channel.buffered(self.stream_id) <= self.high_water:
            if self._send_error is not None:
                raise self._send_error
            return
        self._writable.clear()
        self._channel._watch_writable(self)
        await self._writable.wait()
        if self._send_error is not None:
            raise self._send_error

    async def wait_stopped(self) -> BaseException:
        """Wait until nothing more can be sent: the peer stopped reading (STOP_SENDING),
        or the stream or its connection failed. Returns that error."""
        await self._send_failed.wait()
        assert self._send_error is not None
        return self._send_error

    async def wait_delivered(self) -> None:
        """Wait until the peer has acknowledged every byte written so far."""
        if self._channel.buffered(self.stream_id) > 0 and self._send_error is None:
            self._writable.clear()
            self._channel._watch_writable(self, threshold=0)
            await self._writable.wait()
        if self._send_error is not None:
            raise self._send_error

    async def send(self, data: bytes, end_stream: bool = False) -> None:
        self.write(data, end_stream)
        await self.drain()

    def reset(self, error_code: int = STREAM_ABORTED) -> None:
        """Abort our sending side."""
        self._write_closed = True
        self._channel._reset(self.stream_id, error_code)
        self._maybe_done()

    def stop(self, error_code: int = STREAM_ABORTED) -> None:
        """Tell the peer we will read no more."""
        self._eof = True
        self._read_done = True
        self._chunks.clear()
        self._readable.set()
        self._channel._stop(self.stream_id, error_code)
        self._maybe_done()

    def abort(self, error_code: int = STREAM_ABORTED) -> None:
        self.reset(error_code)
        self.stop(error_code)

    def _maybe_done(self) -> None:
        # Both directions over: the channel need not keep this stream any longer.
        if self._write_closed and (self._read_done or self._error is not None):
            self._channel._forget(self.stream_id)

    # Called by the channel -----------------------------------------------------------

    def _end_read(self) -> None:
        """Everything the peer sent has been read. A reader that stops at an answer never
        reads the empty end, and the stream would stay in the channel until it closed."""
        self._read_done = True
        self._maybe_done()

    def _feed(self, data: bytes, end_stream: bool) -> None:
        if data:
            self._chunks.append(data)
        if end_stream:
            self._eof = True
            if not self._chunks:
                self._end_read()
        self._readable.set()

    def _fail(self, error: BaseException, *, sending: bool = True) -> None:
        self._error = error
        self._readable.set()
        if sending:
            self._fail_send(error)

    def _fail_send(self, error: BaseException) -> None:
        self._send_error = error
        self._writable.set()
        self._send_failed.set()


class QuicChannel(QuicConnectionProtocol):
    """One QUIC connection, client or server side."""

    _ids = itertools.count(1)

    def __init__(
        self,
        quic: VaultQuicConnection,
        *,
        keepalive_interval: float = 2.0,
        on_stream: Callable[[QuicStream], None] | None = None,
    ) -> None:
        super().__init__(quic)
        self.quic: VaultQuicConnection = quic
        self.number = next(self._ids)
        self._streams: dict[int, QuicStream] = {}
        self._highest_remote = -1
        self.on_stream = on_stream
        self._keepalive_interval = keepalive_interval
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._handshake_done: asyncio.Future[None] = self._loop.create_future()
        self._terminated_reason: str | None = None
        #: Streams waiting for their unacknowledged bytes to fall to a threshold.
        self._watched: dict[QuicStream, int] = {}
        self.peer_address: Any = None
        #: Loop time of the last datagram from the peer.
        self.last_received = 0.0
        self.on_terminated: Callable[[QuicChannel], None] | None = None
        #: Client channels own their UDP socket; server channels share the listener's.
        self.owns_transport = True
        #: The error code of the peer's CONNECTION_CLOSE, once one arrived.
        self.peer_error_code: int | None = None
        #: The path MTU search (``transport.pmtu.PathMtuDriver``) when one runs.
        self.pmtu: Any = None

    def __repr__(self) -> str:
        return f"<QuicChannel #{self.number} peer={self.peer_address}>"

    # Public API ----------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._terminated_reason is not None

    @property
    def close_reason(self) -> str | None:
        return self._terminated_reason

    async def wait_handshake(self) -> None:
        await asyncio.shield(self._handshake_done)

    def on_handshake(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the handshake completed (never if it fails)."""

        def done(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                callback()

        self._handshake_done.add_done_callback(done)

    @property
    def datagram_size(self) -> int:
        """The largest UDP payload this connection sends now (path MTU discovery may raise
        it while the connection runs)."""
        return self.quic.max_datagram_size

    def send_alone(self, datagram: bytes) -> OSError | None:
        """Send one datagram by itself, returning the send error (a path MTU probe)."""
        transport: Any = self._transport
        address = self.quic.get_peer_address() or self.peer_address
        if transport is None:
            return None
        send_now = getattr(transport, "send_now", None)
        if send_now is not None:
            error: OSError | None = send_now(datagram, address)
            return error
        transport.sendto(datagram, address)
        return None

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        return self.quic.export_keying_material(label, length)

    def open_stream(self) -> QuicStream:
        if self.is_closed:
            raise ConnectionLost(self._lost_message())
        stream_id = self.quic.get_next_available_stream_id()
        return self._make_stream(stream_id)

    def buffered(self, stream_id: int) -> int:
        return self.quic.send_buffered(stream_id)

    def close_now(self, error_code: int = 0, reason: str = "") -> None:
        """Send CONNECTION_CLOSE and stop at once, without waiting out the drain period.

        One-shot commands use this: waiting for the drain costs ~100 ms per run and the
        peer learns of the close from the frame anyway.
        """
        if not self.is_closed:
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.transmit()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transmit_task is not None:
            # A transmit queued before the close would send on a closed socket.
            self._transmit_task.cancel()
            self._transmit_task = None
        self._terminate(reason or "closed locally")
        if self.owns_transport and self._transport is not None:
            self._transport.close()

    def refuse(self, reason: str) -> None:
        """Close with the QUIC transport error CONNECTION_REFUSED ("server busy, come
        back"): a transport close, so the reason reaches a peer still in its handshake."""
        if not self.is_closed:
            self.quic.close(
                error_code=BUSY_ERROR_CODE, frame_type=0, reason_phrase=f"server busy: {reason}"
            )
            self.transmit()
        self.close_now(reason=f"refused: {reason}")

    @property
    def refused_by_peer(self) -> bool:
        """The peer closed with CONNECTION_REFUSED: it was busy and a retry may work."""
        return self.peer_error_code == BUSY_ERROR_CODE

    async def close_gracefully(self, error_code: int = 0, reason: str = "") -> None:
        self.close(error_code=error_code, reason_phrase=reason)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wait_closed(), timeout=1.0)

    # asyncio plumbing ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._schedule_keepalive()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        now = self._loop.time()
        self.last_received = now
        if self.peer_address is None:
            self.peer_address = addr
        self._quic.receive_datagram(data, addr, now=now)  # type: ignore[arg-type]
        self._process_events()
        if self._watched:
            self._check_writable()
        # Answer (ACKs, window updates, more data) once per batch of datagrams, not once
        # per datagram: the transport hands over every datagram waiting on the socket in
        # one callback, and each datagrams_to_send pass costs as much as a packet.
        self._transmit_soon()

    def transmit(self) -> None:
        """aioquic's transmit, handing the datagrams to the transport as one batch (the
        batched transport turns runs of them into GSO sends)."""
        self._transmit_task = None
        datagrams = self._quic.datagrams_to_send(now=self._loop.time())
        if datagrams:
            transport: Any = self._transport
            send_batch = getattr(transport, "send_batch", None)
            if send_batch is not None and all(addr == datagrams[0][1] for _, addr in datagrams):
                send_batch([data for data, _ in datagrams], datagrams[0][1])
            else:
                for data, addr in datagrams:
                    transport.sendto(data, addr)
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def connection_lost(self, exc: Exception | None) -> None:
        # The UDP socket itself went away (client side).
        self._terminate(f"socket closed: {exc}" if exc else "socket closed")

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                if not self._is_new_remote_stream(event.stream_id):
                    return  # late data for a stream we already finished with
                self._highest_remote = event.stream_id
                stream = self._make_stream(event.stream_id)
                if self.on_stream is not None:
                    self.on_stream(stream)
            stream._feed(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._fail(
                    StreamReset(
                        f"peer reset stream {event.stream_id} (code {event.error_code})",
                        event.error_code,
                    ),
                    sending=False,
                )
        elif isinstance(event, events.StopSendingReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._fail_send(
                    StreamReset(
                        f"peer stopped reading stream {event.stream_id} (code {event.error_code})",
                        event.error_code,
                    )
                )
        elif isinstance(event, events.HandshakeCompleted):
            self.quic.handshake_complete = True
            if not self._handshake_done.done():
                self._handshake_done.set_result(None)
        elif isinstance(event, events.ConnectionTerminated):
            self.peer_error_code = event.error_code
            reason = event.reason_phrase or f"error code {event.error_code}"
            self._terminate(f"connection closed by peer: {reason}")

    # Internals used by QuicStream ----------------------------------------------------

    def _make_stream(self, stream_id: int) -> QuicStream:
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    def _is_new_remote_stream(self, stream_id: int) -> bool:
        locally_initiated = (stream_id & 1) == (0 if self.quic._is_client else 1)
        return not locally_initiated and stream_id > self._highest_remote

    def _forget(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None and stream.kind is not None:
            log.debug("stream %d closed: %s", stream_id, stream.kind)
        self.quic.forget_stream(stream_id)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def _consumed(self, stream_id: int, amount: int) -> None:
        # Only wake the sender for a window update that will actually be announced;
        # otherwise every read would cost a packet-building pass.
        if self.quic.consume(stream_id, amount):
            self._transmit_soon()

    def _send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if self.is_closed:
            raise ConnectionLost(self._lost_message())
        self.quic.send_stream_data(stream_id, data, end_stream)
        self._transmit_soon()

    def _reset(self, stream_id: int, error_code: int) -> None:
        if not self.is_closed:
            self.quic.reset_stream(stream_id, error_code)
            self._transmit_soon()

    def _stop(self, stream_id: int, error_code: int) -> None:
        if not self.is_closed:
            try:
                self.quic.stop_stream(stream_id, error_code)
            except ValueError:
                return
            self._transmit_soon()

    def _watch_writable(self, stream: QuicStream, threshold: int | None = None) -> None:
        self._watched[stream] = stream.low_water if threshold is None else threshold

    def _check_writable(self) -> None:
        for stream, threshold in list(self._watched.items()):
            if self.quic.send_buffered(stream.stream_id) <= threshold:
                del self._watched[stream]
                stream._writable.set()

    def _lost_message(self) -> str:
        return self._terminated_reason or "connection closed"

    def _terminate(self, reason: str) -> None:
        if self._terminated_reason is not None:
            return
        self._terminated_reason = reason
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        if self.pmtu is not None:
            self.pmtu.stop()
        error = ConnectionLost(self._terminated_reason)
        named = [s for s in self._streams.values() if s.kind is not None]
        if named or self.quic._is_client:
            log.debug("connection #%d closed: %s", self.number, reason)
        for stream in named:
            log.debug("stream %d closed with the connection: %s", stream.stream_id, stream.kind)
        if not self._handshake_done.done():
            self._handshake_done.set_exception(error)
            # Nobody may be waiting; mark the exception as retrieved.
            self._handshake_done.exception()
        for stream in self._streams.values():
            stream._fail(error)
        self._watched.clear()
        self._closed.set()
        if self.on_terminated is not None:
            self.on_terminated(self)

    async def probe(self, timeout: float) -> bool:
        """Whether the peer still answers: a PING, then any datagram from it within
        ``timeout`` seconds. For a connection that sat idle (a keeper's): a peer that died
        or restarted without a word looks alive until its idle timeout, and a request sent
        into it is lost with no way to know whether it arrived."""
        if self.is_closed:
            return False
        sent = self._loop.time()
        self.quic.send_ping(0)
        self.transmit()
        deadline = sent + timeout
        while self.last_received <= sent and not self.is_closed:
            left = deadline - self._loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, 0.005))
        return not self.is_closed

    def _schedule_keepalive(self) -> None:
        if self._keepalive_interval > 0 and not self.is_closed:
            self._keepalive_handle = self._loop.call_later(
                self._keepalive_interval, self._keepalive
            )

    def _keepalive(self) -> None:
        if self.is_closed:
            return
        self.quic.send_ping(0)
        self.transmit()
        self._schedule_keepalive()
