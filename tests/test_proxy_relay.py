"""vault-proxy's relay on loopback: routing, sessions, NAT rebinding, limits, failures, status.

The relay runs in the test's event loop on 127.0.0.1; "machines" are UDP sockets on other
loopback addresses (127.0.0.2, 127.0.0.3) that answer with QUIC-shaped headers, and the
machine map comes from an in-memory API. Real QUIC through the proxy is in test_proxy_e2e.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from conftest import run_async
from proxy_support import (
    CLIENT_CID,
    MACHINE_CID,
    FakeMachine,
    FakeTime,
    StaticApi,
    free_udp_port,
    handshake,
    initial,
    short,
    start_machine,
    udp_client,
)

from flyvault.proxy.discovery import Directory, DirectoryOptions
from flyvault.proxy.relay import Relay, RelayOptions
from flyvault.proxy.status import StatusServer
from flyvault.proxy.wire import MALFORMED, Drop, encode
from flyvault.udp_options import IP_MTU_DISCOVER, PMTUDISC_PROBE

A, B = "148e21ea7e46e8", "3d8d9014b32d68"


@asynccontextmanager
async def relay_for(
    api: StaticApi, port: int, clock: Callable[[], float] | None = None, **options: Any
) -> AsyncIterator[tuple[Relay, tuple[str, int]]]:
    directory = Directory(api, DirectoryOptions(backend_port=port, min_refresh_interval=0))
    await directory.refresh()
    relay = Relay(
        directory,
        RelayOptions(bind_host="127.0.0.1", port=0, **options),
        **({} if clock is None else {"clock": clock}),
    )
    address = await relay.start()
    try:
        yield relay, address
    finally:
        relay.close()
        await directory.close()


@asynccontextmanager
async def machines(port: int, *specs: tuple[str, str]) -> AsyncIterator[list[FakeMachine]]:
    started = [await start_machine(name, host, port) for name, host in specs]
    try:
        yield started
    finally:
        for machine in started:
            machine.close()


async def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    run_async(scenario(), timeout=60)


def test_each_machine_id_reaches_its_own_machine() -> None:
    async def scenario() -> None:
        port = free_udp_port("127.0.0.2", "127.0.0.3")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        api.put(B, "127.0.0.3", tenant="tenant-b")
        async with (
            machines(port, ("A", "127.0.0.2"), ("B", "127.0.0.3")) as (ma, mb),
            relay_for(api, port) as (relay, proxy),
        ):
            client = await udp_client()
            client.send(encode(A, initial(b"\x01" * 8)), proxy)
            reply, source = await client.recv()
            assert source == proxy  # replies come from the proxy's public address
            assert reply[0] == 0xC3 and reply.endswith(b"A")  # raw, no header added
            client.send(encode(B, initial(b"\x02" * 8)), proxy)
            reply, _ = await client.recv()
            assert reply.endswith(b"B")
            assert len(ma.received) == len(mb.received) == 1
            # The machine gets the QUIC datagram without the proxy header.
            assert ma.received[0][0][:1] == b"\xc3" and len(ma.received[0][0]) == 1200
            c = relay.counters
            assert (c.relayed_to_machines, c.relayed_to_clients, relay.sessions) == (2, 2, 2)
            client.close()

    run(scenario)


def test_nat_rebinding_keeps_the_session() -> None:
    """Same DCID from a new port, then from a new address: one session, one backend flow."""

    async def scenario() -> None:
        port = free_udp_port("127.0.0.2")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        async with (
            machines(port, ("A", "127.0.0.2")) as (machine,),
            relay_for(api, port) as (
                relay,
                proxy,
            ),
        ):
            first = await udp_client()
            first.send(encode(A, initial(b"\x07" * 8)), proxy)
            reply, _ = await first.recv()
            assert MACHINE_CID in reply  # the proxy learns this SCID from the reply
            first.send(encode(A, short(MACHINE_CID, b"one")), proxy)
            assert (await first.recv())[0].endswith(b"A:one")

            rebound = await udp_client()  # the NAT picked a new source port
            rebound.send(encode(A, short(MACHINE_CID, b"two")), proxy)
            assert (await rebound.recv())[0].endswith(b"A:two")
            assert await first.nothing()  # replies follow the client to its new address

            roamed = await udp_client("127.0.0.4")  # and a new source address
            roamed.send(encode(A, short(MACHINE_CID, b"three")), proxy)
            assert (await roamed.recv())[0].endswith(b"A:three")

            # The machine saw one peer throughout: for QUIC nothing moved at all.
            assert len(machine.sources) == 1
            c = relay.counters
            assert (c.sessions_created, c.client_rebinds, relay.sessions) == (1, 2, 1)
            for client in (first, rebound, roamed):
                client.close()

    run(scenario)


def test_new_cid_from_the_same_address_is_learned() -> None:
    async def scenario() -> None:
        port = free_udp_port("127.0.0.2")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        async with (
            machines(port, ("A", "127.0.0.2")) as (machine,),
            relay_for(api, port) as (
                relay,
                proxy,
            ),
        ):
            client = await udp_client()
            client.send(encode(A, initial(b"\x07" * 8)), proxy)
            await client.recv()
            learned = relay.counters.cids_learned
            # A CID the machine issued in an (encrypted) NEW_CONNECTION_ID frame.
            client.send(encode(A, short(b"\x99" * 8, b"x")), proxy)
            await client.recv()
            assert relay.counters.cids_learned == learned + 1
            assert relay.sessions == 1 and len(machine.sources) == 1
            client.close()

    run(scenario)


def test_packets_that_cannot_open_a_flow_are_dropped() -> None:
    async def scenario() -> None:
        port = free_udp_port("127.0.0.2")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        async with (
            machines(port, ("A", "127.0.0.2")) as (machine,),
            relay_for(api, port) as (
                relay,
                proxy,
            ),
        ):
            client = await udp_client()
            client.send(encode(A, handshake(b"\x05" * 8)), proxy)  # no Initial before it
            client.send(encode(A, initial(b"\x06" * 8, size=600)), proxy)  # Initial < 1200
            client.send(encode(A, b"\x00" * 40), proxy)  # fixed bit clear: not QUIC
            await eventually(lambda: relay.counters.received == 3)
            assert relay.counters.dropped[Drop.NO_SESSION] == 2
            assert relay.counters.dropped[Drop.NOT_QUIC] == 1
            assert relay.sessions == 0 and machine.received == []
            client.close()

    run(scenario)


def test_connection_ids_are_scoped_by_machine() -> None:
    """A CID of a session with A, sent with B's id, never reaches A's session."""

    async def scenario() -> None:
        port = free_udp_port("127.0.0.2", "127.0.0.3")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        api.put(B, "127.0.0.3", tenant="tenant-b")
        async with (
            machines(port, ("A", "127.0.0.2"), ("B", "127.0.0.3")) as (ma, _mb),
            relay_for(api, port) as (relay, proxy),
        ):
            victim = await udp_client()
            victim.send(encode(A, initial(b"\x07" * 8)), proxy)
            await victim.recv()
            attacker = await udp_client("127.0.0.9")
            attacker.send(encode(B, short(MACHINE_CID, b"steal")), proxy)
            reply, _ = await attacker.recv()
            assert reply.endswith(b"B:steal")  # it went to B, in a session of its own
            assert len(ma.received) == 1 and relay.sessions == 2
            assert relay.counters.client_rebinds == 0
            for client in (victim, attacker):
                client.close()

    run(scenario)


def test_session_table_is_bounded_in_total_and_per_ip() -> None:
    async def scenario() -> None:
        port = free_udp_port("127.0.0.2")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        async with (
            machines(port, ("A", "127.0.0.2")),
            relay_for(api, port, max_sessions=3, max_sessions_per_ip=2) as (relay, proxy),
        ):
            hosts = ["127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.5", "127.0.0.6"]
            clients = [await udp_client(host) for host in hosts]
            for n, client in enumerate(clients):
                client.send(encode(A, initial(bytes([n]) * 8)), proxy)
            await eventually(lambda: relay.counters.received == 5)
            c = relay.counters
            assert relay.sessions == 3
            assert c.dropped[Drop.IP_SESSION_LIMIT] == 1  # the third from 127.0.0.1
            assert c.dropped[Drop.SESSION_LIMIT] == 1  # the one from 127.0.0.6
            assert await clients[2].nothing() and await clients[4].nothing()
            for client in clients:
                client.close()

    run(scenario)


def test_idle_sessions_expire() -> None:
    async def scenario() -> None:
        port = free_udp_port("127.0.0.2")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        # Session ages on a fake clock: a loaded machine cannot age one before we look.
        time = FakeTime()
        async with (
            machines(port, ("A", "127.0.0.2")) as (machine,),
            relay_for(api, port, time.clock, session_timeout=10, sweep_interval=0.05) as (
                relay,
                proxy,
            ),
        ):
            client = await udp_client()
            client.send(encode(A, initial(b"\x07" * 8)), proxy)
            await client.recv()
            assert relay.sessions == 1
            time.advance(9)
            assert relay.sweep() == 0 and relay.sessions == 1  # idle, but not for long enough
            time.advance(1.5)
            await eventually(lambda: relay.sessions == 0)  # the sweeper's next round
            assert relay.counters.sessions_expired == 1
            # Its CIDs went with it: the next short packet opens a fresh session.
            client.send(encode(A, short(MACHINE_CID, b"again")), proxy)
            assert (await client.recv())[0].endswith(b"A:again")
            assert relay.counters.sessions_created == 2 and len(machine.sources) == 2
            client.close()

    run(scenario)


def test_a_failed_relay_closes_its_session() -> None:
    """ICMP port unreachable from the machine: the session goes, the next packet retries."""

    async def scenario() -> None:
        port = free_udp_port("127.0.0.2")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        async with relay_for(api, port) as (relay, proxy):
            client = await udp_client()
            client.send(encode(A, initial(b"\x07" * 8)), proxy)  # nothing listens there yet
            await eventually(lambda: relay.counters.sessions_failed == 1)
            assert relay.sessions == 0
            async with machines(port, ("A", "127.0.0.2")):
                client.send(encode(A, initial(b"\x07" * 8)), proxy)  # QUIC retransmits
                assert (await client.recv())[0].endswith(b"A")
            assert relay.sessions == 1
            client.close()

    run(scenario)


def test_a_moved_machine_gets_a_new_session() -> None:
    async def scenario() -> None:
        port = free_udp_port("127.0.0.2", "127.0.0.3")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        async with (
            machines(port, ("old", "127.0.0.2"), ("new", "127.0.0.3")) as (old, _new),
            relay_for(api, port) as (relay, proxy),
        ):
            client = await udp_client()
            client.send(encode(A, initial(b"\x07" * 8)), proxy)
            await client.recv()
            api.put(A, "127.0.0.3")  # replaced: same id, new private_ip
            await relay.directory.refresh()
            client.send(encode(A, short(MACHINE_CID, b"hi")), proxy)
            assert (await client.recv())[0].endswith(b"new:hi")
            assert relay.counters.sessions_replaced == 1 and relay.sessions == 1
            assert len(old.received) == 1
            client.close()

    run(scenario)


def test_drops_are_counted_by_reason_and_misses_ask_for_a_refresh() -> None:
    async def scenario() -> None:
        port = free_udp_port("127.0.0.2")
        api = StaticApi()
        api.put(A, "127.0.0.2", state="stopped")
        async with relay_for(api, port) as (relay, proxy):
            client = await udp_client()
            packets = [
                b"",
                b"\x01\x00",
                (0).to_bytes(8, "little") + b"payload",
                (2**64 - 8).to_bytes(8, "little") + b"x" * 40,
                (20).to_bytes(8, "little") + b"short",
                (3).to_bytes(8, "little") + b"abc",
                (2).to_bytes(8, "little") + b"\xff\xfe" + b"q",
                (2).to_bytes(8, "little") + b"\x00a" + b"q",
                encode("nosuchmachine", initial(b"\x01" * 8)),
                encode(A, initial(b"\x01" * 8)),
            ]
            for packet in packets:
                client.send(packet, proxy)
            await eventually(lambda: relay.counters.received == len(packets))
            dropped = {r.value: n for r, n in relay.counters.dropped.items() if n}
            assert dropped == {
                "short": 2,
                "empty_id": 1,
                "id_too_long": 1,
                "truncated": 1,
                "empty_payload": 1,
                "non_utf8": 1,
                "bad_id": 1,
                "unknown_machine": 1,
                "machine_not_started": 1,
            }
            assert relay.directory.stats.refreshes_on_miss == 1
            assert relay.directory.stats.wakes_started == 1  # the stopped managed machine
            client.close()

    run(scenario)


def _crafted(known: str) -> list[bytes]:
    lengths = [0, 1, 7, 8, 63, 64, 65, 255, 2**16, 2**32, 2**63, 2**64 - 9, 2**64 - 8, 2**64 - 1]
    out = [b"", b"\x00", bytes(7), bytes(8)]
    for n in lengths:
        for tail in (b"", b"a", b"ab" * 40, known.encode() + b"\xc3" + bytes(60)):
            out.append(n.to_bytes(8, "little") + tail)
    for bad_id in (
        b"\xff",
        b"\xc0\x80",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"a\x00",
        b"\x1b[2J",
    ):
        out.append(len(bad_id).to_bytes(8, "little") + bad_id + b"\xc3" + bytes(40))
    for payload in (b"\x00", b"\xc3", b"\xc3\x00\x00\x00\x01\x15", b"\x43\x01", b"\x80" * 6):
        out.append(encode(known, payload))
    return out


def test_fuzz_never_stops_the_relay() -> None:
    """20,000 random and crafted datagrams (length field 2**64-8 included): every one is
    counted, none crashes, and a well-formed flow works afterwards."""

    async def scenario() -> None:
        port = free_udp_port("127.0.0.2")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        rng = random.Random(1234)
        async with (
            machines(port, ("A", "127.0.0.2")) as (machine,),
            relay_for(api, port, max_sessions=64) as (relay, proxy),
        ):
            client = await udp_client()
            crafted = _crafted(A)
            sent = 0
            for round_ in range(100):  # bounded: 100 rounds of 200
                for i in range(200):
                    kind = (round_ * 200 + i) % 4
                    if kind == 0:
                        packet = crafted[rng.randrange(len(crafted))]
                    elif kind == 1:
                        packet = os.urandom(rng.randrange(0, 1400))
                    elif kind == 2:  # a plausible header with a random length field
                        n = rng.choice([rng.randrange(0, 80), rng.randrange(0, 2**64)])
                        packet = n.to_bytes(8, "little") + os.urandom(rng.randrange(0, 120))
                    else:  # the right id, random bytes behind it
                        packet = encode(A, os.urandom(rng.randrange(1, 200)))
                    client.send(packet, proxy)
                    sent += 1
                await asyncio.sleep(0.002)  # let the relay drain: loopback UDP drops on overflow
            await eventually(lambda: relay.counters.received == sent, timeout=20)
            c = relay.counters
            malformed = sum(c.dropped[r] for r in MALFORMED)
            other = sum(n for r, n in c.dropped.items() if r not in MALFORMED)
            assert malformed + other + c.relayed_to_machines == sent
            assert c.dropped[Drop.ID_TOO_LONG] > 0 and c.front_errors == 0
            assert relay.sessions <= 64
            # Still relaying.
            client.send(encode(A, initial(b"\x42" * 8)), proxy)
            while True:
                reply, _ = await client.recv()
                if reply.startswith(b"\xc3") and reply.endswith(b"A"):
                    break
            client.close()
            assert machine.received

    run(scenario)


def test_status_endpoint_reports_counters_on_loopback_only() -> None:
    async def scenario() -> None:
        port = free_udp_port("127.0.0.2")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        async with machines(port, ("A", "127.0.0.2")), relay_for(api, port) as (relay, proxy):
            status = StatusServer(
                "127.0.0.1",
                0,
                lambda: {**relay.snapshot(), "machines": relay.directory.snapshot()},
                lambda: True,
            )
            host, status_port = await status.start()
            client = await udp_client()
            client.send(encode(A, initial(b"\x07" * 8)), proxy)
            await client.recv()
            client.send(b"junk", proxy)
            await eventually(lambda: relay.counters.received == 2)

            async def get(path: str) -> tuple[int, dict[str, Any]]:
                reader, writer = await asyncio.open_connection(host, status_port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                raw = await reader.read()
                writer.close()
                head, _, body = raw.partition(b"\r\n\r\n")
                return int(head.split()[1]), json.loads(body)

            code, body = await get("/healthz")
            assert code == 200 and body["ok"] is True
            assert body["packets"]["relayed_to_machines"] == 1
            assert body["packets"]["relayed_to_clients"] == 1
            assert body["packets"]["dropped"]["short"] == 1
            assert body["sessions"]["active"] == 1
            assert body["machines"]["routable"] == 1
            assert (await get("/nope"))[0] == 404
            await status.close()
            client.close()
        with pytest.raises(ValueError, match="loopback"):
            StatusServer("0.0.0.0", 0, dict, lambda: True)

    run(scenario)


def test_client_and_machine_payloads_pass_unchanged() -> None:
    """Byte-exact both ways: the proxy strips exactly the header and adds nothing."""

    async def scenario() -> None:
        port = free_udp_port("127.0.0.2")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        async with (
            machines(port, ("A", "127.0.0.2")) as (machine,),
            relay_for(api, port) as (
                _,
                proxy,
            ),
        ):
            client = await udp_client()
            datagram = initial(b"\x07" * 8, CLIENT_CID, size=1350)
            client.send(encode(A, datagram), proxy)
            reply, _ = await client.recv()
            assert machine.received[0][0] == datagram
            assert reply[6:14] == CLIENT_CID  # the machine's reply, as it sent it
            client.close()

    run(scenario)


class _Mtu1500:
    """The relay's public socket on a 1500-byte interface: what the kernel does with a
    datagram that does not fit once fragmentation is off (loopback carries any size)."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.refused = 0

    def sendto(self, data: bytes, addr: Any) -> int:
        if len(data) > 1472:
            self.refused += 1
            raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
        sent: int = self._sock.sendto(data, addr)
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_replies_to_clients_are_never_fragmented() -> None:
    """A machine's path MTU search runs end to end through the relay: the public socket
    sets Don't Fragment without local fragmentation (PMTUDISC_PROBE), so an oversized
    probe is lost instead of "confirmed" in fragments. A refused send is a counted drop."""

    async def scenario() -> None:
        port = free_udp_port("127.0.0.2")
        api = StaticApi()
        api.put(A, "127.0.0.2")
        async with (
            machines(port, ("A", "127.0.0.2")),
            relay_for(api, port) as (relay, proxy),
        ):
            front = relay._front
            assert front is not None
            assert front.getsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER) == PMTUDISC_PROBE
            client = await udp_client()
            client.send(encode(A, initial(b"\x07" * 8)), proxy)
            await client.recv()
            wrapped = _Mtu1500(front)
            relay._front = wrapped  # type: ignore[assignment]
            # The machine echoes the body: a reply of ~3000 bytes, then a small one.
            client.send(encode(A, short(MACHINE_CID, b"x" * 3000)), proxy)
            await eventually(lambda: relay.counters.dropped[Drop.CLIENT_FAILED] == 1)
            assert wrapped.refused == 1
            client.send(encode(A, short(MACHINE_CID, b"small")), proxy)
            reply, _ = await client.recv()
            assert reply.endswith(b"A:small")
            assert relay.sessions == 1
            relay._front = front
            client.close()

    run(scenario)
