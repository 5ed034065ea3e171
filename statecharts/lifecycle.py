"""The chat lifecycle (docs/spec.md §1) as a statechart: every status change, as data.

This chart decides. `chatd_trio.lifecycle.decide` puts a reusable instance in
the row's status, sends the event with the facts the deciding actor knows
(`queued`, `max_queued`, `token_matches`) and reads the answer: the target
status and the write effects the fired transition's actions recorded. The
store adapters only execute that plan as one guarded write; the guard is the
set of facts this chart's conditions read for the event (`GUARD_FACTS`).

An event that has no enabled transition is refused: `send_message` with a full
queue, a turn's write or finish after it lost the chat (stale token, an edit
made the row `pending`), a heartbeat after a takeover.

Actors and events:
- user: `create`, `send_message` (insert when idle, else queue), `edit`,
  `interrupt`, `promote_queued`;
- replica: `acquire`, `stale_recovered`;
- the running turn (its ownership token): `heartbeat`, `write` (a step, a
  compaction, an interrupted partial, the workspace binding), `hand_back`
  (`Store.release`: handed back unstarted; not named `release`, every chart's pool
  method), and one finish per outcome: `finish_done`, `finish_interrupted`,
  `finish_error`, `finish_shutdown`.

A user stop wins: a finish that finds the row `waiting` under its own token (the
user interrupted while the turn ran) ends like the interrupt, whatever the turn's
outcome: the oldest queued message is promoted (-> `pending`) or the chat stays
`waiting`. Every finish ends the run's token (`end_run`), so nothing the finished
run might still send can land.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from statemachine import Event, State
from statemachine.exceptions import TransitionNotAllowed

from statecharts.base import Step, TracedChart, event_data_of, transitions_of


class InvalidStatusPath(ValueError):
    """A status sequence that no sequence of lifecycle events produces."""

    def __init__(self, index: int, source: str, target: str) -> None:
        super().__init__(f"no lifecycle transition {source!r} -> {target!r} (at index {index})")
        self.index = index
        self.source = source
        self.target = target


# Write effects a transition's actions record, executed by the store in one guarded write.
INSERT = "insert"  # insert the messages the caller supplies (user message, step, replacement)
ENQUEUE = "enqueue"  # append the caller's message to the queue
PROMOTE_OLDEST = "promote_oldest"  # move the oldest queued message into the history
PROMOTE_CHOSEN = "promote_chosen"  # move the chosen queued message into the history
QUEUE_TO_FRONT = "queue_to_front"  # move the chosen queued message to the front of the queue
REPLACE_FROM = "replace_from"  # soft-delete the edited message and everything after it
CLEAR_QUEUE = "clear_queue"
CLAIM = "claim"  # owner = the acquiring replica, started/heartbeat = now
BEAT = "beat"  # heartbeat = now
NEW_TOKEN = "new_token"  # owner_token + 1: every earlier holder is fenced out
SET_ERROR = "set_error"  # last_error = the turn's error

EFFECTS: tuple[str, ...] = (
    INSERT,
    ENQUEUE,
    PROMOTE_OLDEST,
    PROMOTE_CHOSEN,
    QUEUE_TO_FRONT,
    REPLACE_FROM,
    CLEAR_QUEUE,
    CLAIM,
    BEAT,
    NEW_TOKEN,
    SET_ERROR,
)

# Which fact of the row each condition reads: the guard of a decided write.
CONDITION_FACTS: dict[str, str] = {
    "idle": "queued",
    "room": "queued",
    "has_queue": "queued",
    "owned": "token",
}


class ChatLifecycleChart(TracedChart):
    """Statuses of one chat: new, waiting, pending, running, error.

    Events carry facts as keyword arguments: `queued` (the queue's length),
    `max_queued`, `token_matches` (the actor holds the row's ownership token).
    The actions append to `effects`. Start it in any status with
    `ChatLifecycleChart(start_value="running")`.
    """

    allow_event_without_transition = False
    catch_errors_as_events = False

    new = State("new", initial=True)
    waiting = State("waiting")
    pending = State("pending")
    running = State("running")
    error = State("error")

    create = Event(new.to(pending, on="insert"), name="create")
    # Not `send`: StateChart.send is the method that dispatches events.
    send_message = Event(
        waiting.to(pending, cond="idle", on="insert")
        | error.to(pending, cond="idle", on="insert")
        | waiting.to(waiting, cond="room", on="enqueue", internal=True)
        | error.to(error, cond="room", on="enqueue", internal=True)
        | pending.to(pending, cond="room", on="enqueue", internal=True)
        | running.to(running, cond="room", on="enqueue", internal=True),
        name="send_message",
    )
    # An edit always leaves the chat `pending`; a run's next write then finds it refused.
    edit = Event(
        waiting.to(pending, on="replace")
        | error.to(pending, on="replace")
        | running.to(pending, on="replace")
        | pending.to(pending, on="replace", internal=True),
        name="edit",
    )
    # Interrupt sets `waiting` unless `pending` (nothing runs to stop there).
    interrupt = Event(
        running.to(waiting)
        | error.to(waiting)
        | waiting.to(waiting, internal=True)
        | pending.to(pending, internal=True),
        name="interrupt",
    )
    # While the chat runs, a promoted message goes to the front of the queue.
    promote_queued = Event(
        running.to(running, on="queue_to_front", internal=True)
        | waiting.to(pending, on="promote_chosen")
        | error.to(pending, on="promote_chosen")
        | pending.to(pending, on="promote_chosen", internal=True),
        name="promote_queued",
    )
    acquire = Event(pending.to(running, on=["claim", "new_token"]), name="acquire")
    stale_recovered = Event(running.to(pending, on="new_token"), name="stale_recovered")
    heartbeat = Event(running.to(running, cond="owned", on="beat", internal=True), name="heartbeat")
    # A turn's writes land while it holds the token: running, or waiting after a user stop
    # (what the stopped turn produced is kept).
    write = Event(
        running.to(running, cond="owned", on="insert", internal=True)
        | waiting.to(waiting, cond="owned", on="insert", internal=True),
        name="write",
    )
    hand_back = Event(running.to(pending, cond="owned", on="new_token"), name="hand_back")
    finish_done = Event(
        running.to(pending, cond=["owned", "has_queue"], on="end_with_promotion")
        | running.to(waiting, cond="owned", on="end_run")
        | waiting.to(pending, cond=["owned", "has_queue"], on="end_with_promotion")
        | waiting.to(waiting, cond="owned", on="end_run", internal=True),
        name="finish_done",
    )
    finish_interrupted = Event(
        running.to(pending, cond=["owned", "has_queue"], on="end_with_promotion")
        | running.to(waiting, cond="owned", on="end_run")
        | waiting.to(pending, cond=["owned", "has_queue"], on="end_with_promotion")
        | waiting.to(waiting, cond="owned", on="end_run", internal=True),
        name="finish_interrupted",
    )
    # A failed run does not promote the queue: the user reads the error first.
    finish_error = Event(
        running.to(error, cond="owned", on=["end_run", "set_error"])
        | waiting.to(pending, cond=["owned", "has_queue"], on="end_with_promotion")
        | waiting.to(waiting, cond="owned", on="end_run", internal=True),
        name="finish_error",
    )
    # Shutdown, or a store that stayed unavailable: another replica runs the chat.
    finish_shutdown = Event(
        running.to(pending, cond="owned", on="end_run")
        | waiting.to(pending, cond=["owned", "has_queue"], on="end_with_promotion")
        | waiting.to(waiting, cond="owned", on="end_run", internal=True),
        name="finish_shutdown",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.effects: list[str] = []
        super().__init__(*args, **kwargs)

    # -- conditions: facts the deciding actor knows ----------------------------------------
    def idle(self, queued: int) -> bool:
        """Nothing queued: a message goes straight into the history."""
        return queued == 0

    def room(self, queued: int, max_queued: int) -> bool:
        """The queue has room for one more message."""
        return queued < max_queued

    def has_queue(self, queued: int) -> bool:
        """A queued message waits to be promoted."""
        return queued > 0

    def owned(self, token_matches: bool) -> bool:
        """The actor holds the row's current ownership token."""
        return token_matches

    # -- actions: the writes the transition implies ------------------------------------------
    def insert(self) -> None:
        self.effects.append(INSERT)

    def enqueue(self) -> None:
        self.effects.append(ENQUEUE)

    def replace(self) -> None:
        self.effects += [REPLACE_FROM, INSERT, CLEAR_QUEUE]

    def queue_to_front(self) -> None:
        self.effects.append(QUEUE_TO_FRONT)

    def promote_chosen(self) -> None:
        self.effects.append(PROMOTE_CHOSEN)

    def claim(self) -> None:
        self.effects.append(CLAIM)

    def new_token(self) -> None:
        self.effects.append(NEW_TOKEN)

    def beat(self) -> None:
        self.effects.append(BEAT)

    def end_run(self) -> None:
        # The turn's own output (its final step) lands with its finish, atomically.
        self.effects += [INSERT, NEW_TOKEN]

    def end_with_promotion(self) -> None:
        self.effects += [INSERT, PROMOTE_OLDEST, NEW_TOKEN]

    def set_error(self) -> None:
        self.effects.append(SET_ERROR)


def guard_facts(event: str, source: str) -> frozenset[str]:
    """The row facts the conditions of `event`'s transitions from `source` read.

    A decision for that event in that status holds only while these facts (and
    the status) are unchanged: they are the guard of the write that executes it.
    """
    return _GUARD_FACTS.get((event, source), frozenset())


def _guard_facts() -> dict[tuple[str, str], frozenset[str]]:
    table: dict[tuple[str, str], set[str]] = {}
    for state in ChatLifecycleChart.states:
        for transition in state.transitions:
            for event in transition.events:
                facts = table.setdefault((str(event), state.id), set())
                for spec in transition.cond:
                    facts.add(CONDITION_FACTS[spec.attr_name])
    return {key: frozenset(value) for key, value in table.items()}


_GUARD_FACTS = _guard_facts()


def _events_between() -> dict[tuple[str, str], tuple[str, ...]]:
    table: dict[tuple[str, str], set[str]] = {}
    for step in transitions_of(ChatLifecycleChart):
        if step.source != step.target:
            table.setdefault((step.source, step.target), set()).add(step.event)
    return {pair: tuple(sorted(events)) for pair, events in sorted(table.items())}


EVENTS_BETWEEN: dict[tuple[str, str], tuple[str, ...]] = _events_between()
"""(from status, to status) -> the events that make that change, sorted."""


# Facts under which each event fires some transition from each status, for replays.
_ANY_FACTS: tuple[dict[str, Any], ...] = (
    {"queued": 0, "max_queued": 1, "token_matches": True},
    {"queued": 1, "max_queued": 2, "token_matches": True},
)


def replay_events(
    events: Iterable[str | tuple[str, dict[str, Any]]], *, start: str = "new"
) -> ChatLifecycleChart:
    """Run `events` through a fresh chart; raises `TransitionNotAllowed` on a refused one.

    An event is a name (sent with an empty queue and a matching token) or a
    (name, facts) pair.
    """
    chart = ChatLifecycleChart(start_value=start) if start != "new" else ChatLifecycleChart()
    for item in events:
        name, facts = (item, {}) if isinstance(item, str) else item
        chart.send(name, **_data(name, {**_ANY_FACTS[0], **facts}))
    return chart


def _data(event: str, facts: dict[str, Any]) -> dict[str, Any]:
    """The facts `event` takes: strict charts refuse data their callbacks do not read."""
    wanted = event_data_of(ChatLifecycleChart)[event]
    return facts if wanted is None else {k: v for k, v in facts.items() if k in wanted}


def check_status_path(statuses: Sequence[str]) -> list[Step]:
    """The transitions explaining an observed status sequence, else `InvalidStatusPath`.

    The sequence starts anywhere (`"new"` for a chat not yet created). A status
    repeated back to back is an observation with no change in between, not a
    transition. Each change is replayed through the chart with the first event
    (by name) that makes it, under facts that enable it.
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
        for facts in _ANY_FACTS:
            chart.current_state_value = source
            taken = len(chart.trace)
            try:
                chart.send(events[0], **_data(events[0], facts))
            except TransitionNotAllowed:  # pragma: no cover - the table comes from the chart
                continue
            if chart.state_id == target:
                break
            del chart.trace[taken:]
        else:  # pragma: no cover - every listed change is enabled under some facts
            raise InvalidStatusPath(index, source, target)
    return list(chart.trace)


def is_valid_status_path(statuses: Sequence[str]) -> bool:
    """Whether some sequence of lifecycle events produces `statuses`."""
    try:
        check_status_path(statuses)
    except InvalidStatusPath:
        return False
    return True
