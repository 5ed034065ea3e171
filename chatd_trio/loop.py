"""The agent loop: one turn of a chat (docs/spec.md §3 and §3.1).

`run_turn` is a Trio driver of `statecharts.compaction.CompactionChart`: the chart
decides what comes next (load, step, compact, reload, re-enter, finish) and how the
turn ended; this module does it: streams model steps with retries, runs each
step's tools concurrently, persists every step in one guarded store write (under
the run's `Lease`), compacts the history and publishes every delta, message,
retry and non-fatal error through the caller's callbacks. The turn's outcome is
the chart's final state (`TurnResult.final_state`), mapped to a `TurnOutcome`.

Stopping is cancellation. The caller holds a `TurnControl`: `interrupt()` ends the
turn as INTERRUPTED after a write of what the step produced so far; `shutdown()`
lets `trio.Cancelled` propagate out of `run_turn` (the server hands the chat back
as pending) after recording the outcome on the control (`TurnControl.result`).

Exactly once (docs/spec.md §1):
- A completed step is written when the chart's next move needs it written (a
  compaction, a reload, another step). A step after which the chart ends the turn
  is not written here: it is `TurnResult.final_messages`, which the caller writes
  together with the finish, in one transaction. A stored answer therefore always
  has its finish, and a recovered turn whose answer is stored ends in `answered`
  without calling the model (`already_answered`).
- Every write of a step carries an operation id; an attempt retried after an
  ambiguous failure, or the interrupted write of a step whose complete write was
  cut off, lands at most once.
- A transient store fault (`StoreUnavailable`) is retried with backoff within
  `LoopConfig.store_retry`; past that budget the turn ends `unavailable` and the
  chat is handed back as pending. A refused write (the run lost the chat, or an
  edit made it pending) ends it `fenced`: nothing more is written.
- Tools run in tasks of the caller's `tool_nursery` when given: an interrupted
  turn stops waiting for a tool that ignores cancellation, and that tool's late
  result is dropped and counted (`TurnCallbacks.on_late_tool_result`).

Decisions where the specification is silent:
- Backoff: the n-th retry (n from 0) waits `min(base * 2^n, max_delay)`; a
  provider's `retry_after` raises that when larger, whatever `max_delay` says.
  A step stops retrying after `max_attempts` attempts (the first included) or
  when the next wait would end past `max_elapsed` seconds since its first
  attempt (`unreachable_elapsed` while no attempt has reached the server): a
  Retry-After is honoured up to that budget, never beyond it.
- A failed summary call (error, timeout) is handled like an empty summary: an
  error tool result is published, `on_error` is told, the turn goes on.
- A step the model refuses as too long for its context window (kind
  `context_length`) is not retried as it stands: the chart compacts the history and
  runs the step again, at most `compaction.context_length_retries` times per step
  (a `retry` event with no delay first tells subscribers to drop the refused
  attempt's parts). A summary prompt refused as too long loses the older half of
  the history (`shortened_for_summary`) until it fits.
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
from typing import TypeVar

import trio

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio.config import LoopConfig, RetryConfig, StoreRetryConfig
from chatd_trio.domain import (
    JSON,
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
from chatd_trio.errors import ModelError, PersistRefused, StoreUnavailable
from chatd_trio.models.base import (
    Delta,
    Finish,
    GenerateResult,
    Model,
    PromptMessage,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
)
from chatd_trio.models.classify import CONTEXT_LENGTH, UNREACHABLE
from chatd_trio.storable import storable_text
from chatd_trio.store.base import Announcer, Lease, Store, TurnOutcome
from chatd_trio.strategies import Strategies, ToolCalls
from chatd_trio.tools import ToolContext, ToolRegistry
from statecharts.base import Step
from statecharts.compaction import Activity, CompactionChart, over_threshold, usage_percent

logger = logging.getLogger(__name__)

T = TypeVar("T")

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
    `on_late_tool_result`: a tool that ignored the turn's cancellation returned after
    the turn stopped waiting for it; its result is dropped.
    `on_store_retry`: a write failed transiently and is about to be retried.
    `announce`: passed to the store's persist operations, which then send the
    messages' notifies in the inserting transaction (see `Store.announces_to`).
    """

    on_part: PartCallback | None = None
    on_message: MessageCallback | None = None
    on_retry: RetryCallback | None = None
    on_error: ErrorCallback | None = None
    on_late_tool_result: Callable[[ToolCallPart], None] | None = None
    on_store_retry: Callable[[str, BaseException], None] | None = None
    announce: Announcer | None = None


class StopReason(enum.StrEnum):
    INTERRUPT = "interrupt"
    SHUTDOWN = "shutdown"
    FENCED = "fenced"


class TurnControl:
    """How the caller stops a running turn, and why.

    Enter it around `run_turn` so that `shutdown()` can cancel the turn::

        control = TurnControl()
        with control:
            result = await run_turn(..., control=control)
        if control.stop_reason is StopReason.SHUTDOWN: ...  # control.result says how

    `interrupt()` needs no entering: `run_turn` owns that scope and returns INTERRUPTED.
    Either method may be called before the turn starts; it then stops at once. One
    control serves one turn (each of its cancel scopes is entered once).
    """

    def __init__(self) -> None:
        self._interrupt_scope = trio.CancelScope()
        self._shutdown_scope = trio.CancelScope()
        self.stop_reason: StopReason | None = None
        self.detail = ""
        # Set by `run_turn` when a shutdown cancelled it: the chart's outcome.
        self.result: TurnResult | None = None

    def interrupt(self, detail: str = "interrupted") -> None:
        """Stop the turn as a user interrupt: keep what was produced."""
        if self.stop_reason is None:
            self.stop_reason = StopReason.INTERRUPT
            self.detail = detail
        self._interrupt_scope.cancel()

    def fence(self, detail: str = "the chat is held by another run") -> None:
        """Stop the turn because its run lost the chat (another token holds it): nothing
        it produced may be written, so it ends `fenced` without trying."""
        if self.stop_reason in (None, StopReason.INTERRUPT):
            self.stop_reason = StopReason.FENCED
            self.detail = detail
        self._interrupt_scope.cancel()

    def shutdown(self, detail: str = "shutting down") -> None:
        """Stop the turn for a replica shutdown: a cancellation leaves `run_turn`.

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


# How each final state of the chart ends the turn for the chat's lifecycle.
OUTCOMES: dict[str, TurnOutcome] = {
    "done": TurnOutcome.DONE,
    "exhausted": TurnOutcome.DONE,
    "step_limit": TurnOutcome.DONE,
    "answered": TurnOutcome.DONE,
    "failed": TurnOutcome.ERROR,
    "interrupted": TurnOutcome.INTERRUPTED,
    "shut_down": TurnOutcome.SHUTDOWN,
    "fenced": TurnOutcome.LOST,
    "unavailable": TurnOutcome.UNAVAILABLE,
}


@dataclass(frozen=True)
class TurnResult:
    """How a turn ended and what it used.

    `final_messages` are the turn's last messages, not yet written: the caller writes
    them with the final transition (`Store.finish_turn(..., messages=...)`).
    """

    outcome: TurnOutcome
    steps: int
    compactions: int
    reentries: int
    retries: int = 0
    error: ErrorPayload | None = None
    final_messages: tuple[NewMessage, ...] = ()
    store_retries: int = 0
    # A complete step whose write was started but not confirmed (an outage or a
    # shutdown cut it off): the caller writes it again under `unconfirmed_op`, which
    # the store recognises if the first attempt landed, before the final transition.
    unconfirmed: tuple[NewMessage, ...] = ()
    unconfirmed_op: uuid.UUID | None = None
    # The compaction chart's path and final state (the outcome's source).
    trace: tuple[Step, ...] = ()
    final_state: str = ""

    @property
    def persist_refused(self) -> bool:
        """True when a write was refused (the chat was edited or taken over)."""
        return self.final_state == "fenced"


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


async def with_store_retries(
    call: Callable[[], Awaitable[T]],
    config: StoreRetryConfig,
    *,
    what: str,
    on_retry: Callable[[str, BaseException], None] | None = None,
    log_extra: dict[str, str] | None = None,
) -> T:
    """Run `call`, retrying `StoreUnavailable` with backoff until `config.budget` runs out.

    The last `StoreUnavailable` propagates when the next attempt would start after the
    budget. `call` must be idempotent (turn writes carry an operation id).
    """
    deadline = trio.current_time() + config.budget
    attempt = 0
    while True:
        try:
            return await call()
        except StoreUnavailable as exc:
            delay = min(config.base_delay * 2.0 ** min(attempt, 62), config.max_delay)
            attempt += 1
            if trio.current_time() + delay > deadline:
                raise
            logger.warning(
                "store unavailable during %s, retrying in %.1f s",
                what,
                delay,
                extra={**(log_extra or {}), "attempt": attempt, "error": str(exc)},
            )
            if on_retry is not None:
                on_retry(what, exc)
            await trio.sleep(delay)


def already_answered(history: Sequence[PromptMessage]) -> bool:
    """Whether the history after its last user message ends in a final answer: an
    assistant message without tool calls, with every earlier tool call answered.

    A recovered turn over such a history is complete; running the model again
    would answer the same message twice.
    """
    last_user = None
    for index, message in enumerate(history):
        if message.role is Role.USER and not getattr(message, "compressed", False):
            last_user = index
    if last_user is None:
        return False
    tail = history[last_user + 1 :]
    if not tail or tail[-1].role is not Role.ASSISTANT:
        return False
    calls = {p.call_id for m in tail for p in m.parts if isinstance(p, ToolCallPart)}
    answered = {p.call_id for m in tail for p in m.parts if isinstance(p, ToolResultPart)}
    final_calls = any(isinstance(p, ToolCallPart) for p in tail[-1].parts)
    return not final_calls and calls <= answered


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


def shortened_for_summary(history: Sequence[PromptMessage]) -> list[PromptMessage] | None:
    """The history without its older half, for a summary prompt the model refused as too
    long; None when nothing more can go.

    System messages and an earlier summary (compressed) stay. The cut moves forward to
    a user message, or failing that past tool messages, so that no tool result is left
    without its call (providers refuse that).
    """
    pinned = [m.role is Role.SYSTEM or bool(getattr(m, "compressed", False)) for m in history]
    movable = [i for i, pin in enumerate(pinned) if not pin]
    if len(movable) < 2:
        return None
    rest = movable[len(movable) // 2 :]
    users = [i for i in rest if history[i].role is Role.USER]
    others = [i for i in rest if history[i].role is not Role.TOOL]
    if not (users or others):
        return None
    cut = (users or others)[0]
    return [m for i, m in enumerate(history) if pinned[i] or i >= cut]


def _storable(text: str | None) -> str:
    return storable_text(text or "", "model output").value


@dataclass
class _CallBuffer:
    call_id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class _StepBuffer:
    """What one step has produced so far: enough to persist it whole or interrupted."""

    # Closed reasoning blocks (each signed one exactly as the provider sent it: Anthropic
    # refuses a thinking block whose text or signature changed), then the open block.
    blocks: list[ReasoningPart] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    calls: dict[int, _CallBuffer] = field(default_factory=dict)
    finish: Finish | None = None
    # One slot per tool call once tools run; None until that call has a result.
    results: list[ToolResultPart | None] = field(default_factory=list)
    # Every write of this step (complete, or interrupted) carries this id: it lands once.
    op_id: uuid.UUID = field(default_factory=uuid.uuid4)
    # A write of the complete step was started: it may have landed, unacknowledged.
    write_started: bool = False

    def apply(self, delta: Delta) -> Part | None:
        """Record a delta; returns the part to publish (None for `Finish` and for a
        reasoning delta without text: a signature or a redacted block).

        Model output passes the storable-value gate here, so what subscribers see
        streamed is what the store keeps (NUL and lone surrogates as U+FFFD)."""
        if isinstance(delta, TextDelta):
            text = _storable(delta.text)
            self.text.append(text)
            return TextPart(text)
        if isinstance(delta, ReasoningDelta):
            return self._reason(delta)
        if isinstance(delta, ToolCallDelta):
            buf = self.calls.setdefault(delta.index, _CallBuffer())
            buf.call_id = _storable(delta.call_id) or buf.call_id
            buf.name = _storable(delta.name) or buf.name
            arguments = _storable(delta.arguments_delta)
            buf.arguments += arguments
            return ToolCallPart(buf.call_id or "", buf.name or "", arguments)
        if isinstance(delta, ToolCallDone):
            call_id, name = _storable(delta.call_id), _storable(delta.name)
            arguments = _storable(delta.arguments)
            self.calls[delta.index] = _CallBuffer(call_id, name, arguments)
            return ToolCallPart(call_id, name, arguments)
        self.finish = delta
        return None

    def _reason(self, delta: ReasoningDelta) -> Part | None:
        if delta.redacted:
            self._close_reasoning("")
            self.blocks.append(ReasoningPart("", delta.signature, redacted=True))
            return None
        text = _storable(delta.text)
        self.reasoning.append(text)
        if delta.signature:
            self._close_reasoning(delta.signature)
        return ReasoningPart(text) if text else None

    def _close_reasoning(self, signature: str) -> None:
        if self.reasoning or signature:
            self.blocks.append(ReasoningPart("".join(self.reasoning), signature))
        self.reasoning = []

    def reasoning_parts(self) -> list[ReasoningPart]:
        """Every reasoning block so far; unsigned text (another provider's reasoning, or
        a thinking block cut before its signature) as one unsigned part."""
        parts = list(self.blocks)
        if self.reasoning:
            parts.append(ReasoningPart("".join(self.reasoning)))
        return parts

    def tool_calls(self) -> list[ToolCallPart]:
        return [
            ToolCallPart(buf.call_id or f"call_{index}", buf.name or "", buf.arguments)
            for index, buf in sorted(self.calls.items())
        ]

    def assistant_parts(self) -> tuple[Part, ...]:
        parts: list[Part] = [p for p in self.reasoning_parts() if p.text or p.signature]
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
        self.step: _StepBuffer | None = None
        # A complete step not written yet: written before the next activity that needs
        # it, or handed to the caller's finish when the chart ends the turn.
        self.unwritten: tuple[_StepBuffer, list[NewMessage]] | None = None
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

        if self.tool_calls is ToolCalls.SEQUENTIAL:
            for index, call in enumerate(calls):
                await run_one(index, call)
            return
        if self.tool_nursery is None:
            async with trio.open_nursery() as nursery:
                for index, call in enumerate(calls):
                    nursery.start_soon(run_one, index, call)
            return
        await self._run_tools_detachable(calls, results)

    async def _run_tools_detachable(
        self, calls: list[ToolCallPart], results: list[ToolResultPart | None]
    ) -> None:
        """Run the calls in the caller's tool nursery and wait for them; when this turn
        is cancelled it stops waiting at once. A tool that ignores the cancellation
        (a blocking thread) finishes in the tool nursery; its late result is dropped."""
        assert self.tool_nursery is not None
        remaining = len(calls)
        all_done = trio.Event()
        scopes = [trio.CancelScope() for _ in calls]
        abandoned = False

        async def run_one(index: int, call: ToolCallPart, scope: trio.CancelScope) -> None:
            nonlocal remaining
            result: ToolResultPart | None = None
            with scope:
                result = await self.tools.invoke(call, self.tool_context)
            if abandoned:
                if result is not None:
                    logger.warning(
                        "late tool result dropped",
                        extra={**self.log_extra, "tool": call.name, "call_id": call.call_id},
                    )
                    if self.callbacks.on_late_tool_result is not None:
                        self.callbacks.on_late_tool_result(call)
                return
            results[index] = result
            remaining -= 1
            if remaining == 0:
                all_done.set()

        for index, call in enumerate(calls):
            self.tool_nursery.start_soon(run_one, index, call, scopes[index])
        try:
            await all_done.wait()
        except BaseException:
            abandoned = True
            for scope in scopes:
                scope.cancel()
            raise

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
        summary = _storable(generated.text).strip()
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
