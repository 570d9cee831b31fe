"""QUIC transport on 127.0.0.1: exporter, backpressure, close without drain, keepalive."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import run_async

from flyvault.errors import ConnectError, ConnectionLost
from flyvault.transport import QuicChannel, QuicStream, TransportSettings, connect, listen
from flyvault.transport.channel import BULK_HIGH_WATER, BULK_LOW_WATER, BULK_RECEIVE_WINDOW
from flyvault.transport.endpoint import STREAM_WINDOW

LABEL = b"fly-vault-channel-binding"


async def echo_server(settings: TransportSettings | None = None) -> tuple[Any, list[QuicChannel]]:
    channels: list[QuicChannel] = []

    async def echo(stream: QuicStream) -> None:
        while data := await stream.read():
            await stream.send(data)
        stream.write_eof()

    def on_channel(channel: QuicChannel) -> None:
        channels.append(channel)
        channel.on_stream = lambda s: asyncio.ensure_future(echo(s))

    listener = await listen("127.0.0.1", 0, on_channel, settings)
    return listener, channels


def test_exporter_identical_on_both_ends_and_unique_per_connection() -> None:
    async def scenario() -> None:
        listener, server_channels = await echo_server()
        try:
            values = []
            for _ in range(3):
                client = await connect(*listener.address)
                stream = client.open_stream()
                await stream.send(b"ping", end_stream=True)
                assert await stream.read() == b"ping"
                mine = client.export_keying_material(LABEL, 32)
                theirs = server_channels[-1].export_keying_material(LABEL, 32)
                assert mine == theirs
                assert len(mine) == 32
                # A different label gives a different value (it is really an exporter).
                assert client.export_keying_material(b"other", 32) != mine
                values.append(mine)
                client.close_now()
            assert len(set(values)) == 3
        finally:
            listener.close()

    run_async(scenario())


def test_echo_of_large_payload_in_order() -> None:
    async def scenario() -> None:
        listener, _ = await echo_server()
        try:
            client = await connect(*listener.address)
            stream = client.open_stream()
            payload = bytes(range(256)) * 20_000  # 5 MiB

            async def writer() -> None:
                for i in range(0, len(payload), 65536):
                    await stream.send(payload[i : i + 65536])
                stream.write_eof()

            task = asyncio.ensure_future(writer())
            received = bytearray()
            while chunk := await stream.read():
                received += chunk
            await task
            assert bytes(received) == payload
            client.close_now()
        finally:
            listener.close()

    run_async(scenario(), timeout=120)


def test_slow_reader_bounds_memory_on_both_sides() -> None:
    """A peer that does not read: the writer blocks in drain, nothing grows without bound."""

    async def scenario() -> None:
        held: list[QuicStream] = []

        def on_channel(channel: QuicChannel) -> None:
            channel.on_stream = held.append  # accept, never read

        listener = await listen("127.0.0.1", 0, on_channel)
        try:
            client = await connect(*listener.address)
            stream = client.open_stream()
            sent = 0
            chunk = b"x" * 65536

            async def flood() -> None:
                nonlocal sent
                for _ in range(400):  # bounded: 25 MiB at most
                    await stream.send(chunk)
                    sent += len(chunk)

            task = asyncio.ensure_future(flood())
            await asyncio.sleep(1.5)
            assert not task.done(), "the writer should be blocked by backpressure"
            window = 1024 * 1024
            # Sent = receiver's window + our high-water mark (+ one chunk in flight).
            assert sent <= window + stream.high_water + 2 * len(chunk)
            assert client.buffered(stream.stream_id) <= stream.high_water + len(chunk) + window
            assert held[0].queued <= window
            # Reading releases the writer.
            got = 0
            while got < 3 * window:
                got += len(await held[0].read())
            await asyncio.sleep(0.2)
            assert sent > window + stream.high_water
            task.cancel()
            client.close_now()
        finally:
            listener.close()

    run_async(scenario())


def test_bulk_buffers_widen_one_streams_window_and_still_bound_it() -> None:
    """A file stream's receiver lets the peer have BULK_RECEIVE_WINDOW queued, not the
    default 1 MiB, and its writer keeps more unacknowledged; memory stays bounded, and the
    connection's other streams keep the default window."""

    async def scenario() -> None:
        held: list[QuicStream] = []

        def on_stream(stream: QuicStream) -> None:
            if stream.stream_id == 0:  # the client's first stream is its bulk one
                stream.use_bulk_buffers()
            held.append(stream)  # accept, never read (until asked to below)

        def on_channel(channel: QuicChannel) -> None:
            channel.on_stream = on_stream

        listener = await listen("127.0.0.1", 0, on_channel)
        try:
            client = await connect(*listener.address)
            chunk = b"x" * 65536
            sent: dict[int, int] = {}

            def opened() -> QuicStream:
                stream = client.open_stream()
                stream.write(chunk)  # the next open_stream gets the next stream id
                sent[stream.stream_id] = len(chunk)
                return stream

            bulk = opened()
            assert bulk.stream_id == 0
            bulk.use_bulk_buffers()
            assert (bulk.high_water, bulk.low_water) == (BULK_HIGH_WATER, BULK_LOW_WATER)
            plain = opened()

            async def flood(stream: QuicStream) -> None:
                for _ in range(400):  # bounded: 25 MiB at most
                    await stream.send(chunk)
                    sent[stream.stream_id] += len(chunk)

            tasks = [asyncio.ensure_future(flood(s)) for s in (bulk, plain)]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            # Until the bulk stream's receiver holds its whole wide window (it never reads).
            while not (len(held) == 2 and held[0].queued >= BULK_RECEIVE_WINDOW):
                assert loop.time() < deadline, f"stuck: {[s.queued for s in held]} {sent}"
                assert all(s.queued <= BULK_RECEIVE_WINDOW for s in held)
                await asyncio.sleep(0.01)
            assert held[0].queued == BULK_RECEIVE_WINDOW
            assert held[1].queued <= STREAM_WINDOW
            assert not any(task.done() for task in tasks), "both writers wait on backpressure"
            assert sent[bulk.stream_id] <= BULK_RECEIVE_WINDOW + BULK_HIGH_WATER + 2 * len(chunk)
            assert sent[plain.stream_id] <= STREAM_WINDOW + plain.high_water + 2 * len(chunk)
            # Reading moves the wide window on: the queue fills up to it again, no further.
            received = 0
            while received < STREAM_WINDOW:
                received += len(await held[0].read())
            while held[0].queued < BULK_RECEIVE_WINDOW:
                assert loop.time() < deadline, f"window not moved on: {held[0].queued} bytes"
                await asyncio.sleep(0.01)
            assert held[0].queued == BULK_RECEIVE_WINDOW
            for task in tasks:
                task.cancel()
            client.close_now()
        finally:
            listener.close()

    run_async(scenario())


def test_close_now_reaches_the_peer_without_waiting() -> None:
    async def scenario() -> None:
        listener, server_channels = await echo_server()
        try:
            client = await connect(*listener.address)
            stream = client.open_stream()
            await stream.send(b"hi")
            assert await stream.read() == b"hi"
            client.close_now(reason="one-shot done")
            assert client.is_closed
            server = server_channels[-1]
            await asyncio.wait_for(server.wait_closed(), 5)
            assert "one-shot done" in (server.close_reason or "")
            with pytest.raises(ConnectionLost):
                client.open_stream()
        finally:
            listener.close()

    run_async(scenario())


def test_keepalive_holds_an_idle_connection_open() -> None:
    async def scenario() -> None:
        # Pings every 0.2 s against a 2 s idle timeout: only a 1.8 s stall of the event loop
        # could close it, which even a loaded machine does not produce.
        server_settings = TransportSettings(idle_timeout=2.0, keepalive_interval=0.2)
        listener, _ = await echo_server(server_settings)
        try:
            alive = await connect(
                *listener.address, TransportSettings(idle_timeout=2.0, keepalive_interval=0.2)
            )
            await asyncio.sleep(4.5)  # more than twice the idle timeout, with no data
            assert not alive.is_closed
            stream = alive.open_stream()
            await stream.send(b"still here")
            assert await stream.read() == b"still here"
            alive.close_now()
        finally:
            listener.close()

    run_async(scenario())


def test_dead_peer_detected_by_idle_timeout(init_process: Any) -> None:
    async def scenario() -> None:
        client = await connect(
            init_process.host,
            init_process.port,
            TransportSettings(idle_timeout=1.0, keepalive_interval=0.25),
        )
        stream = client.open_stream()
        # The server dies without a word, as a VM that goes away does.
        init_process.process.kill()
        init_process.process.wait()
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(stream.read(), 10)
        assert client.is_closed

    run_async(scenario())


def test_handshake_timeout_when_nobody_answers() -> None:
    import socket

    async def scenario() -> None:
        # A UDP socket that receives but never answers.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            with pytest.raises(ConnectError, match="no QUIC answer"):
                await connect(*silent.getsockname(), TransportSettings(handshake_timeout=0.5))

    run_async(scenario())


def test_finished_streams_are_released_on_both_sides() -> None:
    async def scenario() -> None:
        listener, server_channels = await echo_server()
        try:
            client = await connect(*listener.address)
            for i in range(50):  # bounded
                stream = client.open_stream()
                await stream.send(f"n{i}".encode(), end_stream=True)
                received = b""
                while chunk := await stream.read():
                    received += chunk
                assert received == f"n{i}".encode()
            assert client.open_streams == 0
            server = server_channels[-1]
            deadline = asyncio.get_running_loop().time() + 5
            while server.open_streams and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            assert server.open_streams == 0
            client.close_now()
        finally:
            listener.close()

    run_async(scenario())


def test_a_reader_that_stops_at_its_answer_still_releases_the_stream() -> None:
    """A request/answer stream whose reader never reads the empty end (it has its answer):
    once the peer's end arrived and every byte was read, the stream is released on both
    sides, its window state too, whether the end came with the last bytes or after them."""

    async def answer(stream: QuicStream) -> None:
        stream.use_bulk_buffers()
        request = await stream.read()
        await stream.send(b"answer to " + request)
        if request.endswith(b"late"):  # the end in a packet of its own, after the answer
            await stream.wait_delivered()
        stream.write_eof()

    def on_channel(channel: QuicChannel) -> None:
        channel.on_stream = lambda s: asyncio.ensure_future(answer(s))

    async def scenario() -> None:
        channels: list[QuicChannel] = []
        listener = await listen("127.0.0.1", 0, lambda c: (channels.append(c), on_channel(c)))
        try:
            client = await connect(*listener.address)
            loop = asyncio.get_running_loop()
            for i in range(40):  # bounded
                stream = client.open_stream()
                stream.use_bulk_buffers()
                request = f"n{i} {'late' if i % 2 else 'early'}".encode()
                await stream.send(request, end_stream=True)
                got = b""
                while len(got) < len(b"answer to ") + len(request):
                    got += await stream.read()
                assert got == b"answer to " + request  # and no read of the end
            deadline = loop.time() + 10
            while client.open_streams or channels[-1].open_streams:
                assert loop.time() < deadline, (client.open_streams, channels[-1].open_streams)
                await asyncio.sleep(0.01)
            assert client.quic._windows == {} and client.quic._consumed == {}
            client.close_now()
        finally:
            listener.close()

    run_async(scenario())


def test_service_identity_is_deferred_but_works_when_used() -> None:
    import subprocess
    import sys

    code = (
        "import sys, flyvault.transport, aioquic.tls as tls\n"
        "print(type(sys.modules['service_identity']).__name__)\n"
        "print(tls.service_identity.VerificationError.__name__)\n"
        "print(type(sys.modules['service_identity']).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["_Deferred", "VerificationError", "module"], result.stderr


def test_datagram_size_is_large_only_towards_loopback() -> None:
    from flyvault.transport.endpoint import (
        LOOPBACK_DATAGRAM_SIZE,
        MAX_DATAGRAM_SIZE,
        datagram_size_for,
    )

    for host in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert datagram_size_for(host) == LOOPBACK_DATAGRAM_SIZE, host
    for host in ("10.0.0.1", "fdaa::3", "203.0.113.7", "::ffff:10.0.0.1", "vault.fly.dev", ""):
        assert datagram_size_for(host) == MAX_DATAGRAM_SIZE, host
    # Through vault-proxy the next hop is unknown, even when the proxy is on loopback.
    assert datagram_size_for("127.0.0.1", proxied=True) == MAX_DATAGRAM_SIZE
    # Below aioquic's packet Length field limit (2-byte varint), or a padded Initial breaks.
    assert MAX_DATAGRAM_SIZE < LOOPBACK_DATAGRAM_SIZE < 16383


class _SizeRecordingRelay(asyncio.DatagramProtocol):
    """A UDP relay on 127.0.0.1 between one client and a server, recording datagram sizes."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: Any = None
        self.to_server: list[int] = []
        self.to_client: list[int] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if addr[:2] == self.server:
            self.to_client.append(len(data))
            if self.client is not None:
                self.transport.sendto(data, self.client)
        else:
            self.client = addr
            self.to_server.append(len(data))
            self.transport.sendto(data, self.server)


@pytest.mark.parametrize("fixed", [None, 1200, "env", "env-max"])
def test_loopback_connections_use_large_datagrams_both_ways(
    fixed: int | str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        from flyvault.transport.endpoint import (
            DATAGRAM_SIZE_ENV,
            LOOPBACK_DATAGRAM_SIZE,
        )

        size = 1200 if fixed == 1200 else None
        if fixed == "env":  # both ends read it: the bench's like-for-like setting
            monkeypatch.setenv(DATAGRAM_SIZE_ENV, "4000")
        if fixed == "env-max":  # a fixed size never grows to the bulk size
            monkeypatch.setenv(DATAGRAM_SIZE_ENV, str(LOOPBACK_DATAGRAM_SIZE))
        settings = TransportSettings(max_datagram_size=size)
        listener, _ = await echo_server(
            TransportSettings(idle_timeout=60.0, keepalive_interval=5.0, max_datagram_size=size)
        )
        loop = asyncio.get_running_loop()
        relay_transport, relay = await loop.create_datagram_endpoint(
            lambda: _SizeRecordingRelay(listener.address), local_addr=("127.0.0.1", 0)
        )
        try:
            client = await connect(*relay_transport.get_extra_info("sockname"), settings)
            stream = client.open_stream()
            payload = b"x" * 400_000
            sender = asyncio.ensure_future(stream.send(payload, end_stream=True))
            received = bytearray()
            while chunk := await stream.read():
                received += chunk
            await sender
            assert bytes(received) == payload
            client.close_now()
            largest = max(relay.to_server), max(relay.to_client)
            first = relay.to_server[0], relay.to_client[0]
            if fixed is None:
                # The handshake at the loopback size (the client's Initial is padded to
                # it), then bulk datagrams once it is confirmed, where the socket has room.
                assert first == (LOOPBACK_DATAGRAM_SIZE, LOOPBACK_DATAGRAM_SIZE), first
                bulk = listener.bulk_size or LOOPBACK_DATAGRAM_SIZE
                assert largest == (bulk, bulk), largest
            elif fixed == "env":
                assert largest == (4000, 4000)
            elif fixed == "env-max":
                assert largest == (LOOPBACK_DATAGRAM_SIZE, LOOPBACK_DATAGRAM_SIZE)
            else:
                assert largest == (1200, 1200)
        finally:
            relay_transport.close()
            listener.close()

    run_async(scenario(), timeout=60)


@pytest.mark.parametrize("value", ["1199", "16001", "big", "-5"])
def test_a_bad_datagram_size_override_is_a_config_error(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flyvault.errors import ConfigError
    from flyvault.transport.endpoint import DATAGRAM_SIZE_ENV

    monkeypatch.setenv(DATAGRAM_SIZE_ENV, value)

    async def scenario() -> None:
        for attempt in (connect("127.0.0.1", 9), listen("127.0.0.1", 0, lambda channel: None)):
            with pytest.raises(ConfigError) as caught:
                await attempt
            assert f"FLY_VAULT_DATAGRAM_SIZE='{value}' is not a datagram size" in str(caught.value)
            assert caught.value.hint and "unset FLY_VAULT_DATAGRAM_SIZE" in caught.value.hint

    run_async(scenario())


def test_wait_delivered_returns_once_the_peer_acknowledged_everything() -> None:
    async def scenario() -> None:
        listener, _ = await echo_server()
        try:
            client = await connect(*listener.address)
            stream = client.open_stream()
            # Above the high-water mark (drain would not wait for all of it), within the
            # peer's windows (the echo's answer fits ours, so nothing blocks).
            stream.write(b"y" * (768 * 1024))
            assert client.buffered(stream.stream_id) > 0
            await asyncio.wait_for(stream.wait_delivered(), 30)
            assert client.buffered(stream.stream_id) == 0
            client.close_now()
        finally:
            listener.close()

    run_async(scenario(), timeout=60)
