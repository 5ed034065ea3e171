"""The charts themselves: structure, scripted paths, strictness, the pool, the lifecycle
oracle, coverage."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from statemachine.exceptions import TransitionNotAllowed
from statemachine.state import InstanceState

from chatd_trio.domain import ChatStatus
from statecharts import CHARTS, ChatLifecycleChart, DialChart
from statecharts.base import (
    ChartError,
    ChartUnusable,
    EventDataError,
    Step,
    TracedChart,
    _PoolEngine,
    event_data_of,
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
    assert len(universe) == 21
    assert len({(s.source, s.event, s.target) for s in universe}) == 18
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
    CompactionChart: (
        lambda cls: cls(5, 3),
        "step_persisted",
        {"tool_calls": True, "over_threshold": False},
    ),
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
    first.send("step_persisted", tool_calls=True, over_threshold=True)
    assert first.state_id == "compacting"
    first.release()
    assert first.is_released
    again = CompactionChart.fresh(4, 2)
    assert again is first
    assert not again.is_released
    # As if constructed: start state entered through the library (its entry action
    # counted the first step), empty trace, the new arguments.
    assert _public(again) == _public(CompactionChart(4, 2))
    assert (again.state_id, again.steps_used, again.max_steps, again.trace) == (
        "stepping",
        1,
        4,
        [],
    )
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
    chart.send("fail")
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
_RANDOM_EVENTS: dict[type[TracedChart], st.SearchStrategy[tuple[str, dict[str, Any]]]] = {
    DialChart: st.sampled_from(list(DIAL_EVENTS.values())),
    CompactionChart: st.one_of(
        st.tuples(
            st.just("step_persisted"),
            st.fixed_dictionaries({"tool_calls": st.booleans(), "over_threshold": st.booleans()}),
        ),
        st.tuples(
            st.just("post_run_check"),
            st.fixed_dictionaries({"over_threshold": st.booleans()}),
        ),
        st.tuples(st.sampled_from(["summary_ok", "summary_failed", "reloaded"]), st.just({})),
    ),
    ChatLifecycleChart: st.tuples(
        st.sampled_from(sorted(event_data_of(ChatLifecycleChart))), st.just({})
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


# --- ChatLifecycleChart: scripted paths and coverage ----------------------------------

LIFECYCLE_SCRIPTS: list[tuple[str, list[str], str]] = [
    ("new", ["create", "acquire", "finish_done"], "waiting"),
    ("new", ["create", "acquire", "finish_with_queued", "acquire", "fail"], "error"),
    ("error", ["send_message", "acquire", "interrupt"], "waiting"),
    ("waiting", ["edit", "acquire", "interrupt_with_queued"], "pending"),
    ("error", ["edit", "edit", "acquire", "shutdown"], "pending"),
    ("waiting", ["send_message", "acquire", "stale_recovered"], "pending"),
    ("running", ["edit"], "pending"),
    ("error", ["interrupt"], "waiting"),
    ("waiting", ["interrupt_with_queued"], "pending"),
]


@pytest.mark.parametrize(("start", "events", "final"), LIFECYCLE_SCRIPTS)
def test_lifecycle_scripted_paths(start: str, events: list[str], final: str) -> None:
    chart = replay_events(events, start=start)
    assert chart.state_id == final
    assert [step.event for step in chart.trace] == events


def test_lifecycle_scripts_cover_every_transition() -> None:
    covered: set[Step] = set()
    for start, events, _ in LIFECYCLE_SCRIPTS:
        covered.update(replay_events(events, start=start).trace)
    assert covered == transitions_of(ChatLifecycleChart)


@pytest.mark.parametrize(
    ("start", "event"),
    [
        ("new", "acquire"),
        ("waiting", "acquire"),
        ("pending", "finish_done"),
        ("running", "send_message"),  # a busy chat queues the message instead
        ("error", "fail"),
        ("waiting", "create"),
    ],
)
def test_lifecycle_refuses_invalid_events(start: str, event: str) -> None:
    with pytest.raises(TransitionNotAllowed):
        replay_events([event], start=start)


def test_interrupt_and_shutdown_differ() -> None:
    assert replay_events(["interrupt"], start="running").state_id == "waiting"
    assert replay_events(["shutdown"], start="running").state_id == "pending"


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
        Step(source, event, target)
        for (source, target), events in EVENTS_BETWEEN.items()
        for event in events
    }
    assert listed == transitions_of(ChatLifecycleChart)
    assert EVENTS_BETWEEN[("running", "waiting")] == ("finish_done", "interrupt")


# --- the registry ---------------------------------------------------------------------


def test_registry_names_every_chart_once() -> None:
    names = [name for name, _, _ in CHARTS]
    assert len(names) == len(set(names))
    classes = {cls for _, cls, _ in CHARTS}
    assert {DialChart, ChatLifecycleChart} <= classes
    for _, _, prose in CHARTS:
        assert prose.strip()
