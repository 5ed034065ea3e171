"""An OpenAI-compatible Chat Completions adapter of the Model port.

Built on `httpx.AsyncClient` (which runs on Trio through its anyio/trio
backends) with a small SSE parser of our own rather than the official SDK:
the SDK drags in a second HTTP stack plus pydantic, hides transport causes
behind its own exception types and leaves its async generators for Trio's GC
finaliser; one request and one line parser are fewer moving parts.

Failure classification (`ModelError.kind`, retryable per `RetryConfig`):

- HTTP 408 "timeout", 429 "rate_limit", 529 "overloaded", other 5xx
  "server_error"; 400 "bad_request" (or "context_length_exceeded"), 401
  "auth", 403 "permission", 404 "not_found", other 4xx "client_error".
  `Retry-After` / `retry-after-ms` become `retry_after` seconds.
- Connect errors and resets before the response "connection", timeouts
  "timeout" (retryable).
- The body ending or breaking before `[DONE]` and before a finish reason
  "stream_cut" (retryable); an `error` object inside the stream
  "server_error" (retryable).
- A chunk that is not JSON or not shaped like a chunk "malformed_response",
  NOT retryable: a provider that speaks a broken protocol does so again on
  the next attempt, and 25 backed-off retries would stall the chat ~20 min.
"""

from __future__ import annotations

import email.utils
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, cast

import httpx
import trio

from chatd_trio.config import ModelHTTPConfig, RetryConfig
from chatd_trio.domain import (
    JSON,
    ContextFilePart,
    ReasoningPart,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Usage,
)
from chatd_trio.errors import ModelError
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

__all__ = ["OpenAIChatModel", "to_chat_messages", "to_chat_tools"]

logger = logging.getLogger(__name__)

_STATUS_KINDS = {
    400: "bad_request",
    401: "auth",
    403: "permission",
    404: "not_found",
    408: "timeout",
    429: "rate_limit",
    529: "overloaded",
}


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


def _usage(data: JSON) -> Usage:
    if not isinstance(data, Mapping):
        return Usage()

    def count(d: Mapping[str, Any], key: str) -> int:
        v = d.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    prompt = count(data, "prompt_tokens")
    completion = count(data, "completion_tokens")
    details = data.get("prompt_tokens_details")
    cached = count(details, "cached_tokens") if isinstance(details, Mapping) else 0
    total = count(data, "total_tokens") or prompt + completion
    # prompt_tokens includes the cached ones; split them so context_tokens() is not doubled.
    return Usage(
        input_tokens=max(prompt - cached, 0),
        output_tokens=completion,
        cache_read_tokens=cached,
        total_tokens=total,
    )


def _parse_retry_after(headers: httpx.Headers) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # An HTTP date is wall-clock time by definition; Trio's clock cannot express it.
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _error_detail(body: bytes) -> tuple[str, str]:
    """(message, code) from an OpenAI-style error body, else the raw text."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace").strip(), ""
    err = data.get("error") if isinstance(data, Mapping) else None
    if isinstance(err, Mapping):
        message = err.get("message")
        code = err.get("code") or err.get("type") or ""
        return (str(message) if message else json.dumps(err)), str(code)
    if isinstance(err, str):
        return err, ""
    return body.decode("utf-8", "replace").strip(), ""


@dataclass
class _CallAcc:
    call_id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)
    done: bool = False


class _SSELines:
    """Splits decoded text into lines, refusing absurdly long ones."""

    def __init__(self, max_chars: int) -> None:
        self._buf = ""
        self._max = max_chars

    def feed(self, text: str) -> list[str]:
        self._buf += text
        # A "\r" at the very end may be the first half of "\r\n": keep it for the next feed.
        cut = len(self._buf) - 1 if self._buf.endswith("\r") else len(self._buf)
        lines = self._buf[:cut].replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buf = lines.pop() + self._buf[cut:]
        if len(self._buf) > self._max:
            raise ValueError(f"SSE line longer than {self._max} characters")
        return lines

    def flush(self) -> list[str]:
        rest, self._buf = self._buf, ""
        return rest.replace("\r\n", "\n").replace("\r", "\n").split("\n") if rest else []


# ---------------------------------------------------------------------------
# the adapter


class OpenAIChatModel:
    """A model behind an OpenAI-compatible `/chat/completions` endpoint.

    Owns an `httpx.AsyncClient` unless one is passed in; close it with
    `aclose()` or `async with`. Connections are pooled, so one instance
    belongs to one Trio run.
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
        config: ModelHTTPConfig | None = None,
        retry: RetryConfig | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._config = config or ModelHTTPConfig()
        self._retryable = (retry or RetryConfig()).retryable_status_codes
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._provider = provider
        self._context_limit = context_limit
        self._headers = dict(extra_headers or {})
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        cfg = self._config
        self._timeout = (
            httpx.Timeout(timeout)
            if timeout is not None
            else httpx.Timeout(
                connect=cfg.connect_timeout,
                read=cfg.read_timeout,
                write=cfg.write_timeout,
                pool=cfg.pool_timeout,
            )
        )
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()

    @property
    def name(self) -> str:
        return self._model

    @property
    def provider(self) -> str:
        return self._provider

    async def aclose(self) -> None:
        """Close the HTTP client if this model created it."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> OpenAIChatModel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- port ----------------------------------------------------------------

    def stream(
        self, messages: Sequence[PromptMessage], tools: Sequence[ToolSpec]
    ) -> AbstractAsyncContextManager[AsyncIterator[Delta]]:
        """Open one streamed step; iterate the deltas inside the context."""
        body: dict[str, Any] = {
            "model": self._model,
            "messages": to_chat_messages(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            # An empty `tools` array is a 400 at OpenAI: omit the key instead.
            body["tools"] = to_chat_tools(tools)
        return self._stream(body)

    async def generate(self, messages: Sequence[PromptMessage]) -> GenerateResult:
        """One non-streaming call without tools (used for summaries)."""
        body = {"model": self._model, "messages": to_chat_messages(messages), "stream": False}
        try:
            response = await self._client.post(
                self._url,
                json=body,
                headers={**self._headers, "accept": "application/json"},
                timeout=self._timeout,
            )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, in_body=False) from exc
        if not response.is_success:
            raise self._status_error(response.status_code, response.headers, response.content)
        try:
            data = response.json()
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
            if not isinstance(content, str):
                raise TypeError("message.content is not a string")
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            raise self._malformed(f"unexpected completion body: {exc}") from exc
        return GenerateResult(text=content, usage=_usage(data.get("usage")))

    # -- streaming -----------------------------------------------------------

    @asynccontextmanager
    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[Delta]]:
        request = self._client.build_request(
            "POST",
            self._url,
            json=body,
            headers={**self._headers, "accept": "text/event-stream"},
            timeout=self._timeout,
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, in_body=False) from exc
        try:
            is_json = response.headers.get("content-type", "").startswith("application/json")
            if not response.is_success or is_json:
                try:
                    raw = await response.aread()
                except httpx.HTTPError as exc:
                    raise self._transport_error(exc, in_body=False) from exc
                if not response.is_success:
                    raise self._status_error(response.status_code, response.headers, raw)
                # A proxy or server that ignored `stream: true`: its protocol is not ours.
                message, _ = _error_detail(raw)
                raise self._malformed(f"expected an event stream, got JSON: {message[:200]}")
            async with aclosing(self._deltas(response)) as deltas:
                yield deltas
        finally:
            # Shielded so an interrupted step still returns its connection to the pool.
            with trio.move_on_after(self._config.close_timeout, shield=True):
                await response.aclose()

    async def _deltas(self, response: httpx.Response) -> AsyncGenerator[Delta, None]:
        calls: dict[int, _CallAcc] = {}
        finish_reason: str | None = None
        usage: Usage | None = None
        done = False
        lines = _SSELines(self._config.max_sse_line_chars)
        data: list[str] = []

        def events(new_lines: list[str]) -> list[str]:
            out: list[str] = []
            for line in new_lines:
                if not line:
                    if data:
                        out.append("\n".join(data))
                        data.clear()
                    continue
                name, _, value = line.partition(":")
                if name == "data":
                    data.append(value.removeprefix(" "))
            return out

        def finish_calls() -> list[Delta]:
            out: list[Delta] = []
            for index in sorted(calls):
                acc = calls[index]
                if acc.done:
                    continue
                acc.done = True
                if not acc.name:
                    raise self._malformed(f"tool call {index} has no function name")
                out.append(
                    ToolCallDone(
                        index=index,
                        call_id=acc.call_id or f"call_{index}",
                        name=acc.name,
                        arguments="".join(acc.arguments) or "{}",
                    )
                )
            return out

        def handle(payload: str) -> list[Delta]:
            nonlocal finish_reason, usage
            try:
                chunk = json.loads(payload)
            except ValueError as exc:
                raise self._malformed(f"chunk is not JSON: {payload[:200]!r}") from exc
            if not isinstance(chunk, Mapping):
                raise self._malformed(f"chunk is not an object: {payload[:200]!r}")
            err = chunk.get("error")
            if err is not None:
                message, _ = _error_detail(json.dumps({"error": err}).encode())
                raise ModelError(
                    self._clip(f"{self._provider}: stream error: {message}"),
                    retryable=True,
                    kind="server_error",
                    provider=self._provider,
                )
            if chunk.get("usage") is not None:
                usage = _usage(chunk["usage"])
            choices = chunk.get("choices") or []
            if not isinstance(choices, list):
                raise self._malformed("chunk.choices is not a list")
            out: list[Delta] = []
            for choice in choices[:1]:
                delta = choice.get("delta") if isinstance(choice, Mapping) else None
                if isinstance(delta, Mapping):
                    out += self._delta_parts(delta, calls)
                reason = choice.get("finish_reason") if isinstance(choice, Mapping) else None
                if isinstance(reason, str) and reason:
                    finish_reason = reason
                    out += finish_calls()
            return out

        try:
            # httpx implements aiter_text as an async generator; its annotation says less.
            text_gen = cast(AsyncGenerator[str, None], response.aiter_text())
            async with aclosing(text_gen) as text:
                async for piece in text:
                    if done:
                        # Drained to the end so httpx's generators finish instead of being GC'd.
                        continue
                    for payload in events(lines.feed(piece)):
                        if payload.strip() == "[DONE]":
                            done = True
                            break
                        for d in handle(payload):
                            yield d
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, in_body=True) from exc
        except ValueError as exc:
            raise self._malformed(str(exc)) from exc
        if not done:
            # Lenient about a last event without its blank line (some servers end that way).
            for payload in events([*lines.flush(), ""]):
                if payload.strip() == "[DONE]":
                    done = True
                    break
                for d in handle(payload):
                    yield d
        if not done and finish_reason is None:
            raise ModelError(
                f"{self._provider}: stream ended before completion",
                retryable=True,
                kind="stream_cut",
                provider=self._provider,
            )
        for d in finish_calls():
            yield d
        reason = finish_reason or ("tool_calls" if calls else "stop")
        yield Finish(
            usage=usage or Usage(), finish_reason=reason, context_limit=self._context_limit
        )

    def _delta_parts(self, delta: Mapping[str, Any], calls: dict[int, _CallAcc]) -> list[Delta]:
        out: list[Delta] = []
        # `reasoning_content` (DeepSeek, vLLM) and `reasoning` (OpenRouter) are common extensions.
        for key in ("reasoning_content", "reasoning"):
            value = delta.get(key)
            if isinstance(value, str) and value:
                out.append(ReasoningDelta(value))
        content = delta.get("content")
        if isinstance(content, str) and content:
            out.append(TextDelta(content))
        tool_calls = delta.get("tool_calls") or []
        if not isinstance(tool_calls, list):
            raise self._malformed("delta.tool_calls is not a list")
        for position, tc in enumerate(tool_calls):
            if not isinstance(tc, Mapping):
                raise self._malformed("delta.tool_calls item is not an object")
            index = tc.get("index", position)
            if not isinstance(index, int):
                raise self._malformed("tool call index is not an integer")
            fn = tc.get("function") or {}
            if not isinstance(fn, Mapping):
                raise self._malformed("tool call function is not an object")
            call_id = tc.get("id") if isinstance(tc.get("id"), str) else None
            name = fn.get("name") if isinstance(fn.get("name"), str) else None
            raw_args = fn.get("arguments")
            args = raw_args if isinstance(raw_args, str) else ""
            acc = calls.setdefault(index, _CallAcc())
            if acc.done:
                raise self._malformed(f"tool call {index} continued after the finish reason")
            acc.call_id = call_id or acc.call_id
            acc.name = name or acc.name
            acc.arguments.append(args)
            out.append(ToolCallDelta(index, call_id, name, args))
        return out

    # -- errors --------------------------------------------------------------

    def _clip(self, message: str) -> str:
        return message[: self._config.max_error_message_chars]

    def _malformed(self, detail: str) -> ModelError:
        logger.warning(
            "malformed model response",
            extra={"provider": self._provider, "model": self._model, "detail": detail[:200]},
        )
        return ModelError(
            self._clip(f"{self._provider}: malformed response: {detail}"),
            retryable=False,
            kind="malformed_response",
            provider=self._provider,
        )

    def _status_error(self, status: int, headers: httpx.Headers, body: bytes) -> ModelError:
        message, code = _error_detail(body)
        kind = _STATUS_KINDS.get(status, "server_error" if status >= 500 else "client_error")
        if "context_length" in code:
            kind = "context_length_exceeded"
        retryable = status in self._retryable
        retry_after = _parse_retry_after(headers)
        logger.info(
            "model call failed",
            extra={
                "provider": self._provider,
                "model": self._model,
                "status_code": status,
                "kind": kind,
                "retryable": retryable,
                "retry_after": retry_after,
            },
        )
        return ModelError(
            self._clip(f"{self._provider}: HTTP {status}: {message or 'no error message'}"),
            retryable=retryable,
            kind=kind,
            provider=self._provider,
            status_code=status,
            retry_after=retry_after,
        )

    def _transport_error(self, exc: httpx.HTTPError, *, in_body: bool) -> ModelError:
        retryable = True
        if isinstance(exc, httpx.TimeoutException):
            kind = "timeout"
        elif isinstance(exc, httpx.DecodingError):
            kind, retryable = "malformed_response", False
        elif isinstance(exc, httpx.UnsupportedProtocol | httpx.ProxyError):
            kind, retryable = "configuration", False
        elif in_body:
            kind = "stream_cut"
        else:
            kind = "connection"
        logger.info(
            "model call failed",
            extra={
                "provider": self._provider,
                "model": self._model,
                "kind": kind,
                "retryable": retryable,
                "error": repr(exc),
            },
        )
        return ModelError(
            self._clip(f"{self._provider}: {kind}: {type(exc).__name__}: {exc}"),
            retryable=retryable,
            kind=kind,
            provider=self._provider,
        )
