"""The PubSub port: publish a payload on a channel, subscribe to a channel.

Per-channel order is preserved. After a connection loss an adapter delivers a
`Resync` marker to every subscription: a notify may have been missed, so the
subscriber must catch up from the store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, TypeAlias, runtime_checkable


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
    async def publish(self, channel: str, payload: str) -> None:
        """Publish; raises PayloadTooLarge above the adapter's limit."""
        ...

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe for the duration of the context; active when the context is entered."""
        ...

    @property
    def payload_limit(self) -> int:
        """Largest payload in bytes."""
        ...
