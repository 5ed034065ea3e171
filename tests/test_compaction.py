"""Compaction (docs/spec.md §3.1): the chart on its own, then driven by the agent loop."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from statemachine.exceptions import TransitionNotAllowed

from chatd_trio.config import CompactionConfig, LoopConfig
from chatd_trio.domain import (
    ChatStatus,
    Message,
    NewMessage,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Visibility,
    text_of,
)
from chatd_trio.errors import ModelError
from chatd_trio.loop import run_turn, shortened_for_summary
from chatd_trio.models.base import PromptMessage, TextDelta
from chatd_trio.models.classify import CONTEXT_LENGTH
from chatd_trio.models.scripted import (
    ScriptedModel,
    ScriptStep,
    error_step,
    model_error,
    text_step,
    tool_step,
    usage_of,
)
from chatd_trio.store.base import Store, TurnOutcome
from chatd_trio.tools import ToolRegistry
from statecharts.base import Step
from statecharts.compaction import CompactionChart, over_threshold, usage_percent
from tests import test_loop
from tests.test_loop import FATAL, FaultyStore, Recorder, echo, finish, start_chat

LIMIT = 1000
PREFIX = CompactionConfig().summary_prefix
OVER = usage_of(800)  # 80 % of LIMIT: above the default 70 % threshold
UNDER = usage_of(100)


def config(max_steps: int = 50, **compaction: object) -> LoopConfig:
    return LoopConfig(
        max_steps=max_steps,
        compaction=CompactionConfig(context_limit=LIMIT, **compaction),  # type: ignore[arg-type]
    )


# test_loop's store fixtures: every test runs on both adapters.
store_kind = test_loop.store_kind
store_dsn = test_loop.store_dsn
store = test_loop.store


async def compressed(store: Store, chat_id: uuid.UUID) -> list[Message]:
    """The compressed messages: the latest (hidden) summary and every visible one."""
    messages = await store.prompt_messages(chat_id) + await store.messages_after(chat_id, 0)
    by_id = {m.id: m for m in messages if m.compressed}
    return [by_id[i] for i in sorted(by_id)]


def summarized_parts(rec: Recorder) -> list[ToolCallPart | ToolResultPart]:
    return [
        e.part
        for e in rec.parts
        if isinstance(e.part, ToolCallPart | ToolResultPart) and e.part.name == "chat_summarized"
    ]


def is_summary(message: PromptMessage, summary: str) -> bool:
    return message.role is Role.USER and message.parts == (TextPart(PREFIX + summary),)


# -- the chart ---------------------------------------------------------------------


def test_usage_percent_and_threshold_rule() -> None:
    assert usage_percent(700, 1000) == 70.0
    assert over_threshold(700, 1000, 70)
    assert not over_threshold(699, 1000, 70)
    assert not over_threshold(5000, 1000, 100)  # 100 % disables compaction
    assert not over_threshold(0, 1000, 1)  # no usage reported: nothing to measure
    assert not over_threshold(10, 0, 70)
    assert CompactionConfig(threshold_percent=0).effective_threshold == 70
    assert CompactionConfig(threshold_percent=150).effective_threshold == 70
    assert CompactionConfig(threshold_percent=100).effective_threshold == 100


def test_chart_pinned_path_for_one_step() -> None:
    chart = CompactionChart(max_steps=1, max_reentries=3)
    chart.send("loaded", answered=False)
    chart.send("step_persisted", tool_calls=False, over_threshold=True)
    chart.send("summary_ok")
    chart.send("post_run_check", over_threshold=True)
    chart.send("reloaded")
    chart.send("post_run_check", over_threshold=True)
    chart.send("summary_ok")

    assert [(s.source, s.event, s.target) for s in chart.trace] == [
        ("loading", "loaded", "stepping"),
        ("stepping", "step_persisted", "compacting"),
        ("compacting", "summary_ok", "checking"),
        ("checking", "post_run_check", "reentering"),
        ("reentering", "reloaded", "checking"),
        ("checking", "post_run_check", "safety_compacting"),
        ("safety_compacting", "summary_ok", "done"),
    ]
    assert (chart.steps_used, chart.compactions, chart.reentries) == (1, 2, 1)


def test_chart_context_exceeded_compacts_and_retries_the_step_once() -> None:
    chart = CompactionChart(max_steps=2, max_reentries=3)
    chart.send("loaded", answered=False)
    chart.send("step_persisted", tool_calls=True, over_threshold=False)
    chart.send("context_exceeded")
    assert (chart.state_id, chart.steps_used, chart.overflow_retries) == (
        "overflow_compacting",
        1,
        1,
    )
    chart.send("summary_ok")
    chart.send("reloaded")
    # The refused attempt gave its step back: the retry is the second step, within budget.
    assert (chart.state_id, chart.steps_used, chart.compactions) == ("stepping", 2, 1)
    chart.send("context_exceeded")
    assert chart.state_id == "failed"
    assert [(s.source, s.event, s.target, s.guard) for s in chart.trace[2:]] == [
        ("stepping", "context_exceeded", "overflow_compacting", "overflow_retry_left"),
        ("overflow_compacting", "summary_ok", "reloading", ""),
        ("reloading", "reloaded", "stepping", ""),
        ("stepping", "context_exceeded", "failed", ""),
    ]


def test_chart_context_exceeded_retry_limit_is_per_step() -> None:
    chart = CompactionChart(max_steps=5, max_reentries=3)
    chart.send("loaded", answered=False)
    for _ in range(3):
        chart.send("context_exceeded")
        chart.send("summary_ok")
        chart.send("reloaded")
        # Each step that gets through resets the limit for the next one.
        chart.send("step_persisted", tool_calls=True, over_threshold=False)
    assert (chart.state_id, chart.steps_used, chart.compactions) == ("stepping", 4, 3)


def test_chart_context_exceeded_without_retries_or_with_a_failed_summary_fails() -> None:
    chart = CompactionChart(max_steps=5, max_reentries=3, max_overflow_retries=0)
    chart.send("loaded", answered=False)
    chart.send("context_exceeded")
    assert chart.state_id == "failed"
    chart = CompactionChart(max_steps=5, max_reentries=3)
    chart.send("loaded", answered=False)
    chart.send("context_exceeded")
    chart.send("summary_failed")
    assert (chart.state_id, chart.compactions) == ("failed", 0)


def test_chart_refuses_events_its_table_does_not_allow() -> None:
    chart = CompactionChart(max_steps=3, max_reentries=3)
    with pytest.raises(TransitionNotAllowed):
        chart.send("summary_ok")
    with pytest.raises(TransitionNotAllowed):
        chart.send("post_run_check", over_threshold=False)  # loading checks nothing
    chart.send("loaded", answered=False)
    chart.send("step_persisted", tool_calls=True, over_threshold=False)
    assert chart.trace == [
        Step("loading", "loaded", "stepping"),
        Step("stepping", "step_persisted", "stepping", "tool_calls and budget_left"),
    ]
    assert chart.steps_used == 2


def _chart_in(state: str) -> CompactionChart:
    """A chart driven (through its own events) into `state`."""
    chart = CompactionChart(max_steps=3, max_reentries=3)
    paths: dict[str, list[tuple[str, dict[str, Any]]]] = {
        "loading": [],
        "stepping": [("loaded", {"answered": False})],
        "checking": [
            ("loaded", {"answered": False}),
            ("step_persisted", {"tool_calls": False, "over_threshold": False}),
        ],
        "reloading": [
            ("loaded", {"answered": False}),
            ("step_persisted", {"tool_calls": True, "over_threshold": True}),
            ("summary_ok", {}),
        ],
        "reentering": [
            ("loaded", {"answered": False}),
            ("step_persisted", {"tool_calls": False, "over_threshold": True}),
            ("summary_ok", {}),
            ("post_run_check", {"over_threshold": False}),
        ],
    }
    for event, data in paths[state]:
        chart.send(event, **data)
    assert chart.state_id == state
    return chart


@pytest.mark.parametrize(
    ("state", "event"),
    [
        ("checking", "interrupt"),
        ("checking", "shutdown"),
        ("checking", "write_refused"),
        ("checking", "store_unavailable"),
        ("checking", "model_failed"),
        ("reloading", "write_refused"),
        ("reentering", "write_refused"),
        ("loading", "model_failed"),
        ("reloading", "model_failed"),
        ("loading", "context_exceeded"),
        ("checking", "context_exceeded"),
        ("reloading", "context_exceeded"),
    ],
)
def test_ends_the_loop_cannot_observe_in_a_state_are_refused_there(state: str, event: str) -> None:
    """`checking` never waits, the reloads write nothing and call no model: an event
    that could only come from a driver bug is refused loudly, not taken."""
    chart = _chart_in(state)
    with pytest.raises(TransitionNotAllowed):
        chart.send(event)
    assert chart.state_id == state


@pytest.mark.parametrize("state", ["loading", "reloading", "reentering"])
def test_a_fence_while_loading_ends_the_turn_fenced(state: str) -> None:
    """The heartbeat can find the chat taken over while history loads (a replica that
    came back from an outage): the turn ends `fenced`, it does not raise."""
    chart = _chart_in(state)
    chart.send("fence")
    assert chart.state_id == "fenced"


# -- compaction driven by the loop -----------------------------------------------------


@pytest.mark.parametrize(
    ("reported_limit", "expected_limit"), [(None, LIMIT), (800, 800)], ids=["config", "model"]
)
async def test_threshold_reached_persists_summary_with_tokens_limit_percent(
    store: Store, reported_limit: int | None, expected_limit: int
) -> None:
    lease = await start_chat(store)
    usage = usage_of(600)  # 60 % of 1000 (no compaction) but 75 % of 800
    model = ScriptedModel(
        [text_step("answer", usage=usage, context_limit=reported_limit), text_step("more")],
        summaries=["the summary"],
    )

    result = await run_turn(store, lease, model, config=config(threshold_percent=60))

    assert result.outcome is TurnOutcome.DONE
    assert result.compactions == 1
    summary, call, report = await compressed(store, lease.chat_id)
    assert (summary.role, summary.visibility) == (Role.USER, Visibility.MODEL)
    assert summary.parts == (TextPart(PREFIX + "the summary"),)
    assert (call.role, call.visibility) == (Role.ASSISTANT, Visibility.USER)
    assert call.parts == (ToolCallPart(call.parts[0].call_id, "chat_summarized", "{}"),)  # type: ignore[union-attr]
    assert (report.role, report.visibility) == (Role.TOOL, Visibility.USER)
    (part,) = report.parts
    assert isinstance(part, ToolResultPart) and not part.is_error
    assert part.result == {
        "summary": "the summary",
        "source": "automatic",
        "threshold_percent": 60,
        "usage_percent": pytest.approx(600 / expected_limit * 100),
        "context_tokens": 600,
        "context_limit_tokens": expected_limit,
    }


async def test_below_threshold_at_configured_limit_does_not_compact(store: Store) -> None:
    lease = await start_chat(store)
    model = ScriptedModel([text_step("answer", usage=usage_of(600))], summaries=["never"])

    result = await run_turn(store, lease, model, config=config())

    assert (result.compactions, model.generate_count) == (0, 0)
    assert result.final_state == "done"


async def test_publish_order_tool_call_part_generate_persist_tool_result_part(
    store: Store,
) -> None:
    log: list[str] = []
    faulty = FaultyStore(store, log)
    lease = await start_chat(store)
    rec = Recorder(log=log)

    def summarise(prompt: Sequence[PromptMessage], index: int) -> str:
        log.append("generate")
        return "S"

    model = ScriptedModel(
        [tool_step([("echo", {})], usage=OVER), text_step("ok")], summaries=summarise
    )

    await run_turn(
        faulty.as_store(),
        lease,
        model,
        tools=ToolRegistry([echo]),
        config=config(max_steps=1),
        callbacks=rec.callbacks(),
    )

    # The step the compaction summarises is written first, then published.
    start = log.index("persist_step")
    assert log[start : start + 3] == ["persist_step", "message:assistant", "message:tool"]
    start = log.index("part:tool_call:chat_summarized")
    assert log[start : start + 4] == [
        "part:tool_call:chat_summarized",
        "generate",
        "persist_compaction",
        "part:tool_result:chat_summarized",
    ]
    # then the visible call and result arrive as durable messages (the summary is hidden)
    assert log[start + 4 : start + 6] == ["message:assistant", "message:tool"]
    # the summary request is the whole history followed by one user message with the prompt
    (prompt,) = model.generate_prompts
    assert [m.role for m in prompt] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.USER]
    assert prompt[-1].parts == (TextPart(CompactionConfig().summary_prompt),)


async def test_no_publish_below_threshold(store: Store) -> None:
    lease = await start_chat(store)
    model = ScriptedModel(
        [tool_step([("echo", {})], usage=UNDER), text_step("ok", usage=UNDER)], summaries=["S"]
    )
    rec = Recorder()

    result = await run_turn(
        store, lease, model, tools=ToolRegistry([echo]), config=config(), callbacks=rec.callbacks()
    )

    assert result.compactions == 0
    assert summarized_parts(rec) == []
    assert model.generate_count == 0
    assert await compressed(store, lease.chat_id) == []


async def test_mid_loop_compaction_reloads_messages_and_model_called_exactly_twice(
    store: Store,
) -> None:
    lease = await start_chat(store)
    model = ScriptedModel(
        [tool_step([("echo", {})], usage=OVER), text_step("ok", usage=UNDER)], summaries=["S"]
    )

    result = await run_turn(store, lease, model, tools=ToolRegistry([echo]), config=config())

    assert result.outcome is TurnOutcome.DONE
    assert model.stream_count == 2
    assert (result.compactions, result.reentries) == (1, 0)
    assert [(s.source, s.target) for s in result.trace] == [
        ("loading", "stepping"),
        ("stepping", "compacting"),
        ("compacting", "reloading"),
        ("reloading", "stepping"),
        ("stepping", "checking"),
        ("checking", "done"),
    ]
    # the second step sees the reloaded history: the summary replaces everything before it
    (summary,) = model.stream_prompts[1]
    assert is_summary(summary, "S")
    # the final answer is the caller's to write, after the compaction
    assert [m.parts for m in result.final_messages] == [(TextPart("ok"),)]
    await finish(store, lease, result)
    prompt = await store.prompt_messages(lease.chat_id)
    assert [m.parts for m in prompt] == [(TextPart(PREFIX + "S"),), (TextPart("ok"),)]


async def test_no_post_run_compaction_after_inline_one_ends_at_the_step_limit(
    store: Store,
) -> None:
    faulty = FaultyStore(store)
    lease = await start_chat(store)
    # One step (the budget), over the threshold, with tool calls: inline compaction only;
    # the budget ran out while the model still called tools.
    model = ScriptedModel([tool_step([("echo", {})], usage=OVER)], summaries=["S", "S2"])

    result = await run_turn(
        faulty.as_store(), lease, model, tools=ToolRegistry([echo]), config=config(max_steps=1)
    )

    assert result.outcome is TurnOutcome.DONE
    assert model.generate_count == 1
    assert len(faulty.ops("persist_compaction")) == 1
    assert (result.compactions, result.reentries, result.final_state) == (1, 0, "step_limit")
    assert result.trace[-1] == Step("checking", "post_run_check", "step_limit", "out_of_steps")


async def test_summary_errors_reported_run_still_succeeds(store: Store) -> None:
    lease = await start_chat(store)
    # inline: empty summary; post-run safety net: the summary call fails
    model = ScriptedModel(
        [text_step("answer", usage=OVER)],
        summaries=["   ", model_error(500, kind="server_error", message="summary boom")],
    )
    rec = Recorder()

    result = await run_turn(store, lease, model, config=config(), callbacks=rec.callbacks())

    assert result.outcome is TurnOutcome.DONE
    assert result.compactions == 0
    assert model.generate_count == 2
    assert [e.kind for e in rec.errors] == ["compaction", "compaction"]
    assert "empty summary" in rec.errors[0].message
    assert "summary boom" in rec.errors[1].message
    parts = summarized_parts(rec)
    assert [type(p).__name__ for p in parts] == ["ToolCallPart", "ToolResultPart"] * 2
    assert all(p.is_error for p in parts if isinstance(p, ToolResultPart))
    assert await compressed(store, lease.chat_id) == []
    # The answer was written before the compaction was tried: the finish has nothing left.
    assert result.final_messages == ()
    assert [m.parts for m in await store.messages_after(lease.chat_id, 0)][-1] == (
        TextPart("answer"),
    )


async def test_compaction_persist_failure_reported_run_still_succeeds(store: Store) -> None:
    faulty = FaultyStore(store)
    faulty.faults["persist_compaction"] = [FATAL, FATAL]
    lease = await start_chat(store)
    model = ScriptedModel([text_step("answer", usage=OVER)], summaries=["S", "S"])
    rec = Recorder()

    result = await run_turn(
        faulty.as_store(), lease, model, config=config(), callbacks=rec.callbacks()
    )

    assert result.outcome is TurnOutcome.DONE
    assert result.compactions == 0
    assert len(faulty.ops("persist_compaction")) == 2  # inline, then the post-run safety net
    assert [e.message for e in rec.errors] == ["failed to persist compaction result"] * 2
    assert await compressed(store, lease.chat_id) == []


async def test_text_only_over_threshold_final_step_reenters_with_summary_in_prompt(
    store: Store,
) -> None:
    lease = await start_chat(store)
    model = ScriptedModel(
        [text_step("first", usage=OVER), text_step("second", usage=UNDER)], summaries=["S"]
    )

    result = await run_turn(store, lease, model, config=config())

    assert result.outcome is TurnOutcome.DONE
    assert model.stream_count == 2
    assert (result.compactions, result.reentries) == (1, 1)
    assert any(is_summary(m, "S") for m in model.stream_prompts[1])
    assert not any(is_summary(m, "S") for m in model.stream_prompts[0])


async def test_reentry_stops_after_three(store: Store) -> None:
    lease = await start_chat(store)
    model = ScriptedModel(
        lambda prompt, i: text_step(f"answer {i}", usage=OVER),
        summaries=lambda prompt, i: f"S{i}",
    )

    result = await run_turn(store, lease, model, config=config())

    assert result.outcome is TurnOutcome.DONE
    assert result.reentries == 3
    assert model.stream_count == 4  # the first pass plus three re-entries
    assert result.compactions == 4
    assert result.final_state == "exhausted"


async def test_max_steps_one_compaction_persists_exactly_twice(store: Store) -> None:
    faulty = FaultyStore(store)
    lease = await start_chat(store)
    model = ScriptedModel([text_step("answer", usage=OVER)], summaries=["S1", "S2"])

    result = await run_turn(faulty.as_store(), lease, model, config=config(max_steps=1))

    assert result.outcome is TurnOutcome.DONE
    assert len(faulty.ops("persist_compaction")) == 2
    assert model.stream_count == 1
    visible = [m for m in await store.messages_after(lease.chat_id, 0) if m.compressed]
    assert [m.role for m in visible] == [Role.ASSISTANT, Role.TOOL] * 2
    assert (await store.prompt_messages(lease.chat_id))[0].parts == (TextPart(PREFIX + "S2"),)


async def test_threshold_100_disables_compaction(store: Store) -> None:
    lease = await start_chat(store)
    model = ScriptedModel([text_step("answer", usage=usage_of(5000))], summaries=["S"])

    result = await run_turn(store, lease, model, config=config(threshold_percent=100))

    assert (result.compactions, model.generate_count) == (0, 0)


# -- a prompt too long for the model's context window -----------------------------------

TOO_LONG = "HTTP 400 context length exceeded: prompt is too long: 210000 tokens > 200000 maximum"


def too_long() -> ModelError:
    return model_error(400, retryable=False, kind=CONTEXT_LENGTH, message=TOO_LONG)


async def test_a_context_length_error_compacts_and_runs_the_step_again(store: Store) -> None:
    lease = await start_chat(store)
    refused = ScriptStep(deltas=(TextDelta("partial"),), error=too_long(), cut_after=1)
    model = ScriptedModel(
        [tool_step([("echo", {})], usage=UNDER), refused, text_step("ok", usage=UNDER)],
        summaries=["S"],
    )
    rec = Recorder()

    result = await run_turn(
        store, lease, model, tools=ToolRegistry([echo]), config=config(), callbacks=rec.callbacks()
    )

    assert (result.outcome, result.error) == (TurnOutcome.DONE, None)
    # The refused attempt gave its step back: two steps, one retry, three streams.
    assert (result.steps, result.retries, result.compactions) == (2, 1, 1)
    assert model.stream_count == 3
    assert [(s.source, s.event, s.target) for s in result.trace] == [
        ("loading", "loaded", "stepping"),
        ("stepping", "step_persisted", "stepping"),
        ("stepping", "context_exceeded", "overflow_compacting"),
        ("overflow_compacting", "summary_ok", "reloading"),
        ("reloading", "reloaded", "stepping"),
        ("stepping", "step_persisted", "checking"),
        ("checking", "post_run_check", "done"),
    ]
    # The retry is announced first (subscribers drop the refused attempt's parts), then
    # the compaction runs, then the step again on the summary alone.
    (retry,) = rec.retries
    assert (retry.kind, retry.delay_s, retry.error, retry.attempt) == (
        CONTEXT_LENGTH,
        0.0,
        TOO_LONG,
        1,
    )
    assert rec.log.index("retry") < rec.log.index("part:tool_call:chat_summarized")
    (summary,) = model.stream_prompts[2]
    assert is_summary(summary, "S")
    # The summary saw the whole history; its report says why it ran.
    (prompt,) = model.generate_prompts
    assert [m.role for m in prompt] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.USER]
    _, _, report = await compressed(store, lease.chat_id)
    (part,) = report.parts
    assert isinstance(part, ToolResultPart) and part.result["reason"] == CONTEXT_LENGTH  # type: ignore[index, call-overload]
    await finish(store, lease, result)
    texts = [text_of(m.parts) for m in await store.messages_after(lease.chat_id, 0)]
    assert "partial" not in texts and texts[-1] == "ok"


async def test_still_too_long_after_compacting_ends_the_turn_with_a_clear_error(
    store: Store,
) -> None:
    lease = await start_chat(store)
    model = ScriptedModel(
        [error_step(too_long()), error_step(too_long()), text_step("never")], summaries=["S"]
    )

    result = await run_turn(store, lease, model, config=config())

    assert (result.outcome, result.final_state) == (TurnOutcome.ERROR, "failed")
    assert (model.stream_count, model.generate_count, result.compactions) == (2, 1, 1)
    assert result.error is not None
    assert (result.error.kind, result.error.retryable, result.error.status_code) == (
        CONTEXT_LENGTH,
        False,
        400,
    )
    assert result.error.message == f"still too long after compacting the history: {TOO_LONG}"
    assert result.trace[-1] == Step("stepping", "context_exceeded", "failed")
    fin = await finish(store, lease, result)
    assert (fin.chat.status, fin.chat.last_error) == (ChatStatus.ERROR, result.error.message)


async def test_context_length_with_a_failed_summary_ends_the_turn_saying_both(
    store: Store,
) -> None:
    lease = await start_chat(store)
    model = ScriptedModel(
        [error_step(too_long())],
        summaries=[model_error(503, kind="server_error", message="summary boom")],
    )
    rec = Recorder()

    result = await run_turn(store, lease, model, config=config(), callbacks=rec.callbacks())

    assert (result.outcome, result.final_state) == (TurnOutcome.ERROR, "failed")
    assert result.error is not None and result.error.kind == CONTEXT_LENGTH
    assert result.error.message == (
        f"{TOO_LONG} (compacting the history to make room failed: summary failed: summary boom)"
    )
    assert result.trace[-1] == Step("overflow_compacting", "summary_failed", "failed")
    assert [e.kind for e in rec.errors] == ["compaction"]


async def test_without_context_length_retries_the_error_ends_the_turn_as_it_came(
    store: Store,
) -> None:
    lease = await start_chat(store)
    model = ScriptedModel([error_step(too_long())], summaries=["S"])

    result = await run_turn(store, lease, model, config=config(context_length_retries=0))

    assert result.error is not None and result.error.message == TOO_LONG
    assert (model.generate_count, result.retries) == (0, 0)


async def test_a_summary_prompt_refused_as_too_long_loses_its_older_half_until_it_fits(
    store: Store,
) -> None:
    lease = await start_chat(store)
    steps = [tool_step([("echo", {"n": n})], call_id_prefix=f"s{n}") for n in range(4)]
    model = ScriptedModel(
        [*steps, error_step(too_long()), text_step("ok")],
        summaries=[too_long(), too_long(), "S"],
    )

    result = await run_turn(store, lease, model, tools=ToolRegistry([echo]), config=config())

    assert (result.outcome, result.compactions) == (TurnOutcome.DONE, 1)
    # user, then 4 x (assistant, tool); each refusal drops the older half (never leaving a
    # tool result without its call); the summary prompt comes last every time.
    prompts = model.generate_prompts
    assert [len(p) for p in prompts] == [10, 5, 3]
    assert [p[0].role for p in prompts] == [Role.USER, Role.ASSISTANT, Role.ASSISTANT]
    assert all(p[-1].parts == (TextPart(CompactionConfig().summary_prompt),) for p in prompts)
    assert prompts[2][:-1] == prompts[0][-3:-1]


def test_shortened_for_summary_keeps_system_and_summary_and_whole_tool_calls() -> None:
    def msg(role: Role, text: str = "", compressed: bool = False) -> NewMessage:
        return NewMessage(role, (TextPart(text),), compressed=compressed)

    system = msg(Role.SYSTEM, "rules")
    summary = msg(Role.USER, "summary", compressed=True)
    history = [
        system,
        summary,
        msg(Role.USER, "u1"),
        msg(Role.ASSISTANT, "a1"),
        msg(Role.TOOL, "t1"),
        msg(Role.TOOL, "t2"),
        msg(Role.ASSISTANT, "a2"),
        msg(Role.USER, "u2"),
    ]
    # Movable: u1 a1 t1 t2 a2 u2; the half starts at t2, the next user message is u2.
    assert shortened_for_summary(history) == [system, summary, history[-1]]
    # Without a later user message the cut skips tool results to the next assistant one.
    assert shortened_for_summary(history[:-1]) == [system, summary, history[6]]
    assert shortened_for_summary([system, summary, msg(Role.USER, "only")]) is None
    call, result = msg(Role.ASSISTANT, "call"), msg(Role.TOOL, "result")
    assert shortened_for_summary([msg(Role.USER), call, result]) == [call, result]
    assert shortened_for_summary([msg(Role.USER), msg(Role.TOOL)]) is None
