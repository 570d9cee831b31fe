"""UDP socket options the socket module does not name, for the transport and the proxy.

Both the QUIC endpoints (path MTU discovery, ``flyvault.transport.pmtu``) and the proxy's
client-facing socket (``flyvault.proxy.relay``) send with Don't Fragment and without the
kernel's own path MTU cap (``PMTUDISC_PROBE``): an oversized datagram is dropped on the path
or refused with EMSGSIZE, never fragmented, so a probe's loss means what it says. Standard
library only.
"""

from __future__ import annotations

import contextlib
import socket

#: Linux socket options (linux/in.h, linux/in6.h).
IP_MTU_DISCOVER = 10
IP_MTU = 14
IPV6_MTU_DISCOVER = 23
IPV6_MTU = 24
PMTUDISC_PROBE = 3


def set_probe_mode(sock: socket.socket) -> bool:
    """Don't Fragment, no kernel path MTU cap: oversized datagrams are dropped or refused.
    Returns whether the kernel took it (Linux only; elsewhere the default stays)."""
    ok = False
    levels = [(socket.IPPROTO_IP, IP_MTU_DISCOVER)]
    if sock.family == socket.AF_INET6:
        # A dual-stack socket sends IPv4 too: both options apply to it.
        levels.insert(0, (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER))
    for level, option in levels:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, PMTUDISC_PROBE)
            ok = True
    return ok
