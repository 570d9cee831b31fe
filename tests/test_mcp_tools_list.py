"""What an agent pays for on every session: the MCP server's tools/list.

The card's tool names, a title and all four hints on every tool (a client assumes the worst
of a hint left unset), and the whole listing within 10,000 characters as it goes over the
wire from the real ``fly-vault-mcp`` process, with and without the tenant tool (shown only
when the server has a Fly API token). Validation errors and hints are worded for an agent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from conftest import run_async
from mcp import Client
from mcp_support import Session, mcp_server, text

from flyvault.mcp_server.hints import for_agent
from flyvault.mcp_server.server import compact_input, compact_output

__all__ = ["mcp_server"]

#: The design card's tools, by its names ("list-exec" as an MCP name).
CARD = {"connect", "exec", "list_exec", "reprovision", "forward", "tenant"}
BUDGET = 10_000

DESTRUCTIVE = {
    "connect",
    "exec",
    "send_input",
    "signal",
    "write_file",
    "edit_file",
    "copy_files",
    "reprovision",
    "local_vault",
    "tenant",
    "deploy",
}
READ_ONLY = {"vault_status", "read_output", "list_exec", "read_file", "list_dir", "job_status"}


def wire_listing(with_api_token: bool) -> tuple[str, dict[str, Any]]:
    """The raw tools/list response line of a real ``fly-vault-mcp`` over stdio."""
    env = {k: v for k, v in os.environ.items() if k != "FLY_API_TOKEN"}
    if with_api_token:
        env["FLY_API_TOKEN"] = "fo1_listing-test-token-0123456789"
    server = subprocess.Popen(
        [sys.executable, "-m", "flyvault.mcp_server.main"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdin is not None and server.stdout is not None
        hello = {"protocolVersion": "2025-06-18", "capabilities": {}}
        hello["clientInfo"] = {"name": "listing-test", "version": "1"}
        for message in (
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}},
        ):
            server.stdin.write(json.dumps(message) + "\n")
        server.stdin.flush()
        initialized = json.loads(server.stdout.readline())
        line = server.stdout.readline()
        response = json.loads(line)
        assert response["id"] == 2, line[:200]
        # The tools as listed, without the envelope the SDK adds (which varies with the
        # protocol version: _meta, ttlMs, ...): what this project controls and agents load.
        tools = {"tools": response["result"]["tools"]}
        return json.dumps(tools, separators=(",", ":")), initialized["result"]
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.parametrize("with_api_token", [False, True], ids=["default", "with-api-token"])
def test_tools_list_fits_the_budget_and_carries_the_card_names(with_api_token: bool) -> None:
    listing, initialized = wire_listing(with_api_token)
    tools = {tool["name"]: tool for tool in json.loads(listing)["tools"]}
    assert len(listing) <= BUDGET, f"tools/list is {len(listing)} characters"
    expected = CARD if with_api_token else CARD - {"tenant"}
    assert expected <= set(tools), sorted(tools)
    instructions = initialized["instructions"]
    if not with_api_token:
        assert "tenant" not in tools and "FLY_API_TOKEN is not set" in instructions
    for name, tool in tools.items():
        assert tool.get("title"), name
        hints = tool["annotations"]
        assert set(hints) >= {"readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint"}
        assert hints["destructiveHint"] == (name in DESTRUCTIVE), name
        assert hints["readOnlyHint"] == (name in READ_ONLY), name
        assert "VAULT" not in tool["description"], name
        assert '"title"' not in json.dumps(tool["inputSchema"]), name
    assert tools["exec"]["inputSchema"]["required"] == ["vault"]
    assert tools["exec"]["inputSchema"]["properties"]["wait_seconds"]["default"] == 30.0
    exec_out = tools["exec"]["outputSchema"]["properties"]
    assert {"stdout", "stderr", "exit_code", "signal", "running", "next_offset"} <= set(exec_out)


def test_compact_schemas_drop_only_what_says_nothing() -> None:
    schema = {
        "type": "object",
        "properties": {
            "vault": {"type": "string"},
            "cwd": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            "tty": {"type": "boolean", "default": False},
            "wait": {"type": "number", "default": 30.0},
        },
        "required": ["vault"],
    }
    assert compact_input(schema)["properties"] == {
        "vault": {"type": "string"},
        "cwd": {"type": "string"},
        "tty": {"type": "boolean"},
        "wait": {"type": "number", "default": 30.0},
    }
    output = {
        "type": "object",
        "properties": {
            "required": {"type": "boolean"},
            "code": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
        },
        "required": ["required", "code"],
    }
    assert compact_output(output) == {
        "type": "object",
        "properties": {"required": {"type": "boolean"}, "code": {"type": ["integer", "null"]}},
    }


def test_hints_name_tools_for_an_agent() -> None:
    assert (
        for_agent("the local dev vault is not running: start it with fly-vault local up", "local")
        == 'the local dev vault is not running: start it with local_vault(action="up")'
    )
    assert for_agent("is the vault running? (fly-vault doctor VAULT)", "dev") == (
        'is the vault running? (vault_status(vault="dev", fresh=true))'
    )
    assert for_agent("check the vault with: fly-vault doctor prod", None) == (
        'check the vault with: vault_status(vault="prod", fresh=true)'
    )
    assert for_agent("list the vault's sessions with: fly-vault list-exec VAULT", "v") == (
        'list the vault\'s sessions with: list_exec(vault="v")'
    )
    assert for_agent("use `tenant update-image` to change it, or `tenant delete` first", "t") == (
        'use tenant(action="update_image") to change it, or tenant(action="delete") first'
    )
    assert for_agent("run `fly-vault-admin tenant delete acme --yes` again", "acme") == (
        'run tenant(action="delete", tenant_id="acme", confirm=true) again'
    )
    assert for_agent("nothing to rewrite", "v") == "nothing to rewrite"


def test_bad_arguments_are_explained_in_words(mcp_server: Any) -> None:
    async def scenario(s: Session) -> None:
        bad = await s.call("exec", {"vault": "v", "command": "true", "tty": "maybe"}, ok=False)
        words = text(bad)
        assert "tty" in words and "boolean" in words and "'maybe'" not in words, words
        assert "pydantic" not in words and "errors.pydantic.dev" not in words, words
        missing = await s.call("read_output", {"vault": "v"}, ok=False)
        assert "session_id is required" in text(missing), text(missing)
        wrong = await s.call("forward", {"action": "open"}, ok=False)
        assert "action" in text(wrong) and '"open"' in text(wrong), text(wrong)
        typo = await s.call("exec", {"vault": "v", "command": "true", "wait_secs": 3}, ok=False)
        assert "wait_secs is not an argument of exec" in text(typo), text(typo)
        assert "wait_seconds" in text(typo)  # the hint lists the real ones

    async def main() -> None:
        async with Client(mcp_server) as client:
            await scenario(Session(client))

    run_async(main(), 60)
