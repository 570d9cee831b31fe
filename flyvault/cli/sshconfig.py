"""``fly-vault ssh-config VAULT``: a ``Host`` block for ~/.ssh/config whose ``ProxyCommand``
is ``fly-vault forward --stdio``, so ssh, scp, rsync, git and VS Code Remote-SSH reach the
vault's sshd through the attested channel, unchanged.

The block names fly-vault by its absolute path: IDEs start ssh with a PATH of their own,
where a virtual environment's ``fly-vault`` is rarely found. Nothing connects here.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from flyvault.errors import UsageError

#: ssh_config tokens: keep names that need no quoting and are not host patterns.
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_USER = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}")


def run(args: argparse.Namespace) -> int:
    alias = args.host_alias or args.vault
    if not args.host_alias and not _ALIAS.fullmatch(alias):
        raise UsageError(
            f"vault name {alias!r} cannot be an ssh Host alias (1-128 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit)",
            hint=f"name the alias: fly-vault ssh-config {args.vault} --host-alias NAME",
        )
    if not _ALIAS.fullmatch(alias):
        raise UsageError(
            f"invalid --host-alias {alias!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            hint="the alias is the name you type after ssh (e.g. --host-alias dev-vault)",
        )
    if not _USER.fullmatch(args.user):
        raise UsageError(
            f"invalid --user {args.user!r}: use letters, digits, '.', '_' or '-'",
            hint="the login name on the vault's sshd, e.g. root",
        )
    from flyvault.config import load_config

    config = load_config()
    if args.vault not in config.vaults:
        known = ", ".join(sorted(config.vaults)) or "none"
        raise UsageError(
            f"vault {args.vault} not found in {config.path}",
            hint=f"configured vaults: {known}",
        )
    sys.stdout.write(host_block(args.vault, alias, args.user, args.port, fly_vault_command()))
    return 0


def host_block(vault: str, alias: str, user: str, port: int, command: list[str]) -> str:
    # %p: ssh puts the block's Port there, so `ssh -p 2222 ALIAS` reaches the vault's 2222.
    proxy = " ".join(shlex.quote(word) for word in [*command, "forward", "--stdio", vault])
    proxy = proxy.replace("%", "%%") + " localhost:%p"
    return "\n".join(
        [
            f"# fly-vault: ssh to vault '{vault}' through its attested channel",
            f"# (the vault runs an sshd on port {port}; add this block to ~/.ssh/config)",
            f"Host {alias}",
            f"  HostName {alias}",
            # The vault's host key is remembered under a name of its own, never confused
            # with a machine that happens to be called like the alias.
            f"  HostKeyAlias fly-vault.{vault}",
            f"  User {user}",
            f"  Port {port}",
            f"  ProxyCommand {proxy}",
            "",
        ]
    )


def fly_vault_command() -> list[str]:
    """How ssh must start this fly-vault, as absolute words (plus the config's place when
    FLY_VAULT_CONFIG or XDG_CONFIG_HOME chose it: ssh started by an IDE will not have
    those variables)."""
    here = Path(sys.executable).parent / "fly-vault"
    invoked = Path(sys.argv[0])
    if invoked.name == "fly-vault" and invoked.exists():
        command = [str(invoked.resolve())]
    elif here.exists():
        command = [str(here)]
    else:  # run as `python -m flyvault.cli.main` outside an environment with the script
        command = [sys.executable, "-m", "flyvault.cli.main"]
    # The config found through XDG_CONFIG_HOME is pinned too: an IDE's ssh has neither.
    if os.environ.get("FLY_VAULT_CONFIG") or os.environ.get("XDG_CONFIG_HOME"):
        from flyvault import paths

        command = ["env", f"FLY_VAULT_CONFIG={paths.config_file().resolve()}", *command]
    return command
