"""Every status decision of a chat, in one place (docs/spec.md §1). Pure and synchronous.

`decide(event, view, ...)` asks `statecharts.lifecycle.ChatLifecycleChart`, put in
the status of `view`, what `event` does given the facts the deciding actor knows
(the queue's length, whether it holds the row's ownership token). The answer is a
`Plan`: the target status, the write effects the chart's transition recorded,
and the `Guard` - the facts the decision rested on. The store adapters execute a
plan as one guarded write and hold no status logic of their own: when the guard
no longer holds they change nothing and return the row as it is now, and the
caller decides again on that view (`chatd_trio.store.ops`). This is the
decide-then-write-once split: no "lock, read, decide, write" round trips, and a
replica that lost a chat can never write into it, because its token is in
every guard its writes carry.

Decisions are pure functions of (event, status, facts), so they are memoised;
the chart is consulted once per distinct question. `fired()` counts the chart
transitions taken, for coverage: the store reports each plan it executed
(`taken`), once per row it changed. A decision whose guard missed, or a
question like `still_owner`, took no transition.
"""

from __future__ import annotations

import enum
import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any

from statemachine.exceptions import TransitionNotAllowed

from chatd_trio.domain import Chat, ChatStatus
from statecharts import lifecycle as chart
from statecharts.base import Step, event_data_of

__all__ = [
    "ChatView",
    "Effect",
    "Event",
    "Guard",
    "Plan",
    "Refused",
    "decide",
    "fired",
    "still_owner",
    "taken",
]


class Event(enum.StrEnum):
    """Lifecycle events, by actor (see `statecharts.lifecycle`)."""

    CREATE = "create"
    SEND_MESSAGE = "send_message"
    EDIT = "edit"
    INTERRUPT = "interrupt"
    PROMOTE_QUEUED = "promote_queued"
    ACQUIRE = "acquire"
    STALE_RECOVERED = "stale_recovered"
    HEARTBEAT = "heartbeat"
    WRITE = "write"
    # `Store.release`: the chart's event is not called `release`, the name of every
    # chart's pool method.
    RELEASE = "hand_back"
    FINISH_DONE = "finish_done"
    FINISH_INTERRUPTED = "finish_interrupted"
    FINISH_ERROR = "finish_error"
    FINISH_SHUTDOWN = "finish_shutdown"


class Effect(enum.StrEnum):
    """What a plan writes besides the status (executed by the store, in this order)."""

    REPLACE_FROM = chart.REPLACE_FROM
    CLEAR_QUEUE = chart.CLEAR_QUEUE
    INSERT = chart.INSERT
    PROMOTE_OLDEST = chart.PROMOTE_OLDEST
    PROMOTE_CHOSEN = chart.PROMOTE_CHOSEN
    QUEUE_TO_FRONT = chart.QUEUE_TO_FRONT
    ENQUEUE = chart.ENQUEUE
    CLAIM = chart.CLAIM
    BEAT = chart.BEAT
    NEW_TOKEN = chart.NEW_TOKEN
    SET_ERROR = chart.SET_ERROR


@dataclass(frozen=True)
class ChatView:
    """What a decision reads of a chat row: its status, ownership token, queue length."""

    status: ChatStatus
    token: int = 0
    queued: int = 0

    @classmethod
    def of(cls, chat: Chat) -> ChatView:
        """The view of a chat row as read."""
        return cls(chat.status, chat.owner_token, chat.queued)


@dataclass(frozen=True)
class Guard:
    """The preconditions of a decided write: the row must still look like this."""

    status: ChatStatus | None  # None: the chat does not exist yet (create)
    token: int | None = None
    queued: int | None = None

    def holds(self, view: ChatView) -> bool:
        """Whether `view` still satisfies the facts the decision rested on."""
        return (
            view.status is self.status
            and (self.token is None or view.token == self.token)
            and (self.queued is None or view.queued == self.queued)
        )


@dataclass(frozen=True)
class Plan:
    """A decided status change: execute `effects`, set `target`, only while `guard` holds."""

    event: Event
    step: Step
    guard: Guard
    target: ChatStatus
    effects: frozenset[Effect]
    last_error: str | None = None

    def has(self, effect: Effect) -> bool:
        """Whether the plan writes `effect`."""
        return effect in self.effects

    @property
    def changes_row(self) -> bool:
        """Whether the chat row itself is written (status, owner, token, heartbeat, error)."""
        return self.target is not self.guard.status or bool(
            self.effects & {Effect.CLAIM, Effect.BEAT, Effect.NEW_TOKEN, Effect.SET_ERROR}
        )

    @property
    def owned_after(self) -> bool:
        """A chat is owned (worker, started, heartbeat) exactly while it is running."""
        return self.target is ChatStatus.RUNNING


class Refused(Exception):
    """The chart has no transition for the event in this status under these facts.

    `chat` is the row the refusal was decided on, when the caller had read it.
    """

    def __init__(self, event: Event, view: ChatView, chat: Chat | None = None) -> None:
        super().__init__(f"{event.value} refused: chat is {view.status.value}")
        self.event = event
        self.view = view
        self.chat = chat


_FIRED: Counter[Step] = Counter()
_EVENT_DATA = event_data_of(chart.ChatLifecycleChart)

# The chart is consulted through one instance per process: building one costs far more
# than a decision (python-statemachine prepares callbacks per instance).
_chart: chart.ChatLifecycleChart | None = None


@functools.lru_cache(maxsize=4096)
def _consult(
    event: Event, source: str, queued: int, max_queued: int, token_matches: bool
) -> tuple[Step, frozenset[Effect]] | None:
    global _chart
    if _chart is None:
        _chart = chart.ChatLifecycleChart()
    instance = _chart
    instance.current_state_value = source
    instance.effects.clear()
    taken = len(instance.trace)
    facts: dict[str, Any] = {
        "queued": queued,
        "max_queued": max_queued,
        "token_matches": token_matches,
    }
    # Strict charts take exactly the data the event's conditions and actions read.
    wanted = _EVENT_DATA[event.value]
    data = facts if wanted is None else {k: v for k, v in facts.items() if k in wanted}
    try:
        instance.send(event.value, **data)
    except TransitionNotAllowed:
        return None
    finally:
        effects = frozenset(Effect(e) for e in instance.effects)
        steps = instance.trace[taken:]
        instance.trace.clear()
    (step,) = steps
    return step, effects


def decide(
    event: Event,
    view: ChatView | None,
    *,
    token: int | None = None,
    max_queued: int = 0,
    error: str | None = None,
) -> Plan:
    """The plan for `event` on a chat that looks like `view`; `Refused` if none.

    `view` is None for a chat that does not exist yet (`create`). `token` is the
    acting run's ownership token (events of a running turn);
    `max_queued` bounds the queue (`send_message`); `error` is the user-facing
    message of a failed run (`finish_error`).
    """
    current = view if view is not None else ChatView(ChatStatus.WAITING)
    source = view.status.value if view is not None else "new"
    token_matches = token is not None and token == current.token
    # Only the queue's emptiness and room matter to the chart: clamp to keep the memo small.
    queued = min(current.queued, max_queued + 1) if max_queued else min(current.queued, 1)
    answer = _consult(event, source, queued, max_queued, token_matches)
    if answer is None:
        raise Refused(event, current)
    step, effects = answer
    facts = chart.guard_facts(event.value, source)
    guard = Guard(
        status=view.status if view is not None else None,
        token=token if "token" in facts else None,
        queued=current.queued if "queued" in facts else None,
    )
    return Plan(
        event=event,
        step=step,
        guard=guard,
        target=ChatStatus(step.target),
        effects=effects,
        last_error=error if Effect.SET_ERROR in effects else None,
    )


def still_owner(view: ChatView, token: int) -> bool:
    """Whether the run holding `token` still runs the chat that looks like `view`.

    True while its heartbeat would land. A running turn stops (as an interrupt) as
    soon as this is false: the user stopped or edited the chat, or another run took it.
    """
    try:
        decide(Event.HEARTBEAT, view, token=token)
    except Refused:
        return False
    return True


def taken(plan: Plan, rows: int = 1) -> None:
    """Record that `plan` was executed: its guarded write landed on `rows` chat rows."""
    if rows:
        _FIRED[plan.step] += rows


def fired() -> Counter[Step]:
    """How often each chart transition was taken in this process (see `taken`)."""
    return Counter(_FIRED)
