"""Turn supervision: every turn a replica runs, from its start to its final write.

docs/spec.md §1 and §2. A turn is one task in the replica's nursery; its own
nursery holds its heartbeat and its control listener (the chat's notify channel:
a status change elsewhere stops the turn). The supervisor runs the agent loop
(`chatd_trio.loop.run_turn`) with the turn's environment and tools, then writes
the final transition with the turn's last messages and publishes what it changed.
A turn that no longer holds its chat is fenced (nothing more written); a turn the
user stopped is interrupted (what it made is kept).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from chatd_trio import lifecycle
from chatd_trio._cleanup import bounded_cleanup
from chatd_trio._groups import leaves
from chatd_trio.config import StoreRetryConfig
from chatd_trio.domain import (
    Chat,
    ChatStatus,
    ErrorPayload,
    Message,
    MessagePartEvent,
    NewMessage,
    NotifyPayload,
    RetryPayload,
    stream_channel,
)
from chatd_trio.errors import (
    ChatdError,
    DecodeError,
    PersistRefused,
    PubSubError,
    StoreError,
    StoreUnavailable,
)
from chatd_trio.lifecycle import ChatView
from chatd_trio.loop import TurnCallbacks, TurnControl, TurnResult, run_turn, with_store_retries
from chatd_trio.models.base import Model, PromptMessage
from chatd_trio.pubsub.base import Resync
from chatd_trio.server.env import ModelSource, TurnEnv, TurnTools
from chatd_trio.server.publishing import Publisher
from chatd_trio.server.stats import Counters
from chatd_trio.store.base import FinishResult, Lease, TurnOutcome
from chatd_trio.tools import ToolContext

if TYPE_CHECKING:
    from chatd_trio.server.replica import Server

__all__ = ["TurnSupervisor"]

logger = logging.getLogger(__name__)


def _crash_message(group: BaseException) -> str:
    """The error a crashed turn records: every exception that crashed it, in order (a
    turn that crashed of two failures at once names both)."""
    return "; ".join(str(leaf) or type(leaf).__name__ for leaf in leaves(group))


def _ended(outcome: TurnOutcome, error: ErrorPayload | None = None) -> TurnResult:
    """The result of a turn that ended before its loop decided anything."""
    return TurnResult(outcome=outcome, steps=0, compactions=0, reentries=0, error=error)


class TurnSupervisor:
    """The turns running on one replica.

    `running` maps each chat to its current turn here; `controls` holds every turn not
    yet ended (a turn that lost its chat may still be ending when the chat is acquired
    again). `idle` is set while no turn runs, `ended` fires (and is replaced) whenever
    one ends. `nursery` is the replica's: turns start there.
    """

    def __init__(
        self,
        server: Server,
        model: ModelSource,
        tools: TurnTools,
        counters: Counters,
        publish: Publisher,
        wake: Callable[[], None],
    ) -> None:
        self._server = server
        self._store = server.store
        self._pubsub = server.pubsub
        self._streams = server.streams
        self._config = server.config
        self._strategies = server.strategies
        self._worker_id = server.worker_id
        self._model = model
        self._tools = tools
        self._counters = counters
        self._publish = publish
        # Wakes the acquire loop: a full replica has room again, or a chat is pending.
        self._wake = wake
        self.running: dict[uuid.UUID, TurnControl] = {}
        self.controls: set[TurnControl] = set()
        self.idle = trio.Event()
        self.idle.set()
        self.ended = trio.Event()
        self.finished: dict[TurnOutcome, int] = {}
        self.nursery: trio.Nursery | None = None

    def start(self, chat: Chat) -> None:
        """Run a turn of the chat just acquired, in the replica's nursery."""
        assert self.nursery is not None
        previous = self.running.get(chat.id)
        if previous is not None:
            # A turn of this chat that lost it (its token is stale: every write it tries
            # is refused) has not ended yet; it must not keep running alongside.
            self._counters.interrupts += 1
            previous.fence("chat acquired again")
        control = TurnControl()
        self.running[chat.id] = control
        self.controls.add(control)
        self.idle = trio.Event()
        self.nursery.start_soon(self._turn, chat, control)

    def _model_for(self, chat: Chat) -> Model:
        model = self._model if isinstance(self._model, Model) else self._model(chat)
        if chat.model_options is None:
            return model
        return model.with_options(chat.model_options)

    async def _turn(self, chat: Chat, control: TurnControl) -> None:
        lease = Lease.of(chat)
        log = {
            "chat_id": str(chat.id),
            "worker_id": str(self._worker_id),
            "owner_token": str(lease.token),
        }
        self._counters.turns_started += 1
        crashed: ErrorPayload | None = None
        # Buffering starts BEFORE `running` is published (docs/spec.md §4).
        generation = self._streams.start_turn(chat.id)
        try:
            if self._streams.announcer is not None:
                # The acquisition announced it in its transaction; subscribers here get
                # it now, before the turn's first part, not when the notify comes back.
                self._streams.deliver_status_locally(
                    chat.id, ChatStatus.RUNNING, self._worker_id, lease.token
                )
            else:
                await self._publish.quietly(
                    self._streams.publish_status(
                        chat.id, ChatStatus.RUNNING, self._worker_id, lease.token
                    )
                )
                await self._publish.owner(chat, "status")
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
        if control not in self.controls:
            return
        full = len(self.controls) >= self._config.acquire.max_running_turns
        self.controls.discard(control)
        if full:
            # Room for one more turn: the acquire loop waited for it.
            self._wake()
        self.finished[outcome] = self.finished.get(outcome, 0) + 1
        self._streams.end_turn(chat_id, generation)
        if self.running.get(chat_id) is control:
            del self.running[chat_id]
        if not self.controls:
            self.idle.set()
        self.ended.set()
        self.ended = trio.Event()

    async def _supervised_turn(self, chat: Chat, lease: Lease, control: TurnControl) -> None:
        async with trio.open_nursery() as aux:
            aux.start_soon(self._heartbeat, lease, control)
            if self._pubsub is not None:
                await aux.start(self._control_listener, lease, control)
            env = TurnEnv(self._server, chat, control, aux, lease=lease)
            try:
                control.result = await self._run_loop(chat, lease, control, env)
            finally:
                with bounded_cleanup(self._config.loop.cleanup_timeout):
                    for cleanup in reversed(env.cleanups):
                        try:
                            await cleanup()
                        except Exception:
                            logger.exception("turn cleanup failed", extra={"chat_id": str(chat.id)})
                aux.cancel_scope.cancel()

    async def _run_loop(
        self, chat: Chat, lease: Lease, control: TurnControl, env: TurnEnv
    ) -> TurnResult:
        tools = await self._tools.registry(env)
        callbacks = TurnCallbacks(
            on_part=self._on_part,
            on_message=self._on_message_for(chat.id),
            on_retry=self._on_retry_for(chat.id),
            on_error=self._on_error_for(chat.id),
            on_late_tool_result=lambda call: self._count_late_tool_result(),
            on_store_retry=lambda what, exc: self._count_store_retry(),
            announce=self._streams.announcer,
        )
        assert self.nursery is not None
        loads = 0

        async def load_prompt() -> Sequence[PromptMessage]:
            # The acquisition loaded the prompt (plus what this run wrote since, e.g. the
            # workspace's instruction files): the turn's first load reads nothing.
            nonlocal loads
            loads += 1
            cached = self._store.cached_prompt(lease) if loads == 1 else None
            if cached is not None:
                return cached
            return await self._store.prompt_messages(lease.chat_id)

        return await run_turn(
            self._store,
            lease,
            self._model_for(chat),
            tools=tools,
            config=self._config.loop,
            callbacks=callbacks,
            control=control,
            load_prompt=load_prompt,
            tool_context=ToolContext(chat.id, self._worker_id, env.extras),
            # Tools run in the replica's nursery: a turn stopped while a tool ignores
            # cancellation ends (and releases its chat) without waiting for it.
            tool_nursery=self.nursery,
            strategies=self._strategies,
        )

    def _record(self, result: TurnResult) -> None:
        if result.outcome is TurnOutcome.LOST:
            self._counters.fenced += 1
        self._counters.steps += result.steps
        self._counters.compactions += result.compactions
        self._counters.reentries += result.reentries
        self._counters.retries += result.retries

    async def _on_part(self, event: MessagePartEvent) -> None:
        self._streams.publish_part(event)

    def _on_message_for(self, chat_id: uuid.UUID) -> Callable[[Message], Awaitable[None]]:
        async def on_message(message: Message) -> None:
            await self._publish.message(message)
            self._streams.step_persisted(chat_id)

        return on_message

    def _on_retry_for(self, chat_id: uuid.UUID) -> Callable[[RetryPayload], Awaitable[None]]:
        async def on_retry(payload: RetryPayload) -> None:
            await self._publish.quietly(self._streams.retry(chat_id, payload))

        return on_retry

    def _on_error_for(self, chat_id: uuid.UUID) -> Callable[[ErrorPayload], Awaitable[None]]:
        async def on_error(payload: ErrorPayload) -> None:
            await self._publish.quietly(self._streams.publish_error(chat_id, payload))

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
        budget = self._config.loop.store_retry
        if control.shut_down:
            budget = dataclasses.replace(
                budget, budget=min(budget.budget, self._config.loop.cleanup_timeout)
            )
        fin: FinishResult | None = None
        with bounded_cleanup(budget.budget + self._config.loop.cleanup_timeout):
            announcer = self._streams.announcer

            async def final(
                outcome: TurnOutcome, error: ErrorPayload | None, messages: Sequence[NewMessage]
            ) -> FinishResult:
                announce = announcer.with_error(error) if announcer is not None else None
                return await with_store_retries(
                    lambda: self._store.finish_turn(
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
                await self._publish.quietly(self._streams.publish_resync(chat.id))
                return
            if not fin.changed:
                self._counters.fenced += 1
                logger.info("final transition refused: the run no longer holds the chat", extra=log)
                return
            for message in fin.inserted:
                await self._publish.message(message)
            if fin.inserted:
                self._streams.step_persisted(chat.id)
            if announcer is not None:
                # The finish announced its error, queue, status and owner events itself.
                if fin.promoted is not None:
                    await self._publish.message(fin.promoted)
            else:
                failed = outcome is TurnOutcome.ERROR and fin.chat.status is ChatStatus.ERROR
                if failed and error is not None:
                    await self._publish.quietly(self._streams.publish_error(chat.id, error))
                if fin.promoted is not None:
                    await self._publish.message(fin.promoted)
                    await self._publish.quietly(
                        self._streams.publish_queue_update(chat.id, fin.queue)
                    )
                await self._publish.quietly(
                    self._streams.publish_status(
                        chat.id, fin.chat.status, None, fin.chat.owner_token
                    )
                )
                # A stopped turn that leaves the chat `waiting` changed no status: the
                # interrupt did, and `Server.interrupt` (on whichever replica) announced it.
                stopped = outcome is TurnOutcome.INTERRUPTED
                if not (stopped and fin.chat.status is ChatStatus.WAITING):
                    await self._publish.owner(fin.chat, "status")
            if fin.chat.status is ChatStatus.PENDING:
                self._wake()

    async def _confirm_step(
        self, lease: Lease, result: TurnResult, budget: StoreRetryConfig, log: dict[str, str]
    ) -> None:
        """Write a step whose first write was cut off, under its own op id: the store
        returns what the first attempt inserted if it landed, else inserts it now."""
        op = result.unconfirmed_op
        persisted = await with_store_retries(
            lambda: self._store.persist_step(
                lease, result.unconfirmed, announce=self._streams.announcer, op_id=op
            ),
            budget,
            what="an unconfirmed step",
            on_retry=lambda what, exc: self._count_store_retry(),
            log_extra=log,
        )
        for message in persisted:
            await self._publish.message(message)
        if persisted:
            self._streams.step_persisted(lease.chat_id)

    async def _heartbeat(self, lease: Lease, control: TurnControl) -> None:
        interval = self._config.acquire.heartbeat_interval
        while True:
            await trio.sleep(interval)
            try:
                owned = await self._store.heartbeat(lease)
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
                    chat = await self._store.get_chat(lease.chat_id)
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
        assert self._pubsub is not None
        chat_id = lease.chat_id
        started = False
        try:
            async with self._pubsub.subscribe(stream_channel(chat_id)) as sub:
                task_status.started()
                started = True
                async for delivery in sub:
                    if not isinstance(delivery, Resync):
                        if not NotifyPayload.may_hold_status(delivery):
                            continue  # a message or a part: only statuses stop a turn
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
                    chat = await self._store.get_chat(chat_id)
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
            self.interrupt_turn(control, f"chat became {view.status}")
        else:
            control.fence(f"chat held by token {view.token}")

    def interrupt_turn(self, control: TurnControl, why: str) -> None:
        """Interrupt a turn: counted once per turn, whichever noticed the stop first
        (this replica's own call, the control listener or the heartbeat)."""
        if control.stop_reason is None:
            self._counters.interrupts += 1
        control.interrupt(why)

    def stop_local(self, chat_id: uuid.UUID, why: str) -> None:
        """Interrupt the chat's turn, if one runs here."""
        control = self.running.get(chat_id)
        if control is not None:
            self.interrupt_turn(control, why)

    def shutdown(self, why: str) -> None:
        """Shut every turn down: each hands its chat back as pending."""
        for control in list(self.controls):
            control.shutdown(why)

    async def wait_ended(self, chat_id: uuid.UUID) -> bool:
        """Wait until no turn of the chat is running here; whether one was."""
        waited = False
        while chat_id in self.running:
            waited = True
            ended = self.ended
            await ended.wait()
        return waited

    def _count_late_tool_result(self) -> None:
        self._counters.late_tool_results_dropped += 1

    def _count_store_retry(self) -> None:
        self._counters.store_retries += 1
