"""The connection keeper: one attested, authenticated connection, shared by CLI calls.

Like ssh's ControlMaster. The first CLI call on a vault starts a keeper in the background
(``flyvault.cli.mux``, process ``flyvault.cli.keeperd``); later calls hand their request over a unix socket (``flyvault.client.mux``) and
pay neither QUIC's and crypto's imports nor a handshake and attestation. The wire format is
``flyvault.protocol.mux``.

Security, in the order a request meets it:

* the socket lives in a directory only its user can enter (0700) and is itself 0600;
* every accepted peer's uid is checked with ``SO_PEERCRED``: another user (root included)
  is refused with a message, even if the modes were loosened;
* the access token never crosses the socket: the keeper read it from the config itself.

The keeper exits when it has been idle (no request in progress) for ``idle_seconds``, when
its connection to the vault is lost while idle (the next call starts a fresh keeper), on a
``stop`` request and on SIGTERM/SIGINT. It removes its socket and pid file on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from flyvault.client.exec_request import ExecRequest
from flyvault.config import VaultConfig
from flyvault.errors import RemoteProtocolError, VaultError
from flyvault.protocol.mux import (
    STDIN_IN_FLIGHT,
    MuxDecoder,
    MuxFrame,
    MuxKind,
    check_hello,
    encode,
    encode_json,
)

log = logging.getLogger("flyvault.keeper")

#: How long a new unix connection may take to send its HELLO.
HELLO_TIMEOUT = 10.0
#: A connection that received nothing for this long is asked (a PING) whether the vault
#: still answers before a request goes on it; its keep-alive PINGs are answered every 2 s.
PROBE_AFTER = 0.5
#: How long the vault has to answer that PING (a loopback answers in microseconds, a
#: distant one in a round trip).
PROBE_TIMEOUT = 1.5
#: Output is sent in frames of at most this much.
CHUNK = 256 * 1024
_UCRED = struct.Struct("3i")


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (Linux ``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)


class _Link:
    """One CLI process's unix connection: frames in and out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = MuxDecoder()
        self._frames: list[MuxFrame] = []

    async def receive(self) -> MuxFrame | None:
        """The next frame, or None when the CLI process closed its end."""
        while not self._frames:
            data = await self.reader.read(CHUNK)
            if not data:
                if self.decoder.pending:
                    raise RemoteProtocolError("keeper protocol: the CLI closed mid-frame")
                return None
            self._frames = self.decoder.feed(data)
        return self._frames.pop(0)

    async def send(self, frame: bytes) -> None:
        self.writer.write(frame)
        await self.writer.drain()

    def send_nowait(self, frame: bytes) -> None:
        """For notices from callbacks: queued, flushed by the next ``send``'s drain."""
        if not self.writer.is_closing():
            self.writer.write(frame)

    async def send_data(self, kind: MuxKind, data: bytes) -> None:
        for start in range(0, len(data), CHUNK):
            await self.send(encode(kind, data[start : start + CHUNK]))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


class _FrameFrontend:
    """A ``SessionFrontend`` whose terminal is a CLI process at the other end of a ``_Link``."""

    def __init__(self, link: _Link, hello: dict[str, Any]) -> None:
        self.link = link
        self.interactive = bool(hello.get("interactive"))
        request = hello.get("request") or {}
        self._size = (int(request.get("rows") or 0), int(request.get("cols") or 0))
        self._on_resize: Callable[[int, int], None] | None = None
        self._deliver: Callable[[bytes], Awaitable[None]] | None = None
        self._on_eof: Callable[[], None] | None = None
        self._stdin_wanted = asyncio.Event()

    def notice(self, message: str) -> None:
        self.link.send_nowait(encode_json(MuxKind.NOTICE, {"message": message}))

    def on_reader_gone(self, callback: Callable[[], None]) -> None:
        """The CLI at the other end sees its reader leave and acts itself (a ``kill``
        request, or it leaves): nothing to watch here."""

    def on_interrupt(self, callback: Callable[[], None]) -> None:
        """Ctrl-C reaches the CLI at the other end, which acts itself (a ``kill`` request
        with SIGINT, or it leaves): nothing to watch here."""

    async def write_stdout(self, data: bytes) -> None:
        await self.link.send_data(MuxKind.STDOUT, data)

    async def write_stderr(self, data: bytes) -> None:
        await self.link.send_data(MuxKind.STDERR, data)

    async def flush(self) -> None:
        await self.link.writer.drain()

    @contextlib.contextmanager
    def raw(self) -> Iterator[None]:
        self.link.send_nowait(encode_json(MuxKind.RAW, {"on": True}))
        try:
            yield
        finally:
            self.link.send_nowait(encode_json(MuxKind.RAW, {"on": False}))

    def terminal_size(self) -> tuple[int, int]:
        return self._size

    def on_resize(self, callback: Callable[[int, int], None]) -> None:
        self._on_resize = callback

    def start_stdin(
        self, deliver: Callable[[bytes], Awaitable[None]], on_eof: Callable[[], None]
    ) -> None:
        self._deliver, self._on_eof = deliver, on_eof
        self._stdin_wanted.set()

    async def pump(self, forward_stdin: bool) -> None:
        """Read the CLI's frames for the whole request, always, so the CLI leaving (Ctrl-C,
        a kill) is seen at once whatever else waits. Stdin goes through a queue to
        ``_feed``, held back until the session takes it and while the vault does not read
        it. The queue stays small because the CLI sends at most ``STDIN_IN_FLIGHT``
        chunks that ``_feed`` has not acknowledged (STDIN_TAKEN). Ends with ``_CliLeft``."""
        stdin: asyncio.Queue[bytes | None] = asyncio.Queue()
        feeder = asyncio.ensure_future(self._feed(stdin)) if forward_stdin else None
        try:
            while (frame := await self.link.receive()) is not None:
                if frame.kind in (MuxKind.STDIN, MuxKind.STDIN_EOF):
                    if feeder is None:
                        continue
                    if stdin.qsize() > STDIN_IN_FLIGHT:
                        raise RemoteProtocolError(
                            f"keeper protocol: more than {STDIN_IN_FLIGHT} stdin chunks unacknowledged"
                        )
                    stdin.put_nowait(frame.payload if frame.kind is MuxKind.STDIN else None)
                elif frame.kind is MuxKind.RESIZE:
                    size = frame.json()
                    self._size = (int(size["rows"]), int(size["cols"]))
                    if self._on_resize is not None:
                        self._on_resize(*self._size)
                else:
                    raise RemoteProtocolError(f"keeper protocol: unexpected {frame.kind.name}")
        finally:
            if feeder is not None:
                feeder.cancel()
        raise _CliLeft()

    async def _feed(self, stdin: asyncio.Queue[bytes | None]) -> None:
        await self._stdin_wanted.wait()
        assert self._deliver is not None and self._on_eof is not None
        while (data := await stdin.get()) is not None:
            await self._deliver(data)  # waits while the vault does not read
            self.link.send_nowait(encode(MuxKind.STDIN_TAKEN))
        self._on_eof()


class _CliLeft(Exception):
    """The CLI process closed its end (it exited, was killed, or the user hit Ctrl-C)."""


class Keeper:
    def __init__(
        self,
        config: VaultConfig,
        listener: socket.socket,
        *,
        idle_seconds: float,
        paths: tuple[Path, ...] = (),
    ) -> None:
        from flyvault.client.vault import Vault

        self.config = config
        self.listener = listener
        self.idle_seconds = idle_seconds
        self.paths = paths  # the socket and pid file, removed on the way out
        self.started_at = time.time()
        self.requests = 0
        self.refused = 0
        self._active: set[_Link] = set()
        self._idle_since = time.monotonic()
        self._stop = asyncio.Event()
        self._closing = False
        self._was_connected = False
        #: Links serving exec requests: the ones vault notices and progress go to.
        self._terminals: set[_Link] = set()
        self.vault = Vault(
            config, on_notice=self._broadcast, on_event=self._event, progress=self._progress
        )

    # Vault callbacks go to every CLI process being served ---------------------------------

    def _broadcast(self, message: str) -> None:
        for link in list(self._terminals):
            link.send_nowait(encode_json(MuxKind.NOTICE, {"message": message}))

    def _event(self, event: Any) -> None:
        self._broadcast(event.message)

    def _progress(self, phase: str, done: int, total: int) -> None:
        frame = encode_json(MuxKind.PROGRESS, {"phase": phase, "done": done, "total": total})
        for link in list(self._terminals):
            link.send_nowait(frame)

    # Serving ----------------------------------------------------------------------------

    async def serve(self, *, warm: bool = False) -> None:
        """Serve until stopped, idle or lost. ``warm``: connect at once (the keeper was
        started in the background by a call that went direct), and exit if that fails,
        since nothing would be kept."""
        loop = asyncio.get_running_loop()
        for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signo, self._stop.set)
        server = await asyncio.start_unix_server(self._accept, sock=self.listener)
        log.info("keeper for vault %s: serving (pid %d)", self.config.name, os.getpid())
        warming = asyncio.ensure_future(self._warm()) if warm else None
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
                reason = self._exit_reason()
                if reason:
                    log.info("keeper for vault %s: exiting: %s", self.config.name, reason)
                    break
        finally:
            if warming is not None and not warming.done():
                warming.cancel()
            self._closing = True  # before any await: nothing is accepted from here on
            self._remove_paths()  # new CLI calls go elsewhere from now on
            server.close()
            for link in list(self._active):
                await link.close()
            await self.vault.close()

    async def _warm(self) -> None:
        try:
            await self.vault.connection()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info(
                "keeper for vault %s: exiting: could not connect: %s",
                self.config.name,
                getattr(exc, "message", None) or exc,
            )
            self._stop.set()

    def _exit_reason(self) -> str | None:
        if self._active:
            return None
        idle = time.monotonic() - self._idle_since
        if idle >= self.idle_seconds:
            return f"idle for {idle:.0f} s"
        if self.vault.current is not None:
            self._was_connected = True
        elif self._was_connected:
            return "the connection to the vault was lost"
        return None

    def _remove_paths(self) -> None:
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(reader, writer)
        try:
            request = await self._admit(link)
            if request is None:
                return
            await self._serve_request(link, request)
        finally:
            self._active.discard(link)
            if not self._active:
                self._idle_since = time.monotonic()
            await link.close()

    async def _admit(self, link: _Link) -> dict[str, Any] | None:
        """Check the peer and read its HELLO; the request, once ACCEPTED is sent, or None.
        Nothing here acts on anything: a refusal or a failure leaves the CLI free to go
        elsewhere."""
        try:
            uid = peer_uid(link.writer.get_extra_info("socket"))
            if uid != os.getuid():
                self.refused += 1
                log.warning("keeper: refused a connection from uid %d", uid)
                await link.send(_error_frame(_refusal(uid)))
                return None
            hello = await asyncio.wait_for(link.receive(), HELLO_TIMEOUT)
            if hello is None:
                return None
            if hello.kind is not MuxKind.HELLO:
                raise RemoteProtocolError(f"keeper protocol: {hello.kind.name} before HELLO")
            request = check_hello(hello.json())
            if self._closing:  # on the way out: say nothing, the CLI goes elsewhere
                return None
            # No await between the check above and these: the keeper cannot start closing
            # in between, so an accepted request is always served.
            self._active.add(link)
            self.requests += 1
            link.send_nowait(encode(MuxKind.ACCEPTED))
            return request
        except (TimeoutError, ConnectionError, OSError):
            return None
        except VaultError as exc:
            with contextlib.suppress(ConnectionError, OSError):
                await link.send(_error_frame(exc))
            return None

    async def _serve_request(self, link: _Link, request: dict[str, Any]) -> None:
        try:
            await self._dispatch(link, request)
        except _CliLeft:
            pass
        except VaultError as exc:
            with contextlib.suppress(ConnectionError, OSError):
                await link.send(_error_frame(exc))
        except (ConnectionResetError, BrokenPipeError):
            pass  # the CLI went away while we wrote to it
        except Exception:  # a bug, or an error the client layer did not map: say so
            log.exception("keeper: request %s failed", request.get("op"))
            with contextlib.suppress(ConnectionError, OSError):
                await link.send(_error_frame(VaultError("the connection keeper failed")))

    async def _live_connection(self) -> Any:
        """The vault connection, checked when it sat idle: a vault that restarted since
        (the old connection not closed with a word) would swallow the request. A failed
        check reconnects before anything is sent."""
        connection = await self.vault.connection()
        channel = getattr(connection, "channel", None)
        loop = asyncio.get_running_loop()
        if channel is None or loop.time() - channel.last_received < PROBE_AFTER:
            return connection
        if await channel.probe(PROBE_TIMEOUT):
            return connection
        log.info(
            "keeper for vault %s: the connection did not answer; reconnecting", self.config.name
        )
        self.vault.invalidate(connection)
        return await self.vault.connection()

    async def _dispatch(self, link: _Link, request: dict[str, Any]) -> None:
        op = request["op"]
        if op == "exec":
            # Registered first: the connecting (and its notices) is this CLI's to see.
            self._terminals.add(link)
            try:
                value: Any = await self._exec(link, request)
            finally:
                self._terminals.discard(link)
            await link.send(encode_json(MuxKind.RESULT, {"value": value}))
            return
        if op in ("list", "kill", "connect", "stream"):
            await self._live_connection()
        if op == "list":
            value = await self.vault.list_sessions()
        elif op == "kill":
            await self.vault.kill(str(request["session_id"]), int(request["signal"]))
            value = None
        elif op == "status":
            value = self.status()
        elif op == "ping":
            value = {**self.status(), **await self.ping()}
        elif op == "connect":
            # The CLI holds this request open while it uses the connection (its lease):
            # RESULT now, then wait for its end. Counted as active, so no idle exit.
            info = connection_info(await self.vault.connection())
            await link.send(encode_json(MuxKind.RESULT, {"value": info}))
            await _held_until_closed(link)
            return
        elif op == "stream":
            value = await _relay_stream(link, await self.vault.connection(), request)
        else:  # stop
            self._stop.set()
            value = None
        await link.send(encode_json(MuxKind.RESULT, {"value": value}))

    async def _exec(self, link: _Link, hello: dict[str, Any]) -> int:
        from flyvault.client.session import ExecSession
        from flyvault.client.session_runner import follow, remember_shown

        request = ExecRequest.from_fields(hello.get("request"))
        frontend = _FrameFrontend(link, hello)
        from_start = bool(hello.get("from_start"))
        request, hooks, seen = follow(
            self.config.name,
            request,
            frontend,
            frontend.notice,
            from_start=from_start,
            boot=lambda: getattr(self.vault.current, "boot_id", None),
        )
        session = ExecSession(self.vault, request, hooks)
        forward_stdin = bool(hello.get("forward_stdin"))
        # The CLI leaving (Ctrl-C, a kill) ends the session's attachment, as the end of a
        # direct CLI process does: the pump sees it while connecting and while running.
        pump = asyncio.ensure_future(frontend.pump(forward_stdin))
        run = asyncio.ensure_future(
            self._connect_and_run(session, request, frontend, forward_stdin)
        )
        try:
            await asyncio.wait({pump, run}, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                return run.result()
            run.cancel()
            await asyncio.wait({run})
            pump.result()  # raises: _CliLeft, or the CLI broke the protocol
            raise _CliLeft()
        finally:
            for task in (pump, run):
                if not task.done():
                    task.cancel()
            remember_shown(self.config.name, request, seen)

    async def _connect_and_run(
        self, session: Any, request: ExecRequest, frontend: _FrameFrontend, forward_stdin: bool
    ) -> int:
        from flyvault.client.session_runner import run_attached

        await self._live_connection()
        return await run_attached(session, request, frontend, self.config.name, forward_stdin)

    async def ping(self) -> dict[str, Any]:
        """One PING over the live vault connection, the way ``_live_connection`` checks an
        idle one (``channel.probe``), for ``fly-vault doctor``: whether the vault answered
        within ``PROBE_TIMEOUT`` and the round trip in ms. It never connects, reconnects or
        drops the connection: a request after it checks the connection on its own."""
        current = self.vault.current
        channel = getattr(current, "channel", None)
        result: dict[str, Any] = {
            "answered": None,
            "rtt_ms": None,
            "probe_timeout": PROBE_TIMEOUT,
        }
        if channel is None:
            return result
        sent = asyncio.get_running_loop().time()
        answered = await channel.probe(PROBE_TIMEOUT)
        result["answered"] = answered
        if answered:
            # The first datagram after the PING (its ACK, usually) was stamped on arrival.
            result["rtt_ms"] = max(0.0, (channel.last_received - sent) * 1000)
        return result

    def status(self) -> dict[str, Any]:
        current = self.vault.current
        return {
            "vault": self.config.name,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "idle_seconds": self.idle_seconds,
            "requests": self.requests,
            "active": len(self._active),
            "refused": self.refused,
            "connected": current is not None,
            "connects": self.vault.connects,
            "boot_id": getattr(current, "boot_id", None),
        }


async def _held_until_closed(link: _Link) -> None:
    """Until the CLI closes its end of a leased request (or the keeper closes it)."""
    with contextlib.suppress(ConnectionError, OSError, RemoteProtocolError):
        while await link.receive() is not None:
            pass


def connection_info(connection: Any) -> dict[str, Any]:
    """What a CLI using the keeper's streams needs to know about its connection."""
    import dataclasses

    from flyvault.protocol.constants import PROTOCOL_VERSION

    claims = getattr(connection, "claims", None)
    return {
        "boot_id": connection.boot_id,
        # What the attestation verified (no secrets in it): status reports show it.
        "claims": dataclasses.asdict(claims) if dataclasses.is_dataclass(claims) else None,
        "protocol_version": getattr(connection, "protocol_version", PROTOCOL_VERSION),
        "vm_state": int(connection.vm_state),
        "runtime_status": int(connection.runtime_status),
    }


async def _relay_stream(link: _Link, connection: Any, request: dict[str, Any]) -> dict[str, int]:
    """Relay one vault stream of ``request["tag"]`` between the CLI and the connection,
    both directions independently, until both are done; the byte counts."""
    from flyvault.protocol.constants import StreamTag

    try:
        tag = StreamTag(int(request["tag"]))
    except (KeyError, TypeError, ValueError):
        raise RemoteProtocolError(
            f"keeper protocol: no stream tag {request.get('tag')!r}"
        ) from None
    stream = connection.open_stream(tag)
    counts = {"up": 0, "down": 0}
    sent = asyncio.Event()  # the CLI ended its side (or it failed): only ABORT may follow
    #: The CLI ended its side with STDIN_EOF, all of it handed to the stream: if the CLI
    #: leaves now, what it wrote (an exec's EXIT_ACK) must still reach the vault, so the
    #: stream only stops reading; an abort would reset it and drop the unsent bytes.
    clean = asyncio.Event()
    up = asyncio.ensure_future(_relay_up(link, stream, counts, sent, clean))
    down = asyncio.ensure_future(_relay_down(link, stream, counts))
    ended = asyncio.ensure_future(sent.wait())
    completed = False
    try:
        # Done when the vault's side reached its end and ours was ended; until then the
        # up task also watches for ABORT and for the CLI leaving (it raises _CliLeft).
        await _first_error_or_all(up, down, ended)
        completed = True
    finally:
        for task in (up, down, ended):
            task.cancel()
        if not completed:
            _give_up(stream, clean.is_set())
    return counts


def _give_up(stream: Any, sent_cleanly: bool) -> None:
    """End a relayed stream the CLI left: stop reading, and reset our sending side only if
    the CLI did not end it cleanly."""
    if sent_cleanly:
        stream.stop()
    else:
        stream.abort()


async def _first_error_or_all(up: asyncio.Task[None], *others: asyncio.Future[Any]) -> None:
    """Wait for ``others``; ``up`` ending first (an ABORT, the CLI gone) ends the wait,
    with its exception if any."""
    pending: set[asyncio.Future[Any]] = {up, *others}
    while any(not task.done() for task in others):
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if up in done:
            return


async def _relay_up(
    link: _Link, stream: Any, counts: dict[str, int], sent: asyncio.Event, clean: asyncio.Event
) -> None:
    """CLI -> vault. After STDIN_EOF, or a failed sending side (reported with FAILED), the
    CLI's frames are read and dropped; an ABORT still resets the stream."""
    from flyvault.errors import TransportError

    failed = False
    while (frame := await link.receive()) is not None:
        if failed:
            sent.set()
            if frame.kind is MuxKind.ABORT:
                stream.abort()
                return
            continue
        try:
            if frame.kind is MuxKind.STDIN:
                stream.write(frame.payload)
                counts["up"] += len(frame.payload)
                await stream.drain()
            elif frame.kind is MuxKind.STDIN_EOF:
                stream.write_eof()
                failed = True  # our side is done: from here on only ABORT or the end
                clean.set()
                sent.set()
            elif frame.kind is MuxKind.ABORT:
                stream.abort()
                return
            else:
                raise RemoteProtocolError(f"keeper protocol: unexpected {frame.kind.name}")
        except TransportError as exc:
            failed = True
            sent.set()
            await link.send(_failed_frame(exc, sending=True))
    _give_up(stream, clean.is_set())  # the CLI went away
    raise _CliLeft()


async def _relay_down(link: _Link, stream: Any, counts: dict[str, int]) -> None:
    """Vault -> CLI, with the CLI's socket as the backpressure."""
    from flyvault.errors import TransportError

    try:
        while data := await stream.read(CHUNK):
            counts["down"] += len(data)
            await link.send(encode(MuxKind.STDOUT, data))
    except TransportError as exc:
        await link.send(_failed_frame(exc, sending=False))
        return
    await link.send(encode(MuxKind.EOF))


def _failed_frame(error: VaultError, *, sending: bool) -> bytes:
    return encode_json(
        MuxKind.FAILED,
        {
            "type": type(error).__name__,
            "message": error.message,
            "hint": error.hint,
            "exit_code": error.exit_code,
            "error_code": getattr(error, "error_code", None),
            "sending": sending,
        },
    )


def _refusal(uid: int) -> VaultError:
    return VaultError(
        f"the connection keeper belongs to uid {os.getuid()}; uid {uid} was refused",
        hint="each user runs their own keeper: run fly-vault as yourself",
    )


def _error_frame(error: VaultError) -> bytes:
    return encode_json(
        MuxKind.ERROR,
        {
            "type": type(error).__name__,
            "message": error.message,
            "hint": error.hint,
            "exit_code": error.exit_code,
        },
    )


def dumps_status(status: dict[str, Any]) -> str:
    return json.dumps(status, sort_keys=True)


__all__ = ["Keeper", "peer_uid"]
