"""An OpenAI-compatible Chat Completions adapter of the Model port.

Built on `httpx.AsyncClient` (which runs on Trio through its anyio/trio
backends) and httpx-sse rather than the official SDK: the SDK drags in a second
HTTP stack plus pydantic, hides transport causes behind its own exception types
and leaves its async generators for Trio's GC finaliser.

Speaks to OpenAI and to any server that implements `/chat/completions`
(vLLM, Ollama, LiteLLM, Mistral, OpenRouter...): docs/providers.md.

- Request options (`RequestOptions`) go into the body unchanged;
  `stream_options` is sent unless the server refused it once (then never again
  by this model and its `with_options` copies) or `include_usage=False`.
- Failures are classified by `chatd_trio.models.classify` (HTTP status, error
  code, body shape, in-stream error objects); `Retry-After` / `retry-after-ms`
  become `retry_after` seconds.
- The body ending or breaking before a finish reason is "stream_cut"
  (retryable). Once the finish reason has arrived the answer is complete: a cut
  before the usage chunk or `[DONE]` ends the step normally (without usage).
- A chunk that is not JSON or not shaped like a chunk, whatever it holds
  (nesting 100 000 deep included), is "malformed_response", NOT retryable: a
  provider that speaks a broken protocol does so again on the next attempt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx_sse

from chatd_trio.config import ModelHTTPConfig, RequestOptions, RetryConfig
from chatd_trio.domain import (
    ContextFilePart,
    ReasoningPart,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Usage,
)
from chatd_trio.errors import ModelError
from chatd_trio.models._http import DECODE_ERRORS, HTTPModel, count
from chatd_trio.models.base import (
    Delta,
    Finish,
    GenerateResult,
    PromptMessage,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    ToolSpec,
)
from chatd_trio.models.classify import BAD_REQUEST, CLIENT_ERROR, error_object

__all__ = ["OpenAIChatModel", "to_chat_messages", "to_chat_tools"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# request building


def _context_file_text(part: ContextFilePart) -> str:
    return f'<context_file path="{part.path}">\n{part.content}\n</context_file>'


def _tool_result_content(part: ToolResultPart) -> str:
    text = part.result if isinstance(part.result, str) else json.dumps(part.result)
    # Chat Completions has no error flag on tool messages: say it in the content.
    return f"Error: {text}" if part.is_error else text


def to_chat_messages(messages: Sequence[PromptMessage]) -> list[dict[str, Any]]:
    """Our prompt messages as Chat Completions `messages`.

    Reasoning parts are dropped (the API has no input field for them and
    some providers reject one); tool results become `role: tool` messages
    placed before the rest of their message; context files become text;
    messages left empty are omitted.
    """
    out: list[dict[str, Any]] = []
    for msg in messages:
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in msg.parts:
            if isinstance(part, TextPart):
                if part.text:
                    texts.append(part.text)
            elif isinstance(part, ContextFilePart):
                if not part.is_sentinel:
                    texts.append(_context_file_text(part))
            elif isinstance(part, ToolCallPart):
                calls.append(
                    {
                        "id": part.call_id,
                        "type": "function",
                        "function": {"name": part.name, "arguments": part.arguments or "{}"},
                    }
                )
            elif isinstance(part, ToolResultPart):
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": part.call_id,
                        "content": _tool_result_content(part),
                    }
                )
            elif isinstance(part, ReasoningPart):
                continue
        content = "\n\n".join(texts)
        if msg.role is Role.ASSISTANT:
            if calls or content:
                entry: dict[str, Any] = {"role": "assistant", "content": content or None}
                if calls:
                    entry["tool_calls"] = calls
                out.append(entry)
        elif msg.role in (Role.SYSTEM, Role.USER) and content:
            out.append({"role": msg.role.value, "content": content})
        elif msg.role is Role.TOOL and content:
            # Stray text in a tool message has no home in the API; the user role keeps it visible.
            out.append({"role": "user", "content": content})
    return out


def to_chat_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """`ToolSpec`s as Chat Completions function tools."""
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
            },
        }
        for t in tools
    ]


# ---------------------------------------------------------------------------
# response parsing


def _usage(data: object) -> Usage:
    """Usage from a Chat Completions `usage` object, with cached and reasoning tokens."""
    if not isinstance(data, Mapping):
        return Usage()
    prompt = count(data, "prompt_tokens")
    completion = count(data, "completion_tokens")
    details = data.get("prompt_tokens_details")
    cached = count(details, "cached_tokens") if isinstance(details, Mapping) else 0
    # DeepSeek reports its cache hits beside prompt_tokens_details.
    cached = cached or count(data, "prompt_cache_hit_tokens")
    out_details = data.get("completion_tokens_details")
    reasoning = count(out_details, "reasoning_tokens") if isinstance(out_details, Mapping) else 0
    total = count(data, "total_tokens") or prompt + completion
    # prompt_tokens includes the cached ones: split them so context_tokens() is not doubled.
    usage = Usage(
        input_tokens=max(prompt - cached, 0),
        output_tokens=completion,
        cache_read_tokens=min(cached, prompt) if prompt else cached,
        total_tokens=total,
        reasoning_tokens=reasoning,
    )
    return usage


@dataclass
class _CallAcc:
    call_id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)
    done: bool = False


@dataclass
class _StreamState:
    calls: dict[int, _CallAcc] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage | None = None


class _Refusals:
    """What a server refused once, shared by a model and its `with_options` copies."""

    def __init__(self) -> None:
        self.stream_options = False


# ---------------------------------------------------------------------------
# the adapter


class OpenAIChatModel(HTTPModel):
    """A model behind an OpenAI-compatible `/chat/completions` endpoint.

    Owns an `httpx.AsyncClient` unless one is passed in; close it with
    `aclose()` or `async with`. Connections are pooled, so one instance
    belongs to one Trio run. `options` are sent with every request;
    `with_options` returns a copy with other options sharing the connections.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        provider: str = "openai",
        timeout: float | None = None,
        context_limit: int | None = None,
        extra_headers: Mapping[str, str] | None = None,
        options: RequestOptions | None = None,
        config: ModelHTTPConfig | None = None,
        retry: RetryConfig | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        headers = dict(extra_headers or {})
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        super().__init__(
            model,
            url=base_url.rstrip("/") + "/chat/completions",
            provider=provider,
            timeout=timeout,
            context_limit=context_limit,
            headers=headers,
            options=options,
            config=config,
            retry=retry,
            client=client,
        )
        self._refusals = _Refusals()

    # -- port ----------------------------------------------------------------

    def stream(
        self, messages: Sequence[PromptMessage], tools: Sequence[ToolSpec]
    ) -> AbstractAsyncContextManager[AsyncIterator[Delta]]:
        """Open one streamed step; iterate the deltas inside the context."""
        return self._stream(messages, tools)

    async def generate(self, messages: Sequence[PromptMessage]) -> GenerateResult:
        """One non-streaming call without tools (used for summaries)."""
        data = await self._generate_json(messages)
        try:
            assert isinstance(data, Mapping), "the body is not an object"
            found = error_object(data) if "choices" not in data else None
            if found is not None:
                raise self.classified(None, found)
            content = data["choices"][0]["message"].get("content") or ""
            if not isinstance(content, str):
                raise TypeError("message.content is not a string")
            usage = _usage(data.get("usage"))
        except (*DECODE_ERRORS, AssertionError) as exc:
            raise self.malformed(f"unexpected completion body: {exc}") from exc
        return GenerateResult(text=content, usage=usage)

    # -- requests --------------------------------------------------------------

    def request_body(
        self, messages: Sequence[PromptMessage], tools: Sequence[ToolSpec], *, stream: bool
    ) -> dict[str, Any]:
        """The `/chat/completions` body: messages, tools and the request options.

        Tool options are sent only with tools (OpenAI refuses `parallel_tool_calls`
        without them); a summary (`stream=False`) gets no `response_format`.
        """
        o = self._options
        body: dict[str, Any] = {
            "model": self._model,
            "messages": to_chat_messages(messages),
            "stream": stream,
        }
        if stream and o.include_usage is not False and not self._refusals.stream_options:
            body["stream_options"] = {"include_usage": True}
        if tools:
            # An empty `tools` array is a 400 at OpenAI: omit the key instead.
            body["tools"] = to_chat_tools(tools)
            if o.tool_choice is not None:
                body["tool_choice"] = o.tool_choice
            if o.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = o.parallel_tool_calls
        for key in (
            "temperature",
            "top_p",
            "max_tokens",
            "max_completion_tokens",
            "seed",
            "reasoning_effort",
            "user",
        ):
            value = getattr(o, key)
            if value is not None:
                body[key] = value
        if o.stop is not None:
            body["stop"] = list(o.stop)
        if o.response_format is not None and stream:
            body["response_format"] = o.response_format
        body.update(o.extra_body)
        return body

    def _refuses_stream_options(self, err: ModelError, body: Mapping[str, Any]) -> bool:
        return (
            "stream_options" in body
            and err.kind in (BAD_REQUEST, CLIENT_ERROR)
            and "stream_options" in err.message
            and self._options.include_usage is None
        )

    # -- streaming -----------------------------------------------------------

    @asynccontextmanager
    async def _stream(
        self, messages: Sequence[PromptMessage], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[AsyncIterator[Delta]]:
        body = self.request_body(messages, tools, stream=True)
        opened = False
        try:
            async with self._open_deltas(body) as deltas:
                opened = True
                yield deltas
                return
        except ModelError as err:
            # Only the opening is asked again: an error once deltas flowed is the step's.
            if opened or not self._refuses_stream_options(err, body):
                raise
        # The server rejects `stream_options`: ask again without it (usage then stays 0).
        self._refusals.stream_options = True
        logger.info(
            "server refused stream_options; not sending it again",
            extra={"provider": self._provider, "model": self._model},
        )
        async with self._open_deltas(self.request_body(messages, tools, stream=True)) as deltas:
            yield deltas

    async def _deltas(self, response: httpx.Response) -> AsyncGenerator[Delta, None]:
        state = _StreamState()
        done = False
        events = self._events(response, lambda: state.finish_reason is not None)
        async with aclosing(events) as it:
            async for event in it:
                if done:
                    # Drained to the end so httpx's generators finish instead of being GC'd.
                    continue
                if event.data.strip() == "[DONE]":
                    done = True
                    continue
                for d in self._handle(event, state):
                    yield d
        if not done and state.finish_reason is None:
            raise self.stream_cut("the stream ended before a finish reason")
        for d in self._finish_calls(state):
            yield d
        reason = state.finish_reason or ("tool_calls" if state.calls else "stop")
        yield Finish(
            usage=state.usage or Usage(),
            finish_reason=reason,
            context_limit=self._context_limit,
        )

    def _handle(self, event: httpx_sse.ServerSentEvent, state: _StreamState) -> list[Delta]:
        payload = event.data
        try:
            chunk = json.loads(payload)
            if not isinstance(chunk, Mapping):
                raise TypeError("the chunk is not an object")
            if "error" in chunk or chunk.get("object") == "error" or event.event == "error":
                found = error_object(chunk)
                if found is not None:
                    raise self.classified(None, found)
            if chunk.get("usage") is not None:
                state.usage = _usage(chunk["usage"])
            choices = chunk.get("choices") or []
            if not isinstance(choices, list):
                raise TypeError("chunk.choices is not a list")
            out: list[Delta] = []
            for choice in choices[:1]:
                if not isinstance(choice, Mapping):
                    raise TypeError("a choice is not an object")
                delta = choice.get("delta")
                if isinstance(delta, Mapping):
                    out += self._delta_parts(delta, state.calls)
                reason = choice.get("finish_reason")
                if isinstance(reason, str) and reason:
                    state.finish_reason = reason
                    out += self._finish_calls(state)
            return out
        except DECODE_ERRORS as exc:
            raise self.malformed(f"{type(exc).__name__}: {exc}; chunk {payload[:200]!r}") from exc

    def _finish_calls(self, state: _StreamState) -> list[Delta]:
        out: list[Delta] = []
        for index in sorted(state.calls):
            acc = state.calls[index]
            if acc.done:
                continue
            acc.done = True
            if not acc.name:
                raise self.malformed(f"tool call {index} has no function name")
            out.append(
                ToolCallDone(
                    index=index,
                    call_id=acc.call_id or f"call_{index}",
                    name=acc.name,
                    arguments="".join(acc.arguments) or "{}",
                )
            )
        return out

    def _delta_parts(self, delta: Mapping[str, Any], calls: dict[int, _CallAcc]) -> list[Delta]:
        out: list[Delta] = []
        # `reasoning_content` (DeepSeek, vLLM) and `reasoning` (OpenRouter, newer vLLM) are
        # two spellings of one text: servers sending both send it twice, so take one.
        for key in ("reasoning_content", "reasoning"):
            value = delta.get(key)
            if isinstance(value, str) and value:
                out.append(ReasoningDelta(value))
                break
        content = delta.get("content")
        if isinstance(content, str) and content:
            out.append(TextDelta(content))
        tool_calls = delta.get("tool_calls") or []
        if not isinstance(tool_calls, list):
            raise TypeError("delta.tool_calls is not a list")
        for position, tc in enumerate(tool_calls):
            if not isinstance(tc, Mapping):
                raise TypeError("delta.tool_calls item is not an object")
            index = tc.get("index", position)
            if not isinstance(index, int) or isinstance(index, bool):
                raise TypeError("tool call index is not an integer")
            fn = tc.get("function") or {}
            if not isinstance(fn, Mapping):
                raise TypeError("tool call function is not an object")
            call_id = tc.get("id") if isinstance(tc.get("id"), str) else None
            name = fn.get("name") if isinstance(fn.get("name"), str) else None
            raw_args = fn.get("arguments")
            args = raw_args if isinstance(raw_args, str) else ""
            acc = calls.setdefault(index, _CallAcc())
            if acc.done:
                raise ValueError(f"tool call {index} continued after the finish reason")
            acc.call_id = call_id or acc.call_id
            acc.name = name or acc.name
            acc.arguments.append(args)
            out.append(ToolCallDelta(index, call_id, name, args))
        return out
