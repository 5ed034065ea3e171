"""The strict JSON codec of the domain records: the `JSON` type, `loads`, `dumps`, and
the field readers every `from_json` uses.

A reader takes a decoded object, a key and the path of the object, and returns the
field or raises `DecodeError` naming `path.key` (never a KeyError or TypeError from
deep inside); `optional=True` lets an absent or null field through as None.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from typing_extensions import TypeAliasType

from chatd_trio.errors import DecodeError, PayloadTooLarge

# The readers (`json_object`, `str_field`, ...) are the tools of the domain modules'
# `from_json`, not exported.
__all__ = [
    "JSON",
    "MAX_JSON_BYTES",
    "dumps",
    "loads",
    "optional_uuid",
    "parse_row_id",
    "parse_uuid",
]

# JSON data as `json.loads` returns it. Recursive, so a value's shape is checked all the
# way down; data from outside is narrowed with `isinstance` before use. A `TypeAliasType`
# rather than a plain alias: its forward references resolve in this module, so pydantic
# (the schema of a typed tool taking JSON) and `get_type_hints` (a tool returning it)
# work in modules that never import the name.
JSON = TypeAliasType("JSON", 'bool | int | float | str | list["JSON"] | dict[str, "JSON"] | None')
E = TypeVar("E", bound=enum.Enum)

# A raw notify payload or event larger than this is refused before parsing.
MAX_JSON_BYTES = 1024 * 1024


def json_object(data: JSON, path: str) -> dict[str, JSON]:
    """`data` as an object, else `DecodeError` naming `path`."""
    if type(data) is dict:
        # What json.loads and psycopg's jsonb loader return: no ABC check (it showed in
        # a replica's profile, once per decoded part).
        return data
    if not isinstance(data, Mapping):
        raise DecodeError(path, f"expected an object, got {type(data).__name__}")
    return data


def required(d: Mapping[str, JSON], key: str, path: str) -> JSON:
    """The field `key` of `d`, whatever its type; `DecodeError` when it is missing."""
    if key not in d:
        raise DecodeError(f"{path}.{key}", "missing")
    return d[key]


def _typed(
    d: Mapping[str, JSON],
    key: str,
    path: str,
    optional: bool,
    accepts: Callable[[JSON], bool],
    expected: str,
) -> Any:
    """The field when `accepts` takes it (None when `optional` and absent or null), else
    `DecodeError` saying what was `expected`."""
    if optional and d.get(key) is None:
        return None
    v = required(d, key, path)
    if not accepts(v):
        raise DecodeError(f"{path}.{key}", f"expected {expected}, got {type(v).__name__}")
    return v


def _is_int(v: JSON) -> bool:
    # bool is an int in Python, not in JSON.
    return isinstance(v, int) and not isinstance(v, bool)


# Each reader first takes the common case (the field present with exactly its type), as
# cheaply as Python allows: a replica decodes a dozen fields per message it hears about.


def str_field(d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False) -> Any:
    """A string field."""
    v = d.get(key)
    if type(v) is str:
        return v
    return _typed(d, key, path, optional, lambda v: isinstance(v, str), "a string")


def int_field(d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False) -> Any:
    """An integer field (not a boolean)."""
    v = d.get(key)
    if type(v) is int:
        return v
    return _typed(d, key, path, optional, _is_int, "an integer")


def float_field(d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False) -> Any:
    """A number field, as a float."""
    v = _typed(d, key, path, optional, lambda v: _is_int(v) or isinstance(v, float), "a number")
    if v is None:
        return None
    try:
        return float(v)
    except OverflowError:
        raise DecodeError(f"{path}.{key}", "number out of range") from None


def bool_field(d: Mapping[str, JSON], key: str, path: str, *, default: bool | None = None) -> bool:
    """A boolean field; absent or null, `default` when there is one."""
    v = d.get(key)
    if type(v) is bool:
        return v
    if default is not None and v is None:
        return default
    value: bool = _typed(d, key, path, False, lambda v: isinstance(v, bool), "a boolean")
    return value


def parse_uuid(value: object, path: str = "id") -> uuid.UUID:
    """Parse a UUID from a string, raising `DecodeError` naming `path`."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise DecodeError(path, f"expected a UUID string, got {type(value).__name__}")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise DecodeError(path, f"not a UUID: {value[:64]!r}") from None


def optional_uuid(value: object, path: str = "id") -> uuid.UUID | None:
    """`parse_uuid`, letting `None` through (an optional id)."""
    return None if value is None else parse_uuid(value, path)


def parse_row_id(value: object, path: str = "id") -> int:
    """A message or queue id: an integer (not a bool), else `DecodeError` naming `path`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise DecodeError(path, f"expected an integer, got {type(value).__name__}")
    return value


def uuid_field(d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False) -> Any:
    """A UUID field, from its text."""
    v = d.get(key)
    if type(v) is str:
        try:
            return uuid.UUID(v)
        except ValueError:
            pass  # the slow path names the field
    if optional and v is None:
        return None
    return parse_uuid(required(d, key, path), f"{path}.{key}")


def enum_field(
    cls: type[E], d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False
) -> Any:
    """A member of the enum `cls`, from its value."""
    v = d.get(key)
    if type(v) is str:
        try:
            return cls(v)
        except ValueError:
            pass  # the slow path names the field and the values allowed
    if optional and v is None:
        return None
    v = str_field(d, key, path)
    try:
        return cls(v)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in cls)
        raise DecodeError(f"{path}.{key}", f"{v[:64]!r} is not one of {allowed}") from None


def datetime_field(d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False) -> Any:
    """A timestamp field, from ISO text; a naive one is taken as UTC."""
    if optional and d.get(key) is None:
        return None
    v = str_field(d, key, path)
    try:
        parsed = datetime.fromisoformat(v)
    except ValueError:
        raise DecodeError(f"{path}.{key}", f"not an ISO timestamp: {v[:64]!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def str_field_or(d: Mapping[str, JSON], key: str, path: str, default: str) -> str:
    """A string field; absent or null, `default`."""
    # Only an absent (or null) field takes the default: "" must survive a round trip.
    v = str_field(d, key, path, optional=True)
    return default if v is None else str(v)


def list_field(d: Mapping[str, JSON], key: str, path: str) -> list[JSON]:
    """A list field."""
    value: list[JSON] = _typed(d, key, path, False, lambda v: isinstance(v, list), "a list")
    return value


def iso(v: datetime | None) -> str | None:
    """A timestamp as ISO text, None as None."""
    return v.isoformat() if v is not None else None


def optional_str(v: uuid.UUID | None) -> str | None:
    """An optional id as text, None as None."""
    return str(v) if v is not None else None


def loads(raw: str | bytes, *, limit: int = MAX_JSON_BYTES, what: str = "payload") -> JSON:
    """Parse JSON text, refusing oversized or malformed input with `DecodeError`."""
    # surrogatepass: a lone surrogate must be measured (and then refused as JSON), not crash.
    size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    if size > limit:
        raise PayloadTooLarge(what, f"{size} bytes exceeds the limit of {limit}")
    try:
        value: JSON = json.loads(raw)
        return value
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(what, f"malformed JSON: {exc}") from None
    except RecursionError:
        # Deeply nested arrays exhaust the parser's recursion budget before the size limit.
        raise DecodeError(what, "malformed JSON: nested too deeply") from None


def dumps(data: object) -> str:
    """Compact, deterministic JSON text.

    Takes any object, as `json.dumps` does (a chat's request options may carry
    anything), and raises `TypeError` or `ValueError` for what is not JSON.
    """
    return json.dumps(data, separators=(",", ":"), sort_keys=True)
