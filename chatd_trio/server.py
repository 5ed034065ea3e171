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

from chatd_trio import lifecycle
from chatd_trio._cleanup import bounded_cleanup
from chatd_trio._groups import leaves, unwrapped
from chatd_trio.config import Config, RequestOptions, StoreRetryConfig
from chatd_trio.domain import (
    JSON,
    Chat,
    ChatStatus,
    ErrorPayload,
    Message,
    MessagePartEvent,
    NewMessage,
    NotifyPayload,
    Part,
    RetryPayload,
    TextPart,
    owner_channel,
    owner_payload,
    parse_row_id,
    parse_uuid,
    stream_channel,
    text_of,
)
from chatd_trio.errors import (
    ChatdError,
    DecodeError,
    PermissionDenied,
    PersistRefused,
    PubSubError,
    StoreError,
    StoreUnavailable,
)
from chatd_trio.lifecycle import ChatView
from chatd_trio.loop import TurnCallbacks, TurnControl, TurnResult, run_turn, with_store_retries
from chatd_trio.models.base import Model, PromptMessage
from chatd_trio.pubsub.base import PubSub, Resync
from chatd_trio.store.base import (
    EditResult,
    FinishResult,
    Lease,
    SendResult,
    Store,
    TurnOutcome,
)
from chatd_trio.strategies import Strategies, SubagentWake
from chatd_trio.streams import ChatStreams, StreamSubscription
from chatd_trio.subagents import (
    SubagentStatistics,
    SubagentStats,
    subagent_tools,
    title_from_prompt,
)
from chatd_trio.tools import ToolContext, ToolRegistry
from chatd_trio.turns import TurnReport, settled, wait_settled
from chatd_trio.workspace import (
    AgentDialer,
    AgentRows,
    McpToolCache,
    WorkspaceContext,
    WorkspaceProvisioner,
    WorkspaceStatistics,
    WorkspaceStats,
)
from chatd_trio.workspace_tools import workspace_tools

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
    # The turn's claim on the chat (`None` only for environments built outside a Server).
    lease: Lease | None = None
    # Run after the turn (shielded, in reverse order): release turn-local resources.
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@dataclass
class _Counters:
    """The replica's own counters, incremented where each thing happens.

    Fields, not names in a dict: a misspelt counter fails type checking instead of
    reading as 0.
    """

    turns_started: int = 0
    acquired: int = 0
    acquire_statements: int = 0
    acquire_skipped_full: int = 0
    released_on_close: int = 0
    heartbeats_lost: int = 0
    stale_recovered: int = 0
    interrupts: int = 0
    retries: int = 0
    compactions: int = 0
    reentries: int = 0
    steps: int = 0
    fenced: int = 0
    late_tool_results_dropped: int = 0
    store_retries: int = 0


@dataclass(frozen=True)
class ServerStreamStats:
    """The stream counters `ServerStats` carries (`ChatStreams.statistics()` has them all)."""

    # Parts dropped because a turn's in-flight buffer was full, and events dropped
    # because a subscriber's queue was full (docs/spec.md §4).
    dropped_buffer: int
    dropped_subscriber: int
    db_catchup_reads: int
    cache_hits: int
    carried_hits: int
    snapshot_reads: int
    # Received notifies that did not open (forged, altered, expired): dropped.
    notifies_rejected: int


@dataclass(frozen=True)
class ServerStats:
    """Counters of one replica since it started (docs/spec.md §7: statements by name).

    `as_dict()` gives the same counters as JSON data, for health endpoints and reports.
    """

    worker_id: uuid.UUID
    statements: dict[str, int]
    turns_started: int
    turns_finished: dict[TurnOutcome, int]
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
    workspace: WorkspaceStatistics
    subagents: SubagentStatistics
    streams: ServerStreamStats
    # Turns that ended because their run no longer held the chat (a write or the finish
    # was refused: fenced by a newer ownership token, or edited).
    fenced: int = 0
    # Tool results that arrived after their turn stopped waiting (dropped).
    late_tool_results_dropped: int = 0
    # Turn writes retried through a transient store fault.
    store_retries: int = 0
    # Acquisitions not tried because the replica ran `AcquireConfig.max_running_turns`.
    acquire_skipped_full: int = 0

    def as_dict(self) -> dict[str, JSON]:
        """The counters as JSON data: the fields by name, nested records as objects."""
        data: dict[str, JSON] = dataclasses.asdict(self)
        data["worker_id"] = str(self.worker_id)
        data["turns_finished"] = {o.value: n for o, n in self.turns_finished.items()}
        return data


def _crash_message(group: BaseException) -> str:
    """The error a crashed turn records: every exception that crashed it, in order (a
    turn that crashed of two failures at once names both)."""
    return "; ".join(str(leaf) or type(leaf).__name__ for leaf in leaves(group))


def _ended(outcome: TurnOutcome, error: ErrorPayload | None = None) -> TurnResult:
    """The result of a turn that ended before its loop decided anything."""
    return TurnResult(outcome=outcome, steps=0, compactions=0, reentries=0, error=error)


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
        self._model = model
        self._tools = tools if tools is not None else ToolRegistry()
        self._tools_factory = tools_factory
        self._dialer = dialer
        self._provisioner = provisioner
        self._subagents = subagents
        self.mcp_cache = McpToolCache(self.config.workspace)
        # Agent rows never change: a turn bound to a known agent reads none.
        self.agent_rows = AgentRows(self.config.workspace)
        self.workspace_stats = WorkspaceStats()
        self.subagent_stats = SubagentStats()
        # The current turn of each chat running here, and every turn not yet ended (a
        # turn that lost its chat may still be ending when the chat is acquired again).
        self._turns: dict[uuid.UUID, TurnControl] = {}
        self._controls: set[TurnControl] = set()
        self._turns_idle = trio.Event()
        self._turns_idle.set()
        # Set (and replaced) whenever a turn here ends: wakes `_turn_ended` waiters.
        self._turn_end = trio.Event()
        self._work = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._background = trio.CancelScope()
        self._started = False
        self._closed = trio.Event()
        self._counters = _Counters()
        self._finished: dict[TurnOutcome, int] = {}

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
            self._nursery = nursery
            await self._recover_stale_once()
            nursery.start_soon(self._background_loops)
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
        self._background.cancel()
        for control in list(self._controls):
            control.shutdown("replica shutting down")
        try:
            await self._turns_idle.wait()
        finally:
            # `run` cancels the nursery once this is set; left unset, it would wait forever.
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

    async def _acquire_until_short_batch(self) -> None:
        cfg = self.config.acquire
        while True:
            # Only as many as there is room for: a full replica leaves pending chats to its
            # peers (and a turn that ends wakes this loop).
            free = cfg.max_running_turns - len(self._controls)
            if free <= 0:
                self._counters.acquire_skipped_full += 1
                return
            limit = min(cfg.max_chats_per_acquire, free)
            # The claim runs shielded so that a close cannot cancel it after the database
            # committed; a close observed afterwards hands the chats straight back. A claim
            # cut off by its deadline may have committed: stale recovery returns those.
            chats: list[Chat] = []
            with bounded_cleanup(self.config.loop.cleanup_timeout):
                try:
                    chats = await self.store.acquire(
                        self.worker_id, limit, announce=self.streams.announcer, prompts=True
                    )
                except ChatdError as exc:
                    logger.warning(
                        "acquire failed",
                        extra={"worker_id": str(self.worker_id), "error": str(exc)},
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
                self._start_turn(chat)
            if len(chats) < limit:
                return

    async def _release_on_close(self, chats: Sequence[Chat]) -> None:
        if not chats:
            return
        with bounded_cleanup(self.config.loop.cleanup_timeout):
            try:
                await self.store.release([Lease.of(c) for c in chats])
                self._counters.released_on_close += len(chats)
            except ChatdError as exc:
                # Stale recovery hands them back once their heartbeat goes stale.
                logger.warning(
                    "release failed", extra={"error": str(exc), "why": "released_on_close"}
                )

    async def _stale_loop(self) -> None:
        while True:
            await trio.sleep(self.config.acquire.stale_recovery_interval)
            await self._recover_stale_once()

    async def _recover_stale_once(self) -> None:
        announce = self.streams.announcer
        try:
            ids = await self.store.recover_stale(self.config.acquire.stale_after, announce=announce)
        except ChatdError as exc:
            logger.warning("stale recovery failed", extra={"error": str(exc)})
            return
        if not ids:
            return
        self._counters.stale_recovered += len(ids)
        logger.info("recovered stale chats", extra={"count": len(ids)})
        if announce is None:
            for chat_id in ids:
                await self._publish_quietly(
                    self.streams.publish_status(chat_id, ChatStatus.PENDING)
                )
        self.wake()

    # -- turns --------------------------------------------------------------------------
    def _start_turn(self, chat: Chat) -> None:
        assert self._nursery is not None
        previous = self._turns.get(chat.id)
        if previous is not None:
            # A turn of this chat that lost it (its token is stale: every write it tries
            # is refused) has not ended yet; it must not keep running alongside.
            self._counters.interrupts += 1
            previous.fence("chat acquired again")
        control = TurnControl()
        self._turns[chat.id] = control
        self._controls.add(control)
        self._turns_idle = trio.Event()
        self._nursery.start_soon(self._turn, chat, control)

    def _model_for(self, chat: Chat) -> Model:
        model = self._model if isinstance(self._model, Model) else self._model(chat)
        if chat.model_options is None:
            return model
        return model.with_options(chat.model_options)

    async def _turn(self, chat: Chat, control: TurnControl) -> None:
        lease = Lease.of(chat)
        log = {
            "chat_id": str(chat.id),
            "worker_id": str(self.worker_id),
            "owner_token": str(lease.token),
        }
        self._counters.turns_started += 1
        crashed: ErrorPayload | None = None
        # Buffering starts BEFORE `running` is published (docs/spec.md §4).
        generation = self.streams.start_turn(chat.id)
        try:
            if self.streams.announcer is not None:
                # The acquisition announced it in its transaction; subscribers here get
                # it now, before the turn's first part, not when the notify comes back.
                self.streams.deliver_status_locally(
                    chat.id, ChatStatus.RUNNING, self.worker_id, lease.token
                )
            else:
                await self._publish_quietly(
                    self.streams.publish_status(
                        chat.id, ChatStatus.RUNNING, self.worker_id, lease.token
                    )
                )
                await self._publish_owner(chat, "status")
            with control:
                await self._supervised_turn(chat, lease, control)
        except* Exception as group:
            # `except*`: a failure raised beside a cancellation (a store error in a
            # shielded write while the replica is being cancelled) is handled here and
            # the cancellation goes on; it must not escape the server's nursery.
            logger.exception("turn crashed", extra=log)
            crashed = ErrorPayload(message=_crash_message(group), kind="internal")
        finally:
            result = control.result
            if crashed is not None and (result is None or not result.final_state):
                result = _ended(TurnOutcome.ERROR, crashed)
            elif result is None:
                # Stopped before the loop started (a shutdown during the turn's setup).
                result = _ended(TurnOutcome.SHUTDOWN)
            if trio.current_effective_deadline() == -math.inf and not control.shut_down:
                # Cancelled from outside (the replica's nursery): hand the chat back.
                result = dataclasses.replace(result, outcome=TurnOutcome.SHUTDOWN, error=None)
            self._record(result)
            try:
                await self._finish(chat, lease, control, result, generation)
            finally:
                self._turn_done(chat.id, control, result.outcome, generation)

    def _turn_done(
        self,
        chat_id: uuid.UUID,
        control: TurnControl,
        outcome: TurnOutcome,
        generation: int,
    ) -> None:
        """The turn wrote its last row: it no longer counts as running here (idempotent)."""
        if control not in self._controls:
            return
        full = len(self._controls) >= self.config.acquire.max_running_turns
        self._controls.discard(control)
        if full:
            # Room for one more turn: the acquire loop waited for it.
            self.wake()
        self._finished[outcome] = self._finished.get(outcome, 0) + 1
        self.streams.end_turn(chat_id, generation)
        if self._turns.get(chat_id) is control:
            del self._turns[chat_id]
        if not self._controls:
            self._turns_idle.set()
        self._turn_end.set()
        self._turn_end = trio.Event()

    async def _supervised_turn(self, chat: Chat, lease: Lease, control: TurnControl) -> None:
        async with trio.open_nursery() as aux:
            aux.start_soon(self._heartbeat, lease, control)
            if self.pubsub is not None:
                await aux.start(self._control_listener, lease, control)
            env = TurnEnv(self, chat, control, aux, lease=lease)
            try:
                control.result = await self._run_loop(chat, lease, control, env)
            finally:
                with bounded_cleanup(self.config.loop.cleanup_timeout):
                    for cleanup in reversed(env.cleanups):
                        try:
                            await cleanup()
                        except Exception:
                            logger.exception("turn cleanup failed", extra={"chat_id": str(chat.id)})
                aux.cancel_scope.cancel()

    async def _run_loop(
        self, chat: Chat, lease: Lease, control: TurnControl, env: TurnEnv
    ) -> TurnResult:
        factory = self._tools_factory or self._default_tools
        tools = await factory(env)
        callbacks = TurnCallbacks(
            on_part=self._on_part,
            on_message=self._on_message_for(chat.id),
            on_retry=self._on_retry_for(chat.id),
            on_error=self._on_error_for(chat.id),
            on_late_tool_result=lambda call: self._count_late_tool_result(),
            on_store_retry=lambda what, exc: self._count_store_retry(),
            announce=self.streams.announcer,
        )
        assert self._nursery is not None
        loads = 0

        async def load_prompt() -> Sequence[PromptMessage]:
            # The acquisition loaded the prompt (plus what this run wrote since, e.g. the
            # workspace's instruction files): the turn's first load reads nothing.
            nonlocal loads
            loads += 1
            cached = self.store.cached_prompt(lease) if loads == 1 else None
            if cached is not None:
                return cached
            return await self.store.prompt_messages(lease.chat_id)

        return await run_turn(
            self.store,
            lease,
            self._model_for(chat),
            tools=tools,
            config=self.config.loop,
            callbacks=callbacks,
            control=control,
            load_prompt=load_prompt,
            tool_context=ToolContext(chat.id, self.worker_id, env.extras),
            # Tools run in the replica's nursery: a turn stopped while a tool ignores
            # cancellation ends (and releases its chat) without waiting for it.
            tool_nursery=self._nursery,
            strategies=self.strategies,
        )

    async def _default_tools(self, env: TurnEnv) -> ToolRegistry:
        """The configured tools, plus workspace tools (with a dialer) and, for root
        chats, the subagent tools."""
        tools = list(self._tools)
        if self._dialer is not None:
            assert env.lease is not None
            ctx = WorkspaceContext(
                self.store,
                env.chat,
                env.lease,
                self._dialer,
                self.config.workspace,
                env.nursery,
                self.mcp_cache,
                self.workspace_stats,
                provisioner=self._provisioner,
                agent_rows=self.agent_rows,
                strategies=self.strategies,
            )
            env.cleanups.append(ctx.aclose)
            env.extras["workspace"] = ctx
            # Bounded by the workspace timeouts; a stopped workspace leaves built-ins only.
            await ctx.prepare()
            tools.extend(workspace_tools(ctx))
        if self._subagents and env.chat.parent_chat_id is None:
            # Waits without the pubsub poll fast, as in single-process mode.
            notify = self.strategies.subagent_wake is SubagentWake.NOTIFY
            tools.extend(
                subagent_tools(
                    self,
                    self.store,
                    self.pubsub if notify else None,
                    self.config.subagents,
                    stats=self.subagent_stats,
                )
            )
        return ToolRegistry(tools)

    def _record(self, result: TurnResult) -> None:
        if result.outcome is TurnOutcome.LOST:
            self._counters.fenced += 1
        self._counters.steps += result.steps
        self._counters.compactions += result.compactions
        self._counters.reentries += result.reentries
        self._counters.retries += result.retries

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
        lease: Lease,
        control: TurnControl,
        result: TurnResult,
        generation: int,
    ) -> None:
        """The final transition, with the turn's final messages, then what it publishes.

        Retried through transient store faults within the write budget (the replica
        closing: within `cleanup_timeout`); a finish that still fails leaves the chat to
        stale recovery, and a recovered turn whose answer is stored is not run again.
        """
        outcome, error = result.outcome, result.error
        log = {"chat_id": str(chat.id), "owner_token": str(lease.token)}
        if outcome is TurnOutcome.LOST:
            logger.info("turn ended: the chat is held by another run", extra=log)
            self._turn_done(chat.id, control, outcome, generation)
            return
        op_id = uuid.uuid4()
        budget = self.config.loop.store_retry
        if control.shut_down:
            budget = dataclasses.replace(
                budget, budget=min(budget.budget, self.config.loop.cleanup_timeout)
            )
        fin: FinishResult | None = None
        with bounded_cleanup(budget.budget + self.config.loop.cleanup_timeout):
            announcer = self.streams.announcer

            async def final(
                outcome: TurnOutcome, error: ErrorPayload | None, messages: Sequence[NewMessage]
            ) -> FinishResult:
                announce = announcer.with_error(error) if announcer is not None else None
                return await with_store_retries(
                    lambda: self.store.finish_turn(
                        lease,
                        outcome,
                        error.message if error else None,
                        messages=messages,
                        announce=announce,
                        op_id=op_id,
                    ),
                    budget,
                    what="the final transition",
                    on_retry=lambda what, exc: self._count_store_retry(),
                    log_extra=log,
                )

            try:
                if result.unconfirmed:
                    await self._confirm_step(lease, result, budget, log)
                fin = await final(outcome, error, result.final_messages)
            except PersistRefused:
                self._counters.fenced += 1
                logger.info("unconfirmed step refused: the run no longer holds the chat", extra=log)
                self._turn_done(chat.id, control, TurnOutcome.LOST, generation)
                return
            except StoreUnavailable as exc:
                # Stale recovery hands the chat back once the heartbeat goes stale; the
                # answer was not stored, so the turn runs again there.
                logger.warning("final transition failed", extra={**log, "error": str(exc)})
            except StoreError as exc:
                if not result.final_messages:
                    logger.warning("final transition failed", extra={**log, "error": str(exc)})
                else:
                    # The store refused the turn's answer itself: the turn failed, and
                    # says why, rather than being run again and again.
                    logger.warning(
                        "the answer could not be stored", extra={**log, "error": str(exc)}
                    )
                    outcome = TurnOutcome.ERROR
                    error = ErrorPayload(
                        message=f"the answer could not be stored: {exc}", kind="store"
                    )
                    op_id = uuid.uuid4()
                    try:
                        fin = await final(outcome, error, ())
                    except ChatdError as again:
                        logger.warning(
                            "final transition failed", extra={**log, "error": str(again)}
                        )
            # The turn wrote its last row: once it no longer counts as running here the
            # chat may be acquired here again (its publishes below still go out).
            refused = fin is not None and not fin.changed
            self._turn_done(chat.id, control, TurnOutcome.LOST if refused else outcome, generation)
            if fin is None:
                # It may have landed unacknowledged, and then nothing else would announce
                # the answer or the status: the subscribers read the chat again.
                await self._publish_quietly(self.streams.publish_resync(chat.id))
                return
            if not fin.changed:
                self._counters.fenced += 1
                logger.info("final transition refused: the run no longer holds the chat", extra=log)
                return
            for message in fin.inserted:
                await self._publish_message(message)
            if fin.inserted:
                self.streams.step_persisted(chat.id)
            if announcer is not None:
                # The finish announced its error, queue, status and owner events itself.
                if fin.promoted is not None:
                    await self._publish_message(fin.promoted)
            else:
                failed = outcome is TurnOutcome.ERROR and fin.chat.status is ChatStatus.ERROR
                if failed and error is not None:
                    await self._publish_quietly(self.streams.publish_error(chat.id, error))
                if fin.promoted is not None:
                    await self._publish_message(fin.promoted)
                    await self._publish_quietly(
                        self.streams.publish_queue_update(chat.id, fin.queue)
                    )
                await self._publish_quietly(
                    self.streams.publish_status(
                        chat.id, fin.chat.status, None, fin.chat.owner_token
                    )
                )
                # A stopped turn that leaves the chat `waiting` changed no status: the
                # interrupt did, and `Server.interrupt` (on whichever replica) announced it.
                stopped = outcome is TurnOutcome.INTERRUPTED
                if not (stopped and fin.chat.status is ChatStatus.WAITING):
                    await self._publish_owner(fin.chat, "status")
            if fin.chat.status is ChatStatus.PENDING:
                self.wake()

    async def _confirm_step(
        self, lease: Lease, result: TurnResult, budget: StoreRetryConfig, log: dict[str, str]
    ) -> None:
        """Write a step whose first write was cut off, under its own op id: the store
        returns what the first attempt inserted if it landed, else inserts it now."""
        op = result.unconfirmed_op
        persisted = await with_store_retries(
            lambda: self.store.persist_step(
                lease, result.unconfirmed, announce=self.streams.announcer, op_id=op
            ),
            budget,
            what="an unconfirmed step",
            on_retry=lambda what, exc: self._count_store_retry(),
            log_extra=log,
        )
        for message in persisted:
            await self._publish_message(message)
        if persisted:
            self.streams.step_persisted(lease.chat_id)

    async def _heartbeat(self, lease: Lease, control: TurnControl) -> None:
        interval = self.config.acquire.heartbeat_interval
        while True:
            await trio.sleep(interval)
            try:
                owned = await self.store.heartbeat(lease)
            except ChatdError as exc:
                logger.warning(
                    "heartbeat failed", extra={"chat_id": str(lease.chat_id), "error": str(exc)}
                )
                continue
            if not owned:
                self._counters.heartbeats_lost += 1
                logger.info(
                    "chat taken or stopped elsewhere", extra={"chat_id": str(lease.chat_id)}
                )
                try:
                    chat = await self.store.get_chat(lease.chat_id)
                except ChatdError:
                    control.fence("lost ownership")
                else:
                    self._stop_turn(control, ChatView.of(chat), lease)
                return

    async def _control_listener(
        self,
        lease: Lease,
        control: TurnControl,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        assert self.pubsub is not None
        chat_id = lease.chat_id
        started = False
        try:
            async with self.pubsub.subscribe(stream_channel(chat_id)) as sub:
                task_status.started()
                started = True
                async for delivery in sub:
                    if not isinstance(delivery, Resync):
                        try:
                            payload = NotifyPayload.decode(delivery)
                        except DecodeError:
                            continue
                        if payload.status is None:
                            continue
                        if payload.owner_token is not None and payload.owner_token < lease.token:
                            # Tokens only grow and every status names the token after its
                            # change: this one was written before this run acquired the
                            # chat (a sender's `pending` arriving late).
                            continue
                        heard = ChatView(payload.status, payload.owner_token or 0)
                        if lifecycle.still_owner(heard, lease.token):
                            continue
                    # Notifies from other replicas may be stale (published after their
                    # commit, a status without a token): the store has the last word
                    # before a turn is stopped.
                    chat = await self.store.get_chat(chat_id)
                    if not lifecycle.still_owner(ChatView.of(chat), lease.token):
                        self._stop_turn(control, ChatView.of(chat), lease)
                        return
        except (PubSubError, ChatdError) as exc:
            # The heartbeat still notices a takeover; log and go on without the fast path.
            logger.warning(
                "control listener ended", extra={"chat_id": str(chat_id), "error": str(exc)}
            )
            if not started:
                task_status.started()

    def _stop_turn(self, control: TurnControl, view: ChatView, lease: Lease) -> None:
        """Stop a turn whose run no longer runs the chat: as an interrupt (what it made is
        kept) when the chat is still under its token (the user stopped or edited it),
        fenced (nothing more written) when another run holds it."""
        if view.token == lease.token:
            self._interrupt_turn(control, f"chat became {view.status}")
        else:
            control.fence(f"chat held by token {view.token}")

    def _interrupt_turn(self, control: TurnControl, why: str) -> None:
        # Counted once per turn, whichever noticed the stop first (this replica's own
        # call, the control listener or the heartbeat).
        if control.stop_reason is None:
            self._counters.interrupts += 1
        control.interrupt(why)

    async def _publish_message(self, message: Message) -> None:
        """Publish a message a store operation inserted with `announce=streams.announcer`."""
        announced = self.streams.announcer is not None
        await self._publish_committed(self.streams.publish_message(message, announced=announced))

    async def _publish_committed(self, publish: Awaitable[None]) -> None:
        """Publish what is already committed, shielded (bounded by cleanup_timeout): a
        caller cancelled now must not leave it unannounced."""
        with bounded_cleanup(self.config.loop.cleanup_timeout):
            await self._publish_quietly(publish)

    async def _publish_quietly(self, publish: Awaitable[None]) -> None:
        try:
            await publish
        except ChatdError as exc:
            logger.warning("publish failed", extra={"error": str(exc)})

    async def _publish_status(self, chat: Chat) -> None:
        await self._publish_quietly(
            self.streams.publish_status(chat.id, chat.status, chat.worker_id, chat.owner_token)
        )

    async def _publish_owner(self, chat: Chat, kind: str) -> None:
        if self.pubsub is None:
            return
        payload = owner_payload(chat, kind)
        await self._publish_quietly(self.pubsub.publish(owner_channel(chat.owner_id), payload))

    def _count_late_tool_result(self) -> None:
        self._counters.late_tool_results_dropped += 1

    def _count_store_retry(self) -> None:
        self._counters.store_retries += 1

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
            await self._publish_message(result.message)
            if announce is None:
                await self._publish_status(result.chat)
                await self._publish_owner(result.chat, "status")
            self.wake()
        else:
            if announce is None:
                await self._publish_quietly(
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
        self._stop_local(chat_id, "message edited")
        await self._publish_committed(
            self.streams.publish_edited_message(result.message, announced=announce is not None)
        )
        if announce is None:
            await self._publish_status(result.chat)
            await self._publish_quietly(self.streams.publish_queue_update(chat_id, ()))
            await self._publish_owner(result.chat, "status")
        self.wake()
        return result

    async def interrupt(self, owner_id: uuid.UUID, chat_id: uuid.UUID) -> Chat:
        """Stop the chat's running turn (kept output is persisted); it ends `waiting`."""
        owner_id, chat_id = _ids(owner_id, chat_id)
        return await self._interrupt(chat_id, owner_id)

    async def _interrupt(self, chat_id: uuid.UUID, owner_id: uuid.UUID | None) -> Chat:
        announce = self.streams.announcer
        chat = await self.store.interrupt(chat_id, owner_id=owner_id, announce=announce)
        self._stop_local(chat_id, "user interrupt")
        if announce is None:
            await self._publish_quietly(
                self.streams.publish_status(chat_id, chat.status, None, chat.owner_token)
            )
            if chat.status is not ChatStatus.PENDING:  # a pending chat is left as it was
                await self._publish_owner(chat, "status")
        return chat

    def _stop_local(self, chat_id: uuid.UUID, why: str) -> None:
        control = self._turns.get(chat_id)
        if control is not None:
            self._interrupt_turn(control, why)

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
            await self._publish_message(result.message)
            if announce is None:
                await self._publish_status(result.chat)
                await self._publish_owner(result.chat, "status")
            self.wake()
        if announce is None:
            await self._publish_quietly(self.streams.publish_queue_update(chat_id, result.queue))
        return result

    async def delete_queued(self, owner_id: uuid.UUID, chat_id: uuid.UUID, queued_id: int) -> None:
        """Remove a queued message."""
        owner_id, chat_id = _ids(owner_id, chat_id)
        announce = self.streams.announcer
        queue = await self.store.delete_queued(
            chat_id, parse_row_id(queued_id, "queued_id"), owner_id=owner_id, announce=announce
        )
        if announce is None:
            await self._publish_quietly(self.streams.publish_queue_update(chat_id, queue))

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
            self.streams, self.store, chat_id, after_message_id, quiesce=self._turn_ended
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
            self.streams, self.store, chat_id, cursor, quiesce=self._turn_ended
        )

    async def _last_message_id(self, chat_id: uuid.UUID) -> int:
        history = await self.store.messages_after(chat_id, 0)
        return history[-1].id if history else 0

    async def _turn_ended(self, chat_id: uuid.UUID) -> bool:
        """Wait until no turn of the chat is running here; whether one was."""
        waited = False
        while chat_id in self._turns:
            waited = True
            ended = self._turn_end
            await ended.wait()
        return waited

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
        return frozenset(self._turns)

    def stats(self) -> ServerStats:
        """Counters: statements by name, turns, retries, interrupts, compactions, drops."""
        c = self._counters
        s = self.streams.statistics()
        return ServerStats(
            worker_id=self.worker_id,
            statements=self.store.statement_counts(),
            turns_started=c.turns_started,
            turns_finished=dict(self._finished),
            running=len(self._turns),
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


__all__ = ["BusyBehavior", "Server", "ServerStats", "ServerStreamStats", "TurnEnv", "TurnReport"]
