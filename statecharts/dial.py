"""The lazy-validation dial (docs/spec.md §5.1) as a statechart.

Every transition of the dial lives in this file, as data, including the one
decision the driver could otherwise make itself: whether the workspace's current
agent is the bound one (the `same_agent` guard of `validated`). The driver
(`chatd_trio.dial`) runs the activities the current state asks for
(`ACTIVITIES`), reports what those activities return as events, and reads the
outcome from the final state. Each row of the contract's table is a path from
`dialing` to a final state:

- fast success: dialing -dial_ok-> connected
- validate-same: dialing -dial_failed-> validating_after_failure
  -validated [same_agent]-> redialing_same -dial_ok/dial_failed-> connected/failed
- validate-switch: ... -validated [else]-> dialing_other -dial_ok-> switched
- fast-fail no agent / validation error: ... -> no_agent / failed
- slow dial: dialing -delay_elapsed-> validating_while_dialing, then
  validated [same_agent] / validated_error -> awaiting_bound (keep waiting),
  validated_no_agent -> no_agent, validated [else] -> dialing_other
- caller cancelled: any waiting state -cancel-> cancelled
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from typing import Any

from statemachine import Event, State

from statecharts.base import TracedChart


class Activity(enum.Enum):
    """Work the driver keeps running while the chart is in a state."""

    BOUND_DIAL = "bound_dial"
    """Dial the bound agent (started once, kept across states until dropped)."""
    DELAY = "delay"
    """The validation delay timer; reports `delay_elapsed`."""
    VALIDATION = "validation"
    """Ask the workspace for its current agent."""
    SECOND_DIAL = "second_dial"
    """Dial `DialChart.target_agent`: the bound agent again, or the new one."""


class DialChart(TracedChart):
    """Decides the lazy-validation dial; pure, synchronous, traced.

    Events carry data as keyword arguments (strict, see `statecharts.base`):
    `validated(agent=...)` names the workspace's current agent, which the
    `same_agent` guard compares with the bound one; `dial_failed`,
    `validated_error` and `validated_no_agent` carry `cause=` (the exception),
    kept in `cause` when the chart ends in `failed` or `no_agent`.
    """

    dialing = State("dialing", initial=True)
    validating_after_failure = State("validating_after_failure")
    validating_while_dialing = State("validating_while_dialing")
    awaiting_bound = State("awaiting_bound")
    redialing_same = State("redialing_same")
    dialing_other = State("dialing_other")
    connected = State("connected", final=True)
    switched = State("switched", final=True)
    no_agent = State("no_agent", final=True)
    failed = State("failed", final=True)
    cancelled = State("cancelled", final=True)

    dial_ok = Event(
        dialing.to(connected)
        | validating_while_dialing.to(connected)
        | awaiting_bound.to(connected)
        | redialing_same.to(connected)
        | dialing_other.to(switched),
        name="dial_ok",
    )
    dial_failed = Event(
        dialing.to(validating_after_failure)
        | validating_while_dialing.to(validating_after_failure)
        | awaiting_bound.to(failed)
        | redialing_same.to(failed)
        | dialing_other.to(failed),
        name="dial_failed",
    )
    delay_elapsed = Event(dialing.to(validating_while_dialing), name="delay_elapsed")
    validated = Event(
        validating_after_failure.to(redialing_same, cond="same_agent")
        | validating_after_failure.to(dialing_other, on="retarget")
        | validating_while_dialing.to(awaiting_bound, cond="same_agent")
        | validating_while_dialing.to(dialing_other, on="retarget"),
        name="validated",
    )
    validated_no_agent = Event(
        validating_after_failure.to(no_agent) | validating_while_dialing.to(no_agent),
        name="validated_no_agent",
    )
    validated_error = Event(
        validating_after_failure.to(failed) | validating_while_dialing.to(awaiting_bound),
        name="validated_error",
    )
    cancel = Event(
        dialing.to(cancelled)
        | validating_after_failure.to(cancelled)
        | validating_while_dialing.to(cancelled)
        | awaiting_bound.to(cancelled)
        | redialing_same.to(cancelled)
        | dialing_other.to(cancelled),
        name="cancel",
    )

    def __init__(self, bound_agent: uuid.UUID, **kwargs: Any) -> None:
        self.bound_agent = bound_agent
        self.target_agent = bound_agent
        self.cause: BaseException | None = None
        super().__init__(**kwargs)

    # -- guards -----------------------------------------------------------------
    def same_agent(self, agent: uuid.UUID) -> bool:
        """The workspace still runs the bound agent."""
        return agent == self.bound_agent

    # -- actions ----------------------------------------------------------------
    def retarget(self, agent: uuid.UUID) -> None:
        self.target_agent = agent

    def on_enter_failed(self, cause: BaseException) -> None:
        self.cause = cause

    def on_enter_no_agent(self, cause: BaseException) -> None:
        self.cause = cause

    def release(self) -> None:
        # A pooled chart must not keep the last run's exception (and its frames) alive.
        self.cause = None
        super().release()

    @property
    def activities(self) -> frozenset[Activity]:
        """What the driver must keep running in the current state."""
        return ACTIVITIES[self.state_id]


_NONE: frozenset[Activity] = frozenset()

ACTIVITIES: Mapping[str, frozenset[Activity]] = {
    "dialing": frozenset({Activity.BOUND_DIAL, Activity.DELAY}),
    "validating_after_failure": frozenset({Activity.VALIDATION}),
    # The bound dial keeps going while the binding is checked: a slow dial may still win.
    "validating_while_dialing": frozenset({Activity.BOUND_DIAL, Activity.VALIDATION}),
    "awaiting_bound": frozenset({Activity.BOUND_DIAL}),
    "redialing_same": frozenset({Activity.SECOND_DIAL}),
    "dialing_other": frozenset({Activity.SECOND_DIAL}),
    "connected": _NONE,
    "switched": _NONE,
    "no_agent": _NONE,
    "failed": _NONE,
    "cancelled": _NONE,
}
"""Activities per state. Entering a state starts what it lists and was not yet
started; leaving a state cancels what the next state does not list."""
