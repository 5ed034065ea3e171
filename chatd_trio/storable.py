"""The storable-value gate (docs/spec.md §7): the one check every stored value passes.

PostgreSQL refuses values Python holds without complaint: a NUL character (in text
and in jsonb), a lone surrogate, NaN and Infinity, an integer with more digits than
Python will print, nesting deep enough to exhaust a recursive encoder. The memory
store would keep them all. So everything that is stored (user message parts, model
output, tool arguments and results, titles, errors) passes this module first, in
the operations both stores share (`chatd_trio.store.ops`): both then accept exactly
the same values and store them in the same form.

- NUL and lone surrogates are replaced with U+FFFD, and counted (`Cleaned.replaced`)
  so the caller can flag the value; a high and a low surrogate that follow each
  other become the character they encode, as a JSON reader would make them.
- NaN, Infinity, anything that is not JSON (a set, bytes, any other object), an
  object key that is not a string, an integer of more than `MAX_INT_DIGITS` digits
  and nesting deeper than `MAX_DEPTH` are refused with `DecodeError` naming the
  field, a tool result larger than `MAX_RESULT_BYTES` with `PayloadTooLarge`. A
  tool's refused result becomes an error result instead (`storable_tool_result`).
- Values come back in the form PostgreSQL returns them: tuples as lists, subclasses
  of str, int, float and dict as the plain type, -0.0 as 0.0 and a float written
  with a positive exponent (1e+16 and up) as the integer jsonb makes of it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Generic, Literal, TypeVar

from chatd_trio.domain import (
    JSON,
    ContextFilePart,
    NewMessage,
    Part,
    ReasoningPart,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Usage,
    Visibility,
)
from chatd_trio.errors import DecodeError, PayloadTooLarge

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_RESULT_BYTES",
    "Cleaned",
    "is_blank",
    "storable_json",
    "storable_message",
    "storable_messages",
    "storable_part",
    "storable_parts",
    "storable_text",
    "storable_texts",
    "storable_tool_result",
    "stored_size",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Nesting levels of a value inside a message part (a tool result, or a value an API
# caller passes). Python's JSON encoder recurses once per level and gives up near
# 1000 (less whatever the caller's stack already holds); real tool results nest a
# handful of levels, and the agent protocol caps its frames at 128.
MAX_DEPTH = 128
# A tool result stored larger than this becomes an error result: twice the agent's frame
# cap (8 MiB), so every result from a workspace fits; more is a runaway tool, and a step's
# messages must stay far below what one PostgreSQL value holds (jsonb: 255 MiB).
MAX_RESULT_BYTES = 16 * 1024 * 1024
# Python refuses to print (and so to encode as JSON) integers of more digits than this.
MAX_INT_DIGITS = 4300
_INT_LIMIT = 10**MAX_INT_DIGITS
# PostgreSQL's bigint, the type of the usage and context-limit columns.
_BIGINT_MAX = 2**63 - 1
_BIGINT_MIN = -(2**63)

ToolResultPolicy = Literal["refuse", "error"]


@dataclass(frozen=True)
class Cleaned(Generic[T]):
    """A value as it will be stored, with the number of characters replaced by U+FFFD."""

    value: T
    replaced: int = 0


# ---------------------------------------------------------------------------
# text


def _clean_text(text: str) -> tuple[str, int]:
    if text.isascii():
        if "\x00" not in text:
            return text, 0
        return text.replace("\x00", "\ufffd"), text.count("\x00")
    replaced = 0
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Through UTF-16: a surrogate pair becomes its character (as a JSON reader makes
        # it), each lone surrogate one U+FFFD.
        surrogates = sum(1 for c in text if "\ud800" <= c <= "\udfff")
        before = len(text)
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        replaced = surrogates - 2 * (before - len(text))
    nuls = text.count("\x00")
    if nuls:
        text = text.replace("\x00", "\ufffd")
    return text, replaced + nuls


def storable_text(text: object, field: str = "text") -> Cleaned[str]:
    """`text` as it can be stored: NUL and lone surrogates replaced with U+FFFD.

    Raises `DecodeError` naming `field` when `text` is not a string.
    """
    if not isinstance(text, str):
        raise DecodeError(field, f"expected a string, got {type(text).__name__}")
    if type(text) is not str:
        text = str.__str__(text)
    value, replaced = _clean_text(text)
    return Cleaned(value, replaced)


def storable_texts(**values: object) -> list[str]:
    """Several named texts through `storable_text`, in the order given."""
    return [storable_text(value, name).value for name, value in values.items()]


# ---------------------------------------------------------------------------
# JSON values


class _Refused(Exception):
    """A value the walk refuses; `path` is filled in (innermost first) on the way out."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []

    def error(self, field: str) -> DecodeError:
        steps = self.path[::-1]
        if len(steps) > _PATH_STEPS:
            steps = [*steps[: _PATH_STEPS // 2], "...", *steps[-_PATH_STEPS // 2 :]]
        return DecodeError(field + "".join(steps), self.reason)


# A refusal names at most this many steps below the field (deep nesting would list 128).
_PATH_STEPS = 8


class _Walk:
    """One pass over a JSON value: cleans strings, refuses what cannot be stored,
    measures the stored size."""

    def __init__(self, max_depth: int = MAX_DEPTH) -> None:
        self.max_depth = max_depth
        self.replaced = 0
        self.size = 0

    def text(self, text: str) -> str:
        if type(text) is not str:
            text = str.__str__(text)
        if not text.isascii() or "\x00" in text:
            text, replaced = _clean_text(text)
            self.replaced += replaced
            self.size += len(text.encode("utf-8")) + 2
        else:
            self.size += len(text) + 2
        return text

    def value(self, v: object, depth: int) -> JSON:
        if isinstance(v, str):
            return self.text(v)
        if v is None:
            self.size += 4
            return None
        if isinstance(v, bool):
            self.size += 4 if v else 5
            return bool(v)
        if isinstance(v, int):
            v = int(v)
            if not -_INT_LIMIT < v < _INT_LIMIT:
                raise _Refused(f"an integer of more than {MAX_INT_DIGITS} digits")
            self.size += len(str(v))
            return v
        if isinstance(v, float):
            return self.number(float(v))
        if isinstance(v, dict):
            return self.obj(v, depth + 1)
        if isinstance(v, list | tuple):
            return self.array(v, depth + 1)
        raise _Refused(f"not JSON: {type(v).__name__}")

    def number(self, v: float) -> JSON:
        if not math.isfinite(v):
            raise _Refused(f"{v} is not a JSON number")
        text = repr(v)
        if "e+" in text:
            # jsonb keeps the decimal value and prints it without exponent: an integer.
            whole = int(Decimal(text))
            self.size += len(str(whole))
            return whole
        self.size += len(text)
        return 0.0 if v == 0 else v

    def obj(self, v: dict[object, object], depth: int) -> JSON:
        if depth > self.max_depth:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
        out: dict[str, JSON] = {}
        self.size += 2 + max(len(v) - 1, 0) + len(v)
        for key, item in v.items():
            if not isinstance(key, str):
                raise _Refused(f"an object key is not a string: {type(key).__name__}")
            name = self.text(key)
            try:
                out[name] = self.value(item, depth)
            except _Refused as refused:
                refused.path.append(f".{_short(name)}")
                raise
        return out

    def array(self, v: Sequence[object], depth: int) -> JSON:
        if depth > self.max_depth:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
        self.size += 2 + max(len(v) - 1, 0)
        out: list[JSON] = []
        for item in v:
            try:
                out.append(self.value(item, depth))
            except _Refused as refused:
                refused.path.append(f"[{len(out)}]")
                raise
        return out


def _short(key: str) -> str:
    return key if len(key) <= 32 else key[:29] + "..."


def storable_json(value: object, field: str = "value") -> Cleaned[JSON]:
    """`value` as jsonb will hold it (see the module docstring), or `DecodeError`
    naming the offending place below `field`."""
    return _json(value, field)[0]


def _json(value: object, field: str) -> tuple[Cleaned[JSON], int]:
    """`storable_json` with the stored size in UTF-8 bytes."""
    walk = _Walk()
    try:
        cleaned = walk.value(value, 0)
    except _Refused as refused:
        raise refused.error(field) from None
    return Cleaned(cleaned, walk.replaced), walk.size


def stored_size(parts: Sequence[Part]) -> int:
    """The stored size of message parts in UTF-8 bytes: their JSON with every string
    counted as its UTF-8 bytes, unescaped (jsonb keeps strings that way). The parts
    must have passed the gate."""
    # Two levels above the parts' values: the list of parts, each part's object.
    walk = _Walk(MAX_DEPTH + 2)
    walk.array([p.to_json() for p in parts], 0)
    return walk.size


# ---------------------------------------------------------------------------
# message parts


def _str_field(value: object, field: str, counter: list[int]) -> str:
    cleaned = storable_text(value, field)
    counter[0] += cleaned.replaced
    return cleaned.value


def storable_part(part: object, field: str = "part") -> Cleaned[Part]:
    """One message part as it can be stored; `DecodeError` naming `field` otherwise."""
    n = [0]
    out: Part
    if isinstance(part, TextPart):
        out = TextPart(_str_field(part.text, f"{field}.text", n))
    elif isinstance(part, ReasoningPart):
        if not isinstance(part.redacted, bool):
            raise DecodeError(f"{field}.redacted", "expected a boolean")
        out = ReasoningPart(
            _str_field(part.text, f"{field}.text", n),
            _str_field(part.signature, f"{field}.signature", n),
            part.redacted,
        )
    elif isinstance(part, ToolCallPart):
        out = ToolCallPart(
            _str_field(part.call_id, f"{field}.call_id", n),
            _str_field(part.name, f"{field}.name", n),
            _str_field(part.arguments, f"{field}.arguments", n),
        )
    elif isinstance(part, ToolResultPart):
        if not isinstance(part.is_error, bool):
            raise DecodeError(f"{field}.is_error", "expected a boolean")
        result, size = _json(part.result, f"{field}.result")
        if size > MAX_RESULT_BYTES:
            raise PayloadTooLarge(
                f"{field}.result", f"{size} bytes exceeds the limit of {MAX_RESULT_BYTES}"
            )
        n[0] += result.replaced
        out = ToolResultPart(
            _str_field(part.call_id, f"{field}.call_id", n),
            _str_field(part.name, f"{field}.name", n),
            result.value,
            part.is_error,
        )
    elif isinstance(part, ContextFilePart):
        if not isinstance(part.agent_id, uuid.UUID):
            raise DecodeError(f"{field}.agent_id", "expected a UUID")
        out = ContextFilePart(
            part.agent_id,
            _str_field(part.path, f"{field}.path", n),
            _str_field(part.content, f"{field}.content", n),
        )
    else:
        raise DecodeError(field, f"expected a message part, got {type(part).__name__}")
    return Cleaned(out, n[0])


def storable_tool_result(part: ToolResultPart, field: str = "result") -> Cleaned[ToolResultPart]:
    """A tool result as it can be stored; one that cannot be becomes an error result
    saying why (the model sees it, the turn goes on). Never raises for the result."""
    try:
        cleaned = storable_part(part, field)
    except DecodeError as exc:
        call_id = storable_text(part.call_id if isinstance(part.call_id, str) else "").value
        name = storable_text(part.name if isinstance(part.name, str) else "").value
        logger.warning("tool result cannot be stored: %s", exc, extra={"tool": name})
        return Cleaned(
            ToolResultPart(
                call_id,
                name,
                {"error": f"the tool's result cannot be stored: {exc.reason}"},
                is_error=True,
            ),
            0,
        )
    assert isinstance(cleaned.value, ToolResultPart)
    return Cleaned(cleaned.value, cleaned.replaced)


def storable_parts(
    parts: object, field: str = "parts", *, tool_results: ToolResultPolicy = "refuse"
) -> Cleaned[tuple[Part, ...]]:
    """Message parts as they can be stored.

    `tool_results="error"` turns a tool result that cannot be stored into an error
    result (a turn's own output); `"refuse"` raises `DecodeError` for it like for
    anything else (a caller's input).
    """
    if isinstance(parts, str | bytes) or not isinstance(parts, Sequence):
        raise DecodeError(
            field, f"expected a sequence of message parts, got {type(parts).__name__}"
        )
    out: list[Part] = []
    replaced = 0
    for i, part in enumerate(parts):
        where = f"{field}[{i}]"
        cleaned: Cleaned[Part]
        if tool_results == "error" and isinstance(part, ToolResultPart):
            result = storable_tool_result(part, where)
            cleaned = Cleaned(result.value, result.replaced)
        else:
            cleaned = storable_part(part, where)
        out.append(cleaned.value)
        replaced += cleaned.replaced
    return Cleaned(tuple(out), replaced)


def is_blank(parts: Sequence[Part]) -> bool:
    """True when the parts hold nothing but empty or whitespace-only text."""
    return all(isinstance(p, TextPart | ReasoningPart) and not p.text.strip() for p in parts)


# ---------------------------------------------------------------------------
# messages


def _bigint(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DecodeError(field, f"expected an integer, got {type(value).__name__}")
    # Counts reported by a provider: an absurd one is clamped, not worth failing a turn.
    return max(min(int(value), _BIGINT_MAX), _BIGINT_MIN)


def _usage(usage: object, field: str) -> Usage | None:
    if usage is None:
        return None
    if not isinstance(usage, Usage):
        raise DecodeError(field, f"expected Usage, got {type(usage).__name__}")
    values = {
        f.name: _bigint(getattr(usage, f.name), f"{field}.{f.name}")
        for f in dataclasses.fields(Usage)
    }
    return Usage(**values)


def storable_message(
    message: object, field: str = "message", *, tool_results: ToolResultPolicy = "refuse"
) -> Cleaned[NewMessage]:
    """A message to insert, as it can be stored (see `storable_parts`); usage and
    context limit clamped to what the database's bigint columns hold."""
    if not isinstance(message, NewMessage):
        raise DecodeError(field, f"expected a NewMessage, got {type(message).__name__}")
    if not isinstance(message.role, Role):
        raise DecodeError(f"{field}.role", "expected a Role")
    if not isinstance(message.visibility, Visibility):
        raise DecodeError(f"{field}.visibility", "expected a Visibility")
    if not isinstance(message.compressed, bool):
        raise DecodeError(f"{field}.compressed", "expected a boolean")
    parts = storable_parts(message.parts, f"{field}.parts", tool_results=tool_results)
    limit = message.context_limit
    cleaned = NewMessage(
        message.role,
        parts.value,
        message.visibility,
        usage=_usage(message.usage, f"{field}.usage"),
        context_limit=None if limit is None else _bigint(limit, f"{field}.context_limit"),
        compressed=message.compressed,
    )
    return Cleaned(cleaned, parts.replaced)


def storable_messages(
    messages: object, field: str = "messages", *, tool_results: ToolResultPolicy = "refuse"
) -> Cleaned[tuple[NewMessage, ...]]:
    """Messages to insert, each as `storable_message` makes it."""
    if not isinstance(messages, Sequence):
        raise DecodeError(field, f"expected a sequence of messages, got {type(messages).__name__}")
    out: list[NewMessage] = []
    replaced = 0
    for i, message in enumerate(messages):
        cleaned = storable_message(message, f"{field}[{i}]", tool_results=tool_results)
        out.append(cleaned.value)
        replaced += cleaned.replaced
    return Cleaned(tuple(out), replaced)
