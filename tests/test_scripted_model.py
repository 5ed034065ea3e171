"""The deterministic scripted model used by tests, the demo and the scale test."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from chatd_trio.domain import NewMessage, Role, TextPart, ToolResultPart, Usage
from chatd_trio.errors import ModelError
from chatd_trio.models.base import (
    Delta,
    Finish,
    Model,
    ReasoningDelta,
    TextDelta,
    ToolCallDone,
    ToolSpec,
)
from chatd_trio.models.scripted import (
    ScriptedModel,
    ScriptStep,
    ToolsThenAnswer,
    error_step,
    model_error,
    text_step,
    tool_step,
    usage_of,
)

USER = NewMessage(Role.USER, (TextPart("hi"),))


async def collect(model: ScriptedModel, prompt: list[NewMessage] | None = None) -> list[Delta]:
    out: list[Delta] = []
    async with model.stream(prompt or [USER], []) as deltas:
        async for delta in deltas:
            out.append(delta)
    return out


def test_scripted_model_satisfies_the_model_port() -> None:
    assert isinstance(ScriptedModel([]), Model)


async def test_plays_steps_in_order_and_records_prompts() -> None:
    model = ScriptedModel(
        [
            text_step("hello", reasoning="why", usage=usage_of(10, 2), chunks=2),
            tool_step([("echo", {"a": 1})], usage=usage_of(20)),
        ]
    )
    spec = ToolSpec("echo", "Echo.", {"type": "object"})

    async with model.stream([USER], [spec]) as deltas:
        first = [d async for d in deltas]
    second = await collect(model, [USER, USER])

    assert first == [
        ReasoningDelta("why"),
        TextDelta("hel"),
        TextDelta("lo"),
        Finish(Usage(10, 2, 0, 0, 12), "stop", None),
    ]
    assert second == [
        ToolCallDone(0, "call_0", "echo", '{"a": 1}'),
        Finish(usage_of(20), "tool_calls", None),
    ]
    assert model.stream_prompts == [[USER], [USER, USER]]
    assert model.stream_tools == [[spec], []]


async def test_latency_runs_on_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    model = ScriptedModel([text_step("abc", chunks=3, latency=0.5)])
    start = trio.current_time()

    deltas = await collect(model)

    assert len(deltas) == 4
    assert trio.current_time() - start == pytest.approx(2.0)


async def test_error_at_open_and_cut_mid_stream() -> None:
    err = model_error(429, retry_after=3)
    cut = ScriptStep(
        deltas=(TextDelta("a"), TextDelta("b"), TextDelta("c")),
        error=model_error(502, kind="server_error"),
        cut_after=2,
    )
    model = ScriptedModel([error_step(err), cut])

    with pytest.raises(ModelError) as opened:
        await collect(model)
    assert opened.value is err
    assert (opened.value.status_code, opened.value.retry_after, opened.value.retryable) == (
        429,
        3,
        True,
    )

    seen: list[Delta] = []
    with pytest.raises(ModelError, match="HTTP 502"):
        async with model.stream([USER], []) as deltas:
            async for delta in deltas:
                seen.append(delta)
    assert seen == [TextDelta("a"), TextDelta("b")]


async def test_hang_after_blocks_until_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    model = ScriptedModel([ScriptStep(deltas=(TextDelta("a"), TextDelta("b")), hang_after=1)])
    seen: list[Delta] = []

    with trio.move_on_after(100) as scope:
        async with model.stream([USER], []) as deltas:
            async for delta in deltas:
                seen.append(delta)

    assert scope.cancelled_caught
    assert seen == [TextDelta("a")]


async def test_exhausted_scripts_raise_non_retryable_errors() -> None:
    model = ScriptedModel([text_step("only")], summaries=["one", model_error(500)])
    await collect(model)

    with pytest.raises(ModelError) as exhausted:
        await collect(model)
    assert not exhausted.value.retryable
    assert exhausted.value.kind == "script_exhausted"

    assert (await model.generate([USER])).text == "one"
    with pytest.raises(ModelError, match="HTTP 500"):
        await model.generate([USER])
    with pytest.raises(ModelError, match="summary script exhausted"):
        await model.generate([USER])
    assert model.generate_prompts == [[USER]] * 3


async def test_tools_then_answer_is_an_endless_same_shaped_script() -> None:
    model = ScriptedModel(ToolsThenAnswer(calls=3, tool_name="work", text="finished"))
    tool_msg = NewMessage(Role.TOOL, (ToolResultPart("x", "work", 1),))

    call_ids: set[str] = set()
    for turn in range(3):
        asks = await collect(model, [USER])
        calls = [d for d in asks if isinstance(d, ToolCallDone)]
        assert [c.name for c in calls] == ["work"] * 3
        call_ids.update(c.call_id for c in calls)
        answer = await collect(model, [USER, tool_msg])
        assert answer[0] == TextDelta("finished"), turn

    assert len(call_ids) == 9  # unique across turns, so one chat's history never repeats one
    assert model.stream_count == 6
