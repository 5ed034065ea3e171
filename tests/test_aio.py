"""The asyncio bridge: one coroutine per call on the bridge's loop thread; a cancelled
caller waits for its coroutine to unwind, and a result that was reached stands."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio
import trio.testing

from chatd_trio._aio import Bridge, asyncio_bridge


def _bridge_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "chatd-asyncio")


async def test_result_and_exception_cross_and_the_coroutine_runs_on_the_loop_thread() -> None:
    async def where() -> int:
        await asyncio.sleep(0)
        return threading.get_ident()

    async def boom() -> None:
        raise ValueError("from asyncio")

    async with asyncio_bridge() as bridge:
        assert await bridge.run(where) != threading.get_ident()
        with pytest.raises(ValueError, match="from asyncio"):
            await bridge.run(boom)
        assert bridge.crossings == 2


async def test_leaving_the_bridge_stops_its_thread() -> None:
    before = _bridge_threads()
    async with asyncio_bridge():
        assert _bridge_threads() == before + 1
    assert _bridge_threads() == before


async def _caller(
    bridge: Bridge, work: object, scopes: list[trio.CancelScope], out: list[object]
) -> None:
    with trio.CancelScope() as scope:
        scopes.append(scope)
        out.append(await bridge.run(work))  # type: ignore[arg-type]


async def test_a_cancelled_caller_goes_on_only_after_its_coroutine_unwound() -> None:
    """Invariant: when `run` raises Cancelled, the coroutine's cleanup (a rollback, the
    connection's return) has already run."""
    started = threading.Event()
    unwound = threading.Event()
    never = asyncio.Event()

    async def waits_forever() -> None:
        started.set()
        try:
            await never.wait()
        finally:
            unwound.set()

    async with asyncio_bridge() as bridge:
        scopes: list[trio.CancelScope] = []
        out: list[object] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_caller, bridge, waits_forever, scopes, out)
            await trio.testing.wait_all_tasks_blocked()
            assert started.wait(10)  # the coroutine runs on the loop's thread
            scopes[0].cancel()
        assert scopes[0].cancelled_caught
        assert unwound.is_set() and out == []


async def test_a_result_reached_before_the_cancellation_stands() -> None:
    """Invariant: a coroutine that finished (a commit, notifications read) is never
    reported as cancelled: its result is returned and the scope is left normally."""
    gate = asyncio.Event()
    finished = threading.Event()

    async def commits() -> int:
        await gate.wait()
        finished.set()
        return 42

    async with asyncio_bridge() as bridge:
        scopes: list[trio.CancelScope] = []
        out: list[object] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_caller, bridge, commits, scopes, out)
            await trio.testing.wait_all_tasks_blocked()
            bridge._loop.call_soon_threadsafe(gate.set)
            # Blocking the Trio thread: the coroutine completes before the caller can
            # be woken, then the cancellation arrives first.
            assert finished.wait(10)
            scopes[0].cancel()
        assert out == [42]
        assert not scopes[0].cancelled_caught
