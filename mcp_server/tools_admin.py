"""Provisioning and administration tools: reprovision, job_status, local_vault_up/down/status,
tenant_list, tenant_usage_facts, tenant_create, tenant_delete, tenant_update_image."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import anyio.to_thread
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from flyvault import localvault
from flyvault.errors import UsageError

from . import tenants as admin
from .jobs import Job
from .models import JobResult, LocalVault, TenantList, UsageFacts
from .pool import PROGRESS
from .server import State, VaultMCP, structured
from .tools_vault import MAX_WAIT, VaultName

WaitSeconds = Annotated[
    float,
    Field(ge=0, le=MAX_WAIT, description="wait at most this long, then return the job handle"),
]
Confirm = Annotated[
    bool, Field(description="true only after the user agreed; false shows what would happen")
]
App = Annotated[str | None, Field(description="Fly app of the tenant machines (default FLY_APP)")]
TenantId = Annotated[str, Field(description="tenant id")]


def _local(state: localvault.LocalState | None, **extra: Any) -> LocalVault:
    if state is None:
        return LocalVault(running=False, **extra)
    data = asdict(state)
    return LocalVault(
        running=True,
        pid=data["pid"],
        address=f"{state.host}:{state.port}",
        mode=data["mode"],
        issuer_base_url=data["issuer_base_url"],
        data_dir=data["data_dir"],
        log_file=data["log_file"],
        started_at=data["started_at"],
        **extra,
    )


def register_admin_tools(server: VaultMCP, state: State) -> None:
    pool, jobs = state.pool, state.jobs

    # Provisioning -----------------------------------------------------------------------

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=True))
    async def reprovision(
        ctx: Context,
        vault: VaultName,
        confirm: Annotated[
            bool, Field(description="must be true: only after the user agreed")
        ] = False,
        wait_seconds: WaitSeconds = 30.0,
    ) -> Annotated[CallToolResult, JobResult]:
        """Replace a vault's rootfs with the one its config entry names (rootfs file,
        uploaded with progress notifications, or rootfs_url, downloaded by the vault).
        Every process on the vault is stopped; /root and /home are kept; the old rootfs
        comes back if the new one fails to start. A cold vault is provisioned. Refused
        unless confirm=true: ask the user first. Returns a job; job_status follows it."""
        entry = pool.entry(vault)
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
            from flyvault.client.connection import open_vault
            from flyvault.errors import ColdVault

            current = await pool.get(vault)
            token = PROGRESS.set(job.on_phase)
            try:
                if current.current is None:
                    try:
                        connection = await open_vault(current.config, provision=False)
                    except ColdVault:
                        job.write("the vault is cold: provisioning it\n")
                        began = time.monotonic()
                        connection = await current.connection()
                        return {
                            "provisioned_from_cold": True,
                            "new_boot_id": connection.boot_id,
                            "runtime": connection.runtime_status.name.lower(),
                            "seconds": round(time.monotonic() - began, 2),
                            "next_step": f'exec(vault="{vault}", ...) runs in the new rootfs',
                        }
                    current.adopt(connection)
                result = await current.reprovision(job.on_phase)
            finally:
                PROGRESS.reset(token)
            return {
                "provisioned_from_cold": False,
                "old_boot_id": result.old_boot_id,
                "new_boot_id": result.new_boot_id,
                "runtime": result.runtime_status.name.lower(),
                "seconds": round(result.seconds, 2),
                "next_step": f'exec(vault="{vault}", ...) runs in the new rootfs; '
                "/root and /home were kept",
            }

        job = jobs.start("reprovision", vault, work)
        return structured(await jobs.follow(job, ctx, wait_seconds, foreground=True))

    @server.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def job_status(
        ctx: Context,
        job_id: Annotated[str, Field(description="from reprovision or a tenant tool")],
        wait_seconds: WaitSeconds = 30.0,
    ) -> Annotated[CallToolResult, JobResult]:
        """Follow a job (reprovision, tenant create/delete/update-image): waits up to
        wait_seconds for it to finish, then returns its state, progress, result or error,
        and its last log lines. Waiting here never cancels the job."""
        job = jobs.get(job_id)
        return structured(await jobs.follow(job, ctx, wait_seconds, foreground=False))

    # Local vault ------------------------------------------------------------------------

    @server.tool(annotations=ToolAnnotations(idempotent_hint=True, open_world_hint=False))
    async def local_vault_up(
        name: Annotated[str, Field(description="config entry to write")] = "local",
        port: Annotated[int, Field(ge=0, le=65535, description="UDP port (0: any)")] = 0,
        rootfs: Annotated[
            str | None,
            Field(description="a .tar.gz rootfs: vm mode (root only); default host mode"),
        ] = None,
    ) -> Annotated[CallToolResult, LocalVault]:
        """Start a local dev vault on this machine (127.0.0.1, attested by a local stand-in
        issuer) and write its config entry with a fresh access token. Host mode runs
        commands as this user on this machine; with rootfs, vm mode runs them in their own
        namespaces. Idempotent: an already running one is returned. Then use the other
        tools with vault=name."""
        up_state, started = await anyio.to_thread.run_sync(
            lambda: localvault.up(name=name, port=port, rootfs=Path(rootfs) if rootfs else None)
        )
        pool.config()  # pick up the new entry (and its token, for scrubbing) now
        return structured(
            _local(
                up_state,
                started_now=started,
                vault=name,
                next_step=f'exec(vault="{name}", command="uname -a", context="check the '
                'local vault") or vault_status',
            )
        )

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True))
    async def local_vault_down() -> Annotated[CallToolResult, LocalVault]:
        """Stop the local dev vault (every command running on it ends). Its config entry
        stays; local_vault_up starts it again with a new token."""
        stopped = await anyio.to_thread.run_sync(localvault.down)
        if stopped is not None:
            await pool.forget(f"{stopped.host}:{stopped.port}")
        return structured(
            LocalVault(running=False, pid=stopped.pid if stopped else None, next_step=None)
        )

    @server.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True))
    async def local_vault_status() -> Annotated[CallToolResult, LocalVault]:
        """Is the local dev vault running? Its pid, address, mode (host or vm), log file."""
        running = await anyio.to_thread.run_sync(localvault.running_state)
        return structured(_local(running))

    # Tenants ----------------------------------------------------------------------------

    tenant_ro = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=True)

    @server.tool(annotations=tenant_ro)
    async def tenant_list(
        tenant: Annotated[str | None, Field(description="only this tenant")] = None,
        app: App = None,
    ) -> Annotated[CallToolResult, TenantList]:
        """List the tenants of the admin app (machines managed by fly-vault-admin): per
        tenant the machine counts (total/started/stopped), regions, image (or drift) and
        machines. Needs FLY_API_TOKEN in the MCP server's environment."""
        return structured(await admin.tenant_list(admin.settings(app, None), tenant))

    @server.tool(annotations=tenant_ro)
    async def tenant_usage_facts(
        tenant: Annotated[str | None, Field(description="only this tenant")] = None,
        app: App = None,
    ) -> Annotated[CallToolResult, UsageFacts]:
        """Usage facts for metering (one per machine, deleted ones included): state,
        lifecycle timestamps, volumes and sizes."""
        return structured(await admin.usage_facts(admin.settings(app, None), tenant))

    @server.tool(annotations=ToolAnnotations(open_world_hint=True))
    async def tenant_create(
        ctx: Context,
        tenant_id: TenantId,
        template: Annotated[str, Field(description="path of the tenant template (TOML)")],
        variables: Annotated[dict[str, str] | None, Field(description="template variables")] = None,
        dry_run: Annotated[bool, Field(description="only show the requests")] = False,
        wait_seconds: WaitSeconds = 30.0,
        app: App = None,
    ) -> Annotated[CallToolResult, JobResult]:
        """Create a tenant's volumes and machines from a template and wait until they run;
        on failure everything created is removed. An existing tenant is refused.
        {{access_token}} comes from FLY_VAULT_ACCESS_TOKEN in the server's environment.
        dry_run=true shows the requests (secrets hidden). Returns a job."""
        settings = admin.settings(app, None)
        plans = admin.create_plans(settings, tenant_id, template, variables or {})
        if dry_run:

            async def show(job: Job) -> dict[str, Any]:
                return admin.dry_run(plans)

            job = jobs.start("tenant_create (dry run)", tenant_id, show)
        else:
            job = jobs.start(
                "tenant_create", tenant_id, admin.create_work(settings, tenant_id, plans, 180.0)
            )
        return structured(await jobs.follow(job, ctx, wait_seconds, foreground=True))

    @server.tool(
        annotations=ToolAnnotations(
            destructive_hint=True, idempotent_hint=True, open_world_hint=True
        )
    )
    async def tenant_delete(
        ctx: Context,
        tenant_id: TenantId,
        confirm: Confirm = False,
        wait_seconds: WaitSeconds = 30.0,
        app: App = None,
    ) -> Annotated[CallToolResult, JobResult]:
        """Delete a tenant: stop and destroy its machines, delete their volumes (data is
        lost). Without confirm=true only returns the plan (applied=false): show it to the
        user first. Running it again after a partial failure finishes the job."""
        settings = admin.settings(app, None)
        if confirm:
            job = jobs.start(
                "tenant_delete", tenant_id, admin.delete_work(settings, tenant_id, 180.0)
            )
        else:

            async def plan(job: Job) -> dict[str, Any]:
                return await admin.delete_plan(settings, tenant_id)

            job = jobs.start("tenant_delete (plan)", tenant_id, plan)
        return structured(await jobs.follow(job, ctx, wait_seconds, foreground=True))

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=True))
    async def tenant_update_image(
        ctx: Context,
        image: Annotated[str, Field(description="new image reference")],
        tenants: Annotated[list[str] | None, Field(description="tenant ids")] = None,
        all_tenants: Annotated[bool, Field(description="every tenant instead")] = False,
        confirm: Confirm = False,
        canary: Annotated[int, Field(ge=0, description="canary machines first")] = 1,
        concurrency: Annotated[int, Field(ge=1, description="machines per batch")] = 4,
        soak_seconds: Annotated[float, Field(ge=0, description="healthy time per machine")] = 20.0,
        force: Annotated[bool, Field(description="also machines already on image")] = False,
        wait_seconds: WaitSeconds = 30.0,
        app: App = None,
    ) -> Annotated[CallToolResult, JobResult]:
        """Roll an image out to tenant machines: canary first, then batches with at most
        one machine per tenant; each is health-checked and soaked, and every updated
        machine goes back to its previous image (by digest) if one fails. Resumable.
        Without confirm=true only returns the plan (applied=false). Returns a job."""
        if all_tenants == bool(tenants):
            raise UsageError("give either tenants=[...] or all_tenants=true")
        settings = admin.settings(app, None)
        selection = None if all_tenants else sorted(set(tenants or ()))
        if confirm:
            from flyvault.admin.rollout import RolloutOptions

            options = RolloutOptions(
                image=image,
                tenants=selection,
                concurrency=concurrency,
                canary=canary,
                soak_secs=soak_seconds,
                force=force,
            )
            job = jobs.start("tenant_update_image", image, admin.update_work(settings, options))
        else:

            async def plan(job: Job) -> dict[str, Any]:
                return await admin.update_plan(settings, image, selection, force)

            job = jobs.start("tenant_update_image (plan)", image, plan)
        return structured(await jobs.follow(job, ctx, wait_seconds, foreground=True))


__all__ = ["register_admin_tools"]
