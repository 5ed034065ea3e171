"""`bounded_cleanup`: the one shield of the package, and always with a deadline."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from chatd_trio._cleanup import bounded_cleanup


async def test_the_cleanup_outlives_the_cancellation_of_its_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelled from outside mid-cleanup: the cleanup still runs to its end."""
    done: list[float] = []
    cancelled = trio.Event()

    async def task() -> None:
        with bounded_cleanup(10.0):
            await cancelled.wait()
            await trio.sleep(3.0)
            done.append(trio.current_time())

    with trio.CancelScope() as outer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(task)
            await trio.testing.wait_all_tasks_blocked()
            outer.cancel()
            cancelled.set()
    # The task saw its cancellation, then slept three more seconds in its cleanup.
    assert done == [3.0]


async def test_a_cleanup_past_its_deadline_ends_quietly_and_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The deadline cuts the shielded block; the outer cancellation then arrives at the
    next checkpoint."""
    ended = -1.0
    with trio.CancelScope() as outer:
        outer.cancel()
        with bounded_cleanup(5.0) as scope:
            await trio.sleep_forever()
        ended = trio.current_time()
        await trio.lowlevel.checkpoint()
        pytest.fail("the outer cancellation is delivered after the block")  # pragma: no cover
    assert outer.cancelled_caught and scope.cancelled_caught
    assert ended == 5.0


async def test_the_deadline_counts_from_entering_the_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scope = bounded_cleanup(2.0)
    await trio.sleep(10.0)
    with scope:
        await trio.sleep_forever()
    assert trio.current_time() == 12.0


@pytest.mark.parametrize("seconds", [math.inf, math.nan, -1.0])
def test_an_unbounded_or_negative_deadline_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="finite deadline"):
        bounded_cleanup(seconds)
