"""Vault streams through the connection keeper, for the asyncio client (``cp``, ``forward``).

A ``Vault`` built with a keeper's paths (``Vault(config, keeper=paths)``) gets its
"connection" here: ``KeeperConnection`` asks the keeper to connect (one ``connect``
request), and each ``open_stream`` becomes one ``stream`` request whose bytes the keeper
relays to a stream of the same tag on its own connection. ``KeeperStream`` offers what the
client's stream users read and write (``QuicStream``'s calls), with the same error classes:
a reset is ``StreamReset``, a lost connection ``ConnectionLost``, so reconnect and retry
logic above behaves as on a direct connection. No QUIC here: the process that uses it
needs neither a handshake nor an attestation of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flyvault.client.mux import (
    ACCEPT_TIMEOUT,
    CONNECT_TIMEOUT,
    KeeperUnavailable,
    check_accepted,
    error_from,
    keeper_silent,
)
from flyvault.errors import (
    ConnectionLost,
    RemoteProtocolError,
    StreamReset,
    TransportError,
    VaultError,
)
from flyvault.protocol.mux import MUX_VERSION, MuxDecoder, MuxKind, encode, encode_json

#: Bytes received and not yet read before the stream stops reading its socket.
HIGH_WATER = 1024 * 1024

#: The streams' background tasks, held until they end. The loop keeps only weak references
#: to tasks, and an aborted stream is forgotten by its connection: its task, parked on the
#: stream's own event, would be collected while pending ("Task was destroyed but it is
#: pending!" on a user's terminal) instead of ending when its socket closes.
_RUNNING: set[asyncio.Task[None]] = set()


class KeeperConnection:
    """The keeper's connection as this process sees it: streams, and what it is."""

    def __init__(
        self,
        socket_path: Path,
        info: dict[str, Any],
        lease: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> None:
        from flyvault.protocol.constants import RuntimeStatus, VmState

        self.socket_path = socket_path
        self.boot_id = str(info["boot_id"])
        self.protocol_version = int(info["protocol_version"])
        self.vm_state = VmState(int(info["vm_state"]))
        self.runtime_status = RuntimeStatus(int(info["runtime_status"]))
        #: The keeper's verified attestation claims, read as attributes like
        #: ``AttestationClaims`` (not imported: it would load jwt and crypto here).
        claims = info.get("claims")
        self.claims = types.SimpleNamespace(**claims) if isinstance(claims, dict) else None
        self.notes: tuple[str, ...] = ()
        self._closed = False
        self._streams: set[KeeperStream] = set()
        #: The ``connect`` request, held open while this connection is in use: the keeper
        #: does not idle out under a long ``forward`` or ``cp``, and its end (the keeper
        #: stopped or died) closes this connection at once, so the next stream goes
        #: through a new connection instead of failing on the old one.
        self._on_notice = on_notice
        self._lease_writer = lease[1] if lease is not None else None
        self._lease_watch = (
            asyncio.ensure_future(self._watch_lease(lease[0])) if lease is not None else None
        )

    async def _watch_lease(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(4096):
                pass  # the keeper sends nothing more on it; anything is ignored
        if not self._closed and self._on_notice is not None:
            self._on_notice("the connection keeper ended; new connections go directly to the vault")
        self._lost()

    @classmethod
    async def open(
        cls, socket_path: Path, on_notice: Callable[[str], None] | None = None
    ) -> KeeperConnection:
        """Ask the keeper to connect; ``KeeperUnavailable`` when none takes the request.
        Its notices on the way (the development issuer, a reconnect) go to ``on_notice``."""
        reader, writer, decoder, frames = await _open(socket_path, {"op": "connect"})
        try:
            while True:
                frame = await _next_frame(reader, decoder, frames)
                if frame is None:
                    raise ConnectionLost("the connection keeper ended in the middle of the request")
                if frame.kind is MuxKind.ERROR:
                    raise error_from(frame)
                if frame.kind is MuxKind.RESULT:
                    info = frame.json()["value"]
                    return cls(socket_path, info, lease=(reader, writer), on_notice=on_notice)
                if frame.kind is MuxKind.NOTICE and on_notice is not None:
                    on_notice(str(frame.json().get("message", "")))
                elif frame.kind not in (MuxKind.NOTICE, MuxKind.PROGRESS):
                    raise RemoteProtocolError(
                        f"keeper protocol: {frame.kind.name} instead of RESULT"
                    )
        except BaseException:
            writer.close()
            raise

    @property
    def is_closed(self) -> bool:
        return self._closed

    def open_stream(self, tag: int) -> KeeperStream:
        if self._closed:
            raise ConnectionLost("the connection through the keeper is closed")
        stream = KeeperStream(self, int(tag))
        self._streams.add(stream)
        return stream

    def close(self) -> None:
        self._closed = True
        for stream in list(self._streams):
            stream.close()
        self._end_lease()

    def _end_lease(self) -> None:
        if self._lease_writer is not None:
            self._lease_writer.close()
            self._lease_writer = None
        if self._lease_watch is not None and not self._lease_watch.done():
            self._lease_watch.cancel()

    def _lost(self) -> None:
        """The keeper is gone (a stream found it so, or the lease ended): every other
        stream is gone with it."""
        self._closed = True
        if self._lease_writer is not None:
            self._lease_writer.close()
            self._lease_writer = None

    def _forget(self, stream: KeeperStream) -> None:
        self._streams.discard(stream)


class KeeperStream:
    """One vault stream relayed by the keeper (``QuicStream``'s calls)."""

    def __init__(self, connection: KeeperConnection, tag: int) -> None:
        self._connection = connection
        self.stream_id = -1
        self.kind: str | None = None
        self._pending: list[bytes] = []  # frames written before the socket is open
        self._writer: asyncio.StreamWriter | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._eof = False
        self._error: BaseException | None = None
        self._send_error: BaseException | None = None
        self._write_closed = False
        self._aborted = False
        self._stopped = False  # stop(): incoming data is dropped
        self._opened = asyncio.Event()  # the socket is open, or opening failed
        self._task = asyncio.ensure_future(self._run(tag))
        _RUNNING.add(self._task)
        self._task.add_done_callback(_RUNNING.discard)

    # Reading ---------------------------------------------------------------------------

    async def read(self, max_bytes: int = 256 * 1024) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                self._maybe_done()
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        if len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        if self.queued <= HIGH_WATER // 2:
            self._room.set()
        return chunk

    @property
    def queued(self) -> int:
        return sum(len(chunk) for chunk in self._chunks)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    @property
    def unacknowledged(self) -> int:
        writer = self._writer
        return writer.transport.get_write_buffer_size() if writer is not None else 0

    @property
    def connection_closed(self) -> bool:
        return self._connection.is_closed

    # Writing ---------------------------------------------------------------------------

    def write(self, data: bytes, end_stream: bool = False) -> None:
        if self._send_error is not None:
            raise self._send_error
        if self._write_closed:
            raise TransportError("the stream is already closed for writing")
        if data:
            self._put(encode(MuxKind.STDIN, data))
        if end_stream:
            self._write_closed = True
            self._put(encode(MuxKind.STDIN_EOF))
            self._maybe_done()

    def write_eof(self) -> None:
        if not self._write_closed and self._send_error is None:
            self.write(b"", end_stream=True)

    async def drain(self) -> None:
        await self._opened.wait()  # the socket opens in the background task
        if self._send_error is not None:
            raise self._send_error
        if self._writer is not None:
            try:
                await self._writer.drain()
            except (ConnectionError, OSError):
                self._keeper_gone()
        if self._send_error is not None:
            raise self._send_error

    async def send(self, data: bytes, end_stream: bool = False) -> None:
        self.write(data, end_stream)
        await self.drain()

    async def wait_delivered(self) -> None:
        await self.drain()

    def abort(self, error_code: int = 1) -> None:
        if self._aborted:
            return
        self._aborted = True
        self._write_closed = True
        self._put(encode(MuxKind.ABORT))
        self._close()
        # Nobody reads an aborted stream: what still arrives is dropped, and a task parked
        # on a full queue reads on to the socket's end (and ends) instead of waiting.
        self._stopped = True
        self._eof = True  # a read after it ends at once, as on a QUIC stream
        self._chunks.clear()
        self._readable.set()
        self._room.set()

    reset = abort

    def close(self) -> None:
        """The connection closes: a stream whose sending side ended cleanly just leaves
        (the keeper still delivers what it wrote); any other is aborted."""
        if self._write_closed and not self._aborted and self._send_error is None:
            self._close()
        else:
            self.abort()

    def stop(self, error_code: int = 1) -> None:
        """Read no more (``QuicStream.stop``): what arrives is dropped here. Unlike
        ``abort``, what was written still reaches the vault (an exec's EXIT_ACK goes just
        before this; an abort would reset the vault stream and lose it, and the finished
        session would wait on the vault for an hour). The keeper's relay of the stream ends
        when the vault ends its side."""
        self._stopped = True
        self._eof = True
        self._chunks.clear()
        self._room.set()
        self._readable.set()

    # The background task: open, then read the keeper's frames ----------------------------

    def _put(self, frame: bytes) -> None:
        if self._writer is None:
            self._pending.append(frame)
        elif not self._writer.is_closing():
            self._writer.write(frame)

    async def _run(self, tag: int) -> None:
        try:
            reader, writer, decoder, frames = await _open(
                self._connection.socket_path, {"op": "stream", "tag": tag}
            )
        except (KeeperUnavailable, OSError) as exc:
            self._connection._lost()
            self._fail(ConnectionLost(f"the connection keeper is gone: {exc}"))
            return
        except VaultError as exc:
            self._fail(_as_transport(exc))
            return
        finally:
            self._opened.set()
        self._writer = writer
        for frame in self._pending:
            writer.write(frame)
        self._pending.clear()
        if self._aborted:  # given up while opening: ABORT went out above
            writer.close()
            return
        try:
            while True:
                await self._room.wait()
                frame = await _next_frame(reader, decoder, frames)
                if frame is None:
                    # Our own abort closed the socket, or both directions were done: the
                    # keeper is fine. Anything else is the keeper gone.
                    if not self._aborted and not (self._eof and self._write_closed):
                        self._keeper_gone()
                    return
                self._on_frame(frame)
        except (ConnectionError, OSError):
            if not self._aborted:
                self._keeper_gone()
        except TransportError as exc:
            self._fail(exc)
        except VaultError as exc:  # the keeper broke the protocol: no reader may hang
            self._fail(_as_transport(exc))
        finally:
            writer.close()
            self._connection._forget(self)

    def _on_frame(self, frame: Any) -> None:
        kind = frame.kind
        if kind is MuxKind.STDOUT:
            if self._stopped:
                return
            self._chunks.append(frame.payload)
            if self.queued > HIGH_WATER:
                self._room.clear()
            self._readable.set()
        elif kind is MuxKind.EOF:
            self._eof = True
            self._readable.set()
        elif kind is MuxKind.FAILED:
            detail = frame.json()
            error = _transport_error(detail)
            if detail.get("sending"):
                self._send_error = error
            else:
                self._error = error
                self._readable.set()
        elif kind is MuxKind.ERROR:
            self._fail(_as_transport(error_from(frame)))
        elif kind not in (MuxKind.RESULT, MuxKind.NOTICE, MuxKind.PROGRESS):
            raise RemoteProtocolError(f"keeper protocol: unexpected {kind.name}")

    def _keeper_gone(self) -> None:
        self._connection._lost()
        self._fail(ConnectionLost("the connection keeper ended in the middle of the request"))

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._eof:
            self._error = error
        if self._send_error is None and not self._write_closed:
            self._send_error = error
        self._readable.set()
        self._room.set()

    def _maybe_done(self) -> None:
        if self._eof and self._write_closed and not self._chunks:
            self._connection._forget(self)

    def _close(self) -> None:
        """After an abort: the ABORT frame goes out (closing flushes it), then the socket
        closes; the keeper resets the vault stream."""
        self._connection._forget(self)
        if self._writer is not None:  # else still opening: _run sends ABORT, then closes
            self._writer.close()


async def _open(
    socket_path: Path, hello: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, MuxDecoder, list[Any]]:
    """Connect and have ``hello`` accepted; ``KeeperUnavailable`` if nothing took it. Also
    the decoder and the frames that came with ACCEPTED, for the caller to go on with."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(socket_path)), CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        raise KeeperUnavailable(f"no keeper at {socket_path}: {exc}") from None
    try:
        writer.write(encode_json(MuxKind.HELLO, {"version": MUX_VERSION, **hello}))
    except VaultError as exc:  # too big for the keeper's frames: go direct
        writer.close()
        raise KeeperUnavailable(exc.message) from None
    decoder: MuxDecoder = MuxDecoder()
    frames: list[Any] = []
    try:
        first = await asyncio.wait_for(_next_frame(reader, decoder, frames), ACCEPT_TIMEOUT)
    except (ConnectionError, OSError, RemoteProtocolError):
        first = None
    except TimeoutError:
        writer.close()
        raise keeper_silent(socket_path) from None
    try:
        check_accepted(first, socket_path)
    except BaseException:
        writer.close()
        raise
    return reader, writer, decoder, frames


async def _next_frame(reader: asyncio.StreamReader, decoder: MuxDecoder, frames: list[Any]) -> Any:
    while not frames:
        data = await reader.read(256 * 1024)
        if not data:
            if decoder.pending:
                raise RemoteProtocolError("keeper protocol: the keeper closed mid-frame")
            return None
        frames.extend(decoder.feed(data))
    return frames.pop(0)


def _transport_error(detail: dict[str, Any]) -> TransportError:
    message = str(detail.get("message") or "the stream failed")
    if detail.get("type") == "StreamReset":
        return StreamReset(message, int(detail.get("error_code") or 0))
    if detail.get("type") == "ConnectionLost":
        return ConnectionLost(message, hint=detail.get("hint"))
    return TransportError(message, hint=detail.get("hint"))


def _as_transport(error: Any) -> TransportError:
    """An ERROR ending a stream request (the keeper could not connect, say), as the
    transport error the stream's users handle."""
    lost = ConnectionLost(error.message, hint=error.hint)
    lost.exit_code = error.exit_code
    return lost


__all__ = ["KeeperConnection", "KeeperStream"]
