"""Lazy-validation dial (docs/spec.md §5.1): the Trio driver of `statecharts.dial`.

`DialChart` decides, including whether a validated agent is the bound one;
this module runs what the chart's current state asks for
(`statecharts.dial.ACTIVITIES`), turns what those activities report into chart
events, and reads the outcome from the final state. The chart comes from
`DialChart.fresh` and goes back to its pool when the dial returns; the tasks
that may outlive the dial never touch it.

Every dial and validation runs as a task in the caller's `nursery`, each inside
its own cancel scope; the validation delay is the driver's own deadline while it
waits for their reports. Leaving a state cancels the
activities the next state does not list; a dial that ignores cancellation
finishes there in the background and, if it connects after all, releases its
connection itself. The caller therefore never waits for a stale dial and never
sees an exception group.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import trio

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio.config import WorkspaceConfig
from chatd_trio.errors import ChatdError, DialError, NoWorkspaceAgent
from statecharts.base import Step
from statecharts.dial import Activity, DialChart

__all__ = [
    "DialCounter",
    "DialObserver",
    "DialResult",
    "Release",
    "dial_with_lazy_validation",
]

logger = logging.getLogger(__name__)

ConnT = TypeVar("ConnT")
Release = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class DialResult(Generic[ConnT]):
    """A connection the caller now owns: it must call `release` exactly once."""

    conn: ConnT
    release: Release
    agent_id: uuid.UUID
    was_switched: bool


class DialObserver(Protocol):
    """Told about every dial, validation and switch (counters, metrics, logs)."""

    def on_dial(self, agent_id: uuid.UUID) -> None:
        """A dial of `agent_id` starts."""

    def on_validate(self, workspace_id: uuid.UUID) -> None:
        """A validation of the workspace's current agent starts."""

    def on_switch(self, old_agent_id: uuid.UUID, new_agent_id: uuid.UUID) -> None:
        """The dial returns a connection to another agent than the bound one."""

    def on_step(self, step: Step) -> None:
        """`DialChart` took a transition (tests collect these for coverage)."""


@dataclass
class DialCounter:
    """A `DialObserver` that counts; share one across calls for server-wide totals."""

    dials: int = 0
    validations: int = 0
    switches: int = 0

    def on_dial(self, agent_id: uuid.UUID) -> None:
        self.dials += 1

    def on_validate(self, workspace_id: uuid.UUID) -> None:
        self.validations += 1

    def on_switch(self, old_agent_id: uuid.UUID, new_agent_id: uuid.UUID) -> None:
        self.switches += 1

    def on_step(self, step: Step) -> None:
        pass


class _NullObserver:
    def on_dial(self, agent_id: uuid.UUID) -> None:
        pass

    def on_validate(self, workspace_id: uuid.UUID) -> None:
        pass

    def on_switch(self, old_agent_id: uuid.UUID, new_agent_id: uuid.UUID) -> None:
        pass

    def on_step(self, step: Step) -> None:
        pass


@dataclass(eq=False)
class _Attempt:
    """One started activity. `wanted` turns False once the driver no longer listens."""

    activity: Activity
    # The agent a dial activity dials, fixed when it starts: the chart may be reused by then.
    agent_id: uuid.UUID | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    wanted: bool = True
    reported: bool = False


@dataclass(frozen=True)
class _Report(Generic[ConnT]):
    attempt: _Attempt
    event: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    agent_id: uuid.UUID | None = None
    conn: tuple[ConnT, Release] | None = None


# The agent each dial activity dials, read from the chart when the activity starts.
_DIALS: dict[Activity, Callable[[DialChart], uuid.UUID]] = {
    Activity.BOUND_DIAL: lambda chart: chart.bound_agent,
    Activity.SECOND_DIAL: lambda chart: chart.target_agent,
}

# What an activity that can no longer run reports instead of its outcome.
_ABANDONED_EVENT: dict[Activity, str | None] = {
    Activity.BOUND_DIAL: "dial_failed",
    Activity.SECOND_DIAL: "dial_failed",
    Activity.VALIDATION: "validated_error",
    Activity.DELAY: None,
}


class _Driver(Generic[ConnT]):
    def __init__(
        self,
        agent_id: uuid.UUID,
        workspace_id: uuid.UUID,
        dial: Callable[[uuid.UUID], Awaitable[tuple[ConnT, Release]]],
        validate: Callable[[uuid.UUID], Awaitable[uuid.UUID]],
        delay: float,
        nursery: trio.Nursery,
        observer: DialObserver,
        release_timeout: float,
    ) -> None:
        self._workspace_id = workspace_id
        self._dial = dial
        self._validate = validate
        self._nursery = nursery
        self._observer = observer
        self._release_timeout = release_timeout
        self._deadline = trio.current_time() + delay
        self._chart = DialChart.fresh(agent_id)
        self._attempts: dict[Activity, _Attempt] = {}
        # Unbounded so a task's report never blocks; at most one report per attempt.
        self._send, self._receive = trio.open_memory_channel[_Report[ConnT]](math.inf)
        self._starters: dict[Activity, Callable[[_Attempt], Awaitable[None]] | None] = {
            Activity.BOUND_DIAL: self._dial_task,
            Activity.SECOND_DIAL: self._dial_task,
            Activity.VALIDATION: self._validate_task,
            # No task: the driver awaits the delay itself (`_next_report`).
            Activity.DELAY: None,
        }

    async def run(self) -> DialResult[ConnT]:
        try:
            won = await self._drive()
            return self._outcome(won)
        finally:
            self._chart.release()

    async def _drive(self) -> tuple[ConnT, Release] | None:
        chart = self._chart
        won: tuple[ConnT, Release] | None = None
        try:
            while not chart.is_terminated:
                self._reconcile()
                report = await self._next_report()
                if not report.attempt.wanted:
                    await self._discard(report)
                    continue
                report.attempt.wanted = False
                self._feed(report.event, **report.kwargs)
                if report.conn is not None:
                    won = report.conn
        except trio.Cancelled:
            self._feed("cancel")
            raise
        finally:
            await self._stop_all()
        return won

    async def _next_report(self) -> _Report[ConnT]:
        """The next report; `delay_elapsed` when the validation delay runs and passes first.

        The delay is the driver's own deadline, not a task: a dial that answers in time
        (almost every one) then costs no timer task started and cancelled. A report
        already queued when the deadline passes is taken first.
        """
        timer = self._attempts.get(Activity.DELAY)
        if timer is None or not timer.wanted or timer.reported:
            return await self._receive.receive()
        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            pass
        with trio.move_on_at(self._deadline):
            return await self._receive.receive()
        timer.reported = True
        return _Report(timer, "delay_elapsed")

    def _feed(self, event: str, **kwargs: Any) -> None:
        seen = len(self._chart.trace)
        self._chart.send(event, **kwargs)
        for step in self._chart.trace[seen:]:
            self._observer.on_step(step)

    def _outcome(self, won: tuple[ConnT, Release] | None) -> DialResult[ConnT]:
        chart = self._chart
        cause = chart.cause
        match chart.state_id:
            case "no_agent":
                assert cause is not None
                raise cause
            case "failed":
                assert cause is not None
                raise DialError(cause) from cause
            case "connected" | "switched":
                assert won is not None
                switched = chart.state_id == "switched"
                if switched:
                    self._observer.on_switch(chart.bound_agent, chart.target_agent)
                    logger.info(
                        "dial switched to the workspace's current agent",
                        extra={
                            "workspace_id": str(self._workspace_id),
                            "agent_id": str(chart.target_agent),
                            "stale_agent_id": str(chart.bound_agent),
                        },
                    )
                conn, release = won
                return DialResult(conn, release, chart.target_agent, switched)
            case other:  # pragma: no cover - every final state is handled above
                raise AssertionError(f"dial chart ended in {other!r}")

    def _reconcile(self) -> None:
        required = self._chart.activities
        for activity, attempt in self._attempts.items():
            if activity not in required and attempt.wanted:
                attempt.wanted = False
                attempt.scope.cancel()
        for activity in sorted(required - self._attempts.keys(), key=lambda a: a.value):
            target = _DIALS.get(activity)
            attempt = _Attempt(activity, target(self._chart) if target is not None else None)
            self._attempts[activity] = attempt
            starter = self._starters[activity]
            if starter is None:
                continue
            try:
                self._nursery.start_soon(starter, attempt)
            except RuntimeError:
                # The background nursery has closed: the activity can never report.
                self._report_abandoned(attempt)

    async def _stop_all(self) -> None:
        for attempt in self._attempts.values():
            attempt.wanted = False
            attempt.scope.cancel()
        # Reports already queued hold connections nobody will return: release them now.
        leftovers: list[_Report[ConnT]] = []
        while True:
            try:
                leftovers.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        for report in leftovers:
            if report.conn is not None:
                await self._release(report.conn[1], report.agent_id)

    def _report(self, report: _Report[ConnT]) -> None:
        report.attempt.reported = True
        self._send.send_nowait(report)

    async def _discard(self, report: _Report[ConnT]) -> None:
        if report.conn is None:
            return
        try:
            # In the background: the caller must not wait for a stale connection's release.
            self._nursery.start_soon(self._release, report.conn[1], report.agent_id)
        except RuntimeError:  # the background nursery has closed
            await self._release(report.conn[1], report.agent_id)

    async def _dial_task(self, attempt: _Attempt) -> None:
        agent_id = attempt.agent_id
        assert agent_id is not None, "a dial activity names its agent"
        self._observer.on_dial(agent_id)
        conn: tuple[ConnT, Release] | None = None
        try:
            with attempt.scope:
                conn = await self._dial(agent_id)
        except Exception as exc:
            if attempt.wanted:
                self._report(_Report(attempt, "dial_failed", {"cause": exc}, agent_id))
            else:
                logger.debug(
                    "stale dial failed late", extra={"agent_id": str(agent_id), "error": repr(exc)}
                )
            return
        except BaseException:
            self._report_abandoned(attempt)
            raise
        if conn is None:
            return
        if attempt.wanted:
            self._report(_Report(attempt, "dial_ok", {}, agent_id, conn))
        else:
            # The dial ignored cancellation and connected after all: nobody owns it.
            logger.debug(
                "releasing a stale dial's late connection", extra={"agent_id": str(agent_id)}
            )
            await self._release(conn[1], agent_id)

    def _report_abandoned(self, attempt: _Attempt) -> None:
        # Only a background nursery that was cancelled or has closed gets here:
        # tell the driver rather than leave it waiting forever.
        event = _ABANDONED_EVENT[attempt.activity]
        if event is not None and attempt.wanted and not attempt.reported:
            cause = ChatdError(f"{attempt.activity.value} was stopped by its nursery")
            self._report(_Report(attempt, event, {"cause": cause}))

    async def _validate_task(self, attempt: _Attempt) -> None:
        self._observer.on_validate(self._workspace_id)
        report: _Report[ConnT] | None = None
        try:
            with attempt.scope:
                report = await self._classified_validation(attempt)
        except BaseException:
            self._report_abandoned(attempt)
            raise
        if report is not None and attempt.wanted:
            self._report(report)

    async def _classified_validation(self, attempt: _Attempt) -> _Report[ConnT]:
        try:
            agent = await self._validate(self._workspace_id)
        except NoWorkspaceAgent as exc:
            return _Report(attempt, "validated_no_agent", {"cause": exc})
        except Exception as exc:
            return _Report(attempt, "validated_error", {"cause": exc})
        # Same agent or another one: the chart's `same_agent` guard decides.
        return _Report(attempt, "validated", {"agent": agent})

    async def _release(self, release: Release, agent_id: uuid.UUID | None) -> None:
        await release_logged(
            release, agent_id, self._release_timeout, logger, "an unwanted agent connection"
        )


async def release_logged(
    release: Release,
    agent_id: uuid.UUID | None,
    seconds: float,
    log: logging.Logger,
    what: str,
) -> None:
    """Await `release` shielded, for at most `seconds`; its failure or its timeout is
    logged to `log` as a warning about releasing `what`, never raised."""
    with bounded_cleanup(seconds) as scope:
        try:
            await release()
        except Exception as exc:
            log.warning(
                f"releasing {what} failed", extra={"agent_id": str(agent_id), "error": repr(exc)}
            )
    if scope.cancelled_caught:
        log.warning(
            f"releasing {what} timed out", extra={"agent_id": str(agent_id), "timeout": seconds}
        )


async def dial_with_lazy_validation(
    agent_id: uuid.UUID,
    workspace_id: uuid.UUID,
    dial: Callable[[uuid.UUID], Awaitable[tuple[ConnT, Release]]],
    validate: Callable[[uuid.UUID], Awaitable[uuid.UUID]],
    *,
    delay: float,
    nursery: trio.Nursery,
    observer: DialObserver | None = None,
    release_timeout: float | None = None,
) -> DialResult[ConnT]:
    """Dial the bound agent, validating the binding only when that is slow or fails.

    Follows the docs/spec.md §5.1 table. Raises `NoWorkspaceAgent` (unwrapped) when
    the workspace has no agent, else `DialError` wrapping the deciding error.
    Dials and validations run in `nursery`; a stale dial that
    ignores cancellation finishes there and its late connection is released
    there. `observer` sees every dial, validation and switch (`DialCounter`
    counts them; `on_step` reports the chart's path). `release_timeout`
    bounds each shielded release of an unwanted connection (default
    `WorkspaceConfig.dial_release_timeout`).
    """
    driver: _Driver[ConnT] = _Driver(
        agent_id,
        workspace_id,
        dial,
        validate,
        delay,
        nursery,
        observer if observer is not None else _NullObserver(),
        release_timeout if release_timeout is not None else WorkspaceConfig().dial_release_timeout,
    )
    return await driver.run()
