"""Helpers for the vault-proxy tests (this module holds no tests).

* ``add_machine`` puts a machine into the Machines API stand-in with the metadata, state and
  ``private_ip`` a test wants (the stand-in invents IPv6 addresses; tests need loopback ones).
* ``initial`` / ``handshake`` / ``short`` build datagrams that carry just enough QUIC header
  for the proxy (which reads only the RFC 8999 invariants).
* ``FakeMachine`` is a UDP "init" that answers like a QUIC server would at the header level:
  a long-header reply whose SCID is its own connection id, then short-header echoes.
* ``UdpClient`` is an asyncio UDP socket with a receive queue.
* ``StaticApi`` is an in-memory ``MachinesApi`` for relay tests that need no HTTP.
* ``FakeTime`` is a ``clock``/``sleep`` pair for ``Directory``: time moves only when the
  test says so, so the poller's periods and rate limits are exact, whatever the load.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from flyvault.proxy.discovery import MANAGED_BY_VALUE, META_MANAGED_BY, META_TENANT

APP = "test-app"  # the attested app (conftest.APP) and the Machines API app are the same
MACHINE_CID = bytes.fromhex("5e5e5e5e5e5e5e5e")  # the connection id a FakeMachine issues
CLIENT_CID = bytes.fromhex("c1c1c1c1c1c1c1c1")


def add_machine(
    standin: Any,
    *,
    tenant: str | None = "tenant-a",
    managed: bool = True,
    private_ip: str = "127.0.0.2",
    state: str = "started",
    app: str = APP,
) -> str:
    metadata: dict[str, str] = {}
    if managed:
        metadata[META_MANAGED_BY] = MANAGED_BY_VALUE
    if tenant is not None:
        metadata[META_TENANT] = tenant
    body = {"config": {"image": "registry.fly.io/vault:1", "metadata": metadata}}
    status, reply = standin.model.handle("POST", f"/v1/apps/{app}/machines", {}, body, None)
    assert status == 200, reply
    machine_id: str = reply["id"]
    with standin.model.lock:
        standin.model.machine(machine_id, app).private_ip = private_ip
    standin.model.set_state(machine_id, state, app)
    return machine_id


def set_private_ip(standin: Any, machine_id: str, ip: str, app: str = APP) -> None:
    with standin.model.lock:
        standin.model.machine(machine_id, app).private_ip = ip


# QUIC-shaped datagrams -------------------------------------------------------------------


def initial(dcid: bytes, scid: bytes = CLIENT_CID, size: int = 1200) -> bytes:
    """A long-header packet (type Initial, version 1) padded to ``size`` bytes."""
    head = bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([len(dcid)]) + dcid
    head += bytes([len(scid)]) + scid
    return head + os.urandom(max(0, size - len(head)))


def handshake(dcid: bytes, scid: bytes = CLIENT_CID) -> bytes:
    head = bytes([0xE3]) + (1).to_bytes(4, "big") + bytes([len(dcid)]) + dcid
    return head + bytes([len(scid)]) + scid + os.urandom(40)


def short(dcid: bytes, body: bytes = b"ping") -> bytes:
    return bytes([0x43]) + dcid + body


def free_udp_port(*hosts: str) -> int:
    """A port free on every host (loopback aliases), probed by binding each."""
    for _ in range(50):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind((hosts[0], 0))
        port: int = probe.getsockname()[1]
        held = [probe]
        try:
            for host in hosts[1:]:
                other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(other)
                other.bind((host, port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return port
    raise RuntimeError("no common free UDP port")


class FakeMachine(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[tuple[bytes, Any]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))
        assert self.transport is not None
        if data[0] & 0x80:
            dcid_len = data[5]
            scid_at = 6 + dcid_len
            scid = data[scid_at + 1 : scid_at + 1 + data[scid_at]]
            head = bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([len(scid)]) + scid
            reply = head + bytes([len(MACHINE_CID)]) + MACHINE_CID + self.name.encode()
        else:
            reply = bytes([0x43]) + CLIENT_CID + self.name.encode() + b":" + data[9:]
        self.transport.sendto(reply, addr)

    @property
    def sources(self) -> set[Any]:
        return {addr for _, addr in self.received}

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def start_machine(name: str, host: str, port: int) -> FakeMachine:
    loop = asyncio.get_running_loop()
    _, machine = await loop.create_datagram_endpoint(
        lambda: FakeMachine(name), local_addr=(host, port)
    )
    return machine


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((data, addr))

    def send(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        if not data:
            # asyncio silently skips empty datagrams; UDP allows them, so send one for real.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.sendto(b"", addr)
            return
        self.transport.sendto(data, addr)

    async def recv(self, timeout: float = 10.0) -> tuple[bytes, Any]:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def nothing(self, wait: float = 0.2) -> bool:
        try:
            await asyncio.wait_for(self.queue.get(), wait)
        except TimeoutError:
            return True
        return False

    @property
    def address(self) -> Any:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def udp_client(host: str = "127.0.0.1") -> UdpClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_datagram_endpoint(UdpClient, local_addr=(host, 0))
    return client


class StaticApi:
    """An in-memory Machines API: ``machines`` is what the list call returns."""

    def __init__(self, machines: list[dict[str, Any]] | None = None) -> None:
        self.machines = machines or []
        self.lists = 0
        self.starts: list[str] = []

    def put(
        self,
        machine_id: str,
        private_ip: str,
        *,
        state: str = "started",
        tenant: str = "tenant-a",
        managed: bool = True,
    ) -> None:
        metadata = {META_TENANT: tenant}
        if managed:
            metadata[META_MANAGED_BY] = MANAGED_BY_VALUE
        self.machines = [m for m in self.machines if m["id"] != machine_id]
        self.machines.append(
            {
                "id": machine_id,
                "state": state,
                "private_ip": private_ip,
                "config": {"metadata": metadata},
            }
        )

    async def list_machines(self, *, metadata: Any = None) -> list[dict[str, Any]]:
        self.lists += 1
        return [dict(m) for m in self.machines]

    async def start_machine(self, machine_id: str) -> None:
        self.starts.append(machine_id)
        for machine in self.machines:
            if machine["id"] == machine_id:
                machine["state"] = "started"

    async def wait(self, machine_id: str, state: str, *, timeout: float) -> None:
        return None


class FakeTime:
    """Monotonic time that moves only on ``advance``; ``sleep`` waits for that.

    ``deadlines()`` lists the wake-up times of the sleeps in progress, so a test can wait
    until the code under test is parked (and see until when) before it moves time on.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self.now + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def deadlines(self) -> list[float]:
        return sorted(at for at, future in self._sleepers if not future.done())

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for at, future in self._sleepers:
            if at <= self.now and not future.done():
                future.set_result(None)
