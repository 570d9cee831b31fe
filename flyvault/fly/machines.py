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
  succeeded would create a second machine. Callers of non-idempotent calls get the error and
  *read the API back* to find out what happened (``admin.readback``, ``flyvault.fly.leases``).
- *Deadlines*: a call made on behalf of a timeout (``deadline=``) never sleeps past it; a
  backoff or a ``Retry-After`` that would end after the deadline gives up at once, so retries
  count against the same deadline as the wait they serve. Time comes from an injectable
  ``flyvault.fly.clock.Clock``.
- *Pagination*: list calls ask for pages (``limit``/``cursor``, which the API honours as an
  opt-in) and follow ``next_cursor``. A server that ignores the parameters answers with a
  bare array, which is the whole list.
- *Error mapping* into ``admin.errors`` with the API's own message, scrubbed of secrets, and a
  hint that matches the cause (``admin.hints``).

The token lives only in the ``Authorization`` header of the underlying httpx client; it is
never part of a URL, message, log line or ``repr``.

``wait`` splits a long wait into calls of at most ``max_wait_chunk`` seconds (the API
refuses more than 60) and passes ``instance_id`` so a wait after an update is satisfied by
the *new* instance, not the old one that was still ``started`` (reference §5 bug 4).

Leases (acquire with read-back, background refresh, release with retries) are in
``flyvault.fly.leases``; ``hold_lease`` here is a shortcut to ``flyvault.fly.leases.hold``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from flyvault.fly.clock import SYSTEM_CLOCK, Clock
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
from flyvault.fly.hints import hint_for_status, hint_for_transport
from flyvault.redact import register as register_secret
from flyvault.redact import scrub

if TYPE_CHECKING:
    from flyvault.fly.leases import HeldLease

logger = logging.getLogger("flyvault.fly.machines")

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
    description: str = ""
    owner: str = ""


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
    # Scrubbed before it is cut: a cut could leave half a secret that no longer matches.
    text = scrub(text)
    if len(text) > _MAX_API_MESSAGE:
        text = text[:_MAX_API_MESSAGE] + "..."
    return text


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare for this API, the backoff is good enough


@dataclass
class _Outcome:
    response: httpx.Response | None = None
    error: MachinesApiError | None = None
    retryable: bool = False


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
        clock: Clock | None = None,
    ) -> None:
        register_secret(token)
        self.base_url = base_url.rstrip("/")
        self.app = app
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self.clock = clock or SYSTEM_CLOCK
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

    def request_timeout(self) -> float:
        """The longest one ordinary request may take (the slack of every time bound)."""
        return self.timeouts.connect + self.timeouts.read

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
        deadline: float | None = None,
    ) -> httpx.Response:
        operation = f"{method} {path}"
        headers = {LEASE_NONCE_HEADER: nonce} if nonce else None
        last = self.retry.attempts - 1
        for attempt in range(self.retry.attempts):
            outcome = await self._attempt(
                operation, idempotent, params, json, headers, read_timeout, accept
            )
            if outcome.response is not None:
                return outcome.response
            error = outcome.error
            assert error is not None
            if not outcome.retryable or attempt == last:
                raise error
            delay = self.retry.delay(attempt, error.retry_after)
            if deadline is not None and self.clock.now() + delay >= deadline:
                raise error  # the deadline comes first: retries count against it
            logger.info("%s; retrying in %.2fs (%d/%d)", error.message, delay, attempt + 1, last)
            await self.clock.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self,
        operation: str,
        idempotent: bool,
        params: Mapping[str, str | int] | None,
        json: Any,
        headers: dict[str, str] | None,
        read_timeout: float | None,
        accept: tuple[int, ...],
    ) -> _Outcome:
        method, _, path = operation.partition(" ")
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
            return _Outcome(error=self._unreachable(operation, exc), retryable=True)
        except httpx.TimeoutException:
            outcome = "" if idempotent else " (the outcome is unknown)"
            error: MachinesApiError = ApiTimeout(
                f"machines api: {operation}: no answer within "
                f"{read_timeout or self.timeouts.read:g}s{outcome}",
                operation=operation,
                hint=hint_for_transport(timed_out=True),
            )
            return _Outcome(error=error, retryable=idempotent)
        except httpx.TransportError as exc:
            outcome = "" if idempotent else " (the outcome is unknown)"
            error = ApiUnreachable(
                f"machines api: {operation}: connection failed: {type(exc).__name__}{outcome}",
                operation=operation,
                hint=hint_for_transport(timed_out=False),
            )
            return _Outcome(error=error, retryable=idempotent)
        elapsed = time.monotonic() - started
        logger.debug("%s -> %d (%.3fs)", operation, response.status_code, elapsed)
        if response.status_code < 400 or response.status_code in accept:
            return _Outcome(response=response)
        status = response.status_code
        retryable = status == 429 or (idempotent and status in _RETRYABLE_IDEMPOTENT)
        return _Outcome(error=self._map_status(operation, response), retryable=retryable)

    def _unreachable(self, operation: str, exc: Exception) -> ApiUnreachable:
        return ApiUnreachable(
            f"machines api: {operation}: cannot reach {self.base_url}: {scrub(type(exc).__name__)}",
            operation=operation,
            hint="check --api-base / FLY_API_BASE and the network",
        )

    def _map_status(self, operation: str, response: httpx.Response) -> MachinesApiError:
        status = response.status_code
        api_message = _api_message(response)
        message = (
            f"machines api: {operation}: {status} {response.reason_phrase}: {api_message}"
        ).rstrip(": ")
        retry_after = _retry_after(response)
        kwargs: dict[str, Any] = {
            "status": status,
            "api_message": api_message,
            "operation": operation,
            "retry_after": retry_after,
            "hint": hint_for_status(status, self.app, retry_after),
        }
        if status in (401, 403):
            return ApiAuthError(message, **kwargs)
        if status == 404:
            return ApiNotFound(message, **kwargs)
        if status in (409, 412):
            return ApiConflict(message, **kwargs)
        if status == 429:
            return ApiRateLimited(message, **kwargs)
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

    async def get_machine(
        self, machine_id: str, *, deadline: float | None = None
    ) -> dict[str, Any]:
        response = await self._request(
            "GET", f"/machines/{machine_id}", idempotent=True, deadline=deadline
        )
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
        # makes a blind retry fail with 412 rather than double-apply, but we still don't:
        # the caller reads the machine back and decides.
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
        """Wait until the machine (that instance, when given) is in ``state``.

        Retries of a failed chunk count against ``timeout``; the call ends at most one
        chunk's read timeout after it (the API takes whole seconds, at least one)."""
        deadline = self.clock.now() + max(timeout, 0.0)
        while True:
            remaining = deadline - self.clock.now()
            chunk = int(min(max(math.ceil(remaining), 1), self.max_wait_chunk))
            params: dict[str, str | int] = {"state": state, "timeout": chunk}
            if instance_id:
                params["instance_id"] = instance_id
            started = self.clock.now()
            response = await self._request(
                "GET",
                f"/machines/{machine_id}/wait",
                params=params,
                idempotent=True,
                read_timeout=chunk + self.timeouts.wait_grace,
                accept=(408,),
                deadline=deadline,
            )
            if response.status_code != 408:
                return
            if self.clock.now() - started < chunk / 2:
                # A 408 long before the chunk ended is not the API waiting (a proxy, a fault):
                # pause instead of spinning on it.
                await self.clock.sleep(min(1.0, max(0.0, deadline - self.clock.now())))
            if self.clock.now() >= deadline - 0.05:
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

    async def get_lease(self, machine_id: str) -> Lease | None:
        """The machine's current lease (nonce included), or None when it has none."""
        try:
            response = await self._request("GET", f"/machines/{machine_id}/lease", idempotent=True)
        except ApiNotFound:
            return None
        return self._parse_lease(machine_id, 0, await self._json(response, "GET lease"))

    async def refresh_lease(self, lease: Lease) -> Lease:
        # Re-posting with our own nonce extends the lease; the API treats it as idempotent.
        response = await self._request(
            "POST",
            f"/machines/{lease.machine_id}/lease",
            json={"ttl": lease.ttl},
            nonce=lease.nonce,
            idempotent=True,
        )
        fresh = self._parse_lease(
            lease.machine_id, lease.ttl, await self._json(response, "refresh lease")
        )
        fresh.description = fresh.description or lease.description
        return fresh

    async def release_lease(self, machine_id: str, nonce: str) -> None:
        await self._request("DELETE", f"/machines/{machine_id}/lease", nonce=nonce, idempotent=True)

    @staticmethod
    def _parse_lease(machine_id: str, ttl: int, body: Any) -> Lease:
        data = body.get("data") if isinstance(body, dict) else None
        nonce = data.get("nonce") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(nonce, str) or not nonce:
            raise MachinesApiError(
                f"machines api: lease on machine {machine_id}: answer has no data.nonce",
                operation="POST lease",
            )
        register_secret(nonce)  # a nonce lets anyone act on the machine while it is valid
        expires = data.get("expires_at")
        return Lease(
            machine_id,
            nonce,
            ttl,
            float(expires) if isinstance(expires, int | float) else None,
            str(data.get("description") or ""),
            str(data.get("owner") or ""),
        )

    @contextlib.asynccontextmanager
    async def hold_lease(
        self, machine_id: str, *, ttl: int, description: str = "fly-vault-admin"
    ) -> AsyncIterator[HeldLease]:
        """Hold a lease for the whole block (``flyvault.fly.leases.hold``)."""
        from flyvault.fly.leases import hold

        async with hold(self, machine_id, ttl=ttl, description=description) as held:
            yield held

    # -- volumes ----------------------------------------------------------------------------

    async def list_volumes(self) -> list[dict[str, Any]]:
        return await self._list("/volumes", {}, "volumes")

    async def create_volume(self, body: Mapping[str, Any]) -> dict[str, Any]:
        response = await self._request("POST", "/volumes", json=body, idempotent=False)
        volume: dict[str, Any] = await self._json(response, "POST /volumes")
        return volume

    async def get_volume(self, volume_id: str) -> dict[str, Any]:
        response = await self._request("GET", f"/volumes/{volume_id}", idempotent=True)
        volume: dict[str, Any] = await self._json(response, "GET volume")
        return volume

    async def delete_volume(self, volume_id: str) -> None:
        await self._request("DELETE", f"/volumes/{volume_id}", idempotent=True)
