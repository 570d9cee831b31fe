"""``fly-vault deploy apply|status|reverse``: plans applied inside a vault
(``flyvault.client.deploy``). The plan is checked in full before connecting (exit 2)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flyvault.errors import UsageError

#: Exit code of an apply with a failed step, and of a status that is not converged.
NOT_CONVERGED = 1
#: Step kinds an apply runs only with --yes, and why.
GATED = {
    "restart": "restarts the vault's workload, which ends every session on it",
    "packages": "installs packages in the rootfs",
    "service": "enables and starts systemd services",
}


def add_parser(commands: Any) -> None:
    from flyvault.envvars import number

    deploy = commands.add_parser(
        "deploy",
        help="apply a plan (TOML) inside a vault, show its state, reverse it",
        description="Plans are TOML files of ordered steps (shell, file, env, snippet, artifact, packages, service, restart); the "
        "vault keeps a ledger under /root of what each plan applied and how to undo it. "
        "See references/deploy-plans.md.",
    )
    actions = deploy.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)
    apply = actions.add_parser("apply", help="run the steps that are new or changed")
    apply.add_argument("vault")
    apply.add_argument("plan", help="the plan file (TOML)")
    apply.add_argument("--dry-run", action="store_true", help="decide and show; change nothing")
    apply.add_argument("--json", action="store_true", help="print a JSON report")
    apply.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="ID",
        help="run this step even if unchanged (repeatable)",
    )
    apply.add_argument("--force-all", action="store_true", help="run every step")
    apply.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="agree to steps that need it (restart: every session on the vault ends)",
    )
    apply.add_argument(
        "--prune",
        action="store_true",
        help="undo the steps the ledger holds that the plan no longer has",
    )
    apply.add_argument(
        "--wait",
        type=number(float, minimum=0, maximum=3600, unit="seconds"),
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for another apply's lease (default 0: refuse at once)",
    )
    apply.add_argument(
        "--break-lock", action="store_true", help="clear an expired lease left by a crashed apply"
    )
    status = actions.add_parser(
        "status", help="what the vault's ledger holds (exit 1: not converged)"
    )
    status.add_argument("vault")
    status.add_argument("plan", nargs="?", help="a plan file (compare) or a recorded plan's name")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--verify",
        action="store_true",
        help="probe what each step left (file digests, managed blocks): changed ones are drifted",
    )
    reverse = actions.add_parser("reverse", help="undo what a plan applied, from the ledger")
    reverse.add_argument("vault")
    reverse.add_argument("name", help="the plan's name (as recorded on the vault)")
    reverse.add_argument("--dry-run", action="store_true", help="show the recorded undo operations")
    reverse.add_argument("--json", action="store_true", help="print a JSON report")
    reverse.add_argument(
        "--keep-packages", action="store_true", help="leave the packages the plan installed"
    )
    reverse.add_argument(
        "--keep-services", action="store_true", help="leave its services enabled and running"
    )
    reverse.add_argument("--break-lock", action="store_true", help="clear an expired lease first")
    deploy.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flyvault.client.deploy import load_plan
    from flyvault.config import load_vault

    plan = None
    name = None
    if args.deploy_command == "apply":
        plan = load_plan(args.plan)
        if args.force and args.force_all:
            raise UsageError("--force and --force-all do not go together: pick one")
        gated = [step for step in plan.steps if step.kind in GATED]
        if gated and not (args.yes or args.dry_run):
            raise UsageError(
                f"the plan {GATED[gated[0].kind]} (step {gated[0].id!r}): refusing without --yes",
                hint=f"fly-vault deploy apply {args.vault} {args.plan} --yes (--dry-run first "
                "shows what would run)",
            )
        unknown = sorted(set(args.force) - {step.id for step in plan.steps})
        if unknown:
            raise UsageError(f"--force {unknown[0]!r}: the plan has no step with that id")
    elif args.deploy_command == "status" and args.plan:
        if args.plan.endswith(".toml") or "/" in args.plan:
            plan = load_plan(args.plan)
            name = plan.name
        else:
            name = _plan_name(args.plan)
    elif args.deploy_command == "reverse":
        name = _plan_name(args.name)
    import asyncio

    config = load_vault(args.vault)  # config errors: exit 3, before connecting
    return asyncio.run(_run(args, config, plan, name))


def _plan_name(text: str) -> str:
    from flyvault.client.deploy.ledger import check_plan_name

    return check_plan_name(text)


async def _run(args: argparse.Namespace, config: Any, plan: Any, name: str | None) -> int:
    from flyvault.cli.console import with_vault

    return int(await with_vault(config, lambda vault: _act(args, vault, plan, name)))


async def _act(args: argparse.Namespace, vault: Any, plan: Any, name: str | None) -> int:
    from flyvault.cli.console import Console
    from flyvault.client.deploy.engine import Engine

    engine = Engine(vault, yes=getattr(args, "yes", False))
    if args.deploy_command == "apply":
        report = await engine.apply(
            plan,
            dry_run=args.dry_run,
            force=frozenset(args.force),
            force_all=args.force_all,
            break_lock=args.break_lock,
            prune=args.prune,
            wait_seconds=args.wait,
            on_wait=Console().notice,
        )
        _print_report(report, args.json, verb="changed")
        return NOT_CONVERGED if report.failed else 0
    if args.deploy_command == "reverse":
        keep = {"packages"} if args.keep_packages else set()
        keep |= {"services"} if args.keep_services else set()
        report = await engine.reverse(
            name or "", dry_run=args.dry_run, break_lock=args.break_lock, keep=frozenset(keep)
        )
        _print_report(report, args.json, verb="undone")
        return NOT_CONVERGED if report.status == "partial" else 0
    plans = await engine.status(name, plan, verify=args.verify)
    _print_status(plans, args.json)
    converged = bool(plans) and all(p.get("converged") for p in plans)
    return 0 if converged else NOT_CONVERGED


def _print_report(report: Any, as_json: bool, *, verb: str) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    facts = getattr(report, "preflight", None)
    if facts:
        print(
            f"vault: {facts['system']}, runtime {facts['runtime'].replace('_', ' ')}, packages "
            f"{facts.get('package_manager') or 'none'}; user {facts['user']} ({facts['home']}, "
            f"{facts['shell']})"
        )
    for decision in report.decisions:
        line = f"  {decision.action:<6} {decision.step:<24} {decision.reason}"
        print(line)
        if decision.detail and (report.dry_run or decision.action == "failed"):
            for text in decision.detail.rstrip().splitlines()[-10:]:
                print(f"           | {text}")
    unchanged = sum(1 for d in report.decisions if d.action == "skip")
    failed = sum(1 for d in report.decisions if d.action == "failed")
    mode = " (dry run: nothing changed)" if report.dry_run else ""
    print(
        f"plan {report.plan}: {report.changed} {verb if not report.dry_run else 'to run'}, "
        f"{unchanged} unchanged, {failed} failed; status {report.status}{mode}",
        file=sys.stderr if as_json else sys.stdout,
    )


def _print_status(plans: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"plans": plans}, indent=2))
        return
    if not plans:
        print("no plan is recorded on this vault")
        return
    for plan in plans:
        mark = "converged" if plan.get("converged") else "not converged"
        print(f"plan {plan['plan']}: {plan['status']} ({mark})")
        for step in plan["steps"]:
            extra = step.get("reason") or ""
            if step.get("exit_code") is not None:
                extra = f"exit code {step['exit_code']}"
            print(f"  {step['state']:<9} {step['id']:<24} {extra}".rstrip())
