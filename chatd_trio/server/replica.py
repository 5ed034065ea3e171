"""`Server`: one replica, and what a caller does with it.

The replica's lifecycle (`run`, `close`, ``async with``), the owner-checked
mutations (`create_chat`, `send_message`, `edit_message`, `interrupt`, the queue
operations), the waits (`wait_turn`, `send_and_wait`), `subscribe` and `stats()`.
What runs behind them lives beside this module: `acquisition` (the background
loops), `supervision` (every turn), `env` (what a turn knows and its tools) and
`publishing` (what a write committed, published after it).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Literal

import trio

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio._groups import unwrapped
from chatd_trio.agent.base import AgentDialer, WorkspaceProvisioner
from chatd_trio.config import Config, RequestOptions
from chatd_trio.domain import (
    Chat,
    ChatStatus,
    Message,
    Part,
    TextPart,
    parse_row_id,
    parse_uuid,
    text_of,
)
from chatd_trio.errors import DecodeError, PermissionDenied
from chatd_trio.pubsub.base import PubSub
from chatd_trio.server.acquisition import Acquisition
from chatd_trio.server.env import ModelSource, ToolsFactory, TurnTools
from chatd_trio.server.publishing import Publisher
from chatd_trio.server.stats import Counters, ServerStats, ServerStreamStats
from chatd_trio.server.supervision import TurnSupervisor
from chatd_trio.store.base import EditResult, SendResult, Store
from chatd_trio.strategies import Strategies
from chatd_trio.streams import ChatStreams, StreamSubscription
from chatd_trio.subagents import SubagentStats, title_from_prompt
from chatd_trio.tools import ToolRegistry
from chatd_trio.turns import TurnReport, settled, wait_settled
from chatd_trio.workspace import AgentRows, McpToolCache, WorkspaceStats

__all__ = ["BusyBehavior", "Server"]

BusyBehavior = Literal["queue", "interrupt"]


class Server:
    """One replica running chats from a shared store.

    Use as ``async with Server(store, pubsub, model, config) as server:`` (an exception
    of the block leaves as itself) or ``await nursery.start(server.run)``.
    `pubsub=None` is the single-process mode.

    `model` is one `Model` for every chat or a function choosing one per chat.
    `tools` are offered to every turn; `tools_factory` replaces the default per-turn
    registry (the tools, plus workspace tools when a `dialer` is given, plus the
    subagent tools for root chats when `subagents` is true). `provisioner` adds the
    create/start/stop workspace tools. `worker_id` names this replica (random by default).
    `strategies` are the optimised ways by default; the benchmarks pass the plain ones
    to measure what each optimisation buys (`chatd_trio.strategies`).
    """

    def __init__(
        self,
        store: Store,
        pubsub: PubSub | None,
        model: ModelSource,
        config: Config | None = None,
        *,
        tools: ToolRegistry | None = None,
        tools_factory: ToolsFactory | None = None,
        worker_id: uuid.UUID | None = None,
        dialer: AgentDialer | None = None,
        provisioner: WorkspaceProvisioner | None = None,
        subagents: bool = True,
        strategies: Strategies | None = None,
    ) -> None:
        self.store = store
        self.pubsub = pubsub
        self.config = config if config is not None else Config()
        self.strategies = strategies if strategies is not None else Strategies()
        self.worker_id = worker_id if worker_id is not None else uuid.uuid4()
        self.streams = ChatStreams(store, pubsub, self.config.streams, strategies=self.strategies)
        self.mcp_cache = McpToolCache(self.config.workspace)
        # Agent rows never change: a turn bound to a known agent reads none.
        self.agent_rows = AgentRows(self.config.workspace)
        self.workspace_stats = WorkspaceStats()
        self.subagent_stats = SubagentStats()
        self._counters = Counters()
        self._publish = Publisher(self.streams, pubsub, self.config.loop.cleanup_timeout)
        turn_tools = TurnTools(
            tools if tools is not None else ToolRegistry(),
            tools_factory,
            dialer,
            provisioner,
            subagents,
        )
        self._supervisor = TurnSupervisor(
            self, model, turn_tools, self._counters, self._publish, self.wake
        )
        self._acquisition = Acquisition(
            store,
            self.streams,
            self.config,
            self.worker_id,
            self._supervisor,
            self._counters,
            self._publish,
        )
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._closed = trio.Event()

    # -- lifecycle --------------------------------------------------------------------
    async def __aenter__(self) -> Server:
        # The replica's nursery is its own business: the block's exception leaves as itself.
        self._outer = unwrapped(trio.open_nursery())
        nursery = await self._outer.__aenter__()
        try:
            await nursery.start(self.run)
        except BaseException as exc:
            await self._outer.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # Shielded: leaving the block by a cancellation still hands the chats back. The
        # turns' own shielded writes are bounded; this bounds the waiting for them.
        with bounded_cleanup(self.config.loop.close_timeout):
            await self.close()
        return await self._outer.__aexit__(exc_type, exc, tb)

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the replica until `close()`; reports itself through `task_status`."""
        if self._started:
            raise RuntimeError("a Server runs once")
        self._started = True
        async with trio.open_nursery() as nursery:
            self._nursery = self._supervisor.nursery = nursery
            await self._acquisition.recover_stale_once()
            nursery.start_soon(self._acquisition.run)
            task_status.started(self)
            await self._closed.wait()
            nursery.cancel_scope.cancel()

    async def close(self) -> None:
        """Stop acquiring, shut running turns down (-> pending), wait for every task.

        A close cut short (cancelled, or past `loop.close_timeout` when leaving
        ``async with``) still stops the replica: its remaining tasks are cancelled.
        """
        if self._closed.is_set() or self._nursery is None:
            self._closed.set()
            return
        self._acquisition.scope.cancel()
        self._supervisor.shutdown("replica shutting down")
        try:
            await self._supervisor.idle.wait()
        finally:
            # `run` cancels the nursery once this is set; left unset, it would wait forever.
            self._closed.set()

    def wake(self) -> None:
        """Signal local work: the acquire loop runs at once."""
        self._acquisition.wake()

    # -- mutations (owner-checked) ------------------------------------------------------
    async def _owned_chat(self, owner_id: uuid.UUID, chat_id: uuid.UUID) -> Chat:
        owner_id, chat_id = _ids(owner_id, chat_id)
        chat = await self.store.get_chat(chat_id)
        if chat.owner_id != owner_id:
            raise PermissionDenied(f"chat {chat_id} does not belong to this user")
        return chat

    @staticmethod
    def _as_parts(content: str | Sequence[Part]) -> tuple[Part, ...]:
        if isinstance(content, str):
            return (TextPart(content),)
        given: object = content  # callers are untyped: anything may arrive
        if isinstance(given, bytes | bytearray) or not isinstance(given, Sequence):
            kind = type(given).__name__
            raise DecodeError("content", f"expected text or a sequence of parts, got {kind}")
        return tuple(content)

    async def create_chat(
        self,
        owner_id: uuid.UUID,
        content: str | Sequence[Part],
        *,
        title: str | None = None,
        workspace_id: uuid.UUID | None = None,
        build_id: uuid.UUID | None = None,
        agent_id: uuid.UUID | None = None,
        parent_chat_id: uuid.UUID | None = None,
        mcp_servers: Sequence[str] = (),
        system_prompt: str | None = None,
        model_options: RequestOptions | None = None,
    ) -> Chat:
        """Create a chat with its first user message; it starts `pending`.

        `model_options` are kept with the chat and merged over the model's own options
        for every model call of the chat (docs/providers.md, "Per chat").
        Refused with `DecodeError` (nothing stored) when the content is blank or cannot
        be stored, `PayloadTooLarge` beyond `Config.limits`."""
        owner_id = parse_uuid(owner_id, "owner_id")
        if parent_chat_id is not None:
            parent_chat_id = parse_uuid(parent_chat_id, "parent_chat_id")
        parts = self._as_parts(content)
        if title is None:
            title = title_from_prompt(text_of(parts), self.config.subagents)
        if parent_chat_id is not None:
            parent = await self.store.get_chat(parent_chat_id)
            if parent.owner_id != owner_id:
                raise PermissionDenied("the parent chat belongs to another user")
        chat, _ = await self.store.create_chat(
            owner_id,
            title,
            parts,
            workspace_id=workspace_id,
            build_id=build_id,
            agent_id=agent_id,
            parent_chat_id=parent_chat_id,
            mcp_servers=mcp_servers,
            system_prompt=system_prompt,
            model_options=model_options,
            limits=self.config.limits,
            announce=self.streams.announcer,
        )
        if self.streams.announcer is None:
            await self._publish.owner(chat, "created")
        self.wake()
        return chat

    async def get_chat(self, owner_id: uuid.UUID, chat_id: uuid.UUID) -> Chat:
        """The chat, if the user owns it."""
        return await self._owned_chat(owner_id, chat_id)

    async def messages(
        self, owner_id: uuid.UUID, chat_id: uuid.UUID, after_message_id: int = 0
    ) -> list[Message]:
        """User-visible messages after a cursor."""
        chat = await self._owned_chat(owner_id, chat_id)
        after = parse_row_id(after_message_id, "after_message_id")
        return await self.store.messages_after(chat.id, after)

    async def send_message(
        self,
        owner_id: uuid.UUID,
        chat_id: uuid.UUID,
        content: str | Sequence[Part],
        *,
        busy_behavior: BusyBehavior = "queue",
    ) -> SendResult:
        """Send a user message: inserted (chat -> pending) or queued when busy.

        `busy_behavior="interrupt"` queues, then interrupts the running turn. Content is
        checked as by `create_chat`.
        """
        owner_id, chat_id = _ids(owner_id, chat_id)
        if busy_behavior not in ("queue", "interrupt"):
            raise DecodeError("busy_behavior", f"not 'queue' or 'interrupt': {busy_behavior!r}")
        announce = self.streams.announcer
        # The owner check is the write's own guard: no read before it.
        result = await self.store.send_message(
            chat_id,
            self._as_parts(content),
            max_queued=self.config.queue.max_queued,
            announce=announce,
            owner_id=owner_id,
            limits=self.config.limits,
        )
        if result.message is not None:
            await self._publish.message(result.message)
            if announce is None:
                await self._publish.status(result.chat)
                await self._publish.owner(result.chat, "status")
            self.wake()
        else:
            if announce is None:
                await self._publish.quietly(
                    self.streams.publish_queue_update(chat_id, result.queue)
                )
            if busy_behavior == "interrupt" and result.chat.status is ChatStatus.RUNNING:
                await self._interrupt(chat_id, owner_id)
        return result

    async def edit_message(
        self,
        owner_id: uuid.UUID,
        chat_id: uuid.UUID,
        message_id: int,
        content: str | Sequence[Part],
    ) -> EditResult:
        """Replace a user message: it and every later message are dropped, the queue is
        cleared, the chat goes `pending` (a running turn stops). Content is checked as by
        `create_chat`."""
        owner_id, chat_id = _ids(owner_id, chat_id)
        message_id = parse_row_id(message_id, "message_id")
        announce = self.streams.announcer
        result = await self.store.edit_message(
            chat_id,
            message_id,
            self._as_parts(content),
            announce=announce,
            owner_id=owner_id,
            limits=self.config.limits,
        )
        # The edit may have dropped the instruction message: the next turn re-checks.
        self.mcp_cache.forget_chat(chat_id)
        self._supervisor.stop_local(chat_id, "message edited")
        await self._publish.committed(
            self.streams.publish_edited_message(result.message, announced=announce is not None)
        )
        if announce is None:
            await self._publish.status(result.chat)
            await self._publish.quietly(self.streams.publish_queue_update(chat_id, ()))
            await self._publish.owner(result.chat, "status")
        self.wake()
        return result

    async def interrupt(self, owner_id: uuid.UUID, chat_id: uuid.UUID) -> Chat:
        """Stop the chat's running turn (kept output is persisted); it ends `waiting`."""
        owner_id, chat_id = _ids(owner_id, chat_id)
        return await self._interrupt(chat_id, owner_id)

    async def _interrupt(self, chat_id: uuid.UUID, owner_id: uuid.UUID | None) -> Chat:
        announce = self.streams.announcer
        chat = await self.store.interrupt(chat_id, owner_id=owner_id, announce=announce)
        self._supervisor.stop_local(chat_id, "user interrupt")
        if announce is None:
            await self._publish.quietly(
                self.streams.publish_status(chat_id, chat.status, None, chat.owner_token)
            )
            if chat.status is not ChatStatus.PENDING:  # a pending chat is left as it was
                await self._publish.owner(chat, "status")
        return chat

    async def promote_queued(
        self, owner_id: uuid.UUID, chat_id: uuid.UUID, queued_id: int
    ) -> SendResult:
        """Send a queued message now (or move it to the front while the chat runs)."""
        owner_id, chat_id = _ids(owner_id, chat_id)
        queued_id = parse_row_id(queued_id, "queued_id")
        announce = self.streams.announcer
        result = await self.store.promote_queued(
            chat_id, queued_id, announce=announce, owner_id=owner_id
        )
        if result.message is not None:
            await self._publish.message(result.message)
            if announce is None:
                await self._publish.status(result.chat)
                await self._publish.owner(result.chat, "status")
            self.wake()
        if announce is None:
            await self._publish.quietly(self.streams.publish_queue_update(chat_id, result.queue))
        return result

    async def delete_queued(self, owner_id: uuid.UUID, chat_id: uuid.UUID, queued_id: int) -> None:
        """Remove a queued message."""
        owner_id, chat_id = _ids(owner_id, chat_id)
        announce = self.streams.announcer
        queue = await self.store.delete_queued(
            chat_id, parse_row_id(queued_id, "queued_id"), owner_id=owner_id, announce=announce
        )
        if announce is None:
            await self._publish.quietly(self.streams.publish_queue_update(chat_id, queue))

    async def wait_turn(
        self, owner_id: uuid.UUID, chat_id: uuid.UUID, *, after_message_id: int = 0
    ) -> TurnReport:
        """Wait until the chat has no work left (`waiting` or `error`) and report how it
        ended: the row, the messages after `after_message_id`, and the error if it failed.

        Returns at once when the chat is already settled. Wakes on the chat's stream, on
        any replica. Unbounded: wrap it in `trio.fail_after` for a deadline. Raises
        `StoreError` or `PubSubError` when the stream fails first (call again).
        """
        await self._owned_chat(owner_id, chat_id)
        return await wait_settled(
            self.streams, self.store, chat_id, after_message_id, quiesce=self._supervisor.wait_ended
        )

    async def send_and_wait(
        self,
        owner_id: uuid.UUID,
        chat_id: uuid.UUID,
        content: str | Sequence[Part],
        *,
        busy_behavior: BusyBehavior = "queue",
    ) -> TurnReport:
        """`send_message`, then `wait_turn` until the message is answered.

        The report's messages start with the sent message. Sent to a busy chat, the
        message is queued and answered after the running turn: the report then also
        holds what that turn added after the send.
        """
        chat = await self._owned_chat(owner_id, chat_id)
        before: int | None = None
        if not settled(chat):
            # It will be queued: its id is known only once promoted, so the report
            # starts after the history as it is now.
            before = await self._last_message_id(chat_id)
        result = await self.send_message(owner_id, chat_id, content, busy_behavior=busy_behavior)
        if result.message is not None:
            cursor = result.message.id - 1
        elif before is not None:
            cursor = before
        else:
            # Queued behind a message sent a moment ago by someone else.
            cursor = await self._last_message_id(chat_id)
        return await wait_settled(
            self.streams, self.store, chat_id, cursor, quiesce=self._supervisor.wait_ended
        )

    async def _last_message_id(self, chat_id: uuid.UUID) -> int:
        history = await self.store.messages_after(chat_id, 0)
        return history[-1].id if history else 0

    @asynccontextmanager
    async def subscribe(
        self, owner_id: uuid.UUID, chat_id: uuid.UUID, after_message_id: int = 0
    ) -> AsyncIterator[StreamSubscription]:
        """Subscribe to a chat's events (snapshot, then live), if the user owns it."""
        chat_id = (await self._owned_chat(owner_id, chat_id)).id
        after = parse_row_id(after_message_id, "after_message_id")
        async with self.streams.subscribe(chat_id, after) as sub:
            yield sub

    # -- observability ------------------------------------------------------------------
    @property
    def running_chats(self) -> frozenset[uuid.UUID]:
        """Chats with a turn on this replica right now."""
        return frozenset(self._supervisor.running)

    def stats(self) -> ServerStats:
        """Counters: statements by name, turns, retries, interrupts, compactions, drops."""
        c = self._counters
        s = self.streams.statistics()
        return ServerStats(
            worker_id=self.worker_id,
            statements=self.store.statement_counts(),
            turns_started=c.turns_started,
            turns_finished=dict(self._supervisor.finished),
            running=len(self._supervisor.running),
            acquired=c.acquired,
            acquire_statements=c.acquire_statements,
            released_on_close=c.released_on_close,
            heartbeats_lost=c.heartbeats_lost,
            stale_recovered=c.stale_recovered,
            interrupts=c.interrupts,
            retries=c.retries,
            compactions=c.compactions,
            reentries=c.reentries,
            steps=c.steps,
            fenced=c.fenced,
            late_tool_results_dropped=c.late_tool_results_dropped,
            store_retries=c.store_retries,
            acquire_skipped_full=c.acquire_skipped_full,
            workspace=self.workspace_stats.statistics(),
            subagents=self.subagent_stats.statistics(),
            streams=ServerStreamStats(
                dropped_buffer=s.dropped_buffer,
                dropped_subscriber=s.dropped_subscriber,
                db_catchup_reads=s.db_catchup_reads,
                cache_hits=s.cache_hits,
                carried_hits=s.carried_hits,
                snapshot_reads=s.snapshot_reads,
                notifies_rejected=0 if self.pubsub is None else self.pubsub.statistics().rejected,
            ),
        )


def _ids(owner_id: object, chat_id: object) -> tuple[uuid.UUID, uuid.UUID]:
    """An API caller's owner and chat ids as UUIDs: a malformed one is the same
    `DecodeError` on every store (a UUID's text is accepted)."""
    return parse_uuid(owner_id, "owner_id"), parse_uuid(chat_id, "chat_id")
