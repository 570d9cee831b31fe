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
from pydantic import BaseModel, ValidationError

from flyvault import __version__
from flyvault.errors import VaultError
from flyvault.redact import outgoing, register

from .defaults import BUFFER_BYTES, SPILL_BYTES
from .forwards import ForwardManager
from .hints import for_agent
from .jobs import JobRegistry
from .pool import VaultPool, error_text
from .sessions import ExecRegistry

log = logging.getLogger("mcp_server")

INSTRUCTIONS = """\
fly-vault runs commands on attested remote dev VMs ("vaults") named in the user's config.
- vault_status() first (no vault: the vault names and the local dev vault);
  vault_status(vault=...) checks one without changing it. No vault? local_vault(action="up") starts one on this machine.
- exec runs a command and waits up to wait_seconds (default 30, at most 600). stdout and
  stderr (max_output_bytes: 1 KiB to 1 MiB) come
  back apart, each bounded (head and tail around a marker naming the read_output call for
  the part left out). Still running: running=true and a session_id; follow with
  read_output (waits for exit; until="output" for any new output). Never poll in a loop.
- Offsets are the session's output bytes (both streams counted); next_offset is where to
  continue. Output this server follows is kept on disk past its memory (256 MiB a
  session), so an early offset reads back the head; dropped_bytes counts anything lost.
- Give every exec a context (why it runs); name long jobs with session_id. A session_id
  that exists with another command is refused.
- connect opens an interactive shell: send_input types, read_output reads plain text.
- Files: read_file/edit_file/write_file/list_dir; copy_files for big or binary files. Never
  cat a binary file through exec.
- Destructive tools (reprovision, tenant delete/update_image) act only with confirm=true:
  ask the user first.
"""

#: Said when the tenant tool is not offered (it needs a Fly API token).
NO_TENANT_TOOL = """\
- The tenant tool is hidden: FLY_API_TOKEN is not set in this server's environment.
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
    spill_bytes: int = SPILL_BYTES,
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
        execs=ExecRegistry(pool, buffer_bytes=buffer_bytes, spill_bytes=spill_bytes),
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


def _drop_null(node: dict[str, Any]) -> dict[str, Any]:
    """An optional argument whose default is null, as the type it takes when given."""
    node = {key: value for key, value in node.items() if not (key == "default" and value is None)}
    kind = node.get("type")
    if isinstance(kind, list) and "null" in kind:
        rest = [k for k in kind if k != "null"]
        node["type"] = rest[0] if len(rest) == 1 else rest
    options = node.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [option for option in options if option != {"type": "null"}]
        node.pop("anyOf")
        if len(rest) == 1:
            node.update(rest[0])
        else:
            node["anyOf"] = rest
    return node


def compact_input(schema: dict[str, Any]) -> dict[str, Any]:
    """The input schema without what tells an agent nothing: a ``null`` default and the
    ``null`` type of an optional argument (leaving it out means the same; the server still
    takes an explicit null), and a ``false`` default of a flag."""
    compacted = compact_schema(schema) or {}
    required = set(compacted.get("required", ()))
    properties = compacted.get("properties", {})
    for name, node in list(properties.items()):
        if name not in required and node.get("default", 0) is None:
            properties[name] = _drop_null(node)
        elif node.get("type") == "boolean" and node.get("default") is False:
            properties[name] = {k: v for k, v in node.items() if k != "default"}
    return compacted


def compact_output(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The output schema as the structure agents read: field names and types. Every field
    is always present, so ``required`` lists and defaults are left out."""
    compacted = compact_schema(schema)
    if compacted is None:
        return None

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("properties", "$defs"):  # names, not keywords
                out[key] = {name: walk(sub) for name, sub in value.items()}
            elif key not in ("required", "default"):
                out[key] = walk(value)
        return out

    result: dict[str, Any] = walk(compacted)
    return result


class VaultMCP(MCPServer[Any]):
    def __init__(self, state: State, instructions: str = INSTRUCTIONS) -> None:
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
            instructions=instructions,
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
                    "input_schema": compact_input(tool.input_schema),
                    "output_schema": compact_output(tool.output_schema),
                }
            )
            for tool in tools
        ]

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        self._refuse_unknown_arguments(name, arguments)
        try:
            result = await super().call_tool(name, arguments, context)
        except UnexpectedToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, VaultError):
                words = for_agent(error_text(cause), _vault_argument(arguments))
                raise ToolError(outgoing(f"{name} failed: {words}")) from None
            raise UnexpectedToolError(outgoing(str(exc))) from cause
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                raise ToolError(outgoing(invalid_arguments(name, exc.__cause__))) from None
            raise ToolError(outgoing(str(exc))) from None
        if isinstance(result, CallToolResult):
            return _scrubbed(result)
        return result

    def _refuse_unknown_arguments(self, name: str, arguments: dict[str, Any]) -> None:
        """An argument the tool does not have is an error, not silently dropped (a typo
        such as ``wait_secs`` would otherwise change nothing and say nothing)."""
        tool = self._tool_manager.get_tool(name)
        if tool is None or not isinstance(arguments, dict):
            return  # the SDK reports an unknown tool
        known = set(tool.parameters.get("properties", {}))
        unknown = sorted(set(arguments) - known)
        if unknown:
            raise ToolError(
                f"{name}: invalid arguments: "
                + "; ".join(f"{key} is not an argument of {name}" for key in unknown)
                + f"\nhint: its arguments are {', '.join(sorted(known))}"
            )


def _scrubbed(result: CallToolResult) -> CallToolResult:
    """``result`` with every secret this process knows scrubbed from its text and data, and
    every string valid UTF-8 (a file name that is not would stop the server: the SDK's
    writer cannot encode it, and that ends the process with every session in it)."""
    content = [
        block.model_copy(update={"text": outgoing(block.text)})
        if isinstance(block, TextContent)
        else block
        for block in result.content
    ]
    structured = result.structured_content
    if structured is not None:
        structured = outgoing(structured)
    return result.model_copy(update={"content": content, "structured_content": structured})


def _vault_argument(arguments: dict[str, Any]) -> str | None:
    vault = arguments.get("vault") if isinstance(arguments, dict) else None
    return vault if isinstance(vault, str) else None


def invalid_arguments(tool: str, error: ValidationError) -> str:
    """A validation error in words: each bad argument, what it must be, what it was (the
    SDK's text is pydantic's, with a documentation link an agent cannot use)."""
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "the arguments"
        message = item["msg"]
        message = message[0].lower() + message[1:] if message else "is not valid"
        if item["type"] == "missing":
            problems.append(f"{where} is required")
        elif item["loc"] and item["loc"][0] in _UNSHOWN:
            problems.append(f"{where}: {message}")  # its value may be a secret: not echoed
        else:
            problems.append(f"{where}: {message} (got {_short(item.get('input'))})")
    return (
        f"{tool}: invalid arguments: "
        + "; ".join(problems)
        + f"\nhint: call {tool} again with them fixed (its input schema in tools/list "
        "gives each type)"
    )


#: Arguments whose values are never echoed in an error: environment values, input and file
#: contents may carry secrets the scrubber does not know.
_UNSHOWN = frozenset({"env", "stdin", "text", "content", "old_string", "new_string"})


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def structured(model: BaseModel, text: str | None = None) -> CallToolResult:
    """A result with both forms: ``text`` for the model (compact JSON by default)."""
    data = model.model_dump(mode="json")
    if text is None:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)


def build_server(state: State | None = None, *, tenant_tool: bool | None = None) -> VaultMCP:
    """The server with its tools; the tenant tool only when the environment has the Fly API
    token it needs (unusable tools cost every agent session context for nothing), unless
    ``tenant_tool`` says otherwise."""
    import os

    from .tools_admin import admin_tools, tenant_tools
    from .tools_deploy import deploy_tools
    from .tools_files import file_tools
    from .tools_vault import vault_tools

    state = state or make_state()
    tenants = bool(os.environ.get("FLY_API_TOKEN")) if tenant_tool is None else tenant_tool
    server = VaultMCP(state, instructions=INSTRUCTIONS + ("" if tenants else NO_TENANT_TOOL))
    registries = [
        vault_tools,
        file_tools,
        admin_tools,
        deploy_tools,
    ]  # tools/list shows them in this order
    if tenants:
        registries.append(tenant_tools)
    for registry in registries:
        registry.register_all(server, state)
    return server
