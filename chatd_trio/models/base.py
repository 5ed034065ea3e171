"""The Model port: a streamed step and a non-streamed summary call.

A stream yields typed deltas and ends with exactly one `Finish`. Failures
raise `chatd_trio.errors.ModelError`, classified (retryable, kind, provider,
status code, retry-after) by one table, `chatd_trio.models.classify`, so the
loop's retry policy can act on them. `with_options` returns the same model
with other request options (temperature, max tokens...): a per-chat model
selector given to `Server` uses it to override options per chat.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

from chatd_trio.config import RequestOptions
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
    """Streamed answer text."""

    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    """Reasoning text. A delta with a `signature` closes one signed reasoning block
    (Anthropic thinking); a `redacted` one is a whole encrypted block (in `signature`)."""

    text: str
    signature: str = ""
    redacted: bool = False


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
    """The end of a step: its usage (with cached and reasoning tokens when the provider
    reports them), why the model stopped, and the context limit it reported."""

    usage: Usage
    finish_reason: str
    context_limit: int | None = None


Delta = Union[TextDelta, ReasoningDelta, ToolCallDelta, ToolCallDone, Finish]  # noqa: UP007
"""Anything a model's stream yields; one `Finish` ends a step."""


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

    def with_options(self, options: RequestOptions) -> Model:
        """This model with `options` merged over its own (see `RequestOptions.merged`);
        it shares this model's connections, so it needs no closing of its own."""
        ...
