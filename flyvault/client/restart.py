"""Restart a vault's workload and wait until it is back (the CLI's ``restart``, a deploy
plan's ``restart`` step): refused while other sessions run unless allowed, then the
authenticated restart request (protocol 6), then, under systemd, a wait until the system
reports ``running`` or ``degraded``. "Back" is decided by the boot id the vault reports,
never by a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from flyvault.errors import SpawnError, Timeout, UsageError, VaultError

#: How long a restart may take to reach a running system (systemd's boot included).
DEFAULT_DEADLINE = 300.0
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Restarted:
    old_boot_id: str
    new_boot_id: str
    runtime: str
    #: systemd's ``is-system-running`` at the end; None without systemd.
    system_state: str | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def running_sessions(vault: Any) -> list[dict[str, Any]]:
    return [s for s in await vault.list_sessions() if s.get("running")]


async def restart_and_wait(
    vault: Any,
    *,
    allow_running: bool,
    deadline: float = DEFAULT_DEADLINE,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Restarted:
    try:
        async with asyncio.timeout(deadline):
            return await _restart(vault, allow_running, deadline, clock, sleep)
    except TimeoutError:
        raise Timeout(
            f"the restart did not complete within {deadline:g} s",
            hint="look at 'fly-vault doctor VAULT'; raise --timeout for a slow boot",
        ) from None


async def _restart(
    vault: Any,
    allow_running: bool,
    deadline: float,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
) -> Restarted:
    began = clock()
    busy = await running_sessions(vault)
    if busy and not allow_running:
        names = ", ".join(str(s.get("session_id")) for s in busy[:5])
        more = f" and {len(busy) - 5} more" if len(busy) > 5 else ""
        raise UsageError(
            f"{len(busy)} session(s) run on the vault ({names}{more}): a restart ends them",
            hint="stop them first (fly-vault kill VAULT ID), or restart anyway with --yes",
        )
    answer = await vault.restart_workload()
    old, new = str(answer.get("old_boot_id")), str(answer["new_boot_id"])
    if new == old:
        raise Timeout("the vault answered the restart with the same boot id: it did not restart")
    state = None
    if answer.get("runtime") == "system_init":
        state = await _wait_for_systemd(vault, began + deadline, clock, sleep)
    return Restarted(old, new, str(answer.get("runtime")), state, round(clock() - began, 2))


async def _wait_for_systemd(
    vault: Any,
    deadline: float,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
) -> str:
    """Poll ``systemctl is-system-running`` until ``running`` or ``degraded`` (or the
    deadline): bounded by the time, one probe per ``POLL_SECONDS``."""
    last = "unknown"
    while True:
        last = await _system_state(vault) or last
        if last in ("running", "degraded"):
            return last
        if clock() + POLL_SECONDS > deadline:
            raise Timeout(
                f"the vault restarted, but systemd still reports {last!r} at the deadline",
                hint="look at 'fly-vault exec VAULT -- systemctl --failed'",
            )
        await sleep(POLL_SECONDS)


async def _system_state(vault: Any) -> str | None:
    from flyvault.client.exec_request import ExecRequest, new_session_id
    from flyvault.client.session import ExecHooks, ExecSession

    out = bytearray()
    request = ExecRequest(session_id=new_session_id(), argv=("systemctl", "is-system-running"))
    try:
        await ExecSession(vault, request, ExecHooks(out.extend, lambda _: None)).run()
    except SpawnError:
        return "running"  # no systemctl in this rootfs: nothing more to wait for
    except VaultError:  # not up yet (the namespace's init still starting): ask again
        return None
    return out.decode("utf-8", "replace").strip() or None
