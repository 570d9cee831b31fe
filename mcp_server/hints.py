"""Error hints in the caller's terms: MCP tool calls for an agent, not CLI commands.

The client layer words its hints for a person at a shell ("check with: fly-vault doctor
VAULT", "start it with fly-vault local up"). An agent cannot run those; it can call the
tool that does the same. ``for_agent`` rewrites every CLI command the client's hints use
into that call, filling in the vault the failed call named instead of a literal ``VAULT``
placeholder. A hint naming a command with no tool equivalent is left as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: ``(pattern, replacement)``: the replacement gets the match and the call's vault name.
_Rewrite = tuple[re.Pattern[str], Callable[[re.Match[str], str], str]]


def _vault(match: re.Match[str], vault: str, group: int = 1) -> str:
    named = match.group(group) if match.lastindex and match.lastindex >= group else None
    if not named or named in ("VAULT", "{vault}"):
        return vault
    return named


_REWRITES: list[_Rewrite] = [
    (
        re.compile(r"fly-vault local up --rootfs (\S+)"),
        lambda m, v: f'local_vault(action="up", rootfs="{m.group(1)}")',
    ),
    (re.compile(r"fly-vault local up"), lambda m, v: 'local_vault(action="up")'),
    (re.compile(r"fly-vault local down"), lambda m, v: 'local_vault(action="down")'),
    (re.compile(r"fly-vault local status"), lambda m, v: "vault_status()"),
    (
        re.compile(r"fly-vault doctor(?: (-\S+ )*([\w.-]+|VAULT))?"),
        lambda m, v: f'vault_status(vault="{_vault(m, v, 2)}", fresh=true)',
    ),
    (
        re.compile(r"fly-vault list-exec(?: ([\w.-]+|VAULT))?"),
        lambda m, v: f'list_exec(vault="{_vault(m, v)}")',
    ),
    (
        re.compile(r"fly-vault exec (?:[\w.-]+|VAULT) --session (\S+)"),
        lambda m, v: f'read_output(vault="{v}", session_id="{m.group(1)}")',
    ),
    (
        re.compile(r"fly-vault kill (?:[\w.-]+|VAULT) (\S+)"),
        lambda m, v: f'signal(vault="{v}", session_id="{m.group(1)}")',
    ),
    (
        re.compile(r"fly-vault reprovision(?: ([\w.-]+|VAULT))?"),
        # Without confirm: the tool then says what it would do, for the user to agree.
        lambda m, v: f'reprovision(vault="{_vault(m, v)}")',
    ),
    # fly-vault-admin's, in the tenant tool's jobs (the "vault" there is the job's target).
    (
        re.compile(r"`?fly-vault-admin tenant delete ([\w.-]+) --yes`?"),
        lambda m, v: f'tenant(action="delete", tenant_id="{m.group(1)}", confirm=true)',
    ),
    (re.compile(r"`tenant update-image`"), lambda m, v: 'tenant(action="update_image")'),
    (re.compile(r"`tenant delete`"), lambda m, v: 'tenant(action="delete")'),
]


def for_agent(text: str, vault: str | None) -> str:
    """``text`` with the CLI commands it suggests as the MCP calls that do the same."""
    name = vault or "VAULT"
    for pattern, replace in _REWRITES:
        text = pattern.sub(lambda match, r=replace: r(match, name), text)  # type: ignore[misc]
    return text


__all__ = ["for_agent"]
