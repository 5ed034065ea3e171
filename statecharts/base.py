"""Shared machinery of the charts: a recorded trace and the set of all transitions.

A chart answers "given this event in this state, what next?" and records the
path it took, so property tests can measure transition coverage and check
that a run's path is valid.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from statemachine import StateChart


class Step(NamedTuple):
    """One transition taken: source state id, event name, target state id."""

    source: str
    event: str
    target: str


class TracedChart(StateChart[Any]):
    """A StateChart that records every transition it takes in `trace`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.trace: list[Step] = []
        super().__init__(*args, **kwargs)

    def after_transition(self, event: Any, source: Any, target: Any) -> None:
        self.trace.append(Step(source.id, str(event), target.id))

    @property
    def state_id(self) -> str:
        """The id of the (single, non-compound) active state."""
        ids = [s.id for s in self.configuration]
        return ids[-1]


def transitions_of(chart: type[StateChart[Any]]) -> set[Step]:
    """Every (source, event, target) a chart class declares: the coverage universe."""
    out: set[Step] = set()
    for state in chart.states:
        for transition in state.transitions:
            for event in transition.events:
                out.add(Step(state.id, str(event), transition.target.id))
    return out
