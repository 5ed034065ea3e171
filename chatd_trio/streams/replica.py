"""`ChatStreams`: all chat streams of one replica (`chatd_trio.streams`).

Publishing (locally, or through the chat's channel), subscribing (the snapshot,
then the pump from the pubsub), the per-chat state's lifecycle around turns,
drop accounting and the replica's stream counters.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio

from chatd_trio._groups import unwrapped
from chatd_trio.config import StreamConfig
from chatd_trio.domain import (
    ChatStatus,
    ErrorEvent,
    ErrorPayload,
    EventType,
    Message,
    MessageEvent,
    MessagePartEvent,
    NotifyPayload,
    QueuedMessage,
    QueueUpdateEvent,
    RetryEvent,
    RetryPayload,
    StatusEvent,
    StreamEvent,
    owner_channel,
    owner_payload,
    stream_channel,
)
from chatd_trio.errors import DecodeError, PayloadTooLarge, PubSubError
from chatd_trio.lifecycle import Event
from chatd_trio.pubsub.base import Delivery, HandlerDelivery, PubSub, Resync
from chatd_trio.pubsub.base import Subscription as PubSubSubscription
from chatd_trio.store.base import Applied, Store
from chatd_trio.strategies import Announce, Strategies
from chatd_trio.streams.announce import OwnerNotice, StreamAnnouncer, change_notices
from chatd_trio.streams.state import (
    CacheEntry,
    ChatStreamState,
    Failure,
    Inbox,
    Item,
    LocalRefresh,
    NotifyItem,
    ResyncMarker,
    Subscriber,
)
from chatd_trio.streams.subscription import PUBSUB_ERROR, StreamSubscription

__all__ = [
    "DROP_BUFFER_FULL",
    "DROP_SUBSCRIBER_FULL",
    "ChatStreamStatistics",
    "ChatStreams",
    "StreamStatistics",
]

logger = logging.getLogger(__name__)

DROP_BUFFER_FULL = "buffer_full"
DROP_SUBSCRIBER_FULL = "subscriber_full"


# ---------------------------------------------------------------------------
# statistics


@dataclass(frozen=True)
class ChatStreamStatistics:
    """Counters of one live chat stream (since it was created)."""

    chat_id: uuid.UUID
    subscribers: int
    turn_running: bool
    buffered_parts: int
    cached_messages: int
    watermark: int
    db_catchup_reads: int
    cache_hits: int
    carried_hits: int
    dropped_buffer: int
    dropped_subscriber: int


@dataclass(frozen=True)
class StreamStatistics:
    """Counters of one replica's streams since it was created.

    `db_catchup_reads_per_chat` and `chats` cover live chat streams only, so a
    long-running replica does not keep a record per chat it ever served.
    """

    events_published: dict[EventType, int]
    dropped_buffer: int
    dropped_subscriber: int
    overflow_resyncs: int
    pubsub_resyncs: int
    snapshot_reads: int
    db_catchup_reads: int
    db_catchup_reads_per_chat: dict[uuid.UUID, int]
    cache_hits: int
    carried_hits: int
    notify_decode_errors: int
    notify_publish_failures: int
    # Durable events whose notify the store sent inside the inserting transaction.
    notifies_in_transaction: int
    active_chats: int
    chats: tuple[ChatStreamStatistics, ...]


class ChatStreams:
    """All chat streams of one replica.

    `pubsub=None` is the single-process mode: every event is delivered locally.
    `strategies` says where catch-up reads (`catch_up`) and who sends message
    notifies (`announce`); the defaults are the optimised ways.
    """

    def __init__(
        self,
        store: Store,
        pubsub: PubSub | None = None,
        config: StreamConfig | None = None,
        *,
        strategies: Strategies | None = None,
    ) -> None:
        self._store = store
        self._pubsub = pubsub
        self._config = config or StreamConfig()
        strategies = strategies or Strategies()
        self._catch_up = strategies.catch_up
        self._chats: dict[uuid.UUID, ChatStreamState] = {}
        self._published: Counter[EventType] = Counter()
        self._dropped_buffer = 0
        self._dropped_subscriber = 0
        self._overflow_resyncs = 0
        self._pubsub_resyncs = 0
        self._snapshot_reads = 0
        self._db_catchup_reads = 0
        self._cache_hits = 0
        self._carried_hits = 0
        self._decode_errors = 0
        self._publish_failures = 0
        self._announced = 0
        announces = (
            pubsub is not None
            and strategies.announce is Announce.IN_TRANSACTION
            and store.announces_to(pubsub)
        )
        self._announcer = StreamAnnouncer(self) if announces else None

    @property
    def config(self) -> StreamConfig:
        return self._config

    @property
    def announcer(self) -> StreamAnnouncer | None:
        """What to pass as `announce=` to the store's writing operations, or None.

        Not None when the store sends notifies to this replica's pubsub inside the
        writing transaction; the messages are then published with `announced=True`,
        and the status, queue and owner events of the write are not published again.
        """
        return self._announcer

    def _count(
        self, kind: EventType | None = None, *, announced: int = 0, failures: int = 0
    ) -> None:
        if kind is not None:
            self._published[kind] += 1
        self._announced += announced
        self._publish_failures += failures

    def _announce(
        self, messages: Sequence[Message], *, refresh: bool = False
    ) -> list[tuple[str, str]]:
        # Sealed like every publish: the store sends these with its own NOTIFY.
        assert self._pubsub is not None, "announcer is None without a pubsub"
        seal = self._pubsub.seal
        if refresh:
            chats = {m.chat_id for m in messages}
            payload = NotifyPayload(full_refresh=True).encode()
            return [(stream_channel(c), seal(stream_channel(c), payload)) for c in sorted(chats)]
        notifies: list[tuple[str, str]] = []
        for m in messages:
            if m.user_visible and not m.deleted:
                channel = stream_channel(m.chat_id)
                notifies.append(
                    (channel, seal(channel, self._message_notify(m, m.prev_id).encode()))
                )
        return notifies

    def _control(
        self, chat_id: uuid.UUID, payload: NotifyPayload, kind: EventType
    ) -> list[tuple[str, str]]:
        assert self._pubsub is not None, "announcer is None without a pubsub"
        self._count(kind)
        if not self._fits(payload):
            # Too large for a NOTIFY (a long queue): delivered here only, as a failed
            # publish would be; other replicas learn it at their next catch-up.
            self._count(failures=1)
            logger.warning(
                "stream notify too large; delivered locally only", extra={"chat_id": str(chat_id)}
            )
            state = self._chats.get(chat_id)
            if state is not None:
                self._publish_local(state, NotifyItem(payload))
            return []
        self._count(announced=1)
        channel = stream_channel(chat_id)
        return [(channel, self._pubsub.seal(channel, payload.encode()))]

    def _changes(
        self, event: Event | None, applied: Applied, error: ErrorPayload | None
    ) -> list[tuple[str, str]]:
        """The control notifies of a change (`change_notices`), sealed for the pubsub."""
        assert self._pubsub is not None, "announcer is None without a pubsub"
        chat = applied.chat
        out: list[tuple[str, str]] = []
        for notice in change_notices(event, applied, error):
            if isinstance(notice, OwnerNotice):
                channel = owner_channel(chat.owner_id)
                out.append((channel, self._pubsub.seal(channel, owner_payload(chat, notice.kind))))
            else:
                out.extend(self._control(chat.id, notice.payload, notice.kind))
        return out

    def _message_notify(self, message: Message, prev: int | None) -> NotifyPayload:
        """The notify announcing `message`: carrying it (after its known predecessor)
        when configured and small enough, else naming the id before it."""
        plain = NotifyPayload(after_message_id=message.id - 1)
        if not self._config.notify_carries_messages or self._pubsub is None:
            return plain
        after = prev if prev is not None else message.id - 1
        payload = NotifyPayload(after_message_id=after, message=message)
        return payload if self._fits(payload) else plain

    # -- state lifecycle ------------------------------------------------------------
    def _state(self, chat_id: uuid.UUID) -> ChatStreamState:
        state = self._chats.get(chat_id)
        if state is None:
            state = self._chats[chat_id] = ChatStreamState(chat_id)
        return state

    def _maybe_remove(self, state: ChatStreamState) -> None:
        if state.idle and self._chats.get(state.chat_id) is state:
            del self._chats[state.chat_id]

    def has_state(self, chat_id: uuid.UUID) -> bool:
        """Whether this replica currently holds stream state for the chat."""
        return chat_id in self._chats

    def _clear(self, state: ChatStreamState) -> None:
        state.buffer.clear()
        state.reset_drops()

    # -- lifecycle hooks (called by the server and the agent loop) -------------------
    def start_turn(self, chat_id: uuid.UUID) -> int:
        """A turn starts: buffer parts from now on. Call BEFORE publishing `running`.

        Returns the turn's generation, for `end_turn`.
        """
        state = self._state(chat_id)
        state.turn_running = True
        state.turn_gen += 1
        self._clear(state)
        return state.turn_gen

    def step_persisted(self, chat_id: uuid.UUID) -> None:
        """A step's messages are persisted: its parts are no longer in flight."""
        state = self._chats.get(chat_id)
        if state is not None:
            self._clear(state)

    async def retry(self, chat_id: uuid.UUID, payload: RetryPayload) -> None:
        """The step is retried: drop its parts, then publish the `retry` event."""
        state = self._chats.get(chat_id)
        if state is not None:
            self._clear(state)
        await self.publish_retry(chat_id, payload)

    def end_turn(self, chat_id: uuid.UUID, generation: int | None = None) -> None:
        """The turn is over: stop buffering; the state goes when nobody subscribes.

        With `generation` (from `start_turn`), only if no later turn of the chat started
        here since (a turn that lost its chat may end after its successor started).
        """
        state = self._chats.get(chat_id)
        if state is None or (generation is not None and generation != state.turn_gen):
            return
        state.turn_running = False
        self._clear(state)
        self._maybe_remove(state)

    # -- drop accounting ----------------------------------------------------------
    def _dropped(self, state: ChatStreamState, kind: str) -> None:
        if kind == DROP_BUFFER_FULL:
            warn = state.warn_buffer
            state.dropped_buffer += 1
            self._dropped_buffer += 1
        else:
            warn = state.warn_subscriber
            state.dropped_subscriber += 1
            self._dropped_subscriber += 1
        warn.pending += 1
        now = trio.current_time()
        if warn.last_warn is None or now - warn.last_warn >= self._config.drop_warn_interval:
            logger.warning(
                "chat stream dropped events",
                extra={
                    "chat_id": str(state.chat_id),
                    "drop_kind": kind,
                    "dropped_count": warn.pending,
                },
            )
            warn.pending = 0
            warn.last_warn = now

    def _deliver(self, state: ChatStreamState, sub: Subscriber, item: Item) -> None:
        """Queue one item for one subscriber without blocking."""
        if sub.inbox.offer(item):
            return
        self._dropped(state, DROP_SUBSCRIBER_FULL)
        if isinstance(item, MessagePartEvent):
            return
        # Durable or control: never lose it silently; catch up from the store instead.
        full = isinstance(item, LocalRefresh) or (
            isinstance(item, NotifyItem) and item.payload.full_refresh
        )
        if sub.pending_resync is None:
            sub.pending_resync = ResyncMarker("subscriber queue overflow", full=full)
            sub.inbox.force(sub.pending_resync)
            self._overflow_resyncs += 1
        elif full:
            sub.pending_resync.full = True

    def _publish_local(self, state: ChatStreamState, item: Item) -> None:
        for sub in tuple(state.subscribers):
            self._deliver(state, sub, item)

    # -- publishing -------------------------------------------------------------------
    def publish_part(self, event: MessagePartEvent) -> None:
        """Publish an ephemeral delta locally; buffered while a turn runs. Never blocks."""
        self._count(event.type)
        state = self._chats.get(event.chat_id)
        if state is None:
            return  # nobody listens and no turn buffers
        if state.turn_running:
            state.buffer.append(event)
            if len(state.buffer) > self._config.buffer_limit:
                state.buffer.popleft()
                self._dropped(state, DROP_BUFFER_FULL)
        self._publish_local(state, event)

    async def publish_message(self, message: Message, *, announced: bool = False) -> None:
        """Publish a persisted message: cache it, deliver locally, notify the chat channel.

        `announced`: the store already sent its notify (see `announcer`): only cache it.
        """
        if not message.user_visible or message.deleted:
            # Subscribers only ever see what `messages_after` returns.
            await trio.lowlevel.checkpoint()
            return
        async with self._locked(message.chat_id) as state:
            entry = self._cache(state, message, announced=announced)
            if announced:
                await trio.lowlevel.checkpoint()
                return
            payload = self._message_notify(message, entry.prev)
            await self._send(state, payload, MessageEvent(message.chat_id, message))

    def cache_announced(self, message: Message) -> bool:
        """`publish_message(message, announced=True)` done at once, without a scheduling
        round, when no publish of the chat is in flight (its lock is free): True. False
        when one is: the caller awaits `publish_message`, which keeps the chat's order."""
        if not message.user_visible or message.deleted:
            return True
        state = self._state(message.chat_id)
        if state.lock.locked():
            return False
        self._cache(state, message, announced=True)
        self._maybe_remove(state)
        return True

    def _cache(self, state: ChatStreamState, message: Message, *, announced: bool) -> CacheEntry:
        """Add a published message to the chat's cache and count it (and its notify, when
        the store sent it)."""
        entry = state.cache_add(message, self._config.durable_cache_size)
        self._count(MessageEvent.type, announced=int(announced))
        return entry

    async def publish_messages(self, messages: Sequence[Message]) -> None:
        """Publish several persisted messages (one step) in order."""
        for m in messages:
            await self.publish_message(m)

    async def publish_edited_message(self, message: Message, *, announced: bool = False) -> None:
        """Publish an edit: the cache becomes just this message; subscribers refresh from 0.

        `announced`: the store already sent the refresh notify: only reset the cache.
        """
        async with self._locked(message.chat_id) as state:
            state.cache_replace(message)
            self._count(MessageEvent.type)
            if announced:
                self._count(announced=1)
                await trio.lowlevel.checkpoint()
                return
            await self._send(state, NotifyPayload(full_refresh=True), LocalRefresh())

    async def publish_status(
        self,
        chat_id: uuid.UUID,
        status: ChatStatus,
        worker_id: uuid.UUID | None = None,
        owner_token: int | None = None,
    ) -> None:
        """Publish a status change (with the ownership token after it, when known)."""
        await self._publish_control(
            chat_id,
            NotifyPayload(status=status, worker_id=worker_id, owner_token=owner_token),
            StatusEvent(chat_id, status, worker_id),
        )

    def deliver_status_locally(
        self,
        chat_id: uuid.UUID,
        status: ChatStatus,
        worker_id: uuid.UUID | None = None,
        owner_token: int | None = None,
    ) -> None:
        """Deliver a status change to this replica's subscribers only, at once: for a
        change the store already announced in its transaction, so that subscribers here
        see it before the parts that follow it (the notify, arriving later through the
        database, repeats what they know and is dropped)."""
        state = self._chats.get(chat_id)
        if state is None:
            return
        payload = NotifyPayload(status=status, worker_id=worker_id, owner_token=owner_token)
        self._publish_local(state, NotifyItem(payload))

    async def publish_error(self, chat_id: uuid.UUID, error: ErrorPayload) -> None:
        """Publish a structured error (plus the legacy `error` string for old subscribers)."""
        await self._publish_control(
            chat_id,
            NotifyPayload(error_payload=error, error=error.message),
            ErrorEvent(chat_id, error),
        )

    async def publish_retry(self, chat_id: uuid.UUID, retry: RetryPayload) -> None:
        """Publish a `retry` event (use `retry()` from the loop: it also clears the buffer)."""
        await self._publish_control(chat_id, NotifyPayload(retry=retry), RetryEvent(chat_id, retry))

    async def publish_queue_update(
        self, chat_id: uuid.UUID, queued: Sequence[QueuedMessage]
    ) -> None:
        """Publish the chat's current queue."""
        q = tuple(queued)
        await self._publish_control(
            chat_id, NotifyPayload(queue_update=q), QueueUpdateEvent(chat_id, q)
        )

    async def publish_resync(self, chat_id: uuid.UUID) -> None:
        """Tell every subscriber of the chat to read it again from the store (after its
        cursor, then the status and the queue): a write may have landed unannounced."""
        async with self._locked(chat_id) as state:
            marker = ResyncMarker("a write may have gone unannounced")
            await self._send(state, NotifyPayload(resync=True), marker)

    async def _publish_control(
        self, chat_id: uuid.UUID, payload: NotifyPayload, event: StreamEvent
    ) -> None:
        async with self._locked(chat_id) as state:
            self._count(event.type)
            await self._send(state, payload, event)

    @asynccontextmanager
    async def _locked(self, chat_id: uuid.UUID) -> AsyncIterator[ChatStreamState]:
        """The chat's state, under its lock; it stays while a publish is in flight."""
        state = self._state(chat_id)
        state.in_flight += 1
        try:
            async with state.lock:
                yield state
        finally:
            state.in_flight -= 1
            self._maybe_remove(state)

    def _fits(self, payload: NotifyPayload) -> bool:
        assert self._pubsub is not None
        limit = min(self._config.notify_payload_limit, self._pubsub.payload_limit)
        return len(payload.encode().encode()) <= limit

    async def _send(self, state: ChatStreamState, payload: NotifyPayload, local: Item) -> None:
        """Deliver locally (no pubsub) or notify the chat channel."""
        if self._pubsub is None:
            self._publish_local(state, local)
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._pubsub.publish(stream_channel(state.chat_id), payload.encode())
        except (PubSubError, PayloadTooLarge) as exc:
            # Other replicas catch up at their next notify (reads go after the cursor);
            # subscribers here get the notify directly so they do not wait for one.
            self._count(failures=1)
            logger.warning(
                "stream notify failed; delivered locally only",
                extra={"chat_id": str(state.chat_id), "error": repr(exc)},
            )
            self._publish_local(state, NotifyItem(payload))

    # -- subscribing --------------------------------------------------------------------
    @asynccontextmanager
    async def subscribe(
        self, chat_id: uuid.UUID, after_message_id: int = 0
    ) -> AsyncIterator[StreamSubscription]:
        """Subscribe to a chat: the snapshot (status, buffered parts, messages after
        `after_message_id`, queue), then live events, until the block exits. An
        exception of the block leaves as itself, not in an exception group."""
        state = self._state(chat_id)
        sub = Subscriber(Inbox(self._config.subscriber_queue_size))
        # Registering and copying the buffer in one synchronous step: no part is both
        # in the copy and in the queue, none is in neither.
        state.subscribers.add(sub)
        parts = list(state.buffer)
        handle = StreamSubscription(self, state, sub, after_message_id)
        try:
            async with AsyncExitStack() as stack:
                psub: PubSubSubscription | None = None
                subscribed = True
                if self._pubsub is not None:
                    channel = stream_channel(chat_id)
                    try:
                        if isinstance(self._pubsub, HandlerDelivery):
                            # Each notify goes to the subscriber's queue in the listener's
                            # own task: no pump task, one scheduling round less.
                            await stack.enter_async_context(
                                self._pubsub.subscribe_handler(
                                    channel,
                                    functools.partial(self._on_delivery, state, sub),
                                    functools.partial(self._on_pubsub_end, sub),
                                )
                            )
                        else:
                            psub = await stack.enter_async_context(self._pubsub.subscribe(channel))
                    except PubSubError as exc:
                        # Not raised: the subscription delivers the failure as its one
                        # event and ends (`StreamSubscription`).
                        handle._fail(f"{PUBSUB_ERROR}: {exc}", "pubsub")
                        subscribed = False
                # The pump's nursery is ours: the block's exception leaves as itself.
                async with unwrapped(trio.open_nursery()) as nursery:
                    if subscribed:
                        if psub is not None:
                            nursery.start_soon(self._pump, state, sub, psub)
                        await handle._snapshot(parts)
                    try:
                        yield handle
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            state.subscribers.discard(sub)
            self._maybe_remove(state)

    async def _pump(
        self, state: ChatStreamState, sub: Subscriber, psub: PubSubSubscription
    ) -> None:
        """Move pubsub deliveries into the subscriber's queue, never blocking on it (a
        pubsub without `HandlerDelivery`)."""
        while True:
            try:
                delivery = await psub.receive()
            except (PubSubError, trio.EndOfChannel, trio.ClosedResourceError) as exc:
                self._on_pubsub_end(sub, exc)
                return
            self._on_delivery(state, sub, delivery)

    def _on_delivery(self, state: ChatStreamState, sub: Subscriber, delivery: Delivery) -> None:
        """One pubsub delivery into the subscriber's queue (synchronous, never blocks)."""
        if isinstance(delivery, Resync):
            self._pubsub_resyncs += 1
            if sub.pending_resync is None:
                sub.pending_resync = ResyncMarker(delivery.reason)
                sub.inbox.force(sub.pending_resync)
            return
        try:
            payload = NotifyPayload.decode(delivery)
        except DecodeError as exc:
            self._decode_errors += 1
            logger.warning(
                "malformed stream notify skipped",
                extra={"chat_id": str(state.chat_id), "error": str(exc)},
            )
            return
        self._deliver(state, sub, NotifyItem(payload))

    @staticmethod
    def _on_pubsub_end(sub: Subscriber, exc: BaseException) -> None:
        sub.inbox.force(Failure(exc))

    # -- accounting ----------------------------------------------------------------------
    def _count_snapshot(self) -> None:
        self._snapshot_reads += 1

    def _count_catchup(self, state: ChatStreamState) -> None:
        state.db_catchup_reads += 1
        self._db_catchup_reads += 1

    def _count_cache_hit(self, state: ChatStreamState) -> None:
        state.cache_hits += 1
        self._cache_hits += 1

    def _count_carried_hit(self, state: ChatStreamState) -> None:
        state.carried_hits += 1
        self._carried_hits += 1

    def chat_statistics(self, chat_id: uuid.UUID) -> ChatStreamStatistics | None:
        """Counters of one live chat stream, or None when the chat has no state here."""
        state = self._chats.get(chat_id)
        return None if state is None else self._chat_stats(state)

    def catchup_reads(self, chat_id: uuid.UUID) -> int | None:
        """`chat_statistics(chat_id).db_catchup_reads` without building the statistics
        (cheap enough to ask per event); None when the chat has no state here."""
        state = self._chats.get(chat_id)
        return None if state is None else state.db_catchup_reads

    @staticmethod
    def _chat_stats(state: ChatStreamState) -> ChatStreamStatistics:
        return ChatStreamStatistics(
            chat_id=state.chat_id,
            subscribers=len(state.subscribers),
            turn_running=state.turn_running,
            buffered_parts=len(state.buffer),
            cached_messages=len(state.cache),
            watermark=state.watermark,
            db_catchup_reads=state.db_catchup_reads,
            cache_hits=state.cache_hits,
            carried_hits=state.carried_hits,
            dropped_buffer=state.dropped_buffer,
            dropped_subscriber=state.dropped_subscriber,
        )

    def statistics(self) -> StreamStatistics:
        """A frozen snapshot of this replica's stream counters."""
        chats = tuple(self._chat_stats(s) for s in self._chats.values())
        return StreamStatistics(
            events_published=dict(self._published),
            dropped_buffer=self._dropped_buffer,
            dropped_subscriber=self._dropped_subscriber,
            overflow_resyncs=self._overflow_resyncs,
            pubsub_resyncs=self._pubsub_resyncs,
            snapshot_reads=self._snapshot_reads,
            db_catchup_reads=self._db_catchup_reads,
            db_catchup_reads_per_chat={c.chat_id: c.db_catchup_reads for c in chats},
            cache_hits=self._cache_hits,
            carried_hits=self._carried_hits,
            notify_decode_errors=self._decode_errors,
            notify_publish_failures=self._publish_failures,
            notifies_in_transaction=self._announced,
            active_chats=len(chats),
            chats=chats,
        )
