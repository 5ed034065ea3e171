"""Chat streams (docs/spec.md §4): publish, subscribe with catch-up, cache, drops.

Two `ChatStreams` sharing one store and one pubsub are two replicas. The
cross-replica tests run against the memory adapters and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from chatd_trio.config import StreamConfig
from chatd_trio.domain import (
    ChatStatus,
    ErrorEvent,
    ErrorPayload,
    Message,
    MessageEvent,
    MessagePartEvent,
    NewMessage,
    NotifyPayload,
    QueueUpdateEvent,
    RetryEvent,
    RetryPayload,
    Role,
    SnapshotEndEvent,
    StatusEvent,
    StreamEvent,
    TextPart,
    stream_channel,
)
from chatd_trio.errors import PubSubError, StoreError
from chatd_trio.pubsub.base import PubSub
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.store.base import Lease, Store, TurnOutcome
from chatd_trio.store.memory import MemoryStore
from chatd_trio.strategies import CatchUp, Strategies
from chatd_trio.streams import ChatStreams, StreamSubscription

TIMEOUT = 10.0
READS = "GetChatMessagesAfter"

# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(params=["memory", "postgres"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_dsn(backend_kind: str, request: pytest.FixtureRequest) -> str | None:
    if backend_kind == "postgres":
        return str(request.getfixturevalue("pg_dsn"))
    return None


@asynccontextmanager
async def open_backend(kind: str, dsn: str | None) -> AsyncIterator[tuple[Store, PubSub]]:
    """A real store and pubsub: memory, or PostgreSQL on the session's test database."""
    if kind == "memory":
        yield MemoryStore(), MemoryPubSub()
        return
    assert dsn is not None
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore

    async with PostgresStore.open(dsn) as store, PostgresPubSub.open(dsn) as pubsub:
        yield store, pubsub


@pytest.fixture
async def backend(
    backend_kind: str, backend_dsn: str | None
) -> AsyncIterator[tuple[Store, PubSub]]:
    async with open_backend(backend_kind, backend_dsn) as b:
        yield b


# -- helpers --------------------------------------------------------------------------


class SpyStore:
    """A thin wrapper around a real store: records catch-up reads, can fail them."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.reads: list[tuple[uuid.UUID, int]] = []
        self.fail_reads = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def messages_after(self, chat_id: uuid.UUID, after_id: int) -> list[Message]:
        self.reads.append((chat_id, after_id))
        if self.fail_reads:
            raise StoreError("database unreachable")
        return await self.inner.messages_after(chat_id, after_id)


async def running_chat(store: Store, first: str = "hello") -> tuple[uuid.UUID, Message, Lease]:
    """A fresh chat acquired by a fresh worker: (chat id, first message, the run's lease)."""
    chat, message = await store.create_chat(uuid.uuid4(), "a chat", (TextPart(first),))
    return chat.id, message, await acquire_lease(store, chat.id, uuid.uuid4())


async def persist(
    store: Store, lease: Lease, *texts: str, role: Role = Role.ASSISTANT
) -> list[Message]:
    return await store.persist_step(lease, [NewMessage(role, (TextPart(t),)) for t in texts])


def part(chat_id: uuid.UUID, text: str) -> MessagePartEvent:
    return MessagePartEvent(chat_id, Role.ASSISTANT, TextPart(text))


async def receive(sub: StreamSubscription) -> StreamEvent:
    """The next event other than the snapshot's end marker (tested on its own below)."""
    while True:
        ev = await sub.receive()
        if not isinstance(ev, SnapshotEndEvent):
            return ev


async def take(sub: StreamSubscription, n: int) -> list[StreamEvent]:
    with trio.fail_after(TIMEOUT):
        return [await receive(sub) for _ in range(n)]


async def until(sub: StreamSubscription, stop: Callable[[StreamEvent], bool]) -> list[StreamEvent]:
    """Events up to and including the first one matching `stop`."""
    out: list[StreamEvent] = []
    with trio.fail_after(TIMEOUT):
        while True:
            ev = await receive(sub)
            out.append(ev)
            if stop(ev):
                return out


def is_sentinel(ev: StreamEvent) -> bool:
    return isinstance(ev, StatusEvent) and ev.status is ChatStatus.ERROR


async def sentinel(streams: ChatStreams, chat_id: uuid.UUID) -> None:
    """A marker event: everything published before it arrives before it."""
    await streams.publish_status(chat_id, ChatStatus.ERROR)


def message_ids(events: Sequence[StreamEvent]) -> list[int]:
    return [e.message.id for e in events if isinstance(e, MessageEvent)]


def reads(store: Store) -> int:
    return store.statement_counts().get(READS, 0)


# -- same replica ---------------------------------------------------------------------


async def test_message_delivered_locally_is_not_read_from_the_database(
    backend: tuple[Store, PubSub],
) -> None:
    store, pubsub = backend
    streams = ChatStreams(store, pubsub)
    chat_id, first, lease = await running_chat(store)
    streams.start_turn(chat_id)
    async with streams.subscribe(chat_id, 0) as sub:
        snapshot = await until(sub, lambda e: isinstance(e, MessageEvent))
        assert message_ids(snapshot) == [first.id]
        before = reads(store)
        msgs = await persist(store, lease, "one", "two", "three")
        streams.step_persisted(chat_id)
        await streams.publish_messages(msgs)
        await sentinel(streams, chat_id)
        live = await until(sub, is_sentinel)
        assert message_ids(live) == [m.id for m in msgs]
        assert reads(store) == before
        stats = streams.statistics()
        assert stats.db_catchup_reads == 0
        assert stats.db_catchup_reads_per_chat == {chat_id: 0}
        assert stats.cache_hits >= 1
        assert sub.cursor == msgs[-1].id


async def test_cached_but_undelivered_messages_are_served_from_the_cache() -> None:
    store = SpyStore(MemoryStore())
    streams = ChatStreams(store, MemoryPubSub(), StreamConfig(notify_carries_messages=False))
    chat_id, first, lease = await running_chat(store)
    streams.start_turn(chat_id)
    async with streams.subscribe(chat_id, first.id) as sub:
        assert isinstance((await take(sub, 1))[0], StatusEvent)
        store.reads.clear()
        # Both are cached before the subscriber handles the first notify: it gets both
        # from the cache at once and skips the second notify.
        msgs = await persist(store, lease, "a", "b")
        await streams.publish_messages(msgs)
        await sentinel(streams, chat_id)
        live = await until(sub, is_sentinel)
    assert message_ids(live) == [m.id for m in msgs]
    assert store.reads == []
    stats = streams.statistics()
    assert stats.cache_hits == 1
    assert stats.db_catchup_reads == 0


async def test_an_announced_message_is_cached_at_once_unless_a_publish_is_in_flight() -> None:
    store = SpyStore(MemoryStore())
    streams = ChatStreams(store, MemoryPubSub(), StreamConfig(notify_carries_messages=False))
    chat_id, _first, lease = await running_chat(store)
    streams.start_turn(chat_id)
    (a, b) = await persist(store, lease, "a", "b")
    assert streams.cache_announced(a)
    state = streams._chats[chat_id]
    assert state.cache_ids == [a.id]
    async with state.lock:  # a publish of the chat in flight: the caller must wait
        assert not streams.cache_announced(b)
    assert state.cache_ids == [a.id]
    assert streams.cache_announced(b)
    assert state.cache_ids == [a.id, b.id]
    assert streams.statistics().notifies_in_transaction == 2


async def test_cache_miss_reads_the_database_after_the_cursor() -> None:
    store = SpyStore(MemoryStore())
    config = StreamConfig(durable_cache_size=2, notify_carries_messages=False)
    streams = ChatStreams(store, MemoryPubSub(), config)
    chat_id, first, lease = await running_chat(store)
    streams.start_turn(chat_id)
    async with streams.subscribe(chat_id, first.id) as sub:
        await take(sub, 1)  # status
        store.reads.clear()
        msgs = await persist(store, lease, "a", "b", "c", "d")
        await streams.publish_messages(msgs)  # evicts a and b: watermark = b
        assert streams.chat_statistics(chat_id).watermark == msgs[1].id  # type: ignore[union-attr]
        await sentinel(streams, chat_id)
        live = await until(sub, is_sentinel)
    assert message_ids(live) == [m.id for m in msgs]
    assert store.reads == [(chat_id, first.id)]
    assert streams.statistics().db_catchup_reads == 1


async def test_message_published_by_another_replica_reads_after_the_cursor() -> None:
    store = SpyStore(MemoryStore())
    pubsub = MemoryPubSub()
    config = StreamConfig(notify_carries_messages=False)
    a, b = ChatStreams(store, pubsub, config), ChatStreams(store, pubsub, config)
    chat_id, first, lease = await running_chat(store)
    a.start_turn(chat_id)
    async with b.subscribe(chat_id, first.id) as sub:
        await take(sub, 1)
        store.reads.clear()
        msgs = await persist(store, lease, "a")
        await a.publish_messages(msgs)
        await sentinel(a, chat_id)
        live = await until(sub, is_sentinel)
        assert b.catchup_reads(chat_id) == 1 == b.chat_statistics(chat_id).db_catchup_reads  # type: ignore[union-attr]
    assert message_ids(live) == [msgs[0].id]
    assert store.reads == [(chat_id, first.id)]
    assert b.statistics().db_catchup_reads == 1
    assert b.catchup_reads(uuid.uuid4()) is None


async def test_edit_full_refresh_rereads_from_zero() -> None:
    store = SpyStore(MemoryStore())
    streams = ChatStreams(store, MemoryPubSub())
    chat_id, first, lease = await running_chat(store)
    streams.start_turn(chat_id)
    async with streams.subscribe(chat_id, 0) as sub:
        await take(sub, 2)  # status, first
        msgs = await persist(store, lease, "answer")
        user = await persist(store, lease, "second question", role=Role.USER)
        await streams.publish_messages(msgs + user)
        await until(sub, lambda e: message_ids([e]) == [user[0].id])
        streams.end_turn(chat_id)
        store.reads.clear()
        edited = await store.edit_message(chat_id, user[0].id, (TextPart("better question"),))
        await streams.publish_edited_message(edited.message)
        await sentinel(streams, chat_id)
        live = await until(sub, is_sentinel)
        assert store.reads == [(chat_id, 0)]
        # The whole edited history again, from the first message.
        assert message_ids(live) == [first.id, msgs[0].id, edited.message.id]
        assert sub.cursor == edited.message.id
        stats = streams.chat_statistics(chat_id)
        assert stats is not None
        assert stats.cached_messages == 1
        assert stats.watermark == 0


# -- snapshot end and repeated state -----------------------------------------------------


async def test_the_snapshot_ends_with_one_marker_before_live_events(
    backend: tuple[Store, PubSub],
) -> None:
    store, pubsub = backend
    streams = ChatStreams(store, pubsub)
    chat_id, first, lease = await running_chat(store)
    streams.start_turn(chat_id)
    streams.publish_part(part(chat_id, "partial"))
    (answer,) = await persist(store, lease, "answer")
    queued = (await store.send_message(chat_id, (TextPart("later"),), max_queued=20)).queue
    async with streams.subscribe(chat_id, 0) as sub:
        with trio.fail_after(TIMEOUT):
            snapshot = [await sub.receive() for _ in range(6)]
        assert [type(e) for e in snapshot] == [
            StatusEvent,
            MessagePartEvent,
            MessageEvent,
            MessageEvent,
            QueueUpdateEvent,
            SnapshotEndEvent,
        ]
        assert snapshot[-1] == SnapshotEndEvent(chat_id, answer.id)
        assert message_ids(snapshot) == [first.id, answer.id]
        (live,) = await persist(store, lease, "live")
        await streams.publish_message(live)
        await sentinel(streams, chat_id)
        rest = await until(sub, is_sentinel)
    assert message_ids(rest) == [live.id]
    assert not any(isinstance(e, SnapshotEndEvent) for e in rest)
    assert queued


async def test_the_marker_follows_a_failed_snapshot_too() -> None:
    store = SpyStore(MemoryStore())
    streams = ChatStreams(store, MemoryPubSub())
    chat_id, _, _ = await running_chat(store)
    store.fail_reads = True
    async with streams.subscribe(chat_id, 0) as sub:
        got = await take(sub, 1)
        assert isinstance(got[0], ErrorEvent) and got[0].error.kind == "snapshot"
        assert sub.receive_nowait() == SnapshotEndEvent(chat_id, 0)


async def test_a_state_event_repeating_what_the_subscriber_knows_is_not_delivered(
    backend: tuple[Store, PubSub],
) -> None:
    store, pubsub = backend
    streams = ChatStreams(store, pubsub)
    chat_id, first, lease = await running_chat(store)
    worker = lease.worker_id
    async with streams.subscribe(chat_id, first.id) as sub:
        got = await take(sub, 1)
        assert got == [StatusEvent(chat_id, ChatStatus.RUNNING, worker)]
        # What the snapshot said already: not news.
        await streams.publish_status(chat_id, ChatStatus.RUNNING, worker)
        await streams.publish_queue_update(chat_id, ())
        # Changes, each once however often announced.
        await streams.publish_status(chat_id, ChatStatus.WAITING)
        await streams.publish_status(chat_id, ChatStatus.WAITING)
        queued = (await store.send_message(chat_id, (TextPart("q"),), max_queued=20)).queue
        await streams.publish_queue_update(chat_id, queued)
        await streams.publish_queue_update(chat_id, queued)
        await streams.publish_queue_update(chat_id, ())
        await streams.publish_status(chat_id, ChatStatus.RUNNING, worker)
        await sentinel(streams, chat_id)
        got = await until(sub, is_sentinel)
    assert got == [
        StatusEvent(chat_id, ChatStatus.WAITING),
        QueueUpdateEvent(chat_id, queued),
        QueueUpdateEvent(chat_id, ()),
        StatusEvent(chat_id, ChatStatus.RUNNING, worker),
        StatusEvent(chat_id, ChatStatus.ERROR),
    ]


async def test_a_change_published_while_the_snapshot_is_read_arrives_once() -> None:
    """Registered first, read second: a status published in between is in both."""
    store = MemoryStore()
    streams = ChatStreams(store, None)
    chat_id, first, lease = await running_chat(store)

    class PublishingStore(SpyStore):
        async def get_chat(self, chat_id: uuid.UUID) -> Any:
            await streams.publish_status(chat_id, ChatStatus.RUNNING, lease.worker_id)
            return await self.inner.get_chat(chat_id)

    streams._store = PublishingStore(store)  # type: ignore[assignment]
    async with streams.subscribe(chat_id, first.id) as sub:
        await sentinel(streams, chat_id)
        got = await until(sub, is_sentinel)
    assert got == [
        StatusEvent(chat_id, ChatStatus.RUNNING, lease.worker_id),
        StatusEvent(chat_id, ChatStatus.ERROR),
    ]


# -- control events ---------------------------------------------------------------------


async def test_retry_reaches_each_subscriber_once_on_both_replicas(
    backend: tuple[Store, PubSub],
) -> None:
    store, pubsub = backend
    a, b = ChatStreams(store, pubsub), ChatStreams(store, pubsub)
    chat_id, _, _ = await running_chat(store)
    a.start_turn(chat_id)
    retry = RetryPayload(
        attempt=2, delay_s=4.0, error="overloaded", kind="overloaded", status_code=529
    )
    async with a.subscribe(chat_id, 0) as sub_a, b.subscribe(chat_id, 0) as sub_b:
        for sub in (sub_a, sub_b):
            await take(sub, 2)  # status, first message
        a.publish_part(part(chat_id, "partial"))
        await a.retry(chat_id, retry)
        await sentinel(a, chat_id)
        got_a = await until(sub_a, is_sentinel)
        got_b = await until(sub_b, is_sentinel)
    assert [e for e in got_a if isinstance(e, RetryEvent)] == [RetryEvent(chat_id, retry)]
    assert [e for e in got_b if isinstance(e, RetryEvent)] == [RetryEvent(chat_id, retry)]
    assert len(got_a) == 3  # part, retry, sentinel: no local duplicate
    assert len(got_b) == 2  # parts stay on their replica
    assert a.chat_statistics(chat_id).buffered_parts == 0  # type: ignore[union-attr]


async def test_structured_error_payload_is_preferred_over_the_legacy_string() -> None:
    pubsub = MemoryPubSub()
    streams = ChatStreams(MemoryStore(), pubsub)
    chat_id, _, _ = await running_chat(streams._store)
    structured = ErrorPayload("rate limited", kind="rate_limit", provider="openai", status_code=429)
    async with streams.subscribe(chat_id, 0) as sub:
        await take(sub, 2)
        raw = NotifyPayload(error_payload=structured, error="legacy text")
        await pubsub.publish(stream_channel(chat_id), raw.encode())
        await pubsub.publish(stream_channel(chat_id), NotifyPayload(error="only legacy").encode())
        await streams.publish_error(chat_id, structured)
        got = await take(sub, 3)
    assert got == [
        ErrorEvent(chat_id, structured),
        ErrorEvent(chat_id, ErrorPayload("only legacy")),
        ErrorEvent(chat_id, structured),
    ]


async def test_notify_fields_are_handled_in_order_and_malformed_ones_skipped() -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    streams = ChatStreams(store, pubsub)
    chat_id, first, lease = await running_chat(store)
    async with streams.subscribe(chat_id, first.id) as sub:
        await take(sub, 1)
        (msg,) = await persist(store, lease, "x")
        queued = (await store.send_message(chat_id, (TextPart("later"),), max_queued=20)).queue
        channel = stream_channel(chat_id)
        await pubsub.publish(channel, "{not json")
        await pubsub.publish(channel, '{"after_message_id": "seven"}')
        everything = NotifyPayload(
            after_message_id=msg.id - 1,
            status=ChatStatus.RUNNING,
            retry=RetryPayload(1, 1.0, "boom"),
            error="bad",
            queue_update=queued,
        )
        await pubsub.publish(channel, everything.encode())
        got = await take(sub, 5)
    assert [type(e) for e in got] == [
        MessageEvent,
        StatusEvent,
        RetryEvent,
        ErrorEvent,
        QueueUpdateEvent,
    ]
    assert streams.statistics().notify_decode_errors == 2


# -- cross replica ----------------------------------------------------------------------


async def test_carried_message_skips_the_database_on_another_replica(
    backend: tuple[Store, PubSub],
) -> None:
    store, pubsub = backend
    a, b = ChatStreams(store, pubsub), ChatStreams(store, pubsub)
    chat_id, first, lease = await running_chat(store)
    a.start_turn(chat_id)
    async with b.subscribe(chat_id, first.id) as sub:
        await take(sub, 1)
        before = reads(store)
        msgs = await persist(store, lease, "one", "two")
        msgs += await persist(store, lease, "three")
        await a.publish_messages(msgs)
        await sentinel(a, chat_id)
        live = await until(sub, is_sentinel)
    assert message_ids(live) == [m.id for m in msgs]
    assert reads(store) == before
    assert b.statistics().carried_hits == 3


async def test_baseline_reads_the_database_once_per_message_on_another_replica(
    backend: tuple[Store, PubSub],
) -> None:
    store, pubsub = backend
    config = StreamConfig(notify_carries_messages=False)
    baseline = Strategies(catch_up=CatchUp.DATABASE)
    a = ChatStreams(store, pubsub, config, strategies=baseline)
    b = ChatStreams(store, pubsub, config, strategies=baseline)
    chat_id, first, lease = await running_chat(store)
    a.start_turn(chat_id)
    async with b.subscribe(chat_id, first.id) as sub:
        await take(sub, 1)
        for text in ("one", "two"):
            (m,) = await persist(store, lease, text)
            await a.publish_message(m)
            assert message_ids(await take(sub, 1)) == [m.id]
    assert b.statistics().db_catchup_reads == 2


async def test_carried_message_after_a_gap_falls_back_to_the_database() -> None:
    store = SpyStore(MemoryStore())
    pubsub = MemoryPubSub()
    a, b = ChatStreams(store, pubsub), ChatStreams(store, pubsub)
    chat_id, first, lease = await running_chat(store)
    _, _, other_lease = await running_chat(store)
    async with b.subscribe(chat_id, first.id) as sub:
        await take(sub, 1)
        store.reads.clear()
        # No turn on `a`: the predecessor is unknown, and another chat's message took
        # the id in between, so the carried message cannot prove there is no gap.
        (m1,) = await persist(store, lease, "one")
        await persist(store, other_lease, "elsewhere")
        (m2,) = await persist(store, lease, "two")
        await a.publish_message(m2)
        assert message_ids(await take(sub, 2)) == [m1.id, m2.id]
        assert store.reads == [(chat_id, first.id)]
        # During a turn the predecessor is known, ids interleaved or not.
        a.start_turn(chat_id)
        (m3,) = await persist(store, lease, "three")
        await a.publish_message(m3)
        await persist(store, other_lease, "elsewhere again")
        (m4,) = await persist(store, lease, "four")
        await a.publish_message(m4)
        assert message_ids(await take(sub, 2)) == [m3.id, m4.id]
        assert store.reads == [(chat_id, first.id)]
    assert b.statistics().carried_hits == 2


async def acquire_lease(store: Store, chat_id: uuid.UUID, worker: uuid.UUID) -> Lease:
    """Acquire until `worker` holds the chat; the lease of that run."""
    while True:
        got = await store.acquire(worker, 100)
        for chat in got:
            if chat.id == chat_id:
                return Lease.of(chat)
        assert got, "the chat was never acquired"


async def test_store_predecessor_lets_every_message_skip_the_database(
    backend: tuple[Store, PubSub],
) -> None:
    """Messages published outside a turn (sent, promoted) and a turn's first message
    carry their predecessor from the store: no catch-up read on either replica."""
    store, pubsub = backend
    a, b = ChatStreams(store, pubsub), ChatStreams(store, pubsub)
    _, _, other_lease = await running_chat(store)
    chat_id, first, lease = await running_chat(store)
    async with a.subscribe(chat_id, 0) as local, b.subscribe(chat_id, 0) as remote:
        for sub in (local, remote):
            assert message_ids(await until(sub, lambda e: isinstance(e, MessageEvent))) == [
                first.id
            ]
        before = reads(store)
        published: list[Message] = []

        async def publish(m: Message) -> None:
            # Another chat's insert in between: the id never follows the cursor.
            await persist(store, other_lease, "elsewhere")
            await a.publish_message(m)
            published.append(m)

        for turn in ("one", "two"):
            a.start_turn(chat_id)
            (answer,) = await persist(store, lease, f"answer {turn}")
            await publish(answer)  # the turn's first message
            queued = await store.send_message(chat_id, (TextPart(f"q {turn}"),), max_queued=5)
            assert queued.queued is not None
            a.end_turn(chat_id)
            done = await store.finish_turn(lease, TurnOutcome.DONE)
            assert done.promoted is not None
            await publish(done.promoted)  # promoted outside a turn
            lease = await acquire_lease(store, chat_id, lease.worker_id)
            a.start_turn(chat_id)
            (reply,) = await persist(store, lease, f"reply {turn}")
            await publish(reply)
            a.end_turn(chat_id)
            assert (await store.finish_turn(lease, TurnOutcome.DONE)).promoted is None
            sent = await store.send_message(chat_id, (TextPart(f"u {turn}"),), max_queued=5)
            assert sent.message is not None
            await publish(sent.message)  # sent outside a turn
            lease = await acquire_lease(store, chat_id, lease.worker_id)
        await sentinel(a, chat_id)
        for sub in (local, remote):
            assert message_ids(await until(sub, is_sentinel)) == [m.id for m in published]
    assert reads(store) == before
    assert a.statistics().db_catchup_reads == 0
    assert b.statistics().db_catchup_reads == 0
    assert b.statistics().carried_hits == len(published)


# -- subscribe ----------------------------------------------------------------------------


async def test_snapshot_starts_with_status_then_parts_messages_and_queue() -> None:
    store = MemoryStore()
    streams = ChatStreams(store, MemoryPubSub())
    chat_id, first, lease = await running_chat(store)
    streams.start_turn(chat_id)
    await streams.publish_status(chat_id, ChatStatus.RUNNING, lease.worker_id)
    streams.publish_part(part(chat_id, "thinking"))
    await store.send_message(chat_id, (TextPart("queued"),), max_queued=20)
    async with streams.subscribe(chat_id, 0) as sub:
        got = await take(sub, 4)
    assert got[0] == StatusEvent(chat_id, ChatStatus.RUNNING, lease.worker_id)
    assert got[1] == part(chat_id, "thinking")
    assert message_ids(got[2:3]) == [first.id]
    assert isinstance(got[3], QueueUpdateEvent) and len(got[3].queued) == 1


async def test_after_message_id_filters_the_snapshot() -> None:
    store = MemoryStore()
    streams = ChatStreams(store, MemoryPubSub())
    chat_id, _, lease = await running_chat(store)
    msgs = await persist(store, lease, "a", "b", "c")
    async with streams.subscribe(chat_id, msgs[0].id) as sub:
        await sentinel(streams, chat_id)
        got = await until(sub, is_sentinel)
    assert message_ids(got) == [msgs[1].id, msgs[2].id]
    assert isinstance(got[0], StatusEvent)


async def test_failed_snapshot_read_yields_an_error_event() -> None:
    store = SpyStore(MemoryStore())
    streams = ChatStreams(store, MemoryPubSub())
    chat_id, _, _ = await running_chat(store)
    store.fail_reads = True
    async with streams.subscribe(chat_id, 0) as sub:
        (ev,) = await take(sub, 1)
    assert isinstance(ev, ErrorEvent)
    assert ev.error.message == "failed to load initial snapshot"


async def test_without_pubsub_no_duplicate_parts_and_every_event_forwarded() -> None:
    store = MemoryStore()
    streams = ChatStreams(store, None)
    chat_id, first, lease = await running_chat(store)
    streams.start_turn(chat_id)
    streams.publish_part(part(chat_id, "p1"))
    streams.publish_part(part(chat_id, "p2"))
    async with streams.subscribe(chat_id, 0) as sub:
        streams.publish_part(part(chat_id, "p3"))
        (msg,) = await persist(store, lease, "done")
        await streams.publish_message(msg)
        await streams.publish_message(msg)  # a duplicate publish is not delivered twice
        await streams.retry(chat_id, RetryPayload(1, 1.0, "boom"))
        await sentinel(streams, chat_id)
        got = await until(sub, is_sentinel)
    texts = [e.part.text for e in got if isinstance(e, MessagePartEvent)]  # type: ignore[union-attr]
    assert texts == ["p1", "p2", "p3"]
    assert message_ids(got) == [first.id, msg.id]
    assert sum(isinstance(e, RetryEvent) for e in got) == 1
    assert streams.statistics().db_catchup_reads == 0


async def test_state_is_removed_when_idle() -> None:
    streams = ChatStreams(MemoryStore(), MemoryPubSub())
    chat_id, _, _ = await running_chat(streams._store)
    assert not streams.has_state(chat_id)
    streams.publish_part(part(chat_id, "nobody listens"))
    assert not streams.has_state(chat_id)
    await streams.publish_status(chat_id, ChatStatus.RUNNING)
    assert not streams.has_state(chat_id)
    async with streams.subscribe(chat_id, 0):
        assert streams.has_state(chat_id)
        streams.start_turn(chat_id)
    assert streams.has_state(chat_id)  # the turn still runs
    streams.end_turn(chat_id)
    assert not streams.has_state(chat_id)
    assert streams.statistics().active_chats == 0


# -- failures and resyncs -------------------------------------------------------------------


async def test_pubsub_failure_emits_one_error_and_ends_the_subscription() -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    streams = ChatStreams(store, pubsub)
    chat_id, first, _ = await running_chat(store)
    async with streams.subscribe(chat_id, 0) as sub:
        await take(sub, 2)
        assert pubsub.break_subscriptions() == 1
        with trio.fail_after(TIMEOUT):
            rest = [ev async for ev in sub if not isinstance(ev, SnapshotEndEvent)]
    assert len(rest) == 1
    assert isinstance(rest[0], ErrorEvent) and rest[0].error.kind == "pubsub"
    assert sub.cursor == first.id  # the client re-subscribes from here


async def test_a_subscription_the_pubsub_refuses_delivers_the_failure_and_ends() -> None:
    """Subscribing to the chat's channel fails: not raised, the subscription delivers
    one `pubsub` error (no snapshot) and ends."""

    class RefusingPubSub(MemoryPubSub):
        @asynccontextmanager
        async def subscribe(self, channel: str) -> AsyncIterator[Any]:
            await trio.lowlevel.checkpoint()
            raise PubSubError("cannot listen")
            yield  # pragma: no cover - makes this a generator

    store = MemoryStore()
    streams = ChatStreams(store, RefusingPubSub())
    chat_id, _, _ = await running_chat(store)
    async with streams.subscribe(chat_id, 0) as sub:
        with trio.fail_after(TIMEOUT):
            events = [ev async for ev in sub]
    assert len(events) == 1
    assert isinstance(events[0], ErrorEvent) and events[0].error.kind == "pubsub"
    assert "cannot listen" in events[0].error.message


async def test_an_exception_of_the_block_leaves_the_subscription_as_itself(
    backend: tuple[Store, PubSub],
) -> None:
    """The subscription's pump runs in a nursery of its own; what the caller's block
    raises still leaves as itself, not in that nursery's exception group."""

    class Boom(Exception):
        pass

    store, pubsub = backend
    streams = ChatStreams(store, pubsub)
    chat_id, _, _ = await running_chat(store)
    with pytest.raises(Boom):
        async with streams.subscribe(chat_id, 0) as sub:
            await take(sub, 2)
            raise Boom


async def test_pubsub_resync_catches_up_from_the_database() -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    streams = ChatStreams(store, pubsub)
    chat_id, first, lease = await running_chat(store)
    async with streams.subscribe(chat_id, first.id) as sub:
        await take(sub, 1)
        # Persisted and queued, but their notifies were lost with the connection.
        (lost,) = await persist(store, lease, "lost")
        queued = (await store.send_message(chat_id, (TextPart("q"),), max_queued=20)).queue
        assert pubsub.force_resync() == 1
        got = await take(sub, 2)
        await sentinel(streams, chat_id)
        got += await until(sub, is_sentinel)
    assert message_ids(got) == [lost.id]
    # The queue changed while notifies were missed; the status did not, so it is not
    # repeated: the next status is the sentinel.
    assert got[1] == QueueUpdateEvent(chat_id, queued)
    assert len(got) == 3 and is_sentinel(got[2])
    assert streams.statistics().pubsub_resyncs == 1


@pytest.mark.parametrize("with_pubsub", [True, False], ids=["pubsub", "local"])
async def test_a_resync_notify_makes_every_subscriber_read_the_chat_again(
    with_pubsub: bool,
) -> None:
    """A replica that could not confirm a write (it may have landed unannounced) publishes
    a resync: subscribers, here on another replica's streams too, read after their cursor
    and receive what changed: the answer and the status (the queue did not change, so
    no queue update repeats it)."""
    store = MemoryStore()
    pubsub = MemoryPubSub() if with_pubsub else None
    writer = ChatStreams(store, pubsub)
    readers = [writer, ChatStreams(store, pubsub)] if with_pubsub else [writer]
    chat_id, first, lease = await running_chat(store)
    async with contextlib.AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(s.subscribe(chat_id, first.id)) for s in readers]
        for sub in subs:
            await take(sub, 1)
        # Landed, never announced (the finish's acknowledgement was lost).
        (unannounced,) = await persist(store, lease, "unannounced")
        await store.finish_turn(lease, TurnOutcome.DONE)
        await writer.publish_resync(chat_id)
        for sub in subs:
            got = await take(sub, 2)
            assert message_ids(got) == [unannounced.id]
            assert isinstance(got[1], StatusEvent) and got[1].status is ChatStatus.WAITING


async def test_subscriber_overflow_of_durable_events_resyncs_instead_of_losing_them() -> None:
    store = SpyStore(MemoryStore())
    config = StreamConfig(subscriber_queue_size=3)
    streams = ChatStreams(store, MemoryPubSub(), config)
    chat_id, first, lease = await running_chat(store)
    streams.start_turn(chat_id)
    async with streams.subscribe(chat_id, first.id) as sub:
        await take(sub, 1)
        msgs = []
        for i in range(10):
            msgs += await persist(store, lease, f"m{i}")
            await streams.publish_message(msgs[-1])
            streams.publish_part(part(chat_id, f"p{i}"))
        await trio.testing.wait_all_tasks_blocked()
        # Control events dropped with the overflow are re-read from the store (status
        # and queue): read up to the last message, then up to one more message published
        # after everything (stored: an overflow cannot lose it), and check that nothing
        # is delivered twice.
        got = await until(sub, lambda e: message_ids([e]) == [msgs[-1].id])
        (last,) = await persist(store, lease, "last")
        await streams.publish_message(last)
        got += await until(sub, lambda e: message_ids([e]) == [last.id])
    assert message_ids(got) == [m.id for m in [*msgs, last]]
    stats = streams.statistics()
    assert stats.overflow_resyncs >= 1
    assert stats.dropped_subscriber > 0


# -- drop warnings -------------------------------------------------------------------------


def drop_warnings(caplog: pytest.LogCaptureFixture, kind: str) -> list[int]:
    return [
        r.dropped_count  # type: ignore[attr-defined]
        for r in caplog.records
        if r.levelno == logging.WARNING and getattr(r, "drop_kind", None) == kind
    ]


async def test_drop_warnings_are_rate_limited_per_kind(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="chatd_trio.streams")
    config = StreamConfig(buffer_limit=5, subscriber_queue_size=5, drop_warn_interval=10.0)
    streams = ChatStreams(MemoryStore(), None, config)
    chat_id, _, _ = await running_chat(streams._store)
    streams.start_turn(chat_id)
    async with streams.subscribe(chat_id, 0) as sub:
        for i in range(55):  # 5 fit in the buffer and in the queue, 50 dropped each
            streams.publish_part(part(chat_id, str(i)))
        assert drop_warnings(caplog, "buffer_full") == [1]
        assert drop_warnings(caplog, "subscriber_full") == [1]
        records = [r for r in caplog.records if hasattr(r, "drop_kind")]
        assert all(r.chat_id == str(chat_id) for r in records)  # type: ignore[attr-defined]

        autojump_clock.jump(11)
        streams.publish_part(part(chat_id, "late"))
        assert drop_warnings(caplog, "buffer_full") == [1, 50]
        assert drop_warnings(caplog, "subscriber_full") == [1, 50]

        streams.step_persisted(chat_id)  # resets the counters: the next drop warns at once
        for i in range(6):
            streams.publish_part(part(chat_id, f"after {i}"))
        assert drop_warnings(caplog, "buffer_full") == [1, 50, 1]
        assert drop_warnings(caplog, "subscriber_full") == [1, 50, 1]
        stats = streams.statistics()
        assert stats.dropped_buffer == 52
        assert stats.dropped_subscriber == 57
        assert len(await take(sub, 6)) == 6  # status, first message... then the queue
