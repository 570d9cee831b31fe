"""An asyncio client for the Fly Machines API (``https://api.machines.dev/v1/apps/<app>``).

Theory of operation
-------------------
Every call goes through ``_request``, which owns the four things the original lacked
(reference §1.3, §5):

- *Timeouts* on every call. ``wait`` calls get a read timeout of their own chunk plus a
  grace period, so a long server-side wait is never cut by the client.
- *Retries* with exponential backoff and full jitter. A 429 and a failure to *connect* are
  retried for every call, because the API has not acted on the request. A 5xx, a 408, a read
  timeout or a dropped connection are retried only for idempotent calls (GET, DELETE, stop,
  cordon, lease refresh): retrying a ``POST /machines`` whose first attempt may have
  succeeded would create a second machine. Callers of non-idempotent calls get
  ``ApiTimeout``/``ApiServerError`` and must find out what happened themselves (tenant
  create does so through the tenant metadata).
- *Pagination*: list calls ask for pages (``limit``/``cursor``, which the API honours as an
  opt-in) and follow ``next_cursor``. A server that ignores the parameters answers with a
  bare array, which is the whole list.
- *Error mapping* into ``admin.errors`` with the API's own message, scrubbed of secrets.

The token lives only in the ``Authorization`` header of the underlying httpx client; it is
never part of a URL, message, log line or ``repr``.

``wait`` splits a long wait into calls of at most ``max_wait_chunk`` seconds (the API
refuses more than 60) and passes ``instance_id`` so a wait after an update is satisfied by
the *new* instance, not the old one that was still ``started`` (reference §5 bug 4).

``hold_lease`` acquires a lease and refreshes it in the background for as long as the block
runs, so a long update cannot outlive its lease (reference §5 bug 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from admin.errors import (
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
from flyvault.redact import register as register_secret
from flyvault.redact import scrub

logger = logging.getLogger("admin.machines")

DEFAULT_API_BASE = "https://api.machines.dev"
# The API refuses a wait longer than this many seconds per call.
API_MAX_WAIT_SECS = 60
LEASE_NONCE_HEADER = "fly-machine-lease-nonce"
_RETRYABLE_IDEMPOTENT = frozenset({408, 500, 502, 503, 504})
_MAX_API_MESSAGE = 500
_MAX_PAGES = 10_000


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` is the total number of tries, the first included."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        # Full jitter (AWS architecture blog): spreads a herd of clients apart.
        ceiling = min(self.max_delay, self.base_delay * (2**attempt))
        delay = random.uniform(0, ceiling)
        if retry_after is not None:
            # The server knows best, but never let it park us for minutes.
            delay = max(delay, min(retry_after, self.max_delay * 4))
        return delay


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0
    read: float = 30.0
    write: float = 30.0
    pool: float = 10.0
    # Added to a wait chunk: the server answers 408 at the chunk's end, give it time to.
    wait_grace: float = 10.0


@dataclass
class Lease:
    machine_id: str
    nonce: str
    ttl: int
    expires_at: float | None = None


@dataclass
class HeldLease:
    """A lease kept alive by a background refresher. ``check()`` raises once it is lost."""

    lease: Lease
    lost: MachinesApiError | None = None
    refreshes: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def nonce(self) -> str:
        return self.lease.nonce

    def check(self) -> None:
        if self.lost is not None:
            raise ApiConflict(
                f"lease on machine {self.lease.machine_id} was lost: {self.lost.message}",
                status=self.lost.status,
                api_message=self.lost.api_message,
                operation="refresh lease",
                hint="another operator may hold the machine; retry when it is free",
            )


def _api_message(response: httpx.Response) -> str:
    """The API's explanation: ``{"error": ...}`` (Fly), ``{"message": ...}``, or the text."""
    text = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                text = value
                break
    if not text:
        text = response.text.strip()
    if len(text) > _MAX_API_MESSAGE:
        text = text[:_MAX_API_MESSAGE] + "..."
    return scrub(text)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare for this API, the backoff is good enough


class MachinesClient:
    """One app's Machines API. Use as ``async with MachinesClient(...) as api``."""

    def __init__(
        self,
        *,
        base_url: str,
        app: str,
        token: str,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        page_size: int = 100,
        max_wait_chunk: int = API_MAX_WAIT_SECS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        register_secret(token)
        self.base_url = base_url.rstrip("/")
        self.app = app
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self.page_size = page_size
        self.max_wait_chunk = max(1, min(max_wait_chunk, API_MAX_WAIT_SECS))
        self._http = httpx.AsyncClient(
            base_url=f"{self.base_url}/v1/apps/{app}",
            headers={"Authorization": f"Bearer {token}", "User-Agent": "fly-vault-admin"},
            timeout=self._timeout(),
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"MachinesClient(base_url={self.base_url!r}, app={self.app!r})"

    async def __aenter__(self) -> MachinesClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _timeout(self, read: float | None = None) -> httpx.Timeout:
        t = self.timeouts
        return httpx.Timeout(
            connect=t.connect, read=t.read if read is None else read, write=t.write, pool=t.pool
        )

    # -- the one request path ---------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
        nonce: str | None = None,
        read_timeout: float | None = None,
        accept: tuple[int, ...] = (),
    ) -> httpx.Response:
        operation = f"{method} {path}"
        headers = {LEASE_NONCE_HEADER: nonce} if nonce else None
        last = self.retry.attempts - 1
        for attempt in range(self.retry.attempts):
            retry_after: float | None = None
            started = time.monotonic()
            try:
                response = await self._http.request(
                    method,
                    path,
                    params=params,
                    json=json,
                    headers=headers,
                    timeout=self._timeout(read_timeout),
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                # Nothing reached the API: safe to retry any call.
                error: MachinesApiError = ApiUnreachable(
                    f"machines api: {operation}: cannot reach {self.base_url}: "
                    f"{scrub(type(exc).__name__)}",
                    operation=operation,
                    hint="check --api-base / FLY_API_BASE and the network",
                )
                retryable = True
            except httpx.TimeoutException:
                outcome = "" if idempotent else " (the outcome is unknown)"
                error = ApiTimeout(
                    f"machines api: {operation}: no answer within "
                    f"{read_timeout or self.timeouts.read:g}s{outcome}",
                    operation=operation,
                )
                retryable = idempotent
            except httpx.TransportError as exc:
                error = ApiUnreachable(
                    f"machines api: {operation}: connection failed: {type(exc).__name__}",
                    operation=operation,
                )
                retryable = idempotent
            else:
                elapsed = time.monotonic() - started
                logger.debug("%s -> %d (%.3fs)", operation, response.status_code, elapsed)
                if response.status_code < 400 or response.status_code in accept:
                    return response
                error = self._map_status(operation, response)
                status = response.status_code
                retryable = status == 429 or (idempotent and status in _RETRYABLE_IDEMPOTENT)
                retry_after = _retry_after(response)
            if not retryable or attempt == last:
                raise error
            delay = self.retry.delay(attempt, retry_after)
            logger.info("%s; retrying in %.2fs (%d/%d)", error.message, delay, attempt + 1, last)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _map_status(self, operation: str, response: httpx.Response) -> MachinesApiError:
        status = response.status_code
        api_message = _api_message(response)
        message = (
            f"machines api: {operation}: {status} {response.reason_phrase}: {api_message}"
        ).rstrip(": ")
        kwargs: dict[str, Any] = {
            "status": status,
            "api_message": api_message,
            "operation": operation,
        }
        if status in (401, 403):
            return ApiAuthError(
                message,
                hint=f"check --api-token / FLY_API_TOKEN: it must be valid for app "
                f"'{self.app}' (e.g. `fly tokens create deploy -a {self.app}`)",
                **kwargs,
            )
        if status == 404:
            return ApiNotFound(message, **kwargs)
        if status in (409, 412):
            return ApiConflict(message, **kwargs)
        if status == 429:
            return ApiRateLimited(
                message, hint="the API is rate limiting; wait and retry", **kwargs
            )
        if status >= 500:
            return ApiServerError(message, **kwargs)
        return MachinesApiError(message, **kwargs)

    async def _json(self, response: httpx.Response, operation: str) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise MachinesApiError(
                f"machines api: {operation}: answer is not JSON",
                status=response.status_code,
                operation=operation,
            ) from exc

    async def _list(
        self, path: str, params: dict[str, str | int], key: str
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(_MAX_PAGES):
            page_params = dict(params, limit=self.page_size)
            if cursor:
                page_params["cursor"] = cursor
            response = await self._request("GET", path, params=page_params, idempotent=True)
            body = await self._json(response, f"GET {path}")
            if isinstance(body, list):
                # No pagination support: the whole list at once.
                items.extend(x for x in body if isinstance(x, dict))
                return items
            if not isinstance(body, dict) or not isinstance(body.get(key), list):
                raise MachinesApiError(
                    f"machines api: GET {path}: unexpected answer shape", operation=f"GET {path}"
                )
            items.extend(x for x in body[key] if isinstance(x, dict))
            cursor = body.get("next_cursor") or None
            if cursor is None:
                return items
            if cursor in seen:
                raise MachinesApiError(
                    f"machines api: GET {path}: pagination cursor repeated",
                    operation=f"GET {path}",
                )
            seen.add(cursor)
        raise MachinesApiError(f"machines api: GET {path}: too many pages")

    # -- machines ---------------------------------------------------------------------------

    async def list_machines(
        self,
        *,
        metadata: Mapping[str, str] | None = None,
        include_deleted: bool = False,
        region: str | None = None,
    ) -> list[dict[str, Any]]:
        params: dict[str, str | int] = {f"metadata.{k}": v for k, v in (metadata or {}).items()}
        if include_deleted:
            params["include_deleted"] = "true"
        if region:
            params["region"] = region
        return await self._list("/machines", params, "machines")

    async def get_machine(self, machine_id: str) -> dict[str, Any]:
        response = await self._request("GET", f"/machines/{machine_id}", idempotent=True)
        machine: dict[str, Any] = await self._json(response, "GET machine")
        return machine

    async def create_machine(self, body: Mapping[str, Any]) -> dict[str, Any]:
        response = await self._request("POST", "/machines", json=body, idempotent=False)
        machine: dict[str, Any] = await self._json(response, "POST /machines")
        return machine

    async def update_machine(
        self, machine_id: str, body: Mapping[str, Any], *, nonce: str | None = None
    ) -> dict[str, Any]:
        # Not idempotent in effect (a new instance each time); current_version in the body
        # makes a blind retry fail with 412 rather than double-apply, but we still don't.
        response = await self._request(
            "POST", f"/machines/{machine_id}", json=body, nonce=nonce, idempotent=False
        )
        machine: dict[str, Any] = await self._json(response, "POST machine")
        return machine

    async def start_machine(self, machine_id: str, *, nonce: str | None = None) -> None:
        await self._request("POST", f"/machines/{machine_id}/start", nonce=nonce, idempotent=True)

    async def stop_machine(self, machine_id: str, *, nonce: str | None = None) -> None:
        await self._request(
            "POST", f"/machines/{machine_id}/stop", json={}, nonce=nonce, idempotent=True
        )

    async def delete_machine(
        self, machine_id: str, *, force: bool = True, nonce: str | None = None
    ) -> None:
        params = {"force": "true"} if force else None
        await self._request(
            "DELETE", f"/machines/{machine_id}", params=params, nonce=nonce, idempotent=True
        )

    async def cordon(self, machine_id: str, *, nonce: str | None = None) -> None:
        await self._request(
            "POST", f"/machines/{machine_id}/cordon", json={}, nonce=nonce, idempotent=True
        )

    async def uncordon(self, machine_id: str, *, nonce: str | None = None) -> None:
        await self._request(
            "POST", f"/machines/{machine_id}/uncordon", json={}, nonce=nonce, idempotent=True
        )

    async def wait(
        self,
        machine_id: str,
        state: str,
        *,
        timeout: float,
        instance_id: str | None = None,
    ) -> None:
        """Wait until the machine (that instance, when given) is in ``state``."""
        deadline = time.monotonic() + max(timeout, 1.0)
        while True:
            remaining = deadline - time.monotonic()
            chunk = int(min(max(math.ceil(remaining), 1), self.max_wait_chunk))
            params: dict[str, str | int] = {"state": state, "timeout": chunk}
            started = time.monotonic()
            if instance_id:
                params["instance_id"] = instance_id
            response = await self._request(
                "GET",
                f"/machines/{machine_id}/wait",
                params=params,
                idempotent=True,
                read_timeout=chunk + self.timeouts.wait_grace,
                accept=(408,),
            )
            if response.status_code != 408:
                return
            if time.monotonic() - started < chunk / 2:
                # A 408 long before the chunk ended is not the API waiting (a proxy, a fault):
                # pause instead of spinning on it.
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline - 0.05:
                which = f" (instance {instance_id})" if instance_id else ""
                raise WaitTimeout(
                    f"machine {machine_id}{which} did not reach state '{state}' within "
                    f"{timeout:g}s",
                    status=408,
                    operation="wait",
                )

    # -- leases -----------------------------------------------------------------------------

    async def acquire_lease(
        self, machine_id: str, *, ttl: int, description: str = "fly-vault-admin"
    ) -> Lease:
        response = await self._request(
            "POST",
            f"/machines/{machine_id}/lease",
            json={"ttl": ttl, "description": description},
            idempotent=False,
        )
        return self._parse_lease(machine_id, ttl, await self._json(response, "POST lease"))

    async def refresh_lease(self, lease: Lease) -> Lease:
        # Re-posting with our own nonce extends the lease; the API treats it as idempotent.
        response = await self._request(
            "POST",
            f"/machines/{lease.machine_id}/lease",
            json={"ttl": lease.ttl},
            nonce=lease.nonce,
            idempotent=True,
        )
        return self._parse_lease(
            lease.machine_id, lease.ttl, await self._json(response, "refresh lease")
        )

    async def release_lease(self, machine_id: str, nonce: str) -> None:
        await self._request("DELETE", f"/machines/{machine_id}/lease", nonce=nonce, idempotent=True)

    @staticmethod
    def _parse_lease(machine_id: str, ttl: int, body: Any) -> Lease:
        data = body.get("data") if isinstance(body, dict) else None
        nonce = data.get("nonce") if isinstance(data, dict) else None
        if not isinstance(nonce, str) or not nonce:
            raise MachinesApiError(
                f"machines api: lease on machine {machine_id}: answer has no data.nonce",
                operation="POST lease",
            )
        register_secret(nonce)  # a nonce lets anyone act on the machine while it is valid
        expires = data.get("expires_at") if isinstance(data, dict) else None
        return Lease(
            machine_id, nonce, ttl, float(expires) if isinstance(expires, int | float) else None
        )

    @contextlib.asynccontextmanager
    async def hold_lease(
        self, machine_id: str, *, ttl: int, description: str = "fly-vault-admin"
    ) -> AsyncIterator[HeldLease]:
        """Hold a lease for the whole block, refreshing it every ttl/3 seconds."""
        held = HeldLease(await self.acquire_lease(machine_id, ttl=ttl, description=description))

        async def refresher() -> None:
            while True:
                await asyncio.sleep(max(ttl / 3, 0.2))
                try:
                    held.lease = await self.refresh_lease(held.lease)
                    held.refreshes += 1
                except MachinesApiError as exc:
                    held.lost = exc
                    logger.warning("lease on %s lost: %s", machine_id, exc.message)
                    return

        held._task = asyncio.create_task(refresher())
        try:
            yield held
        finally:
            held._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held._task
            try:
                await asyncio.shield(self.release_lease(machine_id, held.nonce))
            except ApiNotFound:
                pass  # expired or released already: the goal is reached
            except MachinesApiError as exc:
                # The machine itself is fine; the lease runs out after its TTL.
                logger.warning("could not release lease on %s: %s", machine_id, exc.message)

    # -- volumes ----------------------------------------------------------------------------

    async def list_volumes(self) -> list[dict[str, Any]]:
        return await self._list("/volumes", {}, "volumes")

    async def create_volume(self, body: Mapping[str, Any]) -> dict[str, Any]:
        response = await self._request("POST", "/volumes", json=body, idempotent=False)
        volume: dict[str, Any] = await self._json(response, "POST /volumes")
        return volume

    async def delete_volume(self, volume_id: str) -> None:
        await self._request("DELETE", f"/volumes/{volume_id}", idempotent=True)
