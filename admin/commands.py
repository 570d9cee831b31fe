"""``tenant create``, ``tenant delete``, ``tenant list`` and ``tenant usage-facts``.

Each ``run_*`` takes the parsed arguments, runs one asyncio program against the Machines
API and returns the exit code; errors are ``VaultError`` subclasses that ``admin.main``
prints. ``update-image`` lives in ``admin.rollout``.

Create is all-or-nothing: it refuses a tenant that already exists, so after a failure every
machine carrying the tenant's metadata is ours to remove, including one whose create timed
out after the API had acted (found by listing, not by remembering). Volumes have no metadata,
so orphans from a timed-out volume create are found by name among the volumes that did not
exist before we started.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from admin.errors import (
    ApiNotFound,
    IncompleteCleanup,
    MachinesApiError,
    TenantExists,
)
from admin.machines import MachinesClient, RetryPolicy, Timeouts
from admin.output import out, print_json, render_table, terminal_width, warn
from admin.template import (
    MachinePlan,
    auto_volume_placeholder,
    check_app,
    load_template,
    parse_vars,
    render_plan,
    validate_tenant_id,
)
from admin.tenants import (
    configured_image,
    list_managed,
    redact_config,
    summarise,
    volume_ids,
    volume_sizes,
)
from flyvault.errors import UsageError, VaultError
from flyvault.redact import register as register_secret

# Tests shorten these; the CLI uses the defaults.
RETRY = RetryPolicy()
TIMEOUTS = Timeouts()
CLEANUP_POLL = 0.5


def make_client(args: argparse.Namespace) -> MachinesClient:
    return MachinesClient(
        base_url=args.api_base, app=args.app, token=args.api_token, retry=RETRY, timeouts=TIMEOUTS
    )


# -- create ----------------------------------------------------------------------------------


def run_create(args: argparse.Namespace) -> int:
    register_secret(args.access_token)
    validate_tenant_id(args.tenant_id)
    if args.wait_timeout_secs <= 0:
        raise UsageError("--wait-timeout-secs must be > 0")
    variables = _variables(args.var, getattr(args, "secret_var", None) or [])
    template = load_template(Path(args.template))
    check_app(template, args.app)
    plans = render_plan(
        template, args.tenant_id, access_token=args.access_token, variables=variables
    )
    used = {ph.name for ph in template.placeholders}
    for key in sorted(set(variables) - used):
        warn(f"--var '{key}' is not used by template {template.path}")
    if args.dry_run:
        print_json(dry_run_plan(plans))
        return 0
    return asyncio.run(_create(args, plans))


def _variables(plain: Sequence[str], secret: Sequence[str]) -> dict[str, str]:
    """``--var`` and ``--secret-var`` together; a secret variable's value is registered with
    the scrubber before anything can print it."""
    for item in secret:  # registered first: even an error quoting the item hides the value
        register_secret(item.partition("=")[2] or item)
    hidden = parse_vars(secret)
    return parse_vars([*plain, *(f"{key}={value}" for key, value in hidden.items())])


def dry_run_plan(plans: Sequence[MachinePlan]) -> list[dict[str, Any]]:
    """The create requests as they would be sent, volumes as placeholders, secrets hidden."""
    requests = []
    for plan in plans:
        request = dict(plan.request)
        config = redact_config(request["config"])
        for volume in plan.volumes:
            config["mounts"][volume.mount_index]["volume"] = auto_volume_placeholder(volume)
        request["config"] = config
        requests.append(request)
    return requests


async def _create(args: argparse.Namespace, plans: list[MachinePlan]) -> int:
    async with make_client(args) as api:
        await create_tenant(api, args.tenant_id, plans, wait_timeout=args.wait_timeout_secs)
    return 0


async def create_tenant(
    api: MachinesClient,
    tenant_id: str,
    plans: list[MachinePlan],
    *,
    wait_timeout: float,
) -> list[dict[str, Any]]:
    existing = await list_managed(api, tenants=[tenant_id])
    if existing:
        ids = ", ".join(str(m.get("id")) for m in existing)
        raise TenantExists(
            f"tenant '{tenant_id}' already exists ({len(existing)} machine(s): {ids})",
            hint="use `tenant update-image` to change it, or `tenant delete` first",
        )
    planned_volumes = [v for plan in plans for v in plan.volumes]
    volumes_before: set[str] = set()
    if planned_volumes:
        volumes_before = {str(v.get("id")) for v in await api.list_volumes()}
    created_volumes: list[str] = []
    created: list[dict[str, Any]] = []
    try:
        for plan in plans:
            for volume in plan.volumes:
                answer = await api.create_volume(
                    {"name": volume.name, "region": volume.region, "size_gb": volume.size_gb}
                )
                volume_id = str(answer.get("id") or "")
                if not volume_id:
                    raise MachinesApiError("machines api: POST /volumes: answer has no id")
                created_volumes.append(volume_id)
                plan.request["config"]["mounts"][volume.mount_index]["volume"] = volume_id
                out(
                    f"created volume {volume_id} ({volume.name}, {volume.size_gb} GB, "
                    f"{volume.region})"
                )
        for plan in plans:
            machine = await api.create_machine(plan.request)
            created.append(machine)
            out(f"created machine {machine.get('id')} ({machine.get('name', '-')})")
        for plan, machine in zip(plans, created, strict=True):
            machine_id = str(machine["id"])
            if plan.request.get("skip_launch"):
                out(f"machine {machine_id} created without starting (skip_launch)")
            else:
                await api.wait(
                    machine_id,
                    "started",
                    timeout=wait_timeout,
                    instance_id=machine.get("instance_id"),
                )
                out(f"machine {machine_id} started")
            nonce = machine.get("nonce")
            if isinstance(nonce, str) and nonce:
                # lease_ttl on create holds a lease; the original never let it go.
                register_secret(nonce)
                try:
                    await api.release_lease(machine_id, nonce)
                except MachinesApiError as exc:
                    warn(f"could not release the create lease on {machine_id}: {exc.message}")
    except (VaultError, asyncio.CancelledError) as exc:
        await _undo_create(
            api,
            tenant_id,
            created,
            created_volumes,
            planned_volumes,
            volumes_before,
            exc,
            wait_timeout,
        )
        raise
    out(f"tenant '{tenant_id}' created with {len(created)} machines")
    return created


async def _undo_create(
    api: MachinesClient,
    tenant_id: str,
    created: list[dict[str, Any]],
    created_volumes: list[str],
    planned_volumes: Sequence[Any],
    volumes_before: set[str],
    cause: BaseException,
    wait_timeout: float,
) -> None:
    """Remove everything this create made; raise IncompleteCleanup if something stays."""
    warn(f"create of tenant '{tenant_id}' failed; removing what was created")
    problems: list[str] = []
    machines: dict[str, dict[str, Any]] = {str(m["id"]): m for m in created if m.get("id")}
    try:
        # A create that timed out may still have made a machine: find it by metadata.
        for machine in await list_managed(api, tenants=[tenant_id]):
            machines.setdefault(str(machine["id"]), machine)
    except VaultError as exc:
        problems.append(f"could not list the tenant's machines: {exc.message}")
    volumes = list(created_volumes)
    if planned_volumes:
        try:
            names = {v.name for v in planned_volumes}
            for volume in await api.list_volumes():
                vid = str(volume.get("id"))
                if vid not in volumes_before and volume.get("name") in names and vid not in volumes:
                    volumes.append(vid)
        except VaultError as exc:
            problems.append(f"could not list volumes: {exc.message}")
    removed_machines = await _destroy_machines(
        api, list(machines.values()), problems, timeout=wait_timeout
    )
    removed_volumes = await _delete_volumes(api, volumes, problems, timeout=wait_timeout)
    summary = (
        f"removed {removed_machines} machine(s) and {removed_volumes} volume(s) it had created"
    )
    if problems:
        raise IncompleteCleanup(
            f"{_message(cause)}\ncreate rolled back only partly ({summary}); left behind:\n  "
            + "\n  ".join(problems),
            hint=f"remove the rest with `fly-vault-admin tenant delete {tenant_id} --yes`",
        ) from (cause if isinstance(cause, VaultError) else None)
    if isinstance(cause, VaultError):
        cause.message = (
            f"{cause.message}\ncreate rolled back: {summary}; tenant '{tenant_id}' does not exist"
        )


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, VaultError) else "interrupted"


async def _destroy_machines(
    api: MachinesClient, machines: list[dict[str, Any]], problems: list[str], *, timeout: float
) -> int:
    removed = 0
    for machine in machines:
        machine_id = str(machine["id"])
        nonce = machine.get("nonce") if isinstance(machine.get("nonce"), str) else None
        try:
            await api.delete_machine(machine_id, force=True, nonce=nonce)
        except ApiNotFound:
            removed += 1
            continue
        except VaultError as exc:
            problems.append(f"machine {machine_id} ({machine.get('state', '?')}): {exc.message}")
            continue
        try:
            await api.wait(machine_id, "destroyed", timeout=timeout)
        except ApiNotFound:
            pass
        except VaultError as exc:
            problems.append(
                f"machine {machine_id} is being destroyed but is not gone: {exc.message}"
            )
            continue
        removed += 1
    return removed


async def _delete_volumes(
    api: MachinesClient, volumes: Sequence[str], problems: list[str], *, timeout: float
) -> int:
    """Delete volumes; one still attached to a machine being destroyed is retried."""
    removed = 0
    for volume_id in volumes:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await api.delete_volume(volume_id)
                removed += 1
                break
            except ApiNotFound:
                removed += 1
                break
            except MachinesApiError as exc:
                attached = exc.status in (409, 412, 422)
                if not attached or time.monotonic() > deadline:
                    problems.append(f"volume {volume_id}: {exc.message}")
                    break
                await asyncio.sleep(CLEANUP_POLL)
            except VaultError as exc:
                problems.append(f"volume {volume_id}: {exc.message}")
                break
    return removed


# -- delete ----------------------------------------------------------------------------------


def run_delete(args: argparse.Namespace) -> int:
    if args.wait_timeout_secs <= 0:
        raise UsageError("--wait-timeout-secs must be > 0")
    confirm = _ask if sys.stdin.isatty() and sys.stderr.isatty() else None
    return asyncio.run(_delete(args, confirm))


def _ask(prompt: str) -> str:
    print(prompt, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip()


async def _delete(args: argparse.Namespace, confirm: Callable[[str], str] | None) -> int:
    async with make_client(args) as api:
        await delete_tenant(
            api,
            args.tenant_id,
            yes=args.yes,
            confirm=confirm,
            wait_timeout=args.wait_timeout_secs,
        )
    return 0


async def delete_tenant(
    api: MachinesClient,
    tenant_id: str,
    *,
    yes: bool,
    confirm: Callable[[str], str] | None,
    wait_timeout: float,
) -> None:
    live = await list_managed(api, tenants=[tenant_id])
    # Machines destroyed by an earlier, interrupted delete still name their volumes.
    everything = await list_managed(api, tenants=[tenant_id], include_deleted=True)
    existing_volumes = {str(v.get("id")) for v in await api.list_volumes()}
    volumes = sorted({vid for m in everything for vid in volume_ids(m)} & existing_volumes)
    if not live and not volumes:
        out(f"tenant '{tenant_id}' has no managed machines")
        return
    out(f"deletion plan for tenant '{tenant_id}':")
    for machine in live:
        out(f"- machine {machine.get('id')} (state={machine.get('state')})")
    for volume_id in volumes:
        out(f"- volume {volume_id}")
    if not yes:
        if confirm is None:
            raise UsageError(
                "refusing delete without --yes",
                hint="check the plan above, then run again with --yes",
            )
        answer = confirm(f"type the tenant id '{tenant_id}' to delete it: ")
        if answer != tenant_id:
            raise UsageError("delete cancelled: the answer did not match the tenant id")

    problems: list[str] = []
    for machine in live:
        await _retire_machine(api, machine, problems, wait_timeout)
    removed = await _destroy_machines(api, live, problems, timeout=wait_timeout)
    removed_volumes = await _delete_volumes(api, volumes, problems, timeout=wait_timeout)

    remaining = await list_managed(api, tenants=[tenant_id])
    if remaining:
        problems.append(
            f"{len(remaining)} machine(s) still remain for tenant {tenant_id}: "
            + ", ".join(f"{m.get('id')} ({m.get('state')})" for m in remaining)
        )
    if problems:
        raise IncompleteCleanup(
            f"tenant delete completed with errors ({removed} machine(s), {removed_volumes} "
            "volume(s) removed):\n  " + "\n  ".join(dict.fromkeys(problems)),
            hint=f"run `fly-vault-admin tenant delete {tenant_id} --yes` again; it picks up "
            "where this one stopped",
        )
    out(f"tenant '{tenant_id}' deleted ({removed} machine(s), {removed_volumes} volume(s))")


async def _retire_machine(
    api: MachinesClient, machine: dict[str, Any], problems: list[str], wait_timeout: float
) -> None:
    """Cordon and stop before the force delete, so the VM shuts down cleanly if it can."""
    machine_id = str(machine.get("id"))
    try:
        await api.cordon(machine_id)
    except ApiNotFound:
        return
    except MachinesApiError as exc:
        # A held lease (409) blocks cordon and stop; the force delete still works.
        warn(f"cordon {machine_id}: {exc.message}")
    if machine.get("state") not in ("started", "starting"):
        return
    try:
        await api.stop_machine(machine_id)
    except MachinesApiError as exc:
        if exc.status not in (404, 409, 412, 422):
            problems.append(f"stop {machine_id}: {exc.message}")
        return
    try:
        await api.wait(
            machine_id, "stopped", timeout=wait_timeout, instance_id=machine.get("instance_id")
        )
    except VaultError as exc:
        warn(f"wait stopped {machine_id}: {exc.message}; destroying it anyway")


# -- list ------------------------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    async def collect() -> tuple[list[dict[str, Any]], dict[str, int]]:
        async with make_client(args) as api:
            machines = await list_managed(api, tenants=[args.tenant] if args.tenant else None)
            sizes = volume_sizes(await api.list_volumes())
            return machines, sizes

    machines, sizes = asyncio.run(collect())
    tenants = summarise(machines, sizes)
    if args.json:
        print_json(tenants)
        return 0
    if not tenants:
        out("no managed tenants found")
        return 0
    width = terminal_width()
    lines = _wide_rows(tenants, width) if args.wide else _summary_rows(tenants, machines, width)
    for line in lines:
        out(line)
    return 0


def _display_image(machines: Sequence[dict[str, Any]]) -> str:
    # The configured reference reads better in a table than a sha256 digest.
    images = {configured_image(m) for m in machines} - {None}
    if not images:
        return "unknown"
    return str(next(iter(images))) if len(images) == 1 else f"drift({len(images)})"


def _summary_rows(
    tenants: list[dict[str, Any]], machines: list[dict[str, Any]], width: int | None
) -> list[str]:
    rows = []
    for tenant in tenants:
        members = [m for m in machines if m.get("id") in {e["id"] for e in tenant["machines"]}]
        rows.append(
            [
                tenant["tenant_id"],
                f"{tenant['total']}/{tenant['started']}/{tenant['stopped']}",
                ",".join(tenant["regions"]) or "-",
                _display_image(members),
                tenant["last_updated_at"] or "-",
            ]
        )
    lines = render_table(
        ["TENANT", "MACHINES", "REGIONS", "IMAGE", "LAST UPDATED"],
        [24, 12, 16, 20, 26],
        rows,
        truncated=[3],
        shrinkable=3,
        width=width,
    )
    total = sum(t["total"] for t in tenants)
    started = sum(t["started"] for t in tenants)
    stopped = sum(t["stopped"] for t in tenants)
    return [*lines, f"machines: {total}/{started}/{stopped}"]


def _wide_rows(tenants: list[dict[str, Any]], width: int | None) -> list[str]:
    rows = []
    for tenant in tenants:
        for machine in tenant["machines"]:
            image = machine["config"].get("image") if isinstance(machine["config"], dict) else None
            rows.append(
                [
                    tenant["tenant_id"],
                    str(machine["id"]),
                    str(machine["state"]),
                    machine["region"] or "-",
                    str(image or machine["image"] or "-"),
                    ",".join(machine["volumes"]) or "-",
                ]
            )
    return render_table(
        ["TENANT", "MACHINE", "STATE", "REGION", "IMAGE", "VOLUMES"],
        [24, 18, 10, 8, 22, 18],
        rows,
        truncated=[4, 5],
        shrinkable=4,
        width=width,
    )


# -- usage facts -----------------------------------------------------------------------------


def run_usage_facts(args: argparse.Namespace) -> int:
    bearer = (args.bearer_token or "").strip() or None
    register_secret(bearer)
    if args.listen:
        from admin.usage_server import parse_listen, serve

        host, port = parse_listen(args.listen, bearer_token=bearer)
        return asyncio.run(serve(make_client(args), host, port, bearer, tenant=args.tenant))
    if bearer:
        warn("--bearer-token is only used with --listen")

    from admin.tenants import collect_usage_facts

    async def collect() -> list[dict[str, Any]]:
        async with make_client(args) as api:
            return await collect_usage_facts(api, args.tenant)

    print_json(asyncio.run(collect()))
    return 0
