"""Path MTU discovery on a live QUIC channel: drives ``flyvault.protocol.pmtu.PmtuSearch``.

The search machine decides; this module does the I/O around it:

* the UDP socket is put in "probe" mode (``IP_MTU_DISCOVER`` / ``IPV6_MTU_DISCOVER`` =
  ``*_PMTUDISC_PROBE``): the kernel sets Don't Fragment and never fragments, so a probe
  larger than the path is dropped (or answered by ICMP) instead of arriving in pieces,
  and the kernel's own path MTU cache does not cap what we try. Anything larger than the
  interface's MTU fails the send with EMSGSIZE: proof that the size cannot work;
* probes are built by ``VaultQuicConnection.build_pmtu_probe`` (PING + PADDING) and sent
  alone (``send_now``), never inside a GSO run of smaller datagrams;
* every acknowledged probe, lost probe and large packet's fate goes to the machine; when
  its confirmed size changes, the connection's datagram size follows (logged at INFO).

Where discovery runs is decided in ``transport.endpoint``: not on loopback (its MTU is
known), not by a client in proxy mode (its datagrams carry the proxy header and stay at
1200; the server behind vault-proxy does search, end to end through the relay, whose
public socket never fragments), not when ``FLY_VAULT_DATAGRAM_SIZE`` fixes the size, and
not when ``FLY_VAULT_PMTU=0``. A probe that never left (refused by the kernel) is taken
out of aioquic's loss recovery again (``abandon_pmtu_probe``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import TYPE_CHECKING

from flyvault.envvars import env_switch
from flyvault.errors import ConfigError
from flyvault.protocol.pmtu import BASE_PLPMTU, PmtuConfig, PmtuSearch, PmtuState
from flyvault.udp_options import IP_MTU, IPV6_MTU, set_probe_mode

if TYPE_CHECKING:
    from flyvault.transport.channel import QuicChannel

log = logging.getLogger("flyvault.transport")

#: ``FLY_VAULT_PMTU=0`` (or false/no/off) turns discovery off: datagrams stay at 1200 bytes.
PMTU_ENV = "FLY_VAULT_PMTU"
#: IP + UDP header bytes in front of a UDP payload.
IPV4_OVERHEAD = 20 + 8
IPV6_OVERHEAD = 40 + 8
#: How soon to look again when the handshake is not confirmed yet (the probe needs it).
NOT_READY_RETRY = 0.05
#: Probes one timer callback may send when each is refused at once (EMSGSIZE).
PROBES_PER_STEP = 16


def discovery_enabled() -> bool:
    """``FLY_VAULT_PMTU``: on unless set to a "no" word. Raises ``ConfigError``."""
    return env_switch(PMTU_ENV, default=True, error=ConfigError)


def _route_payload(sock: socket.socket) -> int | None:
    """The largest UDP payload the route of a connected socket carries (its MTU less the
    IP and UDP headers), or None where the kernel does not say (not Linux)."""
    v6 = sock.family == socket.AF_INET6
    try:
        mtu = sock.getsockopt(
            socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP, IPV6_MTU if v6 else IP_MTU
        )
    except OSError:
        return None
    return int(mtu) - (IPV6_OVERHEAD if v6 else IPV4_OVERHEAD)


def interface_ceiling(sock: socket.socket, limit: int) -> int:
    """The largest UDP payload the route of a connected socket allows, at most ``limit``
    (a larger probe could only fail with EMSGSIZE)."""
    payload = _route_payload(sock)
    return limit if payload is None else max(BASE_PLPMTU, min(limit, payload))


def loopback_payload_limit(family: int) -> int | None:
    """The largest UDP payload the loopback device carries for ``family``, or None where
    the kernel does not say (not Linux)."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(
                ("::1" if family == socket.AF_INET6 else "127.0.0.1", 9)
            )  # UDP: nothing sent
            return _route_payload(probe)
    except OSError:
        return None


class PathMtuDriver:
    """Runs one channel's search; created by the endpoint, started after the handshake."""

    def __init__(self, channel: QuicChannel, *, ceiling: int, config: PmtuConfig | None = None):
        self._channel = channel
        self._quic = channel.quic
        self._loop = asyncio.get_running_loop()
        self.machine = PmtuSearch(config or PmtuConfig(ceiling=ceiling), self._loop.time())
        self._timer: asyncio.TimerHandle | None = None
        self._step_scheduled = False
        self._started = False
        self._quic.on_pmtu_probe = self._probe_fate
        self._quic.watch_packet_fates(self._packet_fate)

    @property
    def search_complete(self) -> bool:
        return self.machine.state is PmtuState.SEARCH_COMPLETE

    def start(self) -> None:
        self._started = True
        self._schedule_step()

    def stop(self) -> None:
        self._started = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def too_big_reported(self) -> None:
        """ICMP "fragmentation needed" for something we sent (EMSGSIZE on a connected
        socket's receive): the probe out, if any, counts as lost now. Only as one loss:
        an ICMP message can be forged, and it may concern an earlier datagram."""
        probe = self.machine.outstanding
        if probe is not None:
            self.machine.probe_lost(probe.probe_id, self._loop.time())
            self._apply()
            self._schedule_step()

    # Fates reported by the connection (inside aioquic's receive and timer handling) -----

    def _probe_fate(self, probe_id: int, acked: bool) -> None:
        now = self._loop.time()
        if acked:
            self.machine.probe_acked(probe_id, now)
        else:
            self.machine.probe_lost(probe_id, now)
        self._apply()
        # Not from inside aioquic's ACK processing: the next probe goes out from the loop.
        self._schedule_step()

    def _packet_fate(self, size: int, sent_at: float, acked: bool) -> None:
        if acked:
            self.machine.packet_acked(size, sent_at)
            return
        before = self.machine.size
        self.machine.packet_lost(size, sent_at, self._loop.time())
        if self.machine.size != before:
            log.info("path MTU to %s: large datagrams stopped arriving (black hole?)", self._peer())
            self._apply()
            self._schedule_step()

    # Probing ------------------------------------------------------------------------------

    def _schedule_step(self) -> None:
        if self._started and not self._step_scheduled:
            self._step_scheduled = True
            self._loop.call_soon(self._step)

    def _step(self) -> None:
        self._step_scheduled = False
        if not self._started or self._channel.is_closed:
            return
        now = self._loop.time()
        deadline = self.machine.next_deadline()
        if deadline is not None and now >= deadline:
            self.machine.handle_timer(now)
        if not self._quic.pmtu_ready():
            self._arm(now + NOT_READY_RETRY)
            return
        sent = False
        for _ in range(PROBES_PER_STEP):
            probe = self.machine.next_probe(now)
            if probe is None:
                break
            built = self._quic.build_pmtu_probe(probe.probe_id, probe.size, now)
            sent = True  # even an abandoned probe may have changed aioquic's loss timer
            if built is None:
                self.machine.probe_lost(probe.probe_id, now)
                break
            packet_number, datagram = built
            error = self._channel.send_alone(datagram)
            if error is None:
                break  # in flight
            # It never left: out of loss recovery (bytes in flight, PTO) again.
            self._quic.abandon_pmtu_probe(packet_number)
            if error.errno != errno.EMSGSIZE:
                self.machine.probe_lost(probe.probe_id, now)
                break
            self.machine.probe_too_big(probe.probe_id, now)
        self._apply()
        if sent:
            # The probe changed aioquic's loss timer; let the channel re-arm it.
            self._channel.transmit()
        self._arm(self.machine.next_deadline())

    def _arm(self, when: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when is not None and self._started:
            self._timer = self._loop.call_at(when, self._schedule_step)

    def _apply(self) -> None:
        size = self.machine.size
        old = self._quic.max_datagram_size
        if size != old:
            self._quic.set_max_datagram_size(size)
            log.info("path MTU to %s: datagram size %d -> %d bytes", self._peer(), old, size)

    def _peer(self) -> str:
        address = self._channel.peer_address
        if not isinstance(address, tuple) or len(address) < 2:
            return str(address)
        host = str(address[0]).removeprefix("::ffff:")
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


__all__ = [
    "PMTU_ENV",
    "PathMtuDriver",
    "discovery_enabled",
    "interface_ceiling",
    "set_probe_mode",
]
