"""A small tool registry: each MCP tool is one module-level function, registered here.

A tool function takes the server's ``State`` first, then its MCP arguments (and a
``Context`` if it reports progress). ``ToolRegistry.tool`` records it with its annotations;
``register_all`` binds the state and hands the tools to the server in the order they were
defined (tools/list keeps that order). The SDK reads each tool's schema from its signature,
so the bound function shows the same signature without ``state``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mcp_types import ToolAnnotations

if TYPE_CHECKING:
    from .server import State, VaultMCP

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    annotations: ToolAnnotations
    handler: Handler

    @property
    def description(self) -> str:
        return _legacy_indent(inspect.getdoc(self.handler) or "")


class ToolRegistry:
    def __init__(self) -> None:
        self.specs: list[ToolSpec] = []

    def tool(
        self, annotations: ToolAnnotations, *, name: str | None = None
    ) -> Callable[[Handler], Handler]:
        """Register the decorated function as a tool, named as the function unless ``name``
        says otherwise (``exec`` is a builtin's name, so that function is ``exec_tool``)."""

        def register(handler: Handler) -> Handler:
            tool_name = name or handler.__name__
            if any(spec.name == tool_name for spec in self.specs):
                raise ValueError(f"tool {tool_name} is registered twice")
            self.specs.append(ToolSpec(tool_name, annotations, handler))
            return handler

        return register

    def register_all(self, server: VaultMCP, state: State) -> None:
        for spec in self.specs:
            server.add_tool(
                bind(spec.handler, state, spec.name),
                name=spec.name,
                description=spec.description,
                annotations=spec.annotations,
            )


def bind(handler: Handler, state: State, name: str) -> Handler:
    """``handler`` with ``state`` filled in, and a signature (annotations evaluated) that
    no longer lists it: the SDK builds the tool's input and output schemas from that."""
    signature = inspect.signature(handler, eval_str=True)
    parameters = list(signature.parameters.values())[1:]

    async def tool(*args: Any, **kwargs: Any) -> Any:
        return await handler(state, *args, **kwargs)

    tool.__name__ = tool.__qualname__ = name
    tool.__doc__ = handler.__doc__
    tool.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    tool.__annotations__ = {p.name: p.annotation for p in parameters}
    tool.__annotations__["return"] = signature.return_annotation
    return tool


def _legacy_indent(text: str) -> str:
    """Descriptions as agents have seen them: the tools were nested functions, whose raw
    docstrings indented continuation lines by 8 spaces. Kept byte for byte (tools/list is
    compared) until the issue that renames the tools rewrites their descriptions."""
    first, *rest = text.split("\n")
    return "\n".join([first, *(f"{' ' * 8}{line}" if line else line for line in rest)])


__all__ = ["ToolRegistry", "ToolSpec", "bind"]
