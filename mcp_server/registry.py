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
from typing import TYPE_CHECKING, Annotated, Any, get_args, get_origin

from mcp_types import ToolAnnotations

if TYPE_CHECKING:
    from .server import State, VaultMCP

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    annotations: ToolAnnotations
    handler: Handler
    #: Publish the result model as the tool's output schema (the structure agents use).
    output_schema: bool = False

    @property
    def description(self) -> str:
        """The docstring as one paragraph (its line breaks are only source layout)."""
        return " ".join((inspect.getdoc(self.handler) or "").split())


class ToolRegistry:
    def __init__(self) -> None:
        self.specs: list[ToolSpec] = []

    def tool(
        self,
        title: str,
        *,
        read_only: bool,
        destructive: bool,
        idempotent: bool,
        open_world: bool,
        name: str | None = None,
        output_schema: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Register the decorated function as a tool, named as the function unless ``name``
        says otherwise (``exec`` is a builtin's name, so that function is ``exec_tool``).

        All four hints are required: a client assumes the worst of an unset one (an unset
        ``destructiveHint`` reads as destructive). The result model in the return
        annotation is published as an output schema only with ``output_schema``: every
        schema is sent in tools/list, and most results are read as their text."""

        def register(handler: Handler) -> Handler:
            tool_name = name or handler.__name__
            if any(spec.name == tool_name for spec in self.specs):
                raise ValueError(f"tool {tool_name} is registered twice")
            annotations = ToolAnnotations(
                read_only_hint=read_only,
                destructive_hint=destructive,
                idempotent_hint=idempotent,
                open_world_hint=open_world,
            )
            self.specs.append(ToolSpec(tool_name, title, annotations, handler, output_schema))
            return handler

        return register

    def register_all(self, server: VaultMCP, state: State) -> None:
        for spec in self.specs:
            server.add_tool(
                bind(spec.handler, state, spec.name, spec.output_schema),
                name=spec.name,
                title=spec.title,
                description=spec.description,
                annotations=spec.annotations,
            )


def bind(handler: Handler, state: State, name: str, output_schema: bool = True) -> Handler:
    """``handler`` with ``state`` filled in, and a signature (annotations evaluated) that
    no longer lists it: the SDK builds the tool's input and output schemas from that."""
    signature = inspect.signature(handler, eval_str=True)
    parameters = list(signature.parameters.values())[1:]

    async def tool(*args: Any, **kwargs: Any) -> Any:
        return await handler(state, *args, **kwargs)

    tool.__name__ = tool.__qualname__ = name
    tool.__doc__ = handler.__doc__
    tool.__annotations__ = {p.name: p.annotation for p in parameters}
    returns = signature.return_annotation
    if not output_schema and get_origin(returns) is Annotated:
        returns = get_args(returns)[0]  # CallToolResult alone: no output schema
    tool.__signature__ = signature.replace(parameters=parameters, return_annotation=returns)  # type: ignore[attr-defined]
    tool.__annotations__["return"] = returns
    return tool


__all__ = ["ToolRegistry", "ToolSpec", "bind"]
