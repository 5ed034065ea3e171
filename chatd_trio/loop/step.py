"""What one model step produced: its deltas accumulated into the parts it persists,
whole or interrupted. No I/O."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from chatd_trio.domain import (
    NewMessage,
    Part,
    ReasoningPart,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Visibility,
)
from chatd_trio.models.base import (
    Delta,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
)
from chatd_trio.storable import storable_text

__all__ = ["CallBuffer", "StepBuffer", "storable_output"]


def storable_output(text: str | None) -> str:
    """Model output through the storable-value gate (NUL, lone surrogates: U+FFFD)."""
    return storable_text(text or "", "model output").value


@dataclass
class CallBuffer:
    """One tool call as its deltas arrive."""

    call_id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class StepBuffer:
    """What one step has produced so far: enough to persist it whole or interrupted."""

    # Closed reasoning blocks (each signed one exactly as the provider sent it: Anthropic
    # refuses a thinking block whose text or signature changed), then the open block.
    blocks: list[ReasoningPart] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    calls: dict[int, CallBuffer] = field(default_factory=dict)
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
            text = storable_output(delta.text)
            self.text.append(text)
            return TextPart(text)
        if isinstance(delta, ReasoningDelta):
            return self._reason(delta)
        if isinstance(delta, ToolCallDelta):
            buf = self.calls.setdefault(delta.index, CallBuffer())
            buf.call_id = storable_output(delta.call_id) or buf.call_id
            buf.name = storable_output(delta.name) or buf.name
            arguments = storable_output(delta.arguments_delta)
            buf.arguments += arguments
            return ToolCallPart(buf.call_id or "", buf.name or "", arguments)
        if isinstance(delta, ToolCallDone):
            call_id, name = storable_output(delta.call_id), storable_output(delta.name)
            arguments = storable_output(delta.arguments)
            self.calls[delta.index] = CallBuffer(call_id, name, arguments)
            return ToolCallPart(call_id, name, arguments)
        self.finish = delta
        return None

    def _reason(self, delta: ReasoningDelta) -> Part | None:
        if delta.redacted:
            self._close_reasoning("")
            self.blocks.append(ReasoningPart("", delta.signature, redacted=True))
            return None
        text = storable_output(delta.text)
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
