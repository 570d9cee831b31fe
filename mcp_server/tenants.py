"""The tenant tools: ``fly-vault-admin tenant ...`` through its own functions.

Secrets never travel through tool arguments (they would sit in the agent's context and
transcript): the Fly API token comes from ``FLY_API_TOKEN`` and the tenant access token from
``FLY_VAULT_ACCESS_TOKEN`` in the MCP server's environment, as for the admin CLI. The app
and the API base may be given per call (``FLY_APP`` and ``FLY_API_BASE`` are the defaults).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flyvault.errors import UsageError
from flyvault.redact import register as register_secret

from .jobs import Job
from .models import TenantList, TenantMachine, TenantSummary, UsageFacts

DEFAULT_API_BASE = "https://api.machines.dev"

Work = Callable[[Job], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class AdminSettings:
    token: str
    app: str
    api_base: str


def settings(app: str | None, api_base: str | None) -> AdminSettings:
    """Like ``fly-vault-admin``'s globals, minus the token flag: the environment only."""
    token = os.environ.get("FLY_API_TOKEN") or ""
    app = app or os.environ.get("FLY_APP") or ""
    base = (api_base or os.environ.get("FLY_API_BASE") or DEFAULT_API_BASE).rstrip("/")
    if not token:
        raise UsageError(
            "no Fly API token: FLY_API_TOKEN is not set in the MCP server's environment",
            hint="create one with `fly tokens create deploy -a APP` and start the MCP server "
            "with FLY_API_TOKEN set (it is never taken from a tool argument)",
        )
    if not app:
        raise UsageError(
            "no app: pass app=... or set FLY_APP in the MCP server's environment",
            hint="name the Fly app that holds the tenant machines",
        )
    if not base.startswith(("http://", "https://")):
        raise UsageError(f"invalid api_base {base!r}: expected an http(s) URL")
    register_secret(token)
    return AdminSettings(token, app, base)


def _client(s: AdminSettings) -> Any:
    from flyvault.admin import commands as admin_commands
    from flyvault.fly.machines import MachinesClient

    return MachinesClient(
        base_url=s.api_base,
        app=s.app,
        token=s.token,
        retry=admin_commands.RETRY,
        timeouts=admin_commands.TIMEOUTS,
    )


def _machine(entry: dict[str, Any]) -> TenantMachine:
    config = entry.get("config")
    image = config.get("image") if isinstance(config, dict) else None
    return TenantMachine(
        id=str(entry.get("id")),
        name=entry.get("name"),
        state=entry.get("state"),
        region=entry.get("region"),
        image=str(image or entry.get("image") or "") or None,
        volumes=[str(v) for v in entry.get("volumes") or []],
    )


async def tenant_list(s: AdminSettings, tenant: str | None) -> TenantList:
    from flyvault.admin.tenants import list_managed, summarise, volume_sizes

    async with _client(s) as api:
        machines = await list_managed(api, tenants=[tenant] if tenant else None)
        sizes = volume_sizes(await api.list_volumes())
    tenants = [
        TenantSummary(
            tenant_id=t["tenant_id"],
            total=t["total"],
            started=t["started"],
            stopped=t["stopped"],
            other=t["other"],
            regions=t["regions"],
            image=t["image"],
            last_updated_at=t["last_updated_at"],
            machines=[_machine(m) for m in t["machines"]],
        )
        for t in summarise(machines, sizes)
    ]
    return TenantList(app=s.app, tenants=tenants)


async def usage_facts(s: AdminSettings, tenant: str | None) -> UsageFacts:
    from flyvault.admin.tenants import collect_usage_facts

    async with _client(s) as api:
        facts = await collect_usage_facts(api, tenant)
    return UsageFacts(app=s.app, facts=facts)


# Create ---------------------------------------------------------------------------------------


def create_plans(
    s: AdminSettings, tenant_id: str, template: str, variables: dict[str, str]
) -> list[Any]:
    """Checked before any job starts: a bad template is the call's error, not a job's."""
    from flyvault.admin.template import (
        check_app,
        load_template,
        parse_vars,
        render_plan,
        validate_tenant_id,
    )

    validate_tenant_id(tenant_id)
    parsed = parse_vars([f"{key}={value}" for key, value in variables.items()])
    loaded = load_template(Path(template).expanduser())
    check_app(loaded, s.app)
    access_token = os.environ.get("FLY_VAULT_ACCESS_TOKEN") or None
    if access_token is None and any(p.name == "access_token" for p in loaded.placeholders):
        raise UsageError(
            f"template {loaded.path} uses {{{{access_token}}}} but FLY_VAULT_ACCESS_TOKEN is "
            "not set in the MCP server's environment",
            hint="start the MCP server with FLY_VAULT_ACCESS_TOKEN set; tokens are never "
            "taken from tool arguments",
        )
    register_secret(access_token)
    return render_plan(loaded, tenant_id, access_token=access_token, variables=parsed)


def dry_run(plans: list[Any]) -> dict[str, Any]:
    from flyvault.admin.commands import dry_run_plan

    return {
        "applied": False,
        "requests": dry_run_plan(plans),
        "next_step": "show these requests to the user; to create the tenant, call "
        'tenant(action="create") again with confirm=true',
    }


def create_work(s: AdminSettings, tenant_id: str, plans: list[Any], wait_timeout: float) -> Work:
    async def work(job: Job) -> dict[str, Any]:
        from flyvault.admin.commands import create_tenant

        async with _client(s) as api:
            created = await create_tenant(api, tenant_id, plans, wait_timeout=wait_timeout)
        return {
            "applied": True,
            "tenant_id": tenant_id,
            "machines": [
                {k: m.get(k) for k in ("id", "name", "state", "region", "instance_id")}
                for m in created
            ],
            "next_step": f'tenant(action="list", tenant_id="{tenant_id}") shows it',
        }

    return work


# Delete ---------------------------------------------------------------------------------------


async def delete_plan(s: AdminSettings, tenant_id: str) -> dict[str, Any]:
    from flyvault.admin.tenants import list_managed, volume_ids

    async with _client(s) as api:
        live = await list_managed(api, tenants=[tenant_id])
        everything = await list_managed(api, tenants=[tenant_id], include_deleted=True)
        existing = {str(v.get("id")) for v in await api.list_volumes()}
    volumes = sorted({vid for m in everything for vid in volume_ids(m)} & existing)
    return {
        "applied": False,
        "tenant_id": tenant_id,
        "machines": [{"id": m.get("id"), "state": m.get("state")} for m in live],
        "volumes": volumes,
        "next_step": (
            f'nothing to delete for tenant "{tenant_id}"'
            if not live and not volumes
            else "show this plan to the user; to delete, call "
            'tenant(action="delete") again with confirm=true'
        ),
    }


def delete_work(s: AdminSettings, tenant_id: str, wait_timeout: float) -> Work:
    async def work(job: Job) -> dict[str, Any]:
        from flyvault.admin.commands import delete_tenant

        plan = await delete_plan(s, tenant_id)
        async with _client(s) as api:
            await delete_tenant(api, tenant_id, yes=True, confirm=None, wait_timeout=wait_timeout)
        return {
            "applied": True,
            "tenant_id": tenant_id,
            "deleted_machines": [m["id"] for m in plan["machines"]],
            "deleted_volumes": plan["volumes"],
        }

    return work


# Update image ---------------------------------------------------------------------------------


async def update_plan(
    s: AdminSettings, image: str, tenants: list[str] | None, force: bool
) -> dict[str, Any]:
    from flyvault.admin.tenants import configured_image, list_managed, tenant_of

    async with _client(s) as api:
        machines = await list_managed(api, tenants=tenants)
    if tenants is not None:
        missing = sorted(set(tenants) - {tenant_of(m) for m in machines})
        if missing:
            raise UsageError(
                f"no managed machines for tenant(s): {', '.join(missing)}",
                hint='check the ids with tenant(action="list")',
            )
    rows = []
    for machine in sorted(machines, key=lambda m: (str(tenant_of(m)), str(m.get("id")))):
        current = configured_image(machine)
        rows.append(
            {
                "id": machine.get("id"),
                "tenant_id": tenant_of(machine),
                "state": machine.get("state"),
                "image": current,
                "action": "update" if force or current != image else "skip (already on image)",
            }
        )
    return {
        "applied": False,
        "image": image,
        "machines": rows,
        "next_step": "show this plan to the user; to roll the image out (canary first, "
        'rollback on failure), call tenant(action="update_image") again with confirm=true',
    }


def update_work(s: AdminSettings, options: Any) -> Work:
    async def work(job: Job) -> dict[str, Any]:
        from flyvault.admin.rollout import Rollout

        async with _client(s) as api:
            rollout = Rollout(api, s.app, options)
            try:
                await rollout.run()
            finally:
                state = getattr(rollout, "state", None)
                if state is not None and job.result is None:
                    job.result = _rollout_summary(state)
        summary = _rollout_summary(rollout.state)
        summary["applied"] = True
        return summary

    return work


def _rollout_summary(state: Any) -> dict[str, Any]:
    return {
        "image": state.image,
        "status": state.status,
        "state_file": str(state.path) if state.path else None,
        "machines": [
            {
                "id": e.id,
                "tenant_id": e.tenant_id,
                "status": e.status,
                "canary": e.canary,
                "error": e.error,
            }
            for e in state.machines
        ],
    }
