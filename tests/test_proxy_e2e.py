"""vault-proxy end to end on loopback: real init servers, a real proxy process, real QUIC.

Two ``fly-vault-init`` processes play two tenant machines of one app (127.0.0.2 and
127.0.0.3, same port); the Machines API stand-in says where they are; ``vault-proxy`` runs
as its own process on 127.0.0.1; the client connects in proxy mode (``proxy = true``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import APP, ORG, TOKEN, InitProcess, run_async, start_init, vault_entry
from proxy_support import add_machine, free_udp_port, set_private_ip

from flyvault.client.connection import open_vault
from flyvault.client.vault import Vault
from flyvault.errors import AttestationError
from flyvault.protocol.control import ControlClient
from flyvault.standins import FlyApiSocket, MachineIdentity, OidcIssuer
from flyvault.standins.machines import MachinesStandin
from flyvault.transport.endpoint import MAX_WRAPPED_DATAGRAM_SIZE, proxy_prefix

API_TOKEN = "standin-api-token-0123456789"


@dataclass
class Tenants:
    standin: MachinesStandin
    port: int
    ids: dict[str, str]  # "a"/"b" -> machine id
    inits: dict[str, InitProcess]
    apis: dict[str, FlyApiSocket]
    tmp: Path


@pytest.fixture
def tenants(tmp_path: Path, issuer: OidcIssuer) -> Iterator[Tenants]:
    with MachinesStandin(apps=(APP,), token=API_TOKEN) as standin, contextlib.ExitStack() as stack:
        port = free_udp_port("127.0.0.2", "127.0.0.3")
        world = Tenants(standin, port, {}, {}, {}, tmp_path)
        for name, host in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            machine_id = add_machine(standin, tenant=f"tenant-{name}", private_ip=host)
            home = tmp_path / name
            home.mkdir()
            identity = MachineIdentity.default(ORG, APP, machine_id=machine_id)
            api = stack.enter_context(FlyApiSocket(home / "fly.sock", issuer, identity))
            init = start_init(home, api.path, extra_args=("--listen", f"{host}:{port}"))
            stack.callback(init.stop)
            world.ids[name], world.inits[name], world.apis[name] = machine_id, init, api
        yield world


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    port: int
    status_port: int
    log: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.status_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                body: dict[str, Any] = json.load(answer)
        except urllib.error.HTTPError as exc:  # 503 still carries the body
            body = json.load(exc)
        return body

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_proxy(world: Tenants, *extra: str) -> ProxyProcess:
    ready = world.tmp / "proxy-ready.json"
    ready.unlink(missing_ok=True)
    log = world.tmp / "proxy.log"
    env = dict(
        os.environ,
        FLY_APP=APP,
        FLY_API_TOKEN=API_TOKEN,
        FLY_API_BASE=world.standin.base_url,
    )
    command = [
        sys.executable,
        "-m",
        "flyvault.proxy.main",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--backend-port",
        str(world.port),
        "--status",
        "127.0.0.1:0",
        "--ready-file",
        str(ready),
        "--refresh-interval-secs",
        "1",
        "--min-refresh-interval-secs",
        "0.1",
        "--log-level",
        "debug",
        *extra,
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"vault-proxy did not start: {log.read_text()}")
        time.sleep(0.02)
    info = json.loads(ready.read_text())
    return ProxyProcess(process, info["port"], info["status_port"], log)


@pytest.fixture
def proxies(tenants: Tenants) -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.stop()


def test_clients_reach_each_tenant_machine_through_one_proxy(
    tenants: Tenants, proxies: list[ProxyProcess], issuer: OidcIssuer
) -> None:
    proxy = start_proxy(tenants)
    proxies.append(proxy)

    async def scenario() -> None:
        for name in ("a", "b"):
            machine_id = tenants.ids[name]
            entry = vault_entry(proxy.port, issuer, machine_id=machine_id, proxy=True, name=name)
            vault = Vault(entry)
            connection = await vault.connection()
            assert connection.claims.machine_id == machine_id
            assert await vault.list_sessions() == []  # streams work through the proxy
            await vault.close()

    run_async(scenario())
    status = proxy.status()
    assert status["ok"] is True
    assert status["sessions"]["created"] == 2
    assert status["packets"]["relayed_to_machines"] > 10
    assert status["packets"]["relayed_to_clients"] > 10
    assert status["machines"]["routable"] == 2
    opened = [e for e in proxy.log_events() if e.get("event") == "session_opened"]
    assert {e["machine_id"] for e in opened} == set(tenants.ids.values())
    assert {e["tenant_id"] for e in opened} == {"tenant-a", "tenant-b"}
    proxy.stop()  # SIGTERM: a clean exit with the final counters logged
    assert proxy.process.returncode == 0
    assert proxy.log_events()[-1]["event"] == "stop"
    assert API_TOKEN not in proxy.log.read_text()


def test_a_client_for_machine_a_routed_to_b_is_refused_before_the_token_is_sent(
    tenants: Tenants,
    proxies: list[ProxyProcess],
    issuer: OidcIssuer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The proxy's map says A lives where B is: a stale, buggy or malicious routing table.
    set_private_ip(tenants.standin, tenants.ids["a"], "127.0.0.3")
    proxy = start_proxy(tenants)
    proxies.append(proxy)
    setups: list[Any] = []
    original = ControlClient.send_setup

    def recording(self: ControlClient, request: Any) -> None:
        setups.append(request)
        original(self, request)

    monkeypatch.setattr(ControlClient, "send_setup", recording)
    entry = vault_entry(proxy.port, issuer, machine_id=tenants.ids["a"], proxy=True)
    with pytest.raises(AttestationError) as caught:
        run_async(open_vault(entry))
    assert (
        caught.value.message
        == (
            f"attestation machine mismatch: machine_id={tenants.ids['b']!r} "
            f"expected={tenants.ids['a']}"
        )
        or tenants.ids["b"] in caught.value.message
    )
    assert setups == []  # the token never left the client
    assert len(tenants.apis["b"].audiences) == 1  # B did attest (it was B that answered)
    assert tenants.apis["a"].audiences == []
    assert TOKEN not in tenants.inits["b"].log.read_text()


class Nat(asyncio.DatagramProtocol):
    """A NAT between the client and the proxy whose outside port (and address) can change.

    It also taps every datagram the client sends, to check the proxy framing and size.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.client: Any = None
        self.inside: asyncio.DatagramTransport | None = None
        self.outside: asyncio.DatagramTransport | None = None
        self.sizes: list[int] = []
        self.prefixes: set[bytes] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inside = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client = addr
        self.sizes.append(len(data))
        self.prefixes.add(data[: 8 + data[0]] if data else b"")
        assert self.outside is not None
        self.outside.sendto(data, self.upstream)

    async def rebind(self, host: str = "127.0.0.1") -> Any:
        nat = self

        class Outside(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if nat.inside is not None and nat.client is not None:
                    nat.inside.sendto(data, nat.client)

        if self.outside is not None:
            self.outside.close()
        loop = asyncio.get_running_loop()
        self.outside, _ = await loop.create_datagram_endpoint(Outside, local_addr=(host, 0))
        return self.outside.get_extra_info("sockname")


def test_nat_rebinding_keeps_the_quic_connection(
    tenants: Tenants, proxies: list[ProxyProcess], issuer: OidcIssuer
) -> None:
    proxy = start_proxy(tenants)
    proxies.append(proxy)
    machine_id = tenants.ids["a"]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        inside, nat = await loop.create_datagram_endpoint(
            lambda: Nat(("127.0.0.1", proxy.port)), local_addr=("127.0.0.1", 0)
        )
        assert isinstance(nat, Nat)
        first = await nat.rebind()
        nat_port = inside.get_extra_info("sockname")[1]
        entry = vault_entry(nat_port, issuer, machine_id=machine_id, proxy=True)
        vault = Vault(entry)
        try:
            connection = await vault.connection()
            assert await vault.list_sessions() == []
            second = await nat.rebind()  # new source port
            assert await vault.list_sessions() == []
            third = await nat.rebind("127.0.0.4")  # new source address
            assert await vault.list_sessions() == []
            assert len({first, second, third}) == 3
            # The very same QUIC connection throughout: no reconnect happened.
            assert vault.connects == 1 and vault.current is connection
        finally:
            await vault.close()
            inside.close()
        # Every datagram carried A's header and fit the IPv6 minimum MTU.
        assert nat.prefixes == {proxy_prefix(machine_id)}
        assert max(nat.sizes) <= MAX_WRAPPED_DATAGRAM_SIZE
        assert max(nat.sizes) == 1200 + 8 + len(machine_id)  # the padded Initial

    run_async(scenario())
    sessions = proxy.status()["sessions"]
    assert sessions["created"] == 1
    assert sessions["client_rebinds"] == 2
    rebinds = [e for e in proxy.log_events() if e.get("event") == "client_rebind"]
    assert [e["new"].rsplit(":", 1)[0] for e in rebinds] == ["127.0.0.1", "127.0.0.4"]


def test_a_connection_survives_a_proxy_restart(
    tenants: Tenants, proxies: list[ProxyProcess], issuer: OidcIssuer
) -> None:
    """A new proxy knows no sessions: the client's next 1-RTT packet opens one, the machine
    sees a new peer address and QUIC migrates the connection to it."""
    port = free_udp_port("127.0.0.1")
    proxies.append(start_proxy(tenants, "--port", str(port)))
    entry = vault_entry(port, issuer, machine_id=tenants.ids["a"], proxy=True)

    async def scenario() -> None:
        vault = Vault(entry)
        try:
            connection = await vault.connection()
            assert await vault.list_sessions() == []
            await asyncio.to_thread(proxies[0].stop)
            proxies.append(await asyncio.to_thread(start_proxy, tenants, "--port", str(port)))
            assert await asyncio.wait_for(vault.list_sessions(), 20) == []
            assert vault.connects == 1 and vault.current is connection
        finally:
            await vault.close()

    run_async(scenario())
    assert proxies[1].status()["sessions"]["created"] == 1


def test_a_stopped_machine_is_woken_and_the_client_gets_through(
    tenants: Tenants, proxies: list[ProxyProcess], issuer: OidcIssuer
) -> None:
    machine_id = tenants.ids["b"]
    tenants.standin.model.set_state(machine_id, "stopped", APP)
    proxy = start_proxy(tenants)
    proxies.append(proxy)
    assert proxy.status()["machines"]["routable"] == 1
    entry = vault_entry(proxy.port, issuer, machine_id=machine_id, proxy=True)

    async def scenario() -> None:
        # Its retransmitted Initials get through once the machine is up: one handshake,
        # which open_vault bounds (handshake_timeout); no wall-clock bound on top of that,
        # a loaded machine may take its time.
        connection = await open_vault(entry)
        connection.close()

    run_async(scenario())
    starts = tenants.standin.calls("POST", rf"/machines/{machine_id}/start$")
    assert len(starts) == 1  # one start, however many Initials the client retransmitted
    status = proxy.status()
    assert status["machines"]["wakes"]["succeeded"] == 1
    assert status["packets"]["dropped"]["machine_not_started"] >= 1


def test_doctor_reports_proxy_mode(
    tenants: Tenants, proxies: list[ProxyProcess], issuer: OidcIssuer
) -> None:
    proxy = start_proxy(tenants)
    proxies.append(proxy)
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "fly-vault" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f'[vault.pinned]\naddress = "127.0.0.1:{proxy.port}"\norg = "{ORG}"\napp = "{APP}"\n'
        f'access_token = "{TOKEN}"\nmachine_id = "{tenants.ids["a"]}"\nproxy = true\n'
        f'oidc_issuer_url = "{issuer.base_url}"\n'
    )

    def doctor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flyvault.cli.main", "doctor", "pinned", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = doctor()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "proxy mode" in result.stdout
    assert f"via vault-proxy to machine {tenants.ids['a']}" in result.stdout
    report = json.loads(doctor("--json").stdout)
    assert report["ok"] is True and report["transport"] == "proxy"


def run_proxy_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "VAULT_PROXY"))}
    return subprocess.run(
        [sys.executable, "-m", "flyvault.proxy.main", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**base, **env},
    )


def test_proxy_command_line_refuses_bad_setups() -> None:
    assert "FLY_APP env var required" in run_proxy_cli().stderr
    no_token = run_proxy_cli(FLY_APP="x")
    assert no_token.returncode == 2 and "FLY_API_TOKEN env var required" in no_token.stderr
    exposed = run_proxy_cli("--status", "0.0.0.0:9090", FLY_APP="x", FLY_API_TOKEN="t")
    assert exposed.returncode == 2 and "loopback" in exposed.stderr
    assert run_proxy_cli("--port", "70000", FLY_APP="x", FLY_API_TOKEN="t").returncode == 2
    # Outside Fly the default bind name does not resolve: say what to do instead.
    secret = "fo1_secret-api-token-never-logged"
    unbound = run_proxy_cli(
        "--status", "off", FLY_APP="x", FLY_API_TOKEN=secret, FLY_API_BASE="http://127.0.0.1:9"
    )
    assert unbound.returncode == 1
    assert "cannot bind frontend socket fly-global-services:8443" in unbound.stderr
    assert "--bind 0.0.0.0" in unbound.stderr
    assert "failed to refresh machine map, keeping previous" in unbound.stderr
    assert secret not in unbound.stderr
    first = json.loads(unbound.stderr.splitlines()[0])  # structured: one JSON object a line
    assert first["event"] == "start" and first["app"] == "x"


def test_wrong_tokens_behind_the_proxy_cost_other_users_nothing(
    tenants: Tenants, proxies: list[ProxyProcess], issuer: OidcIssuer
) -> None:
    """Behind vault-proxy every client has the proxy's address at the machine; a stranger's
    wrong tokens must not lock anyone else out or slow them down."""
    from flyvault.errors import AuthError
    from flyvault.server.auth import penalty

    proxy = start_proxy(tenants)
    proxies.append(proxy)
    machine_id = tenants.ids["a"]

    async def scenario() -> float:
        wrong = vault_entry(proxy.port, issuer, machine_id=machine_id, proxy=True, token="nope")
        right = vault_entry(proxy.port, issuer, machine_id=machine_id, proxy=True)
        results = await asyncio.gather(
            *(open_vault(wrong) for _ in range(10)), return_exceptions=True
        )
        assert all(isinstance(result, AuthError) for result in results), results
        started = time.monotonic()
        connection = await open_vault(right)
        elapsed = time.monotonic() - started
        connection.close()
        return elapsed

    elapsed = run_async(scenario())
    # Accepted at once: not even one wrong-token pause was paid by the right user.
    assert elapsed < penalty(1)
    assert "wrong access token" in tenants.inits["a"].log.read_text()
