"""The tenant tool of the MCP server against the Fly Machines API stand-in
(flyvault/standins/machines.py).

Secrets come only from the environment (FLY_API_TOKEN, FLY_VAULT_ACCESS_TOKEN), and every
result is scanned for them by ``Session`` (the template puts the access token into each
machine's env, so a leak through a plan, a listing or an error would show). The tool is
offered only by a server whose environment has FLY_API_TOKEN.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import admin_support
import pytest
from admin_support import ACCESS_TOKEN, API_TOKEN, APP, IMAGE_V2, SIMPLE_TEMPLATE
from conftest import run_async
from mcp import Client
from mcp_support import Session, text

from flyvault.standins.machines import MachinesStandin

standin = admin_support.standin


@pytest.fixture
def admin_env(standin: MachinesStandin, monkeypatch: pytest.MonkeyPatch) -> MachinesStandin:
    import flyvault.admin.commands as admin_commands

    monkeypatch.setenv("FLY_API_TOKEN", API_TOKEN)
    monkeypatch.setenv("FLY_APP", APP)
    monkeypatch.setenv("FLY_API_BASE", standin.base_url)
    monkeypatch.setenv("FLY_VAULT_ACCESS_TOKEN", ACCESS_TOKEN)
    monkeypatch.setattr(admin_commands, "RETRY", admin_support.FAST_RETRY)
    monkeypatch.setattr(admin_commands, "TIMEOUTS", admin_support.FAST_TIMEOUTS)
    monkeypatch.setattr(admin_commands, "CLEANUP_POLL", 0.02)
    return standin


def run(scenario: Any, timeout: float = 120, *, tenant_tool: bool | None = None) -> Any:
    from flyvault.mcp_server.server import build_server

    async def main() -> Any:
        async with Client(build_server(tenant_tool=tenant_tool)) as client:
            return await scenario(Session(client))

    return run_async(main(), timeout)


def _live(standin: MachinesStandin) -> list[dict[str, Any]]:
    return [m for m in standin.model.machines() if m["state"] != "destroyed"]


def test_tenant_lifecycle_create_list_update_delete(
    admin_env: MachinesStandin, tmp_path: Path
) -> None:
    template = tmp_path / "tenant.toml"
    template.write_text(SIMPLE_TEMPLATE)

    async def scenario(s: Session) -> None:
        assert (await s.data("tenant", {"action": "list"}))["tenants"] == []
        admin_env.clear_requests()

        # Without confirm, create is the dry run: the requests it would send, none sent.
        dry = await s.data(
            "tenant", {"action": "create", "tenant_id": "acme", "template": str(template)}
        )
        assert dry["ok"] is True and dry["result"]["applied"] is False
        [first, _] = dry["result"]["requests"]
        assert first["config"]["env"]["ACCESS_TOKEN"] == "<redacted>"
        assert admin_env.requests == []

        create = {"action": "create", "tenant_id": "acme", "template": str(template)}
        created = await s.data("tenant", {**create, "confirm": True, "wait_seconds": 60})
        assert created["ok"] is True, created
        assert len(created["result"]["machines"]) == 2
        assert any("created with 2 machines" in line for line in created["log"])
        assert len(_live(admin_env)) == 2

        again = await s.data("tenant", {**create, "confirm": True, "wait_seconds": 60})
        assert again["ok"] is False and "already exists" in again["error"]
        assert again["hint"] == (
            'use tenant(action="update_image") to change it, or tenant(action="delete") first'
        )

        listing = await s.data("tenant", {"action": "list"})
        [acme] = listing["tenants"]
        assert acme["tenant_id"] == "acme" and acme["total"] == acme["started"] == 2
        assert {m["state"] for m in acme["machines"]} == {"started"}
        only = await s.data("tenant", {"action": "list", "tenant_id": "acme"})
        assert [t["tenant_id"] for t in only["tenants"]] == ["acme"]
        assert (await s.data("tenant", {"action": "list", "tenant_id": "ghost"}))["tenants"] == []
        facts = await s.data("tenant", {"action": "usage_facts", "tenant_id": "acme"})
        assert len(facts["facts"]) == 2

        update = {"action": "update_image", "image": IMAGE_V2, "tenants": ["acme"]}
        plan = await s.data("tenant", update)
        assert plan["result"]["applied"] is False
        assert [m["action"] for m in plan["result"]["machines"]] == ["update", "update"]
        assert all(m["config"]["image"] != IMAGE_V2 for m in _live(admin_env))

        rolled = await s.data("tenant", {**update, "confirm": True, "wait_seconds": 90})
        assert rolled["ok"] is True, rolled
        assert {m["status"] for m in rolled["result"]["machines"]} == {"updated"}
        assert all(m["config"]["image"] == IMAGE_V2 for m in _live(admin_env))

        delete_plan = await s.data("tenant", {"action": "delete", "tenant_id": "acme"})
        result = delete_plan["result"]
        assert result["applied"] is False and len(result["machines"]) == 2
        assert len(result["volumes"]) == 2 and "confirm=true" in result["next_step"]
        assert len(_live(admin_env)) == 2

        deleted = await s.data(
            "tenant",
            {"action": "delete", "tenant_id": "acme", "confirm": True, "wait_seconds": 60},
        )
        assert deleted["ok"] is True, deleted
        assert len(deleted["result"]["deleted_volumes"]) == 2
        assert _live(admin_env) == [] and admin_env.model.volumes() == []
        assert (await s.data("tenant", {"action": "list"}))["tenants"] == []

    run(scenario)


def test_tenant_tools_errors(
    admin_env: MachinesStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = tmp_path / "tenant.toml"
    template.write_text(SIMPLE_TEMPLATE)

    async def scenario(s: Session) -> None:
        update = {"action": "update_image", "image": IMAGE_V2}
        both = await s.call("tenant", update, ok=False)
        assert "tenants=[...] or all_tenants=true" in text(both)
        missing = await s.call("tenant", {**update, "tenants": ["ghost"]}, ok=True)
        assert "no managed machines for tenant(s): ghost" in missing.structured_content["error"]
        no_image = await s.call("tenant", {"action": "update_image", "tenants": ["a"]}, ok=False)
        assert 'tenant(action="update_image") needs image' in text(no_image)
        no_id = await s.call("tenant", {"action": "delete"}, ok=False)
        assert 'tenant(action="delete") needs tenant_id' in text(no_id)
        bad_id = await s.call(
            "tenant",
            {"action": "create", "tenant_id": "-bad", "template": str(template)},
            ok=False,
        )
        assert "invalid tenant id" in text(bad_id)

    run(scenario)

    monkeypatch.setenv("FLY_API_TOKEN", "fo1_WRONG-TOKEN-0123456789")

    async def wrong_token(s: Session) -> None:
        refused = await s.call("tenant", {"action": "list"}, ok=False)
        assert "401" in text(refused) or "refused" in text(refused).lower()

    run(wrong_token)

    monkeypatch.delenv("FLY_API_TOKEN")
    monkeypatch.delenv("FLY_VAULT_ACCESS_TOKEN")

    async def hidden(s: Session) -> None:
        # Without the token the server does not offer the tool at all, and says why.
        names = {tool.name for tool in (await s.client.list_tools()).tools}
        assert "tenant" not in names and "exec" in names
        assert "FLY_API_TOKEN is not set" in (s.client.instructions or "")
        await s.call("tenant", {"action": "list"}, ok=False)

    run(hidden)

    async def no_token(s: Session) -> None:
        result = await s.call("tenant", {"action": "list"}, ok=False)
        assert "FLY_API_TOKEN is not set" in text(result)
        assert "never taken from a tool argument" in text(result)

    run(no_token, tenant_tool=True)
    monkeypatch.setenv("FLY_API_TOKEN", API_TOKEN)

    async def no_access_token(s: Session) -> None:
        result = await s.call(
            "tenant",
            {"action": "create", "tenant_id": "acme", "template": str(template), "confirm": True},
            ok=False,
        )
        assert "FLY_VAULT_ACCESS_TOKEN" in text(result)

    run(no_access_token)
    assert _live(admin_env) == []

    monkeypatch.setenv("FLY_APP", "other-app")  # the tool's app: the server's FLY_APP

    async def other_app(s: Session) -> None:
        create = {"action": "create", "tenant_id": "acme", "template": str(template)}
        refused = await s.call("tenant", create, ok=False)
        assert "does not match configured app 'other-app'" in text(refused)

    run(other_app)


def test_tenant_next_steps_and_hints_name_the_tenant_tool(
    admin_env: MachinesStandin, tmp_path: Path
) -> None:
    """What the tool tells an agent to call next is a call of the tenant tool
    (tenant(action=...)), not one of the retired tenant_* tools."""
    template = tmp_path / "tenant.toml"
    template.write_text(SIMPLE_TEMPLATE)

    async def scenario(s: Session) -> None:
        create = {"action": "create", "tenant_id": "acme", "template": str(template)}
        created = await s.data("tenant", {**create, "confirm": True, "wait_seconds": 60})
        assert created["ok"] is True, created
        steps = {
            "create": created["result"]["next_step"],
            "update plan": (
                await s.data(
                    "tenant", {"action": "update_image", "image": IMAGE_V2, "tenants": ["acme"]}
                )
            )["result"]["next_step"],
            "update hint": (
                await s.data(
                    "tenant", {"action": "update_image", "image": IMAGE_V2, "tenants": ["ghost"]}
                )
            )["hint"],
            "delete plan": (await s.data("tenant", {"action": "delete", "tenant_id": "acme"}))[
                "result"
            ]["next_step"],
        }
        deleted = await s.data(
            "tenant",
            {"action": "delete", "tenant_id": "acme", "confirm": True, "wait_seconds": 60},
        )
        assert deleted["ok"] is True, deleted
        retired = re.compile(r"\btenant_(list|usage_facts|create|delete|update_image)\b")
        stale = {what: step for what, step in steps.items() if retired.search(step)}
        assert not stale, f"next steps naming tools that do not exist: {stale}"
        assert all("tenant(action=" in step for step in steps.values()), steps

    run(scenario)
