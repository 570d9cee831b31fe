"""``vault-proxy``: one public UDP endpoint in front of a fleet of tenant machines.

Clients prefix every QUIC datagram with the machine id they want (``proxy.wire``); the proxy
relays it to that machine's private address and the replies back (``proxy.relay``). Machine
addresses come from the Machines API (``proxy.discovery``). See references/proxy.md.

Flags keep the original's names and defaults (``--port``, ``--backend-port``,
``--refresh-interval-secs``, ``--session-timeout-secs``; env ``FLY_APP``, ``FLY_API_TOKEN``,
``FLY_ORG``); the rest is new: the bind host, the API base, limits, the allowlist, the wake
rate, the status endpoint. The API token is read from the environment only, never from a
flag, so it does not show in the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from flyvault.envvars import (
    LOG_LEVELS,
    env_choice,
    env_int,
    env_text,
    env_url,
    finite_float,
    log_level,
)
from flyvault.errors import UsageError

log = logging.getLogger("vault-proxy")

DEFAULT_API_BASE = "https://api.machines.dev"
#: On Fly, UDP must be bound to this name so replies leave from the public address.
DEFAULT_BIND = "fly-global-services"
_FD_RESERVE = 64  # descriptors kept for the front socket, the API client, the status server
DEFAULT_PORT = 8443
DEFAULT_STATUS = "127.0.0.1:9090"


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vault-proxy",
        description="UDP multiplexer: routes prefixed QUIC datagrams to fly-vault tenant "
        "machines by machine id. Env: FLY_APP (tenant app), FLY_API_TOKEN (required).",
    )
    p.add_argument(
        "--bind",
        help="host to bind the public UDP socket to (env VAULT_PROXY_BIND; default "
        f"{DEFAULT_BIND}, which is right on Fly; use 0.0.0.0 or :: elsewhere)",
    )
    p.add_argument(
        "--port",
        type=int,
        help=f"public UDP port (env VAULT_PROXY_PORT; default {DEFAULT_PORT}; 0 = any)",
    )
    p.add_argument(
        "--backend-port", type=int, default=8443, help="UDP port of init on each machine"
    )
    p.add_argument(
        "--app",
        default=os.environ.get("FLY_APP"),
        help="the tenant app whose machines are routed to (env FLY_APP)",
    )
    p.add_argument(
        "--api-base",
        help=f"Machines API base URL (env FLY_API_BASE; default {DEFAULT_API_BASE})",
    )
    p.add_argument("--refresh-interval-secs", type=finite_float, default=15.0)
    p.add_argument(
        "--min-refresh-interval-secs",
        type=finite_float,
        default=1.0,
        help="floor between two refreshes, also those triggered by unknown ids",
    )
    p.add_argument("--session-timeout-secs", type=finite_float, default=120.0)
    p.add_argument("--max-sessions", type=int, default=4096)
    p.add_argument("--max-sessions-per-ip", type=int, default=64)
    p.add_argument("--max-id-length", type=int, default=64, help="bytes (default 64)")
    p.add_argument(
        "--cid-length",
        type=int,
        default=8,
        help="length of the connection ids the machines issue (aioquic: 8)",
    )
    p.add_argument(
        "--allow-machine",
        action="append",
        default=_env_list("VAULT_PROXY_ALLOW_MACHINES"),
        metavar="ID",
        help="route only these machines (repeatable; env VAULT_PROXY_ALLOW_MACHINES, "
        "comma separated); with --allow-tenant, either may match",
    )
    p.add_argument(
        "--allow-tenant",
        action="append",
        default=_env_list("VAULT_PROXY_ALLOW_TENANTS"),
        metavar="TENANT",
        help="route only machines of these tenants (repeatable; env VAULT_PROXY_ALLOW_TENANTS)",
    )
    p.add_argument(
        "--wake-interval-secs",
        type=finite_float,
        default=60.0,
        help="start a stopped machine at most once per this period (default %(default)s)",
    )
    p.add_argument("--no-wake", action="store_true", help="never start stopped machines")
    p.add_argument(
        "--status",
        help="loopback HOST:PORT for GET /healthz, or 'off' (env VAULT_PROXY_STATUS; "
        f"default {DEFAULT_STATUS})",
    )
    p.add_argument("--ready-file", type=Path, help="write the bound ports as JSON here")
    p.add_argument(
        "--log-level",
        type=log_level,
        help=f"one of {', '.join(LOG_LEVELS)} (env VAULT_PROXY_LOG_LEVEL; default info)",
    )
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    p.add_argument(
        "--summary-interval-secs",
        type=finite_float,
        default=60.0,
        help="log the counters this often when they changed (0 = never)",
    )
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("port", "backend_port"):
        value, lowest = getattr(args, name), 0 if name == "port" else 1
        if value is not None and not lowest <= value <= 65535:
            p.error(f"--{name.replace('_', '-')} {value} is out of range {lowest}-65535")
    for name in ("refresh_interval_secs", "session_timeout_secs", "wake_interval_secs"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.min_refresh_interval_secs < 0:
        p.error("--min-refresh-interval-secs must not be negative")
    for name in ("max_sessions", "max_sessions_per_ip", "max_id_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.cid_length <= 20:
        p.error("--cid-length must be 0-20")
    if args.summary_interval_secs < 0:
        p.error("--summary-interval-secs must not be negative (0 = never)")
    if args.api_base is not None and not args.api_base.startswith(("http://", "https://")):
        p.error(f"--api-base {args.api_base!r}: expected an http(s) URL")
    if args.ready_file is not None and not args.ready_file.parent.is_dir():
        p.error(f"--ready-file {args.ready_file}: no such directory {args.ready_file.parent}")


def _apply_environment(args: argparse.Namespace) -> str:
    """Fill what no flag gave from the environment, else the defaults.

    Returns the source of the status address (``--status`` or ``VAULT_PROXY_STATUS``) for its
    error messages. A bad variable raises ``UsageError`` naming it.
    """
    if args.bind is None:
        args.bind = env_text("VAULT_PROXY_BIND") or DEFAULT_BIND
    if args.port is None:
        args.port = env_int("VAULT_PROXY_PORT", DEFAULT_PORT, minimum=0, maximum=65535)
    if args.api_base is None:
        args.api_base = env_url("FLY_API_BASE", DEFAULT_API_BASE)
    status_from = "--status"
    if args.status is None:
        text = env_text("VAULT_PROXY_STATUS")
        status_from = "--status" if text is None else "VAULT_PROXY_STATUS"
        args.status = text or DEFAULT_STATUS
    if args.log_level is None:
        args.log_level = env_choice("VAULT_PROXY_LOG_LEVEL", "info", LOG_LEVELS)
    return status_from


def _raise_fd_limit(wanted: int) -> int:
    """Lift the soft descriptor limit towards the hard one; return what sessions may use."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + _FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < target:
        new = target if hard == resource.RLIM_INFINITY else min(target, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - _FD_RESERVE))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    try:
        status_from = _apply_environment(args)
    except UsageError as exc:
        print(f"vault-proxy: {exc.message}", file=sys.stderr)
        print(f"vault-proxy: hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    from .status import configure_logging

    configure_logging(args.log_level, args.log_format)
    # The original's messages, kept for scripts that look for them.
    if not args.app:
        print("vault-proxy: FLY_APP env var required", file=sys.stderr)
        return 2
    token = os.environ.get("FLY_API_TOKEN", "").strip()
    if not token:
        print("vault-proxy: FLY_API_TOKEN env var required", file=sys.stderr)
        return 2
    status_host: str | None = None
    status_port = 0
    if args.status != "off":
        from flyvault.config_values import parse_address
        from flyvault.errors import VaultError

        from .status import is_loopback

        try:
            status_host, status_port = parse_address(args.status, allow_any_port=True)
        except VaultError as exc:
            print(f"vault-proxy: {status_from}: {exc.message}", file=sys.stderr)
            return 2
        if not is_loopback(status_host):
            print(
                f"vault-proxy: {status_from} must be a loopback address (127.0.0.1, ::1), "
                f"not {status_host}: the status page names machines and client addresses",
                file=sys.stderr,
            )
            return 2
    try:
        return asyncio.run(_serve(args, token, status_host, status_port))
    except KeyboardInterrupt:
        return 130


async def _serve(
    args: argparse.Namespace, token: str, status_host: str | None, status_port: int
) -> int:
    from flyvault.fly.machines import MachinesClient, RetryPolicy, Timeouts

    from .discovery import Directory, DirectoryOptions
    from .relay import Relay, RelayOptions
    from .status import StatusServer

    max_sessions = _raise_fd_limit(args.max_sessions)
    if max_sessions < args.max_sessions:
        log.warning(
            "session limit lowered to fit the file descriptor limit",
            extra={"event": "limit_lowered", "max_sessions": max_sessions},
        )
    api = MachinesClient(
        base_url=args.api_base,
        app=args.app,
        token=token,
        # A proxy must not hang on the API: short timeouts, few retries; the poller retries.
        retry=RetryPolicy(attempts=2, base_delay=0.25, max_delay=2.0),
        timeouts=Timeouts(connect=5.0, read=15.0, write=10.0, pool=5.0, wait_grace=5.0),
    )
    directory = Directory(
        api,
        DirectoryOptions(
            backend_port=args.backend_port,
            refresh_interval=args.refresh_interval_secs,
            min_refresh_interval=args.min_refresh_interval_secs,
            allow_machines=frozenset(args.allow_machine),
            allow_tenants=frozenset(args.allow_tenant),
            wake=not args.no_wake,
            wake_interval=args.wake_interval_secs,
        ),
    )
    relay = Relay(
        directory,
        RelayOptions(
            bind_host=args.bind,
            port=args.port,
            session_timeout=args.session_timeout_secs,
            max_sessions=max_sessions,
            max_sessions_per_ip=args.max_sessions_per_ip,
            max_id_bytes=args.max_id_length,
            cid_length=args.cid_length,
        ),
    )
    started = time.monotonic()
    log.info(
        "starting",
        extra={
            "event": "start",
            "app": args.app,
            "org": os.environ.get("FLY_ORG", ""),
            "api_base": args.api_base,
            "backend_port": args.backend_port,
            "allow_machines": sorted(args.allow_machine),
            "allow_tenants": sorted(args.allow_tenant),
            "wake": not args.no_wake,
        },
    )
    # As the original: one refresh first (a failure is logged, the maps stay empty), then bind.
    await directory.refresh()
    try:
        host, port = await relay.start()
    except OSError as exc:
        hint = " (outside Fly use --bind 0.0.0.0 or --bind ::)" if args.bind == DEFAULT_BIND else ""
        print(
            f"vault-proxy: cannot bind frontend socket {args.bind}:{args.port}: "
            f"{exc.strerror or exc}{hint}",
            file=sys.stderr,
        )
        await api.aclose()
        return 1

    def report() -> dict[str, Any]:
        return {
            "uptime_secs": round(time.monotonic() - started, 1),
            "app": args.app,
            "listen": f"{host}:{port}",
            **relay.snapshot(),
            "machines": directory.snapshot(),
        }

    def healthy() -> bool:
        last = directory.stats.last_success_at
        return last is not None and time.monotonic() - last < 4 * args.refresh_interval_secs + 30

    status: StatusServer | None = None
    bound_status: tuple[str, int] | None = None
    if status_host is not None:
        status = StatusServer(status_host, status_port, report, healthy)
        try:
            bound_status = await status.start()
        except OSError as exc:
            print(
                f"vault-proxy: cannot bind status endpoint: {exc.strerror or exc}", file=sys.stderr
            )
            relay.close()
            await api.aclose()
            return 1
    log.info(
        "listening",
        extra={
            "event": "listening",
            "listen": f"{host}:{port}",
            "status": f"{bound_status[0]}:{bound_status[1]}" if bound_status else "off",
        },
    )
    # Signal handlers before the ready file: whoever waits for that file may signal at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready_file:
        tmp = args.ready_file.with_suffix(".tmp")
        ready = {
            "host": host,
            "port": port,
            "status_port": bound_status[1] if bound_status else None,
            "pid": os.getpid(),
        }
        try:
            tmp.write_text(json.dumps(ready))
            os.replace(tmp, args.ready_file)
        except OSError as exc:
            print(
                f"vault-proxy: cannot write --ready-file {args.ready_file}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            relay.close()
            await directory.close()
            if status is not None:
                await status.close()
            await api.aclose()
            return 2

    tasks = [loop.create_task(directory.run(), name="poller")]
    if args.summary_interval_secs > 0:
        tasks.append(loop.create_task(_summaries(relay, args.summary_interval_secs)))
    stopper = loop.create_task(stop.wait())
    # If a loop ever ends (it should not), the process ends too, as with the original.
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception() is not None:
            log.error("a proxy loop failed", exc_info=task.exception(), extra={"event": "crash"})
            code = 1
    log.info("shutting down", extra={"event": "stop", **relay.counters.as_json()})
    for task in [stopper, *tasks]:
        task.cancel()
    relay.close()
    await directory.close()
    if status is not None:
        await status.close()
    await api.aclose()
    return code


async def _summaries(relay: Any, interval: float) -> None:
    last: tuple[int, ...] = ()
    while True:
        await asyncio.sleep(interval)
        c = relay.counters
        now = (c.received, c.relayed_to_clients, c.sessions_created, relay.sessions)
        if now != last:
            last = now
            log.info("counters", extra={"event": "summary", **relay.snapshot()})


if __name__ == "__main__":
    raise SystemExit(main())
