"""The PubSub port: publish a payload on a channel, subscribe to a channel.

Per-channel order is preserved. After a connection loss an adapter delivers a
`Resync` marker to every subscription: a notify may have been missed, so the
subscriber must catch up from the store.

Every payload is sealed on its way out (`publish`, or `seal` for a store that sends
the notify itself) and opened on its way in: a subscription only ever receives
payloads sealed for its channel under the deployment's key. Anything else that
arrives on the channel (a forged NOTIFY, a payload copied from another channel) is
dropped and counted in `PubSubStatistics.rejected` (chatd_trio.pubsub.auth).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, TypeAlias, runtime_checkable

from chatd_trio.errors import PubSubError


@dataclass(frozen=True)
class PubSubStatistics:
    """A snapshot of a PubSub's counters."""

    channels: int
    subscriptions: int
    published: int
    delivered: int
    resyncs: int
    #: LISTEN / UNLISTEN statements and reconnects (always 0 in memory).
    listens: int = 0
    unlistens: int = 0
    reconnects: int = 0
    #: Received payloads dropped because they did not open (forged, altered, expired,
    #: sealed for another channel or under another key); counted once per payload.
    rejected: int = 0
    #: Network round trips to the database (publishes, LISTEN, UNLISTEN) when counted
    #: (`PubSubConfig.count_round_trips`), else None.
    round_trips: int | None = None


@dataclass(frozen=True)
class Resync:
    """A notify may have been lost (reconnect): catch up from the store."""

    reason: str = "reconnected"


Delivery: TypeAlias = str | Resync


@runtime_checkable
class Subscription(Protocol):
    """Deliveries of one channel, in publish order. Raises PubSubError when the
    subscription can no longer deliver (the caller re-subscribes)."""

    async def receive(self) -> Delivery: ...

    def __aiter__(self) -> AsyncIterator[Delivery]: ...


@runtime_checkable
class PubSub(Protocol):
    """The pubsub port: sealed payloads on named channels, delivered to subscriptions.

    `MemoryPubSub` serves one process, `PostgresPubSub` every replica on a database
    (LISTEN/NOTIFY). Subscriptions receive payloads in publish order, and a `Resync`
    after a connection loss (something may have been missed).
    """

    async def publish(self, channel: str, payload: str) -> None:
        """Seal and publish; raises PayloadTooLarge above `payload_limit`."""
        ...

    def seal(self, channel: str, payload: str) -> str:
        """The sealed form of `payload` for `channel`, for a store that sends the notify
        itself (`Store.announces_to`); raises like `publish`."""
        ...

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe for the duration of the context; active when the context is entered."""
        ...

    @property
    def payload_limit(self) -> int:
        """Largest payload in UTF-8 bytes, before sealing."""
        ...

    def statistics(self) -> PubSubStatistics:
        """Counters since the adapter was created."""
        ...


# -- capabilities a store asks for (`Store.announces_to`) -------------------------------
#
# A store that sends a pubsub's notifies itself, inside its writing operation, must
# know how they travel. It asks for one of these capabilities instead of checking the
# pubsub's class, so no store adapter imports a pubsub adapter.


@runtime_checkable
class DatabaseChannels(Protocol):
    """A pubsub whose channels are LISTEN/NOTIFY channels of one PostgreSQL database.

    A PostgreSQL store on the same database can send this pubsub's sealed notifies
    with `pg_notify` inside its writing transaction: listeners receive them at the
    commit, in commit order. `PostgresPubSub` has this capability.
    """

    @property
    def database(self) -> str:
        """host:port/dbname of the database (no credentials), as the store computes it
        from its own DSN: equal strings mean the same database."""
        ...


@runtime_checkable
class InlineDelivery(Protocol):
    """A pubsub in this process that takes already sealed notifies without a checkpoint.

    An in-memory store linked to it delivers within its operation what PostgreSQL
    would deliver at the commit: nothing else can run in between, so listeners see
    the notifies in the order of the writes. `MemoryPubSub` has this capability.
    """

    def publish_nowait(self, channel: str, wire: str) -> None:
        """Deliver `wire` (what `PubSub.seal` returned) exactly as given; never blocks."""
        ...

    def check_nowait(self, channel: str, wire: str) -> None:
        """Raise what `publish_nowait(channel, wire)` would raise, delivering nothing."""
        ...


@runtime_checkable
class HandlerDelivery(Protocol):
    """A pubsub that can hand a subscription's deliveries to a function as they arrive,
    in its own delivering task, instead of queueing them for a reader task: one
    scheduling round less per delivery. `PostgresPubSub` has this capability.
    """

    def subscribe_handler(
        self,
        channel: str,
        handler: Callable[[Delivery], None],
        on_end: Callable[[PubSubError], None],
    ) -> AbstractAsyncContextManager[None]:
        """Like `PubSub.subscribe`, but each payload or `Resync` goes to `handler`
        (synchronous, never blocking; an exception ends the subscription), and the
        failure that ends the subscription to `on_end`, once."""
        ...
