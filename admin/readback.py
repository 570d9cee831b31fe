"""Read back after doubt: decide from what the API says, not from what it answered.

A mutating call that failed or went unanswered may still have acted (a read timeout or a
reset *after* the API acted looks exactly like one before it). So after any such failure the
caller re-reads the machine, with bounded retries of its own, and decides from that:

- ``read_machine``: the machine as the API shows it now, None once it is gone.
- ``wait_state``: wait for a state; after a failed or timed-out wait call, read the machine
  back: if it is in the state, the wait succeeded; if it reached a state it will not leave
  by itself (a machine ``stopped`` while we wait for ``started``), fail at once
  (``MachineStopped``); at the deadline fail naming the machine's id and its state.
- ``set_cordon``: cordon and uncordon retried beyond the client's own retries (they are
  idempotent, so a 409/412/422 that a single fault caused is simply tried again).

Every loop here honours the caller's deadline: retries count against it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from flyvault.fly.errors import ApiAuthError, ApiNotFound, MachinesApiError, WaitTimeout
from flyvault.fly.machines import MachinesClient

from .errors import MachineStopped, ReadBackFailed

READBACK_ATTEMPTS = 3
CORDON_ATTEMPTS = 3
#: Pause between two wait calls after a failed one (real time: the machine moves on its own).
WAIT_PAUSE = 0.2
GONE_STATES = frozenset({"destroyed", "deleted"})


async def read_machine(
    api: MachinesClient, machine_id: str, *, deadline: float | None = None
) -> dict[str, Any] | None:
    """The machine now, or None when it no longer exists. Raises ``ReadBackFailed``."""
    last: MachinesApiError | None = None
    for attempt in range(READBACK_ATTEMPTS):
        try:
            machine = await api.get_machine(machine_id, deadline=deadline)
        except ApiNotFound:
            return None
        except ApiAuthError:
            raise
        except MachinesApiError as exc:
            last = exc
            if deadline is not None and api.clock.now() >= deadline:
                break
            await api.clock.sleep(api.retry.delay(attempt, exc.retry_after))
            continue
        return None if str(machine.get("state")) in GONE_STATES else machine
    assert last is not None
    raise ReadBackFailed(
        f"could not read machine {machine_id} back: {last.message}",
        status=last.status,
        operation=last.operation,
        hint=last.hint,
    )


def reached(machine: dict[str, Any] | None, state: str, instance: str | None) -> bool:
    """Whether the machine (that instance) is in ``state`` as far as a wait is concerned."""
    if machine is None:
        return state in ("destroyed", "stopped")
    current = machine.get("instance_id")
    if state == "stopped" and instance and current != instance:
        return True  # that instance was replaced: it is as stopped as it will ever be
    return machine.get("state") == state and (not instance or current == instance)


def describe(machine: dict[str, Any] | None, machine_id: str) -> str:
    if machine is None:
        return f"machine {machine_id} is gone"
    return f"machine {machine_id} is {machine.get('state')} (instance {machine.get('instance_id')})"


async def wait_state(
    api: MachinesClient,
    machine_id: str,
    state: str,
    *,
    timeout: float,
    instance: str | None = None,
) -> None:
    """Wait until the machine (``instance``) is in ``state``, deciding from a read-back
    after any failed or timed-out wait call."""
    deadline = api.clock.now() + timeout
    while True:
        try:
            remaining = max(deadline - api.clock.now(), 0.0)
            await api.wait(machine_id, state, timeout=remaining, instance_id=instance)
            return
        except ApiAuthError:
            raise
        except ApiNotFound as exc:
            if state in ("destroyed", "stopped"):
                return
            error: MachinesApiError = exc
        except MachinesApiError as exc:
            error = exc
        machine = await read_machine(api, machine_id, deadline=deadline)
        if reached(machine, state, instance):
            return
        _fail_if_final(machine, machine_id, state, instance)
        if api.clock.now() >= deadline:
            raise WaitTimeout(
                f"{describe(machine, machine_id)} after {timeout:g}s; wanted '{state}'"
                f"{_for(instance)}: {error.message}",
                status=error.status or 408,
                operation="wait",
                hint=f"machine {machine_id} is stuck in state "
                f"'{(machine or {}).get('state', 'gone')}'; check `fly machine status "
                f"{machine_id}` and `fly logs -i {machine_id}`",
            )
        await asyncio.sleep(min(WAIT_PAUSE, max(deadline - api.clock.now(), 0.0)))


def _for(instance: str | None) -> str:
    return f" for instance {instance}" if instance else ""


def _fail_if_final(
    machine: dict[str, Any] | None, machine_id: str, state: str, instance: str | None
) -> None:
    if state != "started":
        return
    if machine is None:
        raise ApiNotFound(f"machine {machine_id} was destroyed while waiting for it to start")
    same = not instance or machine.get("instance_id") == instance
    if same and machine.get("state") in ("stopped", "failed"):
        raise MachineStopped(
            f"machine {machine_id} stopped instead of starting (instance "
            f"{machine.get('instance_id')}, state {machine.get('state')}): its image exits",
            operation="wait",
            hint=f"the image exits as soon as it starts: check `fly logs -i {machine_id}` and "
            "fix the image",
        )


async def set_cordon(api: MachinesClient, machine_id: str, *, on: bool, nonce: str | None) -> None:
    """Cordon (``on``) or uncordon, retried; a machine that is gone needs neither."""
    call = api.cordon if on else api.uncordon
    last: MachinesApiError | None = None
    for attempt in range(CORDON_ATTEMPTS):
        try:
            await call(machine_id, nonce=nonce)
            return
        except ApiNotFound:
            return
        except ApiAuthError:
            raise
        except MachinesApiError as exc:
            last = exc
            await api.clock.sleep(api.retry.delay(attempt, exc.retry_after))
    assert last is not None
    raise last
