"""``deploy status``: each recorded plan's steps, compared with a plan file when one is
given (changed, pending, orphaned), with the rootfs (lost) and, with ``verify``, with what
the steps left on the vault (drifted). Read-only."""

from __future__ import annotations

import hashlib
from typing import Any

from flyvault.client.deploy import blocks
from flyvault.client.deploy.guest import Account
from flyvault.client.deploy.ledger import Ledger, PlanRecord
from flyvault.client.deploy.plan import Plan, resolve
from flyvault.errors import NotFoundError, VaultError


async def plan_states(
    guest: Any, ledger: Ledger, name: str | None, plan: Plan | None, *, verify: bool = False
) -> list[dict[str, Any]]:
    """Each recorded plan (or the one named) with its steps' states; ``verify`` probes
    what each applied step left (file digests, managed blocks, guard paths): a step
    whose result was changed since is ``drifted``."""
    names = [name] if name else await ledger.names()
    rootfs_id = await ledger.rootfs_id(create=False)
    out = []
    for plan_name in names:
        record = await ledger.load(plan_name)
        if record is None:
            out.append({"plan": plan_name, "status": "not applied", "steps": _pending(plan)})
            continue
        shown = await _plan_status(
            record, plan if plan and plan.name == plan_name else None, rootfs_id
        )
        if verify:
            await _verify(guest, record, shown)
        out.append(shown)
    return out


async def _verify(guest: Any, record: PlanRecord, shown: dict[str, Any]) -> None:
    account = await guest.account(record.user)
    for step in shown["steps"]:
        held = record.steps.get(step["id"])
        if held is None or step["state"] != "applied":
            continue
        for check in held.checks:
            problem = await _probe(guest, check, account)
            if problem:
                step["state"], step["reason"] = "drifted", problem
                break
    shown["converged"] = shown["converged"] and all(s["state"] != "drifted" for s in shown["steps"])


async def _probe(guest: Any, check: dict[str, Any], account: Account) -> str | None:
    """What is no longer as the step left it, or None (read-only)."""
    path = str(check["path"])
    if "block" in check:
        text = await guest.read_text(path)
        body = blocks.block_body(text or "", str(check["block"]))
        if body is None:
            return f"the block {check['block']} is gone from {path}"
        if hashlib.sha256(body.encode()).hexdigest() != check["sha256"]:
            return f"the block {check['block']} in {path} was edited"
        return None
    try:
        found = await guest.files().sha256(path) if "sha256" in check else None
    except NotFoundError:
        return f"{path} is gone"
    except VaultError as exc:
        return f"{path}: {exc}"
    if "sha256" in check and found != check["sha256"]:
        return f"{path} was changed"
    if check.get("exists") and not await guest.exists(path):
        return f"{path} is gone"
    return None


async def _plan_status(
    record: PlanRecord, plan: Plan | None, rootfs_id: str | None
) -> dict[str, Any]:
    steps = []
    wanted = {s.id: resolve(s, record.home) for s in plan.steps} if plan else {}
    for step_id, step in record.steps.items():
        state = step.state
        if step.domain == "rootfs" and step.rootfs_id != rootfs_id and state != "failed":
            state = "lost"
        elif plan is not None and step_id not in wanted:
            state = "orphaned"
        elif plan is not None and wanted[step_id].fingerprint != step.fingerprint:
            state = "changed"
        steps.append(
            {
                "id": step_id,
                "kind": step.kind,
                "state": state,
                "reason": step.reason,
                "exit_code": step.exit_code,
                "stderr_tail": step.stderr_tail,
                "domain": step.domain,
            }
        )
    for step_id, resolved in wanted.items():
        if step_id not in record.steps:
            steps.append({"id": step_id, "kind": resolved.kind, "state": "pending"})
    converged = record.status == "applied" and all(
        s["state"] in ("applied", "skipped") for s in steps
    )
    return {
        "plan": record.name,
        "status": record.status,
        "converged": converged,
        "user": record.user,
        "finished_at": record.finished_at,
        "steps": steps,
    }


def _pending(plan: Plan | None) -> list[dict[str, Any]]:
    return [{"id": s.id, "kind": s.kind, "state": "pending"} for s in (plan.steps if plan else ())]
