"""``tenant update-image``: a canary-first, batched, resumable image rollout with rollback.

Theory of operation
-------------------
1. *Select and snapshot* (no change yet): the managed machines of the chosen tenants, each
   checked (instance id, config.image), sorted by (tenant, machine). The snapshot keeps the
   previous image **by digest** (``image_ref.digest``) so a rollback returns to the bytes that
   ran before, not to a tag that may have moved (reference §5 bug 5). Machines already on
   the image are skipped unless ``--force`` (bug 12); stopped machines are updated with
   ``skip_launch`` and stay stopped.
2. *Canary stage*: up to ``--canary`` machines, first machines of distinct tenants, one at a
   time.
3. *Rolling stage*: batches of at most ``--concurrency`` machines and at most one machine per
   tenant, so a tenant never loses two machines at once. A batch finishes before the next.
4. *Per machine*: lease (refreshed in the background for the whole update, bug 3), cordon,
   update with ``current_version`` (a concurrent change fails with 412 instead of being
   overwritten), wait for ``started`` **of the new instance** (bug 4), poll health checks
   until they pass, soak (state and checks must hold), uncordon, release.
5. *Failure*: the canary stage stops at once; a batch lets its siblings finish. Then every
   machine whose update went through is rolled back, newest first, with the same care
   (lease, cordon, versioned update, wait, health, uncordon).
6. *State file* after every step (``admin.rollout_state``): an interrupted rollout resumes
   where it stopped when the same command runs again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from admin.errors import ApiNotFound, MachinesApiError, RolloutFailed
from admin.machines import HeldLease, MachinesClient
from admin.output import note, out, render_table, warn
from admin.rollout_state import (
    FAILED,
    GONE,
    PENDING,
    ROLLBACK_FAILED,
    ROLLED_BACK,
    SKIPPED,
    UPDATED,
    UPDATING,
    MachineEntry,
    RolloutState,
    default_state_path,
    load_state,
)
from admin.tenants import list_managed, tenant_of
from flyvault.errors import NotFoundError, UsageError, VaultError

PASSING = frozenset({"passing", "passed", "healthy", "ok"})


@dataclass
class RolloutOptions:
    image: str
    tenants: list[str] | None  # None: all tenants
    concurrency: int = 4
    canary: int = 1
    soak_secs: float = 20.0
    start_timeout_secs: float = 180.0
    health_timeout_secs: float = 120.0
    lease_ttl_secs: int = 120
    poll_interval: float = 2.0
    force: bool = False
    state_file: Path | None = None
    restart: bool = False


class MachineFailed(VaultError):
    """One machine's update failed; ``entry.update_sent`` says whether to roll it back."""


def options_from_args(args: argparse.Namespace) -> RolloutOptions:
    if args.all_tenants and args.tenant:
        raise UsageError("use either --all-tenants or --tenant <id>..., not both")
    if not args.all_tenants and not args.tenant:
        raise UsageError("select tenants with --tenant <id>... or use --all-tenants")
    checks: list[tuple[bool, str]] = [
        (args.concurrency >= 1, "--concurrency must be >= 1"),
        (args.canary >= 0, "--canary must be >= 0"),
        (args.soak_secs >= 0, "--soak-secs must be >= 0"),
        (args.start_timeout_secs > 0, "--start-timeout-secs must be > 0"),
        (args.health_timeout_secs > 0, "--health-timeout-secs must be > 0"),
        (args.lease_ttl_secs >= 10, "--lease-ttl-secs must be >= 10"),
        (args.poll_interval > 0, "--poll-interval must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return RolloutOptions(
        image=args.image,
        tenants=None if args.all_tenants else sorted(set(args.tenant)),
        concurrency=args.concurrency,
        canary=args.canary,
        soak_secs=args.soak_secs,
        start_timeout_secs=args.start_timeout_secs,
        health_timeout_secs=args.health_timeout_secs,
        lease_ttl_secs=args.lease_ttl_secs,
        poll_interval=args.poll_interval,
        force=args.force,
        state_file=Path(args.state_file) if args.state_file else None,
        restart=args.restart,
    )


def run_update_image(args: argparse.Namespace) -> int:
    from admin.commands import make_client

    options = options_from_args(args)

    async def main() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            # SIGTERM (a CI job cancelled) gets the same orderly stop as Ctrl-C.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
        async with make_client(args) as api:
            return await Rollout(api, args.app, options).run()

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        # SIGTERM cancelled the rollout; state is saved and the resume hint printed.
        raise KeyboardInterrupt from None


def rollback_ref(machine: dict[str, Any]) -> str:
    """The previous image pinned by digest: ``registry/repository@sha256:...``."""
    image = str(machine["config"]["image"])
    ref = machine.get("image_ref")
    if "@sha256:" in image or not isinstance(ref, dict):
        return image
    digest, repository = ref.get("digest"), ref.get("repository")
    if not (isinstance(digest, str) and digest and isinstance(repository, str) and repository):
        return image
    registry = ref.get("registry")
    prefix = f"{registry}/" if isinstance(registry, str) and registry else ""
    return f"{prefix}{repository}@{digest}"


def checks_status(machine: dict[str, Any]) -> tuple[str, str]:
    """("passing"|"failing"|"unknown", detail) from every ``status`` string in ``checks``."""
    statuses: list[str] = []
    failing: list[str] = []

    def walk(value: Any, name: str) -> None:
        if isinstance(value, dict):
            label = str(value.get("name") or name)
            status = value.get("status")
            if isinstance(status, str):
                statuses.append(status)
                if status.strip().lower() not in PASSING:
                    failing.append(f"{label}={status}")
            for key, child in value.items():
                if key != "status":
                    walk(child, str(key))
        elif isinstance(value, list):
            for child in value:
                walk(child, name)

    walk(machine.get("checks"), "check")
    if not statuses:
        return "unknown", "no checks"
    if failing:
        return "failing", ", ".join(failing)
    return "passing", f"{len(statuses)} passing"


class Rollout:
    def __init__(self, api: MachinesClient, app: str, options: RolloutOptions) -> None:
        self.api = api
        self.app = app
        self.o = options
        self.state: RolloutState
        self.updated_order: list[str] = []  # machines whose update went through, in order
        self.resumed: set[str] = set()  # caught 'updating' by an interruption

    # -- top level ---------------------------------------------------------------------------

    async def run(self) -> int:
        self.state = await self._load_or_snapshot()
        state = self.state
        todo = [e for e in state.machines if e.status in (PENDING, UPDATING, FAILED)]
        total = len(state.machines)
        skipped = state.count(SKIPPED)
        out(
            f"rollout of {self.o.image} to {total} machine(s) of app {self.app} "
            f"(state file: {state.path})"
        )
        if skipped:
            out(f"skipping {skipped} machine(s) already on {self.o.image} (use --force to redo)")
        self.updated_order = [e.id for e in state.machines if e.status == UPDATED]
        if not todo:
            state.status = "completed"
            state.save()
            self._summary()
            out(f"image update completed for {state.count(UPDATED)} machine(s)")
            return 0
        try:
            canaries, batches = self._plan(todo)
            await self._canary_stage(canaries)
            await self._rolling_stage(batches)
        except MachineFailed as failure:
            await self._rollback(failure)  # raises RolloutFailed
        except asyncio.CancelledError:
            state.save()
            note(
                "fly-vault-admin: interrupted; machines marked 'updating' may be cordoned. "
                f"Run the same command again to resume (state: {state.path})."
            )
            raise
        state.status = "completed"
        state.save()
        self._summary()
        out(f"image update completed for {state.count(UPDATED)} machine(s)")
        return 0

    async def _load_or_snapshot(self) -> RolloutState:
        path = self.o.state_file or default_state_path(self.app, self.o.image, self.o.tenants)
        previous = None if self.o.restart else load_state(path)
        if previous is not None and previous.status == "running":
            if previous.app != self.app or previous.image != self.o.image:
                raise UsageError(
                    f"state file {path} belongs to another rollout "
                    f"({previous.app}, {previous.image})",
                    hint="pass another --state-file, or --restart to discard it",
                )
            done = previous.count(UPDATED, SKIPPED)
            note(
                f"resuming the rollout started {time.ctime(previous.started_at)}: "
                f"{done} of {len(previous.machines)} machine(s) done"
            )
            previous.path = path
            await self._release_stale_leases(previous)
            return previous
        state = await self._snapshot(previous)
        state.path = path
        state.save()
        return state

    async def _release_stale_leases(self, state: RolloutState) -> None:
        for entry in state.machines:
            if entry.status == UPDATING:
                self.resumed.add(entry.id)
            if entry.lease_nonce:
                with contextlib.suppress(VaultError):
                    await self.api.release_lease(entry.id, entry.lease_nonce)
                entry.lease_nonce = None
            if entry.status == FAILED:
                entry.status = UPDATING if entry.update_sent else PENDING
        state.save()

    async def _snapshot(self, previous: RolloutState | None) -> RolloutState:
        machines = await list_managed(self.api, tenants=self.o.tenants)
        if self.o.tenants is not None:
            found = {tenant_of(m) for m in machines}
            missing = [t for t in self.o.tenants if t not in found]
            if missing:
                raise NotFoundError(
                    f"no managed machines for tenant(s): {', '.join(missing)}",
                    hint="check the ids with `fly-vault-admin tenant list`",
                )
        if not machines:
            raise NotFoundError("no target machines selected")
        # Rollback targets remembered from an earlier, failed run of the same rollout.
        remembered = {e.id: e for e in previous.machines} if previous is not None else {}
        entries = []
        for machine in sorted(machines, key=lambda m: (str(tenant_of(m)), str(m.get("id")))):
            machine_id = str(machine.get("id"))
            if not isinstance(machine.get("instance_id"), str) or not machine["instance_id"]:
                raise RolloutFailed(f"machine {machine_id} missing instance_id; nothing changed")
            config = machine.get("config")
            if not isinstance(config, dict) or not isinstance(config.get("image"), str):
                raise RolloutFailed(f"machine {machine_id} config.image missing; nothing changed")
            entry = MachineEntry(
                id=machine_id,
                tenant_id=str(tenant_of(machine)),
                state_before=str(machine.get("state")),
                previous_instance_id=machine["instance_id"],
                previous_image=config["image"],
                rollback_image=rollback_ref(machine),
                name=machine.get("name"),
                region=machine.get("region"),
            )
            old = remembered.get(machine_id)
            if old is not None and config["image"] == self.o.image:
                entry.previous_image, entry.rollback_image = old.previous_image, old.rollback_image
            if config["image"] == self.o.image and not self.o.force:
                entry.status = SKIPPED
            entries.append(entry)
        return RolloutState(self.app, self.o.image, self.o.tenants, entries)

    def _plan(
        self, todo: list[MachineEntry]
    ) -> tuple[list[MachineEntry], list[list[MachineEntry]]]:
        """Canaries (first machine of distinct tenants), then batches of one per tenant."""
        want = min(self.o.canary, len(todo))
        canaries: list[MachineEntry] = []
        # A resumed canary that had already started stays a canary.
        canaries.extend(e for e in todo if e.canary and len(canaries) < want)
        tenants = {e.tenant_id for e in canaries}
        for entry in todo:
            if len(canaries) >= want:
                break
            if entry not in canaries and entry.tenant_id not in tenants:
                canaries.append(entry)
                tenants.add(entry.tenant_id)
        for entry in todo:
            if len(canaries) >= want:
                break
            if entry not in canaries:
                canaries.append(entry)
        for entry in canaries:
            entry.canary = True
        queues: dict[str, list[MachineEntry]] = {}
        for entry in todo:
            if entry not in canaries:
                queues.setdefault(entry.tenant_id, []).append(entry)
        batches: list[list[MachineEntry]] = []
        while any(queues.values()):
            batch: list[MachineEntry] = []
            for tenant in sorted(queues):
                if queues[tenant] and len(batch) < self.o.concurrency:
                    batch.append(queues[tenant].pop(0))
            batches.append(batch)
        return canaries, batches

    async def _canary_stage(self, canaries: list[MachineEntry]) -> None:
        total = len(self.state.machines)
        out(f"starting canary stage ({len(canaries)} of {total} machines)")
        for k, entry in enumerate(canaries, 1):
            out(f"  canary {k}/{len(canaries)}: {entry.id} (tenant {entry.tenant_id})")
            await self._update_guarded(entry)
        out("canary stage passed")

    async def _rolling_stage(self, batches: list[list[MachineEntry]]) -> None:
        remaining = sum(len(b) for b in batches)
        if not remaining:
            return
        out(
            f"starting rolling update for {remaining} remaining machine(s) "
            f"(concurrency={self.o.concurrency})"
        )
        for number, batch in enumerate(batches, 1):
            out(
                f"  batch {number}/{len(batches)}: "
                + ", ".join(f"{e.id} (tenant {e.tenant_id})" for e in batch)
            )
            results = await asyncio.gather(
                *(self._update_guarded(e) for e in batch), return_exceptions=True
            )
            failures = [r for r in results if isinstance(r, MachineFailed)]
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, MachineFailed):
                    raise result
            self._progress()
            if failures:
                raise MachineFailed(
                    "rolling stage failed:\n" + "\n".join(f"- {f.message}" for f in failures)
                )

    def _progress(self) -> None:
        s = self.state
        done = s.count(UPDATED)
        todo = s.count(PENDING, UPDATING)
        out(f"  progress: {done} updated, {s.count(FAILED)} failed, {todo} to go")

    # -- one machine ---------------------------------------------------------------------

    async def _update_guarded(self, entry: MachineEntry) -> None:
        try:
            await self._update(entry)
        except VaultError as exc:
            entry.status = FAILED
            entry.error = exc.message
            self.state.save()
            out(f"    {entry.id}: FAILED: {exc.message}")
            if entry.canary:
                raise MachineFailed(f"canary stage failed: {exc.message}") from exc
            raise MachineFailed(f"{entry.id}: {exc.message}") from exc

    async def _update(self, entry: MachineEntry) -> None:
        say = self._say(entry)
        entry.status = UPDATING
        self.state.save()
        acquired = False
        try:
            async with self.api.hold_lease(
                entry.id, ttl=self.o.lease_ttl_secs, description="fly-vault-admin update-image"
            ) as held:
                acquired = True
                entry.lease_nonce = held.nonce
                self.state.save()
                await self._update_leased(entry, held, say)
        except ApiNotFound:
            if acquired:
                raise
            entry.status = GONE
            self.state.save()
            say("machine no longer exists; skipped")
            return
        except MachinesApiError as exc:
            if acquired:
                raise
            raise MachinesApiError(
                f"lease machine {entry.id}: {exc.message}", status=exc.status
            ) from exc
        finally:
            entry.lease_nonce = None
            self.state.save()
        entry.status = UPDATED
        entry.error = None
        if entry.id not in self.updated_order:
            self.updated_order.append(entry.id)
        self.state.save()
        say("done")

    async def _update_leased(
        self, entry: MachineEntry, held: HeldLease, say: Callable[[str], None]
    ) -> None:
        machine = await self.api.get_machine(entry.id)
        already = (
            (entry.update_sent or entry.id in self.resumed)
            and machine.get("config", {}).get("image") == self.o.image
            and machine.get("instance_id") != entry.previous_instance_id
        )
        if already:
            # Resumed after the update request went through: only the checks are left.
            new_instance = str(machine["instance_id"])
            entry.new_instance_id = new_instance
            say(f"update already applied (instance {new_instance}); checking it")
        else:
            if machine.get("instance_id") != entry.previous_instance_id and not entry.update_sent:
                raise MachinesApiError(
                    f"machine {entry.id} changed since the rollout started (instance "
                    f"{machine.get('instance_id')}, expected {entry.previous_instance_id}); "
                    "left as it is"
                )
            try:
                new_instance = await self._apply(entry, machine, held, self.o.image, say)
            except VaultError:
                # The update did not go through, so no rollback will touch this machine:
                # undo the cordon here (best effort) rather than leave it out of service.
                if entry.was_running:
                    with contextlib.suppress(VaultError):
                        await self.api.uncordon(entry.id, nonce=held.nonce)
                raise
            entry.update_sent = True
            entry.new_instance_id = new_instance
            if entry.id not in self.updated_order:
                self.updated_order.append(entry.id)
            self.state.save()
        await self._verify(entry, new_instance, held, say, soak=self.o.soak_secs)

    async def _apply(
        self,
        entry: MachineEntry,
        machine: dict[str, Any],
        held: HeldLease,
        image: str,
        say: Callable[[str], None],
    ) -> str:
        """Cordon and send the versioned update; return the new instance id."""
        held.check()
        if entry.was_running:
            await self._step(
                f"cordon machine {entry.id}", self.api.cordon(entry.id, nonce=held.nonce)
            )
        # The whole config, untouched but for the image: metadata of any type survives (bug 9).
        config = copy.deepcopy(machine["config"])
        config["image"] = image
        body: dict[str, Any] = {"config": config, "current_version": machine["instance_id"]}
        for key in ("name", "region"):
            if machine.get(key):
                body[key] = machine[key]
        if not entry.was_running:
            body["skip_launch"] = True  # a stopped tenant stays stopped (bug 12)
        updated = await self._step(
            f"update image for machine {entry.id}",
            self.api.update_machine(entry.id, body, nonce=held.nonce),
        )
        new_instance = str(updated.get("instance_id") or "")
        if not new_instance:
            refreshed = await self.api.get_machine(entry.id)
            new_instance = str(refreshed.get("instance_id") or "")
        say(f"updated to {image} (instance {new_instance})")
        return new_instance

    async def _verify(
        self,
        entry: MachineEntry,
        instance: str,
        held: HeldLease,
        say: Callable[[str], None],
        *,
        soak: float,
    ) -> None:
        if not entry.was_running:
            machine = await self.api.get_machine(entry.id)
            say(f"stays {machine.get('state')} (it was {entry.state_before})")
            return
        await self._step(
            f"wait started for machine {entry.id}",
            self.api.wait(
                entry.id, "started", timeout=self.o.start_timeout_secs, instance_id=instance
            ),
        )
        say("started")
        await self._health(entry.id, instance, held)
        say("health checks passing")
        if soak > 0:
            await self._soak(entry.id, instance, held, soak)
            say(f"soaked {soak:g}s")
        held.check()
        await self._step(
            f"uncordon machine {entry.id}", self.api.uncordon(entry.id, nonce=held.nonce)
        )

    async def _health(self, machine_id: str, instance: str, held: HeldLease) -> None:
        deadline = time.monotonic() + self.o.health_timeout_secs
        while True:
            held.check()
            machine = await self.api.get_machine(machine_id)
            self._same_instance(machine, instance, "health check")
            if machine.get("state") != "started":
                raise MachinesApiError(
                    f"health checks for machine {machine_id}: machine left started state "
                    f"during health check: {machine.get('state')}"
                )
            result, detail = checks_status(machine)
            if result != "failing":
                return
            if time.monotonic() >= deadline:
                raise MachinesApiError(
                    f"health checks for machine {machine_id}: checks failed to pass before "
                    f"timeout ({self.o.health_timeout_secs:g}s): {detail}"
                )
            await asyncio.sleep(self.o.poll_interval)

    async def _soak(self, machine_id: str, instance: str, held: HeldLease, soak: float) -> None:
        end = time.monotonic() + soak
        while True:
            await asyncio.sleep(max(0.0, min(self.o.poll_interval, end - time.monotonic())))
            held.check()
            machine = await self.api.get_machine(machine_id)
            self._same_instance(machine, instance, "soak window")
            if machine.get("state") != "started":
                raise MachinesApiError(
                    f"soak window for machine {machine_id}: machine crashed during soak "
                    f"window (state={machine.get('state')})"
                )
            result, detail = checks_status(machine)
            if result == "failing":
                raise MachinesApiError(
                    f"soak window for machine {machine_id}: failed checks during soak "
                    f"window: {detail}"
                )
            if time.monotonic() >= end:
                return

    @staticmethod
    def _same_instance(machine: dict[str, Any], instance: str, during: str) -> None:
        if instance and machine.get("instance_id") != instance:
            raise MachinesApiError(
                f"machine {machine.get('id')} was replaced during the {during} "
                f"(instance {machine.get('instance_id')}, expected {instance})"
            )

    @staticmethod
    async def _step(context: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except MachinesApiError as exc:
            raise MachinesApiError(
                f"{context}: {exc.message}",
                status=exc.status,
                api_message=exc.api_message,
                operation=exc.operation,
                hint=exc.hint,
            ) from exc

    def _say(self, entry: MachineEntry) -> Callable[[str], None]:
        label = "canary" if entry.canary else "machine"

        def say(text: str) -> None:
            note(f"    {label} {entry.id} (tenant {entry.tenant_id}): {text}")

        return say

    # -- rollback --------------------------------------------------------------------------

    async def _rollback(self, failure: MachineFailed) -> None:
        targets = [
            self.state.entry(mid)
            for mid in reversed(self.updated_order)
            if self.state.entry(mid).update_sent
        ]
        out(f"rollout failed, starting rollback for {len(targets)} machine(s)")
        for entry in targets:
            try:
                await self._rollback_one(entry)
            except VaultError as exc:
                entry.status = ROLLBACK_FAILED
                entry.error = exc.message
                warn(f"rollback failed for {entry.id}: {exc.message}")
            else:
                entry.status = ROLLED_BACK
                out(f"rolled back {entry.id} to {entry.rollback_image}")
            self.state.save()
        self.state.status = "failed"
        self.state.save()
        self._summary()
        lines = [failure.message]
        rolled = [e.id for e in self.state.machines if e.status == ROLLED_BACK]
        broken = [e for e in self.state.machines if e.status == ROLLBACK_FAILED]
        if rolled:
            lines.append(f"rolled back to the previous image: {', '.join(rolled)}")
        for entry in broken:
            lines.append(f"rollback FAILED for {entry.id}: {entry.error}")
        untouched = self.state.count(PENDING)
        if untouched:
            lines.append(f"{untouched} machine(s) were not touched")
        raise RolloutFailed(
            "\n".join(lines),
            hint="fix the image and rerun update-image"
            if not broken
            else "inspect the machines named above (`tenant list --wide`) before retrying",
        )

    async def _rollback_one(self, entry: MachineEntry) -> None:
        say = self._say(entry)
        async with self.api.hold_lease(
            entry.id, ttl=self.o.lease_ttl_secs, description="fly-vault-admin rollback"
        ) as held:
            machine = await self.api.get_machine(entry.id)
            image = entry.rollback_image
            if machine.get("config", {}).get("image") == image:
                say("already on the previous image")
            else:
                instance = await self._apply(entry, machine, held, image, say)
                # No soak: getting back to the known-good image quickly matters more.
                await self._verify(entry, instance, held, say, soak=0)
                return
            if entry.was_running:
                with contextlib.suppress(VaultError):
                    await self.api.uncordon(entry.id, nonce=held.nonce)

    # -- summary ---------------------------------------------------------------------------

    def _summary(self) -> None:
        rows = []
        for entry in self.state.machines:
            detail = entry.error or (
                entry.rollback_image if entry.status == ROLLED_BACK else entry.new_instance_id or ""
            )
            rows.append([entry.tenant_id, entry.id, entry.status, detail or "-"])
        out("summary:")
        for line in render_table(["TENANT", "MACHINE", "RESULT", "DETAIL"], [16, 16, 16, 10], rows):
            out(f"  {line}")
        counts = {
            status: self.state.count(status)
            for status in (UPDATED, SKIPPED, ROLLED_BACK, ROLLBACK_FAILED, FAILED, PENDING, GONE)
        }
        out("  " + ", ".join(f"{k}: {v}" for k, v in counts.items() if v))
