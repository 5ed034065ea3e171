"""The Model port: a streamed step and a non-streamed summary call.

A stream yields typed deltas and ends with exactly one `Finish`. Failures
raise `chatd_trio.errors.ModelError`, classified (retryable, kind, provider,
status code, retry-after) so the loop's retry policy can act on them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

from chatd_trio.domain import JSON, Part, Role, Usage


class PromptMessage(Protocol):
    """Anything with a role and parts: `Message` and `NewMessage` both qualify."""

    @property
    def role(self) -> Role: ...

    @property
    def parts(self) -> tuple[Part, ...]: ...


@dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model: name, description and JSON-schema parameters."""

    name: str
    description: str
    parameters: JSON


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of a tool call; `index` identifies the call within the step."""

    index: int
    call_id: str | None
    name: str | None
    arguments_delta: str


@dataclass(frozen=True)
class ToolCallDone:
    """A complete tool call (arguments is the full JSON text)."""

    index: int
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Finish:
    usage: Usage
    finish_reason: str
    context_limit: int | None = None


Delta = Union[TextDelta, ReasoningDelta, ToolCallDelta, ToolCallDone, Finish]  # noqa: UP007


@dataclass(frozen=True)
class GenerateResult:
    text: str
    usage: Usage


@runtime_checkable
class Model(Protocol):
    """A chat model."""

    @property
    def name(self) -> str: ...

    @property
    def provider(self) -> str: ...

    def stream(
        self, messages: Sequence[PromptMessage], tools: Sequence[ToolSpec]
    ) -> AbstractAsyncContextManager[AsyncIterator[Delta]]:
        """Open one streamed step; iterate the deltas inside the context."""
        ...

    async def generate(self, messages: Sequence[PromptMessage]) -> GenerateResult:
        """One non-streaming call without tools (used for summaries)."""
        ...
