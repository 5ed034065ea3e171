"""The agent loop: one turn of a chat (docs/spec.md §3 and §3.1).

`run_turn` is a Trio driver of `statecharts.compaction.CompactionChart`: the chart
decides what comes next (step, compact, reload, re-enter, finish) and this module
does it: streams model steps with retries, runs each step's tools concurrently,
persists every step in one store call, compacts the history and publishes every
delta, message, retry and non-fatal error through the caller's callbacks.

Stopping is cancellation. The caller holds a `TurnControl`: `interrupt()` ends the
turn as INTERRUPTED after a shielded write of what the step produced so far;
`shutdown()` lets `trio.Cancelled` propagate out of `run_turn` (the server hands
the chat back as pending) and writes nothing.

Decisions where the specification is silent:
- Backoff: the n-th retry (n from 0) waits `min(base * 2^n, max_delay)`; a
  provider's `retry_after` raises that when larger, whatever `max_delay` says.
  A step stops retrying after `max_attempts` attempts (the first included) or
  when the next wait would end past `max_elapsed` seconds since its first
  attempt (`unreachable_elapsed` while no attempt has reached the server): a
  Retry-After is honoured up to that budget, never beyond it.
- A failed summary call (error, timeout) is handled like an empty summary: an
  error tool result is published, `on_error` is told, the turn goes on.
- `PersistRefused` from any write (step or compaction) ends the turn as
  INTERRUPTED with no further writes. Any other persist-step error propagates.
- Every persist (step, compaction) runs shielded with `cleanup_timeout`: a
  cancellation never leaves it ambiguous whether a step was written.
- `on_message` receives the user-visible persisted messages (the hidden summary
  is model-only); the caller clears its stream buffer there.
- `on_error` receives non-fatal errors only; a fatal one is in `TurnResult.error`.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType

import trio

from chatd_trio.config import LoopConfig, RetryConfig
from chatd_trio.domain import (
    ErrorPayload,
    Message,
    MessagePartEvent,
    NewMessage,
    Part,
    ReasoningPart,
    RetryPayload,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Visibility,
    new_id,
)
from chatd_trio.errors import ModelError, PersistRefused, StoreError
from chatd_trio.models.base import (
    Delta,
    Finish,
    Model,
    PromptMessage,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
)
from chatd_trio.models.classify import UNREACHABLE
from chatd_trio.store.base import Announcer, Store, TurnOutcome
from chatd_trio.tools import ToolContext, ToolRegistry
from statecharts.base import Step
from statecharts.compaction import Activity, CompactionChart, over_threshold, usage_percent

logger = logging.getLogger(__name__)


PartCallback = Callable[[MessagePartEvent], Awaitable[None]]
MessageCallback = Callable[[Message], Awaitable[None]]
RetryCallback = Callable[[RetryPayload], Awaitable[None]]
ErrorCallback = Callable[[ErrorPayload], Awaitable[None]]
PromptLoader = Callable[[], Awaitable[Sequence[PromptMessage]]]


@dataclass(frozen=True)
class TurnCallbacks:
    """Where a turn reports what happens; every callback is optional.

    `on_part`: each streamed delta, tool result and compaction indicator (ephemeral).
    `on_message`: each persisted user-visible message, in id order (durable).
    `on_retry`: before each retry's backoff sleep (publish locally and via pubsub).
    `on_error`: a non-fatal error (compaction failed); the turn goes on.
    `announce`: passed to the store's persist operations, which then send the
    messages' notifies in the inserting transaction (see `Store.announces_to`).
    """

    on_part: PartCallback | None = None
    on_message: MessageCallback | None = None
    on_retry: RetryCallback | None = None
    on_error: ErrorCallback | None = None
    announce: Announcer | None = None


class StopReason(enum.StrEnum):
    INTERRUPT = "interrupt"
    SHUTDOWN = "shutdown"


class TurnControl:
    """How the caller stops a running turn, and why.

    Enter it around `run_turn` so that `shutdown()` can cancel the turn::

        control = TurnControl()
        with control:
            result = await run_turn(..., control=control)
        if control.stop_reason is StopReason.SHUTDOWN: ...  # hand the chat back

    `interrupt()` needs no entering: `run_turn` owns that scope and returns INTERRUPTED.
    Either method may be called before the turn starts; it then stops at once. One
    control serves one turn (each of its cancel scopes is entered once).
    """

    def __init__(self) -> None:
        self._interrupt_scope = trio.CancelScope()
        self._shutdown_scope = trio.CancelScope()
        self.stop_reason: StopReason | None = None
        self.detail = ""

    def interrupt(self, detail: str = "interrupted") -> None:
        """Stop the turn as a user interrupt: keep what was produced."""
        if self.stop_reason is None:
            self.stop_reason = StopReason.INTERRUPT
            self.detail = detail
        self._interrupt_scope.cancel()

    def shutdown(self, detail: str = "shutting down") -> None:
        """Stop the turn for a replica shutdown: `trio.Cancelled` leaves `run_turn`.

        Wins over an earlier interrupt."""
        self.stop_reason = StopReason.SHUTDOWN
        self.detail = detail
        self._shutdown_scope.cancel()

    @property
    def shut_down(self) -> bool:
        """True when the turn was stopped by `shutdown()`."""
        return self._shutdown_scope.cancelled_caught

    def __enter__(self) -> TurnControl:
        self._shutdown_scope.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self._shutdown_scope.__exit__(exc_type, exc, tb)


@dataclass(frozen=True)
class TurnResult:
    """How a turn ended and what it used."""

    outcome: TurnOutcome
    steps: int
    compactions: int
    reentries: int
    retries: int = 0
    error: ErrorPayload | None = None
    # True when a write was refused (the chat was edited or taken over).
    persist_refused: bool = False
    # The compaction chart's path, for diagnostics and property tests.
    trace: tuple[Step, ...] = ()
    final_state: str = ""


def retry_delay(config: RetryConfig, retry_index: int, retry_after: float | None) -> float:
    """Backoff before retry number `retry_index` (from 0); see the module docstring."""
    # 2^62 s already exceeds any ceiling; cap the exponent so huge indices cannot overflow.
    backoff = min(config.base_delay * 2.0 ** min(retry_index, 62), config.max_delay)
    if retry_after is not None and retry_after > 0:
        # Not capped by max_delay: the step's time budget bounds it (_stream_with_retries).
        return max(backoff, retry_after)
    return backoff


def format_elapsed(seconds: float) -> str:
    """A duration for people: "45s", "5m12s", "1h02m"."""
    whole = max(round(seconds), 0)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def error_payload(exc: ModelError, provider: str) -> ErrorPayload:
    """The structured, user-facing form of a model error."""
    return ErrorPayload(
        message=exc.message,
        kind=exc.kind,
        provider=exc.provider or provider,
        retryable=exc.retryable,
        status_code=exc.status_code,
    )


class _TurnFailed(Exception):
    def __init__(self, payload: ErrorPayload) -> None:
        super().__init__(payload.message)
        self.payload = payload


@dataclass
class _CallBuffer:
    call_id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class _StepBuffer:
    """What one step has produced so far: enough to persist it whole or interrupted."""

    reasoning: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    calls: dict[int, _CallBuffer] = field(default_factory=dict)
    finish: Finish | None = None
    # One slot per tool call once tools run; None until that call has a result.
    results: list[ToolResultPart | None] = field(default_factory=list)

    def apply(self, delta: Delta) -> Part | None:
        """Record a delta; returns the part to publish (None for `Finish`)."""
        if isinstance(delta, TextDelta):
            self.text.append(delta.text)
            return TextPart(delta.text)
        if isinstance(delta, ReasoningDelta):
            self.reasoning.append(delta.text)
            return ReasoningPart(delta.text)
        if isinstance(delta, ToolCallDelta):
            buf = self.calls.setdefault(delta.index, _CallBuffer())
            buf.call_id = delta.call_id or buf.call_id
            buf.name = delta.name or buf.name
            buf.arguments += delta.arguments_delta
            return ToolCallPart(buf.call_id or "", buf.name or "", delta.arguments_delta)
        if isinstance(delta, ToolCallDone):
            self.calls[delta.index] = _CallBuffer(delta.call_id, delta.name, delta.arguments)
            return ToolCallPart(delta.call_id, delta.name, delta.arguments)
        self.finish = delta
        return None

    def tool_calls(self) -> list[ToolCallPart]:
        return [
            ToolCallPart(buf.call_id or f"call_{index}", buf.name or "", buf.arguments)
            for index, buf in sorted(self.calls.items())
        ]

    def assistant_parts(self) -> tuple[Part, ...]:
        parts: list[Part] = []
        if self.reasoning:
            parts.append(ReasoningPart("".join(self.reasoning)))
        if self.text:
            parts.append(TextPart("".join(self.text)))
        parts.extend(self.tool_calls())
        return tuple(parts)

    def messages(self, context_limit: int, interrupted_result: str | None) -> list[NewMessage]:
        """The step's assistant message plus one tool message per call.

        With `interrupted_result`, calls without a result get a synthetic error
        result, and an empty step yields nothing.
        """
        parts = self.assistant_parts()
        if interrupted_result is not None and not parts:
            return []
        finish = self.finish
        out = [
            NewMessage(
                Role.ASSISTANT,
                parts,
                Visibility.BOTH,
                usage=finish.usage if finish else None,
                context_limit=(finish.context_limit or context_limit) if finish else None,
            )
        ]
        for i, call in enumerate(self.tool_calls()):
            result = self.results[i] if i < len(self.results) else None
            if result is None:
                if interrupted_result is None:
                    raise AssertionError("a completed step has a result for every call")
                result = ToolResultPart(
                    call.call_id, call.name, {"error": interrupted_result}, is_error=True
                )
            out.append(NewMessage(Role.TOOL, (result,), Visibility.BOTH))
        return out


class _Turn:
    """One turn's state; `run` drives the chart until it reaches a final state."""

    def __init__(
        self,
        store: Store,
        chat_id: uuid.UUID,
        worker_id: uuid.UUID,
        model: Model,
        tools: ToolRegistry,
        config: LoopConfig,
        callbacks: TurnCallbacks,
        load_prompt: PromptLoader,
        tool_context: ToolContext,
    ) -> None:
        self.store = store
        self.chat_id = chat_id
        self.worker_id = worker_id
        self.model = model
        self.tools = tools
        self.config = config
        self.callbacks = callbacks
        self.load_prompt = load_prompt
        self.tool_context = tool_context
        self.chart = CompactionChart.fresh(
            config.max_steps, config.compaction.max_compaction_retries, owner=self
        )
        self.history: list[PromptMessage] = []
        # The in-flight step; None once persisted (nothing left to save on interrupt).
        self.step: _StepBuffer | None = None
        self.last_finish: Finish | None = None
        self.retries = 0
        self.log_extra = {"chat_id": str(chat_id), "worker_id": str(worker_id)}

    # -- driving the chart ----------------------------------------------------
    async def run(self) -> TurnResult:
        self.history = list(await self.load_prompt())
        try:
            while (activity := self.chart.activity) is not None:
                if activity is Activity.STEP:
                    tool_calls = await self._step()
                    self.chart.send(
                        "step_persisted", tool_calls=tool_calls, over_threshold=self._over()
                    )
                elif activity is Activity.COMPACT:
                    compacted = await self._compact()
                    self.chart.send("summary_ok" if compacted else "summary_failed")
                elif activity is Activity.RELOAD:
                    self.history = list(await self.load_prompt())
                    self.chart.send("reloaded")
                else:
                    self.chart.send("post_run_check", over_threshold=self._over())
        except _TurnFailed as failed:
            logger.warning("turn failed: %s", failed.payload.message, extra={**self.log_extra})
            return self.result(TurnOutcome.ERROR, error=failed.payload)
        return self.result(TurnOutcome.DONE)

    def result(
        self,
        outcome: TurnOutcome,
        *,
        error: ErrorPayload | None = None,
        persist_refused: bool = False,
    ) -> TurnResult:
        return TurnResult(
            outcome=outcome,
            steps=self.chart.steps_used,
            compactions=self.chart.compactions,
            reentries=self.chart.reentries,
            retries=self.retries,
            error=error,
            persist_refused=persist_refused,
            trace=tuple(self.chart.trace),
            final_state=self.chart.state_id,
        )

    # -- facts ------------------------------------------------------------------
    def _context(self) -> tuple[int, int]:
        """Context tokens and limit of the last persisted step (docs/spec.md §3.1)."""
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

    async def _publish_messages(self, messages: Sequence[Message]) -> None:
        if self.callbacks.on_message is None:
            return
        for message in messages:
            if message.user_visible:
                await self.callbacks.on_message(message)

    async def _persist_and_publish(
        self,
        write: Callable[[], Awaitable[list[Message]]],
        what: str,
        written: Callable[[list[Message]], None] | None = None,
        publish_first: Callable[[], Awaitable[None]] | None = None,
    ) -> list[Message]:
        """Write, then publish what was written, as one unit no cancellation tears
        (bounded by cleanup_timeout). `written` runs right after the write, before any
        checkpoint; `publish_first` publishes before the messages. A message persisted
        but never announced would reach subscribers only at their next read."""
        persisted: list[Message] | None = None
        with trio.move_on_after(self.config.cleanup_timeout, shield=True):
            persisted = await write()
            if written is not None:
                written(persisted)
            if publish_first is not None:
                await publish_first()
            await self._publish_messages(persisted)
        if persisted is None:
            raise StoreError(f"{what} did not finish within {self.config.cleanup_timeout} s")
        return persisted

    # -- one step ---------------------------------------------------------------
    async def _step(self) -> bool:
        """Stream, run tools, persist, publish; True when the model called tools."""
        step = await self._stream_with_retries()
        calls = step.tool_calls()
        if calls:
            await self._run_tools(step, calls)
            for result in step.results:
                assert result is not None
                await self._publish_part(Role.TOOL, result)
        messages = step.messages(self.config.compaction.context_limit, None)

        def written(persisted: list[Message]) -> None:
            # No checkpoint between the write and this: an interrupt cannot persist twice.
            self.step = None
            self.history.extend(persisted)
            self.last_finish = step.finish

        await self._persist_and_publish(
            lambda: self.store.persist_step(
                self.chat_id, self.worker_id, messages, announce=self.callbacks.announce
            ),
            "persisting a step",
            written,
        )
        return bool(calls)

    async def _stream_with_retries(self) -> _StepBuffer:
        retry = self.config.retry
        attempt = 0
        started = trio.current_time()
        # Until an attempt reaches the server, a short budget applies (a wrong base_url).
        reached = False
        while True:
            attempt += 1
            self.step = step = _StepBuffer()
            try:
                await self._stream_once(step)
                return step
            except ModelError as exc:
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

    async def _stream_once(self, step: _StepBuffer) -> None:
        async with self.model.stream(self.history, self.tools.specs()) as deltas:
            async for delta in deltas:
                part = step.apply(delta)
                if part is not None:
                    await self._publish_part(Role.ASSISTANT, part)

    async def _run_tools(self, step: _StepBuffer, calls: list[ToolCallPart]) -> None:
        results: list[ToolResultPart | None] = [None] * len(calls)
        step.results = results

        async def run_one(index: int, call: ToolCallPart) -> None:
            results[index] = await self.tools.invoke(call, self.tool_context)

        if not self.config.parallel_tools:
            for index, call in enumerate(calls):
                await run_one(index, call)
            return
        try:
            async with trio.open_nursery() as nursery:
                for index, call in enumerate(calls):
                    nursery.start_soon(run_one, index, call)
        except BaseExceptionGroup as group:
            # `invoke` turns every Exception into a result, so only cancellation gets
            # here; we are cancelled too, so this checkpoint raises a plain Cancelled.
            if group.split(trio.Cancelled)[1] is None:
                await trio.lowlevel.checkpoint()
            raise

    # -- compaction -------------------------------------------------------------
    async def _compact(self) -> bool:
        """Summarise, persist the three compaction messages; False when it failed."""
        cfg = self.config.compaction
        tokens, limit = self._context()
        call = ToolCallPart(f"{cfg.tool_name}_{new_id().hex}", cfg.tool_name, "{}")
        await self._publish_part(Role.ASSISTANT, call)
        prompt: list[PromptMessage] = [
            *self.history,
            NewMessage(Role.USER, (TextPart(cfg.summary_prompt),)),
        ]
        try:
            with trio.fail_after(cfg.summary_timeout):
                generated = await self.model.generate(prompt)
        except trio.TooSlowError:
            return await self._compaction_failed(
                call, f"summary timed out after {cfg.summary_timeout} s"
            )
        except ModelError as exc:
            return await self._compaction_failed(call, f"summary failed: {exc.message}")
        except Exception as exc:
            return await self._compaction_failed(call, f"summary failed: {exc}", exc)
        summary = generated.text.strip()
        if not summary:
            return await self._compaction_failed(call, "compaction produced an empty summary")
        report = {
            "summary": summary,
            "source": cfg.summary_source,
            "threshold_percent": cfg.effective_threshold,
            "usage_percent": usage_percent(tokens, limit),
            "context_tokens": tokens,
            "context_limit_tokens": limit,
        }
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
        try:
            await self._persist_and_publish(
                lambda: self.store.persist_compaction(
                    self.chat_id, self.worker_id, messages, announce=self.callbacks.announce
                ),
                "persisting a compaction",
                publish_first=lambda: self._publish_part(Role.TOOL, result),
            )
        except PersistRefused:
            raise
        except Exception as exc:
            return await self._compaction_failed(call, "failed to persist compaction result", exc)
        logger.info(
            "compacted",
            extra={**self.log_extra, "context_tokens": tokens, "context_limit": limit},
        )
        return True

    async def _compaction_failed(
        self, call: ToolCallPart, message: str, exc: BaseException | None = None
    ) -> bool:
        logger.warning("compaction failed: %s", message, exc_info=exc, extra={**self.log_extra})
        await self._publish_part(
            Role.TOOL, ToolResultPart(call.call_id, call.name, {"error": message}, is_error=True)
        )
        if self.callbacks.on_error is not None:
            await self.callbacks.on_error(
                ErrorPayload(message=message, kind="compaction", provider=self.model.provider)
            )
        return False

    # -- interrupt ----------------------------------------------------------------
    async def persist_interrupted(self) -> None:
        """Write what the in-flight step produced; shielded, bounded by cleanup_timeout."""
        step, self.step = self.step, None
        if step is None:
            return
        messages = step.messages(
            self.config.compaction.context_limit, self.config.interrupted_tool_result
        )
        if not messages:
            return
        with trio.move_on_after(self.config.cleanup_timeout, shield=True) as scope:
            try:
                persisted = await self.store.persist_step(
                    self.chat_id, self.worker_id, messages, announce=self.callbacks.announce
                )
            except PersistRefused:
                logger.info("interrupted step not persisted: refused", extra={**self.log_extra})
                return
            except Exception:
                logger.exception("persisting the interrupted step failed", extra={**self.log_extra})
                return
            await self._publish_messages(persisted)
        if scope.cancelled_caught:
            logger.warning("persisting the interrupted step timed out", extra={**self.log_extra})


async def run_turn(
    store: Store,
    chat_id: uuid.UUID,
    worker_id: uuid.UUID,
    model: Model,
    *,
    tools: ToolRegistry | None = None,
    config: LoopConfig | None = None,
    callbacks: TurnCallbacks | None = None,
    control: TurnControl | None = None,
    load_prompt: PromptLoader | None = None,
    tool_context: ToolContext | None = None,
) -> TurnResult:
    """Run one turn of `chat_id` as `worker_id` until the model stops or a limit is hit.

    The store is used for `prompt_messages` (unless `load_prompt` is given: the caller
    may add system prompts and instruction files to what the store returns),
    `persist_step` and `persist_compaction` only.

    Returns DONE, INTERRUPTED (interrupt, or a write refused after an edit) or ERROR
    (a non-retryable model error, or retries exhausted). Raises `trio.Cancelled` on
    shutdown and propagates store errors other than `PersistRefused`.
    """
    control = control if control is not None else TurnControl()
    turn = _Turn(
        store,
        chat_id,
        worker_id,
        model,
        tools if tools is not None else ToolRegistry(),
        config if config is not None else LoopConfig(),
        callbacks if callbacks is not None else TurnCallbacks(),
        load_prompt if load_prompt is not None else (lambda: store.prompt_messages(chat_id)),
        tool_context if tool_context is not None else ToolContext(chat_id, worker_id),
    )
    try:
        with control._interrupt_scope:
            return await turn.run()
    except PersistRefused:
        logger.info("write refused, turn ends as interrupted", extra={**turn.log_extra})
        return turn.result(TurnOutcome.INTERRUPTED, persist_refused=True)
    # Only reached when the interrupt scope absorbed its own cancellation.
    logger.info("turn interrupted: %s", control.detail, extra={**turn.log_extra})
    await turn.persist_interrupted()
    return turn.result(TurnOutcome.INTERRUPTED)
