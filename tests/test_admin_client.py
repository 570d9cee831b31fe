"""The Machines API client against the stand-in: retries, timeouts, pagination, waits, leases,
error mapping, and the token never showing up anywhere."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import admin_support
import pytest
from admin_support import (
    API_TOKEN,
    APP,
    IMAGE_V1,
    assert_no_secrets,
    client,
    run,
)

from flyvault.fly.errors import (
    ApiAuthError,
    ApiConflict,
    ApiNotFound,
    ApiRateLimited,
    ApiServerError,
    ApiTimeout,
    ApiUnreachable,
    MachinesApiError,
    WaitTimeout,
)
from flyvault.fly.machines import MachinesClient, RetryPolicy, Timeouts
from flyvault.standins.machines import MachinesStandin

standin = admin_support.standin


def _machine(api: MachinesClient, **extra: Any) -> Any:
    body = {"region": "ord", "config": {"image": IMAGE_V1, "metadata": {"k": "v"}}, **extra}
    return api.create_machine(body)


def test_create_wait_and_instance_ids(standin: MachinesStandin) -> None:
    async def go() -> None:
        async with client(standin) as api:
            machine = await _machine(api)
            assert machine["state"] == "created"
            assert machine["private_ip"].startswith("fdaa:")
            await api.wait(machine["id"], "started", timeout=5, instance_id=machine["instance_id"])
            got = await api.get_machine(machine["id"])
            assert got["state"] == "started"
            assert got["image_ref"]["digest"].startswith("sha256:")

    run(go())


def test_retries_429_and_5xx_on_idempotent_calls(standin: MachinesStandin) -> None:
    standin.fail("GET", r"/machines$", status=429, times=1, retry_after=0.01)
    standin.fail("GET", r"/machines$", status=503, times=2)
    standin.fail("GET", r"/machines$", status=408, times=1)

    async def go() -> list[Any]:
        async with client(standin, retry=RetryPolicy(attempts=5, base_delay=0.01)) as api:
            return await api.list_machines()

    assert run(go()) == []
    assert [r.status for r in standin.calls("GET", r"/machines$")] == [429, 503, 503, 408, 200]


def test_gives_up_after_the_attempts_with_the_api_message(standin: MachinesStandin) -> None:
    standin.fail("GET", r"/volumes$", status=502, times=None, message="upstream exploded")

    async def go() -> None:
        async with client(standin) as api:
            await api.list_volumes()

    with pytest.raises(ApiServerError) as info:
        run(go())
    assert "502" in info.value.message and "upstream exploded" in info.value.message
    assert info.value.exit_code == 10
    assert len(standin.calls("GET", r"/volumes$")) == 4


def test_non_idempotent_create_is_not_retried_on_5xx_but_is_on_429(
    standin: MachinesStandin,
) -> None:
    standin.fail("POST", r"/machines$", status=500, times=1)

    async def go() -> Any:
        async with client(standin) as api:
            return await _machine(api)

    with pytest.raises(ApiServerError):
        run(go())
    assert len(standin.calls("POST", r"/machines$")) == 1
    standin.fail("POST", r"/machines$", status=429, times=2)
    machine = run(go())
    assert machine["id"]
    # 429 means the API did not act: retried; exactly one machine exists.
    assert len(standin.model.machines()) == 1


def test_rate_limit_that_never_ends(standin: MachinesStandin) -> None:
    standin.fail(None, r"/machines", status=429, times=None, message="slow down")

    async def go() -> None:
        async with client(standin) as api:
            await api.list_machines()

    with pytest.raises(ApiRateLimited, match="slow down"):
        run(go())


def test_error_mapping(standin: MachinesStandin) -> None:
    async def go() -> None:
        async with client(standin) as api:
            with pytest.raises(ApiNotFound, match="machine nope not found") as info:
                await api.get_machine("nope")
            assert info.value.exit_code == 9 and info.value.status == 404
            with pytest.raises(MachinesApiError, match=r"422.*image is required"):
                await api.create_machine({"config": {}})
            m = await _machine(api)
            await api.wait(m["id"], "started", timeout=5)
            with pytest.raises(ApiConflict, match=r"412.*current_version"):
                await api.update_machine(
                    m["id"], {"config": {"image": "x"}, "current_version": "stale"}
                )

    run(go())


def test_wrong_token_is_refused_and_never_echoed(standin: MachinesStandin) -> None:
    async def go() -> None:
        async with MachinesClient(
            base_url=standin.base_url, app=APP, token="WRONG-TOKEN-123456", retry=RetryPolicy(1)
        ) as api:
            await api.list_machines()

    with pytest.raises(ApiAuthError) as info:
        run(go())
    assert info.value.exit_code == 6
    assert "FLY_API_TOKEN" in (info.value.hint or "")
    assert "WRONG-TOKEN-123456" not in info.value.message + (info.value.hint or "")


def test_unknown_app_is_not_found(standin: MachinesStandin) -> None:
    async def go() -> None:
        async with MachinesClient(base_url=standin.base_url, app="ghost", token=API_TOKEN) as api:
            await api.list_machines()

    with pytest.raises(ApiNotFound, match="app ghost not found"):
        run(go())


def test_unreachable_api_is_retried_then_mapped() -> None:
    async def go() -> None:
        async with MachinesClient(
            base_url="http://127.0.0.1:9",
            app=APP,
            token=API_TOKEN,
            retry=RetryPolicy(attempts=2, base_delay=0.01),
        ) as api:
            await api.list_machines()

    with pytest.raises(ApiUnreachable) as info:
        run(go())
    assert info.value.exit_code == 4
    assert_no_secrets(info.value.message)


def test_read_timeout_on_create_reports_unknown_outcome(standin: MachinesStandin) -> None:
    standin.delay("POST", r"/machines$", seconds=1.0, after=True)

    async def go() -> None:
        async with client(standin, timeouts=Timeouts(read=0.3)) as api:
            await _machine(api)

    with pytest.raises(ApiTimeout, match="outcome is unknown"):
        run(go())
    assert len(standin.calls("POST", r"/machines$")) == 1  # never retried


def test_pagination_follows_cursors(standin: MachinesStandin) -> None:
    standin.model.page_size_cap = 2

    async def go() -> list[Any]:
        async with client(standin) as api:
            for _ in range(5):
                await _machine(api)
            return await api.list_machines(metadata={"k": "v"})

    machines = run(go())
    assert len(machines) == 5 and len({m["id"] for m in machines}) == 5
    pages = standin.calls("GET", r"/machines$")
    assert len(pages) == 3
    assert "cursor" not in pages[0].query and pages[1].query["cursor"]


def test_wait_is_split_into_chunks_with_instance_id(standin: MachinesStandin) -> None:
    standin.model.max_wait = 1

    async def go() -> None:
        async with client(standin, max_wait_chunk=1) as api:
            m = await _machine(api, skip_launch=True)
            with pytest.raises(WaitTimeout) as info:
                await api.wait(m["id"], "started", timeout=2.5, instance_id=m["instance_id"])
            assert info.value.exit_code == 4
            assert m["instance_id"] in info.value.message

    started = time.monotonic()
    run(go())
    # It waited out the whole timeout, not more than a few chunks past it (a generous bound:
    # a loaded machine adds to every chunk, a wait that ignored its deadline adds 60 s).
    assert 2.4 < time.monotonic() - started < 20
    waits = standin.calls("GET", r"/wait$")
    # 2.5 s in chunks of at least 1 s each: three, or two if a slow chunk ate the third.
    assert 2 <= len(waits) <= 3
    assert all(w.query["timeout"] == "1" and w.query["instance_id"] for w in waits)
    assert {w.status for w in waits} == {408}


def test_wait_reaches_state_across_chunks(standin: MachinesStandin) -> None:
    standin.model.max_wait = 1

    async def go() -> None:
        async with client(standin, max_wait_chunk=1) as api:
            m = await _machine(api, skip_launch=True)

            async def start_later() -> None:
                await asyncio.sleep(1.3)
                await api.start_machine(m["id"])

            starter = asyncio.create_task(start_later())
            await api.wait(m["id"], "started", timeout=30)  # returns as soon as it is started
            await starter

    run(go())
    assert [w.status for w in standin.calls("GET", r"/wait$")][-1] == 200


def test_lease_is_refreshed_while_held_and_released(standin: MachinesStandin) -> None:
    async def go() -> None:
        async with client(standin) as api:
            m = await _machine(api)
            async with api.hold_lease(m["id"], ttl=1) as held:
                # Longer than the TTL: without refreshes the lease would expire mid-work.
                # Until enough refreshes happened (not a fixed sleep, then counting them).
                began = time.monotonic()
                while held.refreshes < 3 or time.monotonic() - began < 2.2:
                    assert time.monotonic() - began < 30, f"{held.refreshes} refreshes"
                    held.check()
                    await asyncio.sleep(0.05)
                held.check()
                lease = standin.model.machine(m["id"]).lease
                assert lease is not None and lease.nonce == held.nonce
                with pytest.raises(ApiConflict, match="409"):
                    await api.cordon(m["id"])  # no nonce: refused while leased
                await api.cordon(m["id"], nonce=held.nonce)
                with pytest.raises(ApiConflict):
                    await api.acquire_lease(m["id"], ttl=5)  # someone else
            assert standin.model.machine(m["id"]).lease is None

    run(go())


def test_lost_lease_is_reported(standin: MachinesStandin) -> None:
    async def go() -> None:
        async with client(standin) as api:
            m = await _machine(api)
            async with api.hold_lease(m["id"], ttl=1) as held:
                standin.fail("POST", r"/lease$", status=409, times=None, message="stolen")
                # The next refresh (ttl/3 from now) finds it lost: wait for that, bounded.
                began = time.monotonic()
                while held.lost is None:
                    assert time.monotonic() - began < 30, "the refresher never ran"
                    await asyncio.sleep(0.05)
                with pytest.raises(ApiConflict, match=r"lease on machine .* was lost"):
                    held.check()
            standin.clear_faults()

    run(go())


def test_token_absent_from_repr_and_logs(
    standin: MachinesStandin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="flyvault.fly")
    standin.fail("GET", r"/machines$", status=503, times=1)

    async def go() -> None:
        async with client(standin) as api:
            assert API_TOKEN not in repr(api)
            await api.list_machines()

    run(go())
    assert_no_secrets(caplog.text)
    assert "retrying" in caplog.text
    assert all("Authorization" not in str(r.__dict__) for r in standin.requests)


def test_retries_never_sleep_past_the_deadline(standin: MachinesStandin) -> None:
    clock = admin_support.SkewClock()
    standin.fail("GET", r"/machines$", status=429, retry_after=30, times=None)

    async def go() -> None:
        async with client(standin, clock=clock, retry=RetryPolicy()) as api:
            await api._request("GET", "/machines", idempotent=True, deadline=clock.now() + 5)

    with pytest.raises(ApiRateLimited) as info:
        run(go())
    assert len(standin.calls("GET", r"/machines$")) == 1 and clock.slept == []
    assert info.value.retry_after == 30
    assert "retry after 30 s" in (info.value.hint or "")


def test_lease_acquire_reads_back_after_doubt(standin: MachinesStandin) -> None:
    from flyvault.fly.leases import acquire

    async def go() -> None:
        async with client(standin) as api:
            machine = await _machine(api)
            # Granted, answer lost: adopted (the description carries this run's tag).
            standin.inject("POST", r"/lease$", "reset-after")
            lease = await acquire(api, machine["id"], ttl=30, description="fly-vault-admin x 1")
            assert lease.nonce == standin.model.machine(machine["id"]).lease.nonce
            # Someone else's lease: named with its owner and expiry, not retried blindly.
            other = await _machine(api)
            await api.acquire_lease(other["id"], ttl=60, description="ops")
            with pytest.raises(ApiConflict, match=r"is leased by .* \(ops\) until \d{4}-"):
                await acquire(api, other["id"], ttl=30, description="fly-vault-admin x 2")

    run(go())
    assert len(standin.calls("POST", r"/lease$")) == 3
