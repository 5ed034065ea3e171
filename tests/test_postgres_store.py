"""PostgreSQL-specific behaviour of PostgresStore: migrations, pool, failures, cancellation.

The shared semantics are covered by tests/contract/. These tests use the real clock
(real sockets). Where a test must wait for the server to reach a state (a statement
blocked on a row lock, a terminated backend gone), it polls pg_stat_activity under a
deadline: it waits for an observable state, not for time to pass.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import psycopg
import pytest
import trio
import trio.testing

from chatd_trio.apps._pgcluster import Cluster, ClusterError
from chatd_trio.config import PostgresConfig
from chatd_trio.domain import ChatStatus, Message, NewMessage, Role, TextPart, parse_uuid, text_of
from chatd_trio.errors import (
    ChatNotFound,
    ConfigError,
    DecodeError,
    StoreError,
    StoreUnavailable,
)
from chatd_trio.store.base import FinishResult, Lease, Store, TurnOutcome
from chatd_trio.store.postgres import PostgresStore, load_migrations
from tests.pgcluster import create_database, drop_database, truncate_all

pytestmark = pytest.mark.postgres

APP = PostgresConfig().application_name
MAX_QUEUED = 20
# Upper bound for waiting on a server-side state; generous for a loaded CI machine.
STATE_DEADLINE = 20.0


def _text(s: str) -> tuple[TextPart, ...]:
    return (TextPart(s),)


def _query(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a fresh admin connection (call through a thread)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


async def admin(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    return await trio.to_thread.run_sync(_query, dsn, query, params)


async def wait_until(check: Callable[[], bool]) -> None:
    """Poll a server-side condition (run in a thread) until it holds."""
    with trio.fail_after(STATE_DEADLINE):
        # The state lives in the server: there is no local event to wait on.
        while not await trio.to_thread.run_sync(check):  # noqa: ASYNC110
            await trio.sleep(0.02)


def _store_backends(dsn: str, state: str | None = None, app: str = APP) -> int:
    """Sessions of this database tagged `app` (the store's by default), in `state`."""
    rows = _query(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s AND (%s::text IS NULL OR state = %s)",
        (app, state, state),
    )
    return int(rows[0][0])


def _blocked_on_lock(dsn: str, n: int) -> bool:
    rows = _query(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s AND wait_event_type = 'Lock'",
        (APP,),
    )
    return int(rows[0][0]) >= n


class RowLock:
    """Holds `SELECT ... FOR UPDATE` on one chat row from an outside connection."""

    def __init__(self, dsn: str, chat_id: uuid.UUID) -> None:
        self.dsn = dsn
        self.chat_id = chat_id
        self.conn: psycopg.Connection[Any] | None = None

    def _take(self) -> None:
        self.conn = psycopg.connect(self.dsn)
        self.conn.execute("SELECT id FROM chats WHERE id = %s FOR UPDATE", (self.chat_id,))

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.rollback()
            self.conn.close()
            self.conn = None

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        await trio.to_thread.run_sync(self._take)
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._drop)


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore.open(pg_dsn) as s:
        await trio.to_thread.run_sync(truncate_all, pg_dsn)
        yield s


@pytest.fixture
def fresh_dsn(pg_dsn: str) -> Iterator[str]:
    """An empty database (no schema at all), dropped afterwards."""
    name = f"chatd_fresh_{uuid.uuid4().hex[:12]}"
    dsn = create_database(pg_dsn, name)
    try:
        yield dsn
    finally:
        drop_database(pg_dsn, name)


# -- migrations -------------------------------------------------------------------------


async def test_migrations_are_idempotent(fresh_dsn: str) -> None:
    versions = [v for v, _ in load_migrations()]
    assert versions and versions[0] == "0001_init.sql"
    for _ in range(2):
        async with PostgresStore.open(fresh_dsn) as s:
            chat, _msg = await s.create_chat(uuid.uuid4(), "t", _text("hi"))
            assert (await s.get_chat(chat.id)).id == chat.id
    rows = await admin(fresh_dsn, "SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == versions
    # The second open kept the data: it did not re-run the schema.
    assert (await admin(fresh_dsn, "SELECT count(*) FROM chats"))[0][0] == 2


async def test_concurrent_open_on_fresh_database(fresh_dsn: str) -> None:
    opened: list[PostgresStore] = []
    all_open = trio.Event()

    async def replica() -> None:
        async with PostgresStore.open(fresh_dsn) as s:
            opened.append(s)
            if len(opened) == 4:
                all_open.set()
            await all_open.wait()
            await s.create_chat(uuid.uuid4(), "t", _text("hi"))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(replica)

    assert len(opened) == 4
    rows = await admin(fresh_dsn, "SELECT version FROM schema_migrations")
    assert sorted(r[0] for r in rows) == [v for v, _ in load_migrations()]
    assert (await admin(fresh_dsn, "SELECT count(*) FROM chats"))[0][0] == 4


async def test_truncate_all_empties_tables_and_restarts_ids(
    store: PostgresStore, pg_dsn: str
) -> None:
    chat, first = await store.create_chat(uuid.uuid4(), "t", _text("hi"))
    await trio.to_thread.run_sync(truncate_all, pg_dsn)
    with pytest.raises(ChatNotFound):
        await store.get_chat(chat.id)
    _, again = await store.create_chat(uuid.uuid4(), "t", _text("hi"))
    assert again.id == first.id == 1
    rows = await admin(pg_dsn, "SELECT count(*) FROM schema_migrations")
    assert rows[0][0] == len(load_migrations())


# -- pool ---------------------------------------------------------------------------------


async def test_pool_options_are_passed(pg_dsn: str) -> None:
    async with PostgresStore.open(
        pg_dsn, min_size=2, max_size=3, max_idle=12.5, max_lifetime=99.0
    ) as s:
        stats = s.pool_stats()
        assert stats["min_size"] == 2
        assert stats["max_size"] == 3
        assert stats["max_idle"] == 12.5
        assert stats["max_lifetime"] == 99.0
        assert stats["timeout"] == PostgresConfig().pool_timeout
        # open() waits for min_size connections.
        assert stats["size"] == 2
        assert stats["max_in_use"] == 0
        assert await trio.to_thread.run_sync(_store_backends, pg_dsn) >= 2


async def test_max_in_use_tracks_the_high_water_mark(pg_dsn: str) -> None:
    # Writes may hold the whole pool here, so all three sends borrow at once.
    every_write = PostgresConfig(max_writing=3)
    async with PostgresStore.open(pg_dsn, min_size=1, max_size=3, config=every_write) as s:
        chat, _ = await s.create_chat(uuid.uuid4(), "t", _text("hi"))
        assert s.pool_stats()["max_in_use"] == 1
        # The lock is released inside the nursery, so the blocked sends can finish.
        async with trio.open_nursery() as nursery, RowLock(pg_dsn, chat.id).held():
            for i in range(3):
                nursery.start_soon(
                    partial(s.send_message, max_queued=MAX_QUEUED), chat.id, _text(f"m{i}")
                )
            # All three hold a connection while blocked on the row lock.
            await wait_until(lambda: _blocked_on_lock(pg_dsn, 3))
            assert s.pool_stats()["in_use"] == 3
            assert s.pool_stats()["max_in_use"] == 3
        stats = s.pool_stats()
        assert stats["in_use"] == 0
        assert stats["max_in_use"] == 3
        assert 0 < stats["mean_in_use"] < 3
        # The time-weighted distribution: all three were in use a while, never more.
        assert 0 < stats["share_at_half_or_more"] < 1
        assert 0 <= stats["p99_in_use"] <= 3
        assert len(await s.list_queued(chat.id)) == 3
        # A benchmark's steady phase starts from what is in use now.
        s.reset_pool_high_water()
        assert s.pool_stats()["max_in_use"] == 0
        assert s.pool_stats()["mean_in_use"] == 0.0
        assert s.pool_stats()["share_at_half_or_more"] == 0.0
        assert s.pool_stats()["p99_in_use"] == 0
        await s.get_chat(chat.id)
        assert s.pool_stats()["max_in_use"] == 1


async def test_stalled_writes_hold_at_most_the_write_slots_and_reads_still_get_a_connection(
    pg_dsn: str,
) -> None:
    """Writes that cannot commit (here: blocked on row locks, as in a WAL-flush stall)
    hold at most `max_writing` connections; the writers past it wait in the replica,
    a read borrows one of the rest, and every write lands once the stall ends."""
    config = PostgresConfig(max_writing=2)
    async with PostgresStore.open(pg_dsn, min_size=1, max_size=4, config=config) as s:
        assert s.pool_stats()["max_writing"] == 2
        chats = [(await s.create_chat(uuid.uuid4(), "t", _text("hi")))[0] for _ in range(4)]
        locks = [RowLock(pg_dsn, chat.id) for chat in chats]
        async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
            for lock in locks:
                await stack.enter_async_context(lock.held())
            for chat in chats:
                nursery.start_soon(
                    partial(s.send_message, max_queued=MAX_QUEUED), chat.id, _text("m")
                )
            await wait_until(lambda: _blocked_on_lock(pg_dsn, 2))
            await trio.testing.wait_all_tasks_blocked()
            stats = s.pool_stats()
            assert stats["in_use"] == 2
            assert stats["writers_waiting"] == 2
            assert stats["write_waits"] == 2
            # Reads do not queue behind the stalled writes.
            with trio.fail_after(STATE_DEADLINE):
                assert (await s.get_chat(chats[0].id)).id == chats[0].id
                assert len(await s.messages_after(chats[1].id, 0)) == 1
            assert s.pool_stats()["max_in_use"] == 3
        stats = s.pool_stats()
        assert stats["in_use"] == 0
        assert stats["writers_waiting"] == 0
        for chat in chats:
            assert len(await s.list_queued(chat.id)) == 1


def test_max_writing_defaults_to_half_the_pool_and_may_not_exceed_it() -> None:
    assert PostgresConfig(max_size=10).write_slots == 5
    assert PostgresConfig(max_size=1).write_slots == 1
    assert PostgresConfig(max_size=10, max_writing=10).write_slots == 10
    with pytest.raises(ConfigError, match="max_writing"):
        PostgresConfig(max_size=4, max_writing=5)


# -- failures -----------------------------------------------------------------------------


async def test_unreachable_database_raises_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match=re.escape("127.0.0.1:1/")) as info:
        async with PostgresStore.open("postgresql://postgres@127.0.0.1:1/nowhere"):
            pytest.fail("opened a store on a closed port")  # pragma: no cover
    assert not isinstance(info.value, psycopg.Error)


async def test_an_exception_of_the_block_leaves_as_itself(pg_dsn: str) -> None:
    """The store's asyncio loop runs in nurseries of its own: what the caller's block
    raises still leaves as itself (as with the memory store), not in their group."""

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with PostgresStore.open(pg_dsn):
            raise Boom


async def test_terminated_connection_mid_operation(store: PostgresStore, pg_dsn: str) -> None:
    chat, _ = await store.create_chat(uuid.uuid4(), "t", _text("hi"))
    failure: list[BaseException] = []

    async def send() -> None:
        try:
            await store.send_message(chat.id, _text("late"), max_queued=MAX_QUEUED)
        except StoreError as exc:
            failure.append(exc)

    async with trio.open_nursery() as nursery, RowLock(pg_dsn, chat.id).held():
        nursery.start_soon(send)
        await wait_until(lambda: _blocked_on_lock(pg_dsn, 1))
        await admin(
            pg_dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            APP,
        )
    (exc,) = failure
    assert isinstance(exc, StoreUnavailable)
    assert not isinstance(exc, psycopg.Error)
    assert "send_message" in str(exc)
    # The server is still there: the very next operation works on a fresh connection.
    assert (await store.get_chat(chat.id)).id == chat.id
    assert await store.list_queued(chat.id) == []
    assert store.pool_stats()["in_use"] == 0


async def test_terminated_idle_connections_recover(pg_dsn: str) -> None:
    async with PostgresStore.open(pg_dsn, min_size=3, max_size=3) as s:
        chat, _ = await s.create_chat(uuid.uuid4(), "t", _text("hi"))
        killed = await admin(
            pg_dsn,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s",
            APP,
        )
        assert len(killed) == 3
        pids = [r[0] for r in killed]
        await admin(pg_dsn, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", pids)

        def all_gone() -> bool:
            rows = _query(
                pg_dsn, "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            )
            return int(rows[0][0]) == 0

        await wait_until(all_gone)
        # Every pooled connection is dead: the first operation fails cleanly...
        with pytest.raises(StoreUnavailable):
            await s.get_chat(chat.id)
        # ...and the pool was drained, so the next one does not pick another dead one.
        assert (await s.get_chat(chat.id)).id == chat.id
        assert (await s.get_chat(chat.id)).id == chat.id


async def test_statement_error_is_store_error(store: PostgresStore) -> None:
    worker = uuid.UUID(int=7)
    chat, _ = await store.create_chat(uuid.uuid4(), "t", _text("hi"))
    (running,) = await store.acquire(worker, 1)
    assert running.id == chat.id

    # NOTIFY refuses a payload of 8000 bytes or more: a statement-level failure after the
    # insert, inside the same transaction. (NUL, the old example, no longer reaches a
    # statement: the storable-value gate replaces it.)
    class TooLong:
        def __call__(self, messages: object, *, refresh: bool = False) -> list[tuple[str, str]]:
            return [(f"chat:stream:{chat.id}", "x" * 9000)]

        def changes(self, event: object, applied: object) -> list[tuple[str, str]]:
            return []

    too_long = TooLong()

    with pytest.raises(StoreError) as info:
        await store.persist_step(
            Lease.of(running), [NewMessage(Role.ASSISTANT, _text("a"))], announce=too_long
        )
    assert not isinstance(info.value, StoreUnavailable | psycopg.Error)
    # The failed transaction was rolled back and the connection is reusable.
    assert [m.id for m in await store.messages_after(chat.id, 0)] == [1]
    assert (await store.get_chat(chat.id)).status.value == "running"


# -- cancellation -------------------------------------------------------------------------


async def test_cancel_mid_operation_leaves_pool_usable(store: PostgresStore, pg_dsn: str) -> None:
    chat, _ = await store.create_chat(uuid.uuid4(), "t", _text("hi"))
    reached_end = False

    async with RowLock(pg_dsn, chat.id).held():
        with trio.CancelScope() as scope:

            async def cancel_when_blocked() -> None:
                await wait_until(lambda: _blocked_on_lock(pg_dsn, 1))
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_blocked)
                await store.send_message(chat.id, _text("cancelled"), max_queued=MAX_QUEUED)
                reached_end = True  # pragma: no cover
        assert scope.cancelled_caught
        # No store connection is left mid-transaction while the outside lock is still held.
        assert store.pool_stats()["in_use"] == 0
        assert await trio.to_thread.run_sync(_store_backends, pg_dsn, "idle in transaction") == 0
        assert await trio.to_thread.run_sync(_store_backends, pg_dsn, "active") == 0

    assert not reached_end
    # The cancelled send changed nothing, and the pool serves the next operations.
    assert [m.id for m in await store.messages_after(chat.id, 0)] == [1]
    assert await store.list_queued(chat.id) == []
    sent = await store.send_message(chat.id, _text("next"), max_queued=MAX_QUEUED)
    assert sent.queued is not None  # the chat is still pending: queued
    assert store.pool_stats()["in_use"] == 0


# -- inputs -------------------------------------------------------------------------------


async def test_invalid_uuid_is_a_domain_error_and_missing_chat_not_found(
    store: PostgresStore,
) -> None:
    with pytest.raises(DecodeError, match="chat_id"):
        parse_uuid("not-a-uuid", "chat_id")
    missing = parse_uuid(str(uuid.uuid4()), "chat_id")
    with pytest.raises(ChatNotFound):
        await store.get_chat(missing)
    with pytest.raises(ChatNotFound):
        await store.parent_of(missing)
    with pytest.raises(ChatNotFound):
        await store.finish_turn(Lease(missing, uuid.uuid4(), 1), TurnOutcome.DONE)


# -- coordination between replicas --------------------------------------------------------


async def test_two_replicas_acquire_disjoint_chats(store: PostgresStore, pg_dsn: str) -> None:
    ids = {(await store.create_chat(uuid.uuid4(), "t", _text(f"c{i}")))[0].id for i in range(30)}
    got: dict[uuid.UUID, list[uuid.UUID]] = {}

    async def replica(s: Store, worker: uuid.UUID) -> None:
        mine: list[uuid.UUID] = []
        while batch := await s.acquire(worker, 4):
            mine.extend(c.id for c in batch)
            assert all(c.worker_id == worker for c in batch)
        got[worker] = mine

    async with PostgresStore.open(pg_dsn) as other, trio.open_nursery() as nursery:
        nursery.start_soon(replica, store, uuid.UUID(int=1))
        nursery.start_soon(replica, other, uuid.UUID(int=2))
    a, b = got[uuid.UUID(int=1)], got[uuid.UUID(int=2)]
    assert not set(a) & set(b)
    assert set(a) | set(b) == ids
    assert len(a) + len(b) == 30


async def test_acquire_takes_oldest_pending_first(store: PostgresStore) -> None:
    chats = [(await store.create_chat(uuid.uuid4(), "t", _text(f"c{i}")))[0] for i in range(5)]
    first = await store.acquire(uuid.UUID(int=1), 3)
    assert [c.id for c in first] == [c.id for c in chats[:3]]
    assert store.statement_counts()["AcquireChats"] == 1


async def test_stale_recovery_rechecks_heartbeat(store: PostgresStore, pg_dsn: str) -> None:
    worker = uuid.UUID(int=3)
    for i in range(2):
        await store.create_chat(uuid.uuid4(), "t", _text(f"c{i}"))
    stale, fresh = await store.acquire(worker, 2)
    await admin(
        pg_dsn,
        "UPDATE chats SET heartbeat_at = now() - interval '10 minutes' WHERE id = %s",
        stale.id,
    )
    assert await store.recover_stale(300) == [stale.id]
    assert (await store.get_chat(stale.id)).status.value == "pending"
    assert (await store.get_chat(fresh.id)).status.value == "running"
    assert await store.heartbeat(Lease.of(fresh))
    assert not await store.heartbeat(Lease.of(stale))
    assert await store.recover_stale(300) == []


# -- retried writes after a lost connection -----------------------------------------------


def _answer(s: str) -> list[NewMessage]:
    return [NewMessage(Role.ASSISTANT, _text(s))]


async def _kill_store_backends(dsn: str) -> None:
    """Terminate every connection of the store's pool and wait until they are gone."""
    rows = await admin(
        dsn,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s",
        APP,
    )
    pids = [r[0] for r in rows]
    assert pids
    await admin(dsn, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", pids)

    def all_gone() -> bool:
        left = _query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
        return int(left[0][0]) == 0

    await wait_until(all_gone)


async def test_a_step_retried_after_a_lost_connection_lands_once(pg_dsn: str) -> None:
    async with PostgresStore.open(pg_dsn, min_size=1, max_size=1) as store:
        await trio.to_thread.run_sync(truncate_all, pg_dsn)
        chat, _ = await store.create_chat(uuid.uuid4(), "t", _text("hi"))
        (running,) = await store.acquire(uuid.UUID(int=5), 1)
        lease = Lease.of(running)
        op = uuid.uuid4()
        await _kill_store_backends(pg_dsn)
        with pytest.raises(StoreUnavailable):
            await store.persist_step(lease, _answer("a1"), op_id=op)
        assert [m.id for m in await store.messages_after(chat.id, 0)] == [1]
        first = await store.persist_step(lease, _answer("a1"), op_id=op)
        again = await store.persist_step(lease, _answer("a1"), op_id=op)
        assert again == first
        assert [text_of(m.parts) for m in await store.messages_after(chat.id, 0)] == ["hi", "a1"]
        assert store.statement_counts()["GetChatMessagesByOp"] == 1


# A cluster of this module's own whose commits wait for a synchronous standby that never
# comes: a COMMIT is written locally and then waits, observable in pg_stat_activity. A
# connection terminated there loses the reply while the transaction stays committed -
# the ambiguous failure an op_id exists for. Sessions that must not wait commit locally.
SYNC_DB = "chatd_sync"


@pytest.fixture(scope="module")
def waiting_cluster() -> Iterator[Cluster]:
    try:
        cluster = Cluster.create()
    except ClusterError as exc:  # pragma: no cover - the binaries are part of the dev setup
        pytest.skip(f"no throwaway PostgreSQL cluster: {exc}")
    try:
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        cluster.restart()  # every process, the checkpointer too, starts with the setting
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute("SET synchronous_commit = local")
            conn.execute(f"CREATE DATABASE {SYNC_DB}")
            conn.execute(f"ALTER DATABASE {SYNC_DB} SET synchronous_commit = local")
        yield cluster
    finally:
        cluster.remove()


def _sync_dsn(cluster: Cluster, commit: str) -> str:
    base, _, _ = cluster.dsn.rpartition("/")
    return f"{base}/{SYNC_DB}?options=-c%20synchronous_commit%3D{commit}"


def _waiting_commits(dsn: str) -> list[int]:
    rows = _query(
        dsn,
        "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        " AND datname = current_database()",
    )
    return [int(r[0]) for r in rows]


@pytest.mark.parametrize("write", ["persist_step", "finish_turn"])
async def test_a_write_whose_connection_dies_after_commit_is_replayed_by_its_op_id(
    waiting_cluster: Cluster, write: str
) -> None:
    """The first attempt commits and its connection is killed before the reply
    (StoreUnavailable); the retry with the same op_id reports what landed and writes
    nothing twice: no duplicate step, no second finish."""
    local = _sync_dsn(waiting_cluster, "local")
    async with PostgresStore.open(local) as steady:
        await trio.to_thread.run_sync(truncate_all, local)
        chat, _ = await steady.create_chat(uuid.uuid4(), "t", _text("hi"))
        (running,) = await steady.acquire(uuid.UUID(int=6), 1)
        lease = Lease.of(running)
        op = uuid.uuid4()

        async def attempt(store: PostgresStore) -> tuple[Message, ...]:
            if write == "persist_step":
                return tuple(await store.persist_step(lease, _answer("a1"), op_id=op))
            fin = await store.finish_turn(lease, TurnOutcome.DONE, messages=_answer("a1"), op_id=op)
            assert fin.changed and fin.promoted is None
            return fin.inserted

        failures: list[StoreError] = []
        async with PostgresStore.open(_sync_dsn(waiting_cluster, "on")) as waiting:

            async def first_attempt() -> None:
                try:
                    await attempt(waiting)
                except StoreError as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first_attempt)
                await wait_until(lambda: bool(_waiting_commits(local)))
                (pid,) = await trio.to_thread.run_sync(_waiting_commits, local)
                await admin(local, "SELECT pg_terminate_backend(%s)", pid)
        (failure,) = failures
        assert isinstance(failure, StoreUnavailable)

        # It committed: the answer is there once, and (a finish) the chat is waiting.
        landed = await steady.messages_after(chat.id, 0)
        assert [text_of(m.parts) for m in landed] == ["hi", "a1"]
        status = ChatStatus.RUNNING if write == "persist_step" else ChatStatus.WAITING
        assert (await steady.get_chat(chat.id)).status is status
        before = await steady.get_chat(chat.id)

        # The retry goes through a connection that does not wait for the missing standby
        # (as a replica's next connection would after a failover).
        retried = await attempt(steady)
        assert retried == (landed[1],)
        assert await steady.messages_after(chat.id, 0) == landed
        assert await steady.get_chat(chat.id) == before
        assert steady.statement_counts()["GetChatMessagesByOp"] == 1


# -- a guarded write blocked on the row lock ----------------------------------------------


class RowLockThenWrite(RowLock):
    """Holds the chat row's lock from an outside connection, then commits a change
    under it: what a concurrent write finds once the lock is granted."""

    def commit(self, query: str, *params: Any) -> None:
        assert self.conn is not None
        self.conn.execute(query, params)
        self.conn.commit()


@pytest.mark.parametrize("change", ["queued message", "takeover"])
async def test_a_write_blocked_on_the_row_lock_decides_on_what_committed_meanwhile(
    store: PostgresStore, pg_dsn: str, change: str
) -> None:
    chat, _ = await store.create_chat(uuid.uuid4(), "t", _text("hi"))
    (running,) = await store.acquire(uuid.UUID(int=8), 1)
    lease = Lease.of(running)
    results: list[FinishResult] = []

    async def finish() -> None:
        answer = _answer("answer")
        results.append(await store.finish_turn(lease, TurnOutcome.DONE, messages=answer))

    lock = RowLockThenWrite(pg_dsn, chat.id)
    async with trio.open_nursery() as nursery, lock.held():
        nursery.start_soon(finish)
        await wait_until(lambda: _blocked_on_lock(pg_dsn, 1))
        if change == "queued message":
            # The finish was decided on an empty queue: it must see this one and promote it.
            sql = (
                "INSERT INTO chat_queued_messages (chat_id, content, position)"
                ' VALUES (%s, \'[{"type": "text", "text": "late"}]\'::jsonb, 1)'
            )
        else:
            sql = (
                "UPDATE chats SET owner_token = owner_token + 1, worker_id = NULL,"
                " started_at = NULL, heartbeat_at = NULL, status = 'pending' WHERE id = %s"
            )
        await trio.to_thread.run_sync(lock.commit, sql, chat.id)
    (fin,) = results
    texts = [text_of(m.parts) for m in await store.messages_after(chat.id, 0)]
    got = await store.get_chat(chat.id)
    if change == "queued message":
        assert fin.changed and fin.promoted is not None
        assert texts == ["hi", "answer", "late"]
        assert (got.status, got.queued) == (ChatStatus.PENDING, 0)
    else:
        assert not fin.changed and fin.inserted == ()
        assert texts == ["hi"]
        assert got.status is ChatStatus.PENDING and got.owner_token == lease.token + 1
