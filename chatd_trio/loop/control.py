"""How a caller drives a turn: its callbacks, its `TurnControl` (interrupt, fence,
shutdown) and the `TurnResult` it gets back (`chatd_trio.loop`)."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import trio

from chatd_trio.domain import (
    ErrorPayload,
    Message,
    MessagePartEvent,
    NewMessage,
    RetryPayload,
    ToolCallPart,
)
from chatd_trio.models.base import (
    PromptMessage,
)
from chatd_trio.store.base import Announcer, TurnOutcome
from statecharts.base import Step

__all__ = [
    "OUTCOMES",
    "ErrorCallback",
    "MessageCallback",
    "PartCallback",
    "PromptLoader",
    "RetryCallback",
    "StopReason",
    "TurnCallbacks",
    "TurnControl",
    "TurnResult",
]

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
