"""Interleavings of the lazy-validation dial, explored by Hypothesis.

Each example draws when the bound dial, the validation and the second dial
finish, whether each succeeds, whether the dials honour cancellation, what
the validation answers and when (if ever) the caller is cancelled; with
`st.random_module()` Trio's scheduling order is Hypothesis-managed too. The
oracle is the docs/spec.md §5.1 table, written out in `expected()`.

Times live on a grid of eighths of a second chosen so that no two events can
coincide: the delay ends at 0 (mod 8), a bound dial at 1, a validation at 2 or
3, a second dial at 4 or 5; the caller is cancelled midway between two chart
events, so in every state. Ties would make the table ambiguous; every order
between distinct times is still explored.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd_trio.dial import DialResult, dial_with_lazy_validation
from chatd_trio.errors import DialError, NoWorkspaceAgent
from statecharts.base import Step, transitions_of
from statecharts.dial import DialChart
from tests.test_dial import (
    BOUND,
    DELAY,
    ERROR,
    NO_AGENT,
    OTHER,
    WORKSPACE,
    DialPlan,
    FakeConn,
    FakeWorld,
    Recorder,
    ValidatePlan,
    label,
)

EIGHTH = 0.125
# The validated agent is the bound one: the chart's `same_agent` guard chose the transition.
SAME = "validated[same_agent]"
EXAMPLES = 400

# Every DialChart transition any example took, for test_property_tests_cover_dial_chart.
COVERED: set[Step] = set()


def _grid(residue: int, high: int) -> st.SearchStrategy[float]:
    # sampled_from draws evenly; integers() would favour the small (early) times.
    return st.sampled_from([(8 * k + residue) * EIGHTH for k in range(high + 1)])


@dataclass(frozen=True)
class Scenario:
    bound_at: float
    bound_ok: bool
    bound_honours_cancel: bool
    validate_after: float
    validated: str  # "same", "other", NO_AGENT or ERROR
    second_after: float
    second_ok: bool
    second_honours_cancel: bool
    # When the caller is cancelled, counted in phases of the uncancelled run (the
    # time between two consecutive chart events) back from its last event: 0 is
    # midway through the last phase, 1 the one before, ...; -1 is after the result
    # (a late cancel changes nothing), -2 never.
    cancel_phase: int


scenarios = st.builds(
    Scenario,
    bound_at=_grid(1, 11),  # 0.125 .. 11.125: either side of the 5 s delay
    bound_ok=st.booleans(),
    bound_honours_cancel=st.booleans(),
    validate_after=_grid(2, 2),
    validated=st.sampled_from(["same", "other", NO_AGENT, ERROR]),
    second_after=_grid(2, 4),
    second_ok=st.booleans(),
    second_honours_cancel=st.booleans(),
    cancel_phase=st.sampled_from([-2, -2, -1, 0, 1]),
)


@dataclass(frozen=True)
class Expected:
    """What the table says: the chart events and their times, the outcome, the counts."""

    path: list[tuple[float, str]]
    kind: str  # connected, switched, no_agent, failed, cancelled
    dials: int
    validations: int
    conn_index: int | None = None
    error_message: str | None = None

    @property
    def at(self) -> float:
        return self.path[-1][0]


def _dial_error(index: int, agent: uuid.UUID) -> str:
    return f"dial with lazy validation: dial {index} to {agent} refused"


def _second_dial(
    s: Scenario, path: list[tuple[float, str]], start: float, agent: uuid.UUID
) -> Expected:
    end = start + s.second_after
    if not s.second_ok:
        return Expected([*path, (end, "dial_failed")], "failed", 2, 1, None, _dial_error(1, agent))
    kind = "connected" if agent == BOUND else "switched"
    return Expected([*path, (end, "dial_ok")], kind, 2, 1, 1)


def _after_failure(s: Scenario, path: list[tuple[float, str]], answered: float) -> Expected:
    """The bound dial has failed; the validation answers at `answered`."""
    if s.validated == NO_AGENT:
        return Expected([*path, (answered, "validated_no_agent")], "no_agent", 1, 1)
    if s.validated == ERROR:
        message = "dial with lazy validation: workspace lookup failed"
        return Expected([*path, (answered, "validated_error")], "failed", 1, 1, None, message)
    event, agent = (SAME, BOUND) if s.validated == "same" else ("validated", OTHER)
    return _second_dial(s, [*path, (answered, event)], answered, agent)


def _table(s: Scenario) -> Expected:
    """The docs/spec.md §5.1 table, row by row, for a caller that is never cancelled."""
    bound_ok = (s.bound_at, "dial_ok")
    bound_failed = (s.bound_at, "dial_failed")
    if s.bound_at < DELAY:  # rows 1-5: the bound dial ends before the delay
        if s.bound_ok:
            return Expected([bound_ok], "connected", 1, 0, 0)
        return _after_failure(s, [bound_failed], s.bound_at + s.validate_after)
    # rows 6-8: the delay passes with the dial pending; validation starts
    path = [(DELAY, "delay_elapsed")]
    answered = DELAY + s.validate_after
    if s.bound_at < answered:  # the bound dial ends before the validation answers
        if s.bound_ok:
            return Expected([*path, bound_ok], "connected", 1, 1, 0)
        return _after_failure(s, [*path, bound_failed], answered)
    if s.validated in ("same", ERROR):  # keep waiting for the bound dial
        path.append((answered, SAME if s.validated == "same" else "validated_error"))
        if s.bound_ok:
            return Expected([*path, bound_ok], "connected", 1, 1, 0)
        return Expected([*path, bound_failed], "failed", 1, 1, None, _dial_error(0, BOUND))
    if s.validated == NO_AGENT:
        return Expected([*path, (answered, "validated_no_agent")], "no_agent", 1, 1)
    return _second_dial(s, [*path, (answered, "validated")], answered, OTHER)


def cancel_time(s: Scenario) -> float | None:
    """Midway between two chart events: never tied with one, so the state is known."""
    times = [0.0] + [at for at, _ in _table(s).path]
    if s.cancel_phase == -2:
        return None
    if s.cancel_phase == -1:
        return times[-1] + 1.0
    end = max(len(times) - 1 - s.cancel_phase, 1)
    return (times[end - 1] + times[end]) / 2


def expected(s: Scenario) -> Expected:
    """The table as an oracle, cut short where the caller is cancelled."""
    outcome = _table(s)
    cancel_at = cancel_time(s)
    if cancel_at is None or cancel_at > outcome.at:
        return outcome
    before = [(at, event) for at, event in outcome.path if at < cancel_at]
    return Expected([*before, (cancel_at, "cancel")], "cancelled", -1, -1)


@dataclass
class Observed:
    result: DialResult[FakeConn] | None
    error: Exception | None
    cancelled: bool
    returned_at: float
    world: FakeWorld
    recorder: Recorder


def _world(s: Scenario) -> FakeWorld:
    validated = {"same": BOUND, "other": OTHER}.get(s.validated, s.validated)
    return FakeWorld(
        [
            DialPlan(s.bound_at, s.bound_ok, s.bound_honours_cancel),
            DialPlan(s.second_after, s.second_ok, s.second_honours_cancel),
        ],
        ValidatePlan(s.validate_after, validated),
    )


def observe(s: Scenario) -> Observed:
    """Run one scenario on a fresh Trio loop with an autojumping mock clock."""
    world = _world(s)
    recorder = Recorder()
    box: list[Observed] = []

    async def main() -> None:
        result: DialResult[FakeConn] | None = None
        error: Exception | None = None
        start = trio.current_time()
        cancel = cancel_time(s)
        cancel_at = math.inf if cancel is None else start + cancel
        async with trio.open_nursery() as nursery:
            with trio.move_on_at(cancel_at) as scope:
                try:
                    result = await dial_with_lazy_validation(
                        BOUND,
                        WORKSPACE,
                        world.dial,
                        world.validate,
                        delay=DELAY,
                        nursery=nursery,
                        observer=recorder,
                    )
                except Exception as exc:
                    error = exc
            returned_at = trio.current_time() - start
            box.append(
                Observed(result, error, scope.cancelled_caught, returned_at, world, recorder)
            )

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return box[0]


def check(s: Scenario) -> None:
    """Run `s` and hold it to the table and the invariants."""
    want = expected(s)
    got = observe(s)
    COVERED.update(got.recorder.steps)
    world = got.world
    # The chart took the table's path, and the call returned when the table says:
    # it never waits for a stale dial.
    assert [label(step) for step in got.recorder.steps] == [event for _, event in want.path]
    assert got.recorder.steps[-1].target == want.kind
    assert got.returned_at == want.at, (got, want)
    if want.kind == "cancelled":
        assert got.cancelled and got.result is None and got.error is None
    elif want.kind in ("connected", "switched"):
        assert got.result is not None, got
        assert got.result.conn is world.conns[want.conn_index or 0]
        assert got.result.was_switched is (want.kind == "switched")
        assert got.result.agent_id == (OTHER if want.kind == "switched" else BOUND)
    elif want.kind == "no_agent":
        assert type(got.error) is NoWorkspaceAgent
    else:
        assert isinstance(got.error, DialError)
        assert str(got.error) == want.error_message
        assert got.error.__cause__ is got.error.original

    if want.kind != "cancelled":
        assert (world.dials, world.validations) == (want.dials, want.validations)
    # The observer saw what the fakes saw.
    assert (got.recorder.dials, got.recorder.validations) == (world.dials, world.validations)
    # Validation never runs when the bound dial is fast.
    if s.bound_at < DELAY and s.bound_ok:
        assert world.validations == 0
    # Every connection but the returned one was released exactly once (after the
    # nursery closed, so late successes too); a failed dial's release never ran.
    world.assert_no_leaks(got.result.conn if got.result else None)


@settings(max_examples=EXAMPLES, deadline=None)
@given(scenario=scenarios, _scheduler=st.random_module())
def test_dial_interleavings_follow_the_table(scenario: Scenario, _scheduler: object) -> None:
    check(scenario)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
@given(scenario=scenarios, _scheduler=st.random_module())
def _explore_deterministically(scenario: Scenario, _scheduler: object) -> None:
    check(scenario)


def test_property_tests_cover_dial_chart() -> None:
    universe = transitions_of(DialChart)
    if not universe <= COVERED:
        # Run alone or first: explore here, derandomized so coverage does not flake.
        _explore_deterministically()
    assert universe - COVERED == set()
    assert universe >= COVERED
    assert len(universe) == 25
