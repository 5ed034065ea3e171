"""What both PubSub adapters share: PostgreSQL's limits on what may be published, and
the per-subscription queue their deliveries go through.

The memory adapter checks exactly what PostgreSQL's NOTIFY would refuse, so the
contract suite runs unchanged against both; keeping the checks here (next to the
port, not in either adapter) means neither adapter imports the other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable

import trio

from chatd_trio.config import PubSubConfig
from chatd_trio.errors import DecodeError, PayloadTooLarge, PubSubError
from chatd_trio.pubsub.base import Delivery

__all__ = ["HandlerSubscription", "QueueSubscription", "check_channel", "check_publish"]

logger = logging.getLogger(__name__)


def check_publish(channel: str, payload: str, config: PubSubConfig, limit: int) -> None:
    """Refuse what PostgreSQL's NOTIFY would refuse, before anything is sent.

    Raises `DecodeError` naming `channel` (empty, too long, NUL) or `payload`
    (NUL, not encodable), and `PayloadTooLarge` above `limit` UTF-8 bytes.
    """
    check_channel(channel, config)
    if "\x00" in payload:
        raise DecodeError("payload", "contains a NUL character")
    try:
        size = len(payload.encode("utf-8"))
    except UnicodeEncodeError:
        raise DecodeError("payload", "not encodable as UTF-8") from None
    if size > limit:
        sealed = f" ({config.payload_limit} sealed)" if limit != config.payload_limit else ""
        raise PayloadTooLarge("payload", f"{size} bytes exceeds the limit of {limit}{sealed}")


def check_channel(channel: str, config: PubSubConfig) -> None:
    """Refuse channel names PostgreSQL would reject or silently truncate."""
    if not channel:
        raise DecodeError("channel", "empty")
    if "\x00" in channel:
        raise DecodeError("channel", "contains a NUL character")
    try:
        size = len(channel.encode("utf-8"))
    except UnicodeEncodeError:
        raise DecodeError("channel", "not encodable as UTF-8") from None
    if size > config.max_channel_bytes:
        raise DecodeError(
            "channel", f"{size} bytes exceeds the limit of {config.max_channel_bytes}"
        )


class QueueSubscription:
    """One subscription: an unbounded FIFO of deliveries for one channel.

    `deliver` never blocks. After `fail` (or `close`) the deliveries already
    queued are still received, then `receive` raises `PubSubError`.
    """

    def __init__(self, channel: str) -> None:
        self.channel = channel
        # Unbounded on purpose: publishing must never block on a slow reader.
        self._send, self._recv = trio.open_memory_channel[Delivery](math.inf)
        self._error: PubSubError | None = None

    @property
    def failed(self) -> bool:
        """True once the subscription can no longer deliver new payloads."""
        return self._error is not None

    def deliver(self, item: Delivery) -> bool:
        """Queue one delivery; False when the subscription is already closed."""
        if self._error is not None:
            return False
        self._send.send_nowait(item)
        return True

    def fail(self, error: PubSubError) -> None:
        """End the subscription: `receive` raises `error` once the queue is drained."""
        if self._error is None:
            self._error = error
            self._send.close()

    def close(self) -> None:
        """End the subscription because its context was left."""
        self.fail(PubSubError(f"subscription to {self.channel!r} is closed"))

    async def receive(self) -> Delivery:
        """The next payload or `Resync`, in publish order."""
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            assert self._error is not None
            # A fresh exception per call: re-raising the stored one would grow its traceback.
            raise PubSubError(*self._error.args) from self._error.__cause__

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    async def __anext__(self) -> Delivery:
        return await self.receive()


class HandlerSubscription(QueueSubscription):
    """A subscription that hands each delivery to a function instead of queueing it.

    `handler` runs in the adapter's delivering task, synchronously, and must not block;
    an exception from it ends this subscription (`on_end` is told), never the adapter's
    other subscriptions. `on_end` runs once when the adapter fails the subscription,
    not when its context is left (`close`).
    """

    def __init__(
        self,
        channel: str,
        handler: Callable[[Delivery], None],
        on_end: Callable[[PubSubError], None],
    ) -> None:
        super().__init__(channel)
        self._handler = handler
        self._on_end = on_end

    def deliver(self, item: Delivery) -> bool:
        if self._error is not None:
            return False
        try:
            self._handler(item)
        except Exception as exc:
            logger.exception("subscription handler failed", extra={"channel": self.channel})
            error = PubSubError(f"the handler of {self.channel!r} failed: {exc!r}")
            error.__cause__ = exc
            self.fail(error)
        return True

    def fail(self, error: PubSubError) -> None:
        if self._error is None:
            super().fail(error)
            self._on_end(error)

    def close(self) -> None:
        if self._error is None:
            super().fail(PubSubError(f"subscription to {self.channel!r} is closed"))
