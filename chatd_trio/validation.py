"""Checking JSON-shaped data against Python types: one way, for tool arguments and the
workspace agent's responses alike.

A *shape* is a pydantic model class made from named, typed fields (`shape`). `check`
validates data against it strictly: each field must already be the JSON type its hint
says (`"3"` is not an `int`, `true` is not a number), and the error names every bad
field (`invalid response: size: Input should be a valid integer`). Data that is still
JSON text, or that carries strings for UUIDs, dates and enums, is checked in pydantic's
JSON mode (`from_json=True`), where such strings are the types' own JSON form.

pydantic is installed with `mcp`, which builds on it; it gives the JSON schema of a
shape too (`chatd_trio.tools`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

import pydantic

__all__ = ["Invalid", "check", "describe", "shape"]


class Invalid(ValueError):
    """Data that does not fit its shape; the message names every bad field."""


def shape(
    name: str,
    fields: Mapping[str, tuple[Any, Any]],
    *,
    extra: Literal["forbid", "ignore"] = "ignore",
) -> type[pydantic.BaseModel]:
    """A shape from `{field: (type hint, default or ...)}`; `extra="forbid"` refuses
    unknown fields. The default may be a `pydantic.Field(...)` (a description, bounds)."""
    config = pydantic.ConfigDict(strict=True, extra=extra, allow_inf_nan=False)
    return pydantic.create_model(name, __config__=config, **fields)  # type: ignore[call-overload, no-any-return]


def check(
    model: type[pydantic.BaseModel],
    data: Any,
    *,
    what: str = "data",
    from_json: bool = False,
) -> pydantic.BaseModel:
    """`data` as an instance of the shape; `Invalid` ("invalid <what>: ...") otherwise."""
    try:
        if from_json:
            return model.model_validate_json(json.dumps(data))
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise Invalid(f"invalid {what}: {describe(exc)}") from None
    except (TypeError, ValueError) as exc:  # not JSON-serialisable
        raise Invalid(f"invalid {what}: {exc}") from None


def describe(exc: pydantic.ValidationError) -> str:
    """`field: problem; field: problem`, with nested fields dotted (`place.city`)."""
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "the value"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)
