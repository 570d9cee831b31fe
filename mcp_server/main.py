"""``fly-vault-mcp``: the fly-vault MCP server, on stdio (default) or loopback HTTP.

    fly-vault-mcp                                   # stdio, for agent clients
    FLY_VAULT_MCP_TOKEN=... fly-vault-mcp --http 127.0.0.1:8765
    fly-vault-mcp --http 127.0.0.1:8765 --token-file ~/.config/fly-vault/mcp-token
    fly-vault-mcp --share-keeper                    # one connection per vault with the CLI

Logs go to stderr only (stdout is the protocol on stdio), never with a secret in them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .defaults import BUFFER_MIB, SPILL_MIB

MIB = 1024 * 1024

PROG = "fly-vault-mcp"


def build_parser() -> argparse.ArgumentParser:
    from .http import DEFAULT_TOKEN_ENV

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="MCP server for fly-vault: exec, sessions, forwards, provisioning and "
        "tenant admin as tools for coding agents. Speaks MCP on stdio unless --http is given.",
        epilog="Tools and their results: references/mcp-tools.md. Environment for the tenant "
        "tools: FLY_API_TOKEN, FLY_APP, FLY_API_BASE, FLY_VAULT_ACCESS_TOKEN.",
    )
    parser.add_argument(
        "--http",
        metavar="ADDR",
        help="serve streamable HTTP at http://ADDR/mcp instead of stdio; loopback only "
        "(e.g. 127.0.0.1:8765; port 0 picks one); needs a bearer token",
    )
    parser.add_argument(
        "--token-env",
        default=DEFAULT_TOKEN_ENV,
        metavar="NAME",
        help="environment variable holding the HTTP bearer token (default %(default)s)",
    )
    parser.add_argument(
        "--token-file", metavar="PATH", help="read the HTTP bearer token from this file instead"
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="fly-vault config file (default: $FLY_VAULT_CONFIG or ~/.config/fly-vault/config.toml)",
    )
    parser.add_argument(
        "--buffer-mib",
        type=int,
        default=BUFFER_MIB,
        metavar="N",
        help="output kept in memory per exec session in this process (default %(default)s MiB)",
    )
    parser.add_argument(
        "--spill-mib",
        type=int,
        default=SPILL_MIB,
        metavar="N",
        help="older output of a session kept on disk (an unlinked temporary file), so the "
        "head of a large output is read back by offset (default %(default)s MiB; 0: none)",
    )
    parser.add_argument(
        "--share-keeper",
        action="store_true",
        help="reach each vault through its connection keeper (the one fly-vault CLI calls "
        "use; started if none runs), so this server and the CLI hold one connection per vault "
        "instead of two; without it the server keeps its own and skips the relay hop",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr at INFO")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        from flyvault import __version__

        print(f"{PROG} {__version__}")
        return 0
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"{PROG}: %(levelname)s: %(message)s",
    )
    from flyvault.redact import install_log_filter

    install_log_filter()  # every record the root handler writes is scrubbed of secrets
    from flyvault.errors import VaultError

    try:
        from flyvault.errors import UsageError

        if args.config:
            config = Path(args.config).expanduser()
            if config.is_dir():
                raise UsageError(
                    f"--config {config} is a directory, not a config file",
                    hint=f"give the config file's path, e.g. {config / 'config.toml'}",
                )
            # Everything (local_vault included) must agree on the file.
            os.environ["FLY_VAULT_CONFIG"] = str(config)
        if args.buffer_mib < 1:
            raise UsageError("--buffer-mib must be at least 1")
        if args.spill_mib < 0:
            raise UsageError(
                "--spill-mib cannot be negative", hint="0 keeps no output on disk (memory only)"
            )
        from flyvault.client.environment import check_environment

        check_environment()  # bad variables refused at start, not at every tool call
        if args.share_keeper:
            from flyvault.client.keeper_start import mux_mode

            mux_mode()  # a bad FLY_VAULT_MUX too
        return _run(args)
    except VaultError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"{PROG}: hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    import anyio

    from .server import build_server, make_state

    if args.http is None:
        state = make_state(
            buffer_bytes=args.buffer_mib * MIB,
            spill_bytes=args.spill_mib * MIB,
            share_keeper=args.share_keeper,
        )
        server = build_server(state)
        server.run()
        return 0
    from .http import load_token, parse_loopback, serve

    host, port = parse_loopback(args.http)
    token = load_token(args.token_file, args.token_env)
    state = make_state(
        buffer_bytes=args.buffer_mib * MIB,
        spill_bytes=args.spill_mib * MIB,
        extra_secrets=(token,),
        share_keeper=args.share_keeper,
    )
    server = build_server(state)
    anyio.run(serve, server, host, port, token)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
