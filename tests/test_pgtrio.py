"""psycopg on Trio (`chatd_trio._pgtrio`): the connection's waits, cancellation, the pool.

Real PostgreSQL, real sockets. Waiting for a server-side state polls
pg_stat_activity under a deadline (tests/test_postgres_store.py's `wait_until`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import pytest
import trio
import trio.testing

from chatd_trio._pgtrio import (
    AnswerWait,
    PoolSettings,
    PoolTimeout,
    TrioConnection,
    TrioPool,
    connect,
)
from tests.test_postgres_store import _store_backends, wait_until

pytestmark = pytest.mark.postgres


def _settings(**overrides: float) -> PoolSettings:
    base = {"min_size": 1, "max_size": 3, "max_idle": 300.0, "max_lifetime": 1800.0, "timeout": 5.0}
    base.update(overrides)
    writing = overrides.get("max_writing")
    return PoolSettings(
        min_size=int(base["min_size"]),
        max_size=int(base["max_size"]),
        max_idle=base["max_idle"],
        max_lifetime=base["max_lifetime"],
        timeout=base["timeout"],
        max_writing=None if writing is None else int(writing),
    )


@asynccontextmanager
async def _pool(
    dsn: str, app: str, answers: AnswerWait | None = None, **overrides: float
) -> AsyncIterator[TrioPool[TrioConnection]]:
    waits = answers or AnswerWait(0.0)

    async def open_connection() -> TrioConnection:
        return await connect(dsn, cls=TrioConnection, answers=waits, application_name=app)

    pool: TrioPool[TrioConnection] = TrioPool(open_connection, waits, _settings(**overrides))
    await pool.open()
    try:
        yield pool
    finally:
        pool.close()


# -- the connection ---------------------------------------------------------------------


async def test_statements_pipelines_and_transactions_run_on_trio(pg_dsn: str) -> None:
    conn = await connect(pg_dsn, cls=TrioConnection)
    try:
        assert (await (await conn.execute("SELECT 1 + %s", (1,))).fetchall()) == [(2,)]
        async with conn.pipeline():
            cursors = [await conn.execute("SELECT %s::int", (i,)) for i in range(5)]
        assert [(await c.fetchall())[0][0] for c in cursors] == [0, 1, 2, 3, 4]
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE t (x int)")
            await conn.execute("INSERT INTO t VALUES (1), (2)")
        assert (await (await conn.execute("SELECT sum(x) FROM t")).fetchall()) == [(3,)]
    finally:
        await conn.close()


async def test_a_payload_larger_than_the_socket_buffers_goes_out_and_comes_back(
    pg_dsn: str,
) -> None:
    """A send that fills the socket makes psycopg wait for readable-or-writable."""
    conn = await connect(pg_dsn, cls=TrioConnection)
    big = "x" * (24 * 1024 * 1024)
    try:
        async with conn.pipeline():
            first = await conn.execute("SELECT length(%s)", (big,))
            second = await conn.execute("SELECT %s::text", (big,))
        assert await first.fetchall() == [(len(big),)]
        assert (await second.fetchall())[0][0] == big
    finally:
        await conn.close()


async def test_a_connect_to_a_closed_port_is_an_operational_error() -> None:
    with pytest.raises(psycopg.OperationalError):
        await connect("postgresql://postgres@127.0.0.1:1/postgres", cls=TrioConnection)


async def test_cancelling_a_running_statement_closes_the_connection_and_stops_the_server(
    pg_dsn: str,
) -> None:
    """The server must not go on running (or commit) what a cancelled task sent."""
    app = f"pgtrio-cancel-{uuid.uuid4().hex[:8]}"
    conn = await connect(pg_dsn, cls=TrioConnection, application_name=app)
    with trio.CancelScope() as scope:

        async def cancel_when_running() -> None:
            await wait_until(lambda: _store_backends(pg_dsn, "active", app) == 1)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_running)
            await conn.execute("SELECT pg_sleep(60)")
    assert scope.cancelled_caught
    assert conn.closed
    await wait_until(lambda: _store_backends(pg_dsn, app=app) == 0)


async def test_cancelling_a_wait_with_nothing_in_flight_keeps_the_connection(pg_dsn: str) -> None:
    """A LISTEN connection waiting for notifications is idle: cancelling it is harmless."""
    conn = await connect(pg_dsn, cls=TrioConnection)
    try:
        await conn.execute("LISTEN pgtrio_test")
        with trio.move_on_after(0.05):
            async for _ in conn.notifies():
                pass  # pragma: no cover
        assert not conn.closed
        await conn.execute("NOTIFY pgtrio_test, 'hi'")
        got = [n.payload async for n in conn.notifies(stop_after=1)]
        assert got == ["hi"]
    finally:
        await conn.close()


async def test_two_tasks_on_one_connection_take_turns(pg_dsn: str) -> None:
    """The connection lock parks the second task instead of interleaving the protocol."""
    conn = await connect(pg_dsn, cls=TrioConnection)
    results: list[int] = []

    async def query(i: int) -> None:
        cur = await conn.execute("SELECT %s::int FROM pg_sleep(0.01)", (i,))
        results.append((await cur.fetchall())[0][0])

    try:
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(query, i)
        assert sorted(results) == [0, 1, 2, 3, 4]
    finally:
        await conn.close()


# -- waiting for answers ----------------------------------------------------------------


async def test_a_quick_answer_is_read_within_the_budget_a_slow_one_parks(pg_dsn: str) -> None:
    answers = AnswerWait(0.5)
    conn = await connect(pg_dsn, cls=TrioConnection, answers=answers)
    try:
        await conn.execute("SELECT 1")
        assert (answers.answered, answers.parked) == (1, 0)
        answers.budget = 0.001
        await conn.execute("SELECT pg_sleep(0.2)")
        assert answers.parked == 1
    finally:
        await conn.close()


def test_answer_wait_pauses_after_a_window_of_misses_doubling_each_time() -> None:
    answers = AnswerWait(0.005, window=4)
    clock = 0.0

    def miss() -> None:
        nonlocal clock
        clock += 1.0
        answers.tried(False, 0.005, clock)

    for _ in range(4):
        assert answers.now() == 0.005
        miss()
    # Paused for one window...
    assert [answers.now() for _ in range(4)] == [0.0] * 4
    for _ in range(4):
        answers.now()
        miss()
    # ...then for two after a second failing window.
    assert [answers.now() for _ in range(8)] == [0.0] * 8
    assert answers.now() == 0.005
    assert answers.skipped == 12


def test_answer_wait_keeps_trying_while_most_answers_come_in_time_and_quickly() -> None:
    answers = AnswerWait(0.005, window=4)
    clock = 0.0
    for hit in [True, True, False, False] * 10:
        assert answers.now() == 0.005
        clock += 1.0
        answers.tried(hit, 0.001, clock)
    assert (answers.answered, answers.parked, answers.skipped) == (20, 20, 0)


def test_answer_wait_pauses_when_answers_in_time_block_the_loop_too_long() -> None:
    """A far server answering within the budget would still stall the loop on every
    round trip: more than `max_share` of the time blocked pauses the tries."""
    answers = AnswerWait(0.005, window=4, max_share=0.25)
    clock = 0.0
    for _ in range(4):
        assert answers.now() == 0.005
        clock += 0.01  # one wait every 10 ms, each blocking 4 ms: 40 % of the time
        answers.tried(True, 0.004, clock)
    assert answers.now() == 0.0


def _pause_for_a_busy_loop(answers: AnswerWait, windows: int = 1) -> None:
    """Judge `windows` windows of quick answers (a fifth of the budget) that blocked
    the loop all the time."""
    clock = 0.0
    for _ in range(windows * answers.window):
        clock += answers.budget / 5
        answers.tried(True, answers.budget / 5, clock)


def test_a_pause_for_a_busy_loop_parks_only_while_fewer_than_max_parked_answers_wait() -> None:
    answers = AnswerWait(0.005, window=4, max_parked=2)
    _pause_for_a_busy_loop(answers)
    answers.parked_now = 2
    assert answers.now() == 0.005
    answers.parked_now = 1
    assert answers.now() == 0.0
    assert answers.skipped == 1


def test_a_window_that_passes_during_a_bounded_pause_ends_it() -> None:
    answers = AnswerWait(0.005, window=4, max_parked=1)
    _pause_for_a_busy_loop(answers)
    answers.parked_now = 1
    clock = 100.0
    for _ in range(4):  # past max_parked: quick answers, a tenth of the loop's time
        assert answers.now() == 0.005
        clock += 0.01
        answers.tried(True, 0.001, clock)
    answers.parked_now = 0
    assert answers.now() == 0.005
    assert answers.skipped == 0


def test_a_pause_for_late_or_distant_answers_parks_every_wait() -> None:
    late = AnswerWait(0.005, window=4, max_parked=2)
    for clock in range(4):
        late.tried(False, 0.005, float(clock))
    distant = AnswerWait(0.005, window=4, max_parked=2)
    clock = 0.0
    for _ in range(4):  # in time, but half the budget each: a far server
        clock += 0.0025
        distant.tried(True, 0.0025, clock)
    for answers in (late, distant):
        answers.parked_now = 5
        assert answers.now() == 0.0


async def test_past_max_parked_a_paused_wait_reads_its_answer_on_the_socket(
    pg_dsn: str,
) -> None:
    """The pool's connections in use stay bounded while a busy loop's waits are paused:
    one answer awaited parked, the next wait uses its budget instead of parking beside it."""
    answers = AnswerWait(0.5, window=1, max_parked=1)
    _pause_for_a_busy_loop(answers, windows=3)  # paused for four waits
    slow = await connect(pg_dsn, cls=TrioConnection, answers=answers)
    quick = await connect(pg_dsn, cls=TrioConnection, answers=answers)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow.execute, "SELECT pg_sleep(0.2)")
            await trio.testing.wait_all_tasks_blocked()
            assert (answers.parked_now, answers.skipped, answers.answered) == (1, 1, 3)
            await quick.execute("SELECT 1")
            assert (answers.answered, answers.skipped) == (4, 1)
        assert answers.parked_now == 0
    finally:
        await slow.close()
        await quick.close()


def test_a_zero_budget_never_waits_on_the_socket() -> None:
    answers = AnswerWait(0.0)
    assert answers.now() == 0.0
    assert answers.skipped == 0


# -- the pool ---------------------------------------------------------------------------


async def test_the_pool_lends_at_most_max_size_and_the_next_borrower_waits(
    pg_dsn: str,
) -> None:
    app = f"pgtrio-pool-{uuid.uuid4().hex[:8]}"
    async with _pool(pg_dsn, app, max_size=2) as pool:
        first = await pool.getconn()
        second = await pool.getconn()
        assert first is not second
        got: list[TrioConnection] = []

        async def third() -> None:
            got.append(await pool.getconn())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            assert pool.get_stats()["requests_waiting"] == 1
            pool.putconn(first)
        assert got == [first]
        pool.putconn(second)
        pool.putconn(got[0])
        assert pool.get_stats()["pool_size"] == 2


async def test_writers_take_at_most_max_writing_connections_readers_the_rest(
    pg_dsn: str,
) -> None:
    app = f"pgtrio-writing-{uuid.uuid4().hex[:8]}"
    async with _pool(pg_dsn, app, max_size=3, max_writing=1, timeout=0.5) as pool:
        writer = await pool.getconn(writing=True)
        # A second writer waits for the write slot, not for a connection: two are free.
        with pytest.raises(PoolTimeout, match="at most 1 for writes"):
            await pool.getconn(writing=True)
        stats = pool.get_stats()
        assert (stats["write_waits"], stats["requests_errors"], stats["max_writing"]) == (1, 1, 1)
        readers = [await pool.getconn(), await pool.getconn()]
        # A connection returned by a reader is not a write slot.
        pool.putconn(readers.pop())
        with pytest.raises(PoolTimeout):
            await pool.getconn(writing=True)
        got: list[TrioConnection] = []

        async def second_writer() -> None:
            got.append(await pool.getconn(writing=True))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second_writer)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            assert pool.get_stats()["writers_waiting"] == 1
            pool.putconn(writer)
        assert got == [writer]
        assert pool.lending.now == 2
        pool.putconn(got[0])
        pool.putconn(readers[0])
        assert pool.get_stats()["writers_waiting"] == 0


async def test_a_borrower_gives_up_after_the_pool_timeout(pg_dsn: str) -> None:
    app = f"pgtrio-timeout-{uuid.uuid4().hex[:8]}"
    async with _pool(pg_dsn, app, max_size=1, timeout=0.05) as pool:
        held = await pool.getconn()
        with pytest.raises(PoolTimeout):
            await pool.getconn()
        assert pool.get_stats()["requests_errors"] == 1
        pool.putconn(held)
        pool.putconn(await pool.getconn())


async def test_the_most_recently_returned_connection_is_lent_first(pg_dsn: str) -> None:
    app = f"pgtrio-lifo-{uuid.uuid4().hex[:8]}"
    async with _pool(pg_dsn, app) as pool:
        a = await pool.getconn()
        b = await pool.getconn()
        pool.putconn(a)
        pool.putconn(b)
        assert await pool.getconn() is b


async def test_a_connection_returned_mid_transaction_is_closed_not_lent(pg_dsn: str) -> None:
    app = f"pgtrio-dirty-{uuid.uuid4().hex[:8]}"
    async with _pool(pg_dsn, app) as pool:
        conn = await pool.getconn()
        await conn.execute("BEGIN")
        pool.putconn(conn)
        assert conn.closed
        again = await pool.getconn()
        assert again is not conn
        assert (await (await again.execute("SELECT 1")).fetchall()) == [(1,)]
        pool.putconn(again)


async def test_drain_retires_idle_connections_now_and_borrowed_ones_on_return(
    pg_dsn: str,
) -> None:
    app = f"pgtrio-drain-{uuid.uuid4().hex[:8]}"
    async with _pool(pg_dsn, app) as pool:
        borrowed = await pool.getconn()
        idle = await pool.getconn()
        pool.putconn(idle)
        pool.drain()
        assert idle.closed and not borrowed.closed
        pool.putconn(borrowed)
        assert borrowed.closed
        assert pool.get_stats()["pool_size"] == 0
        fresh = await pool.getconn()
        assert fresh not in (idle, borrowed) and not fresh.closed
        pool.putconn(fresh)
    await wait_until(lambda: _store_backends(pg_dsn, app=app) == 0)


async def test_connections_are_retired_after_their_lifetime_and_idle_ones_after_max_idle(
    pg_dsn: str, autojump_clock: trio.testing.MockClock
) -> None:
    app = f"pgtrio-age-{uuid.uuid4().hex[:8]}"
    async with _pool(pg_dsn, app, min_size=1, max_idle=10.0, max_lifetime=100.0) as pool:
        first = await pool.getconn()
        second = await pool.getconn()
        pool.putconn(first)
        autojump_clock.jump(11.0)
        # Returning `second` finds `first` idle for 11 s, above min_size: closed.
        pool.putconn(second)
        assert first.closed and not second.closed
        autojump_clock.jump(100.0)
        again = await pool.getconn()
        assert second.closed and again is not second
        pool.putconn(again)


# -- batching pipelines -----------------------------------------------------------------


async def test_a_batching_pipeline_queues_statements_until_the_batch_ends(pg_dsn: str) -> None:
    conn = await connect(pg_dsn, cls=TrioConnection)
    try:
        async with conn.pipeline() as pipeline:
            cursors = [await conn.execute("SELECT %s::int", (i,)) for i in range(3)]
            # Nothing written yet: the statements wait for the batch's end.
            assert len(pipeline.command_queue) == 3
            await pipeline.sync()
            assert len(pipeline.command_queue) == 0
            assert [(await c.fetchall())[0][0] for c in cursors] == [0, 1, 2]
            late = await conn.execute("SELECT 'late'")
            # A result read before the batch's end sends what is queued first.
            assert await late.fetchall() == [("late",)]
    finally:
        await conn.close()


class _PlainPipelines(TrioConnection):
    """psycopg's own pipeline, for comparison."""

    pipeline = psycopg.AsyncConnection.pipeline


async def _failing_batch(conn: TrioConnection) -> list[str]:
    seen: list[str] = []
    try:
        async with conn.pipeline() as pipeline:
            first = await conn.execute("SELECT 1")
            await conn.execute("SELECT 1 / 0")
            after = await conn.execute("SELECT 2")
            await pipeline.sync()
    except psycopg.Error as exc:
        seen.append(type(exc).__name__)
    for cursor in (first, after):
        try:
            seen.append(repr(await cursor.fetchall()))
        except psycopg.Error as exc:
            seen.append(type(exc).__name__)
    seen.append(repr(await (await conn.execute("SELECT 3")).fetchall()))
    return seen


async def test_a_failing_statement_in_a_batch_fails_as_in_psycopgs_pipeline(pg_dsn: str) -> None:
    """The same errors, the same results and a usable connection afterwards."""
    outcomes = []
    for cls in (TrioConnection, _PlainPipelines):
        conn = await connect(pg_dsn, cls=cls)
        try:
            outcomes.append(await _failing_batch(conn))
        finally:
            await conn.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == "DivisionByZero"
    assert outcomes[0][-1] == "[(3,)]"
