"""The MCP tool registry: one function per tool, bound to the server's state."""

from __future__ import annotations

import inspect
import os
from typing import Any

import pytest

from flyvault.mcp_server.registry import ToolRegistry, bind


def test_tools_are_listed_in_definition_order_without_the_state_parameter() -> None:
    from flyvault.mcp_server.server import build_server, make_state
    from flyvault.mcp_server.tools_admin import admin_tools, tenant_tools
    from flyvault.mcp_server.tools_deploy import deploy_tools
    from flyvault.mcp_server.tools_files import file_tools
    from flyvault.mcp_server.tools_vault import vault_tools

    server = build_server(make_state())
    registries = [vault_tools, file_tools, admin_tools, deploy_tools]
    names = [spec.name for registry in registries for spec in registry.specs]
    if os.environ.get("FLY_API_TOKEN"):
        names += [spec.name for spec in tenant_tools.specs]
    assert names[:3] == ["vault_status", "connect", "exec"]
    tools = server._tool_manager.list_tools()
    assert [tool.name for tool in tools] == names
    for tool in tools:
        assert "state" not in tool.parameters.get("properties", {}), tool.name


def test_bind_fills_in_the_state_and_keeps_the_rest_of_the_signature() -> None:
    async def handler(state: dict[str, int], vault: str, count: int = 2) -> int:
        """Doc."""
        return state["base"] + count

    bound = bind(handler, {"base": 40}, "answer")  # type: ignore[arg-type]
    assert bound.__name__ == "answer" and bound.__doc__ == "Doc."
    assert list(inspect.signature(bound).parameters) == ["vault", "count"]
    assert bound.__annotations__ == {"vault": str, "count": int, "return": int}

    import asyncio

    assert asyncio.run(bound("v")) == 42


def test_a_tool_name_is_registered_once() -> None:
    registry = ToolRegistry()

    async def twice(state: Any) -> None:
        """One."""

    hints = {"read_only": True, "destructive": False, "idempotent": True, "open_world": False}
    registry.tool("Twice", **hints)(twice)
    with pytest.raises(ValueError, match="registered twice"):
        registry.tool("Twice", **hints, name="twice")(twice)
    assert registry.specs[0].description == "One."
