"""The pool's write slots (`chatd_trio._pgtrio.Slots`): bounded, no slot lost, no
waiter forgotten, a free slot never left to a waiter that has yet to run, and a waiter
passed over for `fair_after` served next.

Virtual time (MockClock with autojump): arrivals, holds and patience are seconds on the
mock clock, so a schedule of dozens of takers runs in milliseconds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd_trio._pgtrio import Slots

EXAMPLES = 300
FAIR_AFTER = 0.05


def _ms(n: int) -> float:
    return n / 1000


@dataclass(frozen=True)
class Taker:
    arrives: float
    holds: float
    # Gives up waiting after this long (None: waits as long as it takes).
    patience: float | None


schedules = st.lists(
    st.builds(
        Taker,
        arrives=st.integers(0, 40).map(_ms),
        holds=st.integers(0, 30).map(_ms),
        patience=st.none() | st.integers(0, 20).map(_ms),
    ),
    min_size=1,
    max_size=40,
)


def _run(total: int, schedule: list[Taker]) -> list[float | None]:
    """Each taker's wait for a slot (None: it gave up), checking the bound throughout and
    that every slot is back and nobody waits at the end."""

    async def main() -> list[float | None]:
        slots = Slots(total, fair_after=FAIR_AFTER)
        holders = 0
        waits: list[float | None] = [None] * len(schedule)

        async def take(i: int, taker: Taker) -> None:
            nonlocal holders
            await trio.sleep(taker.arrives)
            began = trio.current_time()
            got = slots.take_nowait()
            if not got:
                with trio.move_on_after(float("inf") if taker.patience is None else taker.patience):
                    await slots.take()
                    got = True
            if not got:
                return
            holders += 1
            assert holders <= total, "more holders than slots"
            waits[i] = trio.current_time() - began
            try:
                await trio.sleep(taker.holds)
            finally:
                holders -= 1
                slots.give()

        # A slot left free while a waiter stays parked would leave the nursery waiting
        # forever: the mock clock then jumps to this deadline.
        with trio.fail_after(3600):
            async with trio.open_nursery() as nursery:
                for i, taker in enumerate(schedule):
                    nursery.start_soon(take, i, taker)
        assert slots.free == total
        assert slots.waiting == 0
        return waits

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _on_mock_clock(body: Callable[[], Awaitable[None]]) -> None:
    """Run `body` in virtual time; a wait that never ends fails at the deadline."""

    async def main() -> None:
        with trio.fail_after(60):
            await body()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@settings(max_examples=EXAMPLES, deadline=None)
@given(total=st.integers(1, 4), schedule=schedules)
def test_slots_are_bounded_never_lost_and_every_patient_taker_gets_one(
    total: int, schedule: list[Taker]
) -> None:
    """Invariant: never more holders than slots; every slot comes back, cancelled waits
    included; a taker without a deadline always gets a slot; one that got none waited
    its whole patience; and no wait is longer than the holds of everyone ahead of it
    plus `fair_after` per round of the queue (nobody starves)."""
    waits = _run(total, schedule)
    longest_hold = max(t.holds for t in schedule)
    bound = FAIR_AFTER + (len(schedule) / total + 1) * (longest_hold + FAIR_AFTER)
    for taker, waited in zip(schedule, waits, strict=True):
        if taker.patience is None:
            assert waited is not None
        if waited is not None:
            assert waited <= bound + 1e-9
            if taker.patience is not None:
                assert waited <= taker.patience + 1e-9


def test_a_free_slot_goes_to_a_runner_before_a_woken_waiter_runs() -> None:
    async def body() -> None:
        slots = Slots(1, fair_after=FAIR_AFTER)
        assert slots.take_nowait()
        order: list[str] = []

        async def waiter() -> None:
            await slots.take()
            order.append("waiter")
            slots.give()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert slots.waiting == 1
            slots.give()
            # Woken, not yet run: the slot is free for whoever asks now.
            assert slots.take_nowait()
            order.append("runner")
            await trio.testing.wait_all_tasks_blocked()
            # The waiter found it taken and waits again, first in line.
            assert slots.waiting == 1
            assert order == ["runner"]
            slots.give()
        assert order == ["runner", "waiter"]
        assert slots.free == 1

    _on_mock_clock(body)


def test_a_waiter_passed_over_for_fair_after_is_handed_the_next_slot() -> None:
    async def body() -> None:
        slots = Slots(1, fair_after=FAIR_AFTER)
        assert slots.take_nowait()
        got: list[str] = []

        async def waiter() -> None:
            await slots.take()
            got.append("waiter")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(FAIR_AFTER)
            slots.give()
            # Handed over: nobody else can take it before the waiter runs.
            assert not slots.take_nowait()
        assert got == ["waiter"]
        assert slots.free == 0
        slots.give()
        assert slots.free == 1

    _on_mock_clock(body)


def test_a_waiter_cancelled_after_being_woken_wakes_the_next_one() -> None:
    async def body() -> None:
        slots = Slots(1, fair_after=FAIR_AFTER)
        assert slots.take_nowait()
        got: list[int] = []
        scopes = [trio.CancelScope(), trio.CancelScope()]

        async def waiter(i: int) -> None:
            with scopes[i]:
                await slots.take()
                got.append(i)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, 0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, 1)
            await trio.testing.wait_all_tasks_blocked()
            # Waiter 0 is cancelled, and before it runs the slot comes back: the wake
            # goes to waiter 0 (first in line, not yet handed a slot), which must pass
            # it on as it leaves.
            scopes[0].cancel()
            slots.give()
        assert got == [1]
        assert slots.free == 0
        assert slots.waiting == 0

    _on_mock_clock(body)
