"""The guest-side ledger: what each plan applied on a vault and how to undo it.

It lives on the vault under root's home, ``/root/.local/state/fly-vault/deploy/``, so it
survives a reprovision and is shared by every laptop and agent that drives the vault::

    plans/<plan>.json        one record per plan, rewritten after every step
    backups/<plan>/<step>/   files a ``file`` step replaced
    lease.json               who is applying now (created with compare-and-swap)

Every write is the file stream's verified atomic write; a record is replaced only if it
still has the digest this applier read (compare-and-swap), so two appliers that slipped past
the lease cannot overwrite each other's steps silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flyvault.errors import Conflict, NotFoundError, UsageError, VaultError

ROOT = "/root/.local/state/fly-vault/deploy"
PLANS = f"{ROOT}/plans"
BACKUPS = f"{ROOT}/backups"
LEASE = f"{ROOT}/lease.json"
#: Lives in the rootfs (replaced by a reprovision): a step in the rootfs domain whose
#: recorded id differs from this one was undone by the reprovision.
ROOTFS_ID = "/var/lib/fly-vault/rootfs-id"
LEASE_SECONDS = 900.0
#: How often a waiting applier looks at the lease again.
POLL_SECONDS = 1.0
RECORD_SCHEMA = 1


@dataclass
class StepRecord:
    kind: str
    domain: str
    fingerprint: str
    state: str  # applied | skipped | failed
    rootfs_id: str | None
    reason: str = ""
    exit_code: int | None = None
    stderr_tail: str = ""
    reverse_ops: list[dict[str, Any]] = field(default_factory=list)
    #: What ``status --verify`` re-probes: ``{"path", "sha256"}`` (a file's digest),
    #: ``{"path", "block", "sha256"}`` (a managed block's body) or ``{"path", "exists"}``.
    checks: list[dict[str, Any]] = field(default_factory=list)
    at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StepRecord:
        known = {key: raw[key] for key in cls.__dataclass_fields__ if key in raw}
        return cls(**known)


@dataclass
class PlanRecord:
    name: str
    user: str
    home: str
    plan_digest: str
    source: str
    status: str = "partial"  # applied | partial | failed
    applied_by: str = ""
    started_at: float = 0.0
    finished_at: float | None = None
    #: Step id -> record, in the order the steps were first applied (reverse walks it back).
    steps: dict[str, StepRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {key: value for key, value in self.__dict__.items() if key != "steps"}
        data["schema"] = RECORD_SCHEMA
        data["steps"] = {key: step.to_json() for key, step in self.steps.items()}
        return data

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PlanRecord:
        steps = {key: StepRecord.from_json(value) for key, value in raw.get("steps", {}).items()}
        known = {key: raw[key] for key in cls.__dataclass_fields__ if key in raw and key != "steps"}
        return cls(**known, steps=steps)


class Ledger:
    """The records on one vault, read and written through the file stream as root."""

    def __init__(self, guest: Any) -> None:
        self.guest = guest
        self._digests: dict[str, str] = {}

    async def load(self, name: str) -> PlanRecord | None:
        path = f"{PLANS}/{name}.json"
        try:
            data = await self.guest.files().read_bytes(path)
        except NotFoundError:
            self._digests[name] = "absent"
            return None
        self._digests[name] = hashlib.sha256(data).hexdigest()
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            return PlanRecord.from_json(raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise VaultError(
                f"the ledger record {path} on the vault is damaged ({exc})",
                hint=f"look at it with 'fly-vault exec VAULT -- cat {path}'; remove it to start over",
            ) from None

    async def names(self) -> list[str]:
        try:
            entries = await self.guest.files().list_dir(PLANS)
        except NotFoundError:
            return []
        return sorted(e.name[:-5] for e in entries if e.name.endswith(".json"))

    async def save(self, record: PlanRecord) -> None:
        from flyvault.client.files import EXPECT_ABSENT

        # Not sorted: the steps keep the order they were applied in, which reverse walks back.
        data = json.dumps(record.to_json(), indent=1).encode() + b"\n"
        before = self._digests.get(record.name)
        expect = EXPECT_ABSENT if before in (None, "absent") else before
        files = self.guest.files()
        await files.mkdir(PLANS, mode=0o700, parents=True, exist_ok=True)
        try:
            await files.write(
                f"{PLANS}/{record.name}.json", data, mode=0o600, fsync=True, expect_sha256=expect
            )
        except Conflict:
            raise Conflict(
                f"the ledger record of plan {record.name!r} changed under this apply "
                "(another applier?)",
                hint="run 'fly-vault deploy status' to see what it holds, then apply again",
            ) from None
        self._digests[record.name] = hashlib.sha256(data).hexdigest()

    async def delete(self, name: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.guest.files().remove(f"{PLANS}/{name}.json")
        self._digests[name] = "absent"

    async def rootfs_id(self, *, create: bool) -> str | None:
        """The rootfs's identity sentinel; made on first use when ``create``."""
        from flyvault.client.files import EXPECT_ABSENT

        text = await self.guest.read_text(ROOTFS_ID)
        if text is not None or not create:
            return text.strip() if text is not None else None
        value = uuid.uuid4().hex
        files = self.guest.files()
        await files.mkdir(os.path.dirname(ROOTFS_ID), parents=True, exist_ok=True)
        try:
            await files.write(
                ROOTFS_ID, value.encode() + b"\n", mode=0o644, expect_sha256=EXPECT_ABSENT
            )
        except Conflict:
            text = await self.guest.read_text(ROOTFS_ID)
            return (text or value).strip()
        return value


class LeaseBusy(Conflict):
    """A live lease is held by another applier (``--wait`` waits for it to go)."""


@dataclass
class Lease:
    owner: str
    host: str
    pid: int
    plan: str
    started: float
    expires: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        until = time.strftime("%H:%M:%S", time.localtime(self.expires))
        return f"plan {self.plan!r} from {self.host} (pid {self.pid}) since {since}, until {until}"


class LeaseHolder:
    """A lease on the vault's deploy ledger: created only where none exists (compare-and-
    swap), renewed between steps, removed at the end. Each step is its own exec, so a lock
    held by a process (flock) would not outlive the step: the lease is a file with an
    expiry instead."""

    def __init__(self, guest: Any, plan: str, *, clock: Any = time.time) -> None:
        self.guest = guest
        self.plan = plan
        self.clock = clock
        self.lease = Lease(uuid.uuid4().hex, socket.gethostname(), os.getpid(), plan, 0.0, 0.0)
        self._digest: str | None = None

    async def acquire(
        self,
        *,
        break_expired: bool = False,
        wait_seconds: float = 0.0,
        sleep: Any = None,
        on_wait: Any = None,
    ) -> None:
        """Take the lease; with ``wait_seconds``, wait that long for a live one to go
        (polled every ``POLL_SECONDS``: the count and the time are both bounded)."""
        import asyncio

        sleep = sleep or asyncio.sleep
        deadline = self.clock() + wait_seconds
        for _ in range(int(wait_seconds / POLL_SECONDS) + 2):
            try:
                await self._try_acquire(break_expired)
                return
            except LeaseBusy as exc:
                if self.clock() + POLL_SECONDS > deadline:
                    raise
                if on_wait is not None:
                    on_wait(f"waiting up to {wait_seconds:g} s: {exc}")
                    on_wait = None  # said once
            await sleep(POLL_SECONDS)
        await self._try_acquire(break_expired)

    async def _try_acquire(self, break_expired: bool) -> None:
        from flyvault.client.files import EXPECT_ABSENT

        files = self.guest.files()
        await files.mkdir(ROOT, mode=0o700, parents=True, exist_ok=True)
        held = await self.current()
        if held is not None:
            lease, digest = held
            if lease.expires > self.clock():
                raise LeaseBusy(
                    f"another deploy holds the vault's lease: {lease.describe()}",
                    hint="wait for it to finish (--wait SECONDS waits for it); a lease left "
                    "by a crashed apply expires, then 'fly-vault deploy apply ... --break-lock' "
                    "clears it",
                )
            if not break_expired:
                raise Conflict(
                    f"an expired deploy lease is left on the vault: {lease.describe()}",
                    hint="if that apply is gone, clear it with 'fly-vault deploy apply ... "
                    "--break-lock'",
                )
            await self._write(expect=digest)
            return
        try:
            await self._write(expect=EXPECT_ABSENT)
        except Conflict as exc:  # another applier created it between the read and the write
            raise LeaseBusy(str(exc), hint=exc.hint) from None

    async def renew(self, seconds: float = LEASE_SECONDS) -> None:
        await self._write(expect=self._digest, seconds=seconds)

    async def release(self) -> None:
        held = await self.current()
        if held is not None and held[0].owner == self.lease.owner:
            with contextlib.suppress(NotFoundError):
                await self.guest.files().remove(LEASE)

    async def current(self) -> tuple[Lease, str] | None:
        try:
            data = await self.guest.files().read_bytes(LEASE)
        except NotFoundError:
            return None
        try:
            lease = Lease(**json.loads(data))
        except (ValueError, TypeError):
            lease = Lease("?", "unknown host", 0, "?", 0.0, 0.0)  # damaged: treat as expired
        return lease, hashlib.sha256(data).hexdigest()

    async def _write(self, *, expect: str | None, seconds: float = LEASE_SECONDS) -> None:
        now = self.clock()
        if not self.lease.started:
            self.lease.started = now
        self.lease.expires = now + seconds
        data = json.dumps(self.lease.__dict__).encode()
        try:
            await self.guest.files().write(LEASE, data, mode=0o600, expect_sha256=expect)
        except Conflict:
            held = await self.current()
            who = held[0].describe() if held else "it was removed"
            raise Conflict(
                f"the vault's deploy lease was taken over: {who}",
                hint="another apply broke or took the lease; run 'fly-vault deploy status'",
            ) from None
        self._digest = hashlib.sha256(data).hexdigest()


def check_plan_name(name: str) -> str:
    from flyvault.client.deploy.plan import NAME_RE

    if not NAME_RE.fullmatch(name):
        raise UsageError(f"{name!r} is not a plan name (a-z, 0-9 and '-')")
    return name
