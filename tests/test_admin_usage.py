"""``tenant usage-facts``: the flat array, lifecycle timestamps, and the HTTP server."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import admin_support
import httpx
import pytest
from admin_support import BEARER, Cli, create_tenants

from flyvault.admin.tenants import usage_fact
from flyvault.admin.usage_server import parse_listen
from flyvault.errors import UsageError
from flyvault.standins.machines import MachinesStandin

standin = admin_support.standin
cli = admin_support.cli


def test_usage_facts_include_deleted_machines(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    create_tenants(cli, tmp_path, "acme", "bob")
    assert cli("tenant", "delete", "bob", "--yes").code == 0
    result = cli("tenant", "usage-facts")
    assert result.code == 0, result.err
    facts = json.loads(result.out)
    assert [f["machine_id"] for f in facts] == sorted(f["machine_id"] for f in facts)
    assert len(facts) == 4
    by_tenant: dict[str, list[dict]] = {}
    for fact in facts:
        by_tenant.setdefault(fact["metadata"]["fly_vault.tenant_id"], []).append(fact)
    for fact in by_tenant["acme"]:
        assert fact["state"] == "started"
        assert set(fact) >= {"machine_id", "state", "region", "instance_id", "started_at"}
        assert "deleted_at" not in fact
        (volume,) = fact["volumes"]
        assert volume["volume_id"].startswith("vol_") and volume["size_gib"] == 5
        assert volume["mount_path"] == "/data"
    for fact in by_tenant["bob"]:
        assert fact["state"] == "destroyed"
        assert fact["started_at"] < fact["stopped_at"] <= fact["deleted_at"]
    only = json.loads(cli("tenant", "usage-facts", "--tenant", "acme").out)
    assert {f["metadata"]["fly_vault.tenant_id"] for f in only} == {"acme"}


def test_usage_fact_takes_the_latest_event_whatever_the_order() -> None:
    machine = {
        "id": "m1",
        "state": "started",
        "region": "ord",
        "updated_at": "2025-08-16T09:00:00Z",
        "config": {
            "metadata": {"unbox_agent_id": "a-1", "n": 3},
            "mounts": [{"volume": "vol_1", "path": " /data ", "size_gb": 7}],
        },
        # Newest first, as Fly lists them.
        "events": [
            {"type": "start", "status": "started", "timestamp": 1755335400123},
            {"type": "exit", "status": "stopped", "timestamp": 1755334800000},
            {"type": "start", "status": "started", "timestamp": 1755334200000},
            {"type": "launch", "status": "created"},
        ],
    }
    fact = usage_fact(machine, {})
    assert fact["started_at"] == "2025-08-16T09:10:00.123Z"
    assert fact["stopped_at"] == "2025-08-16T09:00:00Z"
    assert fact["metadata"] == {"unbox_agent_id": "a-1"}  # strings only
    assert fact["volumes"] == [{"volume_id": "vol_1", "mount_path": "/data", "size_gib": 7}]
    assert "deleted_at" not in fact and "instance_id" not in fact
    bare = usage_fact({"id": "m2", "state": "stopped", "created_at": "2025-01-01T00:00:00Z"}, {})
    assert bare == {
        "machine_id": "m2",
        "state": "stopped",
        "stopped_at": "2025-01-01T00:00:00Z",
        "created_at": "2025-01-01T00:00:00Z",
    }
    assert usage_fact(machine, {"vol_1": 40})["volumes"][0]["size_gib"] == 40


@pytest.mark.parametrize(
    ("addr", "token", "ok"),
    [
        ("127.0.0.1:0", None, True),
        ("[::1]:8080", None, True),
        ("0.0.0.0:8080", None, False),
        ("0.0.0.0:8080", "tok", True),
        ("localhost:8080", "tok", False),
        ("127.0.0.1", None, False),
        ("127.0.0.1:99999", None, False),
    ],
)
def test_parse_listen(addr: str, token: str | None, ok: bool) -> None:
    if ok:
        parse_listen(addr, bearer_token=token)
    else:
        with pytest.raises(UsageError):
            parse_listen(addr, bearer_token=token)


def test_refuses_public_listen_without_token(cli: Cli) -> None:
    result = cli("tenant", "usage-facts", "--listen", "0.0.0.0:18083")
    assert result.code == 2
    assert "refusing to serve usage facts on 0.0.0.0:18083 without --bearer-token" in result.err


@pytest.fixture
def server(standin: MachinesStandin, cli: Cli, tmp_path: Path) -> Iterator[str]:
    create_tenants(cli, tmp_path, "acme")
    env = admin_support.subprocess_env(standin, FLY_VAULT_USAGE_BEARER_TOKEN=BEARER)
    proc = admin_support.admin_process(
        ["tenant", "usage-facts", "--listen", "127.0.0.1:0"], env, stdin=subprocess.DEVNULL
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/usage-facts", line)
    assert match, line
    yield f"http://127.0.0.1:{match.group(1)}"
    proc.terminate()
    out, err = proc.communicate(timeout=10)
    admin_support.assert_no_secrets(line, out, err)
    assert proc.returncode == 0, err


def test_server_routes_and_bearer_auth(server: str, standin: MachinesStandin) -> None:
    good = {"Authorization": f"Bearer {BEARER}"}
    with httpx.Client(base_url=server, timeout=10) as http:
        facts = http.get("/usage-facts", headers=good)
        assert facts.status_code == 200
        assert facts.headers["content-type"] == "application/json"
        assert len(facts.json()) == 2 and facts.json()[0]["metadata"]["fly_vault.tenant_id"]
        health = http.get("/healthz", headers=good)
        assert (health.status_code, health.text) == (200, "ok")
        for headers in (
            {},
            {"Authorization": f"Bearer {BEARER}x"},
            {"Authorization": f"Bearer {BEARER[:-1]}"},
            {"Authorization": f"bearer {BEARER}"},
            {"Authorization": BEARER},
        ):
            for path in ("/usage-facts", "/healthz", "/nope"):
                denied = http.get(path, headers=headers)
                assert denied.status_code == 401
                assert denied.json() == {"error": "unauthorized"}
                assert "www-authenticate" not in denied.headers
        assert http.get("/nope", headers=good).status_code == 404
        assert http.post("/usage-facts", headers=good).status_code == 404
        assert http.get("/usage-facts?tenant=x", headers=good).status_code == 200
        # Upstream failure: a fixed message, never the API's body.
        standin.fail("GET", r"/machines$", status=500, times=None, message="secret-ish detail")
        failed = http.get("/usage-facts", headers=good)
        assert failed.status_code == 502
        assert failed.json() == {"error": "machines api request failed"}
        standin.clear_faults()
        assert http.get("/usage-facts", headers=good).status_code == 200
