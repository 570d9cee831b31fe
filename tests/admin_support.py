"""Shared pieces of the fly-vault-admin tests: the stand-in, a CLI runner, recognisable secrets.

Every CLI run through ``Cli`` asserts that neither the API token nor the tenant access token
appears in stdout or stderr, so each command and each failure path is a secrecy test too.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from flyvault.admin.template import MANAGED_BY_VALUE, META_MANAGED_BY, META_TENANT
from flyvault.fly.clock import Clock
from flyvault.fly.machines import MachinesClient, RetryPolicy, Timeouts
from flyvault.standins.machines import MachinesStandin

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_TEMPLATE = REPO / "admin" / "examples" / "tenant_template.toml"
APP = "vault-tenants"
API_TOKEN = "fo1_API-TOKEN-CANARY-7c1d9e0b3a5f"
ACCESS_TOKEN = "ACCESS-TOKEN-CANARY-52b8e1f04c9d"
BEARER = "BEARER-CANARY-0d4f6a8c2e1b"
SECRETS = (API_TOKEN, ACCESS_TOKEN, BEARER)
IMAGE_V1 = "registry.fly.io/vault-tenants/init:2026-03-02"
IMAGE_V2 = "registry.fly.io/vault-tenants/init:2026-04-01"

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)
FAST_TIMEOUTS = Timeouts(connect=2.0, read=2.0, write=2.0, pool=2.0, wait_grace=2.0)


class SkewClock(Clock):
    """Real monotonic time plus ``skew``: a backoff ``sleep`` returns at once and moves the
    clock on instead, so a Retry-After or a hang is accounted for without waiting."""

    def __init__(self) -> None:
        self.skew = 0.0
        self.slept: list[float] = []

    def now(self) -> float:
        return time.monotonic() + self.skew

    async def sleep(self, seconds: float) -> None:
        self.skew += max(0.0, seconds)
        self.slept.append(seconds)
        await asyncio.sleep(0)


class HangTransport(httpx.AsyncBaseTransport):
    """Turns the stand-in's fast hang (504 + ``X-Standin-Hang``) into the read timeout the
    client would have seen, after moving the clock on by that request's read timeout."""

    def __init__(self, clock: SkewClock) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.clock = clock

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if response.headers.get("x-standin-hang"):
            await response.aread()
            await response.aclose()
            timeout = request.extensions.get("timeout", {}).get("read") or 0.0
            self.clock.skew += float(timeout)
            raise httpx.ReadTimeout("injected hang: no answer", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"secret leaked: {text!r}"


@dataclass
class Result:
    code: int
    out: str
    err: str


class Cli:
    """Runs ``admin.main.main`` in-process against the stand-in."""

    def __init__(self, capsys: pytest.CaptureFixture[str], clock: SkewClock | None = None) -> None:
        self.capsys = capsys
        self.clock = clock or SkewClock()

    def __call__(self, *argv: str) -> Result:
        from flyvault.admin.main import main

        self.capsys.readouterr()
        code = main(list(argv))
        captured = self.capsys.readouterr()
        assert_no_secrets(captured.out, captured.err)
        return Result(code, captured.out, captured.err)


@pytest.fixture
def standin() -> Iterator[MachinesStandin]:
    with MachinesStandin(token=API_TOKEN, apps=(APP, "other-app"), transition_delay=0.02) as api:
        yield api


@pytest.fixture
def cli(
    standin: MachinesStandin, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Cli:
    """The CLI in-process, on a ``SkewClock`` (``cli.clock``), with fast hangs."""
    import flyvault.admin.commands as admin_commands

    clock = SkewClock()

    monkeypatch.setenv("FLY_API_TOKEN", API_TOKEN)
    monkeypatch.setenv("FLY_APP", APP)
    monkeypatch.setenv("FLY_API_BASE", standin.base_url)
    monkeypatch.delenv("FLY_VAULT_ACCESS_TOKEN", raising=False)
    monkeypatch.delenv("FLY_VAULT_USAGE_BEARER_TOKEN", raising=False)
    monkeypatch.setattr(admin_commands, "RETRY", FAST_RETRY)
    monkeypatch.setattr(admin_commands, "TIMEOUTS", FAST_TIMEOUTS)
    monkeypatch.setattr(admin_commands, "CLEANUP_POLL", 0.02)
    monkeypatch.setattr(admin_commands, "CLOCK", clock)
    monkeypatch.setattr(admin_commands, "TRANSPORT", lambda: HangTransport(clock))
    standin.fast_hang = True
    return Cli(capsys, clock)


def client(standin: MachinesStandin, **kwargs: Any) -> MachinesClient:
    options: dict[str, Any] = {"retry": FAST_RETRY, "timeouts": FAST_TIMEOUTS}
    options.update(kwargs)
    return MachinesClient(base_url=standin.base_url, app=APP, token=API_TOKEN, **options)


def run(coroutine: Any, timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


def write_template(tmp_path: Path, text: str, name: str = "tenant.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


SIMPLE_TEMPLATE = f"""\
version = 1
app = "{APP}"
machine_count = 2

[machine]
name = "tenant-{{{{tenant_id}}}}-{{{{index}}}}"
region = "ord"

[machine.config]
image = "{IMAGE_V1}"

[[machine.config.mounts]]
path = "/data"
name = "tvol_{{{{tenant_id}}}}_{{{{index}}}}"
size_gb = 5

[machine.config.env]
ACCESS_TOKEN = "{{{{access_token}}}}"

[metadata]
role = "tenant-vm"
"""


def create_tenants(
    cli: Cli, tmp_path: Path, *tenants: str, template: str = SIMPLE_TEMPLATE
) -> None:
    path = write_template(tmp_path, template, "fixture-template.toml")
    for tenant in tenants:
        result = cli(
            "tenant", "create", tenant, "--template", str(path), "--access-token", ACCESS_TOKEN
        )
        assert result.code == 0, result.err


def subprocess_env(standin: MachinesStandin, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FLY_VAULT_ACCESS_TOKEN", "FLY_VAULT_USAGE_BEARER_TOKEN")
    }
    env.update(
        FLY_API_TOKEN=API_TOKEN,
        FLY_APP=APP,
        FLY_API_BASE=standin.base_url,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def admin_process(args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flyvault.admin.main", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def seed_tenant(
    standin: MachinesStandin,
    tenant: str,
    count: int = 2,
    image: str = IMAGE_V1,
    env: dict[str, str] | None = None,
    start: int = 1,
) -> list[str]:
    """A tenant made directly in the model (fast): ``count`` started machines, each with
    a volume, as ``tenant create`` with SIMPLE_TEMPLATE would leave them."""
    model = standin.model
    base = f"/v1/apps/{APP}"
    ids = []
    for index in range(start, start + count):
        volume_body = {"name": f"tvol_{tenant}_{index}", "region": "ord", "size_gb": 5}
        _, volume = model.handle("POST", f"{base}/volumes", {}, volume_body, None)
        config = {
            "image": image,
            "env": {"ACCESS_TOKEN": ACCESS_TOKEN, **(env or {})},
            "mounts": [{"volume": volume["id"], "path": "/data"}],
            "metadata": {META_TENANT: tenant, META_MANAGED_BY: MANAGED_BY_VALUE},
        }
        body = {"name": f"tenant-{tenant}-{index}", "region": "ord", "config": config}
        status, machine = model.handle("POST", f"{base}/machines", {}, body, None)
        assert status == 200, machine
        model.set_state(machine["id"], "started")
        ids.append(machine["id"])
    return ids
