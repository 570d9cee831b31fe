"""The UDP relay: one public socket for every client, one socket per session to a machine.

Theory of operation
-------------------
A *session* is one flow between a client and a machine. It owns a UDP socket connected to
the machine's ``private_ip:backend_port``; the machine sees that socket's address as the
client's, and replies arriving on it are sent to the client from the public socket, so the
client always talks to the proxy's address.

Sessions are found by **machine id + QUIC destination connection id**, not by the client's
address. A client behind a NAT that rebinds (new source port or address) keeps sending the
same DCID, so its packets land in the same session, the reply address moves to the new
source, and the machine sees no change at all: the QUIC connection survives (reference C9).
The proxy learns a session's DCIDs from the first client packet (the Initial's DCID, chosen
by the client) and from the machine's long-header replies (their SCID is the DCID the client
switches to). A client that starts using a DCID the proxy has not seen (one the machine
issued in an encrypted NEW_CONNECTION_ID frame) is matched by ``(machine id, address)``
and the DCID is learned then. Only when both changed at once does the flow get a new session,
and the machine then sees an ordinary QUIC migration.

Every key includes the machine id, and the machine id is checked against the routing table
on every packet, so a packet can only ever reach the machine it names.

Limits: at most ``max_sessions`` sessions and ``max_sessions_per_ip`` per client IP (each
costs a file descriptor; the original's table was unbounded), at most
``max_cids_per_session`` learned CIDs each; sessions idle longer than ``session_timeout``
are swept. A socket error towards the machine (an ICMP port-unreachable, say) closes the
session at once instead of leaving a live session with a dead relay (reference §5 bug 2).

Path MTU: the public socket is in "probe" mode (``IP_MTU_DISCOVER`` /
``IPV6_MTU_DISCOVER`` = ``*_PMTUDISC_PROBE``, Linux): Don't Fragment, never fragmented
locally. A machine's path MTU search (flyvault.transport.pmtu) runs end to end through the
relay, and a probe larger than the proxy->client path must be lost, not delivered in
fragments that would "confirm" a size the path cannot carry. A reply larger than the
proxy's own interface fails with EMSGSIZE and is counted as ``client_failed``.

Hot path: sockets are read with ``loop.add_reader`` in bounded batches instead of asyncio's
datagram transports, which pay a full event-loop iteration per datagram. Sends never wait:
a full socket buffer drops the datagram (counted) and QUIC's loss recovery does the rest,
which is what a router does too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flyvault.udp_options import set_probe_mode

from .discovery import Directory
from .wire import (
    DEFAULT_CID_LENGTH,
    DEFAULT_MAX_ID_BYTES,
    MIN_INITIAL_DATAGRAM,
    Drop,
    decode,
    destination_cid,
    is_long_header,
    source_cid,
)

log = logging.getLogger("vault-proxy.relay")

#: Large enough for any UDP datagram: a truncated datagram would be silently corrupted.
RECV_SIZE = 65535
_LONG_HEADER = 0x80


@dataclass(frozen=True)
class RelayOptions:
    bind_host: str = "0.0.0.0"
    port: int = 8443
    session_timeout: float = 120.0
    sweep_interval: float | None = None  # default: min(30 s, timeout / 4)
    max_sessions: int = 4096
    max_sessions_per_ip: int = 64
    max_id_bytes: int = DEFAULT_MAX_ID_BYTES
    cid_length: int = DEFAULT_CID_LENGTH
    max_cids_per_session: int = 16
    socket_buffer: int = 4 * 1024 * 1024
    #: Datagrams read per readiness callback: bounds how long one busy socket holds the loop.
    batch: int = 64


class Counters:
    """Plain attributes: incremented per packet, so no locks, dicts or properties."""

    def __init__(self) -> None:
        self.received = 0
        self.relayed_to_machines = 0
        self.relayed_to_clients = 0
        self.sessions_created = 0
        self.sessions_expired = 0
        self.sessions_failed = 0
        self.sessions_replaced = 0
        self.client_rebinds = 0
        self.cids_learned = 0
        self.front_errors = 0
        self.dropped: dict[Drop, int] = dict.fromkeys(Drop, 0)

    def as_json(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "relayed_to_machines": self.relayed_to_machines,
            "relayed_to_clients": self.relayed_to_clients,
            "dropped": {reason.value: count for reason, count in self.dropped.items()},
            "dropped_total": sum(self.dropped.values()),
            "front_errors": self.front_errors,
        }


class Session:
    __slots__ = (
        "backend",
        "cids",
        "client",
        "created",
        "fd",
        "last",
        "machine_id",
        "number",
        "origin_ip",
        "sock",
    )

    def __init__(
        self,
        number: int,
        machine_id: str,
        backend: tuple[str, int],
        client: Any,
        sock: socket.socket,
        now: float,
    ) -> None:
        self.number = number
        self.machine_id = machine_id
        self.backend = backend
        self.client = client
        self.origin_ip: str = client[0]
        self.sock = sock
        self.fd = sock.fileno()
        self.created = now
        self.last = now
        self.cids: collections.deque[tuple[str, bytes]] = collections.deque()


class _LogBudget:
    """A token bucket for per-flow log lines, so a flood cannot turn into a log flood."""

    def __init__(self, rate: float = 20.0, burst: float = 100.0) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.suppressed += 1
        return False


def _peer(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Relay:
    def __init__(
        self,
        directory: Directory,
        options: RelayOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.options = options or RelayOptions()
        self.counters = Counters()
        self._clock = clock
        self._front: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: dict[int, Session] = {}
        self._by_cid: dict[tuple[str, bytes], Session] = {}
        self._by_addr: dict[tuple[str, Any], Session] = {}
        self._per_ip: dict[str, int] = {}
        self._numbers = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._log_budget = _LogBudget()
        #: Header bytes -> machine id, for machines routed before (the fast path).
        self._headers: dict[bytes, str] = {}
        self._header_ids: set[str] = set()
        o = self.options
        self._max_id = o.max_id_bytes
        self._cid_length = o.cid_length
        self._batch = o.batch

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Bind the public socket and start relaying; returns the bound address."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        o = self.options
        infos = await loop.getaddrinfo(o.bind_host, o.port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"cannot resolve {o.bind_host}")
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6 and sockaddr[0] == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # serve IPv4 too
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                # Best effort: the kernel caps it at net.core.[rw]mem_max.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, o.socket_buffer)
            set_probe_mode(sock)
            sock.bind(sockaddr)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._front = sock
        loop.add_reader(sock.fileno(), self._on_front)
        interval = o.sweep_interval or max(0.05, min(30.0, o.session_timeout / 4))
        self._sweeper = loop.create_task(self._sweep_loop(interval))
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        assert self._front is not None
        name = self._front.getsockname()
        return name[0], name[1]

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for session in list(self._sessions.values()):
            self._close(session)
        if self._front is not None and self._loop is not None:
            self._loop.remove_reader(self._front.fileno())
            self._front.close()
            self._front = None

    # -- client -> machine -------------------------------------------------------------------

    def _on_front(self) -> None:
        front = self._front
        if front is None:
            return
        recvfrom = front.recvfrom
        handle = self._client_datagram
        now = self._clock()
        for _ in range(self._batch):
            try:
                data, addr = recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # Not expected on an unconnected socket; never let it stop the loop.
                self.counters.front_errors += 1
                return
            handle(data, addr, now)

    def _client_datagram(self, data: bytes, addr: Any, now: float) -> None:
        counters = self.counters
        counters.received += 1
        size = len(data)
        # Fast path: the exact header bytes of a routable machine seen before (length field
        # included, so only a canonical header hits). Anything else takes the strict decoder.
        machine_id = self._headers.get(data[: 8 + data[0]]) if size > 8 else None
        if machine_id is not None and size > 8 + data[0]:
            offset = 8 + data[0]
        else:
            decoded = decode(data, self._max_id)
            if isinstance(decoded, Drop):
                counters.dropped[decoded] += 1
                return
            machine_id, offset = decoded
        routes = self.directory.routes
        backend = routes.get(machine_id)
        if backend is None:
            counters.dropped[self.directory.miss(machine_id)] += 1
            return
        if machine_id not in self._header_ids:
            self._remember_header(data[:offset], machine_id, routes)
        first = data[offset]
        if first & 0xC0 == 0x40:  # short header: the DCID has the length the machines use
            dcid: bytes | None = data[offset + 1 : offset + 1 + self._cid_length]
            if len(dcid) != self._cid_length:  # type: ignore[arg-type]
                dcid = None
        else:
            dcid = destination_cid(data, offset, self._cid_length)
        if dcid is None:
            counters.dropped[Drop.NOT_QUIC] += 1
            return
        session = self._by_cid.get((machine_id, dcid))
        if session is None:
            session = self._find_or_open(machine_id, backend, addr, data, offset, dcid, now)
            if session is None:
                return
        elif session.client != addr:
            self._rebind(session, addr)
        if session.backend != backend:
            # The machine's address changed (it was replaced): this flow cannot continue
            # on the old socket. Start over towards the new address; QUIC sees a migration.
            session = self._replace(session, backend, addr, dcid, now)
            if session is None:
                return
        session.last = now
        try:
            session.sock.send(data[offset:])  # a bytes slice is cheaper than a memoryview
        except (BlockingIOError, InterruptedError):
            counters.dropped[Drop.BACKEND_BUSY] += 1
            return
        except OSError as exc:
            counters.dropped[Drop.BACKEND_FAILED] += 1
            self._fail(session, exc, "send")
            return
        counters.relayed_to_machines += 1

    def _remember_header(
        self, header: bytes, machine_id: str, routes: dict[str, tuple[str, int]]
    ) -> None:
        # Bounded by the routable machines: rebuilt when stale entries pile up.
        if len(self._headers) > 2 * len(routes) + 64:
            self._headers.clear()
            self._header_ids.clear()
        self._headers[header] = machine_id
        self._header_ids.add(machine_id)

    def _find_or_open(
        self,
        machine_id: str,
        backend: tuple[str, int],
        addr: Any,
        data: bytes,
        offset: int,
        dcid: bytes,
        now: float,
    ) -> Session | None:
        session = self._by_addr.get((machine_id, addr))
        if session is None:
            # Only an Initial (a long header in a full-size datagram) or a 1-RTT packet (a
            # flow whose address and CID both changed, or whose session expired) may open
            # a session; a lone Handshake packet belongs to nothing we could route.
            if is_long_header(data, offset) and len(data) - offset < MIN_INITIAL_DATAGRAM:
                self.counters.dropped[Drop.NO_SESSION] += 1
                return None
            session = self._open(machine_id, backend, addr, now)
            if session is None:
                return None
        self._learn(session, dcid)
        return session

    def _open(
        self, machine_id: str, backend: tuple[str, int], addr: Any, now: float
    ) -> Session | None:
        counters, o = self.counters, self.options
        if len(self._sessions) >= o.max_sessions:
            counters.dropped[Drop.SESSION_LIMIT] += 1
            return None
        ip: str = addr[0]
        if self._per_ip.get(ip, 0) >= o.max_sessions_per_ip:
            counters.dropped[Drop.IP_SESSION_LIMIT] += 1
            return None
        family = socket.AF_INET6 if ":" in backend[0] else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:  # EMFILE: the session limit is above the fd limit
            counters.dropped[Drop.BACKEND_FAILED] += 1
            self._log(
                logging.WARNING, "cannot open a backend socket", "socket_failed", error=str(exc)
            )
            return None
        try:
            sock.setblocking(False)
            sock.connect(backend)  # UDP: no packet, just fixes the peer and the local port
        except OSError as exc:
            sock.close()
            counters.dropped[Drop.BACKEND_FAILED] += 1
            self._log(
                logging.WARNING,
                "cannot reach machine",
                "backend_unreachable",
                machine_id=machine_id,
                backend=_peer(backend),
                error=str(exc),
            )
            return None
        self._numbers += 1
        session = Session(self._numbers, machine_id, backend, addr, sock, now)
        assert self._loop is not None
        self._loop.add_reader(session.fd, self._on_backend, session)
        self._sessions[session.number] = session
        self._by_addr[(machine_id, addr)] = session
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        counters.sessions_created += 1
        self._log(
            logging.INFO,
            "session opened",
            "session_opened",
            session=session.number,
            machine_id=machine_id,
            tenant_id=self.directory.tenants.get(machine_id),
            client=_peer(addr),
            backend=_peer(backend),
            local=_peer(sock.getsockname()),
        )
        return session

    def _learn(self, session: Session, cid: bytes) -> None:
        if not cid:
            return  # zero-length CIDs identify nothing; the address index covers them
        key = (session.machine_id, cid)
        owner = self._by_cid.get(key)
        if owner is session:
            return
        if owner is not None:
            # The newest flow using a CID wins; the old session keeps its other keys.
            with contextlib.suppress(ValueError):
                owner.cids.remove(key)
        cids = session.cids
        if len(cids) >= self.options.max_cids_per_session:
            evicted = cids.popleft()
            if self._by_cid.get(evicted) is session:
                del self._by_cid[evicted]
        cids.append(key)
        self._by_cid[key] = session
        self.counters.cids_learned += 1

    def _rebind(self, session: Session, addr: Any) -> None:
        """The client's address changed (NAT rebinding, roaming): replies follow it."""
        old = session.client
        if self._by_addr.get((session.machine_id, old)) is session:
            del self._by_addr[(session.machine_id, old)]
        self._by_addr[(session.machine_id, addr)] = session
        session.client = addr
        self.counters.client_rebinds += 1
        self._log(
            logging.INFO,
            "client address changed",
            "client_rebind",
            session=session.number,
            machine_id=session.machine_id,
            old=_peer(old),
            new=_peer(addr),
        )

    def _replace(
        self, session: Session, backend: tuple[str, int], addr: Any, dcid: bytes, now: float
    ) -> Session | None:
        self.counters.sessions_replaced += 1
        machine_id = session.machine_id
        self._close(session, "machine address changed")
        fresh = self._open(machine_id, backend, addr, now)
        if fresh is not None:
            self._learn(fresh, dcid)
        return fresh

    # -- machine -> client -------------------------------------------------------------------

    def _on_backend(self, session: Session) -> None:
        front = self._front
        if front is None:
            return
        recv = session.sock.recv
        sendto = front.sendto
        client = session.client
        counters = self.counters
        for _ in range(self._batch):
            try:
                data = recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # ECONNREFUSED after an ICMP port-unreachable: nothing listens there now.
                self._fail(session, exc, "receive")
                return
            if data and data[0] & _LONG_HEADER:
                # Handshake-time packets: their SCID is the DCID the client switches to.
                scid = source_cid(data)
                if scid is not None:
                    self._learn(session, scid)
            try:
                sendto(data, client)
            except (BlockingIOError, InterruptedError):
                counters.dropped[Drop.CLIENT_BUSY] += 1
                continue
            except OSError:
                counters.dropped[Drop.CLIENT_FAILED] += 1
                continue
            counters.relayed_to_clients += 1
        session.last = self._clock()

    # -- teardown ----------------------------------------------------------------------------

    def _fail(self, session: Session, exc: OSError, where: str) -> None:
        self.counters.sessions_failed += 1
        self._log(
            logging.WARNING,
            "relay failed; session closed",
            "session_failed",
            session=session.number,
            machine_id=session.machine_id,
            backend=_peer(session.backend),
            during=where,
            error=exc.strerror or str(exc),
        )
        self._close(session, "relay failed")

    def _close(self, session: Session, reason: str | None = None) -> None:
        if self._sessions.pop(session.number, None) is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(session.fd)
        session.sock.close()
        key = (session.machine_id, session.client)
        if self._by_addr.get(key) is session:
            del self._by_addr[key]
        for cid_key in session.cids:
            if self._by_cid.get(cid_key) is session:
                del self._by_cid[cid_key]
        left = self._per_ip.get(session.origin_ip, 1) - 1
        if left > 0:
            self._per_ip[session.origin_ip] = left
        else:
            self._per_ip.pop(session.origin_ip, None)
        if reason is not None and reason != "relay failed":
            self._log(
                logging.INFO,
                "session closed",
                "session_closed",
                session=session.number,
                machine_id=session.machine_id,
                reason=reason,
            )

    def sweep(self) -> int:
        """Close sessions idle for longer than the timeout; returns how many."""
        limit = self._clock() - self.options.session_timeout
        idle = [s for s in self._sessions.values() if s.last < limit]
        for session in idle:
            self.counters.sessions_expired += 1
            self._close(session, "idle")
        if idle:
            log.info(
                "session cleanup sweep",
                extra={"event": "sweep", "expired": len(idle), "sessions": len(self._sessions)},
            )
        return len(idle)

    async def _sweep_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    # -- reporting ---------------------------------------------------------------------------

    def _log(self, level: int, message: str, event: str, **fields: Any) -> None:
        if not log.isEnabledFor(level) or not self._log_budget.allow():
            return
        if self._log_budget.suppressed:
            fields["suppressed_before"] = self._log_budget.suppressed
            self._log_budget.suppressed = 0
        log.log(level, message, extra={"event": event, **fields})

    def snapshot(self) -> dict[str, Any]:
        c, o = self.counters, self.options
        return {
            "packets": c.as_json(),
            "sessions": {
                "active": len(self._sessions),
                "max": o.max_sessions,
                "max_per_ip": o.max_sessions_per_ip,
                "client_ips": len(self._per_ip),
                "cids": len(self._by_cid),
                "created": c.sessions_created,
                "expired": c.sessions_expired,
                "failed": c.sessions_failed,
                "replaced": c.sessions_replaced,
                "client_rebinds": c.client_rebinds,
                "timeout_secs": o.session_timeout,
            },
        }

    def describe_sessions(self) -> list[dict[str, Any]]:
        """For tests and debugging: one line per session, no payloads."""
        now = self._clock()
        return [
            {
                "session": s.number,
                "machine_id": s.machine_id,
                "client": _peer(s.client),
                "backend": _peer(s.backend),
                "local": _peer(s.sock.getsockname()),
                "cids": [cid.hex() for _, cid in s.cids],
                "idle_secs": round(now - s.last, 3),
            }
            for s in self._sessions.values()
        ]
