#!/usr/bin/env python3
"""B6: vault-proxy forwarding rate, added round-trip time and bulk penalty, loopback only.

    .venv/bin/python bench/b6_proxy.py [--quick] [--rounds N] [--pin] [--out FILE]

One run, three paths measured in the same run and interleaved (direct, proxy, naive, ...):

* **direct**: client -> machine;
* **proxy**: client -> ``vault-proxy`` (a real process, machine map from the Machines API
  stand-in) -> machine;
* **naive**: client -> a plain asyncio UDP relay (per-client upstream socket, header
  stripped, nothing else: the "naive vault-proxy" of the anchors doc) -> machine.

Measurements:

1. *pps*: a blaster process sends ``--packets`` 1200-byte QUIC-shaped datagrams as fast as it
   can (bounded by count and ``--seconds``); a sink process on the "machine" counts them.
   Rate = datagrams the sink got / time between its first and last. Loss and the relay's CPU
   time are recorded too.
2. *RTT*: ping-pong of 64-byte datagrams (``--pings`` of them) to an echo on the machine;
   added RTT = median through a relay - median direct.
3. *bulk*: a real ``fly-vault-init`` (host mode) behind the proxy, an attested client in
   proxy mode vs direct, ``--bulk-mb`` MB pushed through a port forward to a TCP sink; the
   penalty is 1 - proxy/direct throughput. The QUIC connect time is recorded per path.

Every helper is started here, recorded by PID and killed by that PID in a ``finally``; every
loop is bounded in count and in time; everything binds loopback addresses (the machines sit
on 127.0.0.2/127.0.0.3 so one backend port serves both, as on Fly). On a 2-core box the
blaster, the relay and the sink share the cores: read the CPU columns with the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PYTHON = sys.executable
CID = bytes.fromhex("b6b6b6b6b6b6b6b6")
PACKET_SIZE = 1200
CLK_TCK = os.sysconf("SC_CLK_TCK")
HELPER_LIFETIME = 1800.0  # a helper outliving its bench by this much exits by itself
TARGETS = {"pps": 80_000, "added_rtt_us": 150, "bulk_penalty": 0.20}


# Packets ---------------------------------------------------------------------------------


def header(machine_id: str) -> bytes:
    raw = machine_id.encode()
    return len(raw).to_bytes(8, "little") + raw


def initial_packet(size: int = PACKET_SIZE) -> bytes:
    head = bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([8]) + CID + bytes([8]) + CID
    return head + bytes(size - len(head))


def short_packet(marker: bytes, body: bytes, size: int) -> bytes:
    packet = bytes([0x43]) + CID + marker + body
    return packet + bytes(max(0, size - len(packet)))


# Helper processes (bench.py --peer ...) ---------------------------------------------------


def peer_sink(host: str, port: int) -> None:
    """The "machine": counts 'S' datagrams, echoes 'E' and Initials, answers 'R'/'Z'."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind((host, port))
    sock.settimeout(1.0)
    count, first, last = 0, 0.0, 0.0
    clock = time.perf_counter
    end = time.monotonic() + HELPER_LIFETIME
    while time.monotonic() < end:
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if data[:1] == b"\x43" and len(data) > 9:
            if data[9] == 0x53:  # 'S': count only
                last = clock()
                count += 1
                if count == 1:
                    first = last
            else:
                sock.sendto(data, addr)
        elif data[:1] == b"\xc3":
            sock.sendto(data[:24], addr)  # a long header back: the flow is open
        elif data == b"R":
            sock.sendto(json.dumps({"count": count, "span": last - first}).encode(), addr)
        elif data == b"Z":
            count, first, last = 0, 0.0, 0.0
            sock.sendto(b"Z", addr)


def peer_blast(host: str, port: int, machine: str, count: int, seconds: float, rate: float) -> None:
    """Send ``count`` datagrams, at ``rate`` per second (0: as fast as the socket takes
    them); print what was sent."""
    prefix = header(machine) if machine != "-" else b""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.settimeout(0.5)
    for _ in range(20):  # open the flow first (the relay learns the CID from the Initial)
        sock.send(prefix + initial_packet())
        try:
            sock.recv(2048)
            break
        except TimeoutError:
            continue
    else:
        print(json.dumps({"error": "no answer to the Initial"}))
        return
    sock.settimeout(None)
    data = prefix + short_packet(b"S", b"", PACKET_SIZE)
    send = sock.send
    sent, started = 0, time.perf_counter()
    deadline = started + seconds
    burst = 50 if rate else 500
    while sent < count:
        for _ in range(burst):
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                send(data)
        sent += burst
        now = time.perf_counter()
        if now > deadline:
            break
        if rate:
            ahead = started + sent / rate - now
            if ahead > 0.0005:
                time.sleep(ahead)
            else:
                while time.perf_counter() < started + sent / rate:  # bounded: < 0.5 ms
                    pass
    print(json.dumps({"sent": sent, "elapsed": time.perf_counter() - started}))


def peer_naive(listen_port: int, target_host: str, target_port: int) -> None:
    """A plain asyncio UDP relay: per-client upstream endpoint, header stripped."""

    class Upstream(asyncio.DatagramProtocol):
        def __init__(self, front: asyncio.DatagramTransport, client: Any) -> None:
            self.front, self.client = front, client

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.front.sendto(data, self.client)

    class Front(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.upstreams: dict[Any, Any] = {}
            self.transport: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            n = int.from_bytes(data[:8], "little")
            if n > 64 or len(data) <= 8 + n:
                return
            payload = data[8 + n :]
            upstream = self.upstreams.get(addr)
            if isinstance(upstream, list):
                upstream.append(payload)  # still connecting
            elif upstream is not None:
                upstream.sendto(payload)
            else:
                self.upstreams[addr] = [payload]
                asyncio.get_running_loop().create_task(self.open(addr))

        async def open(self, addr: Any) -> None:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: Upstream(self.transport, addr), remote_addr=(target_host, target_port)
            )
            for payload in self.upstreams[addr]:
                transport.sendto(payload)
            self.upstreams[addr] = transport

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", listen_port))
        await asyncio.sleep(HELPER_LIFETIME)

    asyncio.run(main())


def peer_tcp_sink(port_file: str) -> None:
    """Reads each connection to EOF, answers the byte count (8 bytes), closes."""
    server = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(server.getsockname()[1]))
    server.settimeout(1.0)
    end = time.monotonic() + HELPER_LIFETIME

    def serve(conn: socket.socket) -> None:
        total = 0
        with conn:
            while chunk := conn.recv(1 << 20):
                total += len(chunk)
            conn.sendall(total.to_bytes(8, "big"))

    while time.monotonic() < end:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# Harness ----------------------------------------------------------------------------------


class Helpers:
    """Every process started here, killed by PID at the end."""

    def __init__(self, pin: bool) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pin = pin

    def start(
        self, args: list[str], *, cpu: int | None = None, log: Path | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        command = [PYTHON, *args]
        if self.pin and cpu is not None:
            command = ["taskset", "-c", str(cpu), *command]
        with contextlib.ExitStack() as stack:
            if log is not None:
                kw["stderr"] = stack.enter_context(open(log, "wb"))  # the child keeps a dup
            proc = subprocess.Popen(command, **kw)
        self.procs.append(proc)
        return proc

    def peer(self, *args: str, cpu: int | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        return self.start([__file__, "--peer", *args], cpu=cpu, **kw)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port(*hosts: str) -> int:
    for _ in range(50):
        socks = []
        try:
            first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(first)
            first.bind((hosts[0], 0))
            port: int = first.getsockname()[1]
            for host in hosts[1:]:
                other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(other)
                other.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free common port")


def wait_file(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)
    return path.read_text()


def control(addr: tuple[str, int], message: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        for _ in range(10):
            sock.sendto(message, addr)
            try:
                return sock.recv(4096)
            except TimeoutError:
                continue
    raise RuntimeError(f"sink at {addr} does not answer")


def stats_us(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)

    def q(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1e6, 1)

    return {"n": len(ordered), "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99)}


def measure_pps(
    helpers: Helpers,
    target: tuple[str, int],
    machine: str,
    sink: tuple[str, int],
    args: Any,
    relay_pid: int | None,
    rate: float = 0.0,
) -> dict[str, Any]:
    control(sink, b"Z")
    cpu_before = cpu_seconds(relay_pid) if relay_pid else 0.0
    blaster = helpers.peer(
        "blast",
        target[0],
        str(target[1]),
        machine,
        str(args.packets),
        str(args.seconds),
        str(rate),
        cpu=0,
        stdout=subprocess.PIPE,
    )
    out, _ = blaster.communicate(timeout=args.seconds + 30)
    sent = json.loads(out)
    time.sleep(0.3)  # let the last datagrams land
    report = json.loads(control(sink, b"R"))
    cpu = (cpu_seconds(relay_pid) - cpu_before) if relay_pid else None
    rate = report["count"] / report["span"] if report["span"] > 0 else 0.0
    result = {
        "sent": sent.get("sent"),
        "offered_pps": round(sent["sent"] / sent["elapsed"]) if "sent" in sent else None,
        "delivered": report["count"],
        "pps": round(rate),
        "loss": round(1 - report["count"] / sent["sent"], 4) if sent.get("sent") else None,
    }
    if cpu is not None and report["span"] > 0:
        result["relay_cpu_s"] = round(cpu, 3)
        result["pps_per_relay_cpu_s"] = round(report["count"] / cpu) if cpu else None
    return result


def measure_rtt(target: tuple[str, int], machine: str, pings: int) -> dict[str, Any]:
    prefix = header(machine) if machine != "-" else b""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(target)
    sock.settimeout(1.0)
    for _ in range(20):
        sock.send(prefix + initial_packet())
        try:
            sock.recv(2048)
            break
        except TimeoutError:
            continue
    samples, lost = [], 0
    clock = time.perf_counter
    for seq in range(pings + 50):  # 50 warm-up pings are not recorded
        ping = prefix + short_packet(b"E", seq.to_bytes(8, "big"), 64)
        started = clock()
        sock.send(ping)
        try:
            while True:
                answer = sock.recv(2048)
                if answer[10:18] == seq.to_bytes(8, "big"):
                    break
        except TimeoutError:
            lost += 1
            continue
        if seq >= 50:
            samples.append(clock() - started)
    sock.close()
    return {**stats_us(samples), "lost": lost}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small numbers (about a minute)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per path")
    parser.add_argument("--packets", type=int, help="datagrams per pps run")
    parser.add_argument("--seconds", type=float, default=5.0, help="time cap of a pps run")
    parser.add_argument("--pings", type=int, help="RTT samples per path")
    parser.add_argument("--bulk-mb", type=int, help="MB per forward transfer")
    parser.add_argument("--no-bulk", action="store_true", help="skip the forward benchmark")
    parser.add_argument(
        "--pin", action="store_true", help="blaster, sink, client on CPU 0; relays, init on CPU 1"
    )
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/...)")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    if args.peer:
        return run_peer(args.peer)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.packets = args.packets or (100_000 if args.quick else 500_000)
    args.pings = args.pings or (500 if args.quick else 3000)
    args.bulk_mb = args.bulk_mb or (20 if args.quick else 100)
    results: dict[str, Any] = {
        "benchmark": "B6",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "sha": _git("rev-parse", "--short", "HEAD"),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "settings": {
            k: getattr(args, k)
            for k in ("quick", "rounds", "packets", "seconds", "pings", "bulk_mb", "pin")
        },
        "note": args.note,
        "targets": TARGETS,
    }
    helpers = Helpers(args.pin)
    if args.pin:
        # Load generators (blaster, sink, the bulk client in this process) on CPU 0, the
        # relays and init on CPU 1: the relay's rate is then what one core does.
        os.sched_setaffinity(0, {0})
    tmp = Path(tempfile.mkdtemp(prefix="fvb6-"))
    try:
        results.update(run_all(helpers, tmp, args))
    finally:
        helpers.stop_all()
    out = args.out or REPO / "bench" / "results" / (
        f"b6-{dt.datetime.now(dt.UTC):%Y-%m-%d}-{results['sha'] or 'nogit'}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    print(f"\nresults: {out}")
    return 0


def run_peer(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "sink":
        peer_sink(rest[0], int(rest[1]))
    elif kind == "blast":
        peer_blast(rest[0], int(rest[1]), rest[2], int(rest[3]), float(rest[4]), float(rest[5]))
    elif kind == "naive":
        peer_naive(int(rest[0]), rest[1], int(rest[2]))
    elif kind == "tcp-sink":
        peer_tcp_sink(rest[0])
    else:
        return 2
    return 0


def run_all(helpers: Helpers, tmp: Path, args: Any) -> dict[str, Any]:
    from flyvault.proxy.discovery import MANAGED_BY_VALUE, META_MANAGED_BY, META_TENANT
    from flyvault.standins.machines import MachinesStandin

    port = free_port("127.0.0.2", "127.0.0.3")
    sink_addr = ("127.0.0.3", port)
    helpers.peer("sink", *map(str, sink_addr), cpu=0)
    control(sink_addr, b"Z")
    with MachinesStandin(apps=("b6-tenants",), token="b6-token") as standin:
        ids = {}
        for name, ip in (("vault", "127.0.0.2"), ("sink", "127.0.0.3")):
            body = {
                "config": {
                    "image": "b6",
                    "metadata": {META_MANAGED_BY: MANAGED_BY_VALUE, META_TENANT: f"b6-{name}"},
                }
            }
            _, reply = standin.model.handle("POST", "/v1/apps/b6-tenants/machines", {}, body, None)
            ids[name] = reply["id"]
            with standin.model.lock:
                standin.model.machine(ids[name], "b6-tenants").private_ip = ip
            standin.model.set_state(ids[name], "started", "b6-tenants")
        ready = tmp / "proxy.json"
        env = dict(
            os.environ,
            FLY_APP="b6-tenants",
            FLY_API_TOKEN="b6-token",
            FLY_API_BASE=standin.base_url,
        )
        proxy = helpers.start(
            [
                "-m",
                "flyvault.proxy.main",
                "--bind",
                "127.0.0.1",
                "--port",
                "0",
                "--backend-port",
                str(port),
                "--status",
                "127.0.0.1:0",
                "--ready-file",
                str(ready),
                "--log-level",
                "warning",
            ],
            cpu=1,
            env=env,
            cwd=REPO,
            log=tmp / "proxy.log",
        )
        proxy_port = json.loads(wait_file(ready, proxy, "vault-proxy"))["port"]
        naive_port = free_port("127.0.0.1")
        naive = helpers.peer("naive", str(naive_port), *map(str, sink_addr), cpu=1)
        time.sleep(0.5)
        paths = {
            "direct": (sink_addr, "-", None),
            "proxy": (("127.0.0.1", proxy_port), ids["sink"], proxy.pid),
            "naive": (("127.0.0.1", naive_port), ids["sink"], naive.pid),
        }
        pps: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        paced: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        rtt: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for round_ in range(args.rounds):
            order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
            for name in order:
                target, machine, pid = paths[name]
                pps[name].append(measure_pps(helpers, target, machine, sink_addr, args, pid))
                # At the target rate: does it keep up (loss), at what CPU cost?
                paced[name].append(
                    measure_pps(helpers, target, machine, sink_addr, args, pid, TARGETS["pps"])
                )
                rtt[name].append(measure_rtt(target, machine, args.pings))
                print(
                    f"  round {round_ + 1} {name:<6} pps {pps[name][-1]['pps']:>8,} "
                    f"(loss {pps[name][-1]['loss']:.1%}); at {TARGETS['pps']:,}/s offered: "
                    f"loss {paced[name][-1]['loss']:.2%}; "
                    f"rtt p50 {rtt[name][-1]['p50_us']} us",
                    flush=True,
                )
        summary: dict[str, Any] = {"pps": pps, "paced_at_target": paced, "rtt": rtt}
        summary["pps_median"] = {n: statistics.median(r["pps"] for r in pps[n]) for n in paths}
        summary["pps_per_relay_cpu_s_median"] = {
            n: statistics.median(r["pps_per_relay_cpu_s"] or 0 for r in pps[n])
            for n in ("proxy", "naive")
        }
        summary["loss_at_target_median"] = {
            n: statistics.median(r["loss"] for r in paced[n]) for n in paths
        }
        summary["rtt_p50_median_us"] = {
            n: statistics.median(r["p50_us"] for r in rtt[n]) for n in paths
        }
        direct_rtt = summary["rtt_p50_median_us"]["direct"]
        summary["added_rtt_us"] = {
            n: round(summary["rtt_p50_median_us"][n] - direct_rtt, 1) for n in ("proxy", "naive")
        }
        if not args.no_bulk:
            print("  bulk through a forward (direct vs proxy) ...", flush=True)
            summary["bulk"] = run_bulk(
                helpers, tmp, args, ids["vault"], port, proxy_port, proxy.pid
            )
        return summary


# Bulk through a forward: real init, real attested client ---------------------------------


def run_bulk(
    helpers: Helpers,
    tmp: Path,
    args: Any,
    machine_id: str,
    port: int,
    proxy_port: int,
    proxy_pid: int,
) -> dict[str, Any]:
    for variable in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        (tmp / variable).mkdir(exist_ok=True)
        os.environ[variable] = str(tmp / variable)  # the attestation cache goes here
    # Like for like: through the proxy the client sends 1200-byte datagrams, so the direct
    # path must too (on loopback it would otherwise use 16,000; references/protocol.md).
    # Both this process (the client) and the init started below read it.
    os.environ["FLY_VAULT_DATAGRAM_SIZE"] = "1200"
    from flyvault.standins import FlyApiSocket, MachineIdentity, OidcIssuer

    token = "b6-access-token-0123456789abcdef"
    with (
        OidcIssuer() as issuer,
        FlyApiSocket(
            tmp / "fly.sock",
            issuer,
            MachineIdentity.default("b6-org", "b6-tenants", machine_id=machine_id),
        ) as api,
    ):
        (tmp / "init").mkdir(exist_ok=True)
        ready = tmp / "init.json"
        init = helpers.start(
            [
                "-m",
                "flyvault.server.main",
                "--listen",
                f"127.0.0.2:{port}",
                "--data-dir",
                str(tmp / "init"),
                "--fly-api-socket",
                str(api.path),
                "--ready-file",
                str(ready),
                "--host-mode",
                "--log-level",
                "warning",
            ],
            cpu=1,
            env=dict(os.environ, ACCESS_TOKEN=token),
            cwd=REPO,
            log=tmp / "init.log",
        )
        wait_file(ready, init, "fly-vault-init")
        sink_file = tmp / "tcp-sink.port"
        sink = helpers.peer("tcp-sink", str(sink_file))
        sink_port = int(wait_file(sink_file, sink, "tcp sink"))
        return asyncio.run(
            _bulk_rounds(
                args, issuer.base_url, machine_id, token, port, proxy_port, sink_port, proxy_pid
            )
        )


async def _bulk_rounds(
    args: Any,
    issuer_url: str,
    machine_id: str,
    token: str,
    port: int,
    proxy_port: int,
    sink_port: int,
    proxy_pid: int,
) -> dict[str, Any]:
    from flyvault.client.connection import open_vault
    from flyvault.client.forward import ForwardListener
    from flyvault.config import ForwardSpec, VaultConfig

    total = args.bulk_mb * 1_000_000
    chunk = bytes(256 * 1024)
    rates: dict[str, list[float]] = {"direct": [], "proxy": []}
    connects: dict[str, list[float]] = {"direct": [], "proxy": []}
    proxy_cpu: list[float] = []
    # Warm-up (not recorded): the first connect fetches the issuer's keys and imports code.
    warm = VaultConfig(
        name="b6",
        org="b6-org",
        app="b6-tenants",
        access_token=token,
        address=f"127.0.0.2:{port}",
        machine_id=machine_id,
        oidc_issuer_url=issuer_url,
    )
    (await asyncio.wait_for(open_vault(warm), 30)).close()
    for round_ in range(args.rounds):
        for mode in ("direct", "proxy") if round_ % 2 == 0 else ("proxy", "direct"):
            via_proxy = mode == "proxy"
            entry = VaultConfig(
                name="b6",
                org="b6-org",
                app="b6-tenants",
                access_token=token,
                address=f"127.0.0.1:{proxy_port}" if via_proxy else f"127.0.0.2:{port}",
                machine_id=machine_id,
                proxy=via_proxy,
                oidc_issuer_url=issuer_url,
            )
            started = time.perf_counter()
            connection = await asyncio.wait_for(open_vault(entry), 30)
            connects[mode].append((time.perf_counter() - started) * 1000)

            async def provider(current: Any = connection) -> Any:
                return current

            listener = ForwardListener(
                ForwardSpec(1, "127.0.0.1", sink_port), provider, local_port=0
            )
            await listener.start()
            cpu_before = cpu_seconds(proxy_pid)
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            started = time.perf_counter()
            sent = 0
            while sent < total:  # bounded by the byte count
                writer.write(chunk[: min(len(chunk), total - sent)])
                sent += min(len(chunk), total - sent)
                await asyncio.wait_for(writer.drain(), 60)
            writer.write_eof()
            counted = int.from_bytes(await asyncio.wait_for(reader.readexactly(8), 120), "big")
            elapsed = time.perf_counter() - started
            if via_proxy:
                proxy_cpu.append(cpu_seconds(proxy_pid) - cpu_before)
            writer.close()
            await listener.close()
            connection.close()
            if counted != total:
                raise RuntimeError(f"forward moved {counted} of {total} bytes")
            rates[mode].append(total / elapsed / 1e6)
            print(f"  bulk round {round_ + 1} {mode:<6} {rates[mode][-1]:.1f} MB/s", flush=True)
    direct = statistics.median(rates["direct"])
    proxied = statistics.median(rates["proxy"])
    return {
        "mb_per_transfer": args.bulk_mb,
        "rates_mb_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
        "direct_mb_s": round(direct, 1),
        "proxy_mb_s": round(proxied, 1),
        "penalty": round(1 - proxied / direct, 3),
        "proxy_cpu_s_per_transfer": [round(c, 2) for c in proxy_cpu],
        "connect_ms": {k: round(statistics.median(v), 1) for k, v in connects.items()},
    }


def print_summary(results: dict[str, Any]) -> None:
    print("\nB6 vault-proxy (loopback, same run)")
    print(f"{'path':<8}{'pps (median)':>14}{'rtt p50 us':>12}{'added us':>10}")
    added = results.get("added_rtt_us", {})
    for name in ("direct", "proxy", "naive"):
        if name in results.get("pps_median", {}):
            print(
                f"{name:<8}{results['pps_median'][name]:>14,.0f}"
                f"{results['rtt_p50_median_us'][name]:>12}{added.get(name, 0):>10}"
            )
    per_cpu = results.get("pps_per_relay_cpu_s_median", {})
    loss = results.get("loss_at_target_median", {})
    for name in ("proxy", "naive"):
        if name in per_cpu:
            print(
                f"{name}: {per_cpu[name]:,.0f} datagrams per relay CPU-second; "
                f"loss at {TARGETS['pps']:,}/s offered: {loss.get(name, 0):.2%}"
            )
    bulk = results.get("bulk")
    if bulk and "penalty" in bulk:
        print(
            f"bulk forward: direct {bulk['direct_mb_s']} MB/s, proxy {bulk['proxy_mb_s']} MB/s, "
            f"penalty {bulk['penalty']:.1%}; connect p50 direct {bulk['connect_ms']['direct']} ms, "
            f"proxy {bulk['connect_ms']['proxy']} ms"
        )
    print(
        f"targets: >= {TARGETS['pps']:,} pps, <= +{TARGETS['added_rtt_us']} us, "
        f"<= {TARGETS['bulk_penalty']:.0%} bulk penalty"
    )


def _git(*args: str) -> str | None:
    try:
        return (
            subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
