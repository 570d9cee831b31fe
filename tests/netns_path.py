"""A three-namespace IPv4 path whose smallest MTU is in the middle hop (root only):

    client ns  --veth mtu 1500--  router ns (ip_forward=1)  --veth mtu HOP--  server ns

``icmp=True``: both ends of the second veth have the hop MTU, so the router refuses larger
packets with ICMP "fragmentation needed". ``icmp=False``: only the server's end has it;
the router sends up to 1500 bytes and the server's veth drops what is too big without a
word (a silent black hole, no firewall involved). Veth admits a few bytes over its MTU on
receive (room for a VLAN tag), so the silent path carries up to ``hop + 4`` bytes of IP.

Names are unique per use; the namespaces (and with them the veths and any process left
in them) are deleted on exit whatever happened. Only traffic inside them is generated.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

CLIENT_ADDRESS = "10.231.1.1"
ROUTER_CLIENT_SIDE = "10.231.1.2"
ROUTER_SERVER_SIDE = "10.231.2.1"
SERVER_ADDRESS = "10.231.2.2"
EDGE_MTU = 1500
IPV4_UDP_OVERHEAD = 28
#: What veth accepts beyond its MTU on receive (VLAN_HLEN), see the module docstring.
VETH_RECEIVE_SLACK = 4


@dataclass(frozen=True)
class NetnsPath:
    client_ns: str
    router_ns: str
    server_ns: str
    hop_mtu: int
    icmp: bool

    @property
    def largest_payload(self) -> int:
        """The largest UDP payload from client to server that arrives."""
        slack = 0 if self.icmp else VETH_RECEIVE_SLACK
        return self.hop_mtu + slack - IPV4_UDP_OVERHEAD

    @property
    def largest_reply_payload(self) -> int:
        """The largest UDP payload from server to client: its own veth's MTU decides."""
        return self.hop_mtu - IPV4_UDP_OVERHEAD

    def exec_argv(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]


def netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns add, veth pairs)"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@contextlib.contextmanager
def netns_path(hop_mtu: int, *, icmp: bool = True) -> Iterator[NetnsPath]:
    tag = secrets.token_hex(3)
    path = NetnsPath(f"fvpc{tag}", f"fvpr{tag}", f"fvps{tag}", hop_mtu, icmp)
    created: list[str] = []
    try:
        for ns in (path.client_ns, path.router_ns, path.server_ns):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        a, b = f"fva{tag}", f"fvb{tag}"
        _ip("link", "add", f"{a}c", "netns", path.client_ns, "mtu", str(EDGE_MTU), "type", "veth",
            "peer", "name", f"{a}r", "netns", path.router_ns, "mtu", str(EDGE_MTU))  # fmt: skip
        router_mtu = hop_mtu if icmp else EDGE_MTU
        _ip("link", "add", f"{b}r", "netns", path.router_ns, "mtu", str(router_mtu), "type",
            "veth", "peer", "name", f"{b}s", "netns", path.server_ns, "mtu", str(hop_mtu))  # fmt: skip
        for ns, dev, address in (
            (path.client_ns, f"{a}c", CLIENT_ADDRESS),
            (path.router_ns, f"{a}r", ROUTER_CLIENT_SIDE),
            (path.router_ns, f"{b}r", ROUTER_SERVER_SIDE),
            (path.server_ns, f"{b}s", SERVER_ADDRESS),
        ):
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", path.client_ns, "route", "add", "default", "via", ROUTER_CLIENT_SIDE)
        _ip("-n", path.server_ns, "route", "add", "default", "via", ROUTER_SERVER_SIDE)
        subprocess.run(
            path.exec_argv(path.router_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"),
            check=True, capture_output=True, timeout=20,
        )  # fmt: skip
        yield path
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
