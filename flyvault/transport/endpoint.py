"""Client connect and server listen on top of ``QuicChannel``.

The listener routes datagrams to connections by destination connection id (as aioquic's
own server does) but builds ``VaultQuicConnection``s, drops anything that does not parse as
QUIC (counted, never raised), and caps the number of live connections so that anonymous
peers cannot make the server hold unbounded state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.retry import QuicRetryTokenHandler

from flyvault.errors import (
    ConfigError,
    ConnectError,
    ConnectionLost,
    ExceptionMapping,
    NoAnswer,
    ServerBusy,
    map_exceptions,
)
from flyvault.protocol.constants import ALPN_PROTOCOLS
from flyvault.protocol.proxy_header import HEADER_SIZE, encode_header
from flyvault.transport.admission import AdmissionLimits, AdmissionTable, Stage, Verdict
from flyvault.transport.channel import BUSY_ERROR_CODE, QuicChannel
from flyvault.transport.connection import VaultQuicConnection
from flyvault.transport.pmtu import (
    PathMtuDriver,
    discovery_enabled,
    interface_ceiling,
    loopback_payload_limit,
    set_probe_mode,
)
from flyvault.transport.tls import generate_self_signed
from flyvault.transport.udp import enlarge_buffers, holds_bulk, open_transport

log = logging.getLogger("flyvault.transport")

#: After an ICMP error, how long the vault has to show it is still there.
ICMP_GRACE = 1.5
#: Datagram size without path-MTU discovery (the original used 1200 too).
MAX_DATAGRAM_SIZE = 1200
#: Datagram size when the peer is on loopback, for the handshake. There the first hop is
#: the whole path, and its MTU is 64 KiB, so nothing can black-hole a large datagram; TCP
#: uses that MTU the same way. aioquic's cost is per packet, so bulk throughput grows with
#: the size (this machine kind: 12 MB/s at 1200 bytes, 67 at 8192, 116 at 16000). The
#: bound: aioquic writes a long-header packet's Length field in 2 bytes (at most 16383),
#: so a padded Initial must stay below that.
LOOPBACK_DATAGRAM_SIZE = 16000
#: Loopback's size once the handshake is confirmed, where the socket holds enough such
#: datagrams (``transport.udp.holds_bulk``): only 1-RTT packets are built then, and their
#: STREAM frames carry their length in as many bytes as it needs (aioquic's 2 bytes failed
#: above 16383: ``VaultQuicConnection._write_stream_frame``). It fits the loopback MTU as
#: IPv4 (65507) and IPv6 (65488) UDP payloads and the default max_udp_payload_size (65527;
#: aioquic neither sends nor reads it, and on loopback both ends are ours). A 1 GB download
#: took 12.1 CPU-s across cp, init and the worker at 16000, 9.1 at this size (one pair).
LOOPBACK_BULK_SIZE = 65000
#: Proxy mode (vault-proxy) puts ``u64 LE len(machine_id) || machine_id`` in front of every
#: datagram (``flyvault.protocol.proxy_header``). The QUIC datagram cannot shrink to make
#: room: aioquic refuses a ``max_datagram_size`` below 1200 and RFC 9000 §14.1 wants the
#: client's Initial in a datagram of at least 1200 bytes. So the id is bounded instead: 1200 + 8 + 24 = 1232 bytes
#: is the largest UDP payload that fits the IPv6 minimum MTU (1280 - 40 - 8), so a wrapped
#: datagram fits every path the unwrapped one does. Fly machine ids are 14 characters.
PROXY_HEADER_SIZE = HEADER_SIZE
PROXY_MAX_ID_BYTES = 24
MAX_WRAPPED_DATAGRAM_SIZE = MAX_DATAGRAM_SIZE + PROXY_HEADER_SIZE + PROXY_MAX_ID_BYTES
STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
SERVER_IDLE_TIMEOUT = 60.0
SERVER_KEEPALIVE = 5.0


@dataclass
class TransportSettings:
    idle_timeout: float = 15.0
    keepalive_interval: float = 2.0
    handshake_timeout: float = 10.0
    stream_window: int = STREAM_WINDOW
    connection_window: int = CONNECTION_WINDOW
    alpn_protocols: tuple[str, ...] = ALPN_PROTOCOLS
    #: Wraps each outgoing datagram (the proxy prefix); identity when None.
    datagram_wrapper: Callable[[bytes], bytes] | None = None
    #: Largest UDP payload we send; None picks it from the peer's address
    #: (``datagram_size_for``).
    max_datagram_size: int | None = None
    #: Search the path MTU up to this size even where no search would run (loopback):
    #: for tests. None: the search runs on paths of unknown MTU (see ``transport.pmtu``).
    pmtu_ceiling: int | None = None
    #: Client only: the local address to send from (tests and benchmarks use other
    #: loopback addresses, 127.0.0.x, to act as other hosts); None lets the kernel pick.
    local_host: str | None = None

    @classmethod
    def for_server(cls) -> TransportSettings:
        """Init's settings: a longer idle timeout and sparser pings than a client's (the
        smaller idle timeout of the two ends wins, so the client's decides)."""
        return cls(idle_timeout=SERVER_IDLE_TIMEOUT, keepalive_interval=SERVER_KEEPALIVE)


#: Overrides the datagram size on both ends (1200-16000): to measure a loopback path like a
#: remote one (bench/b6_proxy.py does), or to shrink datagrams on an unusual loopback setup.
DATAGRAM_SIZE_ENV = "FLY_VAULT_DATAGRAM_SIZE"


def forced_datagram_size() -> int | None:
    """The size set by ``FLY_VAULT_DATAGRAM_SIZE``, or None. Raises ``ConfigError``."""
    text = os.environ.get(DATAGRAM_SIZE_ENV, "").strip()
    if not text:
        return None
    value = int(text) if text.isdigit() else 0
    if not MAX_DATAGRAM_SIZE <= value <= LOOPBACK_DATAGRAM_SIZE:
        raise ConfigError(
            f"{DATAGRAM_SIZE_ENV}={text!r} is not a datagram size between "
            f"{MAX_DATAGRAM_SIZE} and {LOOPBACK_DATAGRAM_SIZE}",
            hint=f"unset {DATAGRAM_SIZE_ENV}, or set e.g. {DATAGRAM_SIZE_ENV}=1200",
        )
    return value


def datagram_size_for(peer_host: str, *, proxied: bool = False) -> int:
    """The datagram size a connection starts with: large on loopback, the QUIC minimum
    elsewhere (where path MTU discovery may raise it, see ``transport.pmtu``).

    Only the loopback path is known in advance. Through vault-proxy the next hop is unknown
    whatever the proxy's own address, so 1200 there.
    """
    if proxied:
        return MAX_DATAGRAM_SIZE
    try:
        address = ipaddress.ip_address(peer_host.split("%", 1)[0])
    except ValueError:
        return MAX_DATAGRAM_SIZE
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener sees IPv4 peers this way
    return LOOPBACK_DATAGRAM_SIZE if address.is_loopback else MAX_DATAGRAM_SIZE


def _bulk_size(sock: socket.socket, datagram_size: int) -> int | None:
    """What a connection that starts at ``datagram_size`` on ``sock`` grows to after its
    handshake (``VaultQuicConnection.bulk_datagram_size``): on loopback, the bulk size or
    what the loopback device's MTU allows if that is less (a larger send would fail with
    EMSGSIZE); None where the socket lacks room, the MTU is unknown or no larger."""
    if datagram_size != LOOPBACK_DATAGRAM_SIZE or not holds_bulk(sock):
        return None
    limit = loopback_payload_limit(sock.family)
    if limit is None or limit <= LOOPBACK_DATAGRAM_SIZE:
        return None
    return min(limit, LOOPBACK_BULK_SIZE)


def proxy_prefix(machine_id: str) -> bytes:
    """The vault-proxy header for ``machine_id``, its length checked against the MTU bound."""
    raw = machine_id.encode("utf-8")
    if not raw:
        raise ConfigError("machine_id must not be empty", hint="set `machine_id` or remove it")
    if len(raw) > PROXY_MAX_ID_BYTES:
        raise ConfigError(
            f"machine_id is {len(raw)} bytes; through vault-proxy at most "
            f"{PROXY_MAX_ID_BYTES} fit (each datagram carries it within the 1280-byte "
            "IPv6 minimum MTU)",
            hint="check `machine_id` in the config (Fly machine ids are 14 characters)",
        )
    return encode_header(machine_id)


def proxy_wrapper(machine_id: str) -> Callable[[bytes], bytes]:
    """``TransportSettings.datagram_wrapper`` for proxy mode (raises ``ConfigError``)."""
    prefix = proxy_prefix(machine_id)

    def wrap(datagram: bytes) -> bytes:
        return prefix + datagram

    return wrap


def _configuration(
    settings: TransportSettings, *, is_client: bool, datagram_size: int = MAX_DATAGRAM_SIZE
) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=list(settings.alpn_protocols),
        idle_timeout=settings.idle_timeout,
        max_datagram_size=settings.max_datagram_size or datagram_size,
        max_stream_data=settings.stream_window,
        max_data=settings.connection_window,
    )
    if is_client:
        # The certificate is ephemeral and self-signed by design: trust comes from the
        # attestation JWT bound to this connection's TLS exporter. aioquic still checks
        # the CertificateVerify signature, so the server must hold the certificate's key
        # (the original's flaw S1 does not exist here).
        config.verify_mode = ssl.CERT_NONE
        config.server_name = "fly-vault"
    return config


class _ClientChannel(QuicChannel):
    def __init__(self, quic: VaultQuicConnection, settings: TransportSettings) -> None:
        super().__init__(quic, keepalive_interval=settings.keepalive_interval)
        self._wrap = settings.datagram_wrapper
        #: The handshake failed on ICMP port unreachable (not a TLS alert, not a refusal).
        self.nothing_listening = False

    def error_received(self, exc: Exception) -> None:
        if getattr(exc, "errno", None) == errno.EMSGSIZE:
            # ICMP "fragmentation needed", or a send over the interface's MTU: something
            # was too big for the path, which says nothing about the vault being there.
            if self.pmtu is not None:
                self.pmtu.too_big_reported()
            return
        # ICMP port unreachable arrives as ECONNREFUSED: nothing listens there. Fail the
        # handshake at once instead of waiting out the handshake timeout.
        reason = f"nothing is listening there ({getattr(exc, 'strerror', None) or exc})"
        if not self.quic.handshake_complete:
            self.nothing_listening = True
            self._terminate(reason)
            return
        # On a working connection an ICMP error is only a hint (it can be forged): give up
        # only if the vault has not answered at all for a moment after it, which is what a
        # restarted or dead init looks like. Much sooner than the idle timeout.
        noticed = self._loop.time()
        self._loop.call_later(ICMP_GRACE, self._icmp_check, noticed, reason)

    def _icmp_check(self, noticed: float, reason: str) -> None:
        if not self.is_closed and self.last_received < noticed:
            self.close_now(reason=f"the vault stopped answering: {reason}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._wrap is not None:
            # Proxy mode: every datagram aioquic sends gets the routing prefix, one per
            # datagram, also inside a GSO run (the proxy receives them one by one).
            transport = _WrappingTransport(transport, self._wrap)  # type: ignore[assignment]
        super().connection_made(transport)


class _WrappingTransport:
    """A datagram transport that passes each outgoing datagram through ``wrap``."""

    def __init__(self, inner: Any, wrap: Callable[[bytes], bytes]) -> None:
        self._inner = inner
        self._wrap = wrap

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._inner.sendto(self._wrap(data), addr)

    def send_batch(self, datagrams: list[bytes], addr: Any = None) -> None:
        # The prefix has one length, so wrapped runs still have equal-sized segments.
        wrapped = [self._wrap(data) for data in datagrams]
        send_batch = getattr(self._inner, "send_batch", None)
        if send_batch is not None:
            send_batch(wrapped, addr)
        else:
            for data in wrapped:
                self._inner.sendto(data, addr)

    def send_now(self, data: bytes, addr: Any = None) -> OSError | None:
        send_now = getattr(self._inner, "send_now", None)
        if send_now is None:
            self._inner.sendto(self._wrap(data), addr)
            return None
        error: OSError | None = send_now(self._wrap(data), addr)
        return error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def resolve(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """Resolve ``host:port`` for UDP: the first IPv4 address, else the first address."""
    loop = asyncio.get_running_loop()
    with map_exceptions(
        {
            socket.gaierror: lambda exc: ConnectError(
                f"cannot resolve {host}: {_strerror(exc)}",
                hint="check the vault's address in the config (host:port)",
            )
        }
    ):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise ConnectError(f"cannot resolve {host}: no addresses")
    # Prefer IPv4: Fly routes UDP to a dedicated IPv4 address, not over public IPv6, so a
    # name with both (APP.fly.dev) must not pick the IPv6 one first.
    ipv4 = [info for info in infos if info[0] == socket.AF_INET]
    family, _, _, _, sockaddr = (ipv4 or infos)[0]
    return family, sockaddr


def _strerror(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _handshake_errors(where: str, timeout: float, channel: _ClientChannel) -> ExceptionMapping:
    """What a failed handshake means for the user, per library exception (order matters:
    ``TimeoutError`` is an ``OSError``, ``ConnectionLost`` is ours and comes before the
    catch-all for whatever aioquic raised)."""

    def lost(exc: BaseException) -> ConnectError:
        message = exc.message if isinstance(exc, ConnectionLost) else str(exc)
        if channel.refused_by_peer:
            return ServerBusy(f"{where} is busy: {message}")
        if not getattr(channel, "nothing_listening", False):  # e.g. a TLS alert: it answered
            return ConnectError(f"cannot connect to {where}: {message}")
        return NoAnswer(
            f"cannot connect to {where}: {message}",
            hint="is the vault running, and is the address (host:port) right? "
            "(fly-vault doctor VAULT)",
        )

    return {
        TimeoutError: lambda exc: NoAnswer(
            f"no QUIC answer from {where} within {timeout:g} s",
            hint="is the vault running and is its UDP port reachable? check the address "
            "(fly-vault doctor VAULT)",
        ),
        OSError: lambda exc: NoAnswer(
            f"cannot reach {where}: {_strerror(exc)}",
            hint="is the vault running, and is the address (host:port) right? "
            "(fly-vault doctor VAULT)",
        ),
        ConnectionLost: lost,
        Exception: lambda exc: ConnectError(f"QUIC handshake with {where} failed: {exc}"),
    }


#: The reason our CONNECTION_CLOSE gives when a handshake fails, by what failed it.
_CLOSE_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (TimeoutError, "handshake timeout"),
    (OSError, "socket error"),
)


def _close_reason(error: BaseException) -> str:
    cause = error.__cause__
    return next(
        (reason for kind, reason in _CLOSE_REASONS if isinstance(cause, kind)), "handshake failed"
    )


async def connect(host: str, port: int, settings: TransportSettings | None = None) -> QuicChannel:
    """Open a QUIC connection and wait for the handshake. Raises ``ConnectError``."""
    settings = settings or TransportSettings()
    family, sockaddr = await resolve(host, port)
    loop = asyncio.get_running_loop()
    proxied = settings.datagram_wrapper is not None
    forced = forced_datagram_size()
    enabled = discovery_enabled()
    datagram_size = (
        datagram_size_for(str(sockaddr[0]), proxied=proxied)
        if forced is None or proxied
        else forced
    )
    # Search the path MTU where it is unknown (not on loopback, not through the proxy) and
    # nobody fixed the size.
    discover = settings.pmtu_ceiling is not None or (
        datagram_size == MAX_DATAGRAM_SIZE
        and forced is None
        and not proxied
        and settings.max_datagram_size is None
        and enabled
    )
    if discover:
        datagram_size = MAX_DATAGRAM_SIZE  # where the search starts
    quic = VaultQuicConnection(
        configuration=_configuration(settings, is_client=True, datagram_size=datagram_size)
    )
    local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
    if settings.local_host is not None:
        local = (settings.local_host, 0)
    with map_exceptions(
        {OSError: lambda exc: ConnectError(f"cannot open a UDP socket: {_strerror(exc)}")}
    ):
        # A connected socket: the kernel then reports ICMP "port unreachable" to us, so a
        # vault that is down fails at once instead of after the handshake timeout.
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(local)
            sock.connect(sockaddr)
            enlarge_buffers(sock)
            if forced is None and settings.max_datagram_size is None:
                quic.bulk_datagram_size = _bulk_size(sock, datagram_size)
            discover = discover and set_probe_mode(sock)
            ceiling = settings.pmtu_ceiling or interface_ceiling(sock, LOOPBACK_DATAGRAM_SIZE)
            _, channel = await open_transport(
                loop, sock, lambda: _ClientChannel(quic, settings), connected=True
            )
        except BaseException:
            sock.close()
            raise
    assert isinstance(channel, _ClientChannel)
    channel.peer_address = sockaddr
    where = f"{host}:{port}"
    try:
        with map_exceptions(_handshake_errors(where, settings.handshake_timeout, channel)):
            channel.connect(sockaddr)
            await asyncio.wait_for(channel.wait_handshake(), timeout=settings.handshake_timeout)
    except ConnectError as exc:
        channel.close_now(reason=_close_reason(exc))
        raise
    if discover and ceiling > MAX_DATAGRAM_SIZE:
        channel.pmtu = PathMtuDriver(channel, ceiling=ceiling)
        channel.pmtu.start()
    return channel


def refusal_datagram(version: int, client_dcid: bytes, client_scid: bytes, reason: str) -> bytes:
    """A server Initial that closes a connection before any state exists for it.

    It carries a CONNECTION_CLOSE with CONNECTION_REFUSED, protected with the Initial keys
    that the client's chosen destination id determines (RFC 9001 §5.2), so the client
    learns "server busy" at once instead of retransmitting into silence.
    """
    crypto = CryptoPair()
    crypto.setup_initial(cid=client_dcid, is_client=False, version=version)
    builder = QuicPacketBuilder(
        host_cid=client_dcid,
        is_client=False,
        max_datagram_size=MAX_DATAGRAM_SIZE,
        peer_cid=client_scid,
        version=version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    phrase = reason.encode()[:200]
    buf = builder.start_frame(_TRANSPORT_CLOSE_FRAME, capacity=1 + 3 * 8 + len(phrase))
    buf.push_uint_var(BUSY_ERROR_CODE)
    buf.push_uint_var(0)  # the frame type that caused it: none (PADDING)
    buf.push_uint_var(len(phrase))
    buf.push_bytes(phrase)
    datagrams, _ = builder.flush()
    return datagrams[0]


_TRANSPORT_CLOSE_FRAME = 0x1C
#: Connection ids of connections closed in the last few seconds: late packets for them
#: must not look like new connections (they would take a place in the admission table).
CLOSED_CID_MEMORY = 10.0
CLOSED_CID_LIMIT = 8192


@dataclass
class ListenerStats:
    datagrams: int = 0
    dropped_unparseable: int = 0
    refused: int = 0
    dropped_bad_token: int = 0
    dropped_closed: int = 0
    connections_opened: int = 0
    connections_closed: int = 0
    active: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def source_of(addr: Any) -> str:
    """The source IP that pre-auth limits are kept by (IPv4-mapped IPv6 as IPv4)."""
    host = str(addr[0]) if addr else "unknown"
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:") :]
    return host


class QuicListener(asyncio.DatagramProtocol):
    """Server endpoint: one UDP socket, many channels.

    What a stranger may hold before it authenticates is decided by an ``AdmissionTable``
    (see ``transport.admission``): Retry under load, caps per source and in total, eviction
    of stale strangers, deadlines. The server tells the listener when a connection is being
    served (``set_stage``) and when it authenticated (``authenticated``).
    """

    def __init__(
        self,
        settings: TransportSettings,
        on_channel: Callable[[QuicChannel], None],
        *,
        max_connections: int = 256,
        limits: AdmissionLimits | None = None,
    ) -> None:
        self._settings = settings
        self._config = _configuration(settings, is_client=False)
        certificate, key = generate_self_signed()
        self._config.certificate = certificate
        self._config.private_key = key
        self.certificate = certificate
        self._on_channel = on_channel
        self._max_connections = max_connections
        self._channels: dict[bytes, QuicChannel] = {}
        self._live: set[QuicChannel] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._retry = QuicRetryTokenHandler()
        self.admission = AdmissionTable(limits or AdmissionLimits())
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed_cids: dict[bytes, float] = {}
        self.stats = ListenerStats()
        #: Whether the socket is in path MTU probe mode (set by ``listen``).
        self.probe_mode = False
        #: What loopback connections grow to after the handshake (set by ``listen``).
        self.bulk_size: int | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._transport is not None
        sockname = self._transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.stats.datagrams += 1
        if data and not data[0] & 0x80:
            # Short header (1-RTT, nearly every datagram): the destination id sits at a
            # fixed place, no need to parse the header twice (aioquic parses it again).
            known = self._channels.get(data[1 : 1 + self._config.connection_id_length])
            if known is not None:
                known.datagram_received(data, addr)
                return
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self._config.connection_id_length
            )
        except ValueError:
            self.stats.dropped_unparseable += 1
            return
        assert self._transport is not None
        if (
            header.packet_type != QuicPacketType.VERSION_NEGOTIATION
            and header.version is not None
            and header.version not in self._config.supported_versions
        ):
            self._transport.sendto(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=self._config.supported_versions,
                ),
                addr,
            )
            return
        channel = self._channels.get(header.destination_cid)
        if channel is None:
            if header.packet_type != QuicPacketType.INITIAL or len(data) < 1200:
                self.stats.dropped_unparseable += 1
                return
            if self._recently_closed(header.destination_cid):
                self.stats.dropped_closed += 1
                return
            channel = self._admit(header, addr)
            if channel is None:
                return
        channel.datagram_received(data, addr)

    def _admit(self, header: Any, addr: Any) -> QuicChannel | None:
        """A new connection's Initial: validate, make room, or turn it away statelessly."""
        now = self._loop.time()
        original_cid, retry_cid = header.destination_cid, None
        if header.token:
            try:
                original_cid = self._retry.validate_token(
                    address=addr, destination_cid=header.destination_cid,
                    token=header.token, now=now,
                )  # fmt: skip
            except ValueError:
                # Expired, forged or not ours. The client will not accept a second Retry,
                # so there is nothing useful to answer.
                self.stats.dropped_bad_token += 1
                return None
            retry_cid = header.destination_cid
        source = source_of(addr)
        decision = self.admission.admit(source, validated=retry_cid is not None, now=now)
        if decision.verdict is Verdict.RETRY:
            self._send_retry(header, addr, now)
            return None
        if decision.verdict is Verdict.REFUSE:
            self._refuse(header, addr, decision.reason)
            return None
        if decision.evict is None and len(self._live) >= self._max_connections:
            self.admission.stats.refused += 1
            self._refuse(header, addr, "server full")
            return None
        if isinstance(decision.evict, QuicChannel):
            log.info("evicting a stale unauthenticated connection from %s (%s)",
                     source_of(decision.evict.peer_address), decision.reason)  # fmt: skip
            decision.evict.refuse(decision.reason)
        return self._new_channel(header.destination_cid, addr, original_cid, retry_cid)

    def _refuse(self, header: Any, addr: Any, reason: str) -> None:
        assert self._transport is not None
        self.stats.refused += 1
        self._transport.sendto(
            refusal_datagram(
                header.version, header.destination_cid, header.source_cid, f"server busy: {reason}"
            ),
            addr,
        )

    def _recently_closed(self, cid: bytes) -> bool:
        closed_at = self._closed_cids.get(cid)
        if closed_at is None:
            return False
        if self._loop.time() - closed_at > CLOSED_CID_MEMORY:
            del self._closed_cids[cid]
            return False
        return True

    def _send_retry(self, header: Any, addr: Any, now: float) -> None:
        assert self._transport is not None
        source_cid = os.urandom(8)
        token = self._retry.create_token(
            address=addr,
            original_destination_connection_id=header.destination_cid,
            retry_source_connection_id=source_cid,
            now=now,
        )
        self._transport.sendto(
            encode_quic_retry(
                version=header.version,
                source_cid=source_cid,
                destination_cid=header.source_cid,
                original_destination_cid=header.destination_cid,
                retry_token=token,
            ),
            addr,
        )

    def _new_channel(
        self, cid: bytes, addr: Any, original_cid: bytes, retry_cid: bytes | None
    ) -> QuicChannel:
        config = self._config
        datagram_size = self._settings.max_datagram_size or datagram_size_for(str(addr[0]))
        discovers = self._discovers(datagram_size)
        if discovers:
            datagram_size = MAX_DATAGRAM_SIZE  # where the search starts
        if datagram_size != config.max_datagram_size:
            config = dataclasses.replace(config, max_datagram_size=datagram_size)
        quic = VaultQuicConnection(
            configuration=config,
            original_destination_connection_id=original_cid,
            retry_source_connection_id=retry_cid,
        )
        if self._settings.max_datagram_size is None and datagram_size == LOOPBACK_DATAGRAM_SIZE:
            quic.bulk_datagram_size = self.bulk_size
        channel = QuicChannel(quic, keepalive_interval=self._settings.keepalive_interval)
        if discovers:
            driver = PathMtuDriver(
                channel, ceiling=self._settings.pmtu_ceiling or LOOPBACK_DATAGRAM_SIZE
            )
            channel.pmtu = driver
            channel.on_handshake(driver.start)
        channel.owns_transport = False
        channel.peer_address = addr
        assert self._transport is not None
        channel.connection_made(self._transport)
        channel._connection_id_issued_handler = lambda cid: self._channels.__setitem__(cid, channel)
        channel._connection_id_retired_handler = lambda cid: self._channels.pop(cid, None)
        channel.on_terminated = self._forget
        self._channels[cid] = channel
        self._channels[quic.host_cid] = channel
        self._live.add(channel)
        self.admission.add(channel, source_of(addr), self._loop.time())
        channel.on_handshake(lambda: self.set_stage(channel, Stage.WAITING_PEER))
        self._arm()
        self.stats.connections_opened += 1
        self.stats.active = len(self._live)
        self._on_channel(channel)
        return channel

    def _discovers(self, datagram_size: int) -> bool:
        if self._settings.pmtu_ceiling is not None:
            return True
        return (
            self.probe_mode
            and datagram_size == MAX_DATAGRAM_SIZE
            and self._settings.max_datagram_size is None
        )

    # Called by the server --------------------------------------------------------------

    def set_stage(self, channel: QuicChannel, stage: Stage) -> None:
        """Whose turn it is on a pre-auth connection (no effect once authenticated)."""
        self.admission.set_stage(channel, stage, self._loop.time())
        self._arm()

    def authenticated(self, channel: QuicChannel) -> None:
        """The connection authenticated: it leaves the pre-auth table for good."""
        self.admission.remove(channel)

    # Deadlines -------------------------------------------------------------------------

    def _arm(self) -> None:
        deadline = self.admission.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = self._timer_at = None
        for channel, reason in self.admission.expired(self._loop.time()):
            assert isinstance(channel, QuicChannel)
            log.info("closing unauthenticated connection from %s (%s)",
                     source_of(channel.peer_address), reason)  # fmt: skip
            channel.refuse(reason)
        self._arm()

    def _forget(self, channel: QuicChannel) -> None:
        now = self._loop.time()
        for cid, other in list(self._channels.items()):
            if other is channel:
                del self._channels[cid]
                self._closed_cids[cid] = now
        while len(self._closed_cids) > CLOSED_CID_LIMIT:
            del self._closed_cids[next(iter(self._closed_cids))]
        self.admission.remove(channel)
        if channel in self._live:
            self._live.discard(channel)
            self.stats.connections_closed += 1
        self.stats.active = len(self._live)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for channel in list(self._live):
            channel.close_now(reason="server shutting down")
        if self._transport is not None:
            self._transport.close()


async def listen(
    host: str,
    port: int,
    on_channel: Callable[[QuicChannel], None],
    settings: TransportSettings | None = None,
    *,
    max_connections: int = 256,
    limits: AdmissionLimits | None = None,
) -> QuicListener:
    settings = settings or TransportSettings.for_server()
    forced = forced_datagram_size()
    if forced is not None and settings.max_datagram_size is None:
        settings = dataclasses.replace(settings, max_datagram_size=forced)
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        with map_exceptions(
            {OSError: lambda exc: ConnectError(f"cannot listen on {host}:{port}: {_strerror(exc)}")}
        ):
            if family == socket.AF_INET6:
                # "[::]" serves IPv4 too (dual stack), as the original's default did.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            enlarge_buffers(sock)
    except ConnectError:
        sock.close()
        raise
    enabled = discovery_enabled()
    probe_mode = settings.max_datagram_size is None and enabled and set_probe_mode(sock)
    _, listener = await open_transport(
        loop,
        sock,
        lambda: QuicListener(settings, on_channel, max_connections=max_connections, limits=limits),
    )
    assert isinstance(listener, QuicListener)
    listener.probe_mode = probe_mode
    listener.bulk_size = _bulk_size(sock, LOOPBACK_DATAGRAM_SIZE)
    return listener


__all__ = [
    "DATAGRAM_SIZE_ENV",
    "LOOPBACK_BULK_SIZE",
    "LOOPBACK_DATAGRAM_SIZE",
    "MAX_DATAGRAM_SIZE",
    "MAX_WRAPPED_DATAGRAM_SIZE",
    "PROXY_MAX_ID_BYTES",
    "QuicListener",
    "TransportSettings",
    "connect",
    "datagram_size_for",
    "forced_datagram_size",
    "listen",
    "proxy_prefix",
    "proxy_wrapper",
]
