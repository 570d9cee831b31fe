"""``tenant delete``: cordon, stop, destroy the tenant's machines, then delete its volumes.

Volumes come from the ``config.mounts`` of all the tenant's machines, destroyed ones
included, so a rerun after a half-done delete still finds them. Cordon and stop are
courtesies before the force delete: when they fail the delete goes on (a warning says so).
Whether the delete succeeded is decided by reading the API back at the end: only resources
that are still there make it incomplete (exit 12), each named with its state and the reason
it could not be removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flyvault.errors import UsageError, VaultError
from flyvault.fly.errors import ApiAuthError, ApiNotFound, MachinesApiError
from flyvault.fly.machines import MachinesClient

from .cleanup import Leftovers, delete_volumes, destroy_machine, volumes_present
from .errors import IncompleteCleanup
from .output import out, warn
from .readback import read_machine, set_cordon, wait_state
from .tenants import list_managed, volume_ids


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
    _print_plan(tenant_id, live, volumes)
    _confirm(tenant_id, yes, confirm)
    left = Leftovers()
    for machine in live:
        await _retire_machine(api, machine, wait_timeout)
        await destroy_machine(api, machine, api.clock.now() + wait_timeout, left)
    await delete_volumes(api, volumes, api.clock.now() + wait_timeout, left)
    await _check_done(api, tenant_id, live, volumes, left)


def _print_plan(tenant_id: str, live: list[dict[str, Any]], volumes: list[str]) -> None:
    out(f"deletion plan for tenant '{tenant_id}':")
    for machine in live:
        out(f"- machine {machine.get('id')} (state={machine.get('state')})")
    for volume_id in volumes:
        out(f"- volume {volume_id}")


def _confirm(tenant_id: str, yes: bool, confirm: Callable[[str], str] | None) -> None:
    if yes:
        return
    if confirm is None:
        raise UsageError(
            "refusing delete without --yes",
            hint="check the plan above, then run again with --yes",
        )
    answer = confirm(f"type the tenant id '{tenant_id}' to delete it: ")
    if answer != tenant_id:
        raise UsageError("delete cancelled: the answer did not match the tenant id")


async def _check_done(
    api: MachinesClient,
    tenant_id: str,
    live: list[dict[str, Any]],
    volumes: list[str],
    left: Leftovers,
) -> None:
    """Read the API back: only what is still there makes the delete incomplete."""
    try:
        remaining = await list_managed(api, tenants=[tenant_id])
        volumes_left = await volumes_present(api, volumes) if volumes else []
    except VaultError as exc:
        raise IncompleteCleanup(
            f"tenant delete could not check what is left: {exc.message}",
            hint=f"run `fly-vault-admin tenant delete {tenant_id} --yes` again",
        ) from exc
    problems = left.lines(volumes_left) + left.lines(str(m.get("id")) for m in remaining)
    unexplained = [m for m in remaining if str(m.get("id")) not in left.reasons]
    if unexplained:
        problems.append(
            f"{len(unexplained)} machine(s) still remain for tenant {tenant_id}: "
            + ", ".join(f"{m.get('id')} ({m.get('state')})" for m in unexplained)
        )
    problems += [f"volume {v} still exists" for v in volumes_left if v not in left.reasons]
    removed = len(live) - len(remaining)
    removed_volumes = len(volumes) - len(volumes_left)
    if problems:
        raise IncompleteCleanup(
            f"tenant delete completed with errors ({removed} machine(s), {removed_volumes} "
            "volume(s) removed):\n  " + "\n  ".join(dict.fromkeys(problems)),
            hint=f"run `fly-vault-admin tenant delete {tenant_id} --yes` again; it picks up "
            "where this one stopped",
        )
    out(f"tenant '{tenant_id}' deleted ({removed} machine(s), {removed_volumes} volume(s))")


async def _retire_machine(
    api: MachinesClient, machine: dict[str, Any], wait_timeout: float
) -> None:
    """Cordon and stop before the force delete, so the VM shuts down cleanly if it can."""
    machine_id = str(machine.get("id"))
    try:
        await set_cordon(api, machine_id, on=True, nonce=None)
    except MachinesApiError as exc:
        # A held lease (409) blocks cordon and stop; the force delete still works.
        warn(f"cordon {machine_id}: {exc.message}")
    if machine.get("state") not in ("started", "starting"):
        return
    if not await _stop(api, machine_id):
        return
    try:
        await wait_state(
            api, machine_id, "stopped", timeout=wait_timeout, instance=machine.get("instance_id")
        )
    except VaultError as exc:
        warn(f"wait stopped {machine_id}: {exc.message}; destroying it anyway")


async def _stop(api: MachinesClient, machine_id: str) -> bool:
    """Ask the machine to stop; False when it is not stopping (the delete goes on)."""
    try:
        await api.stop_machine(machine_id)
        return True
    except ApiNotFound:
        return False
    except ApiAuthError:
        raise
    except MachinesApiError as exc:
        error = exc
    try:
        current = await read_machine(api, machine_id)
    except MachinesApiError:
        current = None
    if current is not None and current.get("state") in ("stopping", "stopped"):
        return True  # it is stopping after all (the answer was lost, or stop was repeated)
    warn(f"stop {machine_id}: {error.message}; destroying it anyway")
    return False
