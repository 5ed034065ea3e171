"""A deterministic `Model` for tests, the demo and the scale test.

A `ScriptedModel` plays `ScriptStep`s: each stream call takes the next step of a
finite script, or asks a function that maps the prompt to a step (for endless,
same-shaped turns). A step lists the deltas to yield, optionally a latency before
each delta (`trio.sleep`, so a `MockClock` controls it), and optionally an error:
raised when the stream opens, or after `cut_after` deltas (a stream cut mid-way).
`hang_after` blocks forever after that many deltas (to interrupt a stream in
flight). Summaries for `generate()` come from their own script. Every call's
prompt is recorded so tests can assert what the model saw.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from chatd_trio.config import RequestOptions
from chatd_trio.domain import JSON, Role, Usage
from chatd_trio.errors import ModelError
from chatd_trio.models.base import (
    Delta,
    Finish,
    GenerateResult,
    PromptMessage,
    ReasoningDelta,
    TextDelta,
    ToolCallDone,
    ToolSpec,
)

PROVIDER = "scripted"


@dataclass(frozen=True)
class ScriptStep:
    """One scripted stream call."""

    deltas: tuple[Delta, ...] = ()
    # Raised at stream open, or after `cut_after` deltas when that is set.
    error: BaseException | None = None
    cut_after: int | None = None
    # Block forever after this many deltas (until cancelled).
    hang_after: int | None = None
    # Virtual seconds slept before each delta.
    latency: float = 0.0


# The prompt a stream call saw and its 0-based index among stream calls.
StepFactory = Callable[[Sequence[PromptMessage], int], ScriptStep]
SummaryFactory = Callable[[Sequence[PromptMessage], int], str]


def usage_of(context_tokens: int, output_tokens: int = 0) -> Usage:
    """A usage whose context tokens (docs/spec.md §3.1) are `context_tokens`."""
    return Usage(
        input_tokens=context_tokens,
        output_tokens=output_tokens,
        total_tokens=context_tokens + output_tokens,
    )


def text_step(
    text: str,
    *,
    usage: Usage | None = None,
    reasoning: str = "",
    context_limit: int | None = None,
    chunks: int = 1,
    latency: float = 0.0,
) -> ScriptStep:
    """A step answering with text (split into `chunks` deltas) and no tool calls."""
    deltas: list[Delta] = []
    if reasoning:
        deltas.append(ReasoningDelta(reasoning))
    deltas.extend(TextDelta(piece) for piece in _split(text, chunks))
    deltas.append(Finish(usage or Usage(), "stop", context_limit))
    return ScriptStep(tuple(deltas), latency=latency)


def tool_step(
    calls: Sequence[tuple[str, JSON]],
    *,
    text: str = "",
    reasoning: str = "",
    usage: Usage | None = None,
    context_limit: int | None = None,
    call_id_prefix: str = "call",
    latency: float = 0.0,
) -> ScriptStep:
    """A step asking for tool calls `(name, arguments)`; ids are `<prefix>_<index>`."""
    deltas: list[Delta] = []
    if reasoning:
        deltas.append(ReasoningDelta(reasoning))
    if text:
        deltas.append(TextDelta(text))
    for i, (name, args) in enumerate(calls):
        arguments = args if isinstance(args, str) else json.dumps(args)
        deltas.append(ToolCallDone(i, f"{call_id_prefix}_{i}", name, arguments))
    deltas.append(Finish(usage or Usage(), "tool_calls", context_limit))
    return ScriptStep(tuple(deltas), latency=latency)


def error_step(error: BaseException) -> ScriptStep:
    """A step whose stream fails when it opens."""
    return ScriptStep(error=error)


def model_error(
    status_code: int = 429,
    *,
    retryable: bool = True,
    retry_after: float | None = None,
    kind: str = "rate_limit",
    message: str | None = None,
) -> ModelError:
    """A classified provider error as the real adapters raise it."""
    return ModelError(
        message or f"HTTP {status_code}",
        retryable=retryable,
        kind=kind,
        provider=PROVIDER,
        status_code=status_code,
        retry_after=retry_after,
    )


def _split(text: str, chunks: int) -> list[str]:
    if chunks <= 1 or len(text) <= 1:
        return [text] if text else []
    size = -(-len(text) // chunks)
    return [text[i : i + size] for i in range(0, len(text), size)]


@dataclass(frozen=True)
class ToolsThenAnswer:
    """An endless script: every turn asks for `calls` tool calls, then answers.

    Stateless: it looks at the prompt's last message. After tool results it
    answers with `text`; otherwise (a new user message) it asks for the tools.
    """

    calls: int = 1
    tool_name: str = "echo"
    arguments: JSON = field(default_factory=dict)
    text: str = "done"
    usage: Usage = field(default_factory=Usage)
    latency: float = 0.0

    def __call__(self, prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
        if prompt and prompt[-1].role is Role.TOOL:
            return text_step(self.text, usage=self.usage, latency=self.latency)
        return tool_step(
            [(self.tool_name, self.arguments)] * self.calls,
            usage=self.usage,
            call_id_prefix=f"call{index}",
            latency=self.latency,
        )


class ScriptedModel:
    """A deterministic `Model` playing a script (see the module docstring).

    A finite script that runs out raises a non-retryable `ModelError`, as does a
    summary script that runs out. A summary entry that is an exception is raised.
    """

    def __init__(
        self,
        script: Iterable[ScriptStep] | StepFactory,
        *,
        summaries: Iterable[str | BaseException] | SummaryFactory = (),
        summary_latency: float = 0.0,
        name: str = "scripted-model",
    ) -> None:
        self._factory: StepFactory | None = script if callable(script) else None
        self._steps: list[ScriptStep] = [] if callable(script) else list(script)
        self._summary_factory: SummaryFactory | None = summaries if callable(summaries) else None
        self._summaries: list[str | BaseException] = [] if callable(summaries) else list(summaries)
        self._summary_latency = summary_latency
        self._name = name
        self.stream_prompts: list[list[PromptMessage]] = []
        self.stream_tools: list[list[ToolSpec]] = []
        self.generate_prompts: list[list[PromptMessage]] = []
        self.options = RequestOptions()
        # The options in force at each stream call (retries included).
        self.stream_options: list[RequestOptions] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def provider(self) -> str:
        return PROVIDER

    def with_options(self, options: RequestOptions) -> ScriptedModel:
        """A view playing the same script (and recording into the same lists) with
        `options` merged over this model's."""
        view = copy.copy(self)
        view.options = self.options.merged(options)
        return view

    @property
    def stream_count(self) -> int:
        """How many streams were opened (retries included)."""
        return len(self.stream_prompts)

    @property
    def generate_count(self) -> int:
        return len(self.generate_prompts)

    def _next_step(self, messages: Sequence[PromptMessage]) -> ScriptStep:
        index = len(self.stream_prompts)
        self.stream_prompts.append(list(messages))
        if self._factory is not None:
            return self._factory(messages, index)
        if index >= len(self._steps):
            return error_step(
                ModelError(
                    f"script exhausted after {len(self._steps)} steps",
                    retryable=False,
                    kind="script_exhausted",
                    provider=PROVIDER,
                )
            )
        return self._steps[index]

    @asynccontextmanager
    async def stream(
        self, messages: Sequence[PromptMessage], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[AsyncIterator[Delta]]:
        """Open one scripted stream (see `ScriptStep`)."""
        step = self._next_step(messages)
        self.stream_tools.append(list(tools))
        self.stream_options.append(self.options)
        await trio.lowlevel.checkpoint()
        if step.error is not None and step.cut_after is None:
            raise step.error
        yield self._play(step)

    async def _play(self, step: ScriptStep) -> AsyncIterator[Delta]:
        for i, delta in enumerate(step.deltas):
            if step.cut_after is not None and i >= step.cut_after:
                break
            if step.hang_after is not None and i >= step.hang_after:
                await trio.sleep_forever()
            if step.latency:
                await trio.sleep(step.latency)
            yield delta
        if step.hang_after is not None and step.hang_after >= len(step.deltas):
            await trio.sleep_forever()
        if step.error is not None:
            raise step.error

    async def generate(self, messages: Sequence[PromptMessage]) -> GenerateResult:
        """The next scripted summary."""
        index = len(self.generate_prompts)
        self.generate_prompts.append(list(messages))
        if self._summary_latency:
            await trio.sleep(self._summary_latency)
        else:
            await trio.lowlevel.checkpoint()
        if self._summary_factory is not None:
            return GenerateResult(self._summary_factory(messages, index), Usage())
        if index >= len(self._summaries):
            raise ModelError(
                "summary script exhausted",
                retryable=False,
                kind="script_exhausted",
                provider=PROVIDER,
            )
        entry = self._summaries[index]
        if isinstance(entry, BaseException):
            raise entry
        return GenerateResult(entry, Usage())
