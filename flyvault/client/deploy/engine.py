"""Apply, status and reverse of a deploy plan on one vault (the engine runs here, on the
client; the vault needs nothing but ``/bin/sh``).

Each step is decided as run or skip: skipped when the ledger holds it with the same
fingerprint (and, for a step in the rootfs domain, the same rootfs identity), or when its
guard says the work is done. The ledger is rewritten after every step, so a failure or a
lost connection leaves an accurate record and the next apply resumes at the first step not
done.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import socket
import time
from typing import Any

from flyvault.client.deploy import blocks, system
from flyvault.client.deploy.guest import Account, RunResult, VaultGuest
from flyvault.client.deploy.ledger import (
    BACKUPS,
    LeaseHolder,
    Ledger,
    PlanRecord,
    StepRecord,
)
from flyvault.client.deploy.plan import Plan, ResolvedStep, resolve
from flyvault.client.deploy.report import ApplyReport, Decision, describe_op, show_step, why_run
from flyvault.errors import FileOpError, NotFoundError, UsageError, VaultError


class Engine:
    def __init__(self, vault: Any, *, clock: Any = time.time, yes: bool = False) -> None:
        #: The user agreed to steps that need it (a restart ends every session).
        self.yes = yes
        #: Package ops of the other plans, while a reverse runs (their packages are kept).
        self._others: list[dict[str, Any]] = []
        self._reversing: str | None = None
        self.guest = VaultGuest(vault)
        self.ledger = Ledger(self.guest)
        self.clock = clock

    # -- apply ------------------------------------------------------------------------------

    async def apply(
        self,
        plan: Plan,
        *,
        dry_run: bool = False,
        force: frozenset[str] = frozenset(),
        force_all: bool = False,
        break_lock: bool = False,
        prune: bool = False,
        wait_seconds: float = 0.0,
        on_wait: Any = None,
    ) -> ApplyReport:
        account = await self.guest.account(plan.user)
        report = ApplyReport(plan.name, dry_run)
        report.preflight = await self._preflight(account)
        if dry_run:
            record = await self.ledger.load(plan.name)
            rootfs_id = await self.ledger.rootfs_id(create=False)
            for step in plan.steps:
                resolved = resolve(step, account.home)
                ran = any(d.action == "run" for d in report.decisions)
                reason = self._up_to_date(resolved, record, rootfs_id, force, force_all, ran)
                if reason is None:
                    reason = await self._guard(resolved, account) or ""
                action = "skip" if reason else "run"
                report.decisions.append(
                    Decision(
                        step.id,
                        step.kind,
                        action,
                        reason or why_run(resolved, record),
                        show_step(resolved),
                    )
                )
            report.decisions += _orphans(plan, record, prune, dry_run=True)
            report.status = "dry-run"
            return report
        lease = LeaseHolder(self.guest, plan.name, clock=self.clock)
        await lease.acquire(break_expired=break_lock, wait_seconds=wait_seconds, on_wait=on_wait)
        try:
            await self._apply_steps(plan, account, report, lease, force, force_all, prune)
        finally:
            await lease.release()
        return report

    async def _preflight(self, account: Account) -> dict[str, Any]:
        """Read-only facts shown with the report (and kept in its JSON)."""
        connection = await self.guest.vault.connection()
        release = await self.guest.read_text("/etc/os-release") or ""
        pretty = next(
            (
                line.split("=", 1)[1].strip().strip('"')
                for line in release.splitlines()
                if line.startswith("PRETTY_NAME=")
            ),
            "unknown (no /etc/os-release)",
        )
        return {
            "system": pretty,
            "runtime": connection.runtime_status.name.lower(),
            "boot_id": connection.boot_id,
            "user": account.name,
            "home": account.home,
            "shell": account.shell,
            "rootfs_id": await self.ledger.rootfs_id(create=False),
            "package_manager": await system.detect_manager(self.guest, "auto"),
        }

    async def _apply_steps(
        self,
        plan: Plan,
        account: Account,
        report: ApplyReport,
        lease: LeaseHolder,
        force: frozenset[str],
        force_all: bool,
        prune: bool,
    ) -> None:
        record = await self.ledger.load(plan.name) or PlanRecord(
            plan.name, plan.user, account.home, plan.digest(), plan.path
        )
        record.status, record.started_at, record.finished_at = "partial", self.clock(), None
        record.plan_digest, record.home, record.source = plan.digest(), account.home, plan.path
        record.applied_by = f"fly-vault on {socket.gethostname()}"
        rootfs_id = await self.ledger.rootfs_id(create=True)
        await self.ledger.save(record)
        for step in plan.steps:
            resolved = resolve(step, account.home)
            ran = any(d.action == "run" for d in report.decisions)
            reason = self._up_to_date(resolved, record, rootfs_id, force, force_all, ran)
            if reason is not None:
                report.decisions.append(Decision(step.id, step.kind, "skip", reason))
                continue
            await lease.renew(seconds=_lease_for(resolved))
            decision = await self._run_step(plan, resolved, account, record, rootfs_id)
            report.decisions.append(decision)
            await self.ledger.save(record)
            if decision.action == "failed":
                report.status = record.status = "partial"
                await self.ledger.save(record)
                return
        orphans = _orphans(plan, record, prune, dry_run=False)
        pruned = [d for d in orphans if d.action == "pruned"]
        if any(d.kind in ("packages", "service", "restart") for d in pruned) and not self.yes:
            raise UsageError(
                "pruning undoes packages or services the plan no longer has: refusing "
                "without --yes",
                hint="apply again with --prune --yes",
            )
        if pruned:
            # Other plans' packages, and those the steps this plan keeps still want.
            kept_steps = [s for i, s in record.steps.items() if i in {x.id for x in plan.steps}]
            self._others = await self._package_ops(exclude=plan.name) + [
                op for s in kept_steps for op in s.reverse_ops if op["kind"] == "package-remove"
            ]
            self._reversing = plan.name
        for decision in orphans:
            if decision.action == "pruned":
                held = record.steps[decision.step]
                for op in reversed(held.reverse_ops):
                    await self.undo(op, account)
                del record.steps[decision.step]
                await self.ledger.save(record)
            report.decisions.append(decision)
        record.status, record.finished_at = "applied", self.clock()
        report.status = "applied"
        await self.ledger.save(record)

    def _up_to_date(
        self,
        resolved: ResolvedStep,
        record: PlanRecord | None,
        rootfs_id: str | None,
        force: frozenset[str],
        force_all: bool,
        ran_before: bool = False,
    ) -> str | None:
        """Why the step needs nothing (a skip reason), or None when it must run. A restart
        runs like a handler: when an earlier step ran in this apply (or ``always``)."""
        if force_all or resolved.id in force:
            return None
        if resolved.kind == "restart":
            if ran_before or resolved.fields.get("always"):
                return None
            return "nothing ran before it in this apply"
        held = record.steps.get(resolved.id) if record else None
        if held is None or held.state == "failed" or held.fingerprint != resolved.fingerprint:
            return None
        if held.domain == "rootfs" and held.rootfs_id != rootfs_id:
            return None
        return "unchanged" if held.state == "applied" else f"unchanged ({held.reason})"

    async def _guard(self, resolved: ResolvedStep, account: Account) -> str | None:
        """A shell step's guard: why it need not run (read-only probes), else None."""
        if resolved.kind != "shell":
            return None
        creates = resolved.fields.get("creates")
        if creates and await self.guest.exists(creates):
            return f"guard: {creates} exists"
        unless = resolved.fields.get("unless")
        if unless:
            result = await self.guest.run(
                unless,
                account=account,
                as_user=resolved.as_user,
                probe=True,
                env=resolved.fields.get("env") or {},
            )
            if result.ok:
                return "guard: 'unless' succeeded"
        return None

    async def _run_step(
        self,
        plan: Plan,
        resolved: ResolvedStep,
        account: Account,
        record: PlanRecord,
        rootfs_id: str | None,
    ) -> Decision:
        held = record.steps.get(resolved.id)
        why = why_run(resolved, record)
        entry = StepRecord(
            kind=resolved.kind,
            domain=resolved.domain,
            fingerprint=resolved.fingerprint,
            state="applied",
            rootfs_id=rootfs_id,
            at=self.clock(),
        )
        # What an earlier apply recorded is void when its effects went with a replaced
        # rootfs (a backup taken there is of a file that no longer is). A failed entry
        # carries the ops of the run before it, so those are kept.
        lost = held is not None and held.domain == "rootfs" and held.rootfs_id != rootfs_id
        old_ops = held.reverse_ops if held and not lost else []
        guard = await self._guard(resolved, account)
        if guard is not None:
            entry.state, entry.reason, entry.reverse_ops = "skipped", guard, old_ops
            record.steps[resolved.id] = entry
            return Decision(resolved.id, resolved.kind, "skip", guard)
        step_runner = getattr(self, f"_do_{resolved.kind}")
        result: RunResult | None = await step_runner(plan, resolved, account, entry, old_ops)
        record.steps.pop(resolved.id, None)
        record.steps[resolved.id] = entry  # moved to the end: reverse walks back in order
        if entry.state == "skipped":
            return Decision(resolved.id, resolved.kind, "skip", entry.reason)
        if entry.reason and result is None:
            why = entry.reason
        if result is not None and not result.ok:
            entry.state, entry.exit_code = "failed", result.code
            entry.stderr_tail = result.tail()
            # What this run did before failing (a unit file written, say) stays undoable.
            entry.reverse_ops = old_ops + [op for op in entry.reverse_ops if op not in old_ops]
            entry.reason = f"exit code {result.code}"
            return Decision(
                resolved.id,
                resolved.kind,
                "failed",
                f"exit code {result.code}",
                entry.stderr_tail,
                result.code,
            )
        return Decision(resolved.id, resolved.kind, "run", why)

    # -- the step kinds --------------------------------------------------------------------

    async def _do_shell(
        self, plan: Plan, step: ResolvedStep, account: Account, entry: StepRecord, old: list[Any]
    ) -> RunResult:
        fields = step.fields
        result = await self.guest.run(
            fields["run"],
            account=account,
            as_user=step.as_user,
            env=fields.get("env") or {},
            timeout=float(fields["timeout"]),
        )
        if fields.get("creates"):
            entry.checks = [{"path": fields["creates"], "exists": True}]
        if fields.get("reverse"):
            entry.reverse_ops = [
                {
                    "kind": "shell",
                    "as": "user" if step.as_user else "root",
                    "command": fields["reverse"],
                }
            ]
        return result

    async def _do_file(
        self, plan: Plan, step: ResolvedStep, account: Account, entry: StepRecord, old: list[Any]
    ) -> None:
        dest = step.fields["dest"]
        data = step.step.data or b""
        await self._retire(old, keep_target=dest, account=account)
        kept = [op for op in old if op.get("target") == dest]
        entry.reverse_ops = kept or [await self._backup(plan, step, dest)]
        user = account.name if step.as_user and account.name != "root" else None
        files = self.guest.files(user)
        await files.write(
            dest, data, mode=int(step.fields["mode"], 8), make_parents=True, fsync=True
        )
        entry.checks = [{"path": dest, "sha256": step.fields["sha256"]}]
        return None

    async def _backup(self, plan: Plan, step: ResolvedStep, dest: str) -> dict[str, Any]:
        """The reverse op for a file about to be written: restore what was there, else remove."""
        op: dict[str, Any] = {
            "kind": "rm-file",
            "target": dest,
            "as": "user" if step.as_user else "root",
        }
        files = self.guest.files()
        try:
            info = await files.stat(dest)
        except NotFoundError:
            return op
        if info.kind != "file":
            raise VaultError(f"{dest} exists on the vault and is a {info.kind}, not a file")
        backup = f"{BACKUPS}/{plan.name}/{step.id}/{hashlib.sha256(dest.encode()).hexdigest()[:16]}"
        data = await files.read_bytes(dest)
        await files.write(backup, data, mode=0o600, make_parents=True, fsync=True)
        return {
            "kind": "restore-file",
            "target": dest,
            "backup": backup,
            "mode": info.mode & 0o7777,
            "uid": info.uid,
            "gid": info.gid,
        }

    async def _do_env(
        self, plan: Plan, step: ResolvedStep, account: Account, entry: StepRecord, old: list[Any]
    ) -> None:
        home = account.home
        path = f"{home}/{blocks.ENV_DIR}/{blocks.env_file_name(plan.name, step.id)}"
        text = blocks.env_file(plan.name, step.id, step.fields["vars"], step.fields["path_prepend"])
        files = self.guest.files(account.name if account.name != "root" else None)
        await files.write(path, text.encode(), mode=0o644, make_parents=True)
        body = blocks.env_block_body(home)
        for rc in blocks.profile_files(home, account.shell):
            await self._edit(rc, account, lambda t: blocks.upsert_block(t, blocks.ENV_BLOCK, body))
        entry.reverse_ops = [{"kind": "remove-env-file", "target": path, "as": "user"}]
        entry.checks = [{"path": path, "sha256": hashlib.sha256(text.encode()).hexdigest()}]
        entry.checks += [
            {"path": rc, "block": blocks.ENV_BLOCK, "sha256": _digest(body)}
            for rc in blocks.profile_files(home, account.shell)
        ]
        return None

    async def _do_snippet(
        self, plan: Plan, step: ResolvedStep, account: Account, entry: StepRecord, old: list[Any]
    ) -> None:
        rc = step.fields["file"]
        key = f"{plan.name}/{step.id}"
        await self._retire(old, keep_target=rc, account=account)
        await self._edit(
            rc, account, lambda t: blocks.upsert_block(t, key, step.fields["body"]), step.as_user
        )
        entry.checks = [{"path": rc, "block": key, "sha256": _digest(step.fields["body"])}]
        entry.reverse_ops = [
            {
                "kind": "remove-block",
                "target": rc,
                "key": key,
                "as": "user" if step.as_user else "root",
            }
        ]
        return None

    async def _do_packages(
        self, plan: Plan, step: ResolvedStep, account: Account, entry: StepRecord, old: list[Any]
    ) -> RunResult | None:
        self._need_yes(step, "installs packages in the rootfs")
        outcome = await system.packages(self.guest, step.fields)
        return self._system_outcome(outcome, entry, old)

    async def _do_service(
        self, plan: Plan, step: ResolvedStep, account: Account, entry: StepRecord, old: list[Any]
    ) -> RunResult | None:
        self._need_yes(step, "enables and starts a service")
        unit = step.fields["unit"]
        unit_path = None
        if step.fields.get("unit_file") is not None:
            unit_path = f"/etc/systemd/system/{unit}"
        # A renamed unit (or a unit file dropped): what the earlier version did goes first.
        ours = {unit, unit_path, "reload"}
        for op in reversed(old):
            if op.get("target") not in ours:
                await self.undo(op, account)
        old = [op for op in old if op.get("target") in ours]
        ops: list[dict[str, Any]] = []
        if unit_path is not None:
            kept = [op for op in old if op.get("target") == unit_path]
            ops = [
                {"kind": "service-reload", "unit": step.fields["unit"], "target": "reload"},
                *(kept or [await self._backup(plan, step, unit_path)]),
            ]
            files = self.guest.files()
            await files.write(unit_path, step.step.data or b"", mode=0o644, make_parents=True)
            entry.checks = [{"path": unit_path, "sha256": step.fields["sha256"]}]
        outcome = await system.service(self.guest, step.fields, unit_path)
        # Enabling/starting recorded before (it was not enabled then) stays to be undone.
        earlier = [op for op in old if op.get("target") == unit]
        result = self._system_outcome(outcome, entry, earlier)
        entry.reverse_ops = ops + [op for op in entry.reverse_ops if op not in ops]
        return result

    def _system_outcome(
        self, outcome: system.Outcome, entry: StepRecord, old: list[Any]
    ) -> RunResult | None:
        if outcome.skip is not None:
            entry.state, entry.reason, entry.reverse_ops = "skipped", outcome.skip, old
            return None
        entry.reason = outcome.reason
        # A changed step keeps what it recorded earlier (packages it added then, say).
        new = [op for op in outcome.reverse_ops if op not in old]
        entry.reverse_ops = old + new if outcome.result is None else old
        return outcome.result

    def _need_yes(self, step: ResolvedStep, what: str) -> None:
        if not self.yes:
            raise UsageError(
                f"step {step.id!r} {what}: refusing without --yes",
                hint="apply again with --yes (MCP: confirm=true)",
            )

    async def _do_image(
        self, plan: Plan, step: ResolvedStep, account: Account, entry: StepRecord, old: list[Any]
    ) -> None:
        from flyvault.client.images import copy_image

        fields = step.fields
        user = account.name if step.as_user and account.name != "root" else None
        done = await copy_image(
            self.guest.vault, fields["image"], tag=fields["tag"], user=user, engine=fields["engine"]
        )
        entry.reason = f"{done.tag}: {done.action} (id {done.image_id[:12]})"
        if done.action == "skipped":  # there and verified already: not this plan's to remove
            return None
        entry.reverse_ops = [
            {
                "kind": "image-remove",
                "target": done.tag,
                "image_id": done.image_id,
                "as": "user" if user else "root",
            }
        ]
        return None

    async def _do_restart(
        self, plan: Plan, step: ResolvedStep, account: Account, entry: StepRecord, old: list[Any]
    ) -> None:
        from flyvault.client.restart import restart_and_wait

        self._need_yes(step, "restarts the vault's workload (every session ends)")
        done = await restart_and_wait(
            self.guest.vault, allow_running=True, deadline=float(step.fields["timeout"])
        )
        system = f", systemd {done.system_state}" if done.system_state else ""
        entry.reason = (
            f"restarted: boot id {done.old_boot_id[:12]} -> {done.new_boot_id[:12]}{system}"
        )
        return None

    async def _do_artifact(
        self, plan: Plan, step: ResolvedStep, account: Account, entry: StepRecord, old: list[Any]
    ) -> None:
        from pathlib import Path

        from flyvault.client.deploy import archive

        fields = step.fields
        local = Path(fields["path"])
        user = account.name if step.as_user and account.name != "root" else None
        files = self.guest.files(user)
        target = fields["dest"] or fields["extract_to"]
        await self._retire(old, keep_target=target, account=account)
        kept = [op for op in old if op.get("target") == target]
        if fields["dest"] is not None:
            entry.reverse_ops = kept or [await self._backup(plan, step, target)]
            await files.write(
                target,
                archive.file_chunks(local),
                mode=int(fields["mode"], 8),
                make_parents=True,
                fsync=True,
                size=local.stat().st_size,
                sha256=fields["sha256"],
            )
            entry.checks = [{"path": target, "sha256": fields["sha256"]}]
            return None
        await files.mkdir(target, parents=True, exist_ok=True)
        existing = await self._existing(target, step.step.members)
        await files.tar_put(target, archive.tar_pieces(local), fsync=True)
        created = [name for name in step.step.members if name not in existing]
        earlier = kept[0]["entries"] if kept else []
        entry.reverse_ops = [
            {
                "kind": "rm-tree",
                "target": target,
                "entries": sorted(set(earlier) | set(created)),
                "as": "user" if step.as_user else "root",
            }
        ]
        return None

    async def _existing(self, top: str, members: tuple[str, ...]) -> set[str]:
        """Which of ``members`` exist under ``top`` now: one listing per directory."""
        found: set[str] = set()
        files = self.guest.files()
        for parent in sorted({posixpath.dirname(name) for name in members}):
            try:
                entries = await files.list_dir(posixpath.join(top, parent) if parent else top)
            except (NotFoundError, FileOpError):
                continue
            found |= {posixpath.join(parent, e.name) if parent else e.name for e in entries}
        return found

    async def _edit(self, path: str, account: Account, change: Any, as_user: bool = True) -> None:
        """Read-modify-write of a text file, swapped only if unchanged meanwhile."""
        from flyvault.client.files import EXPECT_ABSENT

        user = account.name if as_user and account.name != "root" else None
        files = self.guest.files(user)
        try:
            data = await files.read_bytes(path)
            mode, expect = (await files.stat(path)).mode & 0o7777, hashlib.sha256(data).hexdigest()
        except NotFoundError:
            data, mode, expect = b"", 0o644, EXPECT_ABSENT
        # surrogateescape: bytes that are not UTF-8 outside the block come back unchanged.
        new = change(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
        if new == data:
            return
        await files.write(path, new, mode=mode, make_parents=True, expect_sha256=expect)

    async def _retire(
        self, old: list[dict[str, Any]], *, keep_target: str, account: Account
    ) -> None:
        """Undo what an earlier version of a step did to targets it no longer covers."""
        for op in reversed(old):
            if op.get("target") != keep_target:
                await self.undo(op, account)

    # -- reverse -----------------------------------------------------------------------------

    async def reverse(
        self,
        name: str,
        *,
        dry_run: bool = False,
        break_lock: bool = False,
        keep: frozenset[str] = frozenset(),
    ) -> ApplyReport:
        """Undo a plan from its record, newest first, going on past failures. ``keep``:
        op families left alone (``packages``, ``services``). Each op that succeeded leaves
        the record at once, so a reverse run again after a failure retries only the rest."""
        report = ApplyReport(name, dry_run, status="reversed")
        if dry_run:
            record = await self._recorded(name)
            for step_id, step, op in _undo_order(record):
                action = "kept" if _family(op) in keep else "run"
                report.decisions.append(
                    Decision(step_id, step.kind, action, op["kind"], describe_op(op))
                )
            report.status = "dry-run"
            return report
        lease = LeaseHolder(self.guest, name, clock=self.clock)
        await lease.acquire(break_expired=break_lock)
        try:
            record = await self._recorded(name)  # read under the lease
            account = await self.guest.account(record.user)
            self._others = await self._package_ops(exclude=name)
            self._reversing = name
            for step_id, step, op in _undo_order(record):
                if _family(op) in keep:
                    report.decisions.append(
                        Decision(step_id, step.kind, "kept", op["kind"], describe_op(op))
                    )
                    continue
                try:
                    note = await self.undo(op, account)
                except VaultError as exc:
                    report.status = "partial"
                    report.decisions.append(
                        Decision(step_id, step.kind, "failed", op["kind"], str(exc))
                    )
                    continue
                step.reverse_ops.remove(op)
                await self.ledger.save(record)
                report.decisions.append(
                    Decision(step_id, step.kind, "run", op["kind"], note or describe_op(op))
                )
            if report.status != "partial":
                await self.ledger.delete(name)
        finally:
            await lease.release()
        return report

    async def _recorded(self, name: str) -> PlanRecord:
        record = await self.ledger.load(name)
        if record is None:
            raise NotFoundError(
                f"no plan {name!r} is recorded on this vault",
                hint="'fly-vault deploy status VAULT' lists the plans applied there",
            )
        return record

    async def _hand_over(self, op: dict[str, Any]) -> None:
        """Packages this plan installed that another still wants were kept: that plan's
        record now lists them as its own, so they go when the last plan wanting them goes."""
        kept = [n for n in op["packages"] if any(n in o.get("wanted", ()) for o in self._others)]
        for name in kept:
            for other in await self.ledger.names():
                ledger = Ledger(self.guest)
                held = await ledger.load(other)
                wanting = [
                    o
                    for step in (held.steps.values() if held else ())
                    for o in step.reverse_ops
                    if o["kind"] == "package-remove" and name in o.get("wanted", ()) and o is not op
                ]
                if held is not None and wanting and held.name != self._reversing:
                    if name not in wanting[0]["packages"]:
                        wanting[0]["packages"].append(name)
                        wanting[0]["command"] = system.remove_command(
                            wanting[0]["manager"], wanting[0]["packages"]
                        )
                        await ledger.save(held)
                    break

    async def _package_ops(self, *, exclude: str) -> list[dict[str, Any]]:
        """The package ops every other plan recorded (a package they added is kept)."""
        ops = []
        for other in await self.ledger.names():
            if other == exclude:
                continue
            held = await Ledger(self.guest).load(other)
            for step in held.steps.values() if held else ():
                ops += [op for op in step.reverse_ops if op["kind"] == "package-remove"]
        return ops

    async def undo(self, op: dict[str, Any], account: Account) -> str | None:
        """One recorded reverse op; "already gone" is success. Returns a note, if any."""
        kind, target = op["kind"], op.get("target", "")
        if kind == "package-remove":
            note = await system.undo(self.guest, op, self._others)
            await self._hand_over(op)
            return note
        if kind in ("service-disable", "service-stop", "service-reload"):
            return await system.undo(self.guest, op, self._others)
        if kind == "image-remove":
            from flyvault.client.images import remove_image

            await remove_image(
                self.guest.vault,
                op["target"],
                op["image_id"],
                user=(account.name if op.get("as") == "user" and account.name != "root" else None),
            )
            return None
        as_user = op.get("as") == "user"
        user = account.name if as_user and account.name != "root" else None
        files = self.guest.files(user)
        if kind == "shell":
            result = await self.guest.run(op["command"], account=account, as_user=as_user)
            if not result.ok:
                raise VaultError(f"reverse command exited {result.code}: {result.tail().strip()}")
        elif kind in ("rm-file", "remove-env-file"):
            with contextlib.suppress(NotFoundError):
                await files.remove(target)
            if kind == "remove-env-file":
                await self._drop_env_block(account)
        elif kind == "restore-file":
            root = self.guest.files()
            data = await root.read_bytes(op["backup"])
            await root.write(target, data, mode=op["mode"], fsync=True)
            await root.chown(target, op["uid"], op["gid"])
            await root.chmod(target, op["mode"])
            await root.remove(op["backup"])
        elif kind == "rm-tree":
            await self._remove_entries(files, target, op.get("entries", []))
        elif kind == "remove-block":
            await self._edit(target, account, lambda t: blocks.remove_block(t, op["key"]), as_user)
        else:
            raise VaultError(
                f"unknown reverse op {kind!r} in the ledger (a newer fly-vault wrote it)"
            )

    async def _remove_entries(self, files: Any, top: str, entries: list[str]) -> None:
        """The entries an extraction created, deepest first; a directory that holds
        something else now is kept."""
        for name in sorted(entries, key=lambda n: (n.count("/"), n), reverse=True):
            path = posixpath.join(top, name)
            try:
                await files.remove(path)
            except NotFoundError:
                pass  # gone already: done
            except FileOpError as exc:
                if "(ENOTEMPTY)" not in str(exc):
                    raise
                # A directory that holds entries fly-vault did not create: kept.

    async def _drop_env_block(self, account: Account) -> None:
        directory = f"{account.home}/{blocks.ENV_DIR}"
        try:
            left = [
                e for e in await self.guest.files().list_dir(directory) if e.name.endswith(".sh")
            ]
        except NotFoundError:
            left = []
        if left:
            return
        for rc in blocks.profile_files(account.home, account.shell):
            with contextlib.suppress(NotFoundError):
                await self._edit(rc, account, lambda t: blocks.remove_block(t, blocks.ENV_BLOCK))

    # -- status ------------------------------------------------------------------------------

    async def status(
        self, name: str | None, plan: Plan | None, *, verify: bool = False
    ) -> list[dict[str, Any]]:
        """Each recorded plan (or the one named) with its steps' states (``status.py``)."""
        from flyvault.client.deploy.status import plan_states

        return await plan_states(self.guest, self.ledger, name, plan, verify=verify)


def _orphans(
    plan: Plan, record: PlanRecord | None, prune: bool, *, dry_run: bool
) -> list[Decision]:
    """Steps the ledger holds that the plan no longer has: undone with ``prune``, else
    reported and kept."""
    wanted = {step.id for step in plan.steps}
    out = []
    for step_id, held in reversed(list((record.steps if record else {}).items())):
        if step_id in wanted:
            continue
        if prune:
            ops = (
                ", ".join(describe_op(op) for op in reversed(held.reverse_ops)) or "nothing to undo"
            )
            out.append(Decision(step_id, held.kind, "pruned", "gone from the plan", ops))
        else:
            out.append(
                Decision(step_id, held.kind, "orphaned", "gone from the plan; --prune undoes it")
            )
    return out


def _undo_order(record: PlanRecord) -> list[tuple[str, StepRecord, dict[str, Any]]]:
    """Every recorded op, newest step first and within a step last op first."""
    return [
        (step_id, step, op)
        for step_id, step in reversed(list(record.steps.items()))
        for op in reversed(list(step.reverse_ops))
    ]


def _lease_for(resolved: ResolvedStep) -> float:
    """How long the lease must outlive the step about to run (its own timeout, or the
    longest a package install, an image copy or an upload is allowed)."""
    if resolved.kind in ("packages", "image", "artifact"):
        return 3600.0 + 120
    return max(900.0, float(resolved.fields.get("timeout", 0)) + 120)


def _family(op: dict[str, Any]) -> str:
    kind = str(op["kind"])
    if kind.startswith("package"):
        return "packages"
    return "services" if kind.startswith("service") else kind


def _digest(body: str) -> str:
    return hashlib.sha256(blocks.normal_body(body).encode()).hexdigest()
