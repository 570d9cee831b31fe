"""Shared pieces of the MCP server tests (no tests here).

``Session`` wraps an ``mcp.Client`` and checks EVERY result it sees, success or error, for
every secret the test knows (the vault access tokens, the Fly API token, the tenant access
token, the HTTP bearer token): each tool call of every MCP test is a secrecy test too.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, InitProcess, vault_entry

from flyvault.standins import OidcIssuer

#: Secrets every MCP test scans for; tests add the ones they create (local vault, bearer).
SECRETS: list[str] = [TOKEN]


def known_secrets() -> list[str]:
    from admin_support import SECRETS as ADMIN_SECRETS

    values = [*SECRETS, *ADMIN_SECRETS]
    try:
        from flyvault.config import load_config

        for entry in load_config(missing_ok=True).vaults.values():
            if entry.access_token is not None:
                values.append(entry.access_token.get_secret_value())
    except Exception:
        pass
    return [v for v in values if v]


def assert_no_secret(text: str) -> None:
    for secret in known_secrets():
        assert secret not in text, "a secret leaked into an MCP result"


@dataclass
class Session:
    """An MCP client session that records and scans every result."""

    client: Any
    results: list[Any] = field(default_factory=list)

    async def call(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        *,
        ok: bool | None = True,
        progress: Callable[..., Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        result = await self.client.call_tool(
            name, arguments or {}, progress_callback=progress, read_timeout_seconds=timeout
        )
        self.results.append(result)
        assert_no_secret(json.dumps(result.model_dump(mode="json")))
        if ok is True:
            assert not result.is_error, f"{name} failed: {text(result)}"
        elif ok is False:
            assert result.is_error, f"{name} unexpectedly succeeded: {text(result)}"
        return result

    async def data(self, name: str, arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
        """The structured result of a successful call."""
        result = await self.call(name, arguments, **kw)
        assert result.structured_content is not None
        return result.structured_content


def text(result: Any) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


def configure_vault(init: InitProcess, issuer: OidcIssuer, name: str = "t", **extra: Any) -> str:
    from flyvault.config import save_vault

    save_vault(vault_entry(init.port, issuer, name=name, **extra))
    return name


@pytest.fixture
def vault(init_process: InitProcess, issuer: OidcIssuer) -> str:
    return configure_vault(init_process, issuer)


@pytest.fixture
def mcp_server() -> Iterator[Any]:
    from flyvault.mcp_server.server import build_server

    yield build_server()


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


# The vault of these tests runs in host mode: its commands see the test's files. A command can
# so wait for the test ("gate") or tell it where it is, instead of both guessing with sleeps.


def gate(path: Path) -> str:
    """Shell that waits (bounded, 60 s) until the test creates ``path``."""
    flag = shlex.quote(str(path))
    return f"i=0; while [ ! -e {flag} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done"


async def wait_for_path(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        await asyncio.sleep(0.02)
