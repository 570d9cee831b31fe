"""``tenant create``: volumes, machines, waits, the create lease; all or nothing.

Create refuses a tenant that already exists, so after a failure every machine carrying the
tenant's metadata is ours to remove. Volumes have no metadata, so ours are those with a
planned name that did not exist before we started.

Read back after doubt: ``POST /volumes`` and ``POST /machines`` are not idempotent, so after
a failed or unanswered one the API is read back (the volumes, the tenant's machines). What
the last call made is adopted and the create goes on; if it made nothing, the call is tried
again (bounded), unless the API refused it (422). Machines are created one at a time, so a
tenant machine we do not know yet can only come from the call that failed.

Every wait for ``started`` shares one deadline (``--wait-timeout-secs``), and so does the
cleanup after a failure; what is left at the end is decided by reading the API back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flyvault.errors import VaultError
from flyvault.fly.errors import ApiAuthError, MachinesApiError
from flyvault.fly.leases import release_lease
from flyvault.fly.machines import Lease, MachinesClient
from flyvault.redact import register as register_secret

from .cleanup import Leftovers, delete_volumes, destroy_machine, volumes_present
from .errors import IncompleteCleanup, TenantExists
from .output import note, out, warn
from .readback import wait_state
from .template import MachinePlan, VolumePlan
from .tenants import list_managed

CREATE_ATTEMPTS = 3


@dataclass
class Made:
    """What this create has made so far, in order."""

    volumes: list[str] = field(default_factory=list)
    machines: list[dict[str, Any]] = field(default_factory=list)
    leases_left: list[str] = field(default_factory=list)


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
    planned = [v for plan in plans for v in plan.volumes]
    before = {str(v.get("id")) for v in await api.list_volumes()} if planned else set()
    made = Made()
    try:
        await _make(api, tenant_id, plans, made, before)
        await _wait_started(api, plans, made, wait_timeout)
        await _release_create_leases(api, made)
    except (VaultError, asyncio.CancelledError) as exc:
        await _undo_create(api, tenant_id, made, planned, before, exc, wait_timeout)
        raise
    out(f"tenant '{tenant_id}' created with {len(made.machines)} machines")
    if made.leases_left:
        raise IncompleteCleanup(
            f"tenant '{tenant_id}' was created, but create leases are left held:\n  "
            + "\n  ".join(made.leases_left),
            hint="they expire by themselves at the times named; until then lease-guarded "
            "calls on those machines fail with 409",
        )
    return made.machines


async def _make(
    api: MachinesClient, tenant_id: str, plans: list[MachinePlan], made: Made, before: set[str]
) -> None:
    for plan in plans:
        for volume in plan.volumes:
            volume_id = await _create_volume(api, volume, made, before)
            plan.request["config"]["mounts"][volume.mount_index]["volume"] = volume_id
            out(f"created volume {volume_id} ({volume.name}, {volume.size_gb} GB, {volume.region})")
    for plan in plans:
        machine = await _create_machine(api, tenant_id, plan, made)
        out(f"created machine {machine.get('id')} ({machine.get('name', '-')})")


async def _create_volume(
    api: MachinesClient, volume: VolumePlan, made: Made, before: set[str]
) -> str:
    body = {"name": volume.name, "region": volume.region, "size_gb": volume.size_gb}
    last: MachinesApiError | None = None
    for _ in range(CREATE_ATTEMPTS):
        try:
            answer = await api.create_volume(body)
        except ApiAuthError:
            raise
        except MachinesApiError as exc:
            last = exc
        else:
            volume_id = str(answer.get("id") or "")
            if not volume_id:
                raise MachinesApiError("machines api: POST /volumes: answer has no id")
            made.volumes.append(volume_id)
            return volume_id
        found = await _find_volume(api, volume.name, before, made, last)
        if found is not None:
            note(f"volume {found} ({volume.name}) was created although the answer was lost")
            made.volumes.append(found)
            return found
        if last.refused:
            raise last
    assert last is not None
    raise last


async def _find_volume(
    api: MachinesClient, name: str, before: set[str], made: Made, cause: MachinesApiError
) -> str | None:
    try:
        volumes = await api.list_volumes()
    except MachinesApiError:
        raise cause from None  # cannot tell: the cleanup finds it by name
    for volume in volumes:
        volume_id = str(volume.get("id"))
        fresh = volume_id not in before and volume_id not in made.volumes
        if fresh and volume.get("name") == name and volume.get("state") != "destroyed":
            return volume_id
    return None


async def _create_machine(
    api: MachinesClient, tenant_id: str, plan: MachinePlan, made: Made
) -> dict[str, Any]:
    last: MachinesApiError | None = None
    for _ in range(CREATE_ATTEMPTS):
        try:
            machine = await api.create_machine(plan.request)
        except ApiAuthError:
            raise
        except MachinesApiError as exc:
            last = exc
        else:
            made.machines.append(machine)
            return machine
        found = await _find_machine(api, tenant_id, made, last)
        if found is not None:
            note(f"machine {found.get('id')} was created although the answer was lost")
            await _adopt_lease(api, found, plan)
            made.machines.append(found)
            return found
        if last.refused:
            raise last
    assert last is not None
    raise last


async def _find_machine(
    api: MachinesClient, tenant_id: str, made: Made, cause: MachinesApiError
) -> dict[str, Any] | None:
    try:
        machines = await list_managed(api, tenants=[tenant_id])
    except MachinesApiError:
        raise cause from None  # cannot tell: the cleanup finds it by metadata
    known = {str(m.get("id")) for m in made.machines}
    unknown = [m for m in machines if str(m.get("id")) not in known]
    return unknown[0] if unknown else None


async def _adopt_lease(api: MachinesClient, machine: dict[str, Any], plan: MachinePlan) -> None:
    """A machine created with ``lease_ttl`` holds a lease whose nonce the lost answer had."""
    if not plan.request.get("lease_ttl") or isinstance(machine.get("nonce"), str):
        return
    try:
        lease = await api.get_lease(str(machine["id"]))
    except MachinesApiError:
        return  # the release step reports it
    if lease is not None:
        machine["nonce"] = lease.nonce


async def _wait_started(
    api: MachinesClient, plans: list[MachinePlan], made: Made, wait_timeout: float
) -> None:
    deadline = api.clock.now() + wait_timeout
    for plan, machine in zip(plans, made.machines, strict=True):
        machine_id = str(machine["id"])
        if plan.request.get("skip_launch"):
            out(f"machine {machine_id} created without starting (skip_launch)")
            continue
        await wait_state(
            api,
            machine_id,
            "started",
            timeout=api.clock.remaining(deadline),
            instance=machine.get("instance_id"),
        )
        out(f"machine {machine_id} started")


async def _release_create_leases(api: MachinesClient, made: Made) -> None:
    """``lease_ttl`` on create holds a lease; the original never let it go."""
    for machine in made.machines:
        nonce = machine.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            continue
        register_secret(nonce)
        lease = Lease(str(machine["id"]), nonce, 0)
        problem = await release_lease(api, lease)
        if problem:
            warn(problem)
            made.leases_left.append(problem)


async def _undo_create(
    api: MachinesClient,
    tenant_id: str,
    made: Made,
    planned: Sequence[VolumePlan],
    before: set[str],
    cause: BaseException,
    wait_timeout: float,
) -> None:
    """Remove everything this create made; raise IncompleteCleanup if something stays."""
    warn(f"create of tenant '{tenant_id}' failed; removing what was created")
    deadline = api.clock.now() + wait_timeout
    notes: list[str] = []
    machines = await _ours(api, tenant_id, made, notes)
    volumes = await _our_volumes(api, made, planned, before, notes)
    left = Leftovers()
    for machine in machines:
        await destroy_machine(api, machine, deadline, left)
    await delete_volumes(api, volumes, deadline, left)
    machines_left, volumes_left = await _remaining(api, tenant_id, volumes, left, notes)
    removed_m = len(machines) - len(machines_left)
    removed_v = len(volumes) - len(volumes_left)
    summary = f"removed {removed_m} machine(s) and {removed_v} volume(s) it had created"
    problems = (
        notes
        + left.lines([*machines_left, *volumes_left])
        + [f"machine {m} ({machines_left[m]}) still exists" for m in _new(machines_left, left)]
        + [f"volume {v} still exists" for v in _new(volumes_left, left)]
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


async def _ours(
    api: MachinesClient, tenant_id: str, made: Made, notes: list[str]
) -> list[dict[str, Any]]:
    machines = {str(m["id"]): m for m in made.machines if m.get("id")}
    try:
        # A create that timed out may still have made a machine: find it by metadata.
        for machine in await list_managed(api, tenants=[tenant_id]):
            machines.setdefault(str(machine["id"]), machine)
    except VaultError as exc:
        notes.append(f"could not list the tenant's machines: {exc.message}")
    return list(machines.values())


async def _our_volumes(
    api: MachinesClient,
    made: Made,
    planned: Sequence[VolumePlan],
    before: set[str],
    notes: list[str],
) -> list[str]:
    volumes = list(made.volumes)
    if not planned:
        return volumes
    names = {v.name for v in planned}
    try:
        for volume in await api.list_volumes():
            vid = str(volume.get("id"))
            if vid not in before and volume.get("name") in names and vid not in volumes:
                volumes.append(vid)
    except VaultError as exc:
        notes.append(f"could not list volumes: {exc.message}")
    return volumes


async def _remaining(
    api: MachinesClient, tenant_id: str, volumes: list[str], left: Leftovers, notes: list[str]
) -> tuple[dict[str, str], list[str]]:
    """The machines (id: state) and volumes still there, as the API says now."""
    try:
        machines = {
            str(m.get("id")): str(m.get("state"))
            for m in await list_managed(api, tenants=[tenant_id])
        }
        present = await volumes_present(api, volumes) if volumes else []
    except VaultError as exc:
        notes.append(f"could not check what is left: {exc.message}")
        stuck = dict.fromkeys(sorted(left.stuck_machines), "unknown")
        return stuck, sorted(set(left.reasons) & set(volumes))
    return machines, present


def _new(remaining: Iterable[str], left: Leftovers) -> list[str]:
    """Resources still there without a reason recorded on the way."""
    return [rid for rid in remaining if rid not in left.reasons]


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, VaultError) else "interrupted"
