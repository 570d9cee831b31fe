"""Port forwards end to end over real QUIC on 127.0.0.1.

Local TCP client -> ForwardListener -> QUIC (attested, authenticated) -> in-process
VaultServer -> handle_forward -> a real TCP target, all in the test's event loop and on
loopback only. Every scenario also checks that no file descriptor was leaked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, ScriptedAttestor, run_async, vault_entry

from flyvault.client.connection import VaultConnection, open_vault
from flyvault.client.forward import ForwardListener
from flyvault.config import ForwardSpec
from flyvault.errors import UsageError
from flyvault.protocol.constants import StreamTag
from flyvault.server.app import ServerConnection, ServerOptions, VaultServer
from flyvault.server.auth import AccessToken
from flyvault.server.forward import handle_forward
from flyvault.standins import OidcIssuer
from flyvault.transport import QuicChannel, QuicStream, connect, listen
from flyvault.transport.relay import relay

MiB = 1024 * 1024
CHUNK = 64 * 1024
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def pattern(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def read_all(reader: asyncio.StreamReader, limit: int, timeout: float = 30.0) -> bytes:
    """Read to EOF; bounded in size (fails past ``limit``) and in time."""
    data = bytearray()
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(CHUNK):
            data += chunk
            assert len(data) <= limit, f"more than the {limit} bytes expected"
    return bytes(data)


async def write_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    for offset in range(0, len(data), CHUNK):
        writer.write(data[offset : offset + CHUNK])
        await writer.drain()


async def expect_closed(reader: asyncio.StreamReader, timeout: float = 10.0) -> str:
    """The tunnel's local socket must end: EOF or a reset, never silence."""
    try:
        async with asyncio.timeout(timeout):
            rest = await reader.read()
    except ConnectionResetError:
        return "reset"
    assert rest == b""
    return "eof"


class Target:
    """A real TCP server on 127.0.0.1; ``handler`` runs per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.accepted = 0

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> Target:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Our own task (not asyncio's wrapper, which logs an error when cancelled).
        task = asyncio.get_running_loop().create_task(self._run(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.accepted += 1

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.handler(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


class Provider:
    """What the CLI's reconnecting ``Vault`` does, minimally: reopen a closed connection."""

    def __init__(self, entry: Any) -> None:
        self.entry = entry
        self.current: VaultConnection | None = None
        self.opened = 0
        self.streams: list[QuicStream] = []
        self._lock = asyncio.Lock()

    async def __call__(self) -> VaultConnection:
        async with self._lock:  # one connect at a time, as the real provider does
            if self.current is None or self.current.is_closed:
                connection = await open_vault(self.entry)
                self._record_streams(connection)
                self.current = connection
                self.opened += 1
            return self.current

    def _record_streams(self, connection: VaultConnection) -> None:
        # Tests peek at the client-side streams (queued bytes) through this wrapper.
        original = connection.open_stream

        def open_stream(tag: StreamTag) -> QuicStream:
            stream = original(tag)
            self.streams.append(stream)
            return stream

        connection.open_stream = open_stream  # type: ignore[method-assign]

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


@dataclass
class Rig:
    server: VaultServer
    provider: Provider
    events: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    listeners: list[ForwardListener] = field(default_factory=list)
    #: (server connection, server-side stream) of every forward the server handled.
    served: list[tuple[ServerConnection, QuicStream]] = field(default_factory=list)

    async def target(self, handler: Handler) -> Target:
        target = await Target(handler).start()
        self.targets.append(target)
        return target

    async def listen(self, host: str, port: int) -> ForwardListener:
        # ForwardSpec holds ports 1-65535 only: the placeholder 1 is overridden by 0.
        listener = ForwardListener(
            ForwardSpec(1, host, port), self.provider, on_event=self.events.append, local_port=0
        )
        await listener.start()
        self.listeners.append(listener)
        return listener


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer) -> AsyncIterator[Rig]:
    fds = open_fds()
    options = ServerOptions(
        listen_host="127.0.0.1", listen_port=0, data_dir=tmp_path, host_mode=True
    )
    server = VaultServer(options, AccessToken(TOKEN), attestor)
    await server.start()
    assert server.listener is not None
    provider = Provider(vault_entry(server.listener.address[1], issuer))
    setup = Rig(server, provider)

    async def recording(connection: ServerConnection, stream: QuicStream, initial: bytes) -> None:
        setup.served.append((connection, stream))
        await handle_forward(connection, stream, initial)

    server.handlers[StreamTag.PORT_FORWARD] = recording
    try:
        yield setup
    finally:
        for listener in setup.listeners:
            await listener.close()
        provider.close()
        server.close()
        for target in setup.targets:
            await target.close()
    # Only on success: sockets close a loop iteration or two after their owners let go.
    deadline = time.monotonic() + 30
    while open_fds() > fds and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert open_fds() <= fds, f"{open_fds() - fds} file descriptors leaked"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await reader.read()  # wait for the tunnel to close its side
    writer.close()


async def echo_round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def send() -> None:
            await write_all(writer, payload)
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        received = await read_all(reader, len(payload))
        await sender
        return received
    finally:
        writer.close()


# Tests ------------------------------------------------------------------------------------


def test_echo_5mb_round_trip(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer
) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, attestor, issuer) as setup:
            target = await setup.target(echo)
            listener = await setup.listen("127.0.0.1", target.port)
            payload = pattern(5 * MiB)
            started = time.perf_counter()
            received = await echo_round_trip(listener.port, payload)
            elapsed = time.perf_counter() - started
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            print(f"\n5 MiB echo: {elapsed:.2f} s, {5 / elapsed:.1f} MiB/s each way")
            assert setup.events == []
            assert listener.total == 1

    run_async(scenario(), timeout=90)


def test_client_half_close_still_gets_full_response(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer
) -> None:
    response = pattern(2 * MiB, seed=7)

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_all(reader, 2 * MiB)  # only ends when the client half-closed
        writer.write(hashlib.sha256(request).digest())
        await write_all(writer, response)
        writer.close()
        await writer.wait_closed()

    async def scenario() -> None:
        async with rig(tmp_path, attestor, issuer) as setup:
            target = await setup.target(answer_after_eof)
            listener = await setup.listen("127.0.0.1", target.port)
            request = pattern(MiB, seed=3)
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            await write_all(writer, request)
            writer.write_eof()  # half-close: the original's bridge died right here (B3)
            got = await read_all(reader, 3 * MiB)
            writer.close()
            assert got[:32] == hashlib.sha256(request).digest()
            assert got[32:] == response
            assert setup.events == []

    run_async(scenario())


def test_target_half_close_while_client_still_sends(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer
) -> None:
    greeting = pattern(256 * 1024, seed=1)
    received: asyncio.Future[bytes] | None = None

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await write_all(writer, greeting)
        writer.write_eof()  # the target is done talking but keeps listening
        data = await read_all(reader, 4 * MiB)
        assert received is not None
        received.set_result(data)
        writer.close()

    async def scenario() -> None:
        nonlocal received
        received = asyncio.get_running_loop().create_future()
        async with rig(tmp_path, attestor, issuer) as setup:
            target = await setup.target(greet_then_listen)
            listener = await setup.listen("127.0.0.1", target.port)
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            assert await read_all(reader, MiB) == greeting  # EOF seen
            upload = pattern(2 * MiB, seed=2)
            await write_all(writer, upload)  # still accepted after the other side's EOF
            writer.write_eof()
            assert await asyncio.wait_for(received, 30) == upload
            await expect_closed(reader)
            writer.close()
            assert setup.events == []
            for _ in range(600):  # up to 30 s
                if listener.active == 0:
                    break
                await asyncio.sleep(0.05)
            assert listener.active == 0

    run_async(scenario())


def test_connect_refused_is_reported_and_local_socket_closed(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer
) -> None:
    async def scenario() -> None:
        # A bound but not listening socket: connecting to it is refused, and nobody else
        # can take the port while we hold it.
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            port = holder.getsockname()[1]
            async with rig(tmp_path, attestor, issuer) as setup:
                listener = await setup.listen("127.0.0.1", port)
                reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
                writer.write(b"GET / HTTP/1.0\r\n\r\n")  # pipelined behind OPEN
                await expect_closed(reader)
                writer.close()
                assert setup.events == [
                    f"forward {listener.port}:127.0.0.1:{port}: "
                    f"cannot connect to 127.0.0.1:{port}: connection refused"
                ]
                # The listener is still there: a second try gets the same clear answer.
                reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
                await expect_closed(reader)
                writer.close()
                assert len(setup.events) == 2

    run_async(scenario())


def test_unresolvable_host_is_reported(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer
) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, attestor, issuer) as setup:
            listener = await setup.listen("no-such-host.invalid", 80)
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            await expect_closed(reader, timeout=20)
            writer.close()
            assert len(setup.events) == 1
            assert setup.events[0].endswith(
                "cannot connect to no-such-host.invalid:80: name does not resolve"
            ), setup.events

    run_async(scenario())


def test_local_port_in_use_is_a_usage_error() -> None:
    async def scenario() -> None:
        fds = open_fds()
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]

            async def never() -> VaultConnection:
                raise AssertionError("no connection is needed to bind")

            listener = ForwardListener(ForwardSpec(port, "127.0.0.1", 80), never)
            with pytest.raises(UsageError) as caught:
                await listener.start()
            assert caught.value.message == f"local port {port} is already in use (127.0.0.1:{port})"
            assert caught.value.hint and str(port) in caught.value.hint
            await listener.close()
        assert open_fds() <= fds

    run_async(scenario())


def test_forwards_survive_a_lost_connection(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer
) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, attestor, issuer) as setup:
            target = await setup.target(echo)
            listener = await setup.listen("127.0.0.1", target.port)
            assert await echo_round_trip(listener.port, b"first") == b"first"
            # A tunnel that is open when the connection goes away.
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
            assert setup.provider.current is not None
            setup.provider.current.close()
            assert await expect_closed(reader) == "reset"
            writer.close()
            assert any("connection to the vault lost" in event for event in setup.events)
            # Same listener, fresh connection.
            assert await echo_round_trip(listener.port, b"second") == b"second"
            assert setup.provider.opened == 2
            assert listener.total == 3

    run_async(scenario())


def test_target_reset_reaches_the_local_client_as_reset(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer
) -> None:
    async def reset_after_request(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def scenario() -> None:
        async with rig(tmp_path, attestor, issuer) as setup:
            target = await setup.target(reset_after_request)
            listener = await setup.listen("127.0.0.1", target.port)
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"hello")
            assert await expect_closed(reader) == "reset"
            writer.close()
            assert setup.events == []  # a reset is ordinary TCP life, not an error to show

    run_async(scenario())


def test_twenty_concurrent_connections(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer
) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, attestor, issuer) as setup:
            target = await setup.target(echo)
            listener = await setup.listen("127.0.0.1", target.port)
            payloads = [pattern(200_000 + i, seed=i) for i in range(20)]
            results = await asyncio.gather(*(echo_round_trip(listener.port, p) for p in payloads))
            assert results == payloads
            assert listener.total == 20
            assert setup.provider.opened == 1
            assert target.accepted == 20
            assert setup.events == []

    run_async(scenario(), timeout=90)


def test_close_tears_down_live_tunnels(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer
) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, attestor, issuer) as setup:
            target = await setup.target(echo)
            listener = await setup.listen("127.0.0.1", target.port)
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
            assert listener.active == 1
            port = listener.port
            await listener.close()
            assert listener.active == 0
            await expect_closed(reader)
            writer.close()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)

    run_async(scenario())


# Backpressure -----------------------------------------------------------------------------

FLOOD = 50 * MiB
#: Client receive window (1 MiB) + server high-water mark (512 KiB) + chunks in flight.
HELD_BOUND = 3 * MiB
#: Everything Python allocated (both ends, aioquic, asyncio buffers) while the reader slept.
ALLOCATED_BOUND = 16 * MiB


@dataclass
class SlowReader:
    held_max: int
    allocated_peak: int
    target_sent: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    digest: asyncio.Future[bytes]


async def slow_reader(
    setup: Rig, pause: float = 2.0, until: Callable[[int, int], bool] | None = None
) -> SlowReader:
    """The target floods, the local client reads nothing for ``pause`` s: what is held?

    With ``until(held_max, allocated_peak)`` the reader sleeps until that holds instead, for
    at most ``pause`` s: a control run waits for the bound to break rather than hoping it
    breaks within a fixed window (a loaded machine moves fewer bytes per second).
    """
    sent = 0
    digest: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        chunk = pattern(CHUNK, seed=9)
        hasher = hashlib.sha256()
        for _ in range(FLOOD // CHUNK):
            writer.write(chunk)
            hasher.update(chunk)
            sent += len(chunk)
            await writer.drain()
        digest.set_result(hasher.digest())
        writer.close()
        await writer.wait_closed()

    target = await setup.target(flood)
    listener = await setup.listen("127.0.0.1", target.port)
    # A small receive buffer, so that the kernel cannot soak up what the relay should hold
    # back: a missing drain on the local side must show up in Python memory.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", listener.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
    except BaseException:
        sock.close()
        raise
    async with asyncio.timeout(30):
        while not (setup.served and setup.provider.streams and sent):
            await asyncio.sleep(0.01)
    connection, served = setup.served[-1]
    held_max = 0
    tracemalloc.start()
    try:
        deadline = time.monotonic() + pause
        for _ in range(int(pause / 0.02) + 1):
            if time.monotonic() >= deadline:
                break
            # Unacknowledged on the server + received but not yet written to the local
            # socket on the client (its QUIC queue and its TCP write buffer).
            held = connection.channel.buffered(served.stream_id) + served.queued
            held += listener.buffered
            held_max = max(held_max, held)
            if until is not None and until(held_max, tracemalloc.get_traced_memory()[1]):
                break
            await asyncio.sleep(0.02)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return SlowReader(held_max, peak, sent, reader, writer, digest)


def test_slow_reader_holds_bounded_memory(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer
) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, attestor, issuer) as setup:
            result = await slow_reader(setup)
            print(
                f"\nslow reader: held at most {result.held_max / MiB:.2f} MiB in QUIC buffers, "
                f"{result.allocated_peak / MiB:.2f} MiB allocated, target sent "
                f"{result.target_sent / MiB:.1f} MiB while the reader slept"
            )
            assert result.held_max <= HELD_BOUND
            assert result.allocated_peak <= ALLOCATED_BOUND
            assert result.target_sent < FLOOD // 2, "the target should have been blocked"
            # Then everything arrives, intact.
            started = time.perf_counter()
            hasher = hashlib.sha256()
            total = 0
            async with asyncio.timeout(60):
                while chunk := await result.reader.read(CHUNK):
                    hasher.update(chunk)
                    total += len(chunk)
            elapsed = time.perf_counter() - started
            result.writer.close()
            print(
                f"then {total / MiB:.0f} MiB in {elapsed:.2f} s ({total / MiB / elapsed:.1f} MiB/s)"
            )
            assert total == FLOOD
            assert hasher.digest() == await result.digest

    run_async(scenario(), timeout=110)


def test_slow_reader_bound_catches_a_relay_without_backpressure(
    tmp_path: Path, attestor: ScriptedAttestor, issuer: OidcIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control experiment: the same measurement with QUIC drain disabled must exceed it."""

    async def no_drain(self: QuicStream) -> None:
        return None

    monkeypatch.setattr(QuicStream, "drain", no_drain)

    async def scenario() -> None:
        async with rig(tmp_path, attestor, issuer) as setup:
            result = await slow_reader(
                setup,
                pause=40,
                until=lambda held, peak: held > HELD_BOUND and peak > ALLOCATED_BOUND,
            )
            result.writer.transport.abort()
            print(
                f"\ncontrol, no QUIC drain: held {result.held_max / MiB:.1f} MiB, "
                f"{result.allocated_peak / MiB:.1f} MiB allocated"
            )
            assert result.held_max > HELD_BOUND
            assert result.allocated_peak > ALLOCATED_BOUND

    run_async(scenario())


@pytest.mark.parametrize("backpressure", [True, False], ids=["drain", "control-no-drain"])
def test_relay_holds_bounded_memory_towards_a_slow_local_socket(
    backpressure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The QUIC->TCP direction on its own: the kernel buffers of the local socket are made
    small, so a relay that wrote without ``StreamWriter.drain`` would pile up in Python.
    The control run (drain disabled) must break the bound the real run keeps."""
    if not backpressure:

        async def no_drain(self: asyncio.StreamWriter) -> None:
            return None

        monkeypatch.setattr(asyncio.StreamWriter, "drain", no_drain)

    async def scenario() -> None:
        fds = open_fds()
        flooding: list[asyncio.Task[None]] = []

        async def flood(stream: QuicStream) -> None:
            chunk = pattern(CHUNK, seed=5)
            for _ in range(FLOOD // CHUNK):
                await stream.send(chunk)  # the transport's own backpressure
            stream.write_eof()

        def on_channel(channel: QuicChannel) -> None:
            channel.on_stream = lambda s: flooding.append(asyncio.ensure_future(flood(s)))

        quic_listener = await listen("127.0.0.1", 0, on_channel)
        channel = await connect(*quic_listener.address)
        stream = channel.open_stream()
        stream.write(b"go")  # the server sees the stream with its first byte
        tcp_server = socket.create_server(("127.0.0.1", 0))
        local = socket.socket()
        local.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        local.connect(tcp_server.getsockname())
        sleeper, _ = tcp_server.accept()
        sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        local.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=local)
        task = asyncio.ensure_future(relay(stream, reader, writer))
        held_max = 0
        # The local program reads nothing: 2 s for the real run (it must stay bounded); the
        # control run goes on until it breaks the bound (at most 40 s: a loaded machine
        # moves fewer bytes in a fixed window).
        window = 2.0 if backpressure else 40.0
        try:
            for _ in range(int(window / 0.02)):
                held = stream.queued + writer.transport.get_write_buffer_size()
                held_max = max(held_max, held)
                if not backpressure and held_max > 2 * MiB:
                    break
                await asyncio.sleep(0.02)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for flooder in flooding:
                flooder.cancel()
            await asyncio.gather(*flooding, return_exceptions=True)
            channel.close_now()
            quic_listener.close()
            sleeper.close()
            tcp_server.close()
        print(f"\nrelay towards a sleeping socket held at most {held_max / MiB:.2f} MiB")
        if backpressure:
            # The QUIC receive window (1 MiB) + asyncio's high-water mark + a read chunk.
            assert held_max <= 1 * MiB + 2 * CHUNK + 64 * 1024
        else:
            assert held_max > 2 * MiB, "the control run should have broken the bound"
        deadline = time.monotonic() + 30
        while open_fds() > fds and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert open_fds() <= fds

    run_async(scenario())
