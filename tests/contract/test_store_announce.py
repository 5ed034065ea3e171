"""Notifies sent inside the inserting operation (`announce=`), on both adapters.

A store linked to a pubsub (MemoryStore(pubsub=...), or a PostgresStore and a
PostgresPubSub on the same database) delivers what the announcer builds together
with the insert: PostgreSQL at COMMIT (in commit order, discarded by a rollback),
the memory adapter within the operation.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from chatd_trio.domain import ChatStatus, Message, NewMessage, Role, TextPart, Visibility
from chatd_trio.errors import PersistRefused, StoreError
from chatd_trio.lifecycle import Event
from chatd_trio.pubsub.base import DatabaseChannels, PubSub
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.store.base import Applied, Lease, Store, TurnOutcome
from chatd_trio.store.memory import MemoryStore
from tests.contract.conftest import MAX_QUEUED, STORE_KINDS, new_chat, running_chat, text

CHANNEL = "announce_test"
WAIT = 10.0


@asynccontextmanager
async def linked(kind: str, dsn: str | None) -> AsyncIterator[tuple[Store, PubSub]]:
    """An empty store and the pubsub it announces to."""
    if kind == "memory":
        pubsub = MemoryPubSub()
        yield MemoryStore(pubsub=pubsub), pubsub
        return
    assert dsn is not None
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore
    from tests.pgcluster import truncate_all

    async with PostgresStore.open(dsn) as store, PostgresPubSub.open(dsn) as pg:
        await trio.to_thread.run_sync(truncate_all, dsn)
        yield store, pg


@pytest.fixture(params=STORE_KINDS)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Store, PubSub]]:
    kind = str(request.param)
    dsn = str(request.getfixturevalue("pg_dsn")) if kind == "postgres" else None
    async with linked(kind, dsn) as p:
        yield p


@dataclass
class Recorder:
    """An announcer: one notify per message, naming its id, visibility and predecessor."""

    pubsub: PubSub | None = None
    calls: list[tuple[list[int], bool]] = field(default_factory=list)
    oversize: bool = False
    # Announce every change too: "<event> <status> <queue length>".
    control: bool = False
    changed: list[tuple[Event | None, ChatStatus]] = field(default_factory=list)

    def _sealed(self, payload: str) -> tuple[str, str]:
        # A store sends what it is given: an announcer seals for the linked pubsub.
        return (CHANNEL, self.pubsub.seal(CHANNEL, payload) if self.pubsub else payload)

    def __call__(
        self, messages: Sequence[Message], *, refresh: bool = False
    ) -> Sequence[tuple[str, str]]:
        self.calls.append(([m.id for m in messages], refresh))
        if refresh:
            return [self._sealed(f"refresh {messages[0].id}")]
        pad = "x" * 9000 if self.oversize else ""
        return [self._sealed(f"{m.id} {m.visibility.value} {m.prev_id}{pad}") for m in messages]

    def changes(self, event: Event | None, applied: Applied) -> Sequence[tuple[str, str]]:
        self.changed.append((event, applied.chat.status))
        if not self.control:
            return []
        queue = "-" if applied.queue is None else len(applied.queue)
        name = event.value if event is not None else "queue"
        return [self._sealed(f"{name} {applied.chat.status.value} {queue}")]


async def received(sub: object, n: int) -> list[str]:
    out: list[str] = []
    with trio.fail_after(WAIT):
        while len(out) < n:
            item = await sub.receive()  # type: ignore[attr-defined]
            assert isinstance(item, str), item
            out.append(item)
    return out


async def test_a_store_announces_only_to_the_pubsub_it_is_linked_to(
    pair: tuple[Store, PubSub],
) -> None:
    store, pubsub = pair
    assert store.announces_to(pubsub)
    assert not store.announces_to(MemoryPubSub())
    assert not store.announces_to(None)
    assert not MemoryStore().announces_to(pubsub)


@dataclass(frozen=True)
class OnDatabase:
    """Only the pubsub port's `DatabaseChannels` capability: no adapter class behind it."""

    database: str


async def test_a_store_decides_from_the_pubsub_port_where_notifies_travel(
    pair: tuple[Store, PubSub],
) -> None:
    """A PostgreSQL store announces to whatever has channels on its own database, and
    nothing else; the memory store only to the pubsub object it was created with."""
    store, pubsub = pair
    if isinstance(pubsub, DatabaseChannels):
        assert store.announces_to(OnDatabase(pubsub.database))
        assert not store.announces_to(OnDatabase(pubsub.database + "_other"))
    else:
        assert not store.announces_to(OnDatabase("127.0.0.1:5432/postgres"))


async def test_every_inserting_operation_delivers_its_notifies_in_message_order(
    pair: tuple[Store, PubSub],
) -> None:
    store, pubsub = pair
    rec = Recorder(pubsub)
    worker = uuid.uuid4()
    async with pubsub.subscribe(CHANNEL) as sub:
        chat = await running_chat(store, worker)
        step = [
            NewMessage(Role.ASSISTANT, (TextPart("a"),), Visibility.BOTH),
            NewMessage(Role.SYSTEM, (TextPart("m"),), Visibility.MODEL),
            NewMessage(Role.ASSISTANT, (TextPart("b"),), Visibility.BOTH),
        ]
        s1, s2, s3 = await store.persist_step(Lease.of(chat), step, announce=rec)
        queued = await store.send_message(chat.id, text("q"), max_queued=MAX_QUEUED, announce=rec)
        assert queued.queued is not None  # queued: nothing inserted, nothing announced
        fin = await store.finish_turn(Lease.of(chat), TurnOutcome.DONE, announce=rec)
        assert fin.promoted is not None
        edit = await store.edit_message(chat.id, fin.promoted.id, text("q2"), announce=rec)
        got = await received(sub, 5)
    first = (await store.messages_after(chat.id, 0))[0].id
    assert got == [
        f"{s1.id} both {first}",
        f"{s2.id} model None",
        f"{s3.id} both {s1.id}",
        f"{fin.promoted.id} both {s3.id}",
        f"refresh {edit.message.id}",
    ]
    assert [refresh for _, refresh in rec.calls] == [False, False, True]
    assert store.statement_counts()["NotifyInTransaction"] == 3


async def test_send_and_promote_announce_the_inserted_user_message(
    pair: tuple[Store, PubSub],
) -> None:
    store, pubsub = pair
    rec = Recorder(pubsub)
    worker = uuid.uuid4()
    async with pubsub.subscribe(CHANNEL) as sub:
        chat, first = await new_chat(store)
        (running,) = await store.acquire(worker, 1)
        queued = await store.send_message(chat.id, text("q"), max_queued=MAX_QUEUED)
        assert queued.queued is not None
        await store.finish_turn(Lease.of(running), TurnOutcome.ERROR, "boom")
        promoted = await store.promote_queued(chat.id, queued.queued.id, announce=rec)
        assert promoted.message is not None
        (running,) = await store.acquire(worker, 1)
        await store.finish_turn(Lease.of(running), TurnOutcome.DONE, announce=rec)
        sent = await store.send_message(chat.id, text("s"), max_queued=MAX_QUEUED, announce=rec)
        assert sent.message is not None
        got = await received(sub, 2)
    assert got == [
        f"{promoted.message.id} both {first.id}",
        f"{sent.message.id} both {promoted.message.id}",
    ]


async def test_a_refused_write_announces_nothing(pair: tuple[Store, PubSub]) -> None:
    store, pubsub = pair
    rec = Recorder(pubsub)
    async with pubsub.subscribe(CHANNEL) as sub:
        chat = await running_chat(store, uuid.uuid4())
        stale = Lease(chat.id, uuid.uuid4(), chat.owner_token - 1)  # an earlier run's lease
        step = [NewMessage(Role.ASSISTANT, (TextPart("a"),), Visibility.BOTH)]
        with pytest.raises(PersistRefused):
            await store.persist_step(stale, step, announce=rec)
        # A later notify arrives first: the refused write sent nothing.
        await pubsub.publish(CHANNEL, "marker")
        assert await received(sub, 1) == ["marker"]
    assert rec.calls == []
    assert "NotifyInTransaction" not in store.statement_counts()


async def test_every_change_is_announced_in_its_transaction_after_its_messages(
    pair: tuple[Store, PubSub],
) -> None:
    store, pubsub = pair
    rec = Recorder(pubsub, control=True)
    worker = uuid.uuid4()
    owner = uuid.uuid4()
    answer = [NewMessage(Role.ASSISTANT, (TextPart("a"),), Visibility.BOTH)]
    async with pubsub.subscribe(CHANNEL) as sub:
        chat, first = await store.create_chat(owner, "t", text("u1"), announce=rec)
        (running,) = await store.acquire(worker, 1, announce=rec)
        queued = await store.send_message(chat.id, text("q"), max_queued=MAX_QUEUED, announce=rec)
        assert queued.queued is not None
        lease = Lease.of(running)
        fin = await store.finish_turn(lease, TurnOutcome.DONE, messages=answer, announce=rec)
        assert fin.promoted is not None
        (again,) = await store.acquire(worker, 1, announce=rec)
        await store.interrupt(chat.id, owner_id=owner, announce=rec)
        sent = await store.send_message(chat.id, text("s"), max_queued=MAX_QUEUED, announce=rec)
        assert sent.message is not None  # waiting: inserted
        assert await store.recover_stale(3600, announce=rec) == []  # nothing to announce
        got = await received(sub, 10)
    (reply,) = fin.inserted
    assert got == [
        "create pending -",
        "acquire running -",
        "send_message running 1",
        f"{reply.id} both {first.id}",
        f"{fin.promoted.id} both {reply.id}",
        "finish_done pending 0",
        "acquire running -",
        "interrupt waiting -",
        f"{sent.message.id} both {fin.promoted.id}",
        "send_message pending -",
    ]
    assert again.owner_token == running.owner_token + 2  # acquired, finished, acquired


async def test_memory_store_without_a_pubsub_refuses_announce() -> None:
    store = MemoryStore()
    worker = uuid.uuid4()
    chat = await running_chat(store, worker)
    await store.finish_turn(Lease.of(chat), TurnOutcome.DONE)
    with pytest.raises(ValueError, match=r"MemoryStore\(pubsub=\.\.\.\)"):
        await store.send_message(chat.id, text("x"), max_queued=MAX_QUEUED, announce=Recorder())
    assert len(await store.messages_after(chat.id, 0)) == 1  # nothing inserted


@pytest.mark.postgres
async def test_postgres_a_notify_the_database_refuses_rolls_the_insert_back(
    pg_dsn: str,
) -> None:
    async with linked("postgres", pg_dsn) as (store, pubsub), pubsub.subscribe(CHANNEL) as sub:
        worker = uuid.uuid4()
        chat = await running_chat(store, worker)
        step = [NewMessage(Role.ASSISTANT, (TextPart("a"),), Visibility.BOTH)]
        with pytest.raises(StoreError):
            await store.persist_step(Lease.of(chat), step, announce=Recorder(oversize=True))
        await pubsub.publish(CHANNEL, "marker")
        assert await received(sub, 1) == ["marker"]
        # Neither the message nor its notify: they commit or roll back together.
        assert [m.role for m in await store.messages_after(chat.id, 0)] == [Role.USER]
