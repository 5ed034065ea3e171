"""Property tests of the agent loop over random step scripts and faults (docs/spec.md §1,
§3 and §3.1).

Each example runs one turn under `MockClock(autojump_threshold=0)` with Hypothesis
controlling Trio's scheduling (`st.random_module()`): random tool calls, usages around
the threshold, retryable model failures, summary failures, and faults: a user
interrupt, a replica shutdown or the replica learning that the run lost the chat (a
fence; at a virtual time, or while a given store call is in flight), a refused write
(the user edits the chat, or another run takes it over, just before a given write), a
store outage (a run of store calls failing before they reach
the database, or after they committed, the acknowledgement lost), a non-retryable
model failure, a prompt the model refuses as too long (once or twice), a history
that already ends in the answer (a recovered turn). After the turn, the caller's
finish is made as the Server makes it.

The invariant (`check`): the turn's outcome is the one its chart's final state names,
along a path the chart declares; the outcome is explained by the faults (no fault, no
stop: DONE; ERROR only from a non-retryable model failure or a refused prompt; LOST
only from a refused write or a fence; UNAVAILABLE only from an outage longer than the
retry budget; INTERRUPTED and
SHUTDOWN only when stopped, a shutdown recorded in `control.result`); nothing lands
after a refusal; and what the store holds after the finish holds every step at most
once, every tool call with exactly one result right after it, at most `max_steps`
steps, the answer of a recovered turn only once; and every message the loop wrote
was published once, in id order.

The chart transitions every run fires are collected; a test asserts that together
they cover every transition of `CompactionChart`, each guarded branch on its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd_trio.config import CompactionConfig, LoopConfig, RetryConfig, StoreRetryConfig
from chatd_trio.domain import (
    JSON,
    Message,
    NewMessage,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    text_of,
)
from chatd_trio.loop import OUTCOMES, TurnCallbacks, TurnControl, TurnResult, run_turn
from chatd_trio.models.base import PromptMessage
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
from chatd_trio.store.base import Lease, TurnOutcome
from chatd_trio.store.memory import MemoryStore
from chatd_trio.strategies import Strategies, ToolCalls
from chatd_trio.tools import ToolContext, ToolRegistry, tool
from statecharts.base import Step, transitions_of
from statecharts.compaction import FINAL_STATES, CompactionChart
from tests.test_loop import AFTER, BEFORE, OK, FaultyStore, finish, start_chat

LIMIT = 1000
MAX_REENTRIES = 3
SEEN: set[Step] = set()
FINALS_SEEN: set[str] = set()
RANDOM_RUNS: list[Case] = []

# Usages around the default 70 % threshold of LIMIT (0: the provider reported none).
TOKENS = st.sampled_from([0, 300, 699, 700, 950])
# Store writes are retried for 10 s: waits 0.5, 1, 2, 2, 2, 2; the 7th failure in a
# row ends the turn `unavailable`.
STORE_RETRY = StoreRetryConfig(base_delay=0.5, max_delay=2.0, budget=10.0)
LONG_OUTAGE = 7
RECOVERED_ANSWER = "the stored answer"
TOO_LONG = model_error(400, retryable=False, kind=CONTEXT_LENGTH, message="prompt is too long")


@dataclass(frozen=True)
class StepPlan:
    calls: tuple[float, ...]  # one tool call per entry: how long the tool runs
    tokens: int
    failures: int  # retryable failures before the step streams
    fatal: bool = False  # the step's model call fails, not retryable
    # The model refuses the step's prompt as too long this many times first: once is
    # compacted away (unless the summary fails); twice ends the turn.
    overflow: int = 0


@dataclass(frozen=True)
class Stop:
    """A user interrupt, a replica shutdown or a fence (the replica learnt that the run
    lost the chat), at a virtual time or during a store call."""

    kind: str  # "interrupt" | "shutdown" | "fence"
    at_time: float | None = None  # 0: before the turn starts
    at_call: int | None = None  # while the n-th store call of the turn is in flight


@dataclass(frozen=True)
class Case:
    steps: tuple[StepPlan, ...]
    summaries: tuple[str | None, ...]  # None: the summary call fails; "": empty summary
    max_steps: int
    stop: Stop | None = None
    parallel: bool = True
    refuse: tuple[int, str] | None = None  # before the n-th write: "edit" | "takeover"
    # (first store call, how many fail in a row, BEFORE or AFTER the database has them)
    outage: tuple[int, int, str] | None = None
    answered: bool = False  # the history already ends in the answer (a recovered turn)


@tool("work", "Sleep for `d` virtual seconds.")
async def work(args: dict[str, JSON], ctx: ToolContext) -> JSON:
    await trio.sleep(float(args["d"]))
    return {"slept": args["d"]}


def script(case: Case) -> list[ScriptStep]:
    out: list[ScriptStep] = []
    for n, plan in enumerate(case.steps):
        out += [error_step(model_error(503, kind="overloaded"))] * plan.failures
        out += [error_step(TOO_LONG)] * plan.overflow
        usage = usage_of(plan.tokens)
        if plan.fatal:
            out.append(error_step(model_error(400, retryable=False, kind="bad_request")))
        elif plan.calls:
            calls = [("work", {"d": d}) for d in plan.calls]
            out.append(
                tool_step(calls, text=f"t{n}", usage=usage, call_id_prefix=f"s{n}", latency=0.25)
            )
        else:
            out.append(text_step(f"answer {n}", usage=usage, chunks=2, latency=0.25))
    return out


@dataclass
class Run:
    result: TurnResult
    cancelled: bool  # a cancellation left run_turn (a shutdown)
    stored: list[Message]  # after the caller's finish
    model: ScriptedModel
    refused_after: int | None  # the last message id when a refusal landed
    outage_calls: int  # store calls that failed for the outage
    published: list[int]  # ids of the messages the loop published (on_message)
    finished: list[int]  # ids of the messages the finish inserted
    before: int  # the last message id before the turn
    finish_changed: bool | None  # None: no finish (the run was fenced)


async def run_case(case: Case) -> Run:
    store = MemoryStore()
    lease = await start_chat(store)
    if case.answered:
        # An earlier run stored the answer, but not its finish; the chat was recovered.
        await store.persist_step(lease, [NewMessage(Role.ASSISTANT, (TextPart(RECOVERED_ANSWER),))])
        await store.release([lease])
        (chat,) = await store.acquire(uuid.uuid4(), 1)
        lease = Lease.of(chat)
    steps = script(case)

    def next_step(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
        return steps[index] if index < len(steps) else text_step(f"end {index}", usage=usage_of(10))

    def summarise(prompt: Sequence[PromptMessage], index: int) -> str:
        outcome = case.summaries[index % len(case.summaries)]
        if outcome is None:
            raise model_error(500, message="summary failed")
        return outcome

    model = ScriptedModel(next_step, summaries=summarise, summary_latency=0.5)
    config = LoopConfig(
        max_steps=case.max_steps,
        retry=RetryConfig(base_delay=0.5, max_delay=2.0),
        store_retry=STORE_RETRY,
        compaction=CompactionConfig(context_limit=LIMIT, max_compaction_retries=MAX_REENTRIES),
    )
    tool_calls = ToolCalls.CONCURRENT if case.parallel else ToolCalls.SEQUENTIAL
    strategies = Strategies(tool_calls=tool_calls)
    control = TurnControl()
    faulty = FaultyStore(store)
    writes = 0
    refused_after: int | None = None
    outage_calls = 0

    def stop() -> None:
        assert case.stop is not None
        if case.stop.kind == "interrupt":
            control.interrupt()
        elif case.stop.kind == "fence":
            control.fence()
        else:
            control.shutdown()

    async def on_call(n: int, op: str) -> None:
        nonlocal writes, refused_after
        if case.stop is not None and case.stop.at_call == n:
            stop()
        if op == "prompt_messages":
            return
        writes += 1
        if case.refuse is not None and case.refuse[0] == writes and refused_after is None:
            if case.refuse[1] == "edit":
                first = (await store.messages_after(lease.chat_id, 0))[0]
                await store.edit_message(lease.chat_id, first.id, [TextPart("edited")])
            else:
                await store.release([lease])
                await store.acquire(uuid.uuid4(), 1)
            refused_after = max(m.id for m in await store.messages_after(lease.chat_id, 0))

    def plan(n: int, op: str) -> str:
        nonlocal outage_calls
        if case.outage is not None and case.outage[0] <= n < case.outage[0] + case.outage[1]:
            outage_calls += 1
            return case.outage[2]
        return OK

    faulty.on_call = on_call
    faulty.plan = plan
    published: list[Message] = []

    async def on_message(message: Message) -> None:
        published.append(message)

    before = max(m.id for m in await store.messages_after(lease.chat_id, 0))
    results: list[TurnResult] = []
    cancelled: list[bool] = []

    async def turn(cancel: trio.CancelScope) -> None:
        with control:
            try:
                results.append(
                    await run_turn(
                        faulty.as_store(),
                        lease,
                        model,
                        tools=ToolRegistry([work]),
                        config=config,
                        control=control,
                        callbacks=TurnCallbacks(on_message=on_message),
                        strategies=strategies,
                    )
                )
            except BaseException:
                cancelled.append(True)
                raise
        cancel.cancel()

    async def stopper(at: float) -> None:
        await trio.sleep(at)
        stop()

    if case.stop is not None and case.stop.at_time == 0:
        stop()
    async with trio.open_nursery() as nursery:
        if case.stop is not None and case.stop.at_time:
            nursery.start_soon(stopper, case.stop.at_time)
        nursery.start_soon(turn, nursery.cancel_scope)
    if cancelled:
        assert control.result is not None, "a shutdown records the turn's outcome"
        result = control.result
    else:
        (result,) = results
    finished: list[int] = []
    changed: bool | None = None
    if result.outcome is not TurnOutcome.LOST:
        fin = await finish(store, lease, result)
        finished, changed = [m.id for m in fin.inserted], fin.changed
    return Run(
        result,
        bool(cancelled),
        await store.messages_after(lease.chat_id, 0),
        model,
        refused_after,
        outage_calls,
        [m.id for m in published],
        finished,
        before,
        changed,
    )


def check(case: Case, run: Run) -> None:
    result, stored, model = run.result, run.stored, run.model
    SEEN.update(result.trace)
    FINALS_SEEN.add(result.final_state)
    # The outcome is the chart's: a path it declares, from its initial state.
    universe = transitions_of(CompactionChart)
    state = "loading"
    for step in result.trace:
        assert step in universe
        assert step.source == state
        state = step.target
    assert state == result.final_state in FINAL_STATES
    assert result.outcome is OUTCOMES[result.final_state]
    # The outcome is explained by the faults.
    stopped = case.stop.kind if case.stop is not None else None
    fatal = any(p.fatal for p in case.steps)
    # A refused prompt ends the turn when a second refusal or a failed summary follows.
    overflowed = any(p.overflow for p in case.steps)
    long_outage = case.outage is not None and case.outage[1] >= LONG_OUTAGE
    assert run.cancelled is (result.outcome is TurnOutcome.SHUTDOWN)
    if result.outcome is TurnOutcome.SHUTDOWN:
        assert stopped == "shutdown"
    if result.outcome is TurnOutcome.INTERRUPTED:
        assert stopped == "interrupt"
    if result.outcome is TurnOutcome.LOST:
        assert (run.refused_after is not None or stopped == "fence") and result.persist_refused
        if run.refused_after is None:
            # Fenced from outside: wherever the turn was, it ends by the chart's `fence`.
            assert result.trace[-1].event == "fence"
    if result.outcome is TurnOutcome.UNAVAILABLE:
        assert long_outage and result.error is None
    if result.outcome is TurnOutcome.ERROR:
        assert (fatal or overflowed) and result.error is not None and not result.error.retryable
        if not fatal:
            assert result.error.kind == CONTEXT_LENGTH
    if stopped is None and case.refuse is None and not fatal and not long_outage:
        assert result.outcome is TurnOutcome.DONE or overflowed
        if result.outcome is TurnOutcome.DONE:
            assert model.stream_count == result.steps + result.retries
    # Every transient store fault before the end was retried, none turned into an error.
    if result.outcome is TurnOutcome.DONE and run.refused_after is None:
        assert result.store_retries == run.outage_calls
    assert result.steps <= case.max_steps
    assert result.reentries <= MAX_REENTRIES
    # A recovered turn whose answer is stored never calls the model.
    if case.answered:
        assert model.stream_count == 0 and result.steps == 0
        if stopped is None and case.outage is None:
            assert result.final_state == "answered"
        assert [text_of(m.parts) for m in stored].count(RECOVERED_ANSWER) == 1
    # A refused write ends the turn's writes: nothing lands after it.
    acknowledged = case.outage is None or case.outage[2] == BEFORE
    if run.refused_after is not None:
        # ... and the finish lands nowhere either.
        assert [m for m in stored if m.id > run.refused_after] == []
        assert run.finish_changed is not True
        # The run learns of the refusal from its write, unless that write was the retry
        # of one that had landed before the refusal (a replay is not refused).
        if acknowledged:
            assert result.outcome not in (TurnOutcome.DONE, TurnOutcome.ERROR)
    if result.outcome is TurnOutcome.LOST:
        assert result.final_messages == ()
    # What is stored after the finish: each step at most once, every tool call with
    # exactly one result right after it, in call order.
    steps_written = [m for m in stored if m.role is Role.ASSISTANT and not m.compressed]
    texts = [text_of(m.parts) for m in steps_written]
    assert len(texts) == len(set(texts)), texts
    assert len(steps_written) <= case.max_steps + case.answered
    calls = [p for m in stored for p in m.parts if isinstance(p, ToolCallPart)]
    results = [p for m in stored for p in m.parts if isinstance(p, ToolResultPart)]
    assert sorted(c.call_id for c in calls) == sorted(r.call_id for r in results)
    assert len({c.call_id for c in calls}) == len(calls)
    for i, message in enumerate(stored):
        ids = [p.call_id for p in message.parts if isinstance(p, ToolCallPart)]
        following = stored[i + 1 : i + 1 + len(ids)]
        assert [m.role for m in following] == [Role.TOOL] * len(ids)
        assert [m.parts[0].call_id for m in following] == ids  # type: ignore[union-attr]
    # The visible compaction records match the chart's count (a compaction write that
    # fails ends the turn or is reported, never half-stored).
    summarized = [c for c in calls if c.name == "chat_summarized"]
    edited = run.refused_after is not None and case.refuse is not None and case.refuse[1] == "edit"
    if not edited:
        # A compaction whose acknowledgement was lost for good landed uncounted.
        assert len(summarized) >= result.compactions
        assert len(summarized) == result.compactions or not acknowledged
        # Every message the loop stored was published once, in id order (an edit deletes
        # what was published before it), but for a write whose acknowledgement was lost
        # for good: the loop never learnt it landed (the store's own notifies announce it).
        written = [
            m.id
            for m in stored
            if m.id > run.before and m.role is not Role.USER and m.id not in run.finished
        ]
        assert run.published == sorted(set(run.published))
        assert set(run.published) <= set(written)
        if acknowledged:
            assert run.published == written


def run(case: Case) -> None:
    async def main() -> None:
        check(case, await run_case(case))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


step_plans = st.builds(
    StepPlan,
    calls=st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), max_size=3).map(tuple),
    tokens=TOKENS,
    failures=st.sampled_from([0, 0, 0, 1, 2]),
    fatal=st.sampled_from([False] * 15 + [True]),
    overflow=st.sampled_from([0] * 12 + [1, 1, 1, 2]),
)
stops = st.builds(
    Stop,
    kind=st.sampled_from(["interrupt", "shutdown", "fence"]),
    at_time=st.none() | st.just(0.0) | st.floats(0.01, 15, allow_nan=False),
    at_call=st.none() | st.integers(1, 12),
)
cases = st.builds(
    Case,
    steps=st.lists(step_plans, min_size=1, max_size=8).map(tuple),
    summaries=st.lists(st.sampled_from(["S", "S", "S", "", None]), min_size=1, max_size=4).map(
        tuple
    ),
    max_steps=st.integers(1, 8),
    stop=st.none() | st.none() | stops,
    parallel=st.booleans(),
    refuse=st.none()
    | st.none()
    | st.tuples(st.integers(1, 6), st.sampled_from(["edit", "takeover"])),
    outage=st.none()
    | st.none()
    | st.tuples(
        st.integers(1, 12),
        st.sampled_from([1, 2, 3, LONG_OUTAGE, 50]),
        st.sampled_from([BEFORE, AFTER]),
    ),
    answered=st.sampled_from([False] * 9 + [True]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases, _random=st.random_module())
def test_loop_invariants_over_random_scripts_and_faults(case: Case, _random: object) -> None:
    """Invariant: see the module docstring (`check`)."""
    RANDOM_RUNS.append(case)
    run(case)


def text(tokens: int) -> StepPlan:
    return StepPlan((), tokens, 0)


def tools(tokens: int) -> StepPlan:
    return StepPlan((0.5,), tokens, 0)


FATAL_STEP = StepPlan((), 10, 0, fatal=True)
# Store calls of `Case(OVERFLOW, ("S",), 5)`: the load (1), the compaction the refused
# prompt calls for (2), the reload (3).
OVERFLOW = (StepPlan((), 10, 0, overflow=1),)
# Store calls of the turn `Case((tools(950), text(10)), ("S",), 5)` makes: the load (1),
# the tool step before compacting (2), the compaction (3), the reload (4), and of
# `Case((text(950), text(10)), ("", "S"), 5)`: the load (1), the answer before the inline
# compaction (2), the safety net's compaction (3), the re-entry's reload (4).
INLINE = (tools(950), text(10))
SAFETY = (text(950), text(10))


STOPS = ("interrupt", "shutdown", "fence")


def stopped(kind: str, call: int) -> Stop:
    return Stop(kind, at_call=call)


# Paths that random scripts reach rarely; each names the transitions it guarantees.
CRAFTED = [
    # safety_compacting -summary_ok-> reentering: inline summary empty, safety net succeeds
    Case(SAFETY, ("", "S"), 5),
    # safety_compacting -summary_ok-> exhausted: three re-entries, then the same
    Case((text(950),) * 5, ("S", "S", "S", "", "S"), 8),
    # safety_compacting -summary_failed-> done
    Case((text(950),), ("", None), 3),
    # compacting -summary_failed-> stepping, then compacting -summary_ok-> reloading
    Case((tools(950), tools(950), text(10)), ("", "S"), 5),
    # compacting -summary_failed-> checking (tool calls, no step left)
    Case((tools(950),), ("",), 1),
    # compacting -summary_ok-> checking (tool calls, no step left) ... -> step_limit
    Case((tools(950),), ("S",), 1),
    # reentering -reloaded-> checking (the pinned max_steps=1 case)
    Case((text(950),), ("S",), 1),
    # stepping -step_persisted-> checking (tool calls, no step left) -> step_limit
    Case((tools(10),), ("S",), 1),
    # checking -post_run_check-> exhausted
    Case((text(950),) * 4, ("S",), 8),
    # safety_compacting -summary_ok/failed-> step_limit: a budget spent on tool calls,
    # under the threshold inline, over it at the check
    Case((tools(950),), ("", "S"), 1),
    Case((tools(950),), ("", None), 1),
    # loading -loaded-> answered
    Case(SAFETY, ("S",), 5, answered=True),
    # stepping -model_failed-> failed
    Case((tools(10), FATAL_STEP), ("S",), 5),
    # stepping -context_exceeded-> overflow_compacting -summary_ok-> reloading
    Case((tools(10), *OVERFLOW), ("S",), 5),
    # overflow_compacting -summary_failed-> failed
    Case(OVERFLOW, (None,), 5),
    # stepping -context_exceeded-> failed: still too long after the compaction
    Case((StepPlan((), 10, 0, overflow=2),), ("S",), 5),
    # every stop, refusal and outage while compacting for a refused prompt
    *[Case(OVERFLOW, ("S",), 5, stop=stopped(kind, 2)) for kind in STOPS],
    Case(OVERFLOW, ("S",), 5, outage=(2, LONG_OUTAGE, BEFORE)),
    Case(OVERFLOW, ("S",), 5, refuse=(1, "takeover")),
    # every stop, every refusal and every outage, in each state that can observe it
    *[
        Case(INLINE, ("S",), 5, stop=stopped(kind, call))
        for kind in STOPS
        for call in (1, 2, 3, 4)  # loading, stepping->compacting, compacting, reloading
    ],
    *[Case(SAFETY, ("", "S"), 5, stop=stopped(kind, 3)) for kind in STOPS],
    *[Case(SAFETY, ("", "S"), 5, stop=stopped(kind, 4)) for kind in STOPS],
    # stops while the first step streams (0 - 0.75 s) and while its tool runs (0.75 - 1.25 s)
    *[
        Case((tools(10), text(10)), ("S",), 5, stop=Stop(kind, at_time=at), parallel=parallel)
        for kind in STOPS
        for at in (0.5, 1.0)
        for parallel in (True, False)
    ],
    *[Case(INLINE, ("S",), 5, outage=(call, LONG_OUTAGE, BEFORE)) for call in (1, 2, 3, 4)],
    *[Case(SAFETY, ("", "S"), 5, outage=(call, LONG_OUTAGE, BEFORE)) for call in (3, 4)],
    Case((tools(10), text(10)), ("S",), 5, outage=(2, LONG_OUTAGE, BEFORE)),
    Case((tools(10), text(10)), ("S",), 5, refuse=(1, "takeover")),
    Case(INLINE, ("S",), 5, refuse=(2, "edit")),
    Case(SAFETY, ("", "S"), 5, refuse=(2, "takeover")),
    Case(SAFETY, ("", "S"), 5, refuse=(1, "edit")),
    # short outages are retried through
    Case(INLINE, ("S",), 5, outage=(1, 3, BEFORE)),
    Case(INLINE, ("S",), 5, outage=(3, 2, BEFORE)),
    Case(INLINE, ("S",), 5, outage=(2, 3, AFTER)),
    # an outage that lets every write land but loses its acknowledgement, past the budget
    Case(INLINE, ("S",), 5, outage=(2, LONG_OUTAGE, AFTER)),
]


def test_compaction_chart_transition_coverage_is_complete() -> None:
    """Every transition of CompactionChart, each guarded branch on its own, is taken by
    some run of the loop, and every final state is reached."""
    if not RANDOM_RUNS:
        # run alone: collect the random scripts' transitions first
        test_loop_invariants_over_random_scripts_and_faults()
    for case in CRAFTED:
        run(case)
    missing = transitions_of(CompactionChart) - SEEN
    assert not missing, f"transitions never fired: {sorted(missing)}"
    assert FINALS_SEEN == FINAL_STATES
