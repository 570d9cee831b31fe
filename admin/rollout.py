"""``tenant update-image``: a canary-first, batched, resumable image rollout with rollback.

Theory of operation
-------------------
1. *Select and snapshot* (no change yet): the managed machines of the chosen tenants, each
   checked (instance id, config.image), sorted by (tenant, machine). Before the first
   mutating call the snapshot records, per machine, its rollback target: the image it runs
   **by digest** (``image_ref.digest``), so a rollback returns to the bytes that ran before
   and not to a tag that may have moved (reference §5 bug 5), and its state. It is always
   this run's own snapshot, never an older run's (a ``--force`` rerun of a moved tag rolls
   back to the last good image, not to the one before it). Machines already on the image
   are skipped unless ``--force`` (bug 12); stopped machines are updated with
   ``skip_launch`` and stay stopped.
2. *Canary stage*: up to ``--canary`` machines, first machines of distinct tenants, one at a
   time.
3. *Rolling stage*: batches of at most ``--concurrency`` machines and at most one machine per
   tenant, so a tenant never loses two machines at once. A batch finishes before the next.
4. *Per machine* (``admin.rollout_machine``): lease, cordon, versioned update with read-back
   after doubt, wait for ``started`` of the new instance, health checks, soak, uncordon,
   release.
5. *Failure*: the canary stage stops at once; a batch lets its siblings finish. Then every
   machine that actually changed (acknowledged, seen in a read-back, or of unknown outcome)
   is rolled back, newest first, with the same care. A healthy machine that only could not
   be uncordoned is not rolled back: the rollout stops so that a rerun finishes it.
6. *State file* after every step (``admin.rollout_state``): an interrupted rollout resumes
   where it stopped when the same command runs again; a failed one whose rollback did not
   complete finishes that rollback first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flyvault.errors import NotFoundError, UsageError, VaultError
from flyvault.fly.errors import ApiNotFound
from flyvault.fly.leases import run_tag
from flyvault.fly.machines import MachinesClient

from .errors import IncompleteCleanup, RolloutFailed
from .hints import IMAGE, cause_of, rollout_hint
from .output import note, out, render_table, warn
from .readback import set_cordon
from .rollout_machine import CordonLeft, MachineWork, checks_status, digest_of
from .rollout_state import (
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
from .template import register_env_values
from .tenants import list_managed, tenant_of

__all__ = ["Rollout", "RolloutOptions", "checks_status", "rollback_ref", "run_update_image"]


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
    """One machine's update failed; ``cause`` (``admin.hints``) picks the hint."""

    def __init__(self, message: str, *, cause: str, error: BaseException) -> None:
        super().__init__(message)
        self.cause = cause
        self.error = error


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
    from .commands import make_client

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


def _public_values(machine: dict[str, Any]) -> list[str]:
    """Values of a machine that are not secrets even when an env value repeats them."""
    config = machine.get("config")
    metadata = config.get("metadata") if isinstance(config, dict) else None
    values = [str(machine.get(k) or "") for k in ("id", "name", "region")]
    if isinstance(metadata, dict):
        values += [v for v in metadata.values() if isinstance(v, str)]
    return values


class Rollout:
    def __init__(self, api: MachinesClient, app: str, options: RolloutOptions) -> None:
        self.api = api
        self.app = app
        self.o = options
        self.state: RolloutState
        self.work: MachineWork
        self.updated_order: list[str] = []  # machines that changed, in order
        self.resumed: set[str] = set()  # caught 'updating' by an interruption
        self.tag = run_tag()

    def _work(self, state: RolloutState) -> MachineWork:
        o = self.o
        return MachineWork(
            self.api,
            state,
            image=o.image,
            timeouts=(o.start_timeout_secs, o.health_timeout_secs, o.poll_interval),
            lease_ttl=o.lease_ttl_secs,
            tag=self.tag,
            on_change=self._changed,
        )

    def _changed(self, entry: MachineEntry) -> None:
        if entry.id not in self.updated_order:
            self.updated_order.append(entry.id)
        self.state.save()

    # -- top level ---------------------------------------------------------------------------

    async def run(self) -> int:
        self.state = await self._load_or_snapshot()
        state = self.state
        self.work = self._work(state)
        todo = [e for e in state.machines if e.status in (PENDING, UPDATING, FAILED)]
        out(
            f"rollout of {self.o.image} to {len(state.machines)} machine(s) of app {self.app} "
            f"(state file: {state.path})"
        )
        skipped = state.count(SKIPPED)
        if skipped:
            out(f"skipping {skipped} machine(s) already on {self.o.image} (use --force to redo)")
        # Every machine that may have changed, a resumed one included: the rollback set.
        self.updated_order = [e.id for e in state.machines if e.status == UPDATED or e.update_sent]
        try:
            if todo:
                canaries, batches = self._plan(todo)
                await self._canary_stage(canaries)
                await self._rolling_stage(batches)
        except MachineFailed as failure:
            await self._fail(failure)  # raises RolloutFailed
        except asyncio.CancelledError:
            state.save()
            note(
                "fly-vault-admin: interrupted; machines marked 'updating' may be cordoned. "
                f"Run the same command again to resume (state: {state.path})."
            )
            raise
        return self._completed()

    def _completed(self) -> int:
        state = self.state
        state.status = "completed"
        state.save()
        self._summary()
        out(f"image update completed for {state.count(UPDATED)} machine(s)")
        left = self._leases_left()
        if left:
            raise IncompleteCleanup(
                "image update completed, but leases are left held:\n  " + "\n  ".join(left),
                hint="they expire by themselves at the times named; until then another "
                "update of those machines fails with 409",
            )
        return 0

    def _leases_left(self) -> list[str]:
        return [e.lease_left for e in self.state.machines if e.lease_left]

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
        if previous is not None and previous.status == "failed":
            previous.path = path
            await self._finish_previous(previous)
        state = await self._snapshot()
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
                entry.lease_left = None
            if entry.status == FAILED:
                entry.status = UPDATING if entry.update_sent else PENDING
        state.save()

    async def _finish_previous(self, previous: RolloutState) -> None:
        """A failed run that could not roll everything back: finish that rollback first,
        to the targets that run recorded (its change is still in place)."""
        await self._release_stale_leases_only(previous)
        pending = [e for e in previous.machines if e.status == ROLLBACK_FAILED]
        if not pending:
            return
        note(
            f"the previous run of this rollout left {len(pending)} machine(s) it could not "
            "roll back; rolling them back first"
        )
        self.state = previous
        work = self._work(previous)
        broken = await self._rollback_entries(work, pending)
        if broken:
            raise RolloutFailed(
                "the rollback left by the previous run is still incomplete:\n"
                + "\n".join(await self._broken_lines(work, broken)),
                hint="inspect the machines named above (`tenant list --wide`) before retrying",
            )

    async def _release_stale_leases_only(self, state: RolloutState) -> None:
        """Leases and cordons an earlier run could not clear, cleared now (best effort)."""
        for entry in state.machines:
            if entry.lease_nonce:
                with contextlib.suppress(VaultError):
                    await self.api.release_lease(entry.id, entry.lease_nonce)
                entry.lease_nonce = None
                entry.lease_left = None
            if entry.cordoned and entry.status != ROLLBACK_FAILED:
                with contextlib.suppress(VaultError):
                    await set_cordon(self.api, entry.id, on=False, nonce=None)
                    entry.cordoned = False
        state.save()

    async def _snapshot(self) -> RolloutState:
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
        entries = []
        for machine in sorted(machines, key=lambda m: (str(tenant_of(m)), str(m.get("id")))):
            entries.append(self._entry(machine))
        return RolloutState(self.app, self.o.image, self.o.tenants, entries)

    def _entry(self, machine: dict[str, Any]) -> MachineEntry:
        """The rollback target, recorded before the first mutating call of this run."""
        machine_id = str(machine.get("id"))
        if not isinstance(machine.get("instance_id"), str) or not machine["instance_id"]:
            raise RolloutFailed(f"machine {machine_id} missing instance_id; nothing changed")
        config = machine.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("image"), str):
            raise RolloutFailed(f"machine {machine_id} config.image missing; nothing changed")
        # Every env value goes back to the API in the update body: never print one.
        register_env_values(config, public=_public_values(machine))
        entry = MachineEntry(
            id=machine_id,
            tenant_id=str(tenant_of(machine)),
            state_before=str(machine.get("state")),
            previous_instance_id=machine["instance_id"],
            previous_image=config["image"],
            rollback_image=rollback_ref(machine),
            name=machine.get("name"),
            region=machine.get("region"),
            previous_digest=digest_of(machine),
        )
        if config["image"] == self.o.image and not self.o.force:
            entry.status = SKIPPED
        return entry

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
                causes = [f.cause for f in failures]
                cause = next((c for c in causes if c != "cordon"), "cordon")
                raise MachineFailed(
                    "rolling stage failed:\n" + "\n".join(f"- {f.message}" for f in failures),
                    cause=IMAGE if IMAGE in causes else cause,
                    error=next(f.error for f in failures if f.cause == cause),
                )

    def _progress(self) -> None:
        s = self.state
        done = s.count(UPDATED)
        todo = s.count(PENDING, UPDATING)
        out(f"  progress: {done} updated, {s.count(FAILED)} failed, {todo} to go")

    # -- one machine ---------------------------------------------------------------------

    async def _update_guarded(self, entry: MachineEntry) -> None:
        entry.status = UPDATING
        self.state.save()
        say = self.work.say(entry)
        resumed = entry.id in self.resumed
        try:
            await self.work.update(entry, soak=self.o.soak_secs, resumed=resumed)
        except ApiNotFound:
            entry.status = GONE
            self.state.save()
            say("machine no longer exists; skipped")
            return
        except CordonLeft as exc:
            entry.error = exc.message  # stays 'updating': a rerun checks it and uncordons
            self.state.save()
            raise MachineFailed(self._label(entry, exc), cause="cordon", error=exc) from exc
        except VaultError as exc:
            entry.status = FAILED
            entry.error = exc.message
            self.state.save()
            out(f"    {entry.id}: FAILED: {exc.message}")
            raise MachineFailed(self._label(entry, exc), cause=cause_of(exc), error=exc) from exc
        entry.status = UPDATED
        entry.error = None
        self._changed(entry)
        say("done")

    @staticmethod
    def _label(entry: MachineEntry, exc: VaultError) -> str:
        if entry.canary:
            return f"canary stage failed: {exc.message}"
        return f"{entry.id}: {exc.message}"

    # -- failure and rollback ----------------------------------------------------------------

    async def _fail(self, failure: MachineFailed) -> None:
        if failure.cause == "cordon":
            self.state.save()  # still 'running': a rerun resumes and uncordons
            self._summary()
            raise RolloutFailed(
                f"{failure.message}\nrollout stopped; nothing was rolled back (the machine is "
                "healthy on the new image)" + self._left_lines(),
                hint=failure.error.hint if isinstance(failure.error, VaultError) else None,
            )
        targets = [
            self.state.entry(mid)
            for mid in reversed(self.updated_order)
            if self.state.entry(mid).update_sent
            and self.state.entry(mid).status not in (ROLLED_BACK, GONE)
        ]
        out(f"rollout failed, starting rollback for {len(targets)} machine(s)")
        broken = await self._rollback_entries(self.work, targets)
        self.state.status = "failed"
        self.state.save()
        self._summary()
        lines = [failure.message]
        rolled = [e.id for e in self.state.machines if e.status == ROLLED_BACK]
        if rolled:
            lines.append(f"rolled back to the previous image: {', '.join(rolled)}")
        lines += await self._broken_lines(self.work, broken)
        untouched = self.state.count(PENDING)
        if untouched:
            lines.append(f"{untouched} machine(s) were not touched")
        hint = (
            "inspect the machines named above (`tenant list --wide`) before retrying; the "
            "same command finishes their rollback first"
            if broken
            else rollout_hint(failure.cause, failure.error)
        )
        raise RolloutFailed("\n".join(lines) + self._left_lines(), hint=hint)

    async def _rollback_entries(
        self, work: MachineWork, targets: list[MachineEntry]
    ) -> list[MachineEntry]:
        broken: list[MachineEntry] = []
        for entry in targets:
            try:
                entry.status = await work.rollback(entry)
            except VaultError as exc:
                entry.status = ROLLBACK_FAILED
                entry.error = exc.message
                broken.append(entry)
                warn(f"rollback failed for {entry.id}: {exc.message}")
            else:
                if entry.status == ROLLED_BACK:
                    out(f"rolled back {entry.id} to {entry.rollback_image}")
            work.state.save()
        return broken

    @staticmethod
    async def _broken_lines(work: MachineWork, broken: list[MachineEntry]) -> list[str]:
        lines = []
        for entry in broken:
            now = await work.describe_now(entry)
            lines.append(f"rollback FAILED for {entry.id}: {entry.error} (now: {now})")
        return lines

    def _left_lines(self) -> str:
        left = self._leases_left()
        cordoned = [e.id for e in self.state.machines if e.cordoned]
        lines = [f"lease left held: {text}" for text in left]
        lines += [f"machine {mid} may still be cordoned" for mid in cordoned]
        return "".join(f"\n{line}" for line in lines)

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
