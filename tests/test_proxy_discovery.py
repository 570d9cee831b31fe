"""vault-proxy's machine map from the Machines API stand-in (real HTTP, real client).

Only managed (and allowed) machines are routed; refreshes happen on a period and on a miss,
rate limited; a stopped or suspended managed machine is started once, nothing else ever is.

Periods and rate limits run on ``FakeTime`` (the directory's injected clock and sleep), so
"not within the window" is exact rather than a real sleep racing a loaded machine; real-time
waits are only ever for a condition, with a generous bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from conftest import run_async
from proxy_support import APP, FakeTime, StaticApi, add_machine

from flyvault.fly.machines import MachinesClient, RetryPolicy
from flyvault.proxy.discovery import Directory, DirectoryOptions
from flyvault.proxy.wire import Drop
from flyvault.standins.machines import MachinesStandin


@asynccontextmanager
async def directory_for(
    standin: MachinesStandin, fake_time: FakeTime | None = None, **options: Any
) -> AsyncIterator[Directory]:
    api = MachinesClient(
        base_url=standin.base_url,
        app=APP,
        token="standin-token",
        retry=RetryPolicy(attempts=1),
    )
    timing: dict[str, Any] = {}
    if fake_time is not None:
        timing = {"clock": fake_time.clock, "sleep": fake_time.sleep}
    directory = Directory(api, DirectoryOptions(**options), **timing)
    try:
        yield directory
    finally:
        await directory.close()
        await api.aclose()


def with_standin(scenario: Callable[[MachinesStandin], Awaitable[None]]) -> None:
    with MachinesStandin(apps=(APP,), transition_delay=0.05) as standin:
        run_async(scenario(standin), timeout=60)


async def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def starts(standin: MachinesStandin) -> list[str]:
    return [r.path.split("/")[-2] for r in standin.calls("POST", r"/start$")]


def test_only_started_managed_machines_are_routed() -> None:
    async def scenario(standin: MachinesStandin) -> None:
        routed = add_machine(standin, private_ip="127.0.0.2")
        stopped = add_machine(standin, state="stopped", tenant="tenant-b")
        add_machine(standin, managed=False, private_ip="127.0.0.3")  # another app's business
        add_machine(standin, tenant=None, private_ip="127.0.0.4")  # managed tag, no tenant
        no_ip = add_machine(standin, private_ip="not-an-ip", tenant="tenant-c")
        async with directory_for(standin, backend_port=9443) as directory:
            assert await directory.refresh()
            assert directory.routes == {routed: ("127.0.0.2", 9443)}
            assert directory.states == {routed: "started", stopped: "stopped", no_ip: "started"}
            assert directory.tenants[routed] == "tenant-a"
            # The API filtered out the unmanaged one; the tenant-less one was dropped here.
            assert directory.stats.ignored_unmanaged == 1
            assert directory.stats.unroutable == 1
            listing = standin.calls("GET", r"/machines$")[-1]
            assert listing.query["metadata.fly_vault.managed_by"] == "fly-vault-admin"

    with_standin(scenario)


def test_an_api_that_ignores_the_filter_changes_nothing() -> None:
    async def scenario() -> None:
        api = StaticApi()  # answers every machine, whatever the metadata filter says
        api.put("managed", "127.0.0.2")
        api.put("unmanaged", "127.0.0.3", managed=False)
        api.put("sleeping-stranger", "127.0.0.4", managed=False, state="stopped")
        directory = Directory(api)
        await directory.refresh()
        assert set(directory.routes) == {"managed"}
        assert directory.stats.ignored_unmanaged == 2
        assert directory.miss("sleeping-stranger") is Drop.UNKNOWN_MACHINE
        assert directory.miss("unmanaged") is Drop.UNKNOWN_MACHINE
        # A start only ever happens in a wake task, and miss() counts one as it creates it.
        assert directory.stats.wakes_started == 0
        assert api.starts == []

    run_async(scenario())


def test_allowlist_by_machine_or_tenant() -> None:
    async def scenario(standin: MachinesStandin) -> None:
        one = add_machine(standin, tenant="t1", private_ip="127.0.0.2")
        two = add_machine(standin, tenant="t2", private_ip="127.0.0.3")
        add_machine(standin, tenant="t3", private_ip="127.0.0.4")
        other = add_machine(standin, tenant="t4", state="stopped")
        async with directory_for(
            standin, allow_machines=frozenset({one}), allow_tenants=frozenset({"t2"})
        ) as directory:
            await directory.refresh()
            assert set(directory.routes) == {one, two}
            assert directory.stats.ignored_not_allowed == 2
            assert directory.miss(other) is Drop.UNKNOWN_MACHINE  # not allowed: never woken
            assert directory.stats.wakes_started == 0
            assert starts(standin) == []

    with_standin(scenario)


def test_periodic_refresh_and_refresh_on_miss() -> None:
    async def scenario(standin: MachinesStandin) -> None:
        time = FakeTime()
        t0 = time.now
        async with directory_for(
            standin, time, refresh_interval=10, min_refresh_interval=1
        ) as directory:

            def lists() -> int:
                return len(standin.calls("GET", r"/machines$"))

            def parked_until(deadline: float) -> Callable[[], bool]:
                return lambda: time.deadlines() == [deadline]

            await directory.refresh()
            poller = asyncio.get_running_loop().create_task(directory.run())
            try:
                # Periodic: parked until a period after the last refresh, and not a tick sooner.
                await eventually(parked_until(t0 + 10))
                late = add_machine(standin)
                time.advance(9)
                await asyncio.sleep(0)
                assert lists() == 1 and late not in directory.routes
                time.advance(1)
                await eventually(lambda: late in directory.routes)
                await eventually(parked_until(t0 + 20))
                assert lists() == 2

                # New options reach the parked poller at once: it now waits a minute.
                directory.options = DirectoryOptions(refresh_interval=60, min_refresh_interval=1)
                await eventually(parked_until(t0 + 70))
                assert lists() == 2

                # A burst of packets for unknown ids: one refresh, not one per packet, and
                # not before min_refresh_interval has passed since the last one (at t0 + 10).
                newer = add_machine(standin)
                for _ in range(1000):
                    assert directory.miss("unknown-id") is Drop.UNKNOWN_MACHINE
                    directory.miss(newer)
                assert directory.stats.refreshes_on_miss == 1
                await eventually(parked_until(t0 + 11))
                assert lists() == 2 and newer not in directory.routes
                time.advance(1)
                await eventually(lambda: newer in directory.routes)
                await eventually(parked_until(t0 + 71))  # a period after the last refresh
                assert lists() == 3

                # A miss just as the period runs out: still one refresh, then a whole period.
                time.advance(60)
                directory.miss("unknown-id")
                await eventually(parked_until(t0 + 131))
                assert lists() == 4
                assert directory.stats.refreshes == 4
            finally:
                poller.cancel()

    with_standin(scenario)


def test_a_failed_refresh_keeps_the_previous_map() -> None:
    async def scenario(standin: MachinesStandin) -> None:
        machine = add_machine(standin)
        async with directory_for(standin) as directory:
            await directory.refresh()
            standin.fail("GET", r"/machines$", status=500, times=1)
            assert not await directory.refresh()
            assert machine in directory.routes
            assert directory.stats.refresh_failures == 1
            assert not directory.stats.last_refresh_ok

    with_standin(scenario)


def test_a_stopped_managed_machine_is_started_once() -> None:
    async def scenario(standin: MachinesStandin) -> None:
        sleeper = add_machine(standin, state="stopped", private_ip="127.0.0.2")
        suspended = add_machine(standin, state="suspended", tenant="t2", private_ip="127.0.0.3")
        time = FakeTime()
        async with directory_for(standin, time, wake_interval=10) as directory:
            await directory.refresh()
            # A client retransmitting: many packets, one start.
            for _ in range(500):
                assert directory.miss(sleeper) is Drop.MACHINE_NOT_STARTED
            await eventually(lambda: sleeper in directory.routes)
            assert starts(standin) == [sleeper]
            assert directory.stats.wakes_succeeded == 1

            directory.miss(suspended)
            await eventually(lambda: suspended in directory.routes)
            assert starts(standin) == [sleeper, suspended]

            # Stopped again at once: no second start inside the wake interval...
            standin.model.set_state(sleeper, "stopped", APP)
            await directory.refresh()
            time.advance(9.5)
            for _ in range(100):
                directory.miss(sleeper)
            assert directory.stats.wakes_rate_limited == 100
            assert directory.stats.wakes_started == 2
            assert starts(standin).count(sleeper) == 1
            # ...and one once it has passed.
            time.advance(0.5)
            directory.miss(sleeper)
            await eventually(lambda: sleeper in directory.routes)
            assert starts(standin).count(sleeper) == 2

    with_standin(scenario)


def test_nothing_else_is_ever_woken() -> None:
    async def scenario(standin: MachinesStandin) -> None:
        unmanaged = add_machine(standin, managed=False, state="stopped")
        starting = add_machine(standin, state="stopped", tenant="t2")
        destroyed = add_machine(standin, state="destroyed", tenant="t3")
        async with directory_for(standin) as directory:
            await directory.refresh()
            standin.model.set_state(starting, "starting", APP)
            await directory.refresh()
            for machine_id in (unmanaged, starting, destroyed, "no-such-machine", "../../x"):
                for _ in range(50):
                    directory.miss(machine_id)
            assert starts(standin) == []
            assert directory.stats.wakes_started == 0

        async with directory_for(standin, wake=False) as directory:
            sleeper = add_machine(standin, state="stopped", tenant="t4")
            await directory.refresh()
            assert directory.miss(sleeper) is Drop.MACHINE_NOT_STARTED
            assert directory.stats.wakes_started == 0
            assert starts(standin) == []

    with_standin(scenario)


def test_wakes_are_bounded_in_parallel_and_failures_are_logged() -> None:
    async def scenario(standin: MachinesStandin) -> None:
        sleepers = [add_machine(standin, state="stopped", tenant=f"t{n}") for n in range(6)]
        standin.delay("POST", r"/start$", seconds=0.5, times=None)
        async with directory_for(standin, max_concurrent_wakes=2) as directory:
            await directory.refresh()
            for machine_id in sleepers:
                directory.miss(machine_id)
            assert directory.stats.wakes_started == 2
            assert directory.stats.wakes_rate_limited == 4
            standin.clear_faults()
            await eventually(lambda: directory.stats.wakes_succeeded == 2)

            standin.fail("POST", r"/start$", status=500, times=None)
            directory.miss(sleepers[5])
            await eventually(lambda: directory.stats.wakes_failed == 1)
            assert sleepers[5] not in directory.routes

    with_standin(scenario)
