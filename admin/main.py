"""``fly-vault-admin``: tenant machines on the Fly Machines API.

Imports are lazy: ``--help`` and usage errors load only argparse (no httpx); each command's
module is imported when it runs. Global options may come before ``tenant`` (as in the
original) or after the subcommand.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from flyvault.envvars import finite_float

PROG = "fly-vault-admin"
DEFAULT_API_BASE = "https://api.machines.dev"

EXIT_CODES_HELP = """\
exit codes:
  0   success                         2   usage error (bad flag, missing token/app)
  1   other error                     3   template error
  4   Machines API unreachable, timed out, or a machine did not reach a state in time
  6   API token refused (401/403)     9   not found (app, machine, tenant)
  10  other Machines API error        11  rollout failed (the summary names each machine)
  12  cleanup incomplete (create rollback or delete left resources, or a lease could
      not be released; each is named, a lease with its expiry)
  13  tenant already exists          130  interrupted

environment: FLY_API_TOKEN, FLY_APP, FLY_API_BASE, FLY_VAULT_ACCESS_TOKEN,
FLY_VAULT_USAGE_BEARER_TOKEN (prefer these to flags: flags show in the process list)
"""


def _global_options(parser: argparse.ArgumentParser, *, root: bool) -> None:
    # On subcommands the defaults are suppressed so they never overwrite the root's value.
    default = None if root else argparse.SUPPRESS
    parser.add_argument(
        "--api-token",
        metavar="TOKEN",
        default=default,
        help="Fly API token (env FLY_API_TOKEN)" if root else argparse.SUPPRESS,
    )
    parser.add_argument(
        "--app",
        default=default,
        help="Fly app holding the tenant machines (env FLY_APP)" if root else argparse.SUPPRESS,
    )
    parser.add_argument(
        "--api-base",
        metavar="URL",
        default=default,
        help=f"Machines API base URL (env FLY_API_BASE, default {DEFAULT_API_BASE})"
        if root
        else argparse.SUPPRESS,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if root else argparse.SUPPRESS,
        help="log API calls and retries to stderr" if root else argparse.SUPPRESS,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create, list, delete and upgrade per-tenant vault machines through the "
        "Fly Machines API, and publish usage facts for metering.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, root=True)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    tenant = commands.add_parser("tenant", help="manage tenants (create, list, delete, ...)")
    actions = tenant.add_subparsers(dest="action", metavar="ACTION")

    def sub(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text, description=description)
        _global_options(p, root=False)
        return p

    create = sub(
        "create",
        "create a tenant's volumes and machines from a template",
        "Render the template, create the volumes for named mounts, create the machines and "
        "wait until they run. If a step fails, everything created so far is removed. A "
        "tenant that already exists is refused.",
    )
    create.add_argument("tenant_id", metavar="TENANT_ID")
    create.add_argument("--template", required=True, metavar="PATH", help="tenant template (TOML)")
    create.add_argument(
        "--access-token",
        metavar="TOKEN",
        default=os.environ.get("FLY_VAULT_ACCESS_TOKEN"),
        help="value of {{access_token}} (env FLY_VAULT_ACCESS_TOKEN)",
    )
    create.add_argument(
        "--var", action="append", default=[], metavar="KEY=VALUE", help="template variable"
    )
    create.add_argument(
        "--secret-var",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="template variable whose value is a secret: never printed or logged",
    )
    create.add_argument(
        "--dry-run", action="store_true", help="print the plan (secrets hidden); no API call"
    )
    create.add_argument("--wait-timeout-secs", type=finite_float, default=180.0, metavar="N")
    create.set_defaults(run=_lazy("flyvault.admin.commands", "run_create"))

    list_ = sub(
        "list",
        "list tenants and their machines",
        "A table per tenant (or per machine with --wide), or JSON. Secrets in machine "
        "configs are redacted.",
    )
    list_.add_argument("--tenant", metavar="ID", help="only this tenant")
    list_.add_argument("--wide", action="store_true", help="one row per machine")
    list_.add_argument("--json", action="store_true", help="JSON (wins over --wide)")
    list_.set_defaults(run=_lazy("flyvault.admin.commands", "run_list"))

    delete = sub(
        "delete",
        "stop and destroy a tenant's machines and volumes",
        "Print the plan, then cordon, stop and destroy the machines and delete their "
        "volumes. Asks for confirmation on a terminal; elsewhere --yes is required. Running "
        "it again after a partial failure finishes the job.",
    )
    delete.add_argument("tenant_id", metavar="TENANT_ID")
    delete.add_argument("--yes", action="store_true", help="do not ask")
    delete.add_argument("--wait-timeout-secs", type=finite_float, default=180.0, metavar="N")
    delete.set_defaults(run=_lazy("flyvault.admin.commands", "run_delete"))

    update = sub(
        "update-image",
        "roll a new image out to tenant machines (canary, batches, rollback)",
        "Canary first, then batches with at most one machine per tenant. Each machine is "
        "leased, cordoned, updated with its expected version, waited on, health-checked, "
        "soaked and uncordoned. On failure the updated machines go back to their previous "
        "image by digest. Interrupted rollouts resume when the same command runs again.",
    )
    update.add_argument("--image", required=True, metavar="IMG")
    update.add_argument("--tenant", action="append", default=[], metavar="ID", help="repeatable")
    update.add_argument("--all-tenants", action="store_true")
    update.add_argument("--concurrency", type=int, default=4, metavar="N")
    update.add_argument("--canary", type=int, default=1, metavar="N")
    update.add_argument("--soak-secs", type=finite_float, default=20.0, metavar="N")
    update.add_argument("--start-timeout-secs", type=finite_float, default=180.0, metavar="N")
    update.add_argument("--health-timeout-secs", type=finite_float, default=120.0, metavar="N")
    update.add_argument(
        "--lease-ttl-secs",
        type=int,
        default=120,
        metavar="N",
        help="lease TTL; the lease is refreshed every TTL/3 while a machine is worked on",
    )
    update.add_argument(
        "--poll-interval",
        type=finite_float,
        default=2.0,
        metavar="SECS",
        help="health/soak polling",
    )
    update.add_argument("--force", action="store_true", help="also update machines already on IMG")
    update.add_argument("--state-file", metavar="PATH", help="where progress is kept")
    update.add_argument("--restart", action="store_true", help="ignore a saved unfinished rollout")
    update.set_defaults(run=_lazy("flyvault.admin.rollout", "run_update_image"))

    usage = sub(
        "usage-facts",
        "print or serve usage facts for metering",
        "Print the usage facts (a flat JSON array, deleted machines included), or serve "
        "them over HTTP at GET /usage-facts and GET /healthz with --listen.",
    )
    usage.add_argument("--tenant", metavar="ID")
    usage.add_argument("--listen", metavar="ADDR", help="IP:port, e.g. 127.0.0.1:18083")
    usage.add_argument(
        "--bearer-token",
        metavar="TOKEN",
        default=os.environ.get("FLY_VAULT_USAGE_BEARER_TOKEN"),
        help="require Authorization: Bearer TOKEN (env FLY_VAULT_USAGE_BEARER_TOKEN); "
        "mandatory beyond loopback",
    )
    usage.set_defaults(run=_lazy("flyvault.admin.commands", "run_usage_facts"))
    parser.set_defaults(tenant_parser=tenant)
    return parser


def _lazy(module: str, attribute: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        function: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(module), attribute
        )
        return function(args)

    return run


def resolve_globals(args: argparse.Namespace) -> None:
    """Flags win over the environment; token and app are always required."""
    from flyvault.errors import UsageError

    args.api_token = args.api_token or os.environ.get("FLY_API_TOKEN") or None
    args.app = args.app or os.environ.get("FLY_APP") or None
    base = args.api_base or os.environ.get("FLY_API_BASE") or DEFAULT_API_BASE
    args.api_base = base.rstrip("/")
    if not args.api_token:
        raise UsageError(
            "missing api token (set --api-token or FLY_API_TOKEN)",
            hint="create one with `fly tokens create deploy -a APP` and export FLY_API_TOKEN",
        )
    if not args.app:
        raise UsageError(
            "missing app (set --app or FLY_APP)",
            hint="name the Fly app that holds the tenant machines",
        )
    if not args.api_base.startswith(("http://", "https://")):
        raise UsageError(
            f"invalid --api-base / FLY_API_BASE {args.api_base!r}: expected an http(s) URL"
        )


def _configure_logging(verbose: bool) -> None:
    import logging

    class _LowerLevelFormatter(logging.Formatter):
        # One warning format: "fly-vault-admin: warning: ...", as admin.output.warn prints.
        def format(self, record: logging.LogRecord) -> str:
            record.levelname = record.levelname.lower()
            return super().format(record)

    from flyvault.redact import ScrubFilter, scrub

    class _ScrubbedStderr(logging.Handler):
        # Looks up sys.stderr at each record (not at creation), and scrubs secrets.
        def emit(self, record: logging.LogRecord) -> None:
            try:
                sys.stderr.write(scrub(self.format(record)) + "\n")
            except Exception:
                self.handleError(record)

    # Ours, and the Machines API client's (its retries and leases) below flyvault.fly.
    for name in ("admin", "flyvault.fly"):
        root = logging.getLogger(name)
        root.setLevel(logging.INFO if verbose else logging.WARNING)
        if not any(isinstance(h, _ScrubbedStderr) or h.get_name() == PROG for h in root.handlers):
            handler = _ScrubbedStderr()
            handler.set_name(PROG)
            handler.setFormatter(_LowerLevelFormatter(f"{PROG}: %(levelname)s: %(message)s"))
            handler.addFilter(ScrubFilter())  # args, exceptions and extras too, first
            root.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.version:
        from flyvault import __version__

        print(f"{PROG} {__version__}")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "action", None) is None:
        args.tenant_parser.print_help(sys.stderr)
        return 2
    from flyvault.errors import VaultError
    from flyvault.redact import register as register_secret

    from .output import report_error

    _configure_logging(args.verbose)
    # Before the first request: an API answer may quote any of them (a 5xx or a 422 body).
    for variable in ("FLY_API_TOKEN", "FLY_VAULT_ACCESS_TOKEN", "FLY_VAULT_USAGE_BEARER_TOKEN"):
        register_secret(os.environ.get(variable))
    for option in ("access_token", "bearer_token"):
        register_secret(getattr(args, option, None))
    try:
        resolve_globals(args)
        register_secret(args.api_token)
        code: int = args.run(args)
        return code
    except VaultError as exc:
        report_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `fly-vault-admin tenant usage-facts | head`: the reader left; no traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def entry() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
