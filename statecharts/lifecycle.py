"""The chat lifecycle (docs/spec.md §1) as a statechart, and a path oracle.

Every status change a chat may make lives in this file, as data. The store
and server perform the changes; tests replay what they observed through
`check_status_path` / `is_valid_status_path` to ask "is this a valid path?".

Messages sent while a chat is `pending` or `running` are queued and do not
change the status, so they have no transition here. An edit may hit a
`running` chat (the run is then refused when it persists) or a `pending`
one (it stays `pending`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from statemachine import Event, State
from statemachine.exceptions import TransitionNotAllowed

from statecharts.base import Step, TracedChart, transitions_of


class InvalidStatusPath(ValueError):
    """A status sequence that no sequence of lifecycle events produces."""

    def __init__(self, index: int, source: str, target: str) -> None:
        super().__init__(f"no lifecycle transition {source!r} -> {target!r} (at index {index})")
        self.index = index
        self.source = source
        self.target = target


class ChatLifecycleChart(TracedChart):
    """Statuses of one chat: new, waiting, pending, running, error.

    Start it in any status with `ChatLifecycleChart(start_value="running")`.
    """

    # Replaying an event the lifecycle forbids must fail, not pass silently.
    allow_event_without_transition = False

    new = State("new", initial=True)
    waiting = State("waiting")
    pending = State("pending")
    running = State("running")
    error = State("error")

    create = Event(new.to(pending), name="create")
    # Not `send`: StateChart.send is the method that dispatches events.
    send_message = Event(waiting.to(pending) | error.to(pending), name="send_message")
    edit = Event(
        waiting.to(pending) | error.to(pending) | running.to(pending) | pending.to(pending),
        name="edit",
    )
    acquire = Event(pending.to(running), name="acquire")
    finish_done = Event(running.to(waiting), name="finish_done")
    finish_with_queued = Event(running.to(pending), name="finish_with_queued")
    fail = Event(running.to(error), name="fail")
    # Interrupt sets `waiting` unless `pending` (an errored chat is stopped too).
    interrupt = Event(running.to(waiting) | error.to(waiting), name="interrupt")
    # The stopped turn's final transition promotes a queued message (from the
    # user-stopped `waiting` row, or straight from `running`).
    interrupt_with_queued = Event(
        running.to(pending) | waiting.to(pending), name="interrupt_with_queued"
    )
    shutdown = Event(running.to(pending), name="shutdown")
    stale_recovered = Event(running.to(pending), name="stale_recovered")


def _events_between() -> dict[tuple[str, str], tuple[str, ...]]:
    table: dict[tuple[str, str], list[str]] = {}
    for step in sorted(transitions_of(ChatLifecycleChart)):
        table.setdefault((step.source, step.target), []).append(step.event)
    return {pair: tuple(events) for pair, events in table.items()}


EVENTS_BETWEEN: dict[tuple[str, str], tuple[str, ...]] = _events_between()
"""(from status, to status) -> the events that make that change, sorted."""


def replay_events(events: Iterable[str], *, start: str = "new") -> ChatLifecycleChart:
    """Run `events` through a fresh chart; raises `TransitionNotAllowed` on a forbidden one."""
    chart = ChatLifecycleChart(start_value=start) if start != "new" else ChatLifecycleChart()
    for event in events:
        chart.send(event)
    return chart


def check_status_path(statuses: Sequence[str]) -> list[Step]:
    """The transitions explaining an observed status sequence, else `InvalidStatusPath`.

    The sequence starts anywhere (`"new"` for a chat not yet created). A status
    repeated back to back is an observation with no change in between, not a
    transition. Where several events explain a change, the first by name is
    replayed through the chart (any of them explains it).
    """
    observed = [str(s) for s in statuses]
    if not observed:
        return []
    chart = replay_events((), start=observed[0])
    for index in range(1, len(observed)):
        source, target = observed[index - 1], observed[index]
        if source == target:
            continue
        events = EVENTS_BETWEEN.get((source, target))
        if not events:
            raise InvalidStatusPath(index, source, target)
        try:
            chart.send(events[0])
        except TransitionNotAllowed as exc:  # pragma: no cover - table and chart agree
            raise InvalidStatusPath(index, source, target) from exc
    return list(chart.trace)


def is_valid_status_path(statuses: Sequence[str]) -> bool:
    """Whether some sequence of lifecycle events produces `statuses`."""
    try:
        check_status_path(statuses)
    except InvalidStatusPath:
        return False
    return True
