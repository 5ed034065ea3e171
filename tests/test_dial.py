"""The lazy-validation dial: one test per row of the docs/spec.md §5.1 table, one per invariant.

Timings run on a MockClock (`autojump_clock`): the fakes model latency with
`trio.sleep`, and the tests read virtual time to check that the call returns
exactly when the table says.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trio

from chatd_trio.config import WorkspaceConfig
from chatd_trio.dial import DialCounter, DialResult, Release, dial_with_lazy_validation
from chatd_trio.errors import DialError, NoWorkspaceAgent
from statecharts.base import Step

DELAY = WorkspaceConfig().dial_validation_delay
BOUND = uuid.UUID(int=1)
OTHER = uuid.UUID(int=2)
WORKSPACE = uuid.UUID(int=100)


class DialFailure(Exception):
    """What a fake dial raises."""


class ValidationFailure(Exception):
    """What a fake validation raises."""


@dataclass(frozen=True)
class DialPlan:
    """How one dial behaves: its latency, its outcome, and whether it honours cancellation."""

    after: float
    ok: bool = True
    honours_cancel: bool = True


NO_AGENT = "no_agent"
ERROR = "error"


@dataclass(frozen=True)
class ValidatePlan:
    """How the validation behaves: latency and result (an agent id, NO_AGENT or ERROR)."""

    after: float
    result: uuid.UUID | str


@dataclass(eq=False)
class FakeConn:
    """A connection attempt; `releases` counts calls of its release function."""

    agent_id: uuid.UUID
    index: int
    ok: bool = False
    releases: int = 0
    cancelled_at: float | None = None

    async def release(self) -> None:
        self.releases += 1


@dataclass
class FakeWorld:
    """Dial and validate fakes that follow their plans in order and record everything."""

    dial_plans: list[DialPlan]
    validate_plan: ValidatePlan | None = None
    conns: list[FakeConn] = field(default_factory=list)
    validations: int = 0

    async def dial(self, agent_id: uuid.UUID) -> tuple[FakeConn, Release]:
        index = len(self.conns)
        plan = self.dial_plans[index]
        conn = FakeConn(agent_id, index)
        self.conns.append(conn)
        if plan.honours_cancel:
            try:
                await trio.sleep(plan.after)
            except trio.Cancelled:
                conn.cancelled_at = trio.current_time()
                raise
        else:
            with trio.CancelScope(shield=True):
                await trio.sleep(plan.after)
        if not plan.ok:
            raise DialFailure(f"dial {index} to {agent_id} refused")
        conn.ok = True
        return conn, conn.release

    async def validate(self, workspace_id: uuid.UUID) -> uuid.UUID:
        assert workspace_id == WORKSPACE
        assert self.validate_plan is not None, "validation must not run"
        self.validations += 1
        await trio.sleep(self.validate_plan.after)
        result = self.validate_plan.result
        if result == NO_AGENT:
            raise NoWorkspaceAgent()
        if result == ERROR:
            raise ValidationFailure("workspace lookup failed")
        assert isinstance(result, uuid.UUID)
        return result

    @property
    def dials(self) -> int:
        return len(self.conns)

    def assert_no_leaks(self, returned: FakeConn | None) -> None:
        """Every successful connection except the returned one was released exactly once."""
        for conn in self.conns:
            if conn is returned or not conn.ok:
                assert conn.releases == 0, conn
            else:
                assert conn.releases == 1, conn


@dataclass
class Recorder(DialCounter):
    """Counts like DialCounter and keeps the chart's path."""

    steps: list[Step] = field(default_factory=list)

    def on_step(self, step: Step) -> None:
        self.steps.append(step)


@dataclass
class Run:
    """The outcome of one call: result or error, and the virtual time it returned at."""

    result: DialResult[FakeConn] | None
    error: BaseException | None
    returned_at: float
    recorder: Recorder


async def run_dial(world: FakeWorld) -> Run:
    """Call the driver inside a nursery that outlives it, like a turn does."""
    recorder = Recorder()
    result: DialResult[FakeConn] | None = None
    error: BaseException | None = None
    returned_at = -1.0
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
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
    return Run(result, error, returned_at, recorder)


def label(step: Step) -> str:
    """An event and the guard that chose its transition: `validated[same_agent]`."""
    return f"{step.event}[{step.guard}]" if step.guard else step.event


def events(run: Run) -> list[str]:
    return [label(step) for step in run.recorder.steps]


# --- one test per row of the table ---------------------------------------------------


async def test_row_bound_dial_succeeds_before_delay(autojump_clock: trio.testing.MockClock) -> None:
    world = FakeWorld([DialPlan(after=1.0)])
    run = await run_dial(world)
    assert run.result is not None
    assert run.result.conn is world.conns[0]
    assert (run.result.agent_id, run.result.was_switched) == (BOUND, False)
    assert (world.validations, world.dials) == (0, 1)
    assert run.returned_at == 1.0
    assert events(run) == ["dial_ok"]
    world.assert_no_leaks(run.result.conn)


@pytest.mark.parametrize("retry_ok", [True, False], ids=["retry_connects", "retry_fails"])
async def test_row_bound_dial_fails_before_delay_validate_same_agent(
    autojump_clock: trio.testing.MockClock, retry_ok: bool
) -> None:
    world = FakeWorld(
        [DialPlan(after=1.0, ok=False), DialPlan(after=2.0, ok=retry_ok)],
        ValidatePlan(after=0.5, result=BOUND),
    )
    run = await run_dial(world)
    assert (world.validations, world.dials) == (1, 2)
    assert [c.agent_id for c in world.conns] == [BOUND, BOUND]
    assert run.returned_at == 3.5
    if retry_ok:
        assert run.result is not None
        assert run.result.conn is world.conns[1]
        assert (run.result.agent_id, run.result.was_switched) == (BOUND, False)
    else:
        assert isinstance(run.error, DialError)
        assert str(run.error) == f"dial with lazy validation: dial 1 to {BOUND} refused"
        assert isinstance(run.error.__cause__, DialFailure)
    assert events(run) == [
        "dial_failed",
        "validated[same_agent]",
        "dial_ok" if retry_ok else "dial_failed",
    ]
    world.assert_no_leaks(run.result.conn if run.result else None)


@pytest.mark.parametrize("other_ok", [True, False], ids=["switch_connects", "switch_fails"])
async def test_row_bound_dial_fails_before_delay_validate_other_agent(
    autojump_clock: trio.testing.MockClock, other_ok: bool
) -> None:
    world = FakeWorld(
        [DialPlan(after=1.0, ok=False), DialPlan(after=2.0, ok=other_ok)],
        ValidatePlan(after=0.5, result=OTHER),
    )
    run = await run_dial(world)
    assert (world.validations, world.dials) == (1, 2)
    assert [c.agent_id for c in world.conns] == [BOUND, OTHER]
    assert run.returned_at == 3.5
    if other_ok:
        assert run.result is not None
        assert run.result.conn is world.conns[1]
        assert (run.result.agent_id, run.result.was_switched) == (OTHER, True)
        assert run.recorder.switches == 1
    else:
        assert isinstance(run.error, DialError)
        assert str(run.error) == f"dial with lazy validation: dial 1 to {OTHER} refused"
        assert run.recorder.switches == 0
    world.assert_no_leaks(run.result.conn if run.result else None)


async def test_row_bound_dial_fails_before_delay_validate_no_agent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = FakeWorld([DialPlan(after=1.0, ok=False)], ValidatePlan(after=0.5, result=NO_AGENT))
    run = await run_dial(world)
    assert type(run.error) is NoWorkspaceAgent
    assert (world.validations, world.dials) == (1, 1)
    assert run.returned_at == 1.5
    assert events(run) == ["dial_failed", "validated_no_agent"]


async def test_row_bound_dial_fails_before_delay_validate_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = FakeWorld([DialPlan(after=1.0, ok=False)], ValidatePlan(after=0.5, result=ERROR))
    run = await run_dial(world)
    assert isinstance(run.error, DialError)
    assert str(run.error) == "dial with lazy validation: workspace lookup failed"
    assert isinstance(run.error.__cause__, ValidationFailure)
    assert (world.validations, world.dials) == (1, 1)
    assert run.returned_at == 1.5


@pytest.mark.parametrize("validated", [BOUND, ERROR], ids=["same_agent", "validate_errors"])
@pytest.mark.parametrize("dial_ok", [True, False], ids=["dial_connects", "dial_fails"])
async def test_row_delay_passes_dial_pending_validate_same_agent_or_errors(
    autojump_clock: trio.testing.MockClock, validated: uuid.UUID | str, dial_ok: bool
) -> None:
    world = FakeWorld([DialPlan(after=DELAY + 3, ok=dial_ok)], ValidatePlan(1.0, validated))
    run = await run_dial(world)
    assert (world.validations, world.dials) == (1, 1)
    assert run.returned_at == DELAY + 3
    if dial_ok:
        assert run.result is not None
        assert run.result.conn is world.conns[0]
        assert run.result.was_switched is False
    else:
        assert isinstance(run.error, DialError)
        assert isinstance(run.error.__cause__, DialFailure)
    world.assert_no_leaks(run.result.conn if run.result else None)


async def test_row_delay_passes_validate_no_agent(autojump_clock: trio.testing.MockClock) -> None:
    world = FakeWorld([DialPlan(after=DELAY + 60)], ValidatePlan(after=1.0, result=NO_AGENT))
    run = await run_dial(world)
    assert type(run.error) is NoWorkspaceAgent
    assert (world.validations, world.dials) == (1, 1)
    # Returned as soon as the validation answered; the bound dial was cancelled.
    assert run.returned_at == DELAY + 1.0
    assert world.conns[0].cancelled_at == DELAY + 1.0


@pytest.mark.parametrize("other_ok", [True, False], ids=["switch_connects", "switch_fails"])
async def test_row_delay_passes_validate_other_agent(
    autojump_clock: trio.testing.MockClock, other_ok: bool
) -> None:
    world = FakeWorld(
        [DialPlan(after=DELAY + 60), DialPlan(after=2.0, ok=other_ok)],
        ValidatePlan(after=1.0, result=OTHER),
    )
    run = await run_dial(world)
    assert (world.validations, world.dials) == (1, 2)
    assert run.returned_at == DELAY + 1.0 + 2.0
    assert world.conns[0].cancelled_at == DELAY + 1.0, "cancelled when validation answered"
    if other_ok:
        assert run.result is not None
        assert (run.result.conn, run.result.agent_id) == (world.conns[1], OTHER)
        assert run.result.was_switched is True
    else:
        assert isinstance(run.error, DialError)
    world.assert_no_leaks(run.result.conn if run.result else None)


_STALE = DialPlan(after=DELAY + 10, honours_cancel=False)
_FAIL_FAST = DialPlan(after=1.0, ok=False)
_SLOW_REDIAL = DialPlan(after=2.0, honours_cancel=False)


@pytest.mark.parametrize(
    ("cancel_at", "plans", "validated", "last_state"),
    [
        (0.5, [DialPlan(after=3.0, honours_cancel=False)], BOUND, "dialing"),
        (1.25, [_FAIL_FAST], BOUND, "validating_after_failure"),
        (2.0, [_FAIL_FAST, _SLOW_REDIAL], BOUND, "redialing_same"),
        (2.0, [_FAIL_FAST, _SLOW_REDIAL], OTHER, "dialing_other"),
        (DELAY + 0.25, [_STALE], BOUND, "validating_while_dialing"),
        (DELAY + 2.0, [_STALE], BOUND, "awaiting_bound"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_row_caller_cancelled_at_any_point(
    autojump_clock: trio.testing.MockClock,
    cancel_at: float,
    plans: list[DialPlan],
    validated: uuid.UUID,
    last_state: str,
) -> None:
    world = FakeWorld(plans, ValidatePlan(after=0.5, result=validated))
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(cancel_at) as scope:
            await dial_with_lazy_validation(
                BOUND,
                WORKSPACE,
                world.dial,
                world.validate,
                delay=DELAY,
                nursery=nursery,
                observer=recorder,
            )
        # Cancellation propagated at once: nothing waited for a dial that ignores it.
        assert scope.cancelled_caught
        assert trio.current_time() == cancel_at
    assert recorder.steps[-1] == Step(last_state, "cancel", "cancelled")
    # Dials that ignored the cancellation connected later and were released by the nursery.
    world.assert_no_leaks(None)
    assert all(conn.ok for conn in world.conns if plans[conn.index].ok)


async def test_a_cancelled_dials_chart_is_reused_while_its_late_task_dials_its_own_agent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The chart goes back to the pool when the cancelled dial returns; a dial task that
    was scheduled for it but starts only afterwards still dials the agent it was scheduled
    for, not the target of the next dial that took the chart meanwhile."""
    dialed: list[uuid.UUID] = []
    conns: list[FakeConn] = []

    async def dial(agent_id: uuid.UUID) -> tuple[FakeConn, Release]:
        dialed.append(agent_id)
        await trio.sleep(1.0)
        if agent_id == BOUND:
            raise DialFailure("refused")
        conn = FakeConn(agent_id, len(conns), ok=True)
        conns.append(conn)
        return conn, conn.release

    async def validate(workspace_id: uuid.UUID) -> uuid.UUID:
        await trio.sleep(0.5)
        return OTHER

    async def never_validate(workspace_id: uuid.UUID) -> uuid.UUID:
        raise AssertionError("the next dial connects at once")

    caller = trio.CancelScope()
    gate = trio.Event()
    held = False

    class CancelOnSwitch(Recorder):
        def on_step(self, step: Step) -> None:
            super().on_step(step)
            if step.target == "dialing_other":
                # The driver schedules the dial to OTHER next; hold that task back and
                # cancel the caller before it can start.
                nonlocal held
                held = True
                caller.cancel()

    class HoldingNursery:
        """A real nursery; tasks scheduled once `held` is set start only when `gate` is."""

        def __init__(self, nursery: trio.Nursery) -> None:
            self.nursery = nursery

        def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
            if not held:
                self.nursery.start_soon(fn, *args)
                return

            async def later() -> None:
                await gate.wait()
                await fn(*args)

            self.nursery.start_soon(later)

    third = uuid.UUID(int=3)
    recorder = CancelOnSwitch()
    async with trio.open_nursery() as nursery:
        with caller:
            await dial_with_lazy_validation(
                BOUND,
                WORKSPACE,
                dial,
                validate,
                delay=DELAY,
                nursery=HoldingNursery(nursery),  # type: ignore[arg-type]
                observer=recorder,
            )
        assert caller.cancelled_caught
        assert recorder.steps[-1] == Step("dialing_other", "cancel", "cancelled")
        # The next dial takes the released chart from the pool and runs to the end.
        result = await dial_with_lazy_validation(
            third, WORKSPACE, dial, never_validate, delay=DELAY, nursery=nursery
        )
        assert (result.agent_id, result.was_switched, result.conn.agent_id) == (third, False, third)
        gate.set()  # only now does the cancelled dial's scheduled task start
    assert dialed == [BOUND, third, OTHER]
    # That late dial was already cancelled (its driver had stopped): it never connected.
    assert [conn.agent_id for conn in conns] == [third]


# --- one test per invariant ------------------------------------------------------------


async def test_invariant_successful_connection_returned_or_released_exactly_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The stale bound dial ignores cancellation and connects after the switch.
    world = FakeWorld(
        [DialPlan(after=DELAY + 10, honours_cancel=False), DialPlan(after=1.0)],
        ValidatePlan(after=1.0, result=OTHER),
    )
    run = await run_dial(world)
    assert run.result is not None
    assert run.result.conn is world.conns[1]
    assert world.conns[0].ok
    assert world.conns[0].releases == 1
    assert world.conns[1].releases == 0


async def test_invariant_failed_dial_release_never_called(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = FakeWorld(
        [DialPlan(after=1.0, ok=False), DialPlan(after=1.0, ok=False)],
        ValidatePlan(after=1.0, result=BOUND),
    )
    run = await run_dial(world)
    assert isinstance(run.error, DialError)
    assert [c.releases for c in world.conns] == [0, 0]


async def test_invariant_stale_dial_ignoring_cancellation_never_delays_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = FakeWorld(
        [DialPlan(after=DELAY + 100, honours_cancel=False)],
        ValidatePlan(after=1.0, result=NO_AGENT),
    )
    async with trio.open_nursery() as nursery:
        with pytest.raises(NoWorkspaceAgent):
            await dial_with_lazy_validation(
                BOUND, WORKSPACE, world.dial, world.validate, delay=DELAY, nursery=nursery
            )
        assert trio.current_time() == DELAY + 1.0
        assert world.conns[0].releases == 0, "still dialing in the background"
    # The nursery waited for the stale dial, which connected late and was released there.
    assert trio.current_time() == DELAY + 100
    assert world.conns[0].ok
    assert world.conns[0].releases == 1


async def test_invariant_no_validation_when_bound_dial_is_fast(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = FakeWorld([DialPlan(after=DELAY - 0.5)], validate_plan=None)
    run = await run_dial(world)
    assert run.result is not None
    assert world.validations == 0
    assert run.recorder.validations == 0


async def test_invariant_switch_reports_the_new_agent_for_persisting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = FakeWorld(
        [DialPlan(after=1.0, ok=False), DialPlan(after=1.0)],
        ValidatePlan(after=1.0, result=OTHER),
    )
    run = await run_dial(world)
    assert run.result is not None
    # The caller persists (workspace, agent) when was_switched: it must get the new id.
    assert (run.result.agent_id, run.result.was_switched) == (OTHER, True)
    assert (run.recorder.dials, run.recorder.validations, run.recorder.switches) == (2, 1, 1)


# --- decisions where the table is silent, and error hygiene ---------------------------


async def test_bound_dial_connecting_during_validation_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = FakeWorld([DialPlan(after=DELAY + 1)], ValidatePlan(after=5.0, result=OTHER))
    run = await run_dial(world)
    assert run.result is not None
    assert (run.result.conn, run.result.was_switched) == (world.conns[0], False)
    assert run.returned_at == DELAY + 1
    assert (world.validations, world.dials) == (1, 1)


async def test_bound_dial_failing_during_validation_follows_the_validation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = FakeWorld(
        [DialPlan(after=DELAY + 1, ok=False), DialPlan(after=1.0)],
        ValidatePlan(after=3.0, result=OTHER),
    )
    run = await run_dial(world)
    assert run.result is not None
    assert (run.result.agent_id, run.result.was_switched) == (OTHER, True)
    assert run.returned_at == DELAY + 3.0 + 1.0
    assert events(run) == ["delay_elapsed", "dial_failed", "validated", "dial_ok"]


async def test_late_failure_of_stale_dial_does_not_crash_the_nursery(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = FakeWorld(
        [DialPlan(after=DELAY + 10, ok=False, honours_cancel=False), DialPlan(after=1.0)],
        ValidatePlan(after=1.0, result=OTHER),
    )
    run = await run_dial(world)  # the nursery inside waits for the stale dial's failure
    assert run.result is not None
    assert run.result.was_switched
    world.assert_no_leaks(run.result.conn)


async def test_failing_late_release_is_logged_not_raised(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_release() -> None:
        raise OSError("agent gone")

    async def dial(agent_id: uuid.UUID) -> tuple[str, Release]:
        with trio.CancelScope(shield=True):
            await trio.sleep(DELAY + 10)
        return "conn", broken_release

    async def validate(workspace_id: uuid.UUID) -> uuid.UUID:
        raise NoWorkspaceAgent()

    async with trio.open_nursery() as nursery:
        with pytest.raises(NoWorkspaceAgent):
            await dial_with_lazy_validation(
                BOUND, WORKSPACE, dial, validate, delay=DELAY, nursery=nursery
            )
    assert "releasing an unwanted agent connection failed" in caplog.text


async def test_errors_are_plain_exceptions_never_groups(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = FakeWorld([DialPlan(after=1.0, ok=False)], ValidatePlan(after=1.0, result=ERROR))
    run = await run_dial(world)
    assert not isinstance(run.error, BaseExceptionGroup)
    assert isinstance(run.error, DialError)
    assert run.error.original is run.error.__cause__


async def test_background_nursery_cancelled_fails_the_dial_instead_of_hanging(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = FakeWorld([DialPlan(after=3.0)], ValidatePlan(after=1.0, result=BOUND))

    async def host(task_status: trio.TaskStatus[trio.Nursery]) -> None:
        async with trio.open_nursery() as background:
            task_status.started(background)
            await trio.sleep_forever()

    async def cancel_later(background: trio.Nursery) -> None:
        await trio.sleep(1.0)
        background.cancel_scope.cancel()

    async with trio.open_nursery() as outer:
        background: trio.Nursery = await outer.start(host)
        outer.start_soon(cancel_later, background)
        with pytest.raises(DialError) as info:
            await dial_with_lazy_validation(
                BOUND, WORKSPACE, world.dial, world.validate, delay=DELAY, nursery=background
            )
        assert trio.current_time() == 1.0
        outer.cancel_scope.cancel()
    assert str(info.value) == "dial with lazy validation: validation was stopped by its nursery"
    assert world.conns[0].cancelled_at == 1.0
