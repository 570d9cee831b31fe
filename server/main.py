"""``fly-vault-init``: command line of the server that runs inside the Fly Machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from flyvault.envvars import (
    LOG_LEVELS,
    env_choice,
    env_flag,
    env_float,
    env_int,
    env_text,
    finite_float,
    log_level,
    number,
)
from flyvault.errors import UsageError

from .defaults import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_SESSION_BUFFER,
    DEFAULT_SESSION_LOG_HEAD,
    DEFAULT_SESSION_LOG_TAIL,
    DEFAULT_SESSION_LOG_TOTAL,
    DEFAULT_SESSION_TTL,
    MIN_SESSION_BUFFER,
    SETTLE_SECONDS,
    URL_MAX_BYTES,
    URL_READ_TIMEOUT,
)

DEFAULT_LISTEN = "[::]:8443"
DEFAULT_DATA_DIR = "/data"
DEFAULT_FLY_API_SOCKET = "/.fly/api"
#: argparse type of --cpu-max (and the check of VAULT_CPU_MAX).
CPU_LIMIT = number(float, minimum=0.01, maximum=4096, unit="CPUs")
#: Init's own OOM score in vm mode: the kernel's OOM killer picks the workload first.
INIT_OOM_SCORE_ADJ = -900


def _memory_size(text: str) -> int:
    """An argparse ``type=`` for --memory-max: 512M, 2G... at least 4 MiB."""
    from .cgroups import parse_bytes

    try:
        value = parse_bytes(text)
    except ValueError:
        value = 0
    if value < 4 * 1024 * 1024:
        raise argparse.ArgumentTypeError(
            f"expected a size of at least 4M (e.g. 512M, 2G), got {text!r}"
        )
    return value


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fly-vault-init",
        description="fly-vault init server: attested QUIC access to this machine.",
    )
    parser.add_argument(
        "--listen",
        help="UDP address to serve QUIC on, host:port or [v6]:port "
        f"(env VAULT_LISTEN; default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"the persistent volume (env VAULT_DATA_DIR; default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--fly-api-socket",
        help="unix socket of the Fly platform API used to mint OIDC tokens "
        f"(env FLY_API_SOCKET; default {DEFAULT_FLY_API_SOCKET})",
    )
    parser.add_argument(
        "--host-mode",
        action="store_true",
        help="run commands directly on this host as the current user, without a rootfs "
        "or namespaces (the local dev vault); reported to clients in the attestation",
    )
    parser.add_argument(
        "--init-binary",
        default="/sbin/init",
        help="the workload's init inside the rootfs (default %(default)s; without one a "
        "minimal reaper holds the namespace)",
    )
    parser.add_argument(
        "--hostname",
        metavar="NAME",
        help="the workload's hostname, in its own UTS namespace (vm mode; env VAULT_HOSTNAME; "
        "default FLY_APP_NAME, else fly-vault)",
    )
    parser.add_argument(
        "--memory-max",
        type=_memory_size,
        metavar="SIZE",
        help="vm mode: the workload's memory limit, e.g. 2G, sessions included (its cgroup's "
        "memory.max; env VAULT_MEMORY_MAX; default none)",
    )
    parser.add_argument(
        "--cpu-max",
        type=CPU_LIMIT,
        metavar="CPUS",
        help="vm mode: the workload's CPU limit in CPUs, e.g. 1.5 (its cgroup's cpu.max; "
        "env VAULT_CPU_MAX; default none)",
    )
    parser.add_argument(
        "--url-timeout",
        type=finite_float,
        default=URL_READ_TIMEOUT,
        metavar="SECONDS",
        help="abandon a rootfs_url download after this long without data (default %(default)s)",
    )
    parser.add_argument(
        "--settle-seconds",
        type=finite_float,
        default=SETTLE_SECONDS,
        metavar="SECONDS",
        help="a (re)provisioned workload that dies within this long of its start is rolled "
        "back; the client is answered once it is up, before the window ends "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--url-max-bytes",
        type=int,
        default=URL_MAX_BYTES,
        metavar="BYTES",
        help="refuse rootfs_url downloads larger than this (default 32 GiB)",
    )
    parser.add_argument(
        "--session-buffer",
        type=int,
        metavar="BYTES",
        help="output kept per exec session for replay (env VAULT_SESSION_BUFFER; "
        f"default {DEFAULT_SESSION_BUFFER})",
    )
    parser.add_argument(
        "--session-log-head",
        type=int,
        metavar="BYTES",
        help="the first output of each named session kept on disk whole, readable after the "
        f"buffer moved on (env VAULT_SESSION_LOG_HEAD; default {DEFAULT_SESSION_LOG_HEAD}; 0: none)",
    )
    parser.add_argument(
        "--session-log-tail",
        type=int,
        metavar="BYTES",
        help="the newest output of each named session kept on disk, in segments (env "
        f"VAULT_SESSION_LOG_TAIL; default {DEFAULT_SESSION_LOG_TAIL}; 0: none)",
    )
    parser.add_argument(
        "--session-log-total",
        type=int,
        metavar="BYTES",
        help="all named sessions' logs on disk together; past it (or with under 256 MiB "
        "free on the volume) a log rotates its tail without growing, or stops (env "
        f"VAULT_SESSION_LOG_TOTAL; default {DEFAULT_SESSION_LOG_TOTAL})",
    )
    parser.add_argument(
        "--session-ttl",
        type=finite_float,
        metavar="SECONDS",
        help="how long a finished named session stays listed (env VAULT_SESSION_TTL; "
        f"default {DEFAULT_SESSION_TTL:g})",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        help="sessions kept at once, running or finished (env VAULT_MAX_SESSIONS; "
        f"default {DEFAULT_MAX_SESSIONS})",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="write the bound address as JSON to this file once listening",
    )
    parser.add_argument(
        "--access-token-fd",
        type=int,
        help=argparse.SUPPRESS,  # internal: the token moved off the environment (see auth)
    )
    parser.add_argument(
        "--firewall",
        action="store_true",
        help="before listening, install a default-drop nftables input policy that leaves "
        "only the --listen UDP port open (needs root and nft; env VAULT_FIREWALL=1)",
    )
    parser.add_argument(
        "--firewall-allow-ssh",
        action="store_true",
        help="with --firewall, also open TCP 22; Fly SSH then gives a root shell without "
        "the access token (env VAULT_FIREWALL_ALLOW_SSH=1)",
    )
    parser.add_argument(
        "--log-level",
        type=log_level,
        help=f"one of {', '.join(LOG_LEVELS)} (env VAULT_LOG_LEVEL; default info)",
    )
    parser.add_argument("--log-format", choices=("json", "text"), default="json")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .auth import reexec_without_token

    arguments = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.session_buffer is not None and args.session_buffer < MIN_SESSION_BUFFER:
        parser.error("--session-buffer must be at least 131072 bytes (128 KiB)")
    for name in ("session_log_head", "session_log_tail", "session_log_total"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative (0: none on disk)")
    if args.max_sessions is not None and args.max_sessions < 1:
        parser.error("--max-sessions must be at least 1")
    if args.session_ttl is not None and args.session_ttl < 0:
        parser.error("--session-ttl must not be negative")
    if args.url_timeout <= 0:
        parser.error("--url-timeout must be greater than 0")
    if args.url_max_bytes < 1:
        parser.error("--url-max-bytes must be at least 1")
    if args.settle_seconds < 0:
        parser.error("--settle-seconds must not be negative")
    if args.ready_file is not None and not args.ready_file.parent.is_dir():
        parser.error(f"--ready-file {args.ready_file}: no such directory {args.ready_file.parent}")
    try:
        listen_from = _apply_environment(args)
    except UsageError as exc:
        return _report(exc)
    if args.access_token_fd is None and argv is None:
        reexec_without_token(arguments)
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    __import__("flyvault.redact").redact.install_log_filter()  # no secret in any log line
    from flyvault.config_values import parse_address
    from flyvault.errors import VaultError
    from flyvault.transport.endpoint import forced_datagram_size
    from flyvault.transport.pmtu import discovery_enabled

    try:
        host, port = parse_address(args.listen, allow_any_port=True)
    except VaultError as exc:
        print(f"fly-vault-init: {listen_from}: {exc}", file=sys.stderr)
        return 2
    try:
        forced_datagram_size()  # FLY_VAULT_DATAGRAM_SIZE: refuse a bad value before starting
        discovery_enabled()  # FLY_VAULT_PMTU too
    except VaultError as exc:
        return _report(exc)
    if args.firewall:
        # Before the socket exists, so the workload's ports are never reachable while init
        # starts. A failure is fatal: the operator asked for a firewall, and serving without
        # one would look protected while it is not.
        from .firewall import apply_firewall

        try:
            apply_firewall(port, allow_ssh=args.firewall_allow_ssh)
        except VaultError as exc:
            print(f"fly-vault-init: {exc}", file=sys.stderr)
            if exc.hint:
                print(f"fly-vault-init: hint: {exc.hint}", file=sys.stderr)
            return exc.exit_code
        logging.getLogger("flyvault.server").info(
            "firewall applied: input policy drop, UDP %d open, TCP 22 %s",
            port,
            "open" if args.firewall_allow_ssh else "closed",
        )
    try:
        return asyncio.run(_serve(args, host, port))
    except VaultError as exc:
        return _report(exc)


def _report(exc: Exception) -> int:
    """Print a ``VaultError`` (message, then its hint) the way init does; its exit code."""
    print(f"fly-vault-init: {exc}", file=sys.stderr)
    hint = getattr(exc, "hint", None)
    if hint:
        print(f"fly-vault-init: hint: {hint}", file=sys.stderr)
    return int(getattr(exc, "exit_code", 1))


def _apply_environment(args: argparse.Namespace) -> str:
    """Fill what no flag gave from the environment, else the defaults.

    Returns the source of the listen address (``--listen`` or ``VAULT_LISTEN``) for its error
    message. A bad variable raises ``UsageError`` naming it.
    """
    listen_from = "--listen"
    if args.listen is None:
        text = env_text("VAULT_LISTEN")
        listen_from = "--listen" if text is None else "VAULT_LISTEN"
        args.listen = text or DEFAULT_LISTEN
    data_from = f"--data-dir {args.data_dir}"
    if args.data_dir is None:
        text = env_text("VAULT_DATA_DIR")
        data_from = f"--data-dir {DEFAULT_DATA_DIR}" if text is None else f"VAULT_DATA_DIR={text}"
        args.data_dir = Path(text or DEFAULT_DATA_DIR)
    if args.data_dir.exists() and not args.data_dir.is_dir():
        raise UsageError(
            f"{data_from} is not a directory",
            hint="give the mount point of the persistent volume (default /data)",
        )
    if args.fly_api_socket is None:
        args.fly_api_socket = env_text("FLY_API_SOCKET") or DEFAULT_FLY_API_SOCKET
    if args.session_buffer is None:
        args.session_buffer = env_int(
            "VAULT_SESSION_BUFFER", DEFAULT_SESSION_BUFFER, minimum=MIN_SESSION_BUFFER, unit="bytes"
        )
    if args.session_log_head is None:
        args.session_log_head = env_int(
            "VAULT_SESSION_LOG_HEAD", DEFAULT_SESSION_LOG_HEAD, minimum=0, unit="bytes"
        )
    if args.session_log_tail is None:
        args.session_log_tail = env_int(
            "VAULT_SESSION_LOG_TAIL", DEFAULT_SESSION_LOG_TAIL, minimum=0, unit="bytes"
        )
    if args.session_log_total is None:
        args.session_log_total = env_int(
            "VAULT_SESSION_LOG_TOTAL", DEFAULT_SESSION_LOG_TOTAL, minimum=0, unit="bytes"
        )
    if args.session_ttl is None:
        args.session_ttl = env_float(
            "VAULT_SESSION_TTL", DEFAULT_SESSION_TTL, minimum=0, unit="seconds"
        )
    if args.max_sessions is None:
        args.max_sessions = env_int("VAULT_MAX_SESSIONS", DEFAULT_MAX_SESSIONS, minimum=1)
    args.firewall = args.firewall or env_flag("VAULT_FIREWALL")
    args.firewall_allow_ssh = args.firewall_allow_ssh or env_flag("VAULT_FIREWALL_ALLOW_SSH")
    if args.log_level is None:
        args.log_level = env_choice("VAULT_LOG_LEVEL", "info", LOG_LEVELS)
    if args.hostname is None:
        args.hostname = env_text("VAULT_HOSTNAME") or env_text("FLY_APP_NAME")
    if args.memory_max is None and (text := env_text("VAULT_MEMORY_MAX")) is not None:
        try:
            args.memory_max = _memory_size(text)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(
                f"VAULT_MEMORY_MAX={text!r} is not valid: {exc}",
                hint="unset VAULT_MEMORY_MAX for no limit, or set e.g. VAULT_MEMORY_MAX=2G",
            ) from None
    if args.cpu_max is None and (text := env_text("VAULT_CPU_MAX")) is not None:
        try:
            args.cpu_max = CPU_LIMIT(text)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(
                f"VAULT_CPU_MAX={text!r} is not valid: {exc}",
                hint="unset VAULT_CPU_MAX for no limit, or set e.g. VAULT_CPU_MAX=1.5",
            ) from None
    return listen_from


async def _serve(args: argparse.Namespace, host: str, port: int) -> int:
    from .app import ServerOptions, VaultServer
    from .attestation import FlyOidcAttestor
    from .auth import AccessToken
    from .session_disk import DiskLogLimits

    log = logging.getLogger("flyvault.server")
    if args.access_token_fd is not None:
        try:
            token = AccessToken.from_fd(args.access_token_fd)
        except OSError as exc:
            raise UsageError(
                f"--access-token-fd {args.access_token_fd}: {exc.strerror or exc}",
                hint="the flag is internal: start fly-vault-init without it, with "
                "ACCESS_TOKEN in the environment",
            ) from None
    else:
        token = AccessToken.from_environment()
    if not token.configured:
        log.warning("ACCESS_TOKEN not set (or empty); every setup request will be refused")
    elif token.warning:
        log.warning("%s", token.warning)
    options = ServerOptions(
        listen_host=host,
        listen_port=port,
        data_dir=args.data_dir,
        host_mode=args.host_mode,
        init_binary=args.init_binary,
        session_buffer=args.session_buffer,
        session_log=DiskLogLimits(
            args.session_log_head, args.session_log_tail, args.session_log_total
        ),
        url_read_timeout=args.url_timeout,
        url_max_bytes=args.url_max_bytes,
        settle_seconds=args.settle_seconds,
        session_ttl=args.session_ttl,
        max_sessions=args.max_sessions,
        hostname=args.hostname,
        memory_max=args.memory_max,
        cpu_max=args.cpu_max,
    )
    if not args.host_mode:
        _lower_oom_score(log)
    attestor = FlyOidcAttestor(args.fly_api_socket)
    server = VaultServer(options, token, attestor)
    listener = await server.start()
    bound_host, bound_port = listener.address
    log.info(
        "listening on %s:%d (data dir %s, %s)",
        bound_host,
        bound_port,
        args.data_dir,
        "host mode" if args.host_mode else "vm mode",
    )
    # Handlers first: whoever waits on the ready file may signal us at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready_file:
        tmp = args.ready_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"host": bound_host, "port": bound_port, "pid": os.getpid()}))
            os.replace(tmp, args.ready_file)
        except OSError as exc:
            await server.shutdown()
            await attestor.aclose()
            raise UsageError(
                f"cannot write --ready-file {args.ready_file}: {exc.strerror or exc}",
                hint="give a path in a writable directory",
            ) from None
    await stop.wait()
    log.info("shutting down")
    await server.shutdown()
    await attestor.aclose()
    return 0


def _lower_oom_score(log: logging.Logger) -> None:
    """An out-of-memory machine kills the workload's processes before init (which would
    take every session and the workload down with it). The workload starts from the default
    score again (``server.nsinit``)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as score:
            score.write(str(INIT_OOM_SCORE_ADJ))
    except OSError as exc:
        log.debug("cannot lower init's OOM score: %s", exc)


def entry() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
