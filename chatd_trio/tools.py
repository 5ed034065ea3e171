"""Tools the agent loop offers the model: definitions, a registry and safe invocation.

A tool is a name, a description, JSON-schema parameters and an async `run(args, ctx)`
returning JSON. Whatever goes wrong while invoking one (unknown name, malformed
arguments, `ToolError`, any other exception, an `ErrorResult`, a return value that
cannot be stored) becomes an error tool result for the model: the turn goes on.
Cancellation is never swallowed.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from chatd_trio.domain import JSON, ToolCallPart, ToolResultPart
from chatd_trio.errors import ToolError
from chatd_trio.models.base import ToolSpec
from chatd_trio.storable import storable_tool_result

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolContext:
    """What a tool knows about the turn calling it.

    `extras` carries turn-local services (a workspace connection, a store handle, ...)
    under names agreed between the caller and its tools, so this record stays generic.
    """

    chat_id: uuid.UUID
    worker_id: uuid.UUID | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorResult:
    """Return this from `Tool.run` to report a failure without raising."""

    error: JSON


@runtime_checkable
class Tool(Protocol):
    """A tool the model may call."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def parameters(self) -> JSON:
        """JSON schema of the arguments object."""
        ...

    async def run(self, args: dict[str, JSON], ctx: ToolContext) -> JSON:
        """Run the call; raise `ToolError` (or return `ErrorResult`) for an error result."""
        ...


ToolFunction = Callable[[dict[str, JSON], ToolContext], Awaitable[JSON]]


@dataclass(frozen=True)
class FunctionTool:
    """A `Tool` backed by an async function."""

    name: str
    description: str
    parameters: JSON
    fn: ToolFunction

    async def run(self, args: dict[str, JSON], ctx: ToolContext) -> JSON:
        return await self.fn(args, ctx)


def tool(
    name: str, description: str, parameters: JSON | None = None
) -> Callable[[ToolFunction], FunctionTool]:
    """Decorator turning an async function into a `FunctionTool`."""

    def wrap(fn: ToolFunction) -> FunctionTool:
        schema = parameters if parameters is not None else {"type": "object", "properties": {}}
        return FunctionTool(name, description, schema, fn)

    return wrap


def error_result(call: ToolCallPart, message: str) -> ToolResultPart:
    """An error tool result for `call` carrying `{"error": message}`."""
    return ToolResultPart(call.call_id, call.name, {"error": message}, is_error=True)


def parse_arguments(arguments: str) -> dict[str, JSON]:
    """Decode a tool call's JSON arguments; empty text means no arguments.

    Raises `ToolError` for malformed JSON or anything but an object.
    """
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError as exc:
        raise ToolError(f"arguments are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ToolError(f"arguments must be a JSON object, got {type(value).__name__}")
    return value


class ToolRegistry:
    """Tools by name, in registration order."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, t: Tool) -> None:
        """Register a tool; a second tool with the same name raises ValueError."""
        if t.name in self._tools:
            raise ValueError(f"tool {t.name!r} is already registered")
        self._tools[t.name] = t

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def specs(self) -> list[ToolSpec]:
        """What the model is offered."""
        return [ToolSpec(t.name, t.description, t.parameters) for t in self._tools.values()]

    async def invoke(self, call: ToolCallPart, ctx: ToolContext) -> ToolResultPart:
        """Run one call; every failure except cancellation becomes an error result.

        The result passes the storable-value gate (`chatd_trio.storable`): one that
        cannot be stored (NaN, a set, bytes, nesting beyond `MAX_DEPTH`) becomes an
        error result saying why, NUL and lone surrogates become U+FFFD.
        """
        return storable_tool_result(await self._invoke(call, ctx)).value

    async def _invoke(self, call: ToolCallPart, ctx: ToolContext) -> ToolResultPart:
        t = self._tools.get(call.name)
        if t is None:
            return error_result(call, f"unknown tool {call.name!r}")
        try:
            args = parse_arguments(call.arguments)
            value = await t.run(args, ctx)
        except ToolError as exc:
            return error_result(call, str(exc))
        except Exception as exc:
            # A tool bug must not end the turn; the model sees the error and can adapt.
            logger.warning(
                "tool raised",
                exc_info=True,
                extra={"chat_id": str(ctx.chat_id), "tool": call.name, "call_id": call.call_id},
            )
            return error_result(call, f"{type(exc).__name__}: {exc}")
        if isinstance(value, ErrorResult):
            return ToolResultPart(call.call_id, call.name, value.error, is_error=True)
        return ToolResultPart(call.call_id, call.name, value)
