"""`StreamSubscription`: one subscriber's view of a chat's stream (`chatd_trio.streams`).

The snapshot, its end marker, then live events; catch-up after a notify (from the
durable cache, from a message the notify carries, or from the store); a state
event repeating what the subscriber knows is dropped.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

import trio

from chatd_trio.domain import (
    ChatStatus,
    ErrorEvent,
    ErrorPayload,
    Message,
    MessageEvent,
    MessagePartEvent,
    NotifyPayload,
    QueuedMessage,
    QueueUpdateEvent,
    RetryEvent,
    SnapshotEndEvent,
    StatusEvent,
    StreamEvent,
)
from chatd_trio.strategies import CatchUp
from chatd_trio.streams.state import (
    ChatStreamState,
    Item,
    LocalRefresh,
    NotifyItem,
    ResyncMarker,
    Subscriber,
)

if TYPE_CHECKING:
    from chatd_trio.streams.replica import ChatStreams

__all__ = ["CATCHUP_ERROR", "PUBSUB_ERROR", "SNAPSHOT_ERROR", "StreamSubscription"]

logger = logging.getLogger(__name__)

SNAPSHOT_ERROR = "failed to load initial snapshot"
CATCHUP_ERROR = "failed to catch up from the store"
PUBSUB_ERROR = "stream subscription lost"


class StreamSubscription:
    """The events of one chat: the initial snapshot, a `SnapshotEndEvent`, then live events.

    Iterate with `async for`, or call `receive()` (raises `trio.EndOfChannel`
    once the subscription has ended after a pubsub failure). A `status` or
    `queue_update` event always tells something new: one repeating what this
    subscriber already knows is not delivered.
    """

    def __init__(
        self, streams: ChatStreams, state: ChatStreamState, sub: Subscriber, cursor: int
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

    async def _snapshot(self, parts: list[MessagePartEvent]) -> None:
        """Queue the snapshot: the status, the buffered `parts`, the messages after the
        cursor, the queue, then the end marker (an error event first if reads fail)."""
        chat_id = self.chat_id
        store = self._streams._store
        self._streams._count_snapshot()
        try:
            chat = await store.get_chat(chat_id)
            messages = await store.messages_after(chat_id, self.cursor)
            queued = await store.list_queued(chat_id)
        except Exception as exc:
            logger.warning(
                "stream snapshot failed", extra={"chat_id": str(chat_id), "error": repr(exc)}
            )
            self._pending.extend(parts)
            self._pending.append(
                ErrorEvent(chat_id, ErrorPayload(SNAPSHOT_ERROR, kind="snapshot", retryable=True))
            )
            self._pending.append(SnapshotEndEvent(chat_id, self.cursor))
            return
        self._emit_status(chat.status, chat.worker_id)
        self._pending.extend(parts)
        self._emit_messages(messages)
        if queued:
            self._emit_queue(tuple(queued))
        else:
            self._queue = ()  # known empty; an update repeating that is not news
        self._pending.append(SnapshotEndEvent(chat_id, self.cursor))

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

    async def _process(self, item: Item) -> None:
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
        elif isinstance(item, NotifyItem):
            await self._handle_notify(item.payload)
        elif isinstance(item, LocalRefresh):
            self._cursor = 0
            await self._read_after(0)
        elif isinstance(item, ResyncMarker):
            if self._sub.pending_resync is item:
                self._sub.pending_resync = None
            await self._resync(item)
        else:
            self._fail(f"{PUBSUB_ERROR}: {item.error}", "pubsub")

    async def _resync(self, marker: ResyncMarker) -> None:
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
            await self._resync(ResyncMarker("a write may have gone unannounced"))
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
