"""Provisioning and administration tools: reprovision, job_status, local_vault (up, down), and
tenant (list, usage_facts, create, delete, update_image as an action; registered only when
the server has a Fly API token)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import anyio.to_thread
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult
from pydantic import Field

from flyvault import localvault
from flyvault.errors import UsageError

from . import tenants as admin
from .jobs import Job
from .models import JobResult, LocalVault, local_vault_info
from .registry import ToolRegistry
from .server import State, structured
from .tools_vault import VaultName, WaitSeconds, check_port

#: True only after the user agreed (the tools' descriptions and the instructions say so).
Confirm = bool

#: The provisioning and local-vault tools, in tools/list order (after the vault and file
#: tools), and the tenant tool; ``server.build_server`` registers them.
admin_tools = ToolRegistry()
tenant_tools = ToolRegistry()


# Provisioning -----------------------------------------------------------------------


@admin_tools.tool(
    "Reprovision", read_only=False, destructive=True, idempotent=False, open_world=True
)
async def reprovision(
    state: State,
    ctx: Context,
    vault: VaultName,
    confirm: Confirm = False,
    wait_seconds: WaitSeconds = 30.0,
) -> Annotated[CallToolResult, JobResult]:
    """New rootfs from the config; processes stop, /root and /home stay. Ask the user;
    confirm=true."""
    entry = state.pool.entry(vault)
    source = entry.rootfs_source("reprovision")
    path = getattr(source, "path", None)
    if path is not None:
        what = f"the rootfs file {path}"
    else:
        host = urlsplit(getattr(source, "url", "")).hostname
        what = f"the entry's rootfs_url (host {host})"
    if not confirm:
        raise UsageError(
            f"reprovision not started: it replaces the rootfs of vault '{vault}' with "
            f"{what}; every process on the vault is stopped (running sessions end), "
            "/root and /home are kept",
            hint="ask the user; if they agree, call reprovision again with confirm=true",
        )

    async def work(job: Job) -> dict[str, Any]:
        current = await state.pool.get(vault)
        result = await current.reprovision(
            job.on_phase, on_cold=lambda: job.write("the vault is cold: provisioning it\n")
        )
        if result.from_cold:
            return {
                "provisioned_from_cold": True,
                "new_boot_id": result.new_boot_id,
                "runtime": result.runtime_status.name.lower(),
                "seconds": round(result.seconds, 2),
                "next_step": f'exec(vault="{vault}", ...) runs in the new rootfs',
            }
        return {
            "provisioned_from_cold": False,
            "old_boot_id": result.old_boot_id,
            "new_boot_id": result.new_boot_id,
            "runtime": result.runtime_status.name.lower(),
            "seconds": round(result.seconds, 2),
            "next_step": f'exec(vault="{vault}", ...) runs in the new rootfs; '
            "/root and /home were kept",
        }

    job = state.jobs.start("reprovision", vault, work)
    return structured(await state.jobs.follow(job, ctx, wait_seconds, foreground=True))


@admin_tools.tool(
    "Job status", read_only=True, destructive=False, idempotent=True, open_world=False
)
async def job_status(
    state: State,
    ctx: Context,
    job_id: str,
    wait_seconds: WaitSeconds = 30.0,
) -> Annotated[CallToolResult, JobResult]:
    """Wait for a job up to wait_seconds: state, result or error."""
    job = state.jobs.get(job_id)
    return structured(await state.jobs.follow(job, ctx, wait_seconds, foreground=False))


# Local vault ------------------------------------------------------------------------


@admin_tools.tool(
    "Local vault", read_only=False, destructive=True, idempotent=True, open_world=False
)
async def local_vault(
    state: State,
    action: Literal["up", "down"],
    name: str = "local",
    port: int = 0,
    rootfs: str | None = None,
) -> Annotated[CallToolResult, LocalVault]:
    """up: start a dev vault here as name (vm mode with rootfs). down: stop it."""
    check_port("port", port, lowest=0)
    if action == "down":
        stopped = await anyio.to_thread.run_sync(localvault.down)
        if stopped is not None:
            await state.pool.forget(f"{stopped.host}:{stopped.port}")
        return structured(LocalVault(running=False, pid=stopped.pid if stopped else None))
    up_state, started = await anyio.to_thread.run_sync(
        lambda: localvault.up(name=name, port=port, rootfs=Path(rootfs) if rootfs else None)
    )
    state.pool.config()  # pick up the new entry (and its token, for scrubbing) now
    return structured(
        local_vault_info(
            up_state,
            started_now=started,
            vault=name,
            next_step=f'exec(vault="{name}", command="uname -a", context="check the local vault")',
        )
    )


# Tenants ----------------------------------------------------------------------------


@tenant_tools.tool("Tenants", read_only=False, destructive=True, idempotent=False, open_world=True)
async def tenant(
    state: State,
    ctx: Context,
    action: Literal["list", "usage_facts", "create", "delete", "update_image"],
    tenant_id: str | None = None,
    template: str | None = None,
    variables: dict[str, str] | None = None,
    image: str | None = None,
    tenants: list[str] | None = None,
    all_tenants: bool = False,
    confirm: Confirm = False,
    canary: Annotated[int, Field(ge=0)] = 1,
    concurrency: Annotated[int, Field(ge=1)] = 4,
    wait_seconds: WaitSeconds = 30.0,
) -> CallToolResult:
    """Admin app tenants; create, delete, update_image only plan without confirm."""
    settings = admin.settings(None, None)  # the app: FLY_APP in the server's environment
    if action == "list":
        return structured(await admin.tenant_list(settings, tenant_id))
    if action == "usage_facts":
        return structured(await admin.usage_facts(settings, tenant_id))
    if action == "create":
        job = _create_job(state, settings, tenant_id, template, variables, not confirm)
    elif action == "delete":
        job = _delete_job(state, settings, _required(tenant_id, "tenant_id", action), confirm)
    else:
        job = _update_job(
            state,
            settings,
            _required(image, "image", action),
            tenants,
            all_tenants,
            confirm,
            RolloutChoices(canary, concurrency),
        )
    return structured(await state.jobs.follow(job, ctx, wait_seconds, foreground=True))


def _required(value: str | None, name: str, action: str) -> str:
    if not value:
        raise UsageError(
            f'tenant(action="{action}") needs {name}',
            hint=f'pass {name}=...; tenant(action="list") shows the tenants',
        )
    return value


def _create_job(
    state: State,
    settings: Any,
    tenant_id: str | None,
    template: str | None,
    variables: dict[str, str] | None,
    dry_run: bool,
) -> Job:
    tenant_id = _required(tenant_id, "tenant_id", "create")
    plans = admin.create_plans(
        settings, tenant_id, _required(template, "template", "create"), variables or {}
    )
    if dry_run:

        async def show(job: Job) -> dict[str, Any]:
            return admin.dry_run(plans)

        return state.jobs.start("tenant create (dry run)", tenant_id, show)
    work = admin.create_work(settings, tenant_id, plans, 180.0)
    return state.jobs.start("tenant create", tenant_id, work)


def _delete_job(state: State, settings: Any, tenant_id: str, confirm: bool) -> Job:
    if confirm:
        work = admin.delete_work(settings, tenant_id, 180.0)
        return state.jobs.start("tenant delete", tenant_id, work)

    async def plan(job: Job) -> dict[str, Any]:
        return await admin.delete_plan(settings, tenant_id)

    return state.jobs.start("tenant delete (plan)", tenant_id, plan)


@dataclass(frozen=True)
class RolloutChoices:
    canary: int
    concurrency: int


def _update_job(
    state: State,
    settings: Any,
    image: str,
    tenants: list[str] | None,
    all_tenants: bool,
    confirm: bool,
    choices: RolloutChoices,
) -> Job:
    if all_tenants == bool(tenants):
        raise UsageError(
            'tenant(action="update_image") needs either tenants=[...] or all_tenants=true',
            hint='tenant(action="list") shows the tenant ids',
        )
    selection = None if all_tenants else sorted(set(tenants or ()))
    if confirm:
        from flyvault.admin.rollout import RolloutOptions

        options = RolloutOptions(
            image=image,
            tenants=selection,
            concurrency=choices.concurrency,
            canary=choices.canary,
        )
        return state.jobs.start("tenant update_image", image, admin.update_work(settings, options))

    async def plan(job: Job) -> dict[str, Any]:
        return await admin.update_plan(settings, image, selection, False)

    return state.jobs.start("tenant update_image (plan)", image, plan)


__all__ = ["admin_tools", "tenant_tools"]
