"""The Server: one replica. Acquisition, heartbeats, stale recovery, control, turns.

docs/spec.md §1 and §2. Every task lives in the server's nursery: the acquire
loop, the stale-recovery loop and one task per running turn; a turn's own
nursery holds its heartbeat and its control listener. Closing is cancellation:
acquisition stops, running turns are shut down (their chats go back to
`pending` with no error) and the server waits for every task.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import trio

from chatd_trio.config import Config
from chatd_trio.domain import (
    Chat,
    ChatStatus,
    ErrorPayload,
    Message,
    MessagePartEvent,
    NotifyPayload,
    Part,
    RetryPayload,
    TextPart,
    dumps,
    owner_channel,
    stream_channel,
)
from chatd_trio.errors import (
    ChatdError,
    DecodeError,
    PermissionDenied,
    PubSubError,
)
from chatd_trio.loop import TurnCallbacks, TurnControl, TurnResult, run_turn
from chatd_trio.models.base import Model
from chatd_trio.pubsub.base import PubSub, Resync
from chatd_trio.store.base import EditResult, SendResult, Store, TurnOutcome
from chatd_trio.streams import ChatStreams, StreamSubscription
from chatd_trio.subagents import SubagentStats, subagent_tools, title_from_prompt
from chatd_trio.tools import ToolContext, ToolRegistry
from chatd_trio.workspace import (
    AgentDialer,
    McpToolCache,
    WorkspaceContext,
    WorkspaceProvisioner,
    WorkspaceStats,
)

logger = logging.getLogger(__name__)

ModelSource = Model | Callable[[Chat], Model]
BusyBehavior = Literal["queue", "interrupt"]
ToolsFactory = Callable[["TurnEnv"], Awaitable[ToolRegistry]]


@dataclass
class TurnEnv:
    """What a running turn knows: handed to tool factories and turn hooks."""

    server: Server
    chat: Chat
    control: TurnControl
    nursery: trio.Nursery
    extras: dict[str, object] = field(default_factory=dict)
    # Run after the turn (shielded, in reverse order): release turn-local resources.
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@dataclass(frozen=True)
class ServerStats:
    """Counters of one replica since it started (docs/spec.md §7: statements by name)."""

    worker_id: uuid.UUID
    statements: dict[str, int]
    turns_started: int
    turns_finished: dict[str, int]
    running: int
    acquired: int
    acquire_statements: int
    released_on_close: int
    heartbeats_lost: int
    stale_recovered: int
    interrupts: int
    retries: int
    compactions: int
    reentries: int
    steps: int
    extra: dict[str, int]
    streams: dict[str, int]


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class Server:
    """One replica running chats from a shared store.

    Use as ``async with Server(store, pubsub, model, config) as server:`` or
    ``await nursery.start(server.run)``. `pubsub=None` is the single-process mode.

    `model` is one `Model` for every chat or a function choosing one per chat.
    `tools` are offered to every turn; `tools_factory` replaces the default per-turn
    registry (the tools, plus workspace tools when a `dialer` is given, plus the
    subagent tools for root chats when `subagents` is true). `provisioner` adds the
    create/start/stop workspace tools. `worker_id` names this replica (random by default).
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
    ) -> None:
        self.store = store
        self.pubsub = pubsub
        self.config = config if config is not None else Config()
        self.worker_id = worker_id if worker_id is not None else uuid.uuid4()
        self.streams = ChatStreams(store, pubsub, self.config.streams)
        self._model = model
        self._tools = tools if tools is not None else ToolRegistry()
        self._tools_factory = tools_factory
        self._dialer = dialer
        self._provisioner = provisioner
        self._subagents = subagents
        self.mcp_cache = McpToolCache(self.config.workspace)
        self.workspace_stats = WorkspaceStats()
        self.subagent_stats = SubagentStats()
        self._turns: dict[uuid.UUID, TurnControl] = {}
        self._turns_idle = trio.Event()
        self._turns_idle.set()
        # Replaced each time a turn is over: the acquire loop waits on it for stopped turns.
        self._turn_over = trio.Event()
        # Chats handed back because their previous turn here had not ended yet.
        self._rerun: set[uuid.UUID] = set()
        self._work = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._background = trio.CancelScope()
        self._started = False
        self._closed = trio.Event()
        self._counts: dict[str, int] = {}
        self._finished: dict[str, int] = {}
        self.extra_counters: dict[str, int] = {}

    # -- lifecycle --------------------------------------------------------------------
    async def __aenter__(self) -> Server:
        self._outer = trio.open_nursery()
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
        with trio.CancelScope(shield=True):
            await self.close()
        return await self._outer.__aexit__(exc_type, exc, tb)

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the replica until `close()`; reports itself through `task_status`."""
        if self._started:
            raise RuntimeError("a Server runs once")
        self._started = True
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._recover_stale_once()
            nursery.start_soon(self._background_loops)
            task_status.started(self)
            await self._closed.wait()
            nursery.cancel_scope.cancel()

    async def close(self) -> None:
        """Stop acquiring, shut running turns down (-> pending), wait for every task."""
        if self._closed.is_set() or self._nursery is None:
            self._closed.set()
            return
        self._background.cancel()
        for control in list(self._turns.values()):
            control.shutdown("replica shutting down")
        await self._turns_idle.wait()
        self._closed.set()

    def wake(self) -> None:
        """Signal local work: the acquire loop runs at once."""
        self._work.set()

    # -- background loops -------------------------------------------------------------
    async def _background_loops(self) -> None:
        with self._background:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._acquire_loop)
                nursery.start_soon(self._stale_loop)

    async def _acquire_loop(self) -> None:
        cfg = self.config.acquire
        while True:
            await self._acquire_until_short_batch()
            with trio.move_on_after(cfg.acquire_interval):
                await self._work.wait()
            self._work = trio.Event()

    async def _wait_for_stopped_turns(self) -> None:
        # Ownership is per replica (worker_id), not per turn: a stopped turn that has not
        # ended yet would see its chat, re-acquired here, as its own and write into it
        # (its interrupted step, its final transition). Stopped turns end within their
        # cleanup deadlines, so acquisition waits for them.
        while any(c.stop_reason is not None for c in self._turns.values()):
            await self._turn_over.wait()

    async def _acquire_until_short_batch(self) -> None:
        limit = self.config.acquire.max_chats_per_acquire
        while True:
            await self._wait_for_stopped_turns()
            # The claim runs shielded so that a close cannot cancel it after the database
            # committed; a close observed afterwards hands the chats straight back.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.config.loop.cleanup_timeout
                try:
                    chats = await self.store.acquire(self.worker_id, limit)
                except ChatdError as exc:
                    logger.warning(
                        "acquire failed",
                        extra={"worker_id": str(self.worker_id), "error": str(exc)},
                    )
                    chats = []
            self._bump("acquire_statements")
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
            except trio.Cancelled:
                await self._release_on_close(chats)
                raise
            assert self._nursery is not None
            # A chat whose previous turn is still here (stopped elsewhere, not yet noticed):
            # hand it back, stop that turn, acquire again once it has ended.
            busy = {c.id for c in chats if c.id in self._turns}
            # Marked before the release awaits: the old turn may end meanwhile, and its
            # end is what wakes acquisition for the rerun.
            for chat_id in busy:
                self._rerun.add(chat_id)
                self._stop_local(chat_id, "chat changed elsewhere")
            if busy:
                await self._release([c for c in chats if c.id in busy], "released_busy")
            for chat in chats:
                if chat.id in busy:
                    continue
                self._rerun.discard(chat.id)
                self._bump("acquired")
                self._start_turn(chat)
            if len(chats) < limit:
                return

    async def _release_on_close(self, chats: Sequence[Chat]) -> None:
        await self._release(chats, "released_on_close")

    async def _release(self, chats: Sequence[Chat], counter: str) -> None:
        if not chats:
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.config.loop.cleanup_timeout
            try:
                await self.store.release(self.worker_id, [c.id for c in chats])
                self._bump(counter, len(chats))
            except ChatdError as exc:
                # Stale recovery hands them back once their heartbeat goes stale.
                logger.warning("release failed", extra={"error": str(exc), "why": counter})

    async def _stale_loop(self) -> None:
        while True:
            await trio.sleep(self.config.acquire.stale_recovery_interval)
            await self._recover_stale_once()

    async def _recover_stale_once(self) -> None:
        try:
            ids = await self.store.recover_stale(self.config.acquire.stale_after)
        except ChatdError as exc:
            logger.warning("stale recovery failed", extra={"error": str(exc)})
            return
        if not ids:
            return
        self._bump("stale_recovered", len(ids))
        logger.info("recovered stale chats", extra={"count": len(ids)})
        for chat_id in ids:
            await self._publish_quietly(self.streams.publish_status(chat_id, ChatStatus.PENDING))
        self.wake()

    # -- turns --------------------------------------------------------------------------
    def _start_turn(self, chat: Chat) -> None:
        assert self._nursery is not None
        control = TurnControl()
        self._turns[chat.id] = control
        self._turns_idle = trio.Event()
        self._nursery.start_soon(self._turn, chat, control)

    def _model_for(self, chat: Chat) -> Model:
        if isinstance(self._model, Model):
            return self._model
        return self._model(chat)

    async def _turn(self, chat: Chat, control: TurnControl) -> None:
        log = {"chat_id": str(chat.id), "worker_id": str(self.worker_id)}
        self._bump("turns_started")
        outcome = TurnOutcome.SHUTDOWN
        error: ErrorPayload | None = None
        # Stays None when a shutdown cancels the turn: `with control` absorbs that.
        result: TurnResult | None = None
        try:
            # Buffering starts BEFORE `running` is published (docs/spec.md §4).
            self.streams.start_turn(chat.id)
            await self._publish_quietly(
                self.streams.publish_status(chat.id, ChatStatus.RUNNING, self.worker_id)
            )
            with control:
                result = await self._supervised_turn(chat, control)
            if result is not None:
                outcome, error = result.outcome, result.error
                self._record(result)
        except* Exception as group:
            # `except*`: a failure raised beside a cancellation (a store error in a
            # shielded write while the replica is being cancelled) is handled here and
            # the cancellation goes on; it must not escape the server's nursery.
            logger.exception("turn crashed", extra=log)
            if trio.current_effective_deadline() != -math.inf:
                leaf = _first_leaf(group)
                outcome = TurnOutcome.ERROR
                error = ErrorPayload(message=str(leaf) or type(leaf).__name__, kind="internal")
        finally:
            if control.shut_down:
                outcome = TurnOutcome.SHUTDOWN
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.config.loop.cleanup_timeout
                await self._finish(chat, control, outcome, error)
            self._turn_done(chat.id, control, outcome)

    def _turn_done(self, chat_id: uuid.UUID, control: TurnControl, outcome: TurnOutcome) -> None:
        """The turn wrote its last row: it no longer counts as running here (idempotent)."""
        # Once the final transition has run the chat may be acquired again here; only
        # this turn's own entry and stream buffering end.
        if self._turns.get(chat_id) is not control:
            return
        del self._turns[chat_id]
        self._finished[outcome.value] = self._finished.get(outcome.value, 0) + 1
        self.streams.end_turn(chat_id)
        self._turn_over.set()
        self._turn_over = trio.Event()
        if chat_id in self._rerun:
            self._rerun.discard(chat_id)
            self.wake()
        if not self._turns:
            self._turns_idle.set()

    async def _supervised_turn(self, chat: Chat, control: TurnControl) -> TurnResult | None:
        async with trio.open_nursery() as aux:
            aux.start_soon(self._heartbeat, chat.id, control)
            if self.pubsub is not None:
                await aux.start(self._control_listener, chat.id, control)
            env = TurnEnv(self, chat, control, aux)
            try:
                return await self._run_loop(chat, control, env)
            finally:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + self.config.loop.cleanup_timeout
                    for cleanup in reversed(env.cleanups):
                        try:
                            await cleanup()
                        except Exception:
                            logger.exception("turn cleanup failed", extra={"chat_id": str(chat.id)})
                aux.cancel_scope.cancel()

    async def _run_loop(self, chat: Chat, control: TurnControl, env: TurnEnv) -> TurnResult:
        factory = self._tools_factory or self._default_tools
        tools = await factory(env)
        callbacks = TurnCallbacks(
            on_part=self._on_part,
            on_message=self._on_message_for(chat.id),
            on_retry=self._on_retry_for(chat.id),
            on_error=self._on_error_for(chat.id),
            announce=self.streams.announcer,
        )
        result = await run_turn(
            self.store,
            chat.id,
            self.worker_id,
            self._model_for(chat),
            tools=tools,
            config=self.config.loop,
            callbacks=callbacks,
            control=control,
            tool_context=ToolContext(chat.id, self.worker_id, env.extras),
        )
        return result

    async def _default_tools(self, env: TurnEnv) -> ToolRegistry:
        """The configured tools, plus workspace tools (with a dialer) and, for root
        chats, the subagent tools."""
        tools = list(self._tools)
        if self._dialer is not None:
            ctx = WorkspaceContext(
                self.store,
                env.chat,
                self.worker_id,
                self._dialer,
                self.config.workspace,
                env.nursery,
                self.mcp_cache,
                self.workspace_stats,
                provisioner=self._provisioner,
            )
            env.cleanups.append(ctx.aclose)
            env.extras["workspace"] = ctx
            # Bounded by the workspace timeouts; a stopped workspace leaves built-ins only.
            await ctx.prepare()
            tools.extend(ctx.tools())
        if self._subagents and env.chat.parent_chat_id is None:
            tools.extend(
                subagent_tools(
                    self,
                    self.store,
                    self.pubsub if self.config.subagents.use_pubsub else None,
                    self.config.subagents,
                    stats=self.subagent_stats,
                )
            )
        return ToolRegistry(tools)

    def _record(self, result: TurnResult) -> None:
        self._bump("steps", result.steps)
        self._bump("compactions", result.compactions)
        self._bump("reentries", result.reentries)
        self._bump("retries", result.retries)

    async def _on_part(self, event: MessagePartEvent) -> None:
        self.streams.publish_part(event)

    def _on_message_for(self, chat_id: uuid.UUID) -> Callable[[Message], Awaitable[None]]:
        async def on_message(message: Message) -> None:
            await self._publish_message(message)
            self.streams.step_persisted(chat_id)

        return on_message

    def _on_retry_for(self, chat_id: uuid.UUID) -> Callable[[RetryPayload], Awaitable[None]]:
        async def on_retry(payload: RetryPayload) -> None:
            await self._publish_quietly(self.streams.retry(chat_id, payload))

        return on_retry

    def _on_error_for(self, chat_id: uuid.UUID) -> Callable[[ErrorPayload], Awaitable[None]]:
        async def on_error(payload: ErrorPayload) -> None:
            await self._publish_quietly(self.streams.publish_error(chat_id, payload))

        return on_error

    async def _finish(
        self,
        chat: Chat,
        control: TurnControl,
        outcome: TurnOutcome,
        error: ErrorPayload | None,
    ) -> None:
        try:
            fin = await self.store.finish_turn(
                chat.id,
                self.worker_id,
                outcome,
                error.message if error else None,
                announce=self.streams.announcer,
            )
        except ChatdError as exc:
            # Stale recovery hands the chat back once the heartbeat goes stale.
            logger.warning(
                "final transition failed", extra={"chat_id": str(chat.id), "error": str(exc)}
            )
            return
        finally:
            self._turn_done(chat.id, control, outcome)
        if fin.owned_elsewhere:
            return
        if (
            outcome is TurnOutcome.ERROR
            and error is not None
            and fin.chat.status is ChatStatus.ERROR
        ):
            await self._publish_quietly(self.streams.publish_error(chat.id, error))
        if fin.promoted is not None:
            await self._publish_message(fin.promoted)
            await self._publish_quietly(self.streams.publish_queue_update(chat.id, fin.queue))
        if fin.changed:
            await self._publish_quietly(self.streams.publish_status(chat.id, fin.chat.status))
            await self._publish_owner(fin.chat, "status")
        if fin.chat.status is ChatStatus.PENDING:
            self.wake()

    async def _heartbeat(self, chat_id: uuid.UUID, control: TurnControl) -> None:
        interval = self.config.acquire.heartbeat_interval
        while True:
            await trio.sleep(interval)
            try:
                owned = await self.store.heartbeat(chat_id, self.worker_id)
            except ChatdError as exc:
                logger.warning(
                    "heartbeat failed", extra={"chat_id": str(chat_id), "error": str(exc)}
                )
                continue
            if not owned:
                self._bump("heartbeats_lost")
                logger.info("chat taken or finished elsewhere", extra={"chat_id": str(chat_id)})
                control.interrupt("lost ownership")
                return

    def _should_stop(self, status: ChatStatus | None, worker_id: uuid.UUID | None) -> bool:
        if status in (ChatStatus.WAITING, ChatStatus.PENDING, ChatStatus.ERROR):
            return True
        return (
            status is ChatStatus.RUNNING and worker_id is not None and worker_id != self.worker_id
        )

    async def _control_listener(
        self,
        chat_id: uuid.UUID,
        control: TurnControl,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        assert self.pubsub is not None
        started = False
        try:
            async with self.pubsub.subscribe(stream_channel(chat_id)) as sub:
                task_status.started()
                started = True
                async for delivery in sub:
                    status: ChatStatus | None
                    worker: uuid.UUID | None
                    if isinstance(delivery, Resync):
                        chat = await self.store.get_chat(chat_id)
                        status, worker = chat.status, chat.worker_id
                    else:
                        try:
                            payload = NotifyPayload.decode(delivery)
                        except DecodeError:
                            continue
                        status, worker = payload.status, payload.worker_id
                        if self._should_stop(status, worker):
                            # Notifies from other replicas may be stale: a sender's
                            # `pending` can arrive after this replica acquired the chat.
                            # The store has the last word before a turn is stopped.
                            chat = await self.store.get_chat(chat_id)
                            status, worker = chat.status, chat.worker_id
                    if self._should_stop(status, worker):
                        self._bump("interrupts")
                        control.interrupt(f"chat became {status}")
                        return
        except (PubSubError, ChatdError) as exc:
            # The heartbeat still notices a takeover; log and go on without the fast path.
            logger.warning(
                "control listener ended", extra={"chat_id": str(chat_id), "error": str(exc)}
            )
            if not started:
                task_status.started()

    async def _publish_message(self, message: Message) -> None:
        """Publish a message a store operation inserted with `announce=streams.announcer`."""
        announced = self.streams.announcer is not None
        await self._publish_committed(self.streams.publish_message(message, announced=announced))

    async def _publish_committed(self, publish: Awaitable[None]) -> None:
        """Publish what is already committed, shielded (bounded by cleanup_timeout): a
        caller cancelled now must not leave it unannounced."""
        with trio.move_on_after(self.config.loop.cleanup_timeout, shield=True):
            await self._publish_quietly(publish)

    async def _publish_quietly(self, publish: Awaitable[None]) -> None:
        try:
            await publish
        except ChatdError as exc:
            logger.warning("publish failed", extra={"error": str(exc)})

    async def _publish_owner(self, chat: Chat, kind: str) -> None:
        if self.pubsub is None:
            return
        payload = dumps(
            {
                "kind": kind,
                "chat_id": str(chat.id),
                "status": chat.status.value,
                "title": chat.title,
            }
        )
        await self._publish_quietly(self.pubsub.publish(owner_channel(chat.owner_id), payload))

    def _bump(self, name: str, n: int = 1) -> None:
        self._counts[name] = self._counts.get(name, 0) + n

    # -- mutations (owner-checked) ------------------------------------------------------
    async def _owned_chat(self, owner_id: uuid.UUID, chat_id: uuid.UUID) -> Chat:
        chat = await self.store.get_chat(chat_id)
        if chat.owner_id != owner_id:
            raise PermissionDenied(f"chat {chat_id} does not belong to this user")
        return chat

    @staticmethod
    def _as_parts(content: str | Sequence[Part]) -> tuple[Part, ...]:
        return (TextPart(content),) if isinstance(content, str) else tuple(content)

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
    ) -> Chat:
        """Create a chat with its first user message; it starts `pending`."""
        parts = self._as_parts(content)
        if title is None:
            title = title_from_prompt(text_of_parts(parts), self.config.subagents)
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
        )
        await self._publish_owner(chat, "created")
        self.wake()
        return chat

    async def get_chat(self, owner_id: uuid.UUID, chat_id: uuid.UUID) -> Chat:
        """The chat, if the user owns it."""
        return await self._owned_chat(owner_id, chat_id)

    async def messages(
        self, owner_id: uuid.UUID, chat_id: uuid.UUID, after_message_id: int = 0
    ) -> list[Message]:
        """User-visible messages after a cursor."""
        await self._owned_chat(owner_id, chat_id)
        return await self.store.messages_after(chat_id, after_message_id)

    async def send_message(
        self,
        owner_id: uuid.UUID,
        chat_id: uuid.UUID,
        content: str | Sequence[Part],
        *,
        busy_behavior: BusyBehavior = "queue",
    ) -> SendResult:
        """Send a user message: inserted (chat -> pending) or queued when busy.

        `busy_behavior="interrupt"` queues, then interrupts the running turn.
        """
        await self._owned_chat(owner_id, chat_id)
        result = await self.store.send_message(
            chat_id,
            self._as_parts(content),
            max_queued=self.config.queue.max_queued,
            announce=self.streams.announcer,
        )
        if result.message is not None:
            await self._publish_message(result.message)
            await self._publish_quietly(self.streams.publish_status(chat_id, result.chat.status))
            self.wake()
        else:
            await self._publish_quietly(self.streams.publish_queue_update(chat_id, result.queue))
            if busy_behavior == "interrupt" and result.chat.status is ChatStatus.RUNNING:
                await self._interrupt(chat_id)
        return result

    async def edit_message(
        self,
        owner_id: uuid.UUID,
        chat_id: uuid.UUID,
        message_id: int,
        content: str | Sequence[Part],
    ) -> EditResult:
        """Replace a user message: it and every later message are dropped, the queue is
        cleared, the chat goes `pending` (a running turn stops)."""
        await self._owned_chat(owner_id, chat_id)
        announce = self.streams.announcer
        result = await self.store.edit_message(
            chat_id, message_id, self._as_parts(content), announce=announce
        )
        # The edit may have dropped the instruction message: the next turn re-checks.
        self.mcp_cache.forget_chat(chat_id)
        self._stop_local(chat_id, "message edited")
        await self._publish_committed(
            self.streams.publish_edited_message(result.message, announced=announce is not None)
        )
        await self._publish_quietly(self.streams.publish_status(chat_id, result.chat.status))
        await self._publish_quietly(self.streams.publish_queue_update(chat_id, ()))
        self.wake()
        return result

    async def interrupt(self, owner_id: uuid.UUID, chat_id: uuid.UUID) -> Chat:
        """Stop the chat's running turn (kept output is persisted); it ends `waiting`."""
        await self._owned_chat(owner_id, chat_id)
        return await self._interrupt(chat_id)

    async def _interrupt(self, chat_id: uuid.UUID) -> Chat:
        chat = await self.store.interrupt(chat_id)
        self._stop_local(chat_id, "user interrupt")
        await self._publish_quietly(self.streams.publish_status(chat_id, chat.status))
        return chat

    def _stop_local(self, chat_id: uuid.UUID, why: str) -> None:
        control = self._turns.get(chat_id)
        if control is not None:
            self._bump("interrupts")
            control.interrupt(why)

    async def promote_queued(
        self, owner_id: uuid.UUID, chat_id: uuid.UUID, queued_id: int
    ) -> SendResult:
        """Send a queued message now (or move it to the front while the chat runs)."""
        await self._owned_chat(owner_id, chat_id)
        result = await self.store.promote_queued(
            chat_id, queued_id, announce=self.streams.announcer
        )
        if result.message is not None:
            await self._publish_message(result.message)
            await self._publish_quietly(self.streams.publish_status(chat_id, result.chat.status))
            self.wake()
        await self._publish_quietly(self.streams.publish_queue_update(chat_id, result.queue))
        return result

    async def delete_queued(self, owner_id: uuid.UUID, chat_id: uuid.UUID, queued_id: int) -> None:
        """Remove a queued message."""
        await self._owned_chat(owner_id, chat_id)
        queue = await self.store.delete_queued(chat_id, queued_id)
        await self._publish_quietly(self.streams.publish_queue_update(chat_id, queue))

    @asynccontextmanager
    async def subscribe(
        self, owner_id: uuid.UUID, chat_id: uuid.UUID, after_message_id: int = 0
    ) -> AsyncIterator[StreamSubscription]:
        """Subscribe to a chat's events (snapshot, then live), if the user owns it."""
        await self._owned_chat(owner_id, chat_id)
        async with self.streams.subscribe(chat_id, after_message_id) as sub:
            yield sub

    # -- observability ------------------------------------------------------------------
    @property
    def running_chats(self) -> frozenset[uuid.UUID]:
        """Chats with a turn on this replica right now."""
        return frozenset(self._turns)

    def stats(self) -> ServerStats:
        """Counters: statements by name, turns, retries, interrupts, compactions, drops."""
        c = self._counts
        s = self.streams.statistics()
        return ServerStats(
            worker_id=self.worker_id,
            statements=self.store.statement_counts(),
            turns_started=c.get("turns_started", 0),
            turns_finished=dict(self._finished),
            running=len(self._turns),
            acquired=c.get("acquired", 0),
            acquire_statements=c.get("acquire_statements", 0),
            released_on_close=c.get("released_on_close", 0),
            heartbeats_lost=c.get("heartbeats_lost", 0),
            stale_recovered=c.get("stale_recovered", 0),
            interrupts=c.get("interrupts", 0),
            retries=c.get("retries", 0),
            compactions=c.get("compactions", 0),
            reentries=c.get("reentries", 0),
            steps=c.get("steps", 0),
            extra={
                **self.workspace_stats.snapshot(),
                **{
                    f"subagent_{k}": v
                    for k, v in dataclasses.asdict(self.subagent_stats.statistics()).items()
                },
                **self.extra_counters,
            },
            streams={
                "dropped_buffer": s.dropped_buffer,
                "dropped_subscriber": s.dropped_subscriber,
                "db_catchup_reads": s.db_catchup_reads,
                "cache_hits": s.cache_hits,
                "carried_hits": s.carried_hits,
                "snapshot_reads": s.snapshot_reads,
            },
        )


def text_of_parts(parts: Sequence[Part]) -> str:
    """The text of a message's text parts."""
    return "".join(p.text for p in parts if isinstance(p, TextPart))


__all__ = ["BusyBehavior", "Server", "ServerStats", "TurnEnv", "text_of_parts"]
