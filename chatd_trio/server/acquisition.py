"""A replica's background loops: acquiring pending chats and recovering stale ones.

docs/spec.md §1. The acquire loop claims as many pending chats as the replica has
room for (`AcquireConfig.max_running_turns`), whenever it is woken (local work, a
turn that ended) or its interval passes, and hands each to the `TurnSupervisor`.
The stale-recovery loop hands back chats whose heartbeat went stale. Both run
under one cancel scope, so that closing the replica can stop them alone.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

import trio

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio.config import Config
from chatd_trio.domain import Chat, ChatStatus
from chatd_trio.errors import ChatdError
from chatd_trio.server.publishing import Publisher
from chatd_trio.server.stats import Counters
from chatd_trio.server.supervision import TurnSupervisor
from chatd_trio.store.base import Lease, Store
from chatd_trio.streams import ChatStreams

__all__ = ["Acquisition"]

logger = logging.getLogger(__name__)


class Acquisition:
    """The acquire and stale-recovery loops of one replica."""

    def __init__(
        self,
        store: Store,
        streams: ChatStreams,
        config: Config,
        worker_id: uuid.UUID,
        turns: TurnSupervisor,
        counters: Counters,
        publish: Publisher,
    ) -> None:
        self._store = store
        self._streams = streams
        self._config = config
        self._worker_id = worker_id
        self._turns = turns
        self._counters = counters
        self._publish = publish
        # Cancelled when the replica closes: stops both loops, not the turns.
        self.scope = trio.CancelScope()
        self._work = trio.Event()

    def wake(self) -> None:
        """Signal local work: the acquire loop runs at once."""
        self._work.set()

    async def run(self) -> None:
        """Run both loops until `scope` is cancelled."""
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._acquire_loop)
                nursery.start_soon(self._stale_loop)

    async def _acquire_loop(self) -> None:
        cfg = self._config.acquire
        while True:
            await self._acquire_until_short_batch()
            with trio.move_on_after(cfg.acquire_interval):
                await self._work.wait()
            self._work = trio.Event()

    async def _acquire_until_short_batch(self) -> None:
        cfg = self._config.acquire
        while True:
            # Only as many as there is room for: a full replica leaves pending chats to its
            # peers (and a turn that ends wakes this loop).
            free = cfg.max_running_turns - len(self._turns.controls)
            if free <= 0:
                self._counters.acquire_skipped_full += 1
                return
            limit = min(cfg.max_chats_per_acquire, free)
            # The claim runs shielded so that a close cannot cancel it after the database
            # committed; a close observed afterwards hands the chats straight back. A claim
            # cut off by its deadline may have committed: stale recovery returns those.
            chats: list[Chat] = []
            with bounded_cleanup(self._config.loop.cleanup_timeout):
                try:
                    chats = await self._store.acquire(
                        self._worker_id, limit, announce=self._streams.announcer, prompts=True
                    )
                except ChatdError as exc:
                    logger.warning(
                        "acquire failed",
                        extra={"worker_id": str(self._worker_id), "error": str(exc)},
                    )
                    chats = []
            self._counters.acquire_statements += 1
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
            except trio.Cancelled:
                await self._release_on_close(chats)
                raise
            for chat in chats:
                self._counters.acquired += 1
                self._turns.start(chat)
            if len(chats) < limit:
                return

    async def _release_on_close(self, chats: Sequence[Chat]) -> None:
        if not chats:
            return
        with bounded_cleanup(self._config.loop.cleanup_timeout):
            try:
                await self._store.release([Lease.of(c) for c in chats])
                self._counters.released_on_close += len(chats)
            except ChatdError as exc:
                # Stale recovery hands them back once their heartbeat goes stale.
                logger.warning(
                    "release failed", extra={"error": str(exc), "why": "released_on_close"}
                )

    async def _stale_loop(self) -> None:
        while True:
            await trio.sleep(self._config.acquire.stale_recovery_interval)
            await self.recover_stale_once()

    async def recover_stale_once(self) -> None:
        """Hand back the chats whose heartbeat went stale (on any replica)."""
        announce = self._streams.announcer
        try:
            ids = await self._store.recover_stale(
                self._config.acquire.stale_after, announce=announce
            )
        except ChatdError as exc:
            logger.warning("stale recovery failed", extra={"error": str(exc)})
            return
        if not ids:
            return
        self._counters.stale_recovered += len(ids)
        logger.info("recovered stale chats", extra={"count": len(ids)})
        if announce is None:
            for chat_id in ids:
                await self._publish.quietly(
                    self._streams.publish_status(chat_id, ChatStatus.PENDING)
                )
        self.wake()
