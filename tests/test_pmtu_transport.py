"""Path MTU discovery on real QUIC connections over 127.0.0.1 (no root needed).

Loopback carries any size, so ``TransportSettings.pmtu_ceiling`` makes the search run
anyway, up to that ceiling. A black hole is made by a transport that drops large
datagrams (the network's behaviour, not our code's). The search over a real path with a
smaller MTU in the middle is in tests/test_pmtu_netns.py (root).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from aioquic import tls
from conftest import run_async

from flyvault.protocol.pmtu import BASE_PLPMTU
from flyvault.transport import QuicChannel, QuicStream, TransportSettings, connect, listen
from flyvault.transport.endpoint import LOOPBACK_DATAGRAM_SIZE
from flyvault.transport.pmtu import PMTU_ENV, discovery_enabled, loopback_payload_limit

CEILING = 4000
#: Bounded waits for the search (it takes a few round trips on loopback).
SEARCH_WAIT = 10.0


async def echo_server(settings: TransportSettings) -> tuple[Any, list[QuicChannel]]:
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


async def wait_for(condition: Any, what: str, timeout: float = SEARCH_WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def echo_bulk(client: QuicChannel, size: int) -> None:
    payload = os.urandom(size)
    stream = client.open_stream()

    async def writer() -> None:
        for i in range(0, len(payload), 65536):
            await stream.send(payload[i : i + 65536])
        stream.write_eof()

    task = asyncio.ensure_future(writer())
    received = bytearray()
    while chunk := await stream.read():
        received += chunk
    await task
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_both_ends_raise_the_datagram_size_to_the_ceiling(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="flyvault.transport")

    async def scenario() -> None:
        settings = TransportSettings(pmtu_ceiling=CEILING)
        listener, servers = await echo_server(TransportSettings.for_server())
        listener._settings.pmtu_ceiling = CEILING
        try:
            client = await connect(*listener.address, settings)
            assert client.datagram_size == BASE_PLPMTU
            # Data flows while the search runs, and arrives intact.
            await echo_bulk(client, 2 * 1024 * 1024)
            await wait_for(lambda: client.pmtu.search_complete, "the client's search")
            await wait_for(lambda: servers[0].pmtu.search_complete, "the server's search")
            assert client.datagram_size == CEILING
            assert servers[0].datagram_size == CEILING
            assert client.quic._loss._pacer._max_datagram_size == CEILING
            # The larger datagrams carry the next transfer.
            await echo_bulk(client, 2 * 1024 * 1024)
            assert client.pmtu.machine.probes_sent <= 3 * 12
            client.close_now()
        finally:
            listener.close()

    run_async(scenario())
    assert any(f"-> {CEILING} bytes" in r.getMessage() for r in caplog.records)


class _BlackHole:
    """Wraps a datagram transport: drops datagrams over ``limit`` bytes once armed."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.limit: int | None = None
        self.dropped = 0

    def _keep(self, data: bytes) -> bool:
        if self.limit is not None and len(data) > self.limit:
            self.dropped += 1
            return False
        return True

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self._keep(data):
            self._inner.sendto(data, addr)

    def send_batch(self, datagrams: list[bytes], addr: Any = None) -> None:
        kept = [d for d in datagrams if self._keep(d)]
        if kept:
            self._inner.send_batch(kept, addr)

    def send_now(self, data: bytes, addr: Any = None) -> OSError | None:
        if self._keep(data):
            error: OSError | None = self._inner.send_now(data, addr)
            return error
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_black_hole_after_the_search_falls_back_to_base_and_data_still_arrives() -> None:
    async def scenario() -> None:
        listener, _ = await echo_server(TransportSettings.for_server())
        try:
            client = await connect(*listener.address, TransportSettings(pmtu_ceiling=CEILING))
            await wait_for(lambda: client.pmtu.search_complete, "the client's search")
            assert client.datagram_size == CEILING
            hole = _BlackHole(client._transport)
            client._transport = hole  # type: ignore[assignment]
            hole.limit = BASE_PLPMTU
            await asyncio.wait_for(echo_bulk(client, 512 * 1024), 30)
            assert hole.dropped > 0
            assert client.pmtu.machine.black_holes >= 1
            assert client.datagram_size == BASE_PLPMTU
            # The search started over and found nothing larger gets through.
            await wait_for(lambda: client.pmtu.search_complete, "the search after the hole")
            assert client.datagram_size == BASE_PLPMTU
            client.close_now()
        finally:
            listener.close()

    run_async(scenario())


def test_loopback_without_a_ceiling_runs_no_search() -> None:
    async def scenario() -> None:
        listener, servers = await echo_server(TransportSettings.for_server())
        try:
            client = await connect(*listener.address)
            await echo_bulk(client, 64 * 1024)
            assert client.pmtu is None and servers[0].pmtu is None
            # The loopback size, grown to the bulk size after the handshake where the
            # socket has room for it (transport.endpoint._bulk_size), never searched.
            assert client.datagram_size == (listener.bulk_size or LOOPBACK_DATAGRAM_SIZE)
            assert servers[0].datagram_size == client.datagram_size
            client.close_now()
        finally:
            listener.close()

    run_async(scenario())


@pytest.mark.parametrize(
    ("value", "enabled"),
    [("", True), ("1", True), ("0", False), ("off", False), ("false", False), ("no", False)],
)
def test_the_switch(monkeypatch: pytest.MonkeyPatch, value: str, enabled: bool) -> None:
    monkeypatch.setenv(PMTU_ENV, value)
    assert discovery_enabled() is enabled


class _ProbeHole(_BlackHole):
    """Drops only what is sent alone (probes) over ``limit``: the data path is fine."""

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._inner.sendto(data, addr)

    def send_batch(self, datagrams: list[bytes], addr: Any = None) -> None:
        self._inner.send_batch(datagrams, addr)


def test_lost_probes_are_no_congestion_signal() -> None:
    async def scenario() -> None:
        listener, _ = await echo_server(TransportSettings.for_server())
        try:
            client = await connect(*listener.address, TransportSettings(pmtu_ceiling=CEILING))
            hole = _ProbeHole(client._transport)
            hole.limit = 1300
            client._transport = hole  # type: ignore[assignment]
            # A trickle of small packets: their ACKs make QUIC declare the probes lost
            # (packet and time thresholds), the path a congestion loss would take.
            stream = client.open_stream()

            async def trickle() -> None:
                while not client.pmtu.search_complete:
                    await stream.send(b"t" * 100)
                    await stream.read()
                    await asyncio.sleep(0.002)

            await asyncio.wait_for(trickle(), SEARCH_WAIT)
            assert hole.dropped >= 3
            assert 1300 - 8 < client.datagram_size <= 1300
            # Reno leaves slow start (sets ssthresh) at the first congestion event.
            assert client.quic._loss._cc.ssthresh is None
            client.close_now()
        finally:
            listener.close()

    run_async(scenario())


def test_send_now_returns_the_kernels_refusal() -> None:
    import socket

    from flyvault.transport.udp import BatchedDatagramTransport

    async def scenario() -> None:
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", 0))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(receiver.getsockname())
        transport = BatchedDatagramTransport(
            asyncio.get_running_loop(), sock, asyncio.DatagramProtocol(), connected=True
        )
        try:
            assert transport.send_now(b"x" * 1500) is None
            assert receiver.recv(65536) == b"x" * 1500
            error = transport.send_now(b"x" * 65508)  # over the largest IPv4 UDP payload
            assert error is not None and error.errno == errno.EMSGSIZE
        finally:
            transport.close()
            receiver.close()
            await asyncio.sleep(0)

    run_async(scenario())


def test_refused_probes_leave_nothing_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe the kernel refuses (EMSGSIZE) never left: it must not stay in aioquic's
    loss recovery (bytes in flight, PTO). With a 16000 ceiling and a 1500 MTU (1472-byte
    payloads) about eleven probes are refused, far more than the congestion window."""
    from flyvault.transport.udp import BatchedDatagramTransport

    interface = 1472
    real_send_now = BatchedDatagramTransport.send_now

    def send_now(self: Any, data: bytes, addr: Any = None) -> OSError | None:
        if len(data) > interface:  # the kernel's answer on a 1500-byte interface
            return OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
        error: OSError | None = real_send_now(self, data, addr)
        return error

    monkeypatch.setattr(BatchedDatagramTransport, "send_now", send_now)

    async def scenario() -> None:
        listener, _ = await echo_server(TransportSettings.for_server())
        try:
            client = await connect(*listener.address, TransportSettings(pmtu_ceiling=16000))
            driver = client.pmtu
            quic = client.quic
            at_completion: list[int] = []
            step = driver._step

            def watched_step() -> None:
                step()
                if driver.search_complete and not at_completion:
                    at_completion.append(quic._loss._cc.bytes_in_flight)

            driver._step = watched_step  # type: ignore[method-assign]
            await wait_for(lambda: driver.search_complete, "the client's search")
            assert client.datagram_size == interface
            assert driver.machine.probes_sent >= 8
            # Measured in the step that finished the search, before any PTO could help.
            assert at_completion and at_completion[0] < 2 * interface
            space = quic._spaces[tls.Epoch.ONE_RTT]
            assert all(p.sent_bytes <= interface for p in space.sent_packets.values())
            assert not quic._pmtu_probes
            await asyncio.wait_for(echo_bulk(client, 2 * 1024 * 1024), 30)
            client.close_now()
        finally:
            listener.close()

    run_async(scenario())


def test_send_now_reports_other_errors_to_the_protocol() -> None:
    """Only EMSGSIZE is the probe's business: ECONNREFUSED (a pending ICMP "port
    unreachable" on a connected socket) reaches ``error_received``, which is how a client
    notices a vault that stopped answering."""
    import socket
    import time

    from flyvault.transport.udp import BatchedDatagramTransport

    class Protocol(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.errors: list[Exception] = []

        def error_received(self, exc: Exception) -> None:
            self.errors.append(exc)

    async def scenario() -> None:
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind(("127.0.0.1", 0))
        address = closed.getsockname()
        closed.close()  # nobody listens there: the kernel answers with ICMP
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(address)
        protocol = Protocol()
        transport = BatchedDatagramTransport(
            asyncio.get_running_loop(), sock, protocol, connected=True
        )
        try:
            sock.send(b"x")
            time.sleep(0.05)  # the ICMP error is now pending on the socket (no loop turn)
            assert transport.send_now(b"y" * 1300) is None
            assert [getattr(e, "errno", None) for e in protocol.errors] == [errno.ECONNREFUSED]
        finally:
            transport.close()
            await asyncio.sleep(0)

    run_async(scenario())


def test_loopback_payload_limit_is_the_loopback_mtu_less_the_headers() -> None:
    mtu_file = Path("/sys/class/net/lo/mtu")
    if not mtu_file.exists():
        pytest.skip("no /sys/class/net/lo/mtu to compare with (not Linux)")
    mtu = int(mtu_file.read_text())
    # An IPv4 packet is at most 65535 bytes whatever the MTU (its length field).
    assert loopback_payload_limit(socket.AF_INET) == min(mtu, 65535) - 28
    assert loopback_payload_limit(socket.AF_INET6) in (mtu - 48, None)  # None: no IPv6
