"""Property tests of the agent loop over random step scripts (docs/spec.md §3 and §3.1).

Each example runs one turn under `MockClock(autojump_threshold=0)` with Hypothesis
controlling Trio's scheduling (`st.random_module()`): random tool calls, usages
around the threshold, retryable failures, summary failures and an interrupt at a
random virtual time. The chart transitions every run fires are collected; a test
asserts that together they cover every transition of `CompactionChart`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd_trio.config import CompactionConfig, LoopConfig, RetryConfig
from chatd_trio.domain import JSON, Message, Role, ToolCallPart, ToolResultPart
from chatd_trio.loop import TurnControl, TurnResult, run_turn
from chatd_trio.models.base import PromptMessage
from chatd_trio.models.scripted import (
    ScriptedModel,
    ScriptStep,
    error_step,
    model_error,
    text_step,
    tool_step,
    usage_of,
)
from chatd_trio.store.base import TurnOutcome
from chatd_trio.store.memory import MemoryStore
from chatd_trio.tools import ToolContext, ToolRegistry, tool
from statecharts.base import Step, transitions_of
from statecharts.compaction import FINAL_STATES, CompactionChart
from tests.test_loop import start_chat

LIMIT = 1000
MAX_REENTRIES = 3
SEEN: set[Step] = set()
RANDOM_RUNS: list[Case] = []

# Usages around the default 70 % threshold of LIMIT (0: the provider reported none).
TOKENS = st.sampled_from([0, 300, 699, 700, 950])


@dataclass(frozen=True)
class StepPlan:
    calls: tuple[float, ...]  # one tool call per entry: how long the tool runs
    tokens: int
    failures: int  # retryable failures before the step streams


@dataclass(frozen=True)
class Case:
    steps: tuple[StepPlan, ...]
    summaries: tuple[str | None, ...]  # None: the summary call fails; "": empty summary
    max_steps: int
    interrupt_at: float | None
    parallel: bool = True


@tool("work", "Sleep for `d` virtual seconds.")
async def work(args: dict[str, JSON], ctx: ToolContext) -> JSON:
    await trio.sleep(float(args["d"]))
    return {"slept": args["d"]}


def script(case: Case) -> list[ScriptStep]:
    out: list[ScriptStep] = []
    for n, plan in enumerate(case.steps):
        out += [error_step(model_error(503, kind="overloaded"))] * plan.failures
        usage = usage_of(plan.tokens)
        if plan.calls:
            calls = [("work", {"d": d}) for d in plan.calls]
            out.append(
                tool_step(calls, text="t", usage=usage, call_id_prefix=f"s{n}", latency=0.25)
            )
        else:
            out.append(text_step(f"answer {n}", usage=usage, chunks=2, latency=0.25))
    return out


async def run_case(case: Case) -> tuple[TurnResult, list[Message], ScriptedModel]:
    store = MemoryStore()
    chat_id, worker = await start_chat(store)
    steps = script(case)

    def next_step(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
        return steps[index] if index < len(steps) else text_step("end", usage=usage_of(10))

    def summarise(prompt: Sequence[PromptMessage], index: int) -> str:
        outcome = case.summaries[index % len(case.summaries)]
        if outcome is None:
            raise model_error(500, message="summary failed")
        return outcome

    model = ScriptedModel(next_step, summaries=summarise)
    config = LoopConfig(
        max_steps=case.max_steps,
        parallel_tools=case.parallel,
        retry=RetryConfig(base_delay=0.5, max_delay=2.0),
        compaction=CompactionConfig(context_limit=LIMIT, max_compaction_retries=MAX_REENTRIES),
    )
    control = TurnControl()
    results: list[TurnResult] = []

    async def turn(cancel: trio.CancelScope) -> None:
        results.append(
            await run_turn(
                store,
                chat_id,
                worker,
                model,
                tools=ToolRegistry([work]),
                config=config,
                control=control,
            )
        )
        cancel.cancel()

    async def interrupter(at: float) -> None:
        await trio.sleep(at)
        control.interrupt()

    async with trio.open_nursery() as nursery:
        if case.interrupt_at is not None:
            nursery.start_soon(interrupter, case.interrupt_at)
        nursery.start_soon(turn, nursery.cancel_scope)
    (result,) = results
    return result, await store.messages_after(chat_id, 0), model


def check(case: Case, result: TurnResult, messages: list[Message], model: ScriptedModel) -> None:
    SEEN.update(result.trace)
    # max_steps is shared across re-entries; re-entries are bounded
    assert result.steps <= case.max_steps
    steps_written = [m for m in messages if m.role is Role.ASSISTANT and not m.compressed]
    assert len(steps_written) <= case.max_steps
    assert result.reentries <= MAX_REENTRIES
    # only retryable failures and interrupts were injected
    if case.interrupt_at is None:
        assert result.outcome is TurnOutcome.DONE
    else:
        assert result.outcome in (TurnOutcome.DONE, TurnOutcome.INTERRUPTED)
    if result.outcome is TurnOutcome.DONE:
        assert result.final_state in FINAL_STATES
        assert model.stream_count == result.steps + result.retries
    # every tool call has exactly one result, right after its call, in call order
    calls = [p for m in messages for p in m.parts if isinstance(p, ToolCallPart)]
    results = [p for m in messages for p in m.parts if isinstance(p, ToolResultPart)]
    assert sorted(c.call_id for c in calls) == sorted(r.call_id for r in results)
    assert len({c.call_id for c in calls}) == len(calls)
    for i, message in enumerate(messages):
        ids = [p.call_id for p in message.parts if isinstance(p, ToolCallPart)]
        following = messages[i + 1 : i + 1 + len(ids)]
        assert [m.role for m in following] == [Role.TOOL] * len(ids)
        assert [m.parts[0].call_id for m in following] == ids  # type: ignore[union-attr]
    # the visible compaction records match the chart's count
    summarized = [c for c in calls if c.name == "chat_summarized"]
    assert len(summarized) == result.compactions
    # the chart's trace is a valid path from its initial state
    universe = transitions_of_chart()
    state = "stepping"
    for step in result.trace:
        assert step in universe
        assert step.source == state
        state = step.target
    assert state == result.final_state


def transitions_of_chart() -> set[Step]:
    return transitions_of(CompactionChart)


def run(case: Case) -> None:
    async def main() -> None:
        check(case, *await run_case(case))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


step_plans = st.builds(
    StepPlan,
    calls=st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), max_size=3).map(tuple),
    tokens=TOKENS,
    failures=st.sampled_from([0, 0, 0, 1, 2]),
)
cases = st.builds(
    Case,
    steps=st.lists(step_plans, min_size=1, max_size=8).map(tuple),
    summaries=st.lists(st.sampled_from(["S", "S", "S", "", None]), min_size=1, max_size=4).map(
        tuple
    ),
    max_steps=st.integers(1, 8),
    interrupt_at=st.none() | st.floats(0, 15, allow_nan=False),
    parallel=st.booleans(),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases, _random=st.random_module())
def test_loop_invariants_over_random_scripts(case: Case, _random: object) -> None:
    RANDOM_RUNS.append(case)
    run(case)


def text(tokens: int) -> StepPlan:
    return StepPlan((), tokens, 0)


def tools(tokens: int) -> StepPlan:
    return StepPlan((0.5,), tokens, 0)


# Paths that random scripts reach rarely; each names the transition it guarantees.
CRAFTED = [
    # safety_compacting -summary_ok-> reentering: inline summary empty, safety net succeeds
    Case((text(950), text(10)), ("", "S"), 5, None),
    # safety_compacting -summary_ok-> exhausted: three re-entries, then the same
    Case((text(950),) * 5, ("S", "S", "S", "", "S"), 8, None),
    # safety_compacting -summary_failed-> done
    Case((text(950),), ("", None), 3, None),
    # compacting -summary_failed-> stepping, then compacting -summary_ok-> reloading
    Case((tools(950), tools(950), text(10)), ("", "S"), 5, None),
    # compacting -summary_failed-> checking (tool calls, no step left)
    Case((tools(950),), ("",), 1, None),
    # compacting -summary_ok-> checking (tool calls, no step left)
    Case((tools(950),), ("S",), 1, None),
    # reentering -reloaded-> checking (the pinned max_steps=1 case)
    Case((text(950),), ("S",), 1, None),
    # stepping -step_persisted-> checking (tool calls, no step left)
    Case((tools(10),), ("S",), 1, None),
    # checking -post_run_check-> exhausted
    Case((text(950),) * 4, ("S",), 8, None),
]


def test_compaction_chart_transition_coverage_is_complete() -> None:
    if not RANDOM_RUNS:
        # run alone: collect the random scripts' transitions first
        test_loop_invariants_over_random_scripts()
    for case in CRAFTED:
        run(case)
    missing = transitions_of_chart() - SEEN
    assert not missing, f"transitions never fired: {sorted(missing)}"
