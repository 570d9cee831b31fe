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

DEFAULT_LISTEN = "[::]:8443"


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
        default=os.environ.get("VAULT_LISTEN", DEFAULT_LISTEN),
        help="UDP address to serve QUIC on, host:port or [v6]:port "
        "(env VAULT_LISTEN; default %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("VAULT_DATA_DIR", "/data")),
        help="the persistent volume (env VAULT_DATA_DIR; default %(default)s)",
    )
    parser.add_argument(
        "--fly-api-socket",
        default=os.environ.get("FLY_API_SOCKET", "/.fly/api"),
        help="unix socket of the Fly platform API used to mint OIDC tokens "
        "(env FLY_API_SOCKET; default %(default)s)",
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
        "--url-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="abandon a rootfs_url download after this long without data (default %(default)s)",
    )
    parser.add_argument(
        "--url-max-bytes",
        type=int,
        default=32 * 1024**3,
        metavar="BYTES",
        help="refuse rootfs_url downloads larger than this (default 32 GiB)",
    )
    parser.add_argument(
        "--session-buffer",
        type=int,
        default=int(os.environ.get("VAULT_SESSION_BUFFER", 1024 * 1024)),
        metavar="BYTES",
        help="output kept per exec session for replay (env VAULT_SESSION_BUFFER; "
        "default %(default)s)",
    )
    parser.add_argument(
        "--session-ttl",
        type=float,
        default=float(os.environ.get("VAULT_SESSION_TTL", 3600)),
        metavar="SECONDS",
        help="how long a finished named session stays listed (env VAULT_SESSION_TTL; "
        "default %(default)s)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=int(os.environ.get("VAULT_MAX_SESSIONS", 64)),
        help="sessions kept at once, running or finished (default %(default)s)",
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
        default=os.environ.get("VAULT_FIREWALL", "") in ("1", "true", "yes"),
        help="before listening, install a default-drop nftables input policy that leaves "
        "only the --listen UDP port open (needs root and nft; env VAULT_FIREWALL=1)",
    )
    parser.add_argument(
        "--firewall-allow-ssh",
        action="store_true",
        default=os.environ.get("VAULT_FIREWALL_ALLOW_SSH", "") in ("1", "true", "yes"),
        help="with --firewall, also open TCP 22; Fly SSH then gives a root shell without "
        "the access token (env VAULT_FIREWALL_ALLOW_SSH=1)",
    )
    parser.add_argument("--log-level", default=os.environ.get("VAULT_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", choices=("json", "text"), default="json")
    return parser


def main(argv: list[str] | None = None) -> int:
    from server.auth import reexec_without_token

    arguments = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.session_buffer < 128 * 1024:
        parser.error("--session-buffer must be at least 131072 bytes (128 KiB)")
    if args.max_sessions < 1:
        parser.error("--max-sessions must be at least 1")
    if args.access_token_fd is None and argv is None:
        reexec_without_token(arguments)
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    from flyvault.config import parse_address
    from flyvault.errors import VaultError

    try:
        host, port = parse_address(args.listen, allow_any_port=True)
    except VaultError as exc:
        print(f"fly-vault-init: --listen: {exc}", file=sys.stderr)
        return 2
    if args.firewall:
        # Before the socket exists, so the workload's ports are never reachable while init
        # starts. A failure is fatal: the operator asked for a firewall, and serving without
        # one would look protected while it is not.
        from server.firewall import apply_firewall

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
        print(f"fly-vault-init: {exc}", file=sys.stderr)
        return exc.exit_code


async def _serve(args: argparse.Namespace, host: str, port: int) -> int:
    from server.app import ServerOptions, VaultServer
    from server.attestation import FlyOidcAttestor
    from server.auth import AccessToken

    log = logging.getLogger("flyvault.server")
    if args.access_token_fd is not None:
        token = AccessToken.from_fd(args.access_token_fd)
    else:
        token = AccessToken.from_environment()
    if not token.configured:
        log.warning("ACCESS_TOKEN not set (or empty); every setup request will be refused")
    options = ServerOptions(
        listen_host=host,
        listen_port=port,
        data_dir=args.data_dir,
        host_mode=args.host_mode,
        init_binary=args.init_binary,
        session_buffer=args.session_buffer,
        url_read_timeout=args.url_timeout,
        url_max_bytes=args.url_max_bytes,
        session_ttl=args.session_ttl,
        max_sessions=args.max_sessions,
    )
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
        tmp.write_text(json.dumps({"host": bound_host, "port": bound_port, "pid": os.getpid()}))
        os.replace(tmp, args.ready_file)
    await stop.wait()
    log.info("shutting down")
    await server.shutdown()
    await attestor.aclose()
    return 0


def entry() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
