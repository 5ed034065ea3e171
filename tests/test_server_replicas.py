"""Two replicas on one PostgreSQL database (docs/spec.md §1 and §2).

Each replica has its own pool and its own LISTEN connection (two PostgresStore and
two PostgresPubSub instances), as two processes would. Real clock, short intervals;
the tests wait on stream events and on recorded final transitions.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import trio

from chatd_trio.domain import (
    ChatStatus,
    ErrorEvent,
    ErrorPayload,
    MessageEvent,
    Role,
    StatusEvent,
    TextPart,
    text_of,
)
from chatd_trio.models.base import Model
from chatd_trio.pubsub.postgres import PostgresPubSub
from chatd_trio.server import Server
from chatd_trio.store.base import TurnOutcome
from chatd_trio.store.postgres import PostgresStore
from chatd_trio.strategies import Announce, Strategies
from chatd_trio.streams import ChatStreams, StreamSubscription
from tests.pgcluster import truncate_all
from tests.server_replica import (
    PARTIAL,
    POSTGRES_CONFIG,
    WAIT,
    ObservedServer,
    ObservedStore,
    registry,
    until_part,
    until_statuses,
    user_model,
)

pytestmark = pytest.mark.postgres

OWNER = uuid.UUID(int=1)


@dataclass
class Replica:
    store: ObservedStore
    pubsub: PostgresPubSub

    def server(self, model: Model) -> ObservedServer:
        return ObservedServer(self.store, self.pubsub, model, POSTGRES_CONFIG, tools=registry())  # type: ignore[arg-type]


@asynccontextmanager
async def replica(dsn: str) -> AsyncIterator[Replica]:
    async with PostgresStore.open(dsn) as store, PostgresPubSub.open(dsn) as pubsub:
        yield Replica(ObservedStore(store), pubsub)


@pytest.fixture
async def replicas(pg_dsn: str) -> AsyncIterator[tuple[Replica, Replica]]:
    await trio.to_thread.run_sync(truncate_all, pg_dsn)
    async with replica(pg_dsn) as a, replica(pg_dsn) as b:
        yield a, b


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _sql(dsn: str, query: str, params: tuple[Any, ...]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(query, params)  # type: ignore[arg-type]


async def history(store: ObservedStore, chat_id: uuid.UUID) -> list[tuple[str, str]]:
    return [(m.role.value, text_of(m.parts)) for m in await store.messages_after(chat_id, 0)]


@asynccontextmanager
async def running_on_b(
    a: Replica, b: Replica, text: str
) -> AsyncIterator[tuple[ObservedServer, ObservedServer, uuid.UUID, StreamSubscription]]:
    """B runs a hanging turn of a new chat (its first part streamed); then A starts and
    subscribes to the chat."""
    async with AsyncExitStack() as stack:
        server_b = await stack.enter_async_context(b.server(user_model()))
        chat = await server_b.create_chat(OWNER, text, title="t")
        sub_b = await stack.enter_async_context(server_b.subscribe(OWNER, chat.id))
        await until_statuses(sub_b, [ChatStatus.RUNNING])
        await until_part(sub_b)
        assert (await b.store.get_chat(chat.id)).worker_id == server_b.worker_id
        # A starts only now: the chat is running, so A cannot acquire it.
        server_a = await stack.enter_async_context(a.server(user_model()))
        sub_a = await stack.enter_async_context(server_a.subscribe(OWNER, chat.id))
        yield server_a, server_b, chat.id, sub_a


async def test_interrupt_on_a_reaches_a_subscriber_on_a_and_the_turn_on_b(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with running_on_b(a, b, "hang on") as (server_a, server_b, chat_id, sub_a):
        await until_statuses(sub_a, [ChatStatus.RUNNING])
        chat = await server_a.interrupt(OWNER, chat_id)
        assert chat.status is ChatStatus.WAITING and chat.worker_id is None
        await until_statuses(sub_a, [ChatStatus.WAITING])
        fin = await b.store.wait_finished(chat_id)
        assert fin.chat.status is ChatStatus.WAITING
        assert server_b.stats().turns_finished == {"interrupted": 1}
        assert server_b.stats().interrupts == 1
        assert server_a.stats().turns_finished == {}
    assert await history(a.store, chat_id) == [("user", "hang on"), ("assistant", PARTIAL)]
    stored = await a.store.get_chat(chat_id)
    assert stored.status is ChatStatus.WAITING and stored.worker_id is None


async def test_message_queued_on_a_is_promoted_by_b_and_run_once(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with running_on_b(a, b, "hang on") as (server_a, _, chat_id, sub_a):
        sent = await server_a.send_message(OWNER, chat_id, "next", busy_behavior="interrupt")
        assert sent.queued is not None
        first = await b.store.wait_finished(chat_id)
        assert first.promoted is not None and text_of(first.promoted.parts) == "next"
        # Either replica may run the promoted message; exactly one does. Its `waiting`
        # is announced in the finish's transaction, so it can arrive before the
        # finishing replica has recorded the finish.
        with trio.fail_after(WAIT):
            while True:
                event = await sub_a.receive()
                if (
                    isinstance(event, StatusEvent)
                    and event.status is ChatStatus.WAITING
                    and (await a.store.get_chat(chat_id)).status is ChatStatus.WAITING
                    and len(await history(a.store, chat_id)) == 4
                ):
                    break
            while len(a.store.finished) + len(b.store.finished) < 2:
                events = (a.store.finish_event, b.store.finish_event)
                async with trio.open_nursery() as either:
                    for event in events:
                        either.start_soon(_set_then_cancel, event, either.cancel_scope)
        assert len(a.store.finished) + len(b.store.finished) == 2
    pairs = await history(a.store, chat_id)
    assert pairs == [
        ("user", "hang on"),
        ("assistant", PARTIAL),
        ("user", "next"),
        ("assistant", "re: next"),
    ]
    assert await a.store.list_queued(chat_id) == []


async def test_edit_on_a_stops_the_turn_on_b_which_writes_nothing_after_it(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with running_on_b(a, b, "hang on") as (server_a, server_b, chat_id, sub_a):
        first = (await a.store.messages_after(chat_id, 0))[0]
        assert first.role is Role.USER
        b_token = (await b.store.get_chat(chat_id)).owner_token
        await server_a.edit_message(OWNER, chat_id, first.id, "edited")
        # B's turn stops: as an interrupt whose writes are refused (the row is pending),
        # or fenced without writing (A already holds the chat under a newer token).
        assert await server_b.wait_ended(chat_id) is TurnOutcome.LOST
        assert server_b.stats().fenced == 1
        for fin in b.store.finishes(chat_id):
            assert fin.lease.token == b_token
            assert not fin.result.changed and fin.result.inserted == ()
        with trio.fail_after(WAIT):
            while (await a.store.get_chat(chat_id)).status is not ChatStatus.WAITING:
                await until_statuses(sub_a, [ChatStatus.WAITING])
    assert await history(a.store, chat_id) == [("user", "edited"), ("assistant", "re: edited")]


async def test_takeover_the_old_worker_publishes_nothing_at_the_end(
    replicas: tuple[Replica, Replica], pg_dsn: str
) -> None:
    a, b = replicas
    thief = uuid.uuid4()
    async with running_on_b(a, b, "hang on") as (server_a, server_b, chat_id, sub_a):
        await until_statuses(sub_a, [ChatStatus.RUNNING])
        published = server_b.streams.statistics().events_published.copy()
        # Another run holds the row now (a newer ownership token, as after a stale recovery
        # and an acquisition elsewhere); nobody is told (as after a missed notify).
        await trio.to_thread.run_sync(
            _sql,
            pg_dsn,
            "UPDATE chats SET worker_id = %s, owner_token = owner_token + 2 WHERE id = %s",
            (thief, chat_id),
        )
        # B's heartbeat is refused: its turn ends fenced, with no final transition.
        assert await server_b.wait_ended(chat_id) is TurnOutcome.LOST
        assert b.store.finishes(chat_id) == []
        assert server_b.streams.statistics().events_published == published
        assert server_b.stats().heartbeats_lost == 1
        assert server_b.stats().fenced == 1
        assert server_b.stats().turns_finished == {"lost": 1}
        # A sentinel published after B's turn ended: everything B published reached A
        # before it, in order on the channel.
        # (An error event: a queue update repeating the known queue is not delivered.)
        await server_a.streams.publish_error(chat_id, ErrorPayload("sentinel"))
        seen = []
        with trio.fail_after(WAIT):
            while not isinstance(event := await sub_a.receive(), ErrorEvent):
                seen.append(event)
        assert [e for e in seen if isinstance(e, StatusEvent)] == []
    stored = await a.store.get_chat(chat_id)
    assert stored.status is ChatStatus.RUNNING and stored.worker_id == thief
    assert await history(a.store, chat_id) == [("user", "hang on")]


@pytest.mark.parametrize("in_transaction", [True, False], ids=["in_transaction", "after_commit"])
async def test_late_notify_of_a_user_message_costs_no_read_when_sent_in_its_transaction(
    replicas: tuple[Replica, Replica], in_transaction: bool
) -> None:
    """A sends a user message, B runs the turn. A's after-commit publish can come after
    B's answer: B's subscriber then sees a gap and reads the database. Sent inside A's
    inserting transaction, PostgreSQL delivers it (commit order) before B's answer, so
    the subscriber is served from the notifies alone. Either way: each message once."""
    a, b = replicas
    announce = Announce.IN_TRANSACTION if in_transaction else Announce.AFTER_COMMIT
    strategies = Strategies(announce=announce)
    async with Server(
        b.store,  # type: ignore[arg-type]
        b.pubsub,
        user_model(),
        POSTGRES_CONFIG,
        tools=registry(),
        strategies=strategies,
    ) as server_b:
        chat = await server_b.create_chat(OWNER, "one", title="t")
        async with server_b.subscribe(OWNER, chat.id) as sub:
            events = await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
            reads_before = server_b.streams.statistics().db_catchup_reads
            # Replica A: its streams only (it runs no turns here).
            sender = ChatStreams(
                a.store,  # type: ignore[arg-type]
                a.pubsub,
                POSTGRES_CONFIG.streams,
                strategies=strategies,
            )
            assert (sender.announcer is not None) is in_transaction
            sent = await a.store.send_message(
                chat.id, (TextPart("two"),), max_queued=20, announce=sender.announcer
            )
            assert sent.message is not None
            server_b.wake()
            # B's turn ends before A publishes anything after its commit.
            await b.store.wait_finished(chat.id, 2)
            events += await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
            reads = server_b.streams.statistics().db_catchup_reads - reads_before
            await sender.publish_message(sent.message, announced=in_transaction)
            # A's next notify on the channel comes after the late one: once it is
            # received, the late one has been handled. (An error event: a status
            # repeating the known one is not delivered.)
            await sender.publish_error(chat.id, ErrorPayload("sentinel"))
            with trio.fail_after(WAIT):
                while not isinstance(event := await sub.receive(), ErrorEvent):
                    events.append(event)
    received = [e.message.id for e in events if isinstance(e, MessageEvent)]
    stored = [m.id for m in await a.store.messages_after(chat.id, 0)]
    assert received == stored and len(stored) == 4
    if in_transaction:
        assert reads == 0
    else:
        assert reads >= 1
