"""Round trips counted at the connection (`chatd_trio._pgtrace`), on real PostgreSQL.

Counts, never times: each store operation's cost on the wire is a fixed number
of exchanges with the server, whatever the machine.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import pytest
import trio

from chatd_trio.config import PostgresConfig, PubSubConfig
from chatd_trio.domain import ChatStatus, Message, NewMessage, Role, TextPart, Visibility
from chatd_trio.errors import StoreError
from chatd_trio.lifecycle import ChatView, Event, decide
from chatd_trio.pubsub.auth import NotifyAuth, new_key_text
from chatd_trio.pubsub.postgres import PostgresPubSub
from chatd_trio.store.base import Applied, Lease, TurnOutcome, Write
from chatd_trio.store.postgres import PostgresStore
from tests.pgcluster import truncate_all

pytestmark = pytest.mark.postgres

T = TypeVar("T")
COUNTED = PostgresConfig(count_round_trips=True)
W = uuid.UUID(int=1)


@asynccontextmanager
async def counted_store(dsn: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore.open(dsn, config=COUNTED) as store:
        await trio.to_thread.run_sync(truncate_all, dsn)
        yield store


def trips(store: PostgresStore) -> int:
    counted = store.round_trips()
    assert counted is not None
    return counted


async def test_round_trips_are_not_counted_by_default(pg_dsn: str) -> None:
    async with PostgresStore.open(pg_dsn) as store:
        await store.messages_after(uuid.uuid4(), 0)
        assert store.round_trips() is None


async def test_a_read_is_one_round_trip(pg_dsn: str) -> None:
    async with counted_store(pg_dsn) as store:
        before = trips(store)
        await store.messages_after(uuid.uuid4(), 0)
        assert trips(store) - before == 1
        await store.list_queued(uuid.uuid4())
        await store.prompt_messages(uuid.uuid4())
        assert trips(store) - before == 3


async def test_a_pubsub_publish_is_one_round_trip(pg_dsn: str) -> None:
    auth = NotifyAuth.from_key_text(new_key_text())
    config = PubSubConfig(count_round_trips=True)
    # The LISTEN of a subscription is a round trip of the listener connection.
    async with (
        PostgresPubSub.open(pg_dsn, config=config, auth=auth) as pubsub,
        pubsub.subscribe("trips") as sub,
    ):
        before = pubsub.statistics().round_trips
        assert before is not None and before >= 1
        await pubsub.publish("trips", "hello")
        assert await sub.receive() == "hello"
        # Receiving the notify is pushed by the server: not a round trip.
        assert pubsub.statistics().round_trips == before + 1
    async with PostgresPubSub.open(pg_dsn, auth=auth) as plain:
        assert plain.statistics().round_trips is None


@dataclass
class Sealing:
    """An announcer: one notify per message and per change, sealed for the pubsub."""

    pubsub: PostgresPubSub

    def _sealed(self, text: str) -> tuple[str, str]:
        return ("trips", self.pubsub.seal("trips", text))

    def __call__(
        self, messages: Sequence[Message], *, refresh: bool = False
    ) -> Sequence[tuple[str, str]]:
        return [self._sealed(str(m.id)) for m in messages]

    def changes(self, event: Event | None, applied: Applied) -> Sequence[tuple[str, str]]:
        return [self._sealed(applied.chat.status.value)]


def say(text: str) -> list[NewMessage]:
    return [NewMessage(Role.ASSISTANT, (TextPart(text),), Visibility.BOTH)]


async def test_a_steady_turn_is_one_batch_per_write_plus_one_for_its_notifies(
    pg_dsn: str,
) -> None:
    """The store operations of a steady turn: each guarded write is one batch (BEGIN,
    lock, guard read, gated effects), and one more carrying its notifies and COMMIT."""
    auth = NotifyAuth.from_key_text(new_key_text())
    async with counted_store(pg_dsn) as store, PostgresPubSub.open(pg_dsn, auth=auth) as ps:
        announce = Sealing(ps)
        owner = uuid.uuid4()
        chat, _ = await store.create_chat(owner, "t", (TextPart("u1"),))
        spent: dict[str, int] = {}

        async def cost(name: str, op: Awaitable[T], attempts: int = 1) -> T:
            before, borrowed = trips(store), store.pool_stats()["requests_num"]
            result = await op
            spent[name] = trips(store) - before
            # One connection borrowed per attempt, however many batches it sends.
            assert store.pool_stats()["requests_num"] - borrowed == attempts, name
            return result

        (running,) = await cost("acquire", store.acquire(W, 1, announce=announce))
        lease = Lease.of(running)
        await cost("step", store.persist_step(lease, say("a1"), announce=announce))
        await cost("heartbeat", store.heartbeat(lease))
        queued = await cost(
            "queued send",
            store.send_message(chat.id, (TextPart("q"),), max_queued=20, announce=announce),
            attempts=2,
        )
        assert queued.queued is not None
        await store.delete_queued(chat.id, queued.queued.id)
        fin = await cost(
            "finish",
            store.finish_turn(lease, TurnOutcome.DONE, messages=say("a2"), announce=announce),
        )
        assert fin.changed and fin.chat.status is ChatStatus.WAITING
        sent = await cost(
            "send",
            store.send_message(
                chat.id, (TextPart("u2"),), max_queued=20, announce=announce, owner_id=owner
            ),
        )
        assert sent.message is not None
        (again,) = await cost("acquire without notifies", store.acquire(W, 1))
        await cost("step without notifies", store.persist_step(Lease.of(again), say("a3")))
        assert await cost("nothing to acquire", store.acquire(W, 1, announce=announce)) == []
    assert spent == {
        "acquire": 2,
        "acquire without notifies": 1,
        "step": 2,
        "heartbeat": 1,
        # Decided on a presumed idle chat, it missed (the chat runs), then queued.
        "queued send": 4,
        "finish": 2,
        "send": 2,
        "step without notifies": 1,
        "nothing to acquire": 2,
    }


async def test_a_turn_run_by_another_replica_makes_the_prompt_a_whole_read(
    pg_dsn: str,
) -> None:
    async with counted_store(pg_dsn) as a, PostgresStore.open(pg_dsn) as b:
        chat, _ = await a.create_chat(uuid.uuid4(), "t", (TextPart("u1"),))
        (running,) = await a.acquire(W, 1, prompts=True)
        await a.finish_turn(Lease.of(running), TurnOutcome.DONE, messages=say("a1"))
        await a.send_message(chat.id, (TextPart("u2"),), max_queued=20)
        # Replica B runs turn 2: A's cached prompt ends before B's answer.
        (on_b,) = await b.acquire(W, 1, prompts=True)
        await b.finish_turn(Lease.of(on_b), TurnOutcome.DONE, messages=say("a2"))
        await b.send_message(chat.id, (TextPart("u3"),), max_queued=20)
        before = (a.statement_counts(), trips(a))
        (again,) = await a.acquire(W, 1, prompts=True)
        round_trips = trips(a) - before[1]
        prompt = a.cached_prompt(Lease.of(again))
        spent = {k: v - before[0].get(k, 0) for k, v in a.statement_counts().items()}
        assert prompt == await a.prompt_messages(chat.id)
        assert [m.role for m in prompt or []] == [Role.USER, Role.ASSISTANT] * 2 + [Role.USER]
        # Still two round trips: the whole read rides in the acquisition's second batch.
        assert spent["GetPromptMessages"] == 1 and round_trips == 2


async def test_a_batch_the_server_refuses_rolls_the_whole_write_back(pg_dsn: str) -> None:
    """An error inside the first batch (here a value no bigint holds) aborts the
    transaction: nothing of the write lands, the row lock is gone and the connection
    goes back to the pool clean, so the next write of the chat lands at once. (The
    storable-value gate in front of `apply` would clamp the value: the plan is applied
    directly, as the adapter sees it.)"""
    async with counted_store(pg_dsn) as store:
        await store.create_chat(uuid.uuid4(), "t", (TextPart("u1"),))
        (running,) = await store.acquire(W, 1)
        lease = Lease.of(running)
        bad = (NewMessage(Role.ASSISTANT, (TextPart("x"),), Visibility.BOTH, context_limit=2**70),)
        plan = decide(Event.WRITE, ChatView.of(running), token=lease.token)
        with pytest.raises(StoreError):
            await store.apply(lease.chat_id, plan, Write(messages=bad, stamp=lease.token))
        assert [m.role for m in await store.messages_after(lease.chat_id, 0)] == [Role.USER]
        with trio.fail_after(10):
            (ok,) = await store.persist_step(lease, say("fine"))
        assert ok.prev_id is not None
        assert store.pool_stats()["in_use"] == 0


async def test_a_replay_with_notifies_reads_what_landed_and_announces_nothing(
    pg_dsn: str,
) -> None:
    auth = NotifyAuth.from_key_text(new_key_text())
    async with (
        counted_store(pg_dsn) as store,
        PostgresPubSub.open(pg_dsn, auth=auth) as ps,
        ps.subscribe("trips") as sub,
    ):
        announce = Sealing(ps)
        await store.create_chat(uuid.uuid4(), "t", (TextPart("u1"),))
        (running,) = await store.acquire(W, 1)
        lease, op = Lease.of(running), uuid.uuid4()
        first = await store.persist_step(lease, say("a1"), announce=announce, op_id=op)
        notifies = store.statement_counts()["NotifyInTransaction"]
        before = trips(store)
        again = await store.persist_step(lease, say("a1"), announce=announce, op_id=op)
        assert again == first
        # The batch, the read of what landed, the ROLLBACK: no second notify.
        assert trips(store) - before == 3
        assert store.statement_counts()["NotifyInTransaction"] == notifies
        fin = await store.finish_turn(lease, TurnOutcome.DONE, announce=announce)
        assert fin.changed
        got = [await sub.receive() for _ in range(3)]
    # The step's notifies, then the finish's: the replay sent none in between.
    assert got == [str(first[0].id), "running", "waiting"]
