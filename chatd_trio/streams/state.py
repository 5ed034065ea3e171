"""Per-chat stream state: the items a subscriber's queue holds, the queue itself, and
the durable message cache with its eviction watermark (`chatd_trio.streams`)."""

from __future__ import annotations

import bisect
import uuid
from collections import deque
from dataclasses import dataclass, field

import trio

from chatd_trio.domain import (
    Message,
    MessagePartEvent,
    NotifyPayload,
    StreamEvent,
)

__all__ = [
    "CacheEntry",
    "ChatStreamState",
    "DropWarn",
    "Failure",
    "Inbox",
    "Item",
    "LocalRefresh",
    "NotifyItem",
    "ResyncMarker",
    "Subscriber",
]


@dataclass
class ResyncMarker:
    """Catch up from the store: after the cursor, or from 0 when `full`."""

    reason: str
    full: bool = False


@dataclass(frozen=True)
class NotifyItem:
    """A notify received on (or meant for) the chat's channel, opened and decoded."""

    payload: NotifyPayload


@dataclass(frozen=True)
class LocalRefresh:
    """An edit published without pubsub: re-read the history from 0."""


@dataclass(frozen=True)
class Failure:
    """The subscription's pubsub failed: it ends after delivering an error event."""

    error: BaseException


Item = StreamEvent | ResyncMarker | NotifyItem | LocalRefresh | Failure


class Inbox:
    """A bounded FIFO that never blocks the producer (docs/spec.md §4: publishing never blocks)."""

    def __init__(self, size: int) -> None:
        self._items: deque[Item] = deque()
        self._size = size
        self._lot = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: Item) -> bool:
        if len(self._items) >= self._size:
            return False
        self.force(item)
        return True

    def force(self, item: Item) -> None:
        """Append past the bound (resync and failure markers: at most one each)."""
        self._items.append(item)
        self._lot.unpark_all()

    async def get(self) -> Item:
        while not self._items:
            await self._lot.park()
        return self._items.popleft()


@dataclass
class CacheEntry:
    """A message of the durable cache."""

    message: Message
    # Id of the chat's previous user-visible message when known (told by the store at
    # insert, or published by this replica earlier in the same turn), else None.
    prev: int | None


@dataclass
class DropWarn:
    """Rate-limited drop accounting of one kind (docs/spec.md §4, drop warnings)."""

    pending: int = 0
    last_warn: float | None = None

    def reset(self) -> None:
        self.pending = 0
        self.last_warn = None


@dataclass(eq=False)
class Subscriber:
    """One subscriber's queue, and its pending resync marker (one coalesces overflows)."""

    inbox: Inbox
    pending_resync: ResyncMarker | None = None


@dataclass(eq=False)
class ChatStreamState:
    """One chat's stream on this replica: its subscribers, the running turn's part
    buffer, the durable cache (ids ascending, evicted below `watermark`), counters."""

    chat_id: uuid.UUID
    # Orders the notifies of one chat like its cache; never held on the part hot path.
    lock: trio.Lock = field(default_factory=trio.Lock)
    subscribers: set[Subscriber] = field(default_factory=set)
    turn_running: bool = False
    turn_gen: int = 0
    buffer: deque[MessagePartEvent] = field(default_factory=deque)
    cache: list[CacheEntry] = field(default_factory=list)
    cache_ids: list[int] = field(default_factory=list)
    watermark: int = 0
    last_turn_gen: int | None = None
    in_flight: int = 0
    warn_buffer: DropWarn = field(default_factory=DropWarn)
    warn_subscriber: DropWarn = field(default_factory=DropWarn)
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
    def cache_add(self, message: Message, limit: int) -> CacheEntry:
        prev: int | None = message.prev_id
        if (
            prev is None
            and self.turn_running
            and self.cache
            and self.last_turn_gen == self.turn_gen
            and self.cache_ids[-1] < message.id
        ):
            prev = self.cache_ids[-1]
        entry = CacheEntry(message, prev)
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
        self.cache = [CacheEntry(message, None)]
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
