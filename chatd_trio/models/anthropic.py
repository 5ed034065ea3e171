"""An Anthropic Messages API adapter of the Model port (docs/providers.md).

Speaks `POST /v1/messages` with `stream: true` and parses its event stream
(message_start, content_block_start/delta/stop, message_delta, message_stop,
ping, error) with httpx-sse, as the OpenAI-compatible adapter does:

- text blocks become `TextDelta`s; tool_use blocks `ToolCallDelta`s (their
  `input_json_delta` fragments) and a `ToolCallDone` at the block's stop, so
  parallel calls keep their order; thinking blocks `ReasoningDelta`s, closed by
  one carrying the block's `signature` (a redacted_thinking block is one
  `ReasoningDelta(redacted=True)` whose `signature` holds the encrypted data).
- Thinking is sent back as the API requires: a `ReasoningPart` with a
  signature becomes a thinking block ahead of the message's text and tool_use
  blocks; one without a signature (another provider's reasoning) is dropped,
  since the API refuses unsigned thinking.
- Usage: `input_tokens` (without cache), `cache_read_input_tokens`,
  `cache_creation_input_tokens` and the final `output_tokens`.
- Failures go through `chatd_trio.models.classify`: overloaded_error and 529
  "overloaded", rate_limit_error "rate_limit", "prompt is too long"
  "context_length", a low credit balance or billing_error "quota"; an `error`
  event inside the stream is classified by its type. The stream ending before
  `message_delta` carried a stop reason is "stream_cut" (retryable); after it,
  the answer is complete and a missing `message_stop` is forgiven.
- Request options: temperature, top_p, top_k, max_tokens (default
  `ModelHTTPConfig.anthropic_max_tokens`), stop (stop_sequences), tool_choice
  ("auto", "required" -> any, "none", or the API's object), parallel_tool_calls
  False (disable_parallel_tool_use), user (metadata.user_id),
  thinking_budget_tokens (thinking), extra_headers (anthropic-beta...),
  extra_body. seed, reasoning_effort, response_format and include_usage have
  no Messages API equivalent and are not sent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
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
from chatd_trio.models.classify import error_object

__all__ = ["AnthropicModel", "to_anthropic_messages", "to_anthropic_tools"]

DEFAULT_BASE_URL = "https://api.anthropic.com"

# The Messages API's stop reasons in the vocabulary of `Finish.finish_reason`.
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
}


# ---------------------------------------------------------------------------
# request building


def _tool_input(arguments: str) -> object:
    """A tool call's JSON text as the object `tool_use.input` must be."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except (ValueError, RecursionError):
        # The model produced broken JSON; its tool result already says so.
        return {}
    return value if isinstance(value, dict) else {}


def _result_text(part: ToolResultPart) -> str:
    return part.result if isinstance(part.result, str) else json.dumps(part.result)


def _blocks(msg: PromptMessage) -> list[dict[str, Any]]:
    thinking: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for part in msg.parts:
        if isinstance(part, TextPart):
            if part.text:
                texts.append({"type": "text", "text": part.text})
        elif isinstance(part, ContextFilePart):
            if not part.is_sentinel:
                text = f'<context_file path="{part.path}">\n{part.content}\n</context_file>'
                texts.append({"type": "text", "text": text})
        elif isinstance(part, ReasoningPart):
            if part.redacted and part.signature:
                thinking.append({"type": "redacted_thinking", "data": part.signature})
            elif part.signature:
                thinking.append(
                    {"type": "thinking", "thinking": part.text, "signature": part.signature}
                )
        elif isinstance(part, ToolCallPart):
            calls.append(
                {
                    "type": "tool_use",
                    "id": part.call_id,
                    "name": part.name,
                    "input": _tool_input(part.arguments),
                }
            )
        elif isinstance(part, ToolResultPart):
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": part.call_id,
                "content": _result_text(part),
            }
            if part.is_error:
                block["is_error"] = True
            results.append(block)
    # Thinking leads an assistant message; tool results lead a user message.
    return [*thinking, *results, *texts, *calls]


def to_anthropic_messages(
    messages: Sequence[PromptMessage],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Our prompt messages as Messages API (`system`, `messages`).

    System text goes to `system`; tool messages become user messages of
    tool_result blocks; consecutive messages of one role are merged (all results
    of one step's tool calls must sit in the next user message); empty ones are
    left out.
    """
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for msg in messages:
        blocks = _blocks(msg)
        if msg.role is Role.SYSTEM:
            system.extend(b for b in blocks if b["type"] == "text")
            continue
        if msg.role is Role.ASSISTANT and not any(b["type"] != "redacted_thinking" for b in blocks):
            continue
        if not blocks:
            continue
        role = "assistant" if msg.role is Role.ASSISTANT else "user"
        if out and out[-1]["role"] == role:
            previous = out[-1]["content"]
            # Tool results must come before any text in a user message.
            if role == "user":
                merged = [b for b in [*previous, *blocks] if b["type"] == "tool_result"]
                merged += [b for b in [*previous, *blocks] if b["type"] != "tool_result"]
                out[-1]["content"] = merged
            else:
                previous.extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return system, out


def to_anthropic_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """`ToolSpec`s as Messages API tools."""
    return [
        {"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools
    ]


def _tool_choice(options: RequestOptions) -> dict[str, Any] | None:
    choice = options.tool_choice
    out: dict[str, Any] | None
    if choice is None:
        out = None
    elif isinstance(choice, str):
        out = {"type": {"required": "any"}.get(choice, choice)}
    else:
        out = dict(choice)
    if options.parallel_tool_calls is False:
        out = {"type": "auto", **(out or {}), "disable_parallel_tool_use": True}
    return out


# ---------------------------------------------------------------------------
# response parsing


@dataclass
class _Block:
    kind: str
    call_index: int = -1
    call_id: str = ""
    name: str = ""
    pieces: list[str] = field(default_factory=list)
    signature: list[str] = field(default_factory=list)
    closed: bool = False


@dataclass
class _StreamState:
    blocks: dict[int, _Block] = field(default_factory=dict)
    calls: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    stop_reason: str | None = None
    stopped: bool = False

    def merge_usage(self, data: object) -> None:
        if isinstance(data, Mapping):
            for key in (
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
            ):
                if isinstance(data.get(key), int):
                    self.usage[key] = count(data, key)

    def to_usage(self) -> Usage:
        return _usage(self.usage)


def _text_field(data: Mapping[str, Any], key: str, kind: str) -> str:
    """`data[key]`, which must be a string (else a TypeError naming `kind.key`)."""
    value = data[key]
    if not isinstance(value, str):
        raise TypeError(f"{kind}.{key} is not a string")
    return value


def _usage(data: Mapping[str, Any]) -> Usage:
    inp = count(data, "input_tokens")
    out = count(data, "output_tokens")
    read = count(data, "cache_read_input_tokens")
    created = count(data, "cache_creation_input_tokens")
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        cache_read_tokens=read,
        cache_creation_tokens=created,
        total_tokens=inp + out + read + created,
    )


# ---------------------------------------------------------------------------
# the adapter


class AnthropicModel(HTTPModel):
    """A Claude model behind the Anthropic Messages API (or a server speaking it).

    Owns an `httpx.AsyncClient` unless one is passed in; close it with
    `aclose()` or `async with`. `options` are sent with every request;
    `with_options` returns a copy with other options sharing the connections.
    """

    def __init__(
        self,
        api_key: str,
        model: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        provider: str = "anthropic",
        timeout: float | None = None,
        context_limit: int | None = None,
        extra_headers: Mapping[str, str] | None = None,
        options: RequestOptions | None = None,
        config: ModelHTTPConfig | None = None,
        retry: RetryConfig | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        cfg = config or ModelHTTPConfig()
        headers = {"anthropic-version": cfg.anthropic_version, **(extra_headers or {})}
        if api_key:
            headers["x-api-key"] = api_key
        super().__init__(
            model,
            url=base_url.rstrip("/") + "/v1/messages",
            provider=provider,
            timeout=timeout,
            context_limit=context_limit,
            headers=headers,
            options=options,
            config=cfg,
            retry=retry,
            client=client,
        )

    # -- port ----------------------------------------------------------------

    def stream(
        self, messages: Sequence[PromptMessage], tools: Sequence[ToolSpec]
    ) -> AbstractAsyncContextManager[AsyncIterator[Delta]]:
        """Open one streamed step; iterate the deltas inside the context."""
        return self._open_deltas(self.request_body(messages, tools, stream=True))

    async def generate(self, messages: Sequence[PromptMessage]) -> GenerateResult:
        """One non-streaming call without tools (used for summaries)."""
        data = await self._generate_json(messages)
        try:
            assert isinstance(data, Mapping), "the body is not an object"
            if data.get("type") == "error":
                found = error_object(data)
                if found is not None:
                    raise self.classified(None, found)
            content = data["content"]
            if not isinstance(content, list):
                raise TypeError("content is not a list")
            texts = [b["text"] for b in content if isinstance(b, Mapping) and b["type"] == "text"]
            if not all(isinstance(t, str) for t in texts):
                raise TypeError("a text block's text is not a string")
            usage = data.get("usage")
            return GenerateResult(
                "".join(texts), _usage(usage) if isinstance(usage, Mapping) else Usage()
            )
        except (*DECODE_ERRORS, AssertionError) as exc:
            raise self.malformed(f"unexpected message body: {exc}") from exc

    # -- requests --------------------------------------------------------------

    def request_body(
        self, messages: Sequence[PromptMessage], tools: Sequence[ToolSpec], *, stream: bool
    ) -> dict[str, Any]:
        """The `/v1/messages` body: system, messages, tools and the request options."""
        o = self._options
        system, converted = to_anthropic_messages(messages)
        max_tokens = o.max_tokens or o.max_completion_tokens or self._config.anthropic_max_tokens
        body: dict[str, Any] = {
            "model": self._model,
            "max_tokens": max_tokens,
            "messages": converted,
            "stream": stream,
        }
        if system:
            body["system"] = system
        if tools:
            body["tools"] = to_anthropic_tools(tools)
            choice = _tool_choice(o)
            if choice is not None:
                body["tool_choice"] = choice
        for key in ("temperature", "top_p", "top_k"):
            value = getattr(o, key)
            if value is not None:
                body[key] = value
        if o.stop is not None:
            body["stop_sequences"] = list(o.stop)
        if o.user is not None:
            body["metadata"] = {"user_id": o.user}
        if o.thinking_budget_tokens is not None:
            body["thinking"] = {"type": "enabled", "budget_tokens": o.thinking_budget_tokens}
        body.update(o.extra_body)
        return body

    # -- streaming -----------------------------------------------------------

    async def _deltas(self, response: httpx.Response) -> AsyncGenerator[Delta, None]:
        state = _StreamState()
        events = self._events(response, lambda: state.stop_reason is not None)
        async with aclosing(events) as it:
            async for event in it:
                if state.stopped:
                    # Drained to the end so httpx's generators finish instead of being GC'd.
                    continue
                for d in self._handle(event, state):
                    yield d
        if state.stop_reason is None:
            raise self.stream_cut("the stream ended before message_delta gave a stop reason")
        # Blocks a cut left open after the stop reason (never seen; the stop reason follows them).
        for index in sorted(state.blocks):
            for d in self._close_block(index, state):
                yield d
        yield Finish(
            usage=state.to_usage(),
            finish_reason=_STOP_REASONS.get(state.stop_reason, state.stop_reason),
            context_limit=self._context_limit,
        )

    def _handle(self, event: httpx_sse.ServerSentEvent, state: _StreamState) -> list[Delta]:
        try:
            data = json.loads(event.data) if event.data else {}
            if not isinstance(data, Mapping):
                raise TypeError("the event data is not an object")
            kind = data.get("type", event.event)
            if kind == "error" or event.event == "error":
                found = error_object(data)
                if found is None:
                    raise ValueError("an error event without an error")
                raise self.classified(None, found)
            if kind == "message_start":
                message = data["message"]
                if not isinstance(message, Mapping):
                    raise TypeError("message_start.message is not an object")
                state.merge_usage(message.get("usage"))
                return []
            if kind == "content_block_start":
                return self._block_start(data, state)
            if kind == "content_block_delta":
                return self._block_delta(data, state)
            if kind == "content_block_stop":
                index = data["index"]
                if not isinstance(index, int) or index not in state.blocks:
                    raise ValueError(f"content_block_stop for unknown block {index!r}")
                return self._close_block(index, state)
            if kind == "message_delta":
                delta = data["delta"]
                if not isinstance(delta, Mapping):
                    raise TypeError("message_delta.delta is not an object")
                reason = delta.get("stop_reason")
                if isinstance(reason, str) and reason:
                    state.stop_reason = reason
                state.merge_usage(data.get("usage"))
                return []
            if kind == "message_stop":
                state.stopped = True
                return []
            # ping, and event types added after this adapter (the API's versioning policy).
            return []
        except DECODE_ERRORS as exc:
            raise self.malformed(
                f"{type(exc).__name__}: {exc}; event {event.event!r} {event.data[:200]!r}"
            ) from exc

    def _block_start(self, data: Mapping[str, Any], state: _StreamState) -> list[Delta]:
        index, block = data["index"], data["content_block"]
        if not isinstance(index, int) or isinstance(index, bool) or index in state.blocks:
            raise ValueError(f"content_block_start with a bad or repeated index {index!r}")
        if not isinstance(block, Mapping):
            raise TypeError("content_block is not an object")
        kind = block["type"]
        if kind == "tool_use":
            call_id, name = block["id"], block["name"]
            if not (isinstance(call_id, str) and isinstance(name, str) and name):
                raise TypeError("tool_use without a string id and name")
            entry = _Block(kind, state.calls, call_id, name)
            state.calls += 1
            state.blocks[index] = entry
            given = block.get("input")
            if isinstance(given, Mapping) and given:
                # A server that sends the whole input up front instead of as deltas.
                entry.pieces.append(json.dumps(given))
            return [ToolCallDelta(entry.call_index, call_id, name, "".join(entry.pieces))]
        state.blocks[index] = _Block(str(kind))
        if kind == "text":
            text = block.get("text")
            return [TextDelta(text)] if isinstance(text, str) and text else []
        if kind == "thinking":
            text = block.get("thinking")
            return [ReasoningDelta(text)] if isinstance(text, str) and text else []
        if kind == "redacted_thinking":
            secret = _text_field(block, "data", kind)
            state.blocks[index].closed = True
            return [ReasoningDelta("", signature=secret, redacted=True)]
        # Server tool results and other block kinds this adapter does not use.
        return []

    def _block_delta(self, data: Mapping[str, Any], state: _StreamState) -> list[Delta]:
        index, delta = data["index"], data["delta"]
        entry = state.blocks.get(index) if isinstance(index, int) else None
        if entry is None or entry.closed:
            raise ValueError(f"content_block_delta for a block not open: {index!r}")
        if not isinstance(delta, Mapping):
            raise TypeError("content_block_delta.delta is not an object")
        kind = delta["type"]
        if kind == "text_delta":
            text = _text_field(delta, "text", kind)
            return [TextDelta(text)] if text else []
        if kind == "input_json_delta":
            piece = delta["partial_json"]
            if not isinstance(piece, str) or entry.kind != "tool_use":
                raise TypeError("input_json_delta outside a tool_use block")
            entry.pieces.append(piece)
            return [ToolCallDelta(entry.call_index, None, None, piece)] if piece else []
        if kind == "thinking_delta":
            text = _text_field(delta, "thinking", kind)
            return [ReasoningDelta(text)] if text else []
        if kind == "signature_delta":
            entry.signature.append(_text_field(delta, "signature", kind))
            return []
        # citations_delta and later additions carry nothing this port models.
        return []

    def _close_block(self, index: int, state: _StreamState) -> list[Delta]:
        entry = state.blocks[index]
        if entry.closed:
            return []
        entry.closed = True
        if entry.kind == "tool_use":
            arguments = "".join(entry.pieces) or "{}"
            return [ToolCallDone(entry.call_index, entry.call_id, entry.name, arguments)]
        if entry.kind == "thinking" and entry.signature:
            return [ReasoningDelta("", signature="".join(entry.signature))]
        return []
