"""Tools the agent loop offers the model: definitions, a registry and safe invocation.

A tool is a name, a description, JSON-schema parameters and an async `run(args, ctx)`
returning JSON. Whatever goes wrong while invoking one (unknown name, malformed
arguments, `ToolError`, any other exception, an `ErrorResult`, a return value that
cannot be stored) becomes an error tool result for the model: the turn goes on.
Cancellation is never swallowed.

`@tool` builds one from a typed function: the JSON schema comes from its type hints
and docstring, and the arguments are validated against them before the call. This is
the one argument check of the library: the workspace and subagent tools are typed
functions too, and the same check (`chatd_trio.validation`) reads the workspace agent's
responses. It uses pydantic (installed with `mcp`, which builds on it): a model class
made with `create_model` from the signature gives both the JSON schema and a validator
whose errors name each bad field, for any type pydantic knows (enums, UUIDs, dates,
nested models, `Annotated` constraints). The arguments are validated as JSON (they are
JSON text from the model), strictly: a field is what the schema the model was shown
says, so `"3"` is not an integer and `true` is not a number, while a UUID or a date
comes as a string.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import typing
import uuid
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, overload, runtime_checkable

import pydantic
import pydantic_core
import trio

from chatd_trio import validation
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
    A typed tool receives it through a parameter annotated `ToolContext`.
    """

    chat_id: uuid.UUID
    worker_id: uuid.UUID | None = None
    extras: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorResult:
    """Return this from a tool to report a failure without raising."""

    error: JSON


# What running a tool gives: JSON data for the model, or an `ErrorResult`. A value that
# cannot be stored after all becomes an error result at `ToolRegistry.invoke`.
ToolOutput: TypeAlias = JSON | ErrorResult


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

    async def run(self, args: dict[str, JSON], ctx: ToolContext) -> ToolOutput:
        """Run the call; raise `ToolError` (or return `ErrorResult`) for an error result."""
        ...


ToolFunction = Callable[[dict[str, JSON], ToolContext], Awaitable[ToolOutput]]


@dataclass(frozen=True)
class FunctionTool:
    """A `Tool` from an async `fn(args, ctx)` and a hand-written JSON schema.

    The arguments reach `fn` as the JSON object the model sent, unchecked: for
    schemas that come from elsewhere (an MCP server's tools).
    """

    name: str
    description: str
    parameters: JSON
    fn: ToolFunction

    async def run(self, args: dict[str, JSON], ctx: ToolContext) -> ToolOutput:
        return await self.fn(args, ctx)


# -- typed tools ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TypedTool:
    """A `Tool` from a typed function: schema from its signature, arguments validated.

    Build one with `@tool`. `fn` is called with one keyword argument per parameter, plus
    the `ToolContext` for a parameter annotated with it. An async `fn` runs in the turn;
    a sync one in a worker thread (it may block), abandoned if the turn stops first.
    """

    name: str
    description: str
    fn: Callable[..., Any]
    arguments: type[pydantic.BaseModel]
    context_parameter: str | None = None

    @property
    def parameters(self) -> JSON:
        """The JSON schema of the arguments, as the model is shown it."""
        return _schema(self.arguments)

    def validate(self, args: Mapping[str, JSON]) -> dict[str, object]:
        """The call's keyword arguments; `ToolError` naming every bad field."""
        values = validate_arguments(self.arguments, args)
        return {name: getattr(values, name) for name in type(values).model_fields}

    async def run(self, args: dict[str, JSON], ctx: ToolContext) -> ToolOutput:
        kwargs = self.validate(args)
        if self.context_parameter is not None:
            kwargs[self.context_parameter] = ctx
        if inspect.iscoroutinefunction(inspect.unwrap(self.fn)):
            result = await self.fn(**kwargs)
        else:
            result = await trio.to_thread.run_sync(
                functools.partial(self.fn, **kwargs), abandon_on_cancel=True
            )
        if isinstance(result, ErrorResult):
            return result
        # As JSON data: pydantic converts dataclasses, models, UUIDs and dates, and raises
        # for an object it does not know (an error result). What converts but cannot be
        # stored (NaN, an integer too long) is refused by the gate at `invoke`.
        jsonable: JSON = pydantic_core.to_jsonable_python(result)
        return jsonable


def validate_arguments(
    model: type[pydantic.BaseModel], args: Mapping[str, JSON]
) -> pydantic.BaseModel:
    """Validate a tool call's arguments against `model` as JSON; `ToolError` if invalid."""
    try:
        return validation.check(model, args, what="arguments", from_json=True)
    except validation.Invalid as exc:
        raise ToolError(str(exc)) from None


@functools.lru_cache(maxsize=1024)
def _schema(model: type[pydantic.BaseModel]) -> JSON:
    # Per model class, which `typed_tool` reuses across turns (see `_SHAPES`).
    return _without_titles(model.model_json_schema())


def _without_titles(schema: JSON) -> JSON:
    """The schema without pydantic's generated `title`s (noise in every prompt)."""
    if isinstance(schema, list):
        return [_without_titles(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, JSON] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "patternProperties") and isinstance(value, dict):
            out[key] = {k: _without_titles(v) for k, v in value.items()}
        else:
            out[key] = _without_titles(value)
    return out


_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Params|Returns|Return|Yields|Raises|Examples?|Notes?)"
    r"\s*:\s*$"
)
_GOOGLE_ARG = re.compile(r"^\s*\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_REST_PARAM = re.compile(r"^\s*:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """A tool description and per-parameter descriptions from a docstring.

    The description is the text before the first section; parameters come from a
    Google-style `Args:` section (`name: text` or `name (type): text`, continued on
    more-indented lines) or reST `:param name: text` lines.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    indent = 0
    for line in lines:
        rest = _REST_PARAM.match(line)
        if rest:
            current, section = rest.group(1), "rest"
            params[current] = rest.group(2).strip()
            continue
        header = _SECTION.match(line)
        if header:
            section = header.group(1).lower()
            current = None
            continue
        if section is None:
            summary.append(line)
            continue
        if section in ("args", "arguments", "parameters", "params"):
            width = len(line) - len(line.lstrip())
            arg = _GOOGLE_ARG.match(line)
            if arg and (current is None or width <= indent):
                current, indent = arg.group(1), width
                params[current] = arg.group(2).strip()
            elif current is not None and line.strip():
                params[current] = f"{params[current]} {line.strip()}".strip()
        elif section == "rest" and current is not None and line.strip():
            if line.startswith((" ", "\t")):
                params[current] = f"{params[current]} {line.strip()}".strip()
            else:
                section, current = None, None
                summary.append(line)
    return "\n".join(summary).strip(), params


def _is_context(annotation: Any) -> bool:
    return annotation is ToolContext or (
        isinstance(annotation, str) and annotation.rsplit(".", 1)[-1] == "ToolContext"
    )


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    target = inspect.unwrap(fn)
    try:
        return typing.get_type_hints(target, include_extras=True)
    except (NameError, TypeError):
        # A hint naming something not importable at module level (a local class):
        # such a function must spell its hints so they resolve.
        raise TypeError(
            f"cannot resolve the type hints of {getattr(fn, '__qualname__', fn)!r}"
        ) from None


def _is_raw(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is an old-style `(args, ctx)` tool function."""
    params = list(inspect.signature(fn).parameters.values())
    if len(params) != 2:
        return False
    annotations = {p.name: p.annotation for p in params}
    second = params[1]
    first = params[0]
    ctx_like = second.name == "ctx" or _is_context(annotations[second.name])
    args_like = first.name == "args" or str(annotations[first.name]).startswith(
        ("dict", "Mapping", "typing.Mapping", "collections.abc.Mapping")
    )
    return ctx_like and args_like


def typed_tool(
    fn: Callable[..., Any], *, name: str | None = None, description: str | None = None
) -> TypedTool:
    """A `TypedTool` from `fn` (what `@tool` does for a typed function)."""
    tool_name = name or fn.__name__
    key = _shape_key(fn, tool_name, description)
    shape = _SHAPES.get(key) if key is not None else None
    if shape is None:
        shape = _shape(fn, tool_name, description)
        if key is not None:
            if len(_SHAPES) >= _SHAPES_MAX:
                _SHAPES.pop(next(iter(_SHAPES)))
            _SHAPES[key] = shape
    model, text, context = shape
    return TypedTool(tool_name, text, fn, model, context)


# Tools are built per turn (a workspace's tools close over the turn's context, subagent
# tools over the server), but a tool's arguments model depends only on its function's
# code, defaults, annotations, name and description: building it (pydantic's model and
# JSON schema generation) every turn cost about a sixth of a busy replica's CPU.
_SHAPES: dict[Hashable, tuple[type[pydantic.BaseModel], str, str | None]] = {}
_SHAPES_MAX = 1024


def _shape_key(fn: Callable[..., Any], name: str, description: str | None) -> Hashable | None:
    """What `fn`'s shape depends on, or None when that cannot be told (then no reuse)."""
    target = inspect.unwrap(fn)
    bound = inspect.ismethod(target)
    func = target.__func__ if bound else target
    code = getattr(func, "__code__", None)
    if code is None:
        return None
    key = (
        code,
        bound,
        name,
        description,
        getattr(func, "__defaults__", None),
        tuple(sorted((getattr(func, "__kwdefaults__", None) or {}).items())),
        tuple(getattr(func, "__annotations__", {}).items()),
        getattr(func, "__doc__", None),
        getattr(func, "__module__", None),
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _shape(
    fn: Callable[..., Any], tool_name: str, description: str | None
) -> tuple[type[pydantic.BaseModel], str, str | None]:
    summary, docs = parse_docstring(fn.__doc__)
    hints = _hints(fn)
    fields: dict[str, Any] = {}
    context: str | None = None
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {tool_name!r}: *args and **kwargs cannot be described")
        if param.kind is param.POSITIONAL_ONLY:
            raise TypeError(f"tool {tool_name!r}: parameter {param.name!r} is positional-only")
        hint = hints.get(param.name, Any)
        if _is_context(hint):
            context = param.name
            continue
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (
            hint,
            pydantic.Field(default, description=docs.get(param.name) or None),
        )
    model = validation.shape(f"{tool_name}_arguments", fields, extra="forbid")
    text = description if description is not None else summary
    if not text:
        raise TypeError(f"tool {tool_name!r} needs a description (a docstring)")
    return model, text, context


AnyTool = FunctionTool | TypedTool


@overload
def tool(fn: Callable[..., Any], /) -> AnyTool: ...


@overload
def tool(
    name: str | None = None,
    description: str | None = None,
    parameters: JSON | None = None,
) -> Callable[[Callable[..., Any]], AnyTool]: ...


def tool(
    name: str | Callable[..., Any] | None = None,
    description: str | None = None,
    parameters: JSON | None = None,
) -> AnyTool | Callable[[Callable[..., Any]], AnyTool]:
    """Turn a function into a tool.

    Typed (the usual form), bare or with a name and description:

        @tool
        async def add(a: int, b: int) -> dict[str, int]:
            \"\"\"Add two integers.

            Args:
                a: the first addend
                b: the second addend
            \"\"\"
            return {"sum": a + b}

    The name defaults to the function's, the description to its docstring (before the
    `Args:` section); the schema comes from the type hints and the `Args:` lines. Sync
    functions run in a worker thread. A parameter annotated `ToolContext` receives the
    turn's context. Invalid arguments never reach the function: the model gets an error
    result naming each bad field.

    Explicit schema (the older form): `@tool(name, description, parameters)` on an
    async `fn(args, ctx)` that receives the arguments object unchecked; also used when
    the function's parameters are `(args, ctx)`.
    """
    if callable(name):
        return _build(name, None, None, None)

    def wrap(fn: Callable[..., Any]) -> AnyTool:
        return _build(fn, name, description, parameters)

    return wrap


def _build(
    fn: Callable[..., Any],
    name: str | None,
    description: str | None,
    parameters: JSON | None,
) -> AnyTool:
    if parameters is not None or _is_raw(fn):
        tool_name = name or fn.__name__
        text = description if description is not None else parse_docstring(fn.__doc__)[0]
        schema: JSON = {"type": "object", "properties": {}} if parameters is None else parameters
        return FunctionTool(tool_name, text, schema, fn)
    return typed_tool(fn, name=name, description=description)


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
            # Handled, so one line; the traceback is there for whoever debugs the tool.
            extra = {"chat_id": str(ctx.chat_id), "tool": call.name, "call_id": call.call_id}
            message = f"{type(exc).__name__}: {exc}"
            logger.warning("tool %s raised %s", call.name, _one_line(message, 200), extra=extra)
            logger.debug("tool %s raised", call.name, exc_info=True, extra=extra)
            return error_result(call, message)
        if isinstance(value, ErrorResult):
            return ToolResultPart(call.call_id, call.name, value.error, is_error=True)
        return ToolResultPart(call.call_id, call.name, value)


def _one_line(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"
