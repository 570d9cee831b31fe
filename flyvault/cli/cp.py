"""``fly-vault cp``: scp's syntax over the attested channel (``flyvault.client.copy_engine``).

Everything that can be checked here is checked before connecting (exit 2 for usage): the
endpoints, a directory without ``-r``, a missing local file, the ``--user`` name and the
config entries of the vaults named.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from typing import Any

from flyvault.errors import NotFoundError, UsageError

#: A user name as the workload's /etc/passwd could hold it (checked again on the vault).
USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")


def run(args: argparse.Namespace) -> int:
    from flyvault.client import check_endpoints, parse_endpoint
    from flyvault.config import load_vault

    if len(args.paths) < 2:
        raise UsageError("cp needs a SRC and a DST", hint="fly-vault cp [-r] SRC... DST")
    endpoints = [parse_endpoint(path) for path in args.paths]
    sources, dest = endpoints[:-1], endpoints[-1]
    check_endpoints(sources, dest, recursive=args.recursive)
    if args.user is not None and not USER_RE.fullmatch(args.user):
        raise UsageError(f"--user {args.user!r} is not a user name")
    if args.json and dest.stdio:
        raise UsageError("--json prints to standard output, which '-' as DST already uses")
    for source in sources:
        if source.vault is None and not source.stdio:
            _check_local_source(source.path, args.recursive)
    names = {endpoint.vault for endpoint in endpoints if endpoint.vault}
    configs = {name: load_vault(name) for name in sorted(names)}  # config errors: exit 3
    from flyvault.cli.mux import keeper_socket

    # Looked up before the event loop: the lookup (and a keeper's start) is synchronous.
    keepers = {name: keeper_socket(args, name) for name in configs}
    from flyvault.heap import reuse_freed_buffers

    reuse_freed_buffers()  # this process only (a keeper is spawned and exec'd: glibc's own)
    return asyncio.run(_copy(args, sources, dest, configs, keepers))


def _check_local_source(path: str, recursive: bool) -> None:
    if not os.path.lexists(path):
        raise NotFoundError(f"{path}: no such file or directory (ENOENT)")
    if os.path.isdir(path) and not recursive:
        raise UsageError(
            f"{path} is a directory: copying a directory needs -r",
            hint=f"fly-vault cp -r {path} ...",
        )


async def _copy(
    args: argparse.Namespace,
    sources: Any,
    dest: Any,
    configs: dict[str, Any],
    keepers: dict[str, Any],
) -> int:
    from flyvault.cli.console import Console
    from flyvault.cli.progress import CopyProgressBar
    from flyvault.client import Vault, copy

    console = Console()
    opened: dict[str, Any] = {}

    def vault(name: str) -> Any:
        if name not in opened:
            opened[name] = Vault(
                configs[name],
                reconnect_timeout=args.reconnect_timeout,
                on_notice=console.notice,
                on_event=console.event,
                keeper=keepers.get(name),
            )
        return opened[name]

    bar = CopyProgressBar()
    try:
        summary = await copy(
            vault,
            sources,
            dest,
            recursive=args.recursive,
            preserve=args.preserve,
            follow_symlinks=args.follow_symlinks,
            user=args.user,
            on_progress=bar,
        )
    finally:
        bar.close()
        for handle in opened.values():
            await handle.close()
    for skipped in summary.skipped:
        console.notice(f"not copied: {skipped}")
    if args.json:
        record = {
            "files": summary.files,
            "dirs": summary.dirs,
            "symlinks": summary.symlinks,
            "bytes": summary.bytes,
            "seconds": round(summary.seconds, 3),
            "resumed_bytes": summary.resumed_bytes,
            "verified": summary.verified,
            "skipped": list(summary.skipped),
        }
        print(json.dumps(record))
    sys.stdout.flush()
    return 0
