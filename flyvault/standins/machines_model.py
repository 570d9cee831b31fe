"""The state behind the Machines API stand-in: apps, machines, volumes, leases, images.

Theory of operation
-------------------
``ApiModel.handle()`` takes one parsed request and returns ``(status, body)``; it never
touches sockets, so the HTTP layer (``flyvault.standins.machines``) stays thin and the rules
live here.

Machines move through real states over real (short, configurable) time:
``created -> starting -> started -> stopping -> stopped -> destroyed`` plus
``suspending -> suspended``, ``destroying -> destroyed`` and ``replacing`` (an update of a
running machine: the old instance is gone at once, the new one starts). A transition is a list of
``(due, state)`` steps on the machine; ``_advance()`` applies the due ones on every access
under the lock and wakes waiters, so there is no ticker thread and tests are not racy.
``wait`` sleeps on the condition until the state matches (for that ``instance_id`` when
given), the next step is due, or its timeout passes (408).

Behaviour copies Fly where known (reference §3 "emulator behaviour"): metadata filters are
an AND of exact matches, destroyed machines are listed only with ``include_deleted``,
``instance_id`` changes on every update, ``current_version`` must match (412), a lease
makes every mutating call need its nonce (409), stop on a stopped machine is 412, delete of
a started machine without ``force`` is 412, volume names follow Fly's rules (422), an
attached volume cannot be deleted (412), names are unique (409). Lists paginate only when
asked (``limit``/``cursor``) and then answer ``{"machines"|"volumes": [...],
"next_cursor": ...}``.

Images: ``image_ref.digest`` is resolved when a machine is created or updated, from a small
registry (``push_image`` moves a tag, as a CI push would), so tests can prove a rollback
goes back to the *digest* and not to a tag that moved. ``unhealthy_images`` (refs or
digests) make the health checks critical; ``stuck_images`` never get past ``starting``;
``unhealthy_on`` (machine id -> ref or digest) makes one machine unhealthy on one image;
``crashing_images`` make the machine stop again
shortly after it started.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flyvault.fly.images import parse_image

Reply = tuple[int, Any]

WAITABLE_STATES = ("started", "stopped", "suspended", "destroyed")
_VOLUME_NAME = re.compile(r"[a-z0-9_]{1,30}\Z")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, message: str) -> Reply:
    return status, {"error": message}


@dataclass
class LeaseState:
    nonce: str
    expires_at: float
    owner: str
    description: str
    version: str

    def as_json(self) -> dict[str, Any]:
        return {
            "nonce": self.nonce,
            "expires_at": int(self.expires_at),
            "owner": self.owner,
            "description": self.description,
            "version": self.version,
        }


@dataclass
class Machine:
    id: str
    name: str
    region: str
    config: dict[str, Any]
    instance_id: str
    private_ip: str
    image_ref: dict[str, Any]
    state: str
    created_at: float
    updated_at: float
    events: list[dict[str, Any]] = field(default_factory=list)
    pending: list[tuple[float, str]] = field(default_factory=list)
    lease: LeaseState | None = None
    cordoned: bool = False
    healthy: bool = True
    crashes: bool = False
    stuck: bool = False

    def as_json(self, now: float) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "instance_id": self.instance_id,
            "private_ip": self.private_ip,
            "config": self.config,
            "image_ref": self.image_ref,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "events": list(reversed(self.events)),  # Fly lists the newest first
            "host_status": "ok",
        }
        if self.state == "started":
            body["checks"] = [
                {
                    "name": "vault",
                    "status": "passing" if self.healthy else "critical",
                    "output": "ok" if self.healthy else "health check failed",
                    "updated_at": _iso(now),
                }
            ]
        if self.lease is not None and self.lease.expires_at > now:
            body["nonce"] = self.lease.nonce
        return body


@dataclass
class Volume:
    id: str
    name: str
    region: str
    size_gb: int
    created_at: float
    attached_machine_id: str | None = None
    state: str = "created"
    encrypted: bool = True

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "region": self.region,
            "size_gb": self.size_gb,
            "state": self.state,
            "encrypted": self.encrypted,
            "attached_machine_id": self.attached_machine_id,
            "created_at": _iso(self.created_at),
        }


@dataclass
class App:
    name: str
    machines: dict[str, Machine] = field(default_factory=dict)
    volumes: dict[str, Volume] = field(default_factory=dict)


class ApiModel:
    """All state of the stand-in. Thread-safe: every entry point takes ``self.lock``."""

    def __init__(
        self,
        apps: tuple[str, ...] = ("vault-tenants",),
        *,
        transition_delay: float = 0.05,
        crash_delay: float = 0.2,
        max_wait: int = 60,
        default_region: str = "ord",
    ) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.apps: dict[str, App] = {name: App(name) for name in apps}
        self.transition_delay = transition_delay
        self.crash_delay = crash_delay
        self.max_wait = max_wait
        self.default_region = default_region
        self.page_size_cap: int | None = None
        self.unhealthy_images: set[str] = set()
        self.crashing_images: set[str] = set()
        self.stuck_images: set[str] = set()
        self.unhealthy_on: dict[str, str] = {}  # machine id -> image ref or digest
        self._tags: dict[str, str] = {}  # image ref without digest -> digest
        self._ip_counter = 0

    # -- helpers for tests and for the HTTP layer -----------------------------------------

    def push_image(self, ref: str, digest: str | None = None) -> str:
        """Point ``ref`` (a tag) at ``digest`` (a fresh one by default); return the digest."""
        with self.lock:
            digest = digest or "sha256:" + secrets.token_hex(32)
            self._tags[ref] = digest
            return digest

    def resolve(self, ref: str) -> dict[str, Any]:
        parsed: dict[str, Any] = parse_image(ref)
        if parsed["digest"] is None:
            digest = self._tags.get(ref)
            if digest is None:
                # First pull of an unknown tag: a stable digest, remembered like a registry.
                digest = "sha256:" + hashlib.sha256(ref.encode()).hexdigest()
                self._tags[ref] = digest
            parsed["digest"] = digest
        parsed["labels"] = {}
        return parsed

    def machines(self, app: str = "vault-tenants") -> list[dict[str, Any]]:
        """Snapshot of every machine (destroyed included) as the API would show it."""
        with self.lock:
            now = self._advance()
            return [m.as_json(now) for m in self.apps[app].machines.values()]

    def volumes(self, app: str = "vault-tenants") -> list[dict[str, Any]]:
        with self.lock:
            self._advance()
            return [v.as_json() for v in self.apps[app].volumes.values() if v.state != "destroyed"]

    def machine(self, machine_id: str, app: str = "vault-tenants") -> Machine:
        with self.lock:
            self._advance()
            return self.apps[app].machines[machine_id]

    def set_state(self, machine_id: str, state: str, app: str = "vault-tenants") -> None:
        """Force a state (e.g. a machine that crashed by itself)."""
        with self.lock:
            machine = self.apps[app].machines[machine_id]
            machine.pending.clear()
            self._enter(machine, state, time.time(), source="flyd")
            self.changed.notify_all()

    # -- time ------------------------------------------------------------------------------

    def _advance(self) -> float:
        """Apply every due transition; return the wall-clock time used for timestamps."""
        mono = time.monotonic()
        wall = time.time()
        woke = False
        for app in self.apps.values():
            for machine in app.machines.values():
                while machine.pending and machine.pending[0][0] <= mono:
                    _, state = machine.pending.pop(0)
                    self._enter(machine, state, wall, source="flyd")
                    woke = True
                if machine.lease is not None and machine.lease.expires_at <= wall:
                    machine.lease = None
        if woke:
            self.changed.notify_all()
        return wall

    def _next_due(self) -> float | None:
        dues = [
            m.pending[0][0]
            for app in self.apps.values()
            for m in app.machines.values()
            if m.pending
        ]
        return min(dues) if dues else None

    def _enter(self, machine: Machine, state: str, wall: float, *, source: str) -> None:
        machine.state = state
        machine.updated_at = wall
        kind = {
            "started": "start",
            "stopped": "exit",
            "suspended": "suspend",
            "destroyed": "destroy",
            "created": "launch",
        }.get(state)
        if kind is not None:
            machine.events.append(
                {
                    "id": secrets.token_hex(8),
                    "type": kind,
                    "status": state,
                    "source": source,
                    "timestamp": int(wall * 1000),
                }
            )
        if state == "destroyed":
            machine.lease = None
            for app in self.apps.values():
                for volume in app.volumes.values():
                    if volume.attached_machine_id == machine.id:
                        volume.attached_machine_id = None
        if state == "started" and machine.crashes:
            machine.pending.append((time.monotonic() + self.crash_delay, "stopped"))

    def _schedule(self, machine: Machine, *states: str, immediate: bool = True) -> None:
        """Enter the first (transitional) state now, the others one delay apart.

        ``immediate=False`` delays the first one too (after a create or an update the
        machine stays ``created``/``replacing`` for a moment, as on Fly).
        """
        machine.pending = []
        rest = [s for s in states if not (machine.stuck and s == "started")]
        if immediate:
            self._enter(machine, rest.pop(0), time.time(), source="user")
        due = time.monotonic()
        for state in rest:
            due += self.transition_delay
            machine.pending.append((due, state))

    def _apply_image(self, machine: Machine) -> None:
        image = str(machine.config.get("image", ""))
        machine.image_ref = self.resolve(image)
        digest = machine.image_ref.get("digest")
        refs = {image, digest}
        machine.healthy = not (refs & self.unhealthy_images) and (
            self.unhealthy_on.get(machine.id) not in refs
        )
        machine.crashes = bool(refs & self.crashing_images)
        machine.stuck = bool(refs & self.stuck_images)

    # -- request entry point ---------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        body: Any,
        nonce: str | None,
    ) -> Reply:
        parts = [p for p in path.split("/") if p]
        if len(parts) < 3 or parts[0] != "v1" or parts[1] != "apps":
            return _error(404, "not found")
        with self.lock:
            now = self._advance()
            app = self.apps.get(parts[2])
            if app is None:
                return _error(404, f"app {parts[2]} not found")
            rest = parts[3:]
            if not rest:
                return (
                    (200, {"name": app.name, "status": "deployed"})
                    if method == "GET"
                    else (_error(405, "method not allowed"))
                )
            if rest[0] == "machines":
                return self._machines(app, method, rest[1:], query, body, nonce, now)
            if rest[0] == "volumes":
                return self._volumes(app, method, rest[1:], query, body)
            return _error(404, "not found")

    # -- machines ------------------------------------------------------------------------

    def _machines(
        self,
        app: App,
        method: str,
        rest: list[str],
        query: dict[str, str],
        body: Any,
        nonce: str | None,
        now: float,
    ) -> Reply:
        if not rest:
            if method == "GET":
                return self._list_machines(app, query, now)
            if method == "POST":
                return self._create_machine(app, body, now)
            return _error(405, "method not allowed")
        machine = app.machines.get(rest[0])
        if machine is None:
            return _error(404, f"machine {rest[0]} not found")
        action = rest[1] if len(rest) > 1 else ""
        if action == "wait" and method == "GET":
            return self._wait(machine, query)
        if action == "lease":
            return self._lease(machine, method, body, nonce, now)
        if action == "metadata":
            return self._metadata(machine, method, rest[2:], body, nonce, now)
        if machine.state == "destroyed" and (action or method != "GET"):
            return _error(404, f"machine {machine.id} not found")
        if action == "" and method == "GET":
            return 200, machine.as_json(now)
        force = query.get("force") == "true"
        if not (action == "" and method == "DELETE" and force):
            refused = self._lease_guard(machine, nonce, now)
            if refused is not None:
                return refused
        if action == "" and method == "POST":
            return self._update_machine(app, machine, body, now)
        if action == "" and method == "DELETE":
            return self._delete_machine(machine, force)
        if method != "POST":
            return _error(405, "method not allowed")
        if action == "start":
            if machine.state not in ("created", "stopped", "suspended"):
                return _error(
                    412, f"failed_precondition: unable to start machine from state {machine.state}"
                )
            self._schedule(machine, "starting", "started")
            return 200, {"previous_state": machine.state}
        if action == "stop":
            if machine.state not in ("started", "starting"):
                return _error(
                    412,
                    "failed_precondition: unable to stop machine, current state invalid, "
                    f"{machine.state}",
                )
            self._schedule(machine, "stopping", "stopped")
            return 200, {"ok": True}
        if action == "suspend":
            if machine.state != "started":
                return _error(412, f"failed_precondition: cannot suspend from {machine.state}")
            self._schedule(machine, "suspending", "suspended")
            return 200, {"ok": True}
        if action in ("cordon", "uncordon"):
            machine.cordoned = action == "cordon"
            return 200, {"ok": True}
        return _error(404, "not found")

    def _list_machines(self, app: App, query: dict[str, str], now: float) -> Reply:
        include_deleted = query.get("include_deleted") == "true"
        filters = {k[len("metadata.") :]: v for k, v in query.items() if k.startswith("metadata.")}
        selected = []
        for machine in app.machines.values():
            if machine.state == "destroyed" and not include_deleted:
                continue
            if query.get("region") and machine.region != query["region"]:
                continue
            if query.get("state") and machine.state != query["state"]:
                continue
            metadata = machine.config.get("metadata") or {}
            if any(metadata.get(k) != v for k, v in filters.items()):
                continue
            selected.append(machine.as_json(now))
        return self._page(selected, query, "machines")

    def _page(self, items: list[dict[str, Any]], query: dict[str, str], key: str) -> Reply:
        if "limit" not in query and "cursor" not in query:
            return 200, items
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            return _error(400, "limit must be an integer")
        if limit < 1:
            return _error(400, "limit must be >= 1")
        if self.page_size_cap is not None:
            limit = min(limit, self.page_size_cap)
        start = 0
        cursor = query.get("cursor")
        if cursor:
            ids = [item["id"] for item in items]
            if cursor not in ids:
                return _error(400, "invalid cursor")
            start = ids.index(cursor) + 1
        page = items[start : start + limit]
        more = start + limit < len(items)
        return 200, {key: page, "next_cursor": page[-1]["id"] if more and page else None}

    def _create_machine(self, app: App, body: Any, now: float) -> Reply:
        if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
            return _error(400, "request body must be an object with a config object")
        config = body["config"]
        if not isinstance(config.get("image"), str) or not config["image"]:
            return _error(422, "invalid config: image is required")
        name = body.get("name") or f"machine-{secrets.token_hex(4)}"
        for other in app.machines.values():
            if other.name == name and other.state != "destroyed":
                return _error(409, f"a machine with name '{name}' already exists")
        region = body.get("region") or None
        attach: list[Volume] = []
        mounts = config.get("mounts") or []
        if not isinstance(mounts, list):
            return _error(422, "invalid config: mounts must be an array")
        for i, mount in enumerate(mounts):
            volume_id = mount.get("volume") if isinstance(mount, dict) else None
            volume = app.volumes.get(volume_id) if isinstance(volume_id, str) else None
            if volume is None or volume.state == "destroyed":
                return _error(422, f"invalid config: mounts[{i}]: volume {volume_id!r} not found")
            if volume.attached_machine_id is not None:
                return _error(
                    422, f"volume {volume.id} is already attached to {volume.attached_machine_id}"
                )
            region = region or volume.region
            if volume.region != region:
                return _error(422, f"volume {volume.id} is in {volume.region}, not {region}")
            attach.append(volume)
        self._ip_counter += 1
        machine = Machine(
            id=secrets.token_hex(7),
            name=name,
            region=region or self.default_region,
            config=config,
            instance_id=secrets.token_hex(13).upper(),
            private_ip=f"fdaa:0:1:a7b:{self._ip_counter:x}::2",
            image_ref={},
            state="created",
            created_at=now,
            updated_at=now,
            cordoned=bool(body.get("skip_service_registration")),
        )
        self._apply_image(machine)
        self._enter(machine, "created", now, source="user")
        for volume in attach:
            volume.attached_machine_id = machine.id
        if not body.get("skip_launch"):
            self._schedule(machine, "starting", "started", immediate=False)
        app.machines[machine.id] = machine
        ttl = body.get("lease_ttl")
        if isinstance(ttl, int) and ttl > 0:
            machine.lease = self._new_lease(ttl, "created with lease_ttl", now)
        self.changed.notify_all()
        return 200, machine.as_json(now)

    def _update_machine(self, app: App, machine: Machine, body: Any, now: float) -> Reply:
        if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
            return _error(400, "request body must be an object with a config object")
        if not isinstance(body["config"].get("image"), str) or not body["config"]["image"]:
            return _error(422, "invalid config: image is required")
        expected = body.get("current_version")
        if expected is not None and expected != machine.instance_id:
            return _error(
                412,
                f"failed_precondition: machine version {machine.instance_id} does not match "
                f"current_version {expected}",
            )
        machine.config = body["config"]
        if isinstance(body.get("name"), str) and body["name"]:
            machine.name = body["name"]
        machine.instance_id = secrets.token_hex(13).upper()
        machine.updated_at = now
        self._apply_image(machine)
        machine.events.append(
            {
                "id": secrets.token_hex(8),
                "type": "update",
                "status": "replacing",
                "source": "user",
                "timestamp": int(now * 1000),
            }
        )
        if machine.state in ("started", "starting", "stopping", "replacing"):
            # The old instance stops at once: nothing may see the new version as started
            # before it has really started.
            machine.pending.clear()
            self._enter(machine, "replacing", now, source="user")
            self._schedule(machine, "starting", "started", immediate=False)
        elif not body.get("skip_launch"):
            self._schedule(machine, "starting", "started")
        self.changed.notify_all()
        return 200, machine.as_json(now)

    def _delete_machine(self, machine: Machine, force: bool) -> Reply:
        if machine.state in ("started", "starting") and not force:
            return _error(
                412,
                f"failed_precondition: unable to destroy machine, not currently stopped "
                f"(state {machine.state}); use force=true",
            )
        self._schedule(machine, "destroying", "destroyed")
        self.changed.notify_all()
        return 200, {"ok": True}

    def _wait(self, machine: Machine, query: dict[str, str]) -> Reply:
        state = query.get("state", "started")
        if state not in WAITABLE_STATES:
            return _error(400, f"invalid state {state!r}: one of {', '.join(WAITABLE_STATES)}")
        try:
            timeout = int(query.get("timeout", "60"))
        except ValueError:
            return _error(400, "timeout must be an integer number of seconds")
        if not 1 <= timeout <= self.max_wait:
            return _error(400, f"timeout must be between 1 and {self.max_wait} seconds")
        instance_id = query.get("instance_id") or None
        deadline = time.monotonic() + timeout
        while True:
            self._advance()
            if instance_id is not None and instance_id != machine.instance_id:
                # That instance has been replaced: it is as stopped as it will ever be.
                if state in ("stopped", "destroyed"):
                    return 200, {"ok": True}
            elif machine.state == state:
                return 200, {"ok": True}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _error(408, f"timeout waiting for machine to be {state}")
            due = self._next_due()
            sleep = remaining if due is None else min(remaining, max(due - time.monotonic(), 0))
            self.changed.wait(timeout=sleep + 0.001)

    # -- leases --------------------------------------------------------------------------

    def _new_lease(self, ttl: int, description: str, now: float) -> LeaseState:
        return LeaseState(
            nonce=secrets.token_hex(16),
            expires_at=now + ttl,
            owner="standin@example.com",
            description=description,
            version=secrets.token_hex(8),
        )

    def _lease_guard(self, machine: Machine, nonce: str | None, now: float) -> Reply | None:
        lease = machine.lease
        if lease is None or lease.expires_at <= now:
            return None
        if nonce is None or not secrets.compare_digest(nonce, lease.nonce):
            return _error(
                409,
                f"machine {machine.id} is leased ({lease.description}); "
                "the fly-machine-lease-nonce header is missing or wrong",
            )
        return None

    def _lease(
        self, machine: Machine, method: str, body: Any, nonce: str | None, now: float
    ) -> Reply:
        lease = machine.lease
        held = lease is not None and lease.expires_at > now
        if method == "GET":
            if not held or lease is None:
                return _error(404, "no active lease")
            return 200, {"status": "success", "data": lease.as_json()}
        if method == "POST":
            if machine.state == "destroyed":
                return _error(404, f"machine {machine.id} not found")
            ttl = body.get("ttl", 30) if isinstance(body, dict) else 30
            if not isinstance(ttl, int) or ttl < 1:
                return _error(400, "ttl must be a positive integer")
            if held and lease is not None:
                if nonce is not None and secrets.compare_digest(nonce, lease.nonce):
                    lease.expires_at = now + ttl  # refresh by the holder
                    return 200, {"status": "success", "data": lease.as_json()}
                return _error(409, f"machine {machine.id} lease is currently held by {lease.owner}")
            description = body.get("description", "") if isinstance(body, dict) else ""
            machine.lease = self._new_lease(ttl, str(description), now)
            return 201, {"status": "success", "data": machine.lease.as_json()}
        if method == "DELETE":
            if not held or lease is None:
                return _error(404, "no active lease")
            if nonce is None or not secrets.compare_digest(nonce, lease.nonce):
                return _error(409, "lease nonce mismatch")
            machine.lease = None
            return 200, None
        return _error(405, "method not allowed")

    def _metadata(
        self,
        machine: Machine,
        method: str,
        rest: list[str],
        body: Any,
        nonce: str | None,
        now: float,
    ) -> Reply:
        metadata = machine.config.setdefault("metadata", {})
        if not rest and method == "GET":
            return 200, dict(metadata)
        if len(rest) != 1 or method not in ("POST", "DELETE"):
            return _error(405, "method not allowed")
        refused = self._lease_guard(machine, nonce, now)
        if refused is not None:
            return refused
        if method == "POST":
            value = body.get("value") if isinstance(body, dict) else None
            if not isinstance(value, str):
                return _error(400, 'body must be {"value": string}')
            metadata[rest[0]] = value
            return 204, None
        metadata.pop(rest[0], None)
        return 204, None

    # -- volumes -------------------------------------------------------------------------

    def _volumes(
        self, app: App, method: str, rest: list[str], query: dict[str, str], body: Any
    ) -> Reply:
        if not rest:
            if method == "GET":
                items = [v.as_json() for v in app.volumes.values() if v.state != "destroyed"]
                return self._page(items, query, "volumes")
            if method != "POST":
                return _error(405, "method not allowed")
            if not isinstance(body, dict):
                return _error(400, "request body must be an object")
            name = body.get("name")
            if not isinstance(name, str) or not _VOLUME_NAME.match(name):
                return _error(
                    422,
                    f"invalid volume name {name!r}: use lowercase letters, digits and "
                    "underscores, at most 30",
                )
            region = body.get("region")
            if not isinstance(region, str) or not region:
                return _error(422, "region is required")
            size = body.get("size_gb", 3)
            if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 500:
                return _error(422, "size_gb must be an integer between 1 and 500")
            created = Volume(
                id="vol_" + secrets.token_hex(8),
                name=name,
                region=region,
                size_gb=size,
                created_at=time.time(),
                encrypted=bool(body.get("encrypted", True)),
            )
            app.volumes[created.id] = created
            return 200, created.as_json()
        volume = app.volumes.get(rest[0])
        if volume is None or volume.state == "destroyed":
            return _error(404, f"volume {rest[0]} not found")
        if method == "GET":
            return 200, volume.as_json()
        if method == "DELETE":
            if volume.attached_machine_id is not None:
                return _error(
                    412,
                    f"failed_precondition: volume {volume.id} is attached to machine "
                    f"{volume.attached_machine_id}",
                )
            volume.state = "destroyed"
            return 200, volume.as_json()
        return _error(405, "method not allowed")
