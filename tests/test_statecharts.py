"""The charts themselves: structure, scripted paths, strictness, the pool, the lifecycle
oracle, coverage."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from statemachine.exceptions import TransitionNotAllowed
from statemachine.state import InstanceState

from chatd_trio import lifecycle
from chatd_trio.domain import ChatStatus
from chatd_trio.lifecycle import ChatView, Effect, Plan, Refused, decide
from chatd_trio.lifecycle import Event as LifecycleEvent
from statecharts import CHARTS, ChatLifecycleChart, DialChart
from statecharts.base import (
    ChartError,
    ChartUnusable,
    EventDataError,
    MemoStats,
    Step,
    TracedChart,
    _PoolEngine,
    event_data_of,
    memo_stats,
    transitions_of,
)
from statecharts.compaction import CompactionChart
from statecharts.dial import ACTIVITIES, Activity
from statecharts.lifecycle import (
    EVENTS_BETWEEN,
    InvalidStatusPath,
    check_status_path,
    is_valid_status_path,
    replay_events,
)

BOUND = uuid.UUID(int=1)
OTHER = uuid.UUID(int=2)

# --- DialChart -----------------------------------------------------------------------

# Script words for the dial's events with their data; `validated` is one event whose
# `same_agent` guard tells the bound agent from another one.
DIAL_EVENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dial_ok": ("dial_ok", {}),
    "dial_failed": ("dial_failed", {"cause": OSError("refused")}),
    "delay_elapsed": ("delay_elapsed", {}),
    "validated_same": ("validated", {"agent": BOUND}),
    "validated_other": ("validated", {"agent": OTHER}),
    "validated_no_agent": ("validated_no_agent", {"cause": LookupError("no agent")}),
    "validated_error": ("validated_error", {"cause": ValueError("lookup failed")}),
    "cancel": ("cancel", {}),
}


def dial_path(*words: str) -> DialChart:
    chart = DialChart(BOUND)
    for word in words:
        event, data = DIAL_EVENTS[word]
        chart.send(event, **data)
    return chart


@pytest.mark.parametrize(
    ("words", "final"),
    [
        (["dial_ok"], "connected"),
        (["dial_failed", "validated_same", "dial_ok"], "connected"),
        (["dial_failed", "validated_same", "dial_failed"], "failed"),
        (["dial_failed", "validated_other", "dial_ok"], "switched"),
        (["dial_failed", "validated_no_agent"], "no_agent"),
        (["dial_failed", "validated_error"], "failed"),
        (["delay_elapsed", "validated_same", "dial_ok"], "connected"),
        (["delay_elapsed", "validated_error", "dial_failed"], "failed"),
        (["delay_elapsed", "validated_no_agent"], "no_agent"),
        (["delay_elapsed", "validated_other", "dial_ok"], "switched"),
        (["delay_elapsed", "cancel"], "cancelled"),
    ],
)
def test_dial_chart_table_rows_are_paths(words: list[str], final: str) -> None:
    chart = dial_path(*words)
    assert chart.state_id == final
    assert chart.is_terminated
    assert [step.event for step in chart.trace] == [DIAL_EVENTS[w][0] for w in words]
    assert chart.activities == frozenset()


def test_dial_same_or_other_is_the_same_agent_guard() -> None:
    same = dial_path("dial_failed", "validated_same")
    assert same.trace[-1] == Step(
        "validating_after_failure", "validated", "redialing_same", "same_agent"
    )
    assert same.target_agent == BOUND
    other = dial_path("delay_elapsed", "validated_other")
    assert other.trace[-1] == Step("validating_while_dialing", "validated", "dialing_other", "")
    assert other.target_agent == OTHER
    waiting = dial_path("delay_elapsed", "validated_same")
    assert waiting.trace[-1].target == "awaiting_bound"
    assert waiting.target_agent == BOUND


def test_dial_chart_tracks_target_agent_and_cause() -> None:
    chart = dial_path("delay_elapsed", "validated_other")
    assert chart.target_agent == OTHER
    cause = OSError("refused")
    chart.send("dial_failed", cause=cause)
    assert (chart.state_id, chart.cause) == ("failed", cause)


def test_dial_validated_without_agent_raises_and_changes_nothing() -> None:
    # The bug this guards against: the TypeError was swallowed and the chart moved on
    # to dial the stale bound agent as if it were the workspace's new one.
    chart = dial_path("dial_failed")
    with pytest.raises(EventDataError, match=r"validated takes \['agent'\]: missing \['agent'\]"):
        chart.send("validated")
    assert chart.state_id == "validating_after_failure"
    assert (chart.target_agent, len(chart.trace)) == (BOUND, 1)
    with pytest.raises(EventDataError, match="missing \\['cause'\\]"):
        chart.send("validated_error")
    with pytest.raises(EventDataError, match="unexpected \\['agnet'\\]"):
        chart.send("validated", agent=OTHER, agnet=OTHER)
    with pytest.raises(EventDataError, match="keyword arguments"):
        chart.send("validated", OTHER)
    # Refused before anything ran: the chart is still usable.
    chart.send("validated", agent=OTHER)
    assert chart.state_id == "dialing_other"


class _ExplodingId:
    """An agent id whose comparison fails: the `same_agent` guard raises."""

    def __eq__(self, other: object) -> bool:
        raise ValueError("cannot compare")

    __hash__ = object.__hash__


def test_dial_guard_errors_raise_from_send_and_break_the_chart() -> None:
    chart = dial_path("dial_failed")
    with pytest.raises(ValueError, match="cannot compare"):
        chart.send("validated", agent=_ExplodingId())
    assert chart.state_id == "validating_after_failure"
    with pytest.raises(ChartUnusable, match="earlier send raised ValueError"):
        chart.send("validated", agent=OTHER)


def test_dial_chart_refuses_events_the_table_does_not_allow() -> None:
    chart = DialChart(BOUND)
    with pytest.raises(TransitionNotAllowed):
        chart.send("validated", agent=BOUND)
    chart.send("dial_ok")
    with pytest.raises(TransitionNotAllowed):
        chart.send("cancel")


def test_dial_activities_cover_every_state() -> None:
    assert set(ACTIVITIES) == {state.id for state in DialChart.states}
    for state in DialChart.states:
        # A final state runs nothing; every other state waits on at least one task.
        assert bool(ACTIVITIES[state.id]) is not state.final, state.id
    # Only the first state runs the timer; the bound dial is never restarted once dropped.
    assert [s for s, acts in ACTIVITIES.items() if Activity.DELAY in acts] == ["dialing"]


def test_dial_chart_transition_universe() -> None:
    universe = transitions_of(DialChart)
    assert len(universe) == 25
    assert Step("validating_while_dialing", "validated_error", "awaiting_bound") in universe
    assert Step("validating_after_failure", "validated_error", "failed") in universe
    assert Step("validating_after_failure", "validated", "redialing_same", "same_agent") in universe
    assert Step("validating_after_failure", "validated", "dialing_other") in universe


def test_guarded_branches_count_separately_in_the_coverage_universe() -> None:
    universe = transitions_of(CompactionChart)
    # Three pairs of states are joined by two transitions of one event that differ by guard.
    assert len(universe) == 63
    assert len({(s.source, s.event, s.target) for s in universe}) == 60
    assert {s.guard for s in universe if (s.source, s.target) == ("stepping", "checking")} == {
        "tool_calls",
        "",
    }


def test_no_transition_is_shadowed_by_an_unguarded_one() -> None:
    """Only the last transition of an event from a state may be unguarded: any after it
    could never be taken (python-statemachine takes the first whose guard holds)."""
    for entry in CHARTS:
        for state in entry.chart.states_map.values():
            by_event: dict[str, list[Any]] = {}
            for transition in state.transitions:
                for event in transition.events:
                    by_event.setdefault(str(event), []).append(transition)
            for event, transitions in by_event.items():
                for earlier in transitions[:-1]:
                    assert list(earlier.cond), (entry.name, state.id, event)


# --- strictness, for every chart of the registry --------------------------------------

# How each registered chart is built, and one event its start state accepts, with data.
FACTORIES: dict[type[TracedChart], tuple[Callable[..., TracedChart], str, dict[str, Any]]] = {
    DialChart: (lambda cls: cls(BOUND), "dial_ok", {}),
    CompactionChart: (lambda cls: cls(5, 3), "loaded", {"answered": False}),
    ChatLifecycleChart: (lambda cls: cls(), "create", {}),
}


def test_every_registered_chart_has_a_strictness_fixture() -> None:
    assert {entry.chart for entry in CHARTS} == set(FACTORIES)


@pytest.mark.parametrize("chart_class", list(FACTORIES), ids=lambda c: c.__name__)
def test_charts_are_strict(chart_class: type[TracedChart]) -> None:
    assert chart_class.catch_errors_as_events is False
    assert chart_class.allow_event_without_transition is False
    build, _, _ = FACTORIES[chart_class]
    for event, data in event_data_of(chart_class).items():
        assert data is not None, f"{event} takes **kwargs: its data cannot be checked"
        with pytest.raises(EventDataError):
            build(chart_class).send(event, unexpected_datum=1)
        for name in data:
            partial = {other: None for other in data if other != name}
            with pytest.raises(EventDataError, match=f"missing \\['{name}'\\]"):
                build(chart_class).send(event, **partial)


@pytest.mark.parametrize("chart_class", list(FACTORIES), ids=lambda c: c.__name__)
def test_a_failing_action_raises_from_send(chart_class: type[TracedChart]) -> None:
    class Failing(chart_class):  # type: ignore[valid-type, misc]
        def after_transition(self, event: Any, transition: Any) -> None:
            raise RuntimeError(f"action failed on {event}")

    build, event, data = FACTORIES[chart_class]
    chart = build(Failing)
    with pytest.raises(RuntimeError, match=f"action failed on {event}"):
        chart.send(event, **data)
    with pytest.raises(ChartUnusable):
        chart.send(event, **data)


def test_compaction_guard_errors_raise_from_send() -> None:
    chart = CompactionChart(5, 3)
    chart.send("loaded", answered=False)
    chart.max_steps = None  # type: ignore[assignment]  # `budget_left` now fails
    with pytest.raises(TypeError, match="not supported"):
        chart.send("step_persisted", tool_calls=True, over_threshold=False)
    assert chart.state_id == "stepping"


# --- the pool: fresh() and release() ---------------------------------------------------


def _public(chart: TracedChart) -> dict[str, Any]:
    """Everything a driver can read from a chart, for comparing two of them."""
    out = {
        key: value
        for key, value in vars(chart).items()
        if not key.startswith("_") and not isinstance(value, InstanceState) and key != "model"
    }
    out["state"] = chart.current_state_value
    out["terminated"] = chart.is_terminated
    out["trace"] = list(chart.trace)
    return out


_ARGS: dict[type[TracedChart], tuple[Any, ...]] = {
    DialChart: (BOUND,),
    CompactionChart: (5, 3),
    ChatLifecycleChart: (),
}


def test_fresh_reuses_a_released_chart_from_its_start() -> None:
    first = CompactionChart.fresh(2, 1)
    first.send("loaded", answered=False)
    first.send("step_persisted", tool_calls=True, over_threshold=True)
    assert first.state_id == "compacting"
    first.release()
    assert first.is_released
    again = CompactionChart.fresh(4, 2)
    assert again is first
    assert not again.is_released
    # As if constructed: start state entered through the library, counters reset, empty
    # trace, the new arguments.
    assert _public(again) == _public(CompactionChart(4, 2))
    assert (again.state_id, again.steps_used, again.max_steps, again.trace) == (
        "loading",
        0,
        4,
        [],
    )
    again.send("loaded", answered=False)
    assert (again.state_id, again.steps_used) == ("stepping", 1)
    again.release()


def test_the_pooled_engine_is_reused_on_this_library() -> None:
    """The engine reset knows every attribute of the installed library's engine; on a
    library that adds some, fresh() builds a new engine instead (correct, just slower),
    and this test says so."""
    chart = DialChart.fresh(BOUND)
    chart.send("dial_ok")
    engine = chart._engine
    assert set(vars(engine)) == _PoolEngine._KEPT | _PoolEngine._RESET
    chart.release()
    again = DialChart.fresh(BOUND)
    assert again._engine is engine
    assert engine.running and not again.is_terminated
    again.release()


def test_a_released_chart_refuses_events_and_a_second_release() -> None:
    chart = DialChart.fresh(BOUND)
    chart.release()
    with pytest.raises(ChartUnusable, match="released"):
        chart.send("dial_ok")
    with pytest.raises(ChartUnusable, match="released twice"):
        chart.release()
    assert DialChart.fresh(BOUND) is chart


def test_with_block_releases_even_when_the_run_is_abandoned() -> None:
    with pytest.raises(KeyError), DialChart.fresh(BOUND) as chart:
        chart.send("delay_elapsed")
        raise KeyError("cancelled mid-way")
    assert chart.is_released
    again = DialChart.fresh(OTHER)
    assert again is chart
    assert (again.state_id, again.bound_agent, again.target_agent, again.trace) == (
        "dialing",
        OTHER,
        OTHER,
        [],
    )
    again.send("dial_ok")
    assert again.trace == [Step("dialing", "dial_ok", "connected")]
    again.release()


def test_a_broken_chart_is_whole_again_after_fresh() -> None:
    chart = dial_path("dial_failed")
    with pytest.raises(ValueError):
        chart.send("validated", agent=_ExplodingId())
    chart.release()
    again = DialChart.fresh(BOUND)
    assert again is chart
    again.send("dial_failed", cause=OSError("refused"))
    again.send("validated", agent=OTHER)
    assert again.state_id == "dialing_other"
    again.release()


class _Owner:
    pass


def test_an_owner_releases_its_chart_when_collected() -> None:
    owner = _Owner()
    chart = ChatLifecycleChart.fresh(owner=owner)
    chart.send("create")
    del owner
    gc.collect()
    assert chart.is_released
    assert ChatLifecycleChart.fresh() is chart


def test_a_late_owner_never_releases_a_later_lease() -> None:
    first_owner = _Owner()
    chart = ChatLifecycleChart.fresh(owner=first_owner)
    chart.release()
    second_owner = _Owner()
    assert ChatLifecycleChart.fresh(owner=second_owner) is chart
    del first_owner
    gc.collect()
    assert not chart.is_released
    chart.send("create")
    del second_owner
    gc.collect()
    assert chart.is_released


def test_fresh_takes_start_value_and_refuses_a_foreign_model() -> None:
    chart = ChatLifecycleChart.fresh(start_value="running")
    chart.send("finish_error", queued=0, token_matches=True)
    assert chart.state_id == "error"
    chart.release()
    again = ChatLifecycleChart.fresh(start_value="waiting")
    assert again is chart
    assert (again.state_id, again.trace) == ("waiting", [])
    again.release()
    assert ChatLifecycleChart.fresh().state_id == "new"
    ChatLifecycleChart.fresh().release()
    with pytest.raises(ChartError, match="own model"):
        ChatLifecycleChart.fresh(model=object())


def test_the_pool_is_bounded() -> None:
    charts = [DialChart.fresh(BOUND) for _ in range(DialChart.pool_size + 5)]
    for chart in charts:
        chart.release()
    again = [DialChart.fresh(BOUND) for _ in range(DialChart.pool_size + 5)]
    reused = sum(1 for chart in again if any(chart is old for old in charts))
    assert reused == DialChart.pool_size
    for chart in again:
        chart.release()


# Events with data each chart may be sent, for the random leases below.
# Events with data each chart may be sent, for the random leases below.
_FACTS: dict[str, st.SearchStrategy[Any]] = {
    "queued": st.integers(0, 3),
    "max_queued": st.integers(0, 3),
    "token_matches": st.booleans(),
}
_RANDOM_EVENTS: dict[type[TracedChart], st.SearchStrategy[tuple[str, dict[str, Any]]]] = {
    DialChart: st.sampled_from(list(DIAL_EVENTS.values())),
    CompactionChart: st.one_of(
        st.tuples(st.just("loaded"), st.fixed_dictionaries({"answered": st.booleans()})),
        st.tuples(
            st.just("step_persisted"),
            st.fixed_dictionaries({"tool_calls": st.booleans(), "over_threshold": st.booleans()}),
        ),
        st.tuples(
            st.just("post_run_check"),
            st.fixed_dictionaries({"over_threshold": st.booleans()}),
        ),
        st.tuples(
            st.sampled_from(
                [
                    "summary_ok",
                    "summary_failed",
                    "reloaded",
                    "model_failed",
                    "interrupt",
                    "shutdown",
                    "write_refused",
                    "fence",
                    "store_unavailable",
                ]
            ),
            st.just({}),
        ),
    ),
    ChatLifecycleChart: st.one_of(
        *[
            st.tuples(
                st.just(event),
                st.fixed_dictionaries({name: _FACTS[name] for name in sorted(data or ())}),
            )
            for event, data in sorted(event_data_of(ChatLifecycleChart).items())
        ]
    ),
}


def _play(chart: TracedChart, events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    outcomes = []
    for event, data in events:
        try:
            chart.send(event, **data)
            outcomes.append("ok")
        except TransitionNotAllowed:
            outcomes.append("refused")
    return outcomes


@settings(max_examples=300, deadline=None)
@given(data=st.data(), chart_class=st.sampled_from(list(_ARGS)))
def test_a_reused_chart_behaves_as_a_new_one_whatever_its_last_lease_did(
    data: st.DataObject, chart_class: type[TracedChart]
) -> None:
    """Invariant: after any lease (abandoned anywhere, terminated or not), fresh() hands
    out a chart that takes exactly the transitions a newly built chart takes."""
    events = st.lists(_RANDOM_EVENTS[chart_class], max_size=8)
    args = _ARGS[chart_class]
    leased = chart_class.fresh(*args)
    _play(leased, data.draw(events, label="last lease"))
    leased.release()
    reused = chart_class.fresh(*args)
    assert reused is leased
    built = chart_class(*args)
    assert _public(reused) == _public(built)
    script = data.draw(events, label="this lease")
    assert _play(reused, script) == _play(built, script)
    assert _public(reused) == _public(built)
    reused.release()


# The same charts, asking python-statemachine for every event (nothing remembered).
_ASKING: dict[type[TracedChart], type[TracedChart]] = {
    cls: type(f"Asking{cls.__name__}", (cls,), {"memo_size": 0}) for cls in _ARGS
}


def _step_by_step(chart: TracedChart, events: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    seen = []
    for event, data in events:
        try:
            result: Any = chart.send(event, **data)
        except TransitionNotAllowed:
            result = "refused"
        seen.append((event, result, _public(chart)))
    return seen


@settings(max_examples=300, deadline=None)
@given(data=st.data(), chart_class=st.sampled_from(list(_ARGS)))
def test_a_remembered_decision_is_what_the_library_decides(
    data: st.DataObject, chart_class: type[TracedChart]
) -> None:
    """Invariant: a chart that replays its remembered decisions cannot be told from one
    that asks python-statemachine for every event: after each event the same result or
    refusal, state, attributes and trace, whatever ran before (the memo persists across
    examples, so later examples replay what earlier ones remembered)."""
    events = st.lists(_RANDOM_EVENTS[chart_class], max_size=10)
    args = _ARGS[chart_class]
    for script in (data.draw(events, label="first"), data.draw(events, label="again")):
        remembering = chart_class.fresh(*args)
        asking = _ASKING[chart_class](*args)
        assert _step_by_step(remembering, script) == _step_by_step(asking, script)
        remembering.release()


def test_a_steady_run_replays_and_only_plain_data_is_remembered() -> None:
    class Counted(CompactionChart):
        pass

    def run() -> None:
        with Counted.fresh(5, 1) as chart:
            chart.send("loaded", answered=False)
            chart.send("step_persisted", tool_calls=True, over_threshold=False)
            chart.send("step_persisted", tool_calls=False, over_threshold=False)
            chart.send("post_run_check", over_threshold=False)
            assert (chart.state_id, chart.steps_used, len(chart.trace)) == ("done", 2, 4)

    run()
    assert memo_stats(Counted) == MemoStats(hits=0, misses=4, entries=4)
    run()
    assert memo_stats(Counted) == MemoStats(hits=4, misses=4, entries=4)

    # An exception as data is never a key (every one differs): the library runs it.
    class Dial(DialChart):
        pass

    for _ in range(2):
        with Dial.fresh(BOUND) as dial:
            dial.send("dial_failed", cause=OSError("refused"))
            dial.send("validated", agent=OTHER)
            assert (dial.state_id, dial.target_agent) == ("dialing_other", OTHER)
    assert memo_stats(Dial) == MemoStats(hits=1, misses=1, entries=1)


def test_the_memo_keeps_the_most_recent_decisions_only() -> None:
    class Small(DialChart):
        memo_size = 3

    agents = [uuid.UUID(int=n) for n in range(10, 16)]
    for agent in agents:
        with Small.fresh(agent) as chart:
            chart.send("dial_ok")
    assert memo_stats(Small).entries == 3
    with Small.fresh(agents[-1]) as chart:
        chart.send("dial_ok")  # among the last three: replayed
    assert memo_stats(Small).hits == 1
    with Small.fresh(agents[0]) as chart:
        chart.send("dial_ok")  # dropped long ago: the library again
    assert memo_stats(Small) == MemoStats(hits=1, misses=7, entries=3)


def test_a_chart_with_a_listener_asks_the_library_every_time() -> None:
    calls: list[str] = []

    class Listener:
        def after_transition(self, event: Any) -> None:
            calls.append(str(event))

    class Heard(DialChart):
        pass

    for _ in range(2):
        chart = Heard(BOUND, listeners=[Listener()])
        chart.send("dial_ok")
    assert calls == ["dial_ok", "dial_ok"]
    assert memo_stats(Heard).hits == 0


# --- ChatLifecycleChart: decisions (chatd_trio.lifecycle.decide) ------------------------

MAX_QUEUED = 3
TOKEN = 7  # the row's ownership token in the exhaustive table below


@dataclass
class Row:
    """A chat row as the decisions see it, changed the way the store executes a plan."""

    status: str = "new"
    token: int = 0
    queued: int = 0
    run: int | None = None  # the token the latest acquisition handed its run

    def view(self) -> ChatView | None:
        if self.status == "new":
            return None
        return ChatView(ChatStatus(self.status), self.token, self.queued)

    def decide(self, word: str) -> Plan:
        """Decide a script word: a user or replica event, or (`run.`) the latest run's."""
        event = SCRIPT_WORDS[word]
        token = self.run if word.startswith("run.") else None
        plan = decide(event, self.view(), token=token, max_queued=MAX_QUEUED, error="boom")
        effects = plan.effects
        if Effect.NEW_TOKEN in effects:
            self.token += 1
        if Effect.ENQUEUE in effects:
            self.queued += 1
        if Effect.PROMOTE_OLDEST in effects or Effect.PROMOTE_CHOSEN in effects:
            assert self.queued > 0, f"{word} promotes from an empty queue"
            self.queued -= 1
        if Effect.CLEAR_QUEUE in effects:
            self.queued = 0
        if Effect.CLAIM in effects:
            self.run = self.token
        self.status = plan.target.value
        lifecycle.taken(plan)  # executed, as a store records a write that landed
        return plan


SCRIPT_WORDS: dict[str, LifecycleEvent] = {
    "create": LifecycleEvent.CREATE,
    "send": LifecycleEvent.SEND_MESSAGE,
    "edit": LifecycleEvent.EDIT,
    "stop": LifecycleEvent.INTERRUPT,
    "promote": LifecycleEvent.PROMOTE_QUEUED,
    "acquire": LifecycleEvent.ACQUIRE,
    "recover": LifecycleEvent.STALE_RECOVERED,
    "run.beat": LifecycleEvent.HEARTBEAT,
    "run.write": LifecycleEvent.WRITE,
    "run.hand_back": LifecycleEvent.RELEASE,
    "run.done": LifecycleEvent.FINISH_DONE,
    "run.stopped": LifecycleEvent.FINISH_INTERRUPTED,
    "run.failed": LifecycleEvent.FINISH_ERROR,
    "run.shut_down": LifecycleEvent.FINISH_SHUTDOWN,
}

# Scripts of decisions from a new chat: (words, final status, final queue length).
LIFECYCLE_SCRIPTS: list[tuple[list[str], str, int]] = [
    # a turn that answers; a turn whose queue is promoted by its finish
    (["create", "acquire", "run.beat", "run.write", "run.done"], "waiting", 0),
    (["create", "acquire", "send", "send", "promote", "run.done"], "pending", 1),
    # the user's events on a pending chat
    (
        ["create", "send", "stop", "promote", "send", "edit", "acquire", "run.hand_back"],
        "pending",
        0,
    ),
    # a chat in error: queued, promoted, edited, messaged, stopped
    (
        [
            *["create", "acquire", "send", "send", "run.failed", "send", "promote", "acquire"],
            *["run.failed", "edit", "acquire", "run.failed", "send", "acquire", "run.failed"],
            "stop",
        ],
        "waiting",
        0,
    ),
    # a user stop, then the stopped run keeps its step and ends like the interrupt
    (["create", "acquire", "stop", "run.write", "run.done", "stop", "edit"], "pending", 0),
    (["create", "acquire", "send", "stop", "run.done"], "pending", 0),
    (["create", "acquire", "stop", "run.stopped"], "waiting", 0),
    (["create", "acquire", "send", "stop", "run.stopped"], "pending", 0),
    (["create", "acquire", "stop", "run.failed"], "waiting", 0),
    (["create", "acquire", "send", "stop", "run.failed"], "pending", 0),
    (["create", "acquire", "stop", "run.shut_down"], "waiting", 0),
    (["create", "acquire", "send", "stop", "run.shut_down"], "pending", 0),
    # messages to a stopped chat: one straight in, one queued behind another, promoted
    (["create", "acquire", "run.done", "send", "acquire", "send", "stop"], "waiting", 1),
    (["create", "acquire", "send", "stop", "send", "promote", "edit"], "pending", 0),
    # a run's own ends, and the ends a run is given
    (["create", "acquire", "run.stopped", "send", "acquire", "send", "run.stopped"], "pending", 0),
    (["create", "acquire", "run.shut_down", "acquire", "recover", "acquire", "edit"], "pending", 0),
]


@pytest.mark.parametrize(("words", "final", "queued"), LIFECYCLE_SCRIPTS)
def test_lifecycle_scripted_decisions(words: list[str], final: str, queued: int) -> None:
    row = Row()
    for word in words:
        before = row.status
        plan = row.decide(word)
        assert plan.step.source == before and plan.step.event == SCRIPT_WORDS[word].value
        assert plan.step.target == plan.target.value == row.status
    assert (row.status, row.queued) == (final, queued)


def test_lifecycle_scripts_cover_every_transition_with_its_guard() -> None:
    covered: set[Step] = set()
    before = lifecycle.fired()
    for words, _, _ in LIFECYCLE_SCRIPTS:
        row = Row()
        covered.update(row.decide(word).step for word in words)
    assert covered == transitions_of(ChatLifecycleChart)
    # ... and `fired()` counted each executed decision's transition.
    assert set((lifecycle.fired() - before).keys()) == covered


def test_a_run_that_lost_the_chat_is_refused_everything() -> None:
    row = Row()
    for word in ["create", "acquire"]:
        row.decide(word)
    stale = row.run
    row.decide("recover")
    row.decide("acquire")
    row.run = stale
    for word in [w for w in SCRIPT_WORDS if w.startswith("run.")]:
        with pytest.raises(Refused) as info:
            row.decide(word)
        assert info.value.view == ChatView(ChatStatus.RUNNING, row.token, 0)
    assert not lifecycle.still_owner(ChatView(ChatStatus.RUNNING, row.token), stale or 0)
    assert lifecycle.still_owner(ChatView(ChatStatus.RUNNING, row.token), row.token)


# An independent statement of docs/spec.md §1 (statuses, transitions, the queue, edit,
# interrupt, fencing): what each event does in each status, given the queue's length,
# its bound and whether the actor holds the row's token. None: refused.
def spec_oracle(
    event: str, status: str, queued: int, max_queued: int, owned: bool
) -> tuple[str, frozenset[str]] | None:
    if status == "new" or event == "create":
        return ("pending", frozenset({"insert"})) if (status, event) == ("new", "create") else None
    idle = status in ("waiting", "error")
    if event == "send_message":
        # Into the history when nothing runs or waits; else behind the queue, if it has room.
        if idle and queued == 0:
            return "pending", frozenset({"insert"})
        return (status, frozenset({"enqueue"})) if queued < max_queued else None
    if event == "edit":
        return "pending", frozenset({"replace_from", "insert", "clear_queue"})
    if event == "interrupt":
        # Nothing runs in a pending chat: it runs when acquired.
        return (status, frozenset()) if status == "pending" else ("waiting", frozenset())
    if event == "promote_queued":
        if status == "running":
            return "running", frozenset({"queue_to_front"})
        return "pending", frozenset({"promote_chosen"})
    if event == "acquire":
        return ("running", frozenset({"claim", "new_token"})) if status == "pending" else None
    if event == "stale_recovered":
        return ("pending", frozenset({"new_token"})) if status == "running" else None
    # Everything else is the run's: it lands only under the row's current token, while
    # the chat runs, or is `waiting` because the user stopped that run.
    stopped = status == "waiting"
    if not owned or status not in ("running", "waiting"):
        return None
    if event == "heartbeat":
        return None if stopped else ("running", frozenset({"beat"}))
    if event == "write":
        return status, frozenset({"insert"})
    if event == "hand_back":
        return None if stopped else ("pending", frozenset({"new_token"}))
    # A finish writes the final messages and ends the run's token. The user's stop wins
    # over the outcome; a normal end or an interrupt promotes the oldest queued message,
    # a failure keeps the queue for after the user read the error, a shutdown hands the
    # chat back to any replica.
    finish = {"insert", "new_token"}
    if stopped or event in ("finish_done", "finish_interrupted"):
        if queued > 0:
            return "pending", frozenset(finish | {"promote_oldest"})
        return "waiting", frozenset(finish)
    if event == "finish_error":
        return "error", frozenset(finish | {"set_error"})
    assert event == "finish_shutdown", event
    return "pending", frozenset(finish)


STATUSES = ["new", "waiting", "pending", "running", "error"]
FACT_GRID = [
    (queued, max_queued, owned)
    for queued in range(4)
    for max_queued in range(4)
    for owned in (True, False, None)  # None: the actor carries no token
]


def _decide_or_none(
    event: LifecycleEvent, status: str, queued: int, max_queued: int, owned: bool | None
) -> Plan | None:
    view = None if status == "new" else ChatView(ChatStatus(status), TOKEN, queued)
    token = None if owned is None else (TOKEN if owned else TOKEN - 1)
    try:
        return decide(event, view, token=token, max_queued=max_queued, error="boom")
    except Refused as refused:
        assert refused.event is event
        return None


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("event", list(LifecycleEvent), ids=str)
def test_every_decision_matches_the_spec_oracle(event: LifecycleEvent, status: str) -> None:
    """Every event in every status under every combination of facts: the chart's answer
    (target, write effects, refusal) is the oracle's; the plan's guard holds exactly the
    facts the answer depends on."""
    answers = {}
    for queued, max_queued, owned in FACT_GRID:
        plan = _decide_or_none(event, status, queued, max_queued, owned)
        expected = spec_oracle(event.value, status, queued, max_queued, owned is True)
        got = None
        if plan is not None:
            got = (plan.target.value, frozenset(e.value for e in plan.effects))
        assert got == expected, (event.value, status, queued, max_queued, owned)
        answers[(queued, max_queued, owned is True)] = expected
        if plan is not None:
            assert plan.step in transitions_of(ChatLifecycleChart)
            assert plan.guard.status == (None if status == "new" else ChatStatus(status))
            assert plan.last_error == ("boom" if Effect.SET_ERROR in plan.effects else None)
            assert plan.owned_after is (plan.target is ChatStatus.RUNNING)
    # The guard: the facts (beyond the status) the answer depends on.
    on_queue = any(answers[(0, m, o)] != answers[(q, m, o)] for q, m, o in answers)
    on_token = any(answers[(q, m, True)] != answers[(q, m, False)] for q, m, _ in answers)
    for queued, max_queued, owned in FACT_GRID:
        plan = _decide_or_none(event, status, queued, max_queued, owned)
        if plan is None:
            continue
        assert (plan.guard.queued is not None) is on_queue, (queued, max_queued, owned)
        if plan.guard.queued is not None:
            assert plan.guard.queued == queued
        assert (plan.guard.token is not None) is on_token
        if plan.guard.token is not None:
            assert plan.guard.token == TOKEN


@pytest.mark.parametrize("status", STATUSES[1:])
def test_still_owner_is_the_heartbeat_decision(status: str) -> None:
    for owned in (True, False):
        token = TOKEN if owned else TOKEN + 1
        expected = spec_oracle("heartbeat", status, 0, 0, owned) is not None
        assert lifecycle.still_owner(ChatView(ChatStatus(status), TOKEN), token) is expected


# --- replays (the status-path oracle the store and simulation tests use) --------------


@pytest.mark.parametrize(
    ("start", "events", "final"),
    [
        ("new", ["create", "acquire", "finish_done"], "waiting"),
        ("new", ["create", "acquire", "finish_error"], "error"),
        ("error", ["send_message", "acquire", "interrupt", "finish_interrupted"], "waiting"),
        ("running", ["finish_shutdown"], "pending"),
        ("running", [("finish_done", {"queued": 1})], "pending"),
        ("running", [("heartbeat", {"token_matches": False})], "running"),
    ],
)
def test_replay_events(start: str, events: list[Any], final: str) -> None:
    if events[-1] == ("heartbeat", {"token_matches": False}):
        with pytest.raises(TransitionNotAllowed):
            replay_events(events, start=start)
        return
    chart = replay_events(events, start=start)
    assert chart.state_id == final
    assert [step.event for step in chart.trace] == [
        e if isinstance(e, str) else e[0] for e in events
    ]


@pytest.mark.parametrize(
    ("start", "event"),
    [
        ("new", "acquire"),
        ("waiting", "acquire"),
        ("pending", "finish_done"),
        ("pending", "write"),  # an edit made the row pending: the run's writes are refused
        ("error", "finish_error"),
        ("waiting", "create"),
        ("waiting", "heartbeat"),
    ],
)
def test_lifecycle_refuses_invalid_events(start: str, event: str) -> None:
    with pytest.raises(TransitionNotAllowed):
        replay_events([event], start=start)


def test_interrupt_and_shutdown_differ() -> None:
    assert replay_events(["interrupt"], start="running").state_id == "waiting"
    assert replay_events(["finish_shutdown"], start="running").state_id == "pending"


# --- the lifecycle oracle -------------------------------------------------------------


def test_oracle_accepts_valid_status_paths() -> None:
    statuses = [
        "new",
        ChatStatus.PENDING,
        ChatStatus.RUNNING,
        ChatStatus.ERROR,
        ChatStatus.PENDING,
        ChatStatus.PENDING,  # observed twice: no change in between
        ChatStatus.RUNNING,
        ChatStatus.WAITING,
    ]
    steps = check_status_path(statuses)
    targets = ["pending", "running", "error", "pending", "running", "waiting"]
    assert [step.target for step in steps] == targets
    assert is_valid_status_path(statuses)
    assert is_valid_status_path(["running", "pending", "running", "pending"])
    assert is_valid_status_path([])


@pytest.mark.parametrize(
    ("statuses", "index"),
    [
        (["new", "running"], 1),
        (["waiting", "running"], 1),
        (["pending", "waiting"], 1),
        (["new", "pending", "running", "error", "running"], 4),
        (["running", "new"], 1),
    ],
)
def test_oracle_rejects_invalid_status_paths(statuses: list[str], index: int) -> None:
    assert not is_valid_status_path(statuses)
    with pytest.raises(InvalidStatusPath) as info:
        check_status_path(statuses)
    assert info.value.index == index


def test_events_between_lists_every_transition() -> None:
    listed = {
        (source, event, target)
        for (source, target), events in EVENTS_BETWEEN.items()
        for event in events
    }
    changes = {
        (s.source, s.event, s.target)
        for s in transitions_of(ChatLifecycleChart)
        if s.source != s.target
    }
    assert listed == changes
    assert EVENTS_BETWEEN[("running", "waiting")] == (
        "finish_done",
        "finish_interrupted",
        "interrupt",
    )


# --- the registry ---------------------------------------------------------------------


def test_registry_names_every_chart_once() -> None:
    names = [name for name, _, _ in CHARTS]
    assert len(names) == len(set(names))
    classes = {cls for _, cls, _ in CHARTS}
    assert {DialChart, ChatLifecycleChart} <= classes
    for _, _, prose in CHARTS:
        assert prose.strip()
