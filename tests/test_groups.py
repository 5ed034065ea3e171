"""`chatd_trio._groups`: every leaf of a group kept; a context manager's block raising
through its nurseries as itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from chatd_trio._groups import leaves, unwrapped


class Boom(Exception):
    """The block's own failure."""


class Crash(Exception):
    """A failure of the context manager's own task."""


def test_leaves_flattens_nested_groups_in_order() -> None:
    first, second, third = ValueError("1"), KeyError("2"), KeyboardInterrupt()
    group = BaseExceptionGroup("outer", [first, BaseExceptionGroup("inner", [second, third])])
    assert leaves(group) == [first, second, third]
    assert leaves(first) == [first]


async def test_the_blocks_exception_leaves_a_nursery_as_itself() -> None:
    with pytest.raises(Boom) as info:
        async with unwrapped(trio.open_nursery()) as nursery:
            nursery.start_soon(trio.sleep, 0)
            raise Boom("the block")
    assert str(info.value) == "the block"


async def test_without_it_the_same_block_leaves_in_a_group() -> None:
    """What `unwrapped` is for: a nursery wraps what its block raises."""
    with pytest.RaisesGroup(Boom):
        async with trio.open_nursery():
            raise Boom("the block")


async def test_a_failed_task_beside_the_failed_block_is_not_dropped() -> None:
    """Both failures leave: the block's as itself, the task's in its nursery's group."""
    task_failed = trio.Event()

    async def task() -> None:
        try:
            await trio.sleep_forever()
        finally:
            task_failed.set()
            raise Crash("the task")

    with pytest.RaisesGroup(Boom, pytest.RaisesGroup(Crash)):
        async with unwrapped(trio.open_nursery()) as nursery:
            nursery.start_soon(task)
            await trio.testing.wait_all_tasks_blocked()
            try:
                raise Boom("the block")
            finally:
                nursery.cancel_scope.cancel()
    assert task_failed.is_set()


async def test_a_failed_task_alone_leaves_in_its_group() -> None:
    async def task() -> None:
        raise Crash("the task")

    with pytest.RaisesGroup(Crash):
        async with unwrapped(trio.open_nursery()) as nursery:
            nursery.start_soon(task)


async def test_a_cancellation_beside_the_failed_block_does_not_hide_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The manager is cut off by a deadline while it closes after the block failed: the
    cancel scope takes its cancellation, the block's failure still leaves."""

    @asynccontextmanager
    async def slow_to_close() -> AsyncIterator[None]:
        try:
            yield
        finally:
            await trio.sleep_forever()

    with pytest.RaisesGroup(Boom):
        with trio.move_on_after(1.0) as deadline:
            async with unwrapped(slow_to_close()):
                raise Boom("the block")
    assert deadline.cancelled_caught
    assert trio.current_time() == 1.0


async def test_a_cancellation_of_the_block_goes_through_the_managers_scopes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only `Exception`s are carried: a cancellation reaches the scope that owns it."""
    with trio.move_on_after(1.0) as deadline:
        async with unwrapped(trio.open_nursery()) as nursery:
            nursery.start_soon(trio.sleep_forever)
            await trio.sleep_forever()
    assert deadline.cancelled_caught
