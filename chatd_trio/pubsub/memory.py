"""The in-memory PubSub: the embedded default for one process.

It behaves like the PostgreSQL adapter (same payload and channel limits, same
errors) so the contract suite runs unchanged against both. Publishing never
blocks: each subscription buffers without bound, which is fine in one process
where the reader is a local task (the per-chat stream applies its own bounded
queues on top).

Payloads are sealed and opened exactly as by the PostgreSQL adapter, under a key
of its own unless one is given: nothing outside the process can publish here, but
the same path runs, so a payload that does not open (a store handing over a raw
`publish_nowait`) is dropped and counted the same way.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from chatd_trio.config import PubSubConfig
from chatd_trio.errors import DecodeError, PayloadTooLarge, PubSubError
from chatd_trio.pubsub.auth import NotifyAuth, NotifyGate
from chatd_trio.pubsub.base import Delivery, PubSubStatistics, Resync

__all__ = ["MemoryPubSub", "PubSubStatistics", "QueueSubscription", "check_publish"]


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


def _memory_auth(config: PubSubConfig) -> NotifyAuth:
    """The configured keys, else a random key of this process."""
    if config.auth.keys:
        return NotifyAuth.from_config(config.auth)
    return NotifyAuth.generate(max_age=config.auth.max_age)


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


class MemoryPubSub:
    """PubSub for one process: every payload once to every subscription active when published."""

    def __init__(
        self, config: PubSubConfig | None = None, *, auth: NotifyAuth | None = None
    ) -> None:
        """`auth`: the keys to seal and open with; default `config.auth.keys`, else a
        random key of this instance (the environment is not read)."""
        self._config = config or PubSubConfig()
        self._gate = NotifyGate(auth or _memory_auth(self._config), self._config.auth, "memory")
        self._subs: dict[str, set[QueueSubscription]] = {}
        self._published = 0
        self._delivered = 0
        self._resyncs = 0

    @property
    def payload_limit(self) -> int:
        """Largest payload in bytes before sealing (what PostgreSQL's NOTIFY carries)."""
        return self._gate.auth.max_payload(self._config.payload_limit)

    def seal(self, channel: str, payload: str) -> str:
        """The sealed form of `payload` for `channel` (for `publish_nowait`)."""
        check_publish(channel, payload, self._config, self.payload_limit)
        return self._gate.auth.seal(channel, payload)

    async def publish(self, channel: str, payload: str) -> None:
        """Deliver `payload` to every current subscription of `channel`; never blocks."""
        wire = self.seal(channel, payload)
        # Check for cancellation first, then publish atomically: a cancelled publish
        # has delivered nothing, a returned one has delivered everywhere.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._published += 1
        self._deliver_all(channel, wire)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def publish_nowait(self, channel: str, wire: str) -> None:
        """Deliver `wire` exactly as given, without checkpoints, as PostgreSQL delivers a
        NOTIFY: for a `MemoryStore` sending what `seal` returned within an operation.

        Opened on delivery like every payload: one that does not open is dropped and
        counted. Not counted as `published`: like PostgreSQL's NOTIFY inside a
        transaction, the store counts it (`NotifyInTransaction`).
        """
        self.check_nowait(channel, wire)
        self._deliver_all(channel, wire)

    def check_nowait(self, channel: str, wire: str) -> None:
        """Raise what `publish_nowait(channel, wire)` would raise, delivering nothing: a
        store checks its notifies before it changes anything."""
        check_publish(channel, wire, self._config, self._config.payload_limit)

    def _deliver_all(self, channel: str, wire: str) -> None:
        subs = self._subs.get(channel)
        if not subs:
            return  # nobody listens: like an unLISTENed channel, nothing is received
        payload = self._gate.admit(channel, wire)
        if payload is None:
            return
        for sub in list(subs):
            if sub.deliver(payload):
                self._delivered += 1

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[QueueSubscription]:
        """Subscribe to `channel` for the duration of the block; active on entry."""
        check_channel(channel, self._config)
        await trio.lowlevel.checkpoint()
        sub = QueueSubscription(channel)
        self._subs.setdefault(channel, set()).add(sub)
        try:
            yield sub
        finally:
            self._remove(sub)

    def _remove(self, sub: QueueSubscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.channel]
        sub.close()

    # -- test hooks ---------------------------------------------------------------

    def force_resync(self, reason: str = "forced") -> int:
        """Deliver `Resync(reason)` to every subscription, as after a reconnect.

        Returns the number of subscriptions told.
        """
        told = 0
        for subs in self._subs.values():
            for sub in subs:
                if sub.deliver(Resync(reason)):
                    told += 1
        self._resyncs += told
        return told

    def break_subscriptions(self, channel: str | None = None) -> int:
        """Make the subscriptions of `channel` (all when None) raise `PubSubError`.

        Simulates a channel that can no longer be served; returns how many failed.
        """
        channels = [channel] if channel is not None else list(self._subs)
        broken = 0
        for name in channels:
            for sub in self._subs.pop(name, set()):
                sub.fail(PubSubError(f"channel {name!r} can no longer be served"))
                broken += 1
        return broken

    def statistics(self) -> PubSubStatistics:
        """Counters since construction."""
        return PubSubStatistics(
            channels=len(self._subs),
            subscriptions=sum(len(s) for s in self._subs.values()),
            published=self._published,
            delivered=self._delivered,
            resyncs=self._resyncs,
            rejected=self._gate.rejected,
        )
