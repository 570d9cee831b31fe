"""The batched UDP transport: GSO runs, the fallback when the kernel refuses GSO, GRO
splitting, a full socket buffer, and the reader's chunk joining."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import pytest
from conftest import run_async

from flyvault.transport.channel import QuicStream
from flyvault.transport.udp import (
    GSO_MAX_BYTES,
    READ_BATCH_BYTES,
    BatchedDatagramTransport,
    holds_bulk,
    segment_runs,
    split_segments,
)


def _datagram(size: int, tag: int) -> bytes:
    return bytes([tag % 256]) * size


# Pure logic ------------------------------------------------------------------------------


def test_segment_runs_group_equal_sizes_and_end_a_run_at_a_short_datagram() -> None:
    sizes = [1200, 1200, 1200, 300, 1200, 1200, 40, 40, 1500, 1200]
    datagrams = [_datagram(size, i) for i, size in enumerate(sizes)]
    runs = segment_runs(datagrams)
    assert [[len(d) for d in run] for run, _ in runs] == [
        [1200, 1200, 1200, 300],
        [1200, 1200, 40],
        [40],
        [1500, 1200],
    ]
    assert [size for _, size in runs] == [1200, 1200, 40, 1500]
    # Nothing lost, nothing reordered.
    assert [d for run, _ in runs for d in run] == datagrams


def test_segment_runs_respect_the_kernel_limits() -> None:
    many = [_datagram(100, i) for i in range(150)]
    runs = segment_runs(many, max_segments=64)
    assert [len(run) for run, _ in runs] == [64, 64, 22]
    big = [_datagram(16000, i) for i in range(9)]
    runs = segment_runs(big)
    assert all(sum(map(len, run)) <= GSO_MAX_BYTES for run, _ in runs)
    assert [len(run) for run, _ in runs] == [4, 4, 1]
    assert [d for run, _ in runs for d in run] == big


def test_split_segments_inverts_a_run() -> None:
    run = [_datagram(1200, 1), _datagram(1200, 2), _datagram(77, 3)]
    assert split_segments(b"".join(run), 1200) == run
    assert split_segments(b"abc", 0) == [b"abc"]
    assert split_segments(b"abc", 1200) == [b"abc"]


def test_a_read_joins_queued_chunks_up_to_max_bytes() -> None:
    consumed: list[int] = []

    class Channel:
        def _consumed(self, stream_id: int, amount: int) -> None:
            consumed.append(amount)

    async def scenario() -> None:
        stream = QuicStream(Channel(), 0)  # type: ignore[arg-type]
        for part in (b"aaa", b"bbb", b"ccc", b"dddd"):
            stream._feed(part, False)
        assert await stream.read(7) == b"aaabbb"
        assert await stream.read(2) == b"cc"
        assert await stream.read() == b"cdddd"
        stream._feed(b"", True)
        assert await stream.read() == b""
        assert consumed == [6, 2, 5]

    run_async(scenario())


# On real sockets ---------------------------------------------------------------------------


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.errors: list[Exception] = []
        self.arrived = asyncio.Event()
        self.expected = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.append(data)
        if len(self.datagrams) >= self.expected:
            self.arrived.set()

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


class _GsoRefusingSocket(socket.socket):
    """A socket whose kernel "cannot" segment: every sendmsg fails like a device without
    checksum offload (EIO)."""

    refusals = 0

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        type(self).refusals += 1
        raise OSError(errno.EIO, "GSO not possible here")


class _FullOnceSocket(socket.socket):
    """A socket whose buffer is full for the first ``full`` sends."""

    full = 2

    def _maybe_full(self) -> None:
        if type(self).full > 0:
            type(self).full -= 1
            raise BlockingIOError(errno.EAGAIN, "full")

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        self._maybe_full()
        return super().sendmsg(*args, **kwargs)

    def sendto(self, *args: Any) -> int:  # type: ignore[override]
        self._maybe_full()
        return super().sendto(*args)


async def _pair(
    sender_class: type[socket.socket] = socket.socket, *, gro: bool | None = False
) -> tuple[BatchedDatagramTransport, BatchedDatagramTransport, _Collector]:
    loop = asyncio.get_running_loop()
    receiver_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver_sock.bind(("127.0.0.1", 0))
    receiver_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    collector = _Collector()
    receiver = BatchedDatagramTransport(loop, receiver_sock, collector, gro=gro)
    sender_sock = sender_class(socket.AF_INET, socket.SOCK_DGRAM)
    sender_sock.bind(("127.0.0.1", 0))
    sender = BatchedDatagramTransport(loop, sender_sock, asyncio.DatagramProtocol())
    return sender, receiver, collector


def _batch() -> list[bytes]:
    return [_datagram(1200, i) for i in range(20)] + [_datagram(500, 99), _datagram(64, 100)]


async def _deliver(
    sender: BatchedDatagramTransport,
    receiver: BatchedDatagramTransport,
    collector: _Collector,
    batch: list[bytes],
) -> None:
    collector.expected += len(batch)
    sender.send_batch(batch, receiver.get_extra_info("sockname"))
    await asyncio.wait_for(collector.arrived.wait(), 10)
    collector.arrived.clear()


def test_a_batch_arrives_as_the_same_datagrams_in_order() -> None:
    async def scenario() -> None:
        sender, receiver, collector = await _pair()
        try:
            batch = _batch()
            await _deliver(sender, receiver, collector, batch)
            assert collector.datagrams == batch
            assert sender.stats["datagrams_out"] == len(batch)
            if sender.gso:  # the kernel segmented: far fewer system calls than datagrams
                assert sender.stats["gso_sends"] >= 1
                assert sender.stats["sends"] < len(batch)
        finally:
            sender.close()
            receiver.close()

    run_async(scenario())


def test_gso_refused_by_the_kernel_falls_back_to_one_send_per_datagram() -> None:
    async def scenario() -> None:
        _GsoRefusingSocket.refusals = 0
        sender, receiver, collector = await _pair(_GsoRefusingSocket)
        try:
            assert sender.gso
            first = _batch()
            await _deliver(sender, receiver, collector, first)
            assert collector.datagrams == first  # the refused run was sent again, in order
            assert not sender.gso
            assert _GsoRefusingSocket.refusals == 1
            second = _batch()[::-1]
            await _deliver(sender, receiver, collector, second)
            assert collector.datagrams == first + second
            assert _GsoRefusingSocket.refusals == 1  # never tried again
            assert sender.stats["gso_sends"] == 0
            assert not collector.errors
        finally:
            sender.close()
            receiver.close()

    run_async(scenario())


def test_a_full_socket_buffer_queues_and_sends_in_order_once_writable() -> None:
    async def scenario() -> None:
        _FullOnceSocket.full = 2
        sender, receiver, collector = await _pair(_FullOnceSocket)
        try:
            batch = _batch()
            collector.expected = len(batch)
            address = receiver.get_extra_info("sockname")
            sender.send_batch(batch[:10], address)
            sender.send_batch(batch[10:], address)
            assert sender.get_write_buffer_size() > 0  # queued behind the "full" buffer
            await asyncio.wait_for(collector.arrived.wait(), 10)
            assert collector.datagrams == batch
            assert sender.get_write_buffer_size() == 0
        finally:
            sender.close()
            receiver.close()

    run_async(scenario())


def test_gro_on_receive_splits_coalesced_datagrams() -> None:
    async def scenario() -> None:
        sender, receiver, collector = await _pair(gro=None)
        try:
            if not receiver.gro:
                pytest.skip("this kernel has no UDP_GRO")
            batch = _batch()
            await _deliver(sender, receiver, collector, batch)
            assert collector.datagrams == batch
            assert receiver.stats["reads"] <= len(batch)
        finally:
            sender.close()
            receiver.close()

    run_async(scenario())


def test_one_read_callback_stops_once_it_has_read_batch_bytes() -> None:
    """Large datagrams: 64 of them would be the whole of a bulk stream's window, so the
    callback hands over about READ_BATCH_BYTES and lets the ACKs go out before the rest."""

    async def scenario() -> None:
        _, receiver, collector = await _pair()
        size = 60_000
        per_callback = -(-READ_BATCH_BYTES // size)  # the read that reaches the bound ends it
        plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(2 * per_callback + 1):
                plain.sendto(_datagram(size, i), receiver.get_extra_info("sockname"))
            receiver._read_ready()  # loopback delivered them all during sendto
            assert len(collector.datagrams) == per_callback
            receiver._read_ready()
            assert len(collector.datagrams) == 2 * per_callback
            receiver._read_ready()
            assert [d[0] for d in collector.datagrams] == list(range(2 * per_callback + 1))
        finally:
            plain.close()
            receiver.close()

    run_async(scenario())


def test_holds_bulk_needs_the_granted_receive_buffer() -> None:
    small = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        small.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        assert not holds_bulk(small)
    finally:
        small.close()
    assert not holds_bulk(small)  # closed: the question fails, the answer is no


def test_close_reports_connection_lost_and_closes_the_socket() -> None:
    async def scenario() -> None:
        lost: list[Exception | None] = []

        class Protocol(asyncio.DatagramProtocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.append(exc)

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        transport = BatchedDatagramTransport(asyncio.get_running_loop(), sock, Protocol())
        transport.close()
        assert transport.is_closing()
        transport.sendto(b"ignored", ("127.0.0.1", 9))  # a no-op once closing
        await asyncio.sleep(0)
        assert lost == [None]
        assert sock.fileno() == -1

    run_async(scenario())


# Pacing -------------------------------------------------------------------------------------


def _burst(pacer: Any, datagram_size: int) -> int:
    """Datagrams the pacer lets go back to back after a long pause."""
    pacer.update_rate(congestion_window=10 * 1024 * 1024, smoothed_rtt=0.01)
    now = 100.0
    sent = 0
    while pacer.next_send_time(now) is None and sent < 10_000:
        pacer.update_after_send(now)
        sent += 1
    return sent


def test_the_pacer_bursts_one_gso_send_at_small_datagrams_and_is_unchanged_at_large() -> None:
    from aioquic.quic.recovery import QuicPacketPacer

    from flyvault.transport.connection import PACING_BURST, BurstPacer

    assert _burst(QuicPacketPacer(max_datagram_size=1200), 1200) <= 17
    small = _burst(BurstPacer(max_datagram_size=1200), 1200)
    assert PACING_BURST // 1200 - 1 <= small <= PACING_BURST // 1200 + 1
    large = _burst(BurstPacer(max_datagram_size=16000), 16000)
    assert large == _burst(QuicPacketPacer(max_datagram_size=16000), 16000)

    # A small window still paces: at most a quarter of it goes at once, as in aioquic.
    def quarter(pacer: Any) -> int:
        pacer.update_rate(congestion_window=48_000, smoothed_rtt=0.01)
        now, sent = 100.0, 0
        while pacer.next_send_time(now) is None and sent < 100:
            pacer.update_after_send(now)
            sent += 1
        return sent

    assert quarter(BurstPacer(max_datagram_size=1200)) <= 48_000 // 4 // 1200 + 1
    assert quarter(BurstPacer(max_datagram_size=1200)) == quarter(
        QuicPacketPacer(max_datagram_size=1200)
    )


# A loop that cannot watch sockets (Windows' proactor) -------------------------------------


class _NoReadersLoop(asyncio.SelectorEventLoop):
    """Like the proactor loop: the public add_reader is not implemented (asyncio's own
    datagram transport uses the private one, so it still works)."""

    def add_reader(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError


def test_without_add_reader_the_channels_run_on_asyncios_transport() -> None:
    from flyvault.transport import QuicChannel, connect, listen
    from flyvault.transport.udp import supports_readers

    async def scenario() -> None:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            assert not supports_readers(asyncio.get_running_loop(), probe)
        finally:
            probe.close()
        served: list[QuicChannel] = []

        async def echo(stream: QuicStream) -> None:
            while data := await stream.read():
                await stream.send(data)
            stream.write_eof()

        def on_channel(channel: QuicChannel) -> None:
            served.append(channel)
            channel.on_stream = lambda s: asyncio.ensure_future(echo(s))

        listener = await listen("127.0.0.1", 0, on_channel)
        try:
            client = await connect(*listener.address)
            assert not isinstance(client._transport, BatchedDatagramTransport)
            stream = client.open_stream()
            payload = bytes(range(256)) * 2000
            await stream.send(payload, end_stream=True)
            echoed = b""
            while chunk := await stream.read():
                echoed += chunk
            assert echoed == payload
            assert not isinstance(served[0]._transport, BatchedDatagramTransport)
            client.close_now()
        finally:
            listener.close()

    with asyncio.Runner(loop_factory=_NoReadersLoop) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))
