"""Publishing what a replica's writes committed (`chatd_trio.server`).

A store write with ``announce=streams.announcer`` sends its notifies inside its
transaction; without an announcer (no pubsub on the store's database, or the
after-commit strategy) the replica publishes them itself after the commit, through
this `Publisher`. A failed publish is logged, never raised: the write stands, and
subscribers catch up at their next notify or read.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio.domain import Chat, Message, owner_channel, owner_payload
from chatd_trio.errors import ChatdError
from chatd_trio.pubsub.base import PubSub
from chatd_trio.streams import ChatStreams

__all__ = ["Publisher"]

logger = logging.getLogger(__name__)


class Publisher:
    """The replica's publishes after a commit: messages, statuses, owner events."""

    def __init__(self, streams: ChatStreams, pubsub: PubSub | None, cleanup_timeout: float):
        self._streams = streams
        self._pubsub = pubsub
        self._cleanup_timeout = cleanup_timeout

    async def message(self, message: Message) -> None:
        """Publish a message a store operation inserted with `announce=streams.announcer`."""
        announced = self._streams.announcer is not None
        if announced and self._streams.cache_announced(message):
            return  # the store sent its notify; the cache took it without waiting
        await self.committed(self._streams.publish_message(message, announced=announced))

    async def committed(self, publish: Awaitable[None]) -> None:
        """Publish what is already committed, shielded (bounded by cleanup_timeout): a
        caller cancelled now must not leave it unannounced."""
        with bounded_cleanup(self._cleanup_timeout):
            await self.quietly(publish)

    async def quietly(self, publish: Awaitable[None]) -> None:
        """Publish; a failure is logged, not raised."""
        try:
            await publish
        except ChatdError as exc:
            logger.warning("publish failed", extra={"error": str(exc)})

    async def status(self, chat: Chat) -> None:
        """The chat's status, as the row says."""
        await self.quietly(
            self._streams.publish_status(chat.id, chat.status, chat.worker_id, chat.owner_token)
        )

    async def owner(self, chat: Chat, kind: str) -> None:
        """An event on the owner's chat-list channel (none without a pubsub)."""
        if self._pubsub is None:
            return
        payload = owner_payload(chat, kind)
        await self.quietly(self._pubsub.publish(owner_channel(chat.owner_id), payload))
