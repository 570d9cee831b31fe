"""Which machine ids the proxy routes, and where to: the Machines API, polled and on a miss.

Theory of operation
-------------------
``Directory.refresh`` lists the app's machines (filtered on the server by
``fly_vault.managed_by`` and checked again here, since a server may ignore the filter) and
rebuilds two maps that are swapped in whole, so the packet loop never sees half a refresh:

* ``routes``: machine id -> ``(private_ip, backend_port)`` for *started* eligible machines;
* ``states``: machine id -> state for every eligible machine.

Eligible means managed by fly-vault-admin with a tenant id (the original routed to every
machine of the app, reference §2.7) and, when an allowlist is given, listed in it by
machine id or tenant id. Nothing else is ever routed to or woken.

A failed refresh keeps the previous maps. The poller refreshes ``refresh_interval`` after
the last refresh attempt (of any kind) and sooner when the packet loop reports a miss, but
never more often than ``min_refresh_interval``: unknown ids cost one dict lookup, not one API
call each. It reads ``options`` afresh whenever it decides how long to wait, and assigning
``options`` wakes it to decide again, so a changed interval applies at once. All its waiting
goes through the injected ``clock`` and ``sleep`` (monotonic time and ``asyncio.sleep`` by
default), which lets tests drive it tick by tick.

``miss(machine_id)`` is called by the packet loop for a packet it cannot route. For an
eligible machine that is ``stopped`` or ``suspended`` it starts the machine once: at most one
start per machine per ``wake_interval`` and a few at a time, whatever the packet rate (the
original spawned a task per packet and let anyone wake anything). The packet itself is
dropped; the client's QUIC retransmissions get through once the machine is routable.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from flyvault.errors import VaultError

from .wire import Drop

log = logging.getLogger("vault-proxy.discovery")

META_MANAGED_BY = "fly_vault.managed_by"
META_TENANT = "fly_vault.tenant_id"
MANAGED_BY_VALUE = "fly-vault-admin"
WAKE_STATES = frozenset({"stopped", "suspended"})


class MachinesApi(Protocol):
    """What the directory needs of ``flyvault.fly.machines.MachinesClient`` (a fake in tests)."""

    async def list_machines(
        self, *, metadata: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]: ...

    async def start_machine(self, machine_id: str) -> None: ...

    async def wait(self, machine_id: str, state: str, *, timeout: float) -> None: ...


@dataclass(frozen=True)
class DirectoryOptions:
    backend_port: int = 8443
    refresh_interval: float = 15.0
    min_refresh_interval: float = 1.0
    allow_machines: frozenset[str] = frozenset()
    allow_tenants: frozenset[str] = frozenset()
    wake: bool = True
    wake_interval: float = 60.0
    wake_timeout: float = 30.0
    max_concurrent_wakes: int = 4


@dataclass
class DirectoryStats:
    refreshes: int = 0
    refresh_failures: int = 0
    refreshes_on_miss: int = 0
    wakes_started: int = 0
    wakes_succeeded: int = 0
    wakes_failed: int = 0
    wakes_rate_limited: int = 0
    last_refresh_ok: bool = False
    last_refresh_at: float | None = None  # monotonic
    last_success_at: float | None = None
    ignored_unmanaged: int = 0  # in the last refresh
    ignored_not_allowed: int = 0
    unroutable: int = 0  # started but without a usable private_ip


def tenant_of(machine: Mapping[str, Any]) -> str | None:
    """The tenant id of a fly-vault-admin machine, else None (same rule as ``admin``)."""
    config = machine.get("config")
    metadata = config.get("metadata") if isinstance(config, dict) else None
    if not isinstance(metadata, dict) or metadata.get(META_MANAGED_BY) != MANAGED_BY_VALUE:
        return None
    tenant = metadata.get(META_TENANT)
    return tenant if isinstance(tenant, str) and tenant else None


class Directory:
    def __init__(
        self,
        api: MachinesApi,
        options: DirectoryOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.api = api
        self._clock = clock
        self._sleep = sleep
        # The poller waits on this: a miss or new options wake it to reconsider its deadline.
        self._poke = asyncio.Event()
        self._refresh_requested = False
        self.options = options or DirectoryOptions()
        self.routes: dict[str, tuple[str, int]] = {}
        self.states: dict[str, str] = {}
        self.tenants: dict[str, str] = {}
        self.stats = DirectoryStats()
        self._refresh_lock = asyncio.Lock()
        self._last_attempt = float("-inf")
        self._woken_at: dict[str, float] = {}
        self._waking: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_summary: tuple[int, ...] = ()

    @property
    def options(self) -> DirectoryOptions:
        return self._options

    @options.setter
    def options(self, options: DirectoryOptions) -> None:
        self._options = options
        self._poke.set()  # a waiting poller recomputes its deadline with these

    # -- refresh -----------------------------------------------------------------------------

    def _eligible(self, machine_id: str, tenant: str) -> bool:
        o = self.options
        if not o.allow_machines and not o.allow_tenants:
            return True
        return machine_id in o.allow_machines or tenant in o.allow_tenants

    async def refresh(self) -> bool:
        """One refresh; True when the maps were replaced. Failures are logged, not raised."""
        async with self._refresh_lock:
            self._last_attempt = self._clock()
            self.stats.refreshes += 1
            self.stats.last_refresh_at = self._last_attempt
            try:
                machines = await self.api.list_machines(
                    metadata={META_MANAGED_BY: MANAGED_BY_VALUE}
                )
            except (VaultError, OSError) as exc:
                self.stats.refresh_failures += 1
                self.stats.last_refresh_ok = False
                message = getattr(exc, "message", None) or str(exc)
                log.warning(
                    "failed to refresh machine map, keeping previous",
                    extra={"event": "refresh_failed", "error": message},
                )
                return False
            self._apply(machines)
            self.stats.last_refresh_ok = True
            self.stats.last_success_at = self._clock()
            return True

    def _apply(self, machines: list[dict[str, Any]]) -> None:
        routes: dict[str, tuple[str, int]] = {}
        states: dict[str, str] = {}
        tenants: dict[str, str] = {}
        unmanaged = not_allowed = unroutable = 0
        for machine in machines:
            machine_id, state = machine.get("id"), machine.get("state")
            if not isinstance(machine_id, str) or not machine_id or not isinstance(state, str):
                continue
            tenant = tenant_of(machine)
            if tenant is None:
                unmanaged += 1
                continue
            if not self._eligible(machine_id, tenant):
                not_allowed += 1
                continue
            states[machine_id] = state
            tenants[machine_id] = tenant
            if state != "started":
                continue
            try:
                ip = ipaddress.ip_address(str(machine.get("private_ip", "")))
            except ValueError:
                unroutable += 1
                continue
            routes[machine_id] = (str(ip), self.options.backend_port)
        # Swapped in whole: the packet loop reads these dicts between awaits only.
        self.routes, self.states, self.tenants = routes, states, tenants
        self.stats.ignored_unmanaged = unmanaged
        self.stats.ignored_not_allowed = not_allowed
        self.stats.unroutable = unroutable
        # Wake history only for machines that still exist: bounded by the managed fleet.
        self._woken_at = {k: v for k, v in self._woken_at.items() if k in states}
        # Every period would be a line every 15 s forever; changes are what matter.
        summary = (len(routes), len(states), unmanaged, not_allowed, unroutable)
        changed, self._last_summary = summary != self._last_summary, summary
        log.log(
            logging.INFO if changed else logging.DEBUG,
            "refreshed machine map",
            extra={
                "event": "refresh",
                "started": len(routes),
                "managed": len(states),
                "ignored_unmanaged": unmanaged,
                "ignored_not_allowed": not_allowed,
                "unroutable": unroutable,
            },
        )

    async def run(self) -> None:
        """The poller: refresh every period, or sooner after a miss (rate limited)."""
        while True:
            await self._until_due()
            try:
                await self.refresh()
            except Exception:
                # A bug in one refresh must not stop routing with the maps we have.
                log.exception("machine map refresh crashed", extra={"event": "refresh_crashed"})

    async def _until_due(self) -> None:
        """Return once a refresh is due: a period after the last attempt, or, when one was
        requested, ``min_refresh_interval`` after it. Re-reads the options on every wake."""
        while True:
            o = self.options
            requested = self._refresh_requested
            due = self._last_attempt + (o.min_refresh_interval if requested else o.refresh_interval)
            now = self._clock()
            if now >= due:
                # Requests made from here on ask for the refresh after this one.
                self._refresh_requested = False
                return
            # Woken early by a miss (a nearer deadline) or new options; else the time is up.
            self._poke.clear()
            await self._sleep_or_poke(due - now)

    async def _sleep_or_poke(self, seconds: float) -> None:
        poked = asyncio.ensure_future(self._poke.wait())
        timer = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait((poked, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (poked, timer):
                task.cancel()
            await asyncio.gather(poked, timer, return_exceptions=True)

    def request_refresh(self) -> None:
        if not self._refresh_requested:
            self.stats.refreshes_on_miss += 1
            self._refresh_requested = True
            self._poke.set()

    # -- the packet loop's miss --------------------------------------------------------------

    def miss(self, machine_id: str) -> Drop:
        """A packet for an id not in ``routes``: maybe refresh, maybe wake; say why dropped."""
        state = self.states.get(machine_id)
        if state is None:
            # Maybe created since the last refresh. The poller's rate limit makes this cheap.
            self.request_refresh()
            return Drop.UNKNOWN_MACHINE
        if state in WAKE_STATES:
            self._maybe_wake(machine_id, state)
        else:
            # starting, replacing, ...: look again soon rather than a whole period later.
            self.request_refresh()
        return Drop.MACHINE_NOT_STARTED

    def _maybe_wake(self, machine_id: str, state: str) -> None:
        o = self.options
        if not o.wake or machine_id in self._waking:
            return
        now = self._clock()
        last = self._woken_at.get(machine_id)
        if (last is not None and now - last < o.wake_interval) or len(
            self._waking
        ) >= o.max_concurrent_wakes:
            self.stats.wakes_rate_limited += 1
            return
        self._woken_at[machine_id] = now
        self._waking.add(machine_id)
        self.stats.wakes_started += 1
        task = asyncio.get_running_loop().create_task(self._wake(machine_id, state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wake(self, machine_id: str, state: str) -> None:
        tenant = self.tenants.get(machine_id)
        fields = {"machine_id": machine_id, "tenant_id": tenant, "state": state}
        log.info("starting machine for a client", extra={"event": "wake", **fields})
        started = self._clock()
        try:
            await self.api.start_machine(machine_id)
            await self.api.wait(machine_id, "started", timeout=self.options.wake_timeout)
        except Exception as exc:  # an API error or anything else: log it, keep routing
            self.stats.wakes_failed += 1
            message = getattr(exc, "message", None) or str(exc)
            log.warning(
                "could not start machine",
                extra={"event": "wake_failed", **fields, "error": message},
            )
        else:
            self.stats.wakes_succeeded += 1
            log.info(
                "machine started",
                extra={
                    "event": "wake_done",
                    **fields,
                    "elapsed_ms": round((self._clock() - started) * 1000, 1),
                },
            )
        finally:
            self._waking.discard(machine_id)
        # Route it now, not a period later: the client is retransmitting meanwhile.
        try:
            await self.refresh()
        except Exception:
            log.exception("machine map refresh crashed", extra={"event": "refresh_crashed"})

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        now = self._clock()
        return {
            "routable": len(self.routes),
            "managed": len(self.states),
            "waking": sorted(self._waking),
            "last_refresh_ok": s.last_refresh_ok,
            "last_success_age_secs": (
                None if s.last_success_at is None else round(now - s.last_success_at, 3)
            ),
            "refreshes": s.refreshes,
            "refresh_failures": s.refresh_failures,
            "refreshes_on_miss": s.refreshes_on_miss,
            "ignored_unmanaged": s.ignored_unmanaged,
            "ignored_not_allowed": s.ignored_not_allowed,
            "unroutable": s.unroutable,
            "wakes": {
                "started": s.wakes_started,
                "succeeded": s.wakes_succeeded,
                "failed": s.wakes_failed,
                "rate_limited": s.wakes_rate_limited,
            },
        }
