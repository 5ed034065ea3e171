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

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from chatd_trio.config import PubSubConfig
from chatd_trio.errors import PubSubError
from chatd_trio.pubsub._shared import QueueSubscription, check_channel, check_publish
from chatd_trio.pubsub.auth import NotifyAuth, NotifyGate
from chatd_trio.pubsub.base import PubSubStatistics, Resync

__all__ = ["MemoryPubSub", "PubSubStatistics", "QueueSubscription", "check_publish"]


def _memory_auth(config: PubSubConfig) -> NotifyAuth:
    """The configured keys, else a random key of this process."""
    if config.auth.keys:
        return NotifyAuth.from_config(config.auth)
    return NotifyAuth.generate(max_age=config.auth.max_age)


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
