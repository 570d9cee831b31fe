"""Shared fixtures: isolated XDG dirs, the Fly stand-ins, and init servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flyvault.standins import FlyApiSocket, MachineIdentity, OidcIssuer, fly_claims

ORG = "test-org"
APP = "test-app"
TOKEN = "correct-horse-battery-staple-0123456789"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own config, cache, data and runtime directories; the connection
    keepers its CLI calls started are stopped afterwards, by the PIDs in their pid files."""
    # The runtime directory holds the keepers' unix sockets, whose paths must stay short
    # (108 bytes): a directory of its own under /tmp, not inside tmp_path.
    runtime = Path(tempfile.mkdtemp(prefix="fvrt-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("FLY_VAULT_MUX", raising=False)
    yield _isolated_home(tmp_path, monkeypatch)
    stop_keepers(runtime)
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture(params=["keeper", "direct"])
def exec_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The CLI subprocesses of a test go through the connection keeper or connect directly
    (``FLY_VAULT_MUX=0``, inherited): the exec suites run both ways. Through the keeper
    means every call, the first included (``FLY_VAULT_MUX=wait``: by default the first call
    goes direct and starts the keeper beside it)."""
    monkeypatch.setenv("FLY_VAULT_MUX", "0" if request.param == "direct" else "wait")
    yield request.param
    if request.param == "direct":  # the switch held: nothing was started
        assert not list((Path(os.environ["XDG_RUNTIME_DIR"]) / "fly-vault").glob("*.pid"))


def stop_keepers(runtime: Path) -> None:
    """SIGTERM each keeper of ``runtime``, SIGKILL after 5 s: those with a pid file, and
    those still starting (a keeper started in the background writes its pid file only once
    its caller ended), found by their socket path under ``runtime`` in their command line."""
    pids = set(_starting_keepers(runtime))
    for pid_file in (runtime / "fly-vault").glob("*.pid"):
        try:
            pids.add(int(json.loads(pid_file.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            continue
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for pid in pids:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _starting_keepers(runtime: Path) -> Iterator[int]:
    """PIDs of ``python -m flyvault.cli.keeperd`` processes whose socket is in ``runtime``:
    the directory is this test's own (a fresh mkdtemp), so nothing else matches."""
    needle = f"{runtime}/fly-vault/".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"flyvault.cli.keeperd" in cmdline and needle in cmdline:
            yield int(entry.name)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A keeper is not our child (it daemonized): once it exits, init reaps it.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    for variable, sub in (
        ("XDG_CONFIG_HOME", "config"),
        ("XDG_CACHE_HOME", "cache"),
        ("XDG_DATA_HOME", "data"),
        ("XDG_STATE_HOME", "state"),
    ):
        path = home / sub
        path.mkdir(parents=True)
        monkeypatch.setenv(variable, str(path))
    monkeypatch.delenv("FLY_VAULT_CONFIG", raising=False)
    monkeypatch.delenv("ACCESS_TOKEN", raising=False)
    return home


@pytest.fixture(autouse=True)
def fresh_secret_registry() -> Iterator[None]:
    """The scrubber's registry is process-wide: one test's secrets (a deliberately wrong
    token such as "nope") must not be redacted from the next test's output."""
    from flyvault import redact

    redact.forget_all()
    yield
    redact.forget_all()


@pytest.fixture(scope="session")
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer() as running:
        yield running


@pytest.fixture
def identity() -> MachineIdentity:
    return MachineIdentity.default(ORG, APP)


@pytest.fixture
def fly_api(
    tmp_path: Path, issuer: OidcIssuer, identity: MachineIdentity
) -> Iterator[FlyApiSocket]:
    with FlyApiSocket(tmp_path / "fly-api.sock", issuer, identity) as api:
        yield api


class ScriptedAttestor:
    """A Fly platform stand-in that can misbehave: it mints what the test tells it to.

    ``tamper(claims, aud)`` may change the claim set and return extra ``mint`` arguments
    (another key, kid, algorithm). Setting ``tamper`` to None makes it honest again.
    """

    def __init__(self, issuer: OidcIssuer, identity: MachineIdentity) -> None:
        self.issuer = issuer
        self.identity = identity
        self.tamper: Callable[[dict[str, Any], str], dict[str, Any] | None] | None = None
        self.audiences: list[str] = []
        self.replay: str | None = None

    async def token(self, audience: str) -> str:
        self.audiences.append(audience)
        if self.replay is not None:
            return self.replay
        claims = fly_claims(
            self.identity, issuer=self.issuer.issuer(self.identity.org), aud=audience
        )
        extra: dict[str, Any] = {}
        if self.tamper is not None:
            extra = self.tamper(claims, audience) or {}
        return self.issuer.mint(claims, **extra)


@pytest.fixture
def attestor(issuer: OidcIssuer, identity: MachineIdentity) -> ScriptedAttestor:
    return ScriptedAttestor(issuer, identity)


def vault_entry(
    port: int,
    issuer: OidcIssuer,
    *,
    name: str = "test",
    token: str | None = TOKEN,
    org: str = ORG,
    app: str = APP,
    machine_id: str | None = None,
    host: str = "127.0.0.1",
    **extra: Any,
) -> Any:
    from flyvault.config import VaultConfig

    return VaultConfig(
        name=name,
        address=f"{host}:{port}",
        org=org,
        app=app,
        access_token=token,
        machine_id=machine_id,
        oidc_issuer_url=issuer.base_url,
        **extra,
    )


def run_async(coroutine: Any, timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


def on_vault(
    init_process: InitProcess, issuer: OidcIssuer, body: Callable[[Any], Awaitable[Any]]
) -> Any:
    """``body(vault)`` with a client ``Vault`` of ``init_process``, closed afterwards."""
    from flyvault.client import Vault

    async def run() -> Any:
        vault = Vault(vault_entry(init_process.port, issuer))
        try:
            return await body(vault)
        finally:
            await vault.close()

    return run_async(run())


@pytest.fixture(scope="module")
def debian_image() -> Path:
    """A Debian rootfs archive with systemd, built once with debootstrap and cached; the
    test is skipped, saying why, where none can be built."""
    from debian_rootfs import Unavailable, debian_systemd_archive

    try:
        return debian_systemd_archive()
    except Unavailable as exc:
        pytest.skip(f"no Debian rootfs with systemd: {exc}")


@pytest.fixture
def sides(tmp_path: Path) -> tuple[Path, Path]:
    """Two empty directories: this machine's side of a copy and where it lands back."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    return here, there


@dataclass
class InitProcess:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    data_dir: Path
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_init(
    tmp_path: Path,
    socket_path: Path,
    *,
    token: str | None = TOKEN,
    host_mode: bool = True,
    extra_args: tuple[str, ...] = (),
) -> InitProcess:
    """Start ``fly-vault-init`` as a real process on 127.0.0.1 and wait until it listens."""
    data_dir = tmp_path / "init-data"
    data_dir.mkdir(exist_ok=True)
    ready = tmp_path / "init-ready.json"
    ready.unlink(missing_ok=True)  # a previous init on the same volume left one
    log = tmp_path / "init.log"
    env = {k: v for k, v in os.environ.items() if k != "ACCESS_TOKEN"}
    if token is not None:
        env["ACCESS_TOKEN"] = token
    command = [
        sys.executable,
        "-m",
        "flyvault.server.main",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        "--fly-api-socket",
        str(socket_path),
        "--ready-file",
        str(ready),
        *(("--host-mode",) if host_mode else ()),
        *extra_args,
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"init did not start: {log.read_text()}")
        time.sleep(0.02)
    info = json.loads(ready.read_text())
    return InitProcess(process, info["host"], info["port"], data_dir, log)


@pytest.fixture
def vm_init(tmp_path: Path, fly_api: FlyApiSocket) -> Iterator[InitProcess]:
    """An init in vm mode (namespaces, a rootfs): the tests that use it need root."""
    init = start_init(tmp_path, fly_api.path, host_mode=False)
    yield init
    init.stop()


@pytest.fixture
def init_process(tmp_path: Path, fly_api: FlyApiSocket) -> Iterator[InitProcess]:
    running = start_init(tmp_path, fly_api.path)
    yield running
    running.stop()


def read_until(
    proc: subprocess.Popen[bytes], expected: bytes, timeout: float = 60, *, stderr: bool = False
) -> bytes:
    """Read the process's stdout (or stderr) pipe until ``expected`` has arrived (fail after
    ``timeout``)."""
    import select

    pipe = proc.stderr if stderr else proc.stdout
    assert pipe is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while expected not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {expected!r} within {timeout} s; got {seen!r}"
        if select.select([pipe], [], [], remaining)[0]:
            chunk = os.read(pipe.fileno(), 65536)
            assert chunk, f"end of output before {expected!r}; got {seen!r}"
            seen += chunk
    return seen
