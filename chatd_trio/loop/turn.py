"""`run_turn`: the Trio driver of `CompactionChart` for one turn (`chatd_trio.loop`)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import trio

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio.config import LoopConfig
from chatd_trio.domain import (
    JSON,
    ErrorPayload,
    Message,
    MessagePartEvent,
    NewMessage,
    Part,
    RetryPayload,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Visibility,
    new_id,
)
from chatd_trio.errors import ModelError, PersistRefused, StoreUnavailable
from chatd_trio.loop.control import (
    OUTCOMES,
    PromptLoader,
    StopReason,
    TurnCallbacks,
    TurnControl,
    TurnResult,
)
from chatd_trio.loop.history import already_answered, shortened_for_summary
from chatd_trio.loop.retries import error_payload, format_elapsed, retry_delay, with_store_retries
from chatd_trio.loop.step import StepBuffer, storable_output
from chatd_trio.loop.tool_calls import run_tool_calls
from chatd_trio.models.base import (
    Finish,
    GenerateResult,
    Model,
    PromptMessage,
)
from chatd_trio.models.classify import CONTEXT_LENGTH, UNREACHABLE
from chatd_trio.store.base import Lease, Store, TurnOutcome
from chatd_trio.strategies import Strategies, ToolCalls
from chatd_trio.tools import ToolContext, ToolRegistry
from statecharts.compaction import Activity, CompactionChart, over_threshold, usage_percent

__all__ = ["run_turn"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _TurnFailed(Exception):
    def __init__(self, payload: ErrorPayload) -> None:
        super().__init__(payload.message)
        self.payload = payload


class _ContextExceeded(Exception):
    """The model refused the step's prompt as too long for its context window."""

    def __init__(self, error: ModelError, attempt: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.attempt = attempt


class _Turn:
    """One turn's state; `run` drives the chart until it reaches a final state."""

    def __init__(
        self,
        store: Store,
        lease: Lease,
        model: Model,
        tools: ToolRegistry,
        config: LoopConfig,
        callbacks: TurnCallbacks,
        load_prompt: PromptLoader,
        tool_context: ToolContext,
        tool_nursery: trio.Nursery | None,
        tool_calls: ToolCalls,
    ) -> None:
        self.store = store
        self.lease = lease
        self.chat_id = lease.chat_id
        self.model = model
        self.tools = tools
        self.config = config
        self.callbacks = callbacks
        self.load_prompt = load_prompt
        self.tool_context = tool_context
        self.tool_nursery = tool_nursery
        self.tool_calls = tool_calls
        self.chart = CompactionChart.fresh(
            config.max_steps,
            config.compaction.max_compaction_retries,
            config.compaction.context_length_retries,
            owner=self,
        )
        self.history: list[PromptMessage] = []
        # The in-flight step (streaming or running tools); None once it is complete.
        self.step: StepBuffer | None = None
        # A complete step not written yet: written before the next activity that needs
        # it, or handed to the caller's finish when the chart ends the turn.
        self.unwritten: tuple[StepBuffer, list[NewMessage]] | None = None
        self.last_finish: Finish | None = None
        self.error: ErrorPayload | None = None
        # The context-length error the running overflow compaction answers, and why the
        # last compaction failed (both end up in the turn's error when it cannot go on).
        self.overflow: ModelError | None = None
        self.compaction_failure = ""
        self.retries = 0
        self.store_retries = 0
        self.log_extra = {
            "chat_id": str(lease.chat_id),
            "worker_id": str(lease.worker_id),
            "owner_token": str(lease.token),
        }

    # -- driving the chart ----------------------------------------------------
    async def run(self) -> TurnResult:
        while (activity := self.chart.activity) is not None:
            try:
                if activity is not Activity.CHECK and activity is not Activity.LOAD:
                    await self._write_unwritten()
                if activity is Activity.LOAD:
                    self.history = list(await self._retrying(self.load_prompt, "loading"))
                    self.chart.send("loaded", answered=already_answered(self.history))
                elif activity is Activity.STEP:
                    tool_calls = await self._step()
                    self.chart.send(
                        "step_persisted", tool_calls=tool_calls, over_threshold=self._over()
                    )
                elif activity is Activity.COMPACT:
                    compacted = await self._compact()
                    self.chart.send("summary_ok" if compacted else "summary_failed")
                elif activity is Activity.COMPACT_OVERFLOW:
                    compacted = await self._compact(overflow=True)
                    self.chart.send("summary_ok" if compacted else "summary_failed")
                    self._overflow_compacted()
                elif activity is Activity.RELOAD:
                    self.history = list(await self._retrying(self.load_prompt, "reloading"))
                    self.chart.send("reloaded")
                else:
                    self.chart.send("post_run_check", over_threshold=self._over())
            except _TurnFailed as failed:
                logger.warning("turn failed: %s", failed.payload.message, extra={**self.log_extra})
                self.error = failed.payload
                self.chart.send("model_failed")
            except _ContextExceeded as exceeded:
                await self._context_exceeded(exceeded)
            except PersistRefused as refused:
                logger.info("write refused, turn ends: %s", refused, extra={**self.log_extra})
                self.unwritten = None
                self.chart.send("write_refused")
            except StoreUnavailable as exc:
                logger.warning(
                    "store unavailable past the retry budget, handing the chat back",
                    extra={**self.log_extra, "error": str(exc)},
                )
                self.chart.send("store_unavailable")
        return self.result()

    async def _context_exceeded(self, exceeded: _ContextExceeded) -> None:
        """Report the refused prompt to the chart; it decides between a compaction and
        the end of the turn."""
        exc = exceeded.error
        compacted_before = self.chart.overflow_retries > 0
        self.chart.send("context_exceeded")
        if self.chart.state_id != "overflow_compacting":
            payload = error_payload(exc, self.model.provider)
            if compacted_before:
                message = f"still too long after compacting the history: {exc.message}"
                payload = replace(payload, message=message)
            logger.warning("turn failed: %s", payload.message, extra={**self.log_extra})
            self.error = payload
            return
        self.overflow = exc
        self.retries += 1
        logger.warning(
            "the prompt exceeds the model's context window, compacting and retrying: %s",
            exc.message,
            extra={
                **self.log_extra,
                "attempt": exceeded.attempt,
                "kind": exc.kind,
                "status_code": exc.status_code,
                "error": exc.message,
            },
        )
        if self.callbacks.on_retry is not None:
            # Subscribers drop the refused attempt's parts; the retry follows the summary.
            await self.callbacks.on_retry(
                RetryPayload(
                    attempt=exceeded.attempt,
                    delay_s=0.0,
                    error=exc.message,
                    kind=exc.kind,
                    status_code=exc.status_code,
                    retrying_at=datetime.now(UTC),
                )
            )

    def _overflow_compacted(self) -> None:
        overflow, self.overflow = self.overflow, None
        if self.chart.state_id != "failed":
            return
        assert overflow is not None
        message = (
            f"{overflow.message} (compacting the history to make room failed: "
            f"{self.compaction_failure})"
        )
        logger.warning("turn failed: %s", message, extra={**self.log_extra})
        self.error = replace(error_payload(overflow, self.model.provider), message=message)

    def result(self) -> TurnResult:
        """The outcome the chart's final state names, with what the turn used."""
        final = self.chart.state_id
        outcome = OUTCOMES[final]
        messages: tuple[NewMessage, ...] = ()
        unconfirmed: tuple[NewMessage, ...] = ()
        unconfirmed_op: uuid.UUID | None = None
        unwritten = self.unwritten
        if unwritten is not None and outcome is not TurnOutcome.LOST:
            if unwritten[0].write_started:
                # It may have landed: written with the finish under another id it could
                # be stored twice, so it is replayed under its own op id first.
                unconfirmed, unconfirmed_op = tuple(unwritten[1]), unwritten[0].op_id
            else:
                messages = tuple(unwritten[1])
        return TurnResult(
            outcome=outcome,
            steps=self.chart.steps_used,
            compactions=self.chart.compactions,
            reentries=self.chart.reentries,
            retries=self.retries,
            error=self.error,
            final_messages=messages,
            store_retries=self.store_retries,
            unconfirmed=unconfirmed,
            unconfirmed_op=unconfirmed_op,
            trace=tuple(self.chart.trace),
            final_state=final,
        )

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        def on_retry(what: str, exc: BaseException) -> None:
            self.store_retries += 1
            if self.callbacks.on_store_retry is not None:
                self.callbacks.on_store_retry(what, exc)

        return await with_store_retries(
            call,
            self.config.store_retry,
            what=what,
            on_retry=on_retry,
            log_extra=self.log_extra,
        )

    # -- facts ------------------------------------------------------------------
    def _context(self) -> tuple[int, int]:
        """Context tokens and limit of the last completed step (docs/spec.md §3.1)."""
        finish = self.last_finish
        if finish is None:
            return 0, 0
        limit = finish.context_limit or self.config.compaction.context_limit
        return finish.usage.context_tokens(), limit

    def _over(self) -> bool:
        tokens, limit = self._context()
        return over_threshold(tokens, limit, self.config.compaction.effective_threshold)

    # -- publishing -------------------------------------------------------------
    async def _publish_part(self, role: Role, part: Part) -> None:
        if self.callbacks.on_part is not None:
            await self.callbacks.on_part(MessagePartEvent(self.chat_id, role, part))

    async def publish_messages(self, messages: Sequence[Message]) -> None:
        """Publish persisted messages, shielded (bounded by cleanup_timeout): a message
        persisted but never announced would reach subscribers only at their next read."""
        if self.callbacks.on_message is None:
            return
        with bounded_cleanup(self.config.cleanup_timeout):
            for message in messages:
                if message.user_visible:
                    await self.callbacks.on_message(message)

    # -- writing ------------------------------------------------------------------
    async def _persist(
        self, messages: Sequence[NewMessage], op_id: uuid.UUID, what: str
    ) -> list[Message]:
        """Write messages under the lease (retried through transient faults), publish them."""
        persisted = await self._retrying(
            lambda: self.store.persist_step(
                self.lease, messages, announce=self.callbacks.announce, op_id=op_id
            ),
            what,
        )
        await self.publish_messages(persisted)
        return persisted

    async def _write_unwritten(self) -> None:
        """Write the completed step the chart's next activity builds on."""
        if self.unwritten is None:
            return
        step, messages = self.unwritten
        step.write_started = True
        persisted = await self._persist(messages, step.op_id, "persisting a step")
        # The step is in the store: an interrupt from here on has nothing left to save.
        self.unwritten = None
        self.history.extend(persisted)

    # -- one step ---------------------------------------------------------------
    async def _step(self) -> bool:
        """Stream, run tools; the complete step waits in `unwritten`. True when the model
        called tools."""
        step = await self._stream_with_retries()
        calls = step.tool_calls()
        if calls:
            await self._run_tools(step, calls)
            for result in step.results:
                assert result is not None
                await self._publish_part(Role.TOOL, result)
        # No checkpoint between these: an interrupt sees either the in-flight step or
        # the complete one, never neither.
        self.unwritten = (step, step.messages(self.config.compaction.context_limit, None))
        self.step = None
        self.last_finish = step.finish
        return bool(calls)

    async def _stream_with_retries(self) -> StepBuffer:
        retry = self.config.retry
        attempt = 0
        started = trio.current_time()
        # Until an attempt reaches the server, a short budget applies (a wrong base_url).
        reached = False
        while True:
            attempt += 1
            self.step = step = StepBuffer()
            try:
                await self._stream_once(step)
                return step
            except ModelError as exc:
                if exc.kind == CONTEXT_LENGTH:
                    # Asking again cannot help; a shorter history may (the chart decides).
                    self.step = None
                    raise _ContextExceeded(exc, attempt) from exc
                if not exc.retryable:
                    raise _TurnFailed(error_payload(exc, self.model.provider)) from exc
                elapsed = trio.current_time() - started
                reached = reached or exc.kind != UNREACHABLE
                budget = retry.max_elapsed
                if not reached:
                    budget = min(budget, retry.unreachable_elapsed)
                delay = retry_delay(retry, attempt - 1, exc.retry_after)
                if attempt >= retry.max_attempts or elapsed + delay > budget:
                    failed = error_payload(exc, self.model.provider)
                    message = (
                        f"gave up after {attempt} attempt{'s' if attempt > 1 else ''} "
                        f"over {format_elapsed(elapsed)}: {exc.message}"
                    )
                    logger.warning(
                        "model call failed, giving up: %s",
                        message,
                        extra={
                            **self.log_extra,
                            "attempt": attempt,
                            "elapsed_s": elapsed,
                            "kind": exc.kind,
                            "status_code": exc.status_code,
                        },
                    )
                    raise _TurnFailed(replace(failed, message=message)) from exc
                # The failed attempt's output is discarded: the retry starts clean.
                self.step = None
                self.retries += 1
                payload = RetryPayload(
                    attempt=attempt,
                    delay_s=delay,
                    error=exc.message,
                    kind=exc.kind,
                    status_code=exc.status_code,
                    # Wall-clock time for people; the wait itself runs on Trio's clock.
                    retrying_at=datetime.now(UTC) + timedelta(seconds=delay),
                )
                logger.warning(
                    "model call failed (attempt %d of %d), retrying in %.1f s: %s",
                    attempt,
                    retry.max_attempts,
                    delay,
                    exc.message,
                    extra={
                        **self.log_extra,
                        "attempt": attempt,
                        "delay_s": delay,
                        "kind": exc.kind,
                        "status_code": exc.status_code,
                        "error": exc.message,
                    },
                )
                if self.callbacks.on_retry is not None:
                    await self.callbacks.on_retry(payload)
                await trio.sleep(delay)

    async def _stream_once(self, step: StepBuffer) -> None:
        async with self.model.stream(self.history, self.tools.specs()) as deltas:
            async for delta in deltas:
                part = step.apply(delta)
                if part is not None:
                    await self._publish_part(Role.ASSISTANT, part)

    async def _run_tools(self, step: StepBuffer, calls: list[ToolCallPart]) -> None:
        results: list[ToolResultPart | None] = [None] * len(calls)
        # The step holds the slots from the start: an interrupt keeps the results so far.
        step.results = results
        await run_tool_calls(
            self.tools,
            calls,
            results,
            self.tool_context,
            mode=self.tool_calls,
            nursery=self.tool_nursery,
            on_late=self.callbacks.on_late_tool_result,
            log_extra=self.log_extra,
        )

    # -- compaction -------------------------------------------------------------
    async def _summarise(self) -> GenerateResult:
        """The summary call; a prompt the model refuses as too long loses its older half
        (`shortened_for_summary`) until it fits or nothing more can go."""
        history: list[PromptMessage] = list(self.history)
        while True:
            prompt = [
                *history,
                NewMessage(Role.USER, (TextPart(self.config.compaction.summary_prompt),)),
            ]
            try:
                return await self.model.generate(prompt)
            except ModelError as exc:
                shorter = shortened_for_summary(history) if exc.kind == CONTEXT_LENGTH else None
                if shorter is None:
                    raise
                logger.warning(
                    "summary prompt too long, leaving out the %d oldest messages",
                    len(history) - len(shorter),
                    extra={**self.log_extra, "error": exc.message},
                )
                history = shorter

    async def _compact(self, *, overflow: bool = False) -> bool:
        """Summarise, persist the three compaction messages; False when it failed.

        `overflow`: the model refused the last prompt as too long (the report says so)."""
        cfg = self.config.compaction
        tokens, limit = self._context()
        call = ToolCallPart(f"{cfg.tool_name}_{new_id().hex}", cfg.tool_name, "{}")
        await self._publish_part(Role.ASSISTANT, call)
        try:
            with trio.fail_after(cfg.summary_timeout):
                generated = await self._summarise()
        except trio.TooSlowError:
            return await self._compaction_failed(
                call, f"summary timed out after {cfg.summary_timeout} s"
            )
        except ModelError as exc:
            return await self._compaction_failed(call, f"summary failed: {exc.message}")
        except Exception as exc:
            return await self._compaction_failed(call, f"summary failed: {exc}", exc)
        summary = storable_output(generated.text).strip()
        if not summary:
            return await self._compaction_failed(call, "compaction produced an empty summary")
        report: dict[str, JSON] = {
            "summary": summary,
            "source": cfg.summary_source,
            "threshold_percent": cfg.effective_threshold,
            "usage_percent": usage_percent(tokens, limit),
            "context_tokens": tokens,
            "context_limit_tokens": limit,
        }
        if overflow:
            report["reason"] = CONTEXT_LENGTH
        result = ToolResultPart(call.call_id, call.name, report)
        messages = [
            NewMessage(
                Role.USER,
                (TextPart(cfg.summary_prefix + summary),),
                Visibility.MODEL,
                compressed=True,
            ),
            NewMessage(Role.ASSISTANT, (call,), Visibility.USER, compressed=True),
            NewMessage(Role.TOOL, (result,), Visibility.USER, compressed=True),
        ]
        op_id = uuid.uuid4()
        try:
            persisted = await self._retrying(
                lambda: self.store.persist_compaction(
                    self.lease, messages, announce=self.callbacks.announce, op_id=op_id
                ),
                "persisting a compaction",
            )
        except (PersistRefused, StoreUnavailable):
            raise
        except Exception as exc:
            return await self._compaction_failed(call, "failed to persist compaction result", exc)
        # The result only once it is stored (a failed write reports an error result
        # instead); then the stored messages, as one unit no cancellation tears.
        with bounded_cleanup(self.config.cleanup_timeout):
            await self._publish_part(Role.TOOL, result)
            await self.publish_messages(persisted)
        logger.info(
            "compacted",
            extra={**self.log_extra, "context_tokens": tokens, "context_limit": limit},
        )
        return True

    async def _compaction_failed(
        self, call: ToolCallPart, message: str, exc: BaseException | None = None
    ) -> bool:
        logger.warning("compaction failed: %s", message, exc_info=exc, extra={**self.log_extra})
        self.compaction_failure = message
        await self._publish_part(
            Role.TOOL, ToolResultPart(call.call_id, call.name, {"error": message}, is_error=True)
        )
        if self.callbacks.on_error is not None:
            await self.callbacks.on_error(
                ErrorPayload(message=message, kind="compaction", provider=self.model.provider)
            )
        return False

    # -- interrupt ----------------------------------------------------------------
    def kept_on_interrupt(self) -> tuple[uuid.UUID, list[NewMessage]] | None:
        """What an interrupt keeps: the complete unwritten step, else the in-flight one's
        partial (text, calls, a synthetic result for every call without one)."""
        if self.unwritten is not None:
            step, messages = self.unwritten
            return step.op_id, messages
        if self.step is None:
            return None
        messages = self.step.messages(
            self.config.compaction.context_limit, self.config.interrupted_tool_result
        )
        return (self.step.op_id, messages) if messages else None

    async def persist_interrupted(self) -> None:
        """Write what the interrupted turn produced; shielded, bounded by cleanup_timeout.

        Under the step's operation id: if the step's own write was cut off after it
        landed, this recognises it instead of writing the step twice. A transient
        store fault is retried (within the same deadline) like every turn write.
        """
        kept = self.kept_on_interrupt()
        self.step = None
        self.unwritten = None
        if kept is None:
            return
        op_id, messages = kept
        with bounded_cleanup(self.config.cleanup_timeout) as scope:
            try:
                persisted = await self._retrying(
                    lambda: self.store.persist_step(
                        self.lease, messages, announce=self.callbacks.announce, op_id=op_id
                    ),
                    "persisting the interrupted step",
                )
            except PersistRefused:
                logger.info("interrupted step not persisted: refused", extra={**self.log_extra})
                return
            except Exception:
                logger.exception("persisting the interrupted step failed", extra={**self.log_extra})
                return
            await self.publish_messages(persisted)
        if scope.cancelled_caught:
            logger.warning("persisting the interrupted step timed out", extra={**self.log_extra})


async def run_turn(
    store: Store,
    lease: Lease,
    model: Model,
    *,
    tools: ToolRegistry | None = None,
    config: LoopConfig | None = None,
    callbacks: TurnCallbacks | None = None,
    control: TurnControl | None = None,
    load_prompt: PromptLoader | None = None,
    tool_context: ToolContext | None = None,
    tool_nursery: trio.Nursery | None = None,
    strategies: Strategies | None = None,
) -> TurnResult:
    """Run one turn of the chat `lease` holds until the chart reaches a final state.

    The store is used for `prompt_messages` (unless `load_prompt` is given: the caller
    may add system prompts and instruction files to what the store returns),
    `persist_step` and `persist_compaction`, every write under `lease`. The result's
    `final_messages` are for the caller's `finish_turn`. With `tool_nursery`, tools
    run there (see the module docstring). `strategies.tool_calls` says whether a
    step's calls run concurrently (the default) or one after the other.

    Returns the outcome the chart's final state names (DONE, INTERRUPTED, ERROR, LOST,
    UNAVAILABLE). On shutdown the cancellation propagates, in an exception group (as
    it leaves a nursery), after recording the outcome (SHUTDOWN) in `control.result`;
    the `TurnControl` scope around the call absorbs it.
    """
    control = control if control is not None else TurnControl()
    turn = _Turn(
        store,
        lease,
        model,
        tools if tools is not None else ToolRegistry(),
        config if config is not None else LoopConfig(),
        callbacks if callbacks is not None else TurnCallbacks(),
        load_prompt if load_prompt is not None else (lambda: store.prompt_messages(lease.chat_id)),
        tool_context if tool_context is not None else ToolContext(lease.chat_id, lease.worker_id),
        tool_nursery,
        (strategies or Strategies()).tool_calls,
    )
    try:
        with control._interrupt_scope:
            return await turn.run()
    except* trio.Cancelled:
        # Bare, or grouped by the nursery of the tools it went through; whatever else
        # failed beside it propagates with it.
        if control.stop_reason is StopReason.SHUTDOWN:
            # The step in progress is dropped: the next run repeats it (docs/spec.md §1).
            turn.step = None
            turn.chart.send("shutdown")
            control.result = turn.result()
            logger.info("turn shut down: %s", control.detail, extra={**turn.log_extra})
        raise
    # Only reached when the interrupt scope absorbed its own cancellation.
    if control.stop_reason is StopReason.FENCED:
        logger.info("turn fenced: %s", control.detail, extra={**turn.log_extra})
        turn.unwritten = None
        turn.chart.send("fence")
        return turn.result()
    logger.info("turn interrupted: %s", control.detail, extra={**turn.log_extra})
    turn.chart.send("interrupt")
    await turn.persist_interrupted()
    return turn.result()
