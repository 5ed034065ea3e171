"""Per-chat streams: publish, subscribe with catch-up, durable cache, drop accounting.

docs/spec.md §4 is the contract. One `ChatStreams` per replica holds one
`_ChatStream` per chat, created on demand and removed when it has no
subscribers, no running turn and no publish in flight.

Delivery paths:

* local: `message_part` deltas always go straight into the subscriber queues
  of this replica. Without pubsub every event does.
* notify: with pubsub, durable and control events reach every subscriber (on
  this replica too) through the chat's channel. A notify about a message is
  served, in order of preference, from this replica's durable cache, from the
  message carried inside the notify, or by reading the store after the
  subscriber's cursor. A subscriber never receives a message id <= its cursor
  (a full refresh resets the cursor to 0).

Lossless delivery, defined: every durable message reaches every subscriber
exactly once per history epoch, in id order, after its cursor (an edit's full
refresh starts a new epoch from 0). Ephemeral `message_part` events may be
dropped and are counted. When a subscriber's queue is full, a durable or
control item is not queued: the subscriber is marked for a resync instead (one
marker, coalescing every later overflow) and, on reaching it, reads the store
after its cursor (from 0 if a full refresh was among the dropped items) and
re-emits the chat's status and queue. `retry` and `error` notifications
dropped that way are lost, like parts: they are transient.

Cache safety: a cached or carried message is only delivered when nothing can
sit between it and the cursor: its id is the cursor + 1 (ids are global, so
no other message exists in between), or its known predecessor in the same
chat is the cursor. The predecessor is known when the store reports it
(`Message.prev_id`: the chat's latest visible message at insert time, computed
under the chat's row lock), or for consecutive messages published by this
replica during one turn: while a replica owns a running turn nobody else
inserts into that chat's history (new messages are queued, an edit ends the
turn with a full refresh). A carried message's notify names its predecessor as
`after_message_id`, so a subscriber on any replica whose cursor is that
predecessor takes it without a read. Anything else reads the store.
"""

from __future__ import annotations

import bisect
import logging
import threading
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

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
    SnapshotEndEvent,
    StatusEvent,
    StreamEvent,
    owner_channel,
    owner_payload,
    stream_channel,
)
from chatd_trio.errors import DecodeError, PayloadTooLarge, PubSubError
from chatd_trio.lifecycle import Event
from chatd_trio.pubsub.base import PubSub, Resync
from chatd_trio.pubsub.base import Subscription as PubSubSubscription
from chatd_trio.store.base import Applied, Store
from chatd_trio.strategies import Announce, CatchUp, Strategies

logger = logging.getLogger(__name__)

DROP_BUFFER_FULL = "buffer_full"
DROP_SUBSCRIBER_FULL = "subscriber_full"
SNAPSHOT_ERROR = "failed to load initial snapshot"
CATCHUP_ERROR = "failed to catch up from the store"
PUBSUB_ERROR = "stream subscription lost"


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


# ---------------------------------------------------------------------------
# subscriber queue items


@dataclass
class _ResyncMarker:
    """Catch up from the store: after the cursor, or from 0 when `full`."""

    reason: str
    full: bool = False


@dataclass(frozen=True)
class _NotifyItem:
    payload: NotifyPayload


@dataclass(frozen=True)
class _LocalRefresh:
    """An edit published without pubsub: re-read the history from 0."""


@dataclass(frozen=True)
class _Failure:
    error: BaseException


_Item = StreamEvent | _ResyncMarker | _NotifyItem | _LocalRefresh | _Failure


class _Inbox:
    """A bounded FIFO that never blocks the producer (docs/spec.md §4: publishing never blocks)."""

    def __init__(self, size: int) -> None:
        self._items: deque[_Item] = deque()
        self._size = size
        self._lot = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: _Item) -> bool:
        if len(self._items) >= self._size:
            return False
        self.force(item)
        return True

    def force(self, item: _Item) -> None:
        """Append past the bound (resync and failure markers: at most one each)."""
        self._items.append(item)
        self._lot.unpark_all()

    async def get(self) -> _Item:
        while not self._items:
            await self._lot.park()
        return self._items.popleft()


# ---------------------------------------------------------------------------
# per-chat state


@dataclass
class _CacheEntry:
    message: Message
    # Id of the chat's previous user-visible message when known (told by the store at
    # insert, or published by this replica earlier in the same turn), else None.
    prev: int | None


@dataclass
class _DropWarn:
    """Rate-limited drop accounting of one kind (docs/spec.md §4, drop warnings)."""

    pending: int = 0
    last_warn: float | None = None

    def reset(self) -> None:
        self.pending = 0
        self.last_warn = None


@dataclass(eq=False)
class _Subscriber:
    inbox: _Inbox
    pending_resync: _ResyncMarker | None = None


@dataclass(eq=False)
class _ChatStream:
    chat_id: uuid.UUID
    # Orders the notifies of one chat like its cache; never held on the part hot path.
    lock: trio.Lock = field(default_factory=trio.Lock)
    subscribers: set[_Subscriber] = field(default_factory=set)
    turn_running: bool = False
    turn_gen: int = 0
    buffer: deque[MessagePartEvent] = field(default_factory=deque)
    cache: list[_CacheEntry] = field(default_factory=list)
    cache_ids: list[int] = field(default_factory=list)
    watermark: int = 0
    last_turn_gen: int | None = None
    in_flight: int = 0
    warn_buffer: _DropWarn = field(default_factory=_DropWarn)
    warn_subscriber: _DropWarn = field(default_factory=_DropWarn)
    db_catchup_reads: int = 0
    cache_hits: int = 0
    carried_hits: int = 0
    dropped_buffer: int = 0
    dropped_subscriber: int = 0

    @property
    def idle(self) -> bool:
        return not self.subscribers and not self.turn_running and self.in_flight == 0

    def reset_drops(self) -> None:
        self.warn_buffer.reset()
        self.warn_subscriber.reset()

    # -- durable cache ----------------------------------------------------------
    def cache_add(self, message: Message, limit: int) -> _CacheEntry:
        prev: int | None = message.prev_id
        if (
            prev is None
            and self.turn_running
            and self.cache
            and self.last_turn_gen == self.turn_gen
            and self.cache_ids[-1] < message.id
        ):
            prev = self.cache_ids[-1]
        entry = _CacheEntry(message, prev)
        i = bisect.bisect_left(self.cache_ids, message.id)
        if i < len(self.cache_ids) and self.cache_ids[i] == message.id:
            self.cache[i] = entry
        else:
            self.cache.insert(i, entry)
            self.cache_ids.insert(i, message.id)
        self.last_turn_gen = self.turn_gen if self.turn_running else None
        while len(self.cache) > limit:
            evicted = self.cache.pop(0)
            self.cache_ids.pop(0)
            self.watermark = max(self.watermark, evicted.message.id)
        return entry

    def cache_replace(self, message: Message) -> None:
        self.cache = [_CacheEntry(message, None)]
        self.cache_ids = [message.id]
        self.watermark = 0
        self.last_turn_gen = None

    def cache_after(self, cursor: int) -> list[Message] | None:
        """The cached messages after `cursor` when they provably follow it without a gap."""
        if cursor < self.watermark:
            return None
        i = bisect.bisect_right(self.cache_ids, cursor)
        if i == len(self.cache_ids):
            return None
        out: list[Message] = []
        last = cursor
        for entry in self.cache[i:]:
            if entry.message.id != last + 1 and entry.prev != last:
                return None
            out.append(entry.message)
            last = entry.message.id
        return out


# ---------------------------------------------------------------------------
# the subscription handle


class StreamSubscription:
    """The events of one chat: the initial snapshot, a `SnapshotEndEvent`, then live events.

    Iterate with `async for`, or call `receive()` (raises `trio.EndOfChannel`
    once the subscription has ended after a pubsub failure). A `status` or
    `queue_update` event always tells something new: one repeating what this
    subscriber already knows is not delivered.
    """

    def __init__(
        self, streams: ChatStreams, state: _ChatStream, sub: _Subscriber, cursor: int
    ) -> None:
        self._streams = streams
        self._state = state
        self._sub = sub
        self._cursor = cursor
        self._pending: deque[StreamEvent] = deque()
        self._ended = False
        # The chat's state as this subscriber last learned it, so that a state event
        # repeating it is not delivered (docs/spec.md §4: one event per change).
        self._status: tuple[ChatStatus, uuid.UUID | None] | None = None
        self._queue: tuple[QueuedMessage, ...] | None = None

    @property
    def chat_id(self) -> uuid.UUID:
        return self._state.chat_id

    @property
    def cursor(self) -> int:
        """Id of the last durable message delivered (or the subscribe cursor)."""
        return self._cursor

    @property
    def backlog(self) -> int:
        """Events and notifications queued for this subscriber, not yet received."""
        return len(self._pending) + len(self._sub.inbox)

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self

    async def __anext__(self) -> StreamEvent:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive(self) -> StreamEvent:
        """The next event; waits for one."""
        while not self._pending:
            if self._ended:
                await trio.lowlevel.checkpoint()
                raise trio.EndOfChannel
            item = await self._sub.inbox.get()
            await self._process(item)
        await trio.lowlevel.checkpoint()
        return self._pending.popleft()

    def receive_nowait(self) -> StreamEvent:
        """An event already available, else `trio.WouldBlock` (never reads the store)."""
        if self._pending:
            return self._pending.popleft()
        if self._ended:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    # -- processing ---------------------------------------------------------------
    def _emit_status(self, status: ChatStatus, worker_id: uuid.UUID | None) -> None:
        # Repeats come from two places no single publisher can see: a change published
        # between registering and reading the snapshot is in both, and a stopped turn's
        # final transition announces the `waiting` its interrupter already announced
        # (on whichever replica that was).
        if self._status == (status, worker_id):
            return
        self._status = (status, worker_id)
        self._pending.append(StatusEvent(self.chat_id, status, worker_id))

    def _emit_queue(self, queued: tuple[QueuedMessage, ...]) -> None:
        # An edit or a resync announces the queue even when it did not change.
        if self._queue == queued:
            return
        self._queue = queued
        self._pending.append(QueueUpdateEvent(self.chat_id, queued))

    def _emit_messages(self, messages: Iterable[Message]) -> None:
        for m in messages:
            if m.id <= self._cursor:
                continue
            self._cursor = m.id
            self._pending.append(MessageEvent(self.chat_id, m))

    def _fail(self, message: str, kind: str) -> None:
        self._pending.append(
            ErrorEvent(self.chat_id, ErrorPayload(message, kind=kind, retryable=True))
        )
        self._ended = True

    async def _read_after(self, cursor: int) -> bool:
        """Catch up from the store after `cursor`; False (and the subscription ends) on error."""
        self._streams._count_catchup(self._state)
        try:
            messages = await self._streams._store.messages_after(self.chat_id, cursor)
        except Exception as exc:
            logger.warning(
                "stream catch-up read failed",
                extra={"chat_id": str(self.chat_id), "cursor": cursor, "error": repr(exc)},
            )
            self._fail(CATCHUP_ERROR, "store")
            return False
        self._emit_messages(messages)
        return True

    async def _process(self, item: _Item) -> None:
        if isinstance(item, MessagePartEvent):
            self._pending.append(item)
        elif isinstance(item, MessageEvent):
            self._emit_messages((item.message,))
        elif isinstance(item, StatusEvent):
            self._emit_status(item.status, item.worker_id)
        elif isinstance(item, QueueUpdateEvent):
            self._emit_queue(item.queued)
        elif isinstance(item, ErrorEvent | RetryEvent | SnapshotEndEvent):
            self._pending.append(item)
        elif isinstance(item, _NotifyItem):
            await self._handle_notify(item.payload)
        elif isinstance(item, _LocalRefresh):
            self._cursor = 0
            await self._read_after(0)
        elif isinstance(item, _ResyncMarker):
            if self._sub.pending_resync is item:
                self._sub.pending_resync = None
            await self._resync(item)
        else:
            self._fail(f"{PUBSUB_ERROR}: {item.error}", "pubsub")

    async def _resync(self, marker: _ResyncMarker) -> None:
        if marker.full:
            self._cursor = 0
        if not await self._read_after(self._cursor):
            return
        try:
            chat = await self._streams._store.get_chat(self.chat_id)
            queued = await self._streams._store.list_queued(self.chat_id)
        except Exception as exc:
            logger.warning(
                "stream resync read failed",
                extra={"chat_id": str(self.chat_id), "error": repr(exc)},
            )
            self._fail(CATCHUP_ERROR, "store")
            return
        self._emit_status(chat.status, chat.worker_id)
        # Compared with what this subscriber last saw, not with the last update it
        # received: the queue may have been emptied while notifies were missed.
        self._emit_queue(tuple(queued))

    async def _handle_notify(self, n: NotifyPayload) -> None:
        if n.resync:
            await self._resync(_ResyncMarker("a write may have gone unannounced"))
            return
        # Contract order (docs/spec.md §4): messages -> status -> retry -> error -> queue.
        if n.full_refresh:
            self._cursor = 0
            if not await self._read_after(0):
                return
        elif n.after_message_id is not None and not await self._catch_up(n):
            return
        if n.status is not None:
            self._emit_status(n.status, n.worker_id)
        if n.retry is not None:
            self._pending.append(RetryEvent(self.chat_id, n.retry))
        if n.error_payload is not None:
            self._pending.append(ErrorEvent(self.chat_id, n.error_payload))
        elif n.error is not None:
            self._pending.append(ErrorEvent(self.chat_id, ErrorPayload(n.error)))
        if n.queue_update is not None:
            self._emit_queue(n.queue_update)

    async def _catch_up(self, n: NotifyPayload) -> bool:
        assert n.after_message_id is not None
        carried = n.message if n.message is not None and n.message.chat_id == self.chat_id else None
        announced = carried.id if carried is not None else n.after_message_id + 1
        if announced <= self._cursor:
            return True  # already delivered by an earlier catch-up
        cfg = self._streams._config
        if self._streams._catch_up is CatchUp.CACHE_FIRST:
            cached = self._state.cache_after(self._cursor)
            if cached is not None:
                self._streams._count_cache_hit(self._state)
                self._emit_messages(cached)
                # The announced message may be newer than this replica's cache (published
                # elsewhere): go on until it is delivered.
                if announced <= self._cursor:
                    return True
        if (
            cfg.notify_carries_messages
            and carried is not None
            and n.after_message_id == self._cursor
            and carried.user_visible
            and not carried.deleted
        ):
            self._streams._count_carried_hit(self._state)
            self._emit_messages((carried,))
            return True
        return await self._read_after(self._cursor)


# ---------------------------------------------------------------------------
# the replica's streams


_FINISHES = frozenset(
    {Event.FINISH_DONE, Event.FINISH_INTERRUPTED, Event.FINISH_ERROR, Event.FINISH_SHUTDOWN}
)


class StreamAnnouncer:
    """The replica's `Announcer`: the notifies its publishes would send, sealed for its
    pubsub, for the store to send inside the writing transaction."""

    def __init__(self, streams: ChatStreams, error: ErrorPayload | None = None) -> None:
        self._streams = streams
        self._error = error

    def __call__(
        self, messages: Sequence[Message], *, refresh: bool = False
    ) -> list[tuple[str, str]]:
        """The stream notifies of inserted messages (a full refresh after an edit)."""
        return self._streams._announce(messages, refresh=refresh)

    def changes(self, event: Event | None, applied: Applied) -> list[tuple[str, str]]:
        """Status, queue and owner notifies of the change (and the error of a failed turn)."""
        return self._streams._changes(event, applied, self._error)

    def with_error(self, error: ErrorPayload | None) -> StreamAnnouncer:
        """This announcer, also announcing `error` when a finish leaves the chat `error`."""
        return StreamAnnouncer(self._streams, error)


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
        self._chats: dict[uuid.UUID, _ChatStream] = {}
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
        # The announcer runs inside the store's writing transaction, on the asyncio
        # bridge's thread (`chatd_trio._aio`): the counters it shares with Trio tasks
        # are locked, and a local delivery it asks for is handed to the Trio thread.
        self._stats_lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
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
        if self._token is None and self._announcer is not None:
            self._token = trio.lowlevel.current_trio_token()
        return self._announcer

    def _count(
        self, kind: EventType | None = None, *, announced: int = 0, failures: int = 0
    ) -> None:
        with self._stats_lock:
            if kind is not None:
                self._published[kind] += 1
            self._announced += announced
            self._publish_failures += failures

    def _published_snapshot(self) -> dict[EventType, int]:
        with self._stats_lock:
            return dict(self._published)

    def _on_trio_thread(self, fn: Callable[..., object], *args: object) -> None:
        """Call `fn(*args)` now on the Trio thread, or soon from another thread."""
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            assert self._token is not None, "the announcer was handed out by a Trio task"
            self._token.run_sync_soon(fn, *args)
        else:
            fn(*args)

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
                self._on_trio_thread(self._publish_local, state, _NotifyItem(payload))
            return []
        self._count(announced=1)
        channel = stream_channel(chat_id)
        return [(channel, self._pubsub.seal(channel, payload.encode()))]

    def _changes(
        self, event: Event | None, applied: Applied, error: ErrorPayload | None
    ) -> list[tuple[str, str]]:
        """The control notifies of a change, as the server would publish them after it."""
        assert self._pubsub is not None, "announcer is None without a pubsub"
        chat = applied.chat
        status = NotifyPayload(
            status=chat.status,
            worker_id=chat.worker_id if chat.status is ChatStatus.RUNNING else None,
            owner_token=chat.owner_token,
        )
        out: list[tuple[str, str]] = []

        def add_status() -> None:
            out.extend(self._control(chat.id, status, StatusEvent.type))

        def add_queue(queue: Sequence[QueuedMessage]) -> None:
            payload = NotifyPayload(queue_update=tuple(queue))
            out.extend(self._control(chat.id, payload, QueueUpdateEvent.type))

        def add_owner(kind: str) -> None:
            assert self._pubsub is not None
            channel = owner_channel(chat.owner_id)
            out.append((channel, self._pubsub.seal(channel, owner_payload(chat, kind))))

        # The owner channel hears of every status change (docs/spec.md §4).
        if event is None:
            add_queue(applied.queue or ())
        elif event is Event.CREATE:
            add_owner("created")
        elif event is Event.SEND_MESSAGE:
            if applied.inserted:
                add_status()
                add_owner("status")
            elif applied.queue is not None:
                add_queue(applied.queue)
        elif event is Event.EDIT:
            add_status()
            add_queue(())
            add_owner("status")
        elif event is Event.PROMOTE_QUEUED:
            if applied.promoted is not None:
                add_status()
                add_owner("status")
            add_queue(applied.queue or ())
        elif event is Event.INTERRUPT:
            add_status()
            if chat.status is not ChatStatus.PENDING:  # a pending chat is left as it was
                add_owner("status")
        elif event in (Event.ACQUIRE, Event.STALE_RECOVERED):
            add_status()
            add_owner("status")
        elif event in _FINISHES:
            if error is not None and chat.status is ChatStatus.ERROR:
                payload = NotifyPayload(error_payload=error, error=error.message)
                out.extend(self._control(chat.id, payload, ErrorEvent.type))
            if applied.promoted is not None:
                add_queue(applied.queue or ())
            add_status()
            # A stopped turn that leaves the chat `waiting` changed no status: the
            # interrupt did, and announced it.
            if not (event is Event.FINISH_INTERRUPTED and chat.status is ChatStatus.WAITING):
                add_owner("status")
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
    def _state(self, chat_id: uuid.UUID) -> _ChatStream:
        state = self._chats.get(chat_id)
        if state is None:
            state = self._chats[chat_id] = _ChatStream(chat_id)
        return state

    def _maybe_remove(self, state: _ChatStream) -> None:
        if state.idle and self._chats.get(state.chat_id) is state:
            del self._chats[state.chat_id]

    def has_state(self, chat_id: uuid.UUID) -> bool:
        """Whether this replica currently holds stream state for the chat."""
        return chat_id in self._chats

    def _clear(self, state: _ChatStream) -> None:
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
    def _dropped(self, state: _ChatStream, kind: str) -> None:
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

    def _deliver(self, state: _ChatStream, sub: _Subscriber, item: _Item) -> None:
        """Queue one item for one subscriber without blocking."""
        if sub.inbox.offer(item):
            return
        self._dropped(state, DROP_SUBSCRIBER_FULL)
        if isinstance(item, MessagePartEvent):
            return
        # Durable or control: never lose it silently; catch up from the store instead.
        full = isinstance(item, _LocalRefresh) or (
            isinstance(item, _NotifyItem) and item.payload.full_refresh
        )
        if sub.pending_resync is None:
            sub.pending_resync = _ResyncMarker("subscriber queue overflow", full=full)
            sub.inbox.force(sub.pending_resync)
            self._overflow_resyncs += 1
        elif full:
            sub.pending_resync.full = True

    def _publish_local(self, state: _ChatStream, item: _Item) -> None:
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
        state = self._state(message.chat_id)
        state.in_flight += 1
        try:
            async with state.lock:
                entry = state.cache_add(message, self._config.durable_cache_size)
                self._count(MessageEvent.type)
                if announced:
                    self._count(announced=1)
                    await trio.lowlevel.checkpoint()
                    return
                payload = self._message_notify(message, entry.prev)
                await self._send(state, payload, MessageEvent(message.chat_id, message))
        finally:
            state.in_flight -= 1
            self._maybe_remove(state)

    async def publish_messages(self, messages: Sequence[Message]) -> None:
        """Publish several persisted messages (one step) in order."""
        for m in messages:
            await self.publish_message(m)

    async def publish_edited_message(self, message: Message, *, announced: bool = False) -> None:
        """Publish an edit: the cache becomes just this message; subscribers refresh from 0.

        `announced`: the store already sent the refresh notify: only reset the cache.
        """
        state = self._state(message.chat_id)
        state.in_flight += 1
        try:
            async with state.lock:
                state.cache_replace(message)
                self._count(MessageEvent.type)
                if announced:
                    self._count(announced=1)
                    await trio.lowlevel.checkpoint()
                    return
                await self._send(state, NotifyPayload(full_refresh=True), _LocalRefresh())
        finally:
            state.in_flight -= 1
            self._maybe_remove(state)

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
        self._publish_local(state, _NotifyItem(payload))

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
        state = self._state(chat_id)
        state.in_flight += 1
        try:
            async with state.lock:
                marker = _ResyncMarker("a write may have gone unannounced")
                await self._send(state, NotifyPayload(resync=True), marker)
        finally:
            state.in_flight -= 1
            self._maybe_remove(state)

    async def _publish_control(
        self, chat_id: uuid.UUID, payload: NotifyPayload, event: StreamEvent
    ) -> None:
        state = self._state(chat_id)
        state.in_flight += 1
        try:
            async with state.lock:
                self._count(event.type)
                await self._send(state, payload, event)
        finally:
            state.in_flight -= 1
            self._maybe_remove(state)

    def _fits(self, payload: NotifyPayload) -> bool:
        assert self._pubsub is not None
        limit = min(self._config.notify_payload_limit, self._pubsub.payload_limit)
        return len(payload.encode().encode()) <= limit

    async def _send(self, state: _ChatStream, payload: NotifyPayload, local: _Item) -> None:
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
            self._publish_local(state, _NotifyItem(payload))

    # -- subscribing --------------------------------------------------------------------
    @asynccontextmanager
    async def subscribe(
        self, chat_id: uuid.UUID, after_message_id: int = 0
    ) -> AsyncIterator[StreamSubscription]:
        """Subscribe to a chat: the snapshot (status, buffered parts, messages after
        `after_message_id`, queue), then live events, until the block exits. An
        exception of the block leaves as itself, not in an exception group."""
        state = self._state(chat_id)
        sub = _Subscriber(_Inbox(self._config.subscriber_queue_size))
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
                    try:
                        psub = await stack.enter_async_context(
                            self._pubsub.subscribe(stream_channel(chat_id))
                        )
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
                        await self._snapshot(handle, parts)
                    try:
                        yield handle
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            state.subscribers.discard(sub)
            self._maybe_remove(state)

    async def _snapshot(self, handle: StreamSubscription, parts: list[MessagePartEvent]) -> None:
        chat_id = handle.chat_id
        self._snapshot_reads += 1
        try:
            chat = await self._store.get_chat(chat_id)
            messages = await self._store.messages_after(chat_id, handle.cursor)
            queued = await self._store.list_queued(chat_id)
        except Exception as exc:
            logger.warning(
                "stream snapshot failed", extra={"chat_id": str(chat_id), "error": repr(exc)}
            )
            handle._pending.extend(parts)
            handle._pending.append(
                ErrorEvent(chat_id, ErrorPayload(SNAPSHOT_ERROR, kind="snapshot", retryable=True))
            )
            handle._pending.append(SnapshotEndEvent(chat_id, handle.cursor))
            return
        handle._emit_status(chat.status, chat.worker_id)
        handle._pending.extend(parts)
        handle._emit_messages(messages)
        if queued:
            handle._emit_queue(tuple(queued))
        else:
            handle._queue = ()  # known empty; an update repeating that is not news
        handle._pending.append(SnapshotEndEvent(chat_id, handle.cursor))

    async def _pump(self, state: _ChatStream, sub: _Subscriber, psub: PubSubSubscription) -> None:
        """Move pubsub deliveries into the subscriber's queue, never blocking on it."""
        while True:
            try:
                delivery = await psub.receive()
            except (PubSubError, trio.EndOfChannel, trio.ClosedResourceError) as exc:
                sub.inbox.force(_Failure(exc))
                return
            if isinstance(delivery, Resync):
                self._pubsub_resyncs += 1
                if sub.pending_resync is None:
                    sub.pending_resync = _ResyncMarker(delivery.reason)
                    sub.inbox.force(sub.pending_resync)
                continue
            try:
                payload = NotifyPayload.decode(delivery)
            except DecodeError as exc:
                self._decode_errors += 1
                logger.warning(
                    "malformed stream notify skipped",
                    extra={"chat_id": str(state.chat_id), "error": str(exc)},
                )
                continue
            self._deliver(state, sub, _NotifyItem(payload))

    # -- accounting ----------------------------------------------------------------------
    def _count_catchup(self, state: _ChatStream) -> None:
        state.db_catchup_reads += 1
        self._db_catchup_reads += 1

    def _count_cache_hit(self, state: _ChatStream) -> None:
        state.cache_hits += 1
        self._cache_hits += 1

    def _count_carried_hit(self, state: _ChatStream) -> None:
        state.carried_hits += 1
        self._carried_hits += 1

    def chat_statistics(self, chat_id: uuid.UUID) -> ChatStreamStatistics | None:
        """Counters of one live chat stream, or None when the chat has no state here."""
        state = self._chats.get(chat_id)
        return None if state is None else self._chat_stats(state)

    @staticmethod
    def _chat_stats(state: _ChatStream) -> ChatStreamStatistics:
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
            events_published=self._published_snapshot(),
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


__all__ = [
    "ChatStreamStatistics",
    "ChatStreams",
    "StreamStatistics",
    "StreamSubscription",
]
