"""Removing machines and volumes for ``tenant delete`` and a failed ``tenant create``.

What is left is decided by reading the API back at the end, never by counting errors on
the way: a delete whose answer was lost but which went through leaves nothing, and is
reported as such. Every step honours the caller's deadline, and a volume still attached to a
machine that could not be removed is reported at once instead of being retried until the
deadline (it cannot come free).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flyvault.fly.errors import ApiAuthError, ApiNotFound, MachinesApiError
from flyvault.fly.machines import MachinesClient

from .readback import read_machine, wait_state

DELETE_ATTEMPTS = 3


def cleanup_poll() -> float:
    """Pause between two tries of a volume delete (``admin.commands.CLEANUP_POLL``)."""
    from . import commands

    return float(commands.CLEANUP_POLL)


@dataclass
class Leftovers:
    """Why each resource could not be removed, by id (filled on the way, checked at the end)."""

    reasons: dict[str, str] = field(default_factory=dict)
    stuck_machines: set[str] = field(default_factory=set)

    def lines(self, present: Iterable[str]) -> list[str]:
        return [self.reasons[rid] for rid in present if rid in self.reasons]


async def destroy_machine(
    api: MachinesClient, machine: dict[str, Any], deadline: float, left: Leftovers
) -> None:
    """Force-delete a machine and wait until it is destroyed (read back after doubt)."""
    machine_id = str(machine["id"])
    nonce = machine.get("nonce") if isinstance(machine.get("nonce"), str) else None
    reason = await _delete_call(api, machine_id, nonce)
    if reason is None:
        reason = await _wait_destroyed(api, machine_id, deadline)
    if reason is not None:
        left.reasons[machine_id] = reason
        left.stuck_machines.add(machine_id)


async def _delete_call(api: MachinesClient, machine_id: str, nonce: str | None) -> str | None:
    last: MachinesApiError | None = None
    for attempt in range(DELETE_ATTEMPTS):
        try:
            await api.delete_machine(machine_id, force=True, nonce=nonce)
            return None
        except ApiNotFound:
            return None
        except ApiAuthError:
            raise
        except MachinesApiError as exc:
            last = exc
        try:
            current = await read_machine(api, machine_id)
        except MachinesApiError:
            continue
        if current is None or current.get("state") == "destroying":
            return None  # the delete went through
        await api.clock.sleep(api.retry.delay(attempt, last.retry_after))
    assert last is not None
    return f"machine {machine_id}: {last.message}"


async def _wait_destroyed(api: MachinesClient, machine_id: str, deadline: float) -> str | None:
    try:
        await wait_state(api, machine_id, "destroyed", timeout=api.clock.remaining(deadline))
        return None
    except ApiNotFound:
        return None
    except MachinesApiError as exc:
        error = exc
    try:
        current = await read_machine(api, machine_id)
    except MachinesApiError:
        return f"machine {machine_id} (state unknown): {error.message}"
    if current is None:
        return None
    return f"machine {machine_id} is still {current.get('state')}: {error.message}"


async def delete_volumes(
    api: MachinesClient, volumes: Iterable[str], deadline: float, left: Leftovers
) -> None:
    """Delete volumes; one attached to a machine being destroyed is retried until the
    deadline, one attached to a machine that could not be removed is reported at once."""
    for volume_id in volumes:
        reason = await _delete_volume(api, volume_id, deadline, left.stuck_machines)
        if reason is not None:
            left.reasons[volume_id] = reason


async def _delete_volume(
    api: MachinesClient, volume_id: str, deadline: float, stuck: set[str]
) -> str | None:
    while True:
        try:
            await api.delete_volume(volume_id)
            return None
        except ApiNotFound:
            return None
        except ApiAuthError:
            raise
        except MachinesApiError as exc:
            error = exc
        known, volume = await _volume_now(api, volume_id)
        if known and volume is None:
            return None  # gone: a delete whose answer was lost went through
        attached = str((volume or {}).get("attached_machine_id") or "")
        if attached and attached in stuck:
            return (
                f"volume {volume_id}: still attached to machine {attached}, which could not "
                "be removed"
            )
        # The client has retried 5xx, 429 and lost answers already; 409/412/422 mean
        # "still attached" while the machine is being destroyed: those wait, until the end.
        if error.status not in (409, 412, 422) or api.clock.now() >= deadline:
            return f"volume {volume_id}: {error.message}"
        await asyncio.sleep(min(cleanup_poll(), api.clock.remaining(deadline)))


async def _volume_now(api: MachinesClient, volume_id: str) -> tuple[bool, dict[str, Any] | None]:
    """(whether the API answered, the volume or None when it is gone)."""
    try:
        volume = await api.get_volume(volume_id)
    except ApiNotFound:
        return True, None
    except MachinesApiError:
        return False, None
    return True, None if volume.get("state") == "destroyed" else volume


async def volumes_present(api: MachinesClient, volume_ids: Iterable[str]) -> list[str]:
    wanted = set(volume_ids)
    return sorted(
        str(v.get("id"))
        for v in await api.list_volumes()
        if str(v.get("id")) in wanted and v.get("state") != "destroyed"
    )


def deadline_after(api: MachinesClient, seconds: float) -> float:
    return api.clock.now() + seconds
