"""``fly-vault-mcp`` as a real process: over stdio (the SDK's subprocess client) and over
streamable HTTP on loopback with the bearer token, against a real init process.

These catch what in-process tests cannot: stdout pollution of the stdio wire, argument
parsing, the JSON-RPC cancellation path, HTTP authentication and shutdown.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import run_async
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_support import SECRETS, Session, repo_root, text, vault, wait_for_path

__all__ = ["vault"]

BEARER = "mcp-bearer-CANARY-5f1e9a7c3b2d4e60"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def test_stdio_subprocess_exec_progress_and_cancel(vault: str, tmp_path: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "flyvault.mcp_server.main"], env=_env(), cwd=repo_root()
    )
    progress: list[Any] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    async def main() -> None:
        async with Client(params) as client:
            s = Session(client)
            names = {tool.name for tool in (await client.list_tools()).tools}
            assert {"exec", "read_output", "connect", "forward", "local_vault"} <= names
            # No FLY_API_TOKEN in the server's environment: no tenant tool to offer.
            assert "tenant" not in names
            result = await s.data("exec", {"vault": vault, "command": "echo over stdio"})
            assert result["stdout"] == "over stdio\n" and result["exit_code"] == 0
            slow = await s.data(
                "exec",
                {"vault": vault, "command": "sleep 3; echo done", "wait_seconds": 30},
                progress=on_progress,
            )
            assert slow["stdout"] == "done\n"
            assert progress and all("running" in (m or "") for _, m in progress)
            # Cancelling over JSON-RPC (notifications/cancelled) stops the remote command:
            # cancelled once it runs, not after a fixed time it may not have started in.
            running = tmp_path / "running"

            async def call() -> None:
                await client.call_tool(
                    "exec",
                    {
                        "vault": vault,
                        "command": f"touch {shlex.quote(str(running))}; sleep 60",
                        "session_id": "stdio-cancel",
                    },
                )

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(call)
                await wait_for_path(running)
                tasks.cancel_scope.cancel()
            ended = await s.data(
                "read_output", {"vault": vault, "session_id": "stdio-cancel", "wait_seconds": 30}
            )
            assert ended["signal"] == 15

    run_async(main(), 90)


@pytest.fixture
def http_server(vault: str) -> Iterator[str]:
    SECRETS.append(BEARER)
    process = subprocess.Popen(
        [sys.executable, "-m", "flyvault.mcp_server.main", "--http", "127.0.0.1:0"],
        env=_env(FLY_VAULT_MCP_TOKEN=BEARER),
        cwd=repo_root(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 30
        url = None
        lines = []
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                url = match.group(1)
        assert url is not None, "".join(lines)
        assert BEARER not in "".join(lines)
        yield url
    finally:
        process.terminate()
        try:
            out, err = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        SECRETS.remove(BEARER)
        assert BEARER not in out + err
        assert out == ""  # nothing on stdout in HTTP mode either


def test_http_needs_the_bearer_token(http_server: str, vault: str) -> None:
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"accept": "application/json, text/event-stream"}
    for auth in (None, "Bearer wrong-token-0123456789abcdef", f"Basic {BEARER}"):
        sent = dict(headers, **({"authorization": auth} if auth else {}))
        response = httpx.post(http_server, json=request, headers=sent, timeout=10)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert BEARER not in response.text

    async def main() -> None:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        http = httpx2.AsyncClient(headers={"authorization": f"Bearer {BEARER}"}, timeout=30)
        async with http, Client(streamable_http_client(http_server, http_client=http)) as client:
            s = Session(client)
            listing = await s.data("vault_status")
            assert [v["name"] for v in listing["vaults"]] == [vault]
            first = await s.data(
                "exec",
                {"vault": vault, "command": "echo a; sleep 2; echo b", "wait_seconds": 0.5},
            )
            assert first["running"] is True  # "sleep 2" outlasts the 0.5 s wait, surely
            rest = await s.data(
                "read_output",
                {"vault": vault, "session_id": first["session_id"], "wait_seconds": 30},
            )
            # "a" may or may not have arrived within those 0.5 s on a loaded machine.
            assert first["stdout"] + rest["stdout"] == "a\nb\n" and rest["exit_code"] == 0
            bad = await s.call("exec", {"vault": "missing", "command": "true"}, ok=False)
            assert "vault missing not found" in text(bad)

    run_async(main(), 60)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--http", "0.0.0.0:8765"], {"FLY_VAULT_MCP_TOKEN": BEARER}, "non-loopback"),
        (["--http", "192.168.1.10:8765"], {"FLY_VAULT_MCP_TOKEN": BEARER}, "non-loopback"),
        (["--http", "127.0.0.1:8765"], {}, "needs a bearer token"),
        (["--http", "127.0.0.1:8765"], {"FLY_VAULT_MCP_TOKEN": "short"}, "shorter than"),
        (["--http", "nonsense"], {"FLY_VAULT_MCP_TOKEN": BEARER}, "invalid address"),
    ],
)
def test_http_refuses_unsafe_setups(args: list[str], env: dict[str, str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flyvault.mcp_server.main", *args],
        env=_env(**env),
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stdout == ""
    assert BEARER not in result.stderr


def test_token_file_and_version(tmp_path: Any) -> None:
    version = subprocess.run(
        [sys.executable, "-m", "flyvault.mcp_server.main", "--version"],
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert version.returncode == 0 and version.stdout.startswith("fly-vault-mcp ")
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "flyvault.mcp_server.main",
            "--http",
            "127.0.0.1:0",
            "--token-file",
            str(tmp_path / "nope"),
        ],
        env=_env(),
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "--token-file" in missing.stderr
