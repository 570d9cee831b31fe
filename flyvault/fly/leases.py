"""Machine leases held by fly-vault-admin: acquired, refreshed and released with read-back.

Rules (references/admin.md, "Leases"):

- *Acquire* (``POST .../lease``) is not idempotent. After a failed or unanswered attempt the
  lease is read back (``GET .../lease``): a lease carrying our own description (which holds
  a per-run tag) was granted to us, and is adopted with its nonce; no lease means the attempt
  did not act, and it is tried again (bounded); someone else's lease is a conflict named with
  its owner and expiry. A refusal (422) is not retried.
- *Refresh* runs in the background every TTL/3. A failed refresh is read back: while the
  lease still carries our nonce the work goes on; otherwise the lease is lost and
  ``HeldLease.check()`` raises before the next step.
- *Release* is retried (the client retries 5xx and dropped connections; here also 409, 412
  and 422, each after reading the lease back: a lease that is gone or not ours any more is
  released). If it still fails, ``HeldLease.release_error`` names the machine and the lease's
  expiry; the commands turn it into a non-zero exit (12).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flyvault.fly.errors import ApiAuthError, ApiConflict, ApiNotFound, MachinesApiError
from flyvault.fly.hints import when
from flyvault.redact import register as register_secret

if TYPE_CHECKING:
    from flyvault.fly.machines import Lease, MachinesClient

logger = logging.getLogger("flyvault.fly.leases")

ACQUIRE_ATTEMPTS = 3
RELEASE_ATTEMPTS = 3
READBACK_ATTEMPTS = 3
#: Seconds between refreshes; None: a third of the TTL. Tests shorten it.
REFRESH_EVERY: float | None = None


def run_tag() -> str:
    """A short random tag that makes this run's lease descriptions unique."""
    return secrets.token_hex(4)


@dataclass
class HeldLease:
    """A lease kept alive by a background refresher. ``check()`` raises once it is lost."""

    lease: Lease
    lost: MachinesApiError | None = None
    refreshes: int = 0
    release_error: str | None = None
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _stop: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def nonce(self) -> str:
        return self.lease.nonce

    @property
    def machine_id(self) -> str:
        return self.lease.machine_id

    def check(self) -> None:
        if self.lost is not None:
            raise ApiConflict(
                f"lease on machine {self.lease.machine_id} was lost: {self.lost.message}",
                status=self.lost.status,
                api_message=self.lost.api_message,
                operation="refresh lease",
                hint="another operator may hold the machine; retry when it is free",
            )


async def read_lease(api: MachinesClient, machine_id: str) -> Lease | None:
    """The machine's lease as the API says now; raises the last error if it cannot tell."""
    last: MachinesApiError | None = None
    for attempt in range(READBACK_ATTEMPTS):
        try:
            return await api.get_lease(machine_id)
        except ApiAuthError:
            raise
        except MachinesApiError as exc:
            last = exc
            await api.clock.sleep(api.retry.delay(attempt, exc.retry_after))
    assert last is not None
    raise last


def held_elsewhere(machine_id: str, lease: Lease, cause: MachinesApiError) -> ApiConflict:
    owner = lease.owner or "another client"
    what = f" ({lease.description})" if lease.description else ""
    return ApiConflict(
        f"machine {machine_id} is leased by {owner}{what} until {when(lease.expires_at)}",
        status=cause.status or 409,
        api_message=cause.api_message,
        operation="POST lease",
        hint=f"another operator holds the machine; retry after {when(lease.expires_at)}",
    )


async def acquire(api: MachinesClient, machine_id: str, *, ttl: int, description: str) -> Lease:
    """Acquire a lease, deciding from a read-back after any failed or unanswered attempt."""
    last: MachinesApiError | None = None
    for _ in range(ACQUIRE_ATTEMPTS):
        try:
            return await api.acquire_lease(machine_id, ttl=ttl, description=description)
        except (ApiNotFound, ApiAuthError):
            raise
        except MachinesApiError as exc:
            last = exc
        try:
            current = await read_lease(api, machine_id)
        except MachinesApiError:
            raise last from None
        if current is not None and current.description == description:
            register_secret(current.nonce)
            current.ttl = ttl
            logger.info("lease on %s was granted although the answer was lost", machine_id)
            return current
        if current is not None:
            raise held_elsewhere(machine_id, current, last)
        if last.refused:
            raise last
    assert last is not None
    raise last


async def _still_ours(api: MachinesClient, lease: Lease) -> bool:
    try:
        current = await read_lease(api, lease.machine_id)
    except MachinesApiError:
        # Cannot tell: it is ours until it would have expired.
        return lease.expires_at is None or lease.expires_at > time.time()
    if current is not None and current.nonce == lease.nonce:
        lease.expires_at = current.expires_at or lease.expires_at
        return True
    return False


async def _refresher(api: MachinesClient, held: HeldLease, ttl: int) -> None:
    """Refresh until told to stop. Never cancelled in the middle of a refresh: a refresh
    that reached the API after the release would take the lease again."""
    every = REFRESH_EVERY if REFRESH_EVERY is not None else max(ttl / 3, 0.2)
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(held._stop.wait(), timeout=every)
        if held._stop.is_set():
            return
        try:
            held.lease = await api.refresh_lease(held.lease)
            held.refreshes += 1
            continue
        except MachinesApiError as exc:
            error = exc
        if not await _still_ours(api, held.lease):
            held.lost = error
            logger.warning("lease on %s lost: %s", held.machine_id, error.message)
            return


async def release(api: MachinesClient, held: HeldLease) -> None:
    """Release with retries; a failure is left in ``held.release_error``."""
    held.release_error = await release_lease(api, held.lease)
    if held.release_error:
        logger.warning("%s", held.release_error)


async def release_lease(api: MachinesClient, lease: Lease) -> str | None:
    """Release with retries; a lease that is gone or not ours any more counts as released.
    Returns None, or what went wrong with the lease's expiry."""
    last: MachinesApiError | None = None
    for attempt in range(RELEASE_ATTEMPTS):
        try:
            await api.release_lease(lease.machine_id, lease.nonce)
            return None
        except ApiNotFound:
            return None
        except MachinesApiError as exc:
            last = exc
        if not await _still_ours(api, lease):
            return None
        await api.clock.sleep(api.retry.delay(attempt, last.retry_after))
    assert last is not None
    return (
        f"could not release the lease on machine {lease.machine_id}: {last.message}; it "
        f"expires at {when(lease.expires_at)}"
    )


@contextlib.asynccontextmanager
async def hold(
    api: MachinesClient, machine_id: str, *, ttl: int, description: str
) -> AsyncIterator[HeldLease]:
    """Hold a lease for the whole block: refreshed in the background, released at the end
    (on Ctrl-C too). A release that failed is left in ``release_error``."""
    held = HeldLease(await acquire(api, machine_id, ttl=ttl, description=description))
    held._task = asyncio.create_task(_refresher(api, held, ttl))
    try:
        yield held
    finally:
        held._stop.set()
        await asyncio.shield(_stop_then_release(api, held))


async def _stop_then_release(api: MachinesClient, held: HeldLease) -> None:
    assert held._task is not None
    with contextlib.suppress(asyncio.CancelledError):
        await held._task  # a refresh in flight ends first
    await release(api, held)
