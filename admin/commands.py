"""``tenant create``, ``tenant delete``, ``tenant list`` and ``tenant usage-facts``.

Each ``run_*`` takes the parsed arguments, runs one asyncio program against the Machines
API and returns the exit code; errors are ``VaultError`` subclasses that ``admin.main``
prints. The work itself is in ``admin.create`` (create, all or nothing), ``admin.delete``
and ``admin.rollout`` (``update-image``); the list table is drawn by ``admin.display``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from flyvault.errors import UsageError
from flyvault.fly.clock import SYSTEM_CLOCK, Clock
from flyvault.fly.machines import MachinesClient, RetryPolicy, Timeouts
from flyvault.redact import register as register_secret

from .create import create_tenant
from .delete import delete_tenant
from .display import summary_rows, wide_rows
from .output import out, print_json, terminal_width, warn
from .template import (
    MachinePlan,
    auto_volume_placeholder,
    check_app,
    load_template,
    parse_vars,
    register_env_values,
    render_plan,
    validate_tenant_id,
)
from .tenants import list_managed, redact_config, summarise, volume_sizes

__all__ = ["create_tenant", "delete_tenant", "dry_run_plan", "make_client"]

# Tests shorten these; the CLI uses the defaults.
RETRY = RetryPolicy()
TIMEOUTS = Timeouts()
CLEANUP_POLL = 0.5
CLOCK: Clock = SYSTEM_CLOCK
#: Tests put a fault-injecting transport here (a factory, called once per client).
TRANSPORT: Callable[[], httpx.AsyncBaseTransport] | None = None


def make_client(args: argparse.Namespace) -> MachinesClient:
    return MachinesClient(
        base_url=args.api_base,
        app=args.app,
        token=args.api_token,
        retry=RETRY,
        timeouts=TIMEOUTS,
        clock=CLOCK,
        transport=TRANSPORT() if TRANSPORT is not None else None,
    )


# -- create ----------------------------------------------------------------------------------


def run_create(args: argparse.Namespace) -> int:
    register_secret(args.access_token)
    validate_tenant_id(args.tenant_id)
    if args.wait_timeout_secs <= 0:
        raise UsageError("--wait-timeout-secs must be > 0")
    variables = _variables(args.var, getattr(args, "secret_var", None) or [])
    template = load_template(Path(args.template))
    check_app(template, args.app)
    plans = render_plan(
        template, args.tenant_id, access_token=args.access_token, variables=variables
    )
    # Every config.env value of the template is a secret, but for what is public anyway.
    public = [args.tenant_id, *parse_vars(args.var).values()]
    for plan in plans:
        register_env_values(plan.request["config"], public=[*public, *_plan_values(plan)])
    used = {ph.name for ph in template.placeholders}
    for key in sorted(set(variables) - used):
        warn(f"--var '{key}' is not used by template {template.path}")
    if args.dry_run:
        print_json(dry_run_plan(plans))
        return 0
    return asyncio.run(_create(args, plans))


def _variables(plain: Sequence[str], secret: Sequence[str]) -> dict[str, str]:
    """``--var`` and ``--secret-var`` together; a secret variable's value is registered with
    the scrubber before anything can print it."""
    for item in secret:  # registered first: even an error quoting the item hides the value
        register_secret(item.partition("=")[2] or item)
    hidden = parse_vars(secret)
    return parse_vars([*plain, *(f"{key}={value}" for key, value in hidden.items())])


def _plan_values(plan: MachinePlan) -> list[str]:
    request = plan.request
    values = [str(request.get(k) or "") for k in ("name", "region")]
    values.append(str(plan.index))
    metadata = request["config"].get("metadata")
    if isinstance(metadata, dict):
        values += [str(v) for v in metadata.values()]
    return values


def dry_run_plan(plans: Sequence[MachinePlan]) -> list[dict[str, Any]]:
    """The create requests as they would be sent, volumes as placeholders, secrets hidden."""
    requests = []
    for plan in plans:
        request = dict(plan.request)
        config = redact_config(request["config"])
        for volume in plan.volumes:
            config["mounts"][volume.mount_index]["volume"] = auto_volume_placeholder(volume)
        request["config"] = config
        requests.append(request)
    return requests


async def _create(args: argparse.Namespace, plans: list[MachinePlan]) -> int:
    async with make_client(args) as api:
        await create_tenant(api, args.tenant_id, plans, wait_timeout=args.wait_timeout_secs)
    return 0


# -- delete ----------------------------------------------------------------------------------


def run_delete(args: argparse.Namespace) -> int:
    if args.wait_timeout_secs <= 0:
        raise UsageError("--wait-timeout-secs must be > 0")
    confirm = _ask if sys.stdin.isatty() and sys.stderr.isatty() else None
    return asyncio.run(_delete(args, confirm))


def _ask(prompt: str) -> str:
    print(prompt, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip()


async def _delete(args: argparse.Namespace, confirm: Callable[[str], str] | None) -> int:
    async with make_client(args) as api:
        await delete_tenant(
            api,
            args.tenant_id,
            yes=args.yes,
            confirm=confirm,
            wait_timeout=args.wait_timeout_secs,
        )
    return 0


# -- list ------------------------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    async def collect() -> tuple[list[dict[str, Any]], dict[str, int]]:
        async with make_client(args) as api:
            machines = await list_managed(api, tenants=[args.tenant] if args.tenant else None)
            sizes = volume_sizes(await api.list_volumes())
            return machines, sizes

    machines, sizes = asyncio.run(collect())
    tenants = summarise(machines, sizes)
    if args.json:
        print_json(tenants)
        return 0
    if not tenants:
        out("no managed tenants found")
        return 0
    width = terminal_width()
    lines = (
        wide_rows(tenants, machines, width) if args.wide else summary_rows(tenants, machines, width)
    )
    for line in lines:
        out(line)
    return 0


# -- usage facts -----------------------------------------------------------------------------


def run_usage_facts(args: argparse.Namespace) -> int:
    bearer = (args.bearer_token or "").strip() or None
    register_secret(bearer)
    if args.listen:
        from .usage_server import parse_listen, serve

        host, port = parse_listen(args.listen, bearer_token=bearer)
        return asyncio.run(serve(make_client(args), host, port, bearer, tenant=args.tenant))
    if bearer:
        warn("--bearer-token is only used with --listen")

    from .tenants import collect_usage_facts

    async def collect() -> list[dict[str, Any]]:
        async with make_client(args) as api:
            return await collect_usage_facts(api, args.tenant)

    print_json(asyncio.run(collect()))
    return 0
