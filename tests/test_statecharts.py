"""The charts themselves: structure, scripted paths, the lifecycle oracle, coverage."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from statemachine.exceptions import TransitionNotAllowed

from chatd_trio.domain import ChatStatus
from statecharts import CHARTS, ChatLifecycleChart, DialChart
from statecharts.base import Step, transitions_of
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


def dial_path(*events: str, **kwargs: Any) -> DialChart:
    chart = DialChart(BOUND)
    for event in events:
        chart.send(event, **kwargs)
    return chart


@pytest.mark.parametrize(
    ("events", "final"),
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
def test_dial_chart_table_rows_are_paths(events: list[str], final: str) -> None:
    chart = dial_path(*events, agent=OTHER, cause=ValueError("boom"))
    assert chart.state_id == final
    assert chart.is_terminated
    assert [step.event for step in chart.trace] == events
    assert chart.activities == frozenset()


def test_dial_chart_tracks_target_agent_and_cause() -> None:
    chart = dial_path("delay_elapsed")
    chart.send("validated_other", agent=OTHER)
    assert chart.target_agent == OTHER
    cause = OSError("refused")
    chart.send("dial_failed", cause=cause)
    assert (chart.state_id, chart.cause) == ("failed", cause)
    same = dial_path("dial_failed")
    same.send("validated_same")
    assert same.target_agent == BOUND


def test_dial_chart_refuses_events_the_table_does_not_allow() -> None:
    chart = DialChart(BOUND)
    with pytest.raises(TransitionNotAllowed):
        chart.send("validated_same")
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
