"""The deploy tool: a plan (a path or TOML text) applied, shown or reversed inside a vault
(``flyvault.client.deploy``). Apply and reverse are dry runs unless ``confirm=true``; the
work runs as a job, so a long apply keeps going past ``wait_seconds`` (``job_status``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult

from flyvault.client.deploy import Plan, load_plan, parse_plan
from flyvault.errors import UsageError

from .jobs import Job
from .models import JobResult
from .registry import ToolRegistry
from .server import State, structured
from .tools_vault import VaultName

deploy_tools = ToolRegistry()
#: How long a call waits for its job; a longer apply goes on, followed with job_status (no
#: wait_seconds argument: tools/list has no room for it).
WAIT_SECONDS = 30.0


@deploy_tools.tool(
    "Deploy plan", read_only=False, destructive=True, idempotent=True, open_world=True
)
async def deploy(
    state: State,
    ctx: Context,
    vault: VaultName,
    action: Literal["apply", "status", "reverse"],
    plan: str | None = None,
    confirm: bool = False,
) -> Annotated[CallToolResult, JobResult]:
    """plan: TOML, a .toml path, or a name (status, reverse). Dry run unless confirm."""
    # Off the event loop: reading the plan hashes its artifacts (and asks the image engine).
    parsed, name = await anyio.to_thread.run_sync(lambda: _plan(plan, action))
    state.pool.entry(vault)  # an unknown vault is a usage error now, not in the job

    async def work(job: Job) -> dict[str, Any]:
        from flyvault.client.deploy.engine import Engine

        engine = Engine(await state.pool.get(vault), yes=confirm)
        if action == "status":
            plans = await engine.status(name, parsed)
            converged = bool(plans) and all(p.get("converged") for p in plans)
            return {"plans": plans, "converged": converged}
        if action == "reverse":
            report = await engine.reverse(name or "", dry_run=not confirm)
        else:
            assert parsed is not None
            report = await engine.apply(parsed, dry_run=not confirm)
        result = report.to_json()
        result["next_step"] = _next_step(vault, action, report, confirm)
        return result

    job = state.jobs.start(f"deploy {action}", vault, work)
    return structured(await state.jobs.follow(job, ctx, WAIT_SECONDS, foreground=True))


def _plan(text: str | None, action: str) -> tuple[Plan | None, str | None]:
    """The plan given (parsed: a usage error before anything connects) and its name."""
    from flyvault.client.deploy.ledger import check_plan_name

    if text is None or not text.strip():
        if action == "status":
            return None, None
        raise UsageError(
            f'deploy(action="{action}") needs plan: TOML text, a .toml path, or the name of a '
            "recorded plan (status, reverse)",
            hint='deploy(vault=..., action="status") lists the plans applied on a vault',
        )
    if "\n" in text or "=" in text:
        parsed = parse_plan(text, source="plan", base=Path.cwd())
    elif text.endswith(".toml") or "/" in text:
        parsed = load_plan(text)
    elif action != "apply":
        return None, check_plan_name(text)
    else:
        raise UsageError(
            f"plan {text!r} is neither TOML text nor a .toml path",
            hint="pass the plan's TOML, or the path of its file",
        )
    return parsed, parsed.name


def _next_step(vault: str, action: str, report: Any, confirm: bool) -> str:
    if not confirm:
        return (
            f"dry run, nothing changed: show the user the steps; if they agree, call "
            f'deploy(vault="{vault}", action="{action}", plan=..., confirm=true)'
        )
    if report.failed:
        return (
            "a step failed (its exit code and stderr tail are above); fix the plan and "
            "apply again: it resumes at that step"
        )
    return f'deploy(vault="{vault}", action="status", plan=...) shows the ledger'


__all__ = ["deploy_tools"]
