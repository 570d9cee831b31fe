"""The fly-vault MCP server: shared state, the ``MCPServer`` subclass, result helpers.

Two things happen for every tool call, in ``VaultMCP.call_tool``:

- a ``VaultError`` escaping a tool becomes a tool error with the CLI's wording (message,
  then ``hint: ...``) instead of the SDK's opaque "Error executing tool";
- every result and every error text is scrubbed of every secret this process knows (the
  access tokens of all configured vaults, the Fly API token, the tenant access token, the
  HTTP bearer token: all registered with ``flyvault.redact``, the one scrubber of every
  package). Nothing should contain one in the first place; this is the net.

``list_tools`` drops the ``title`` keys pydantic puts on every schema property: they repeat
the property name and cost the agent context on every session.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp_types import CallToolResult, TextContent
from mcp_types import Tool as MCPTool
from pydantic import BaseModel

from flyvault import __version__
from flyvault.errors import VaultError
from flyvault.redact import register, scrub, scrub_value

from .defaults import BUFFER_BYTES
from .forwards import ForwardManager
from .jobs import JobRegistry
from .pool import VaultPool, error_text
from .sessions import ExecRegistry

log = logging.getLogger("mcp_server")

INSTRUCTIONS = """\
fly-vault runs commands on attested remote dev VMs ("vaults") named in the user's config.
- list_vaults first; vault_status checks one (attestation, Ready/Cold) without changing it.
- exec runs a command and waits up to wait_seconds (default 30). If it is still running you
  get running=true, a session_id and next_offset: continue with read_output, which waits for
  exit (or new output with until="output"). Never poll in a tight loop.
- Output is bounded (default 32 KiB): the head and tail are kept and a marker says which
  offsets were left out and the read_output call that reads them.
- exit_code/signal/exit_status, timed_out and byte counts are always in the result.
- Give every exec a context (why it runs); name long jobs with session_id.
- Files: read_file/edit_file/write_file/list_dir; copy_files for big or binary files. Never
  cat a binary file through exec (it comes back mangled).
- Destructive tools (reprovision, tenant_delete, tenant_update_image, local_vault_down) act
  only with confirm=true or change real state: ask the user first.
- No vault configured? local_vault_up starts one on this machine.
"""


@dataclass
class State:
    pool: VaultPool
    execs: ExecRegistry
    forwards: ForwardManager
    jobs: JobRegistry
    default_wait: float = 30.0
    default_max_output: int = 32 * 1024

    async def close(self) -> None:
        await self.forwards.close()
        await self.execs.close()
        await self.pool.close()


def make_state(
    *,
    config_path: Path | None = None,
    buffer_bytes: int = BUFFER_BYTES,
    extra_secrets: tuple[str, ...] = (),
    share_keeper: bool = False,
) -> State:
    for value in extra_secrets:
        register(value)
    import os

    for variable in ("FLY_API_TOKEN", "FLY_VAULT_ACCESS_TOKEN", "FLY_VAULT_USAGE_BEARER_TOKEN"):
        register(os.environ.get(variable))
    pool = VaultPool(config_path=config_path, share_keeper=share_keeper)
    return State(
        pool=pool,
        execs=ExecRegistry(pool, buffer_bytes=buffer_bytes),
        forwards=ForwardManager(pool),
        jobs=JobRegistry(),
    )


def _strip_property_titles(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """Drop ``title`` keys that are schema annotations, never a property named "title"."""
    if schema is None:
        return None

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                if key == "title" and isinstance(value, str):
                    continue
                if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                    out[key] = {name: walk(sub) for name, sub in value.items()}
                else:
                    out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    result: dict[str, Any] = walk(schema)
    return result


def _compact_nullable(node: Any) -> Any:
    """``{"anyOf": [{"type": T}, {"type": "null"}]}`` -> ``{"type": [T, "null"]}``: the
    same schema in a third of the bytes (pydantic writes every ``X | None`` the long way)."""
    if isinstance(node, list):
        return [_compact_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _compact_nullable(value) for key, value in node.items()}
    options = node.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
        other = options[0] if options[1] == {"type": "null"} else options[1]
        if isinstance(other, dict) and set(other) == {"type"} and isinstance(other["type"], str):
            node.pop("anyOf")
            node["type"] = [other["type"], "null"]
    return node


def compact_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    if schema is None:
        return None
    result: dict[str, Any] = _compact_nullable(_strip_property_titles(schema))
    return result


class VaultMCP(MCPServer[Any]):
    def __init__(self, state: State) -> None:
        @asynccontextmanager
        async def lifespan(_: MCPServer[Any]) -> AsyncIterator[None]:
            try:
                yield
            finally:
                await state.close()

        super().__init__(
            "fly-vault",
            title="fly-vault",
            description="Attested remote dev VMs on Fly.io: exec, sessions, files, forwards, "
            "provisioning, tenant admin",
            instructions=INSTRUCTIONS,
            version=__version__,
            lifespan=lifespan,
            log_level="WARNING",
        )
        self.state = state

    async def list_tools(self) -> list[MCPTool]:
        tools = await super().list_tools()
        return [
            tool.model_copy(
                update={
                    "input_schema": compact_schema(tool.input_schema),
                    "output_schema": compact_schema(tool.output_schema),
                }
            )
            for tool in tools
        ]

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            result = await super().call_tool(name, arguments, context)
        except UnexpectedToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, VaultError):
                raise ToolError(scrub(f"{name} failed: {error_text(cause)}")) from None
            raise UnexpectedToolError(scrub(str(exc))) from cause
        except ToolError as exc:
            raise ToolError(scrub(str(exc))) from None
        if isinstance(result, CallToolResult):
            content = [
                block.model_copy(update={"text": scrub(block.text)})
                if isinstance(block, TextContent)
                else block
                for block in result.content
            ]
            structured = result.structured_content
            if structured is not None:
                structured = scrub_value(structured)
            result = result.model_copy(
                update={"content": content, "structured_content": structured}
            )
        return result


def structured(model: BaseModel, text: str | None = None) -> CallToolResult:
    """A result with both forms: ``text`` for the model (compact JSON by default)."""
    data = model.model_dump(mode="json")
    if text is None:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)


def build_server(state: State | None = None) -> VaultMCP:
    from .tools_admin import admin_tools
    from .tools_files import file_tools
    from .tools_vault import vault_tools

    state = state or make_state()
    server = VaultMCP(state)
    for registry in (vault_tools, file_tools, admin_tools):  # tools/list shows them in this order
        registry.register_all(server, state)
    return server
