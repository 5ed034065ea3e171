"""Tools: typed `@tool` (schema from hints and docstrings, arguments validated before the
call), the explicit-schema form, and how a failing tool is reported and logged."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import threading
import uuid
from typing import Annotated, Any

import pydantic
import pytest

from chatd_trio.domain import JSON, ToolCallPart, ToolResultPart
from chatd_trio.errors import ToolError
from chatd_trio.tools import (
    ErrorResult,
    FunctionTool,
    ToolContext,
    ToolRegistry,
    TypedTool,
    parse_docstring,
    tool,
)

CTX = ToolContext(uuid.UUID(int=7), uuid.UUID(int=8))


async def call(t: Any, arguments: JSON | str) -> ToolResultPart:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return await ToolRegistry([t]).invoke(ToolCallPart("c1", t.name, text), CTX)


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Place(pydantic.BaseModel):
    city: str
    country: str = "FR"


calls: list[dict[str, Any]] = []


@tool
async def forecast(
    place: Place,
    days: Annotated[int, pydantic.Field(ge=1, le=7)] = 1,
    unit: Unit = Unit.CELSIUS,
    station: uuid.UUID | None = None,
) -> dict[str, Any]:
    """Forecast the weather.

    Any number of days up to a week.

    Args:
        place: where to look
        days: how many days,
            counting today
        unit: the temperature unit
        station (uuid): a weather station, if known

    Returns:
        the forecast
    """
    calls.append({"place": place, "days": days, "unit": unit, "station": station})
    return {"city": place.city, "days": days, "unit": unit, "station": station}


def test_the_schema_comes_from_the_hints_and_the_docstring() -> None:
    assert isinstance(forecast, TypedTool)
    assert forecast.name == "forecast"
    assert forecast.description == "Forecast the weather.\n\nAny number of days up to a week."
    schema = forecast.parameters
    assert schema["type"] == "object"
    assert schema["required"] == ["place"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["place"] == {"$ref": "#/$defs/Place", "description": "where to look"}
    assert props["days"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 7,
        "default": 1,
        "description": "how many days, counting today",
    }
    assert props["unit"]["default"] == "celsius"
    assert props["station"]["description"] == "a weather station, if known"
    assert schema["$defs"]["Unit"] == {"enum": ["celsius", "fahrenheit"], "type": "string"}
    assert schema["$defs"]["Place"]["required"] == ["city"]
    # pydantic's generated titles are noise in every prompt; a property called
    # "title" would survive.
    assert "title" not in json.dumps(schema)


async def test_valid_arguments_reach_the_function_typed() -> None:
    calls.clear()
    station = uuid.uuid4()
    result = await call(
        forecast,
        {"place": {"city": "Lyon"}, "days": 3, "unit": "fahrenheit", "station": str(station)},
    )
    assert not result.is_error
    (got,) = calls
    assert got == {
        "place": Place(city="Lyon"),
        "days": 3,
        "unit": Unit.FAHRENHEIT,
        "station": station,
    }
    # The return value is made JSON: enums by value, UUIDs as strings.
    assert result.result == {
        "city": "Lyon",
        "days": 3,
        "unit": "fahrenheit",
        "station": str(station),
    }


@pytest.mark.parametrize(
    ("arguments", "problems"),
    [
        ({}, ["place: Field required"]),
        ({"place": {"city": "Lyon"}, "days": 9}, ["days: Input should be less than or equal to 7"]),
        ({"place": {"city": "Lyon"}, "days": "3"}, ["days: Input should be a valid integer"]),
        ({"place": {"city": "Lyon"}, "days": True}, ["days: Input should be a valid integer"]),
        ({"place": {}, "unit": "kelvin"}, ["place.city: Field required", "unit: Input should be"]),
        ({"place": {"city": "Lyon"}, "station": "nope"}, ["station: Input should be a valid UUID"]),
        ({"place": {"city": "Lyon"}, "hours": 2}, ["hours: Extra inputs are not permitted"]),
    ],
)
async def test_invalid_arguments_never_reach_the_function(
    arguments: dict[str, Any], problems: list[str]
) -> None:
    calls.clear()
    result = await call(forecast, arguments)
    assert result.is_error and calls == []
    message = result.result["error"]
    assert message.startswith("invalid arguments: ")
    for problem in problems:
        assert problem in message
    assert message.count(";") == len(problems) - 1


async def test_malformed_json_is_an_error_result() -> None:
    result = await call(forecast, "{not json")
    assert result.is_error and "not valid JSON" in result.result["error"]


@tool(name="add_numbers")
def add(a: int, b: float = 0.5) -> float:
    """Add two numbers.

    :param a: an integer
    :param b: a number
    """
    return a + b


async def test_a_sync_function_runs_in_a_worker_thread() -> None:
    seen: list[threading.Thread] = []

    @tool
    def where() -> str:
        """Say which thread runs this."""
        seen.append(threading.current_thread())
        return "here"

    assert (await call(where, {})).result == "here"
    assert seen and seen[0] is not threading.main_thread()
    assert add.name == "add_numbers"
    assert add.parameters["properties"]["a"] == {"type": "integer", "description": "an integer"}
    assert (await call(add, {"a": 2})).result == 2.5
    assert (await call(add, {"a": 2, "b": 1})).result == 3


async def test_the_context_goes_to_a_parameter_annotated_with_it() -> None:
    @tool
    async def whoami(ctx: ToolContext, loud: bool = False) -> dict[str, Any]:
        """Which chat calls."""
        return {"chat": ctx.chat_id, "loud": loud}

    assert list(whoami.parameters["properties"]) == ["loud"]
    assert (await call(whoami, {})).result == {"chat": str(CTX.chat_id), "loud": False}


async def test_a_typed_tool_reports_failures_like_any_tool() -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    @tool
    async def refuse(why: str) -> Any:
        """Refuse, one way or another."""
        if why == "raise":
            raise ToolError("not today")
        if why == "return":
            return ErrorResult({"error": "no", "kind": "policy"})
        return Point(1, 2)

    assert (await call(refuse, {"why": "raise"})).result == {"error": "not today"}
    returned = await call(refuse, {"why": "return"})
    assert returned.is_error and returned.result == {"error": "no", "kind": "policy"}
    assert (await call(refuse, {"why": "ok"})).result == {"x": 1, "y": 2}


async def test_the_explicit_schema_form_still_works() -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}

    @tool("echo", "Echo the arguments.", schema)
    async def echo(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        return {"args": args, "chat": str(ctx.chat_id)}

    @tool("noop", "Do nothing.")
    async def noop(args, ctx):  # type: ignore[no-untyped-def]
        return args

    assert isinstance(echo, FunctionTool) and isinstance(noop, FunctionTool)
    assert echo.parameters == schema
    assert noop.parameters == {"type": "object", "properties": {}}
    # Unchecked: the function receives the object the model sent.
    result = await call(echo, {"q": 3, "extra": True})
    assert result.result == {"args": {"q": 3, "extra": True}, "chat": str(CTX.chat_id)}
    assert (await call(noop, {"a": 1})).result == {"a": 1}


def test_functions_that_cannot_be_described_are_refused() -> None:
    async def variadic(*names: str) -> None:
        """Take anything."""

    async def undocumented(x: int) -> None:
        pass

    with pytest.raises(TypeError, match="args"):
        tool(variadic)
    with pytest.raises(TypeError, match="description"):
        tool(undocumented)
    assert tool(description="Given here.")(undocumented).description == "Given here."


def test_docstring_sections() -> None:
    summary, params = parse_docstring(
        """Do a thing.

        Longer text.

        Args:
            first (int): the first
                one, continued
            second: the second
        Raises:
            ValueError: never listed as a parameter
        """
    )
    assert summary == "Do a thing.\n\nLonger text."
    assert params == {"first": "the first one, continued", "second": "the second"}


# -- failures are logged in one line ---------------------------------------------------------


async def test_a_handled_tool_error_logs_one_line_at_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @tool
    async def broken(n: int) -> int:
        """Fail with a multi-line message."""
        raise RuntimeError(f"line one\nline two {n}")

    caplog.set_level(logging.DEBUG, logger="chatd_trio.tools")
    result = await call(broken, {"n": 4})
    assert result.is_error
    assert result.result == {"error": "RuntimeError: line one\nline two 4"}
    records = [r for r in caplog.records if r.name == "chatd_trio.tools"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    (warning,) = warnings
    assert warning.getMessage() == "tool broken raised RuntimeError: line one line two 4"
    assert warning.exc_info is None and "\n" not in warning.getMessage()
    assert warning.tool == "broken" and warning.chat_id == str(CTX.chat_id)  # type: ignore[attr-defined]
    (debug,) = [r for r in records if r.levelno == logging.DEBUG]
    assert debug.exc_info is not None and debug.exc_info[0] is RuntimeError


async def test_expected_failures_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="chatd_trio.tools")
    assert (await call(forecast, {})).is_error  # invalid arguments
    assert (await call(add, {"a": 1, "b": "x"})).is_error
    assert [r for r in caplog.records if r.name == "chatd_trio.tools"] == []


# -- tools built per turn reuse their arguments model ------------------------------------


def _per_turn_tool(scale: int, default: int = 1) -> Any:
    async def grow(n: int = default) -> int:
        """Grow a number.

        Args:
            n: the number
        """
        return n * scale

    return tool(grow)


class _Holder:
    def __init__(self, k: int) -> None:
        self.k = k

    async def add(self, n: int) -> int:
        """Add the holder's number.

        Args:
            n: the addend
        """
        return n + self.k


async def test_closures_of_one_def_share_one_arguments_model_and_keep_their_state() -> None:
    """A tool built each turn from the same `def` (a closure, a bound method) reuses its
    pydantic model and schema; each tool still calls its own closure or instance."""
    first, second = _per_turn_tool(2), _per_turn_tool(3)
    assert first.arguments is second.arguments
    assert first.parameters is second.parameters
    assert (await call(first, {"n": 5})).result == 10
    assert (await call(second, {"n": 5})).result == 15
    a, b = tool(_Holder(1).add), tool(_Holder(100).add)
    assert a.arguments is b.arguments
    assert (await call(a, {"n": 1})).result == 2
    assert (await call(b, {"n": 1})).result == 101


async def test_a_different_default_or_name_is_a_different_shape() -> None:
    plain, other = _per_turn_tool(1), _per_turn_tool(1, default=7)
    assert plain.arguments is not other.arguments
    assert (await call(other, {})).result == 7
    renamed = tool(name="grow_more")(_per_turn_tool(1).fn)
    assert renamed.name == "grow_more" and renamed.arguments is not plain.arguments
