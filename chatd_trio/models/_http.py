"""What the HTTP adapters (OpenAI-compatible, Anthropic) share.

One `httpx.AsyncClient` per model (pooled connections, Trio backend), the
timeouts of `ModelHTTPConfig`, Server-Sent Events through httpx-sse with a cap
on line length, and the conversion of every failure into a classified
`ModelError` (`chatd_trio.models.classify`).
"""

from __future__ import annotations

import copy
import email.utils
import json
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Self, cast

import httpx
import httpx_sse

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio._closing import AsyncClosing
from chatd_trio.config import ModelHTTPConfig, RequestOptions, RetryConfig
from chatd_trio.errors import ModelError
from chatd_trio.models.base import Delta, PromptMessage, ToolSpec
from chatd_trio.models.classify import (
    CONNECTION,
    MALFORMED,
    STREAM_CUT,
    UNREACHABLE,
    ErrorBody,
    classify,
    error_object,
    parse_error_body,
)

logger = logging.getLogger("chatd_trio.models")

# What an adapter catches while decoding a provider's JSON: anything a hostile or broken
# chunk can make the parsing code raise (RecursionError: a chunk nested 100 000 deep).
DECODE_ERRORS = (ValueError, TypeError, LookupError, AttributeError, RecursionError)


def count(d: Mapping[str, Any], key: str) -> int:
    """A non-negative integer field of a usage object, 0 when absent or not one."""
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            pass
        else:
            if math.isfinite(value):
                return max(value, 0.0)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # An HTTP date is wall-clock time by definition; Trio's clock cannot express it.
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


class LineTooLong(Exception):
    """A Server-Sent Events line beyond `ModelHTTPConfig.max_sse_line_chars`."""


class _LineCap(httpx.AsyncByteStream):
    """Raises `LineTooLong` once more than `limit` bytes arrive without a line break.

    httpx-sse buffers a line until its end; this bounds that buffer. It counts the
    bytes on the wire, which are the text because streams are requested with
    `accept-encoding: identity`.
    """

    def __init__(self, inner: httpx.AsyncByteStream, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self._run = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in self._inner:
            cut = max(piece.rfind(b"\n"), piece.rfind(b"\r"))
            self._run = len(piece) - cut - 1 if cut >= 0 else self._run + len(piece)
            if self._run > self._limit:
                raise LineTooLong(f"SSE line longer than {self._limit} bytes")
            yield piece

    async def aclose(self) -> None:
        await self._inner.aclose()


async def sse_events(
    response: httpx.Response, max_line: int
) -> AsyncGenerator[httpx_sse.ServerSentEvent, None]:
    """The response's events, parsed by httpx-sse, lines capped at `max_line` bytes."""
    inner = response.stream
    assert isinstance(inner, httpx.AsyncByteStream)
    response.stream = _LineCap(inner, max_line)
    async with aclosing(httpx_sse.EventSource(response).aiter_sse()) as events:
        async for event in events:
            yield event


class HTTPModel(AsyncClosing):
    """The shared half of an HTTP adapter: client, options, errors.

    Owns an `httpx.AsyncClient` unless one is passed in; close it with `aclose()`
    or `async with`. `with_options` copies share the client (and need no closing).
    """

    def __init__(
        self,
        model: str,
        *,
        url: str,
        provider: str,
        timeout: float | None,
        context_limit: int | None,
        headers: Mapping[str, str],
        options: RequestOptions | None,
        config: ModelHTTPConfig | None,
        retry: RetryConfig | None,
        client: httpx.AsyncClient | None,
    ) -> None:
        self._config = config or ModelHTTPConfig()
        self._retryable = (retry or RetryConfig()).retryable_status_codes
        self._model = model
        self._url = url
        self._provider = provider
        self._context_limit = context_limit
        self._headers = dict(headers)
        self._options = options or RequestOptions()
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

    @property
    def options(self) -> RequestOptions:
        """The request options this model sends."""
        return self._options

    def with_options(self, options: RequestOptions) -> Self:
        """This model with `options` merged over its own; shares the HTTP client."""
        clone = copy.copy(self)
        clone._options = self._options.merged(options)
        clone._owns_client = False
        return clone

    async def aclose(self) -> None:
        """Close the HTTP client if this model created it."""
        if self._owns_client:
            await self._client.aclose()

    # -- requests --------------------------------------------------------------

    def request_body(
        self, messages: Sequence[PromptMessage], tools: Sequence[ToolSpec], *, stream: bool
    ) -> dict[str, Any]:
        """The body the adapter's endpoint takes: messages, tools and the request options."""
        raise NotImplementedError

    def _deltas(self, response: httpx.Response) -> AsyncGenerator[Delta, None]:
        """The deltas of a streamed response, ending with `Finish` (each adapter parses its
        provider's events)."""
        raise NotImplementedError

    async def _generate_json(self, messages: Sequence[PromptMessage]) -> object:
        """The decoded JSON body of one non-streaming call without tools."""
        body = self.request_body(messages, (), stream=False)
        async with self._open(body, "application/json") as response:
            return await self._read_json(response)

    @asynccontextmanager
    async def _open_deltas(self, body: Mapping[str, Any]) -> AsyncIterator[AsyncIterator[Delta]]:
        """One streamed call: its deltas, closed (and the response with them) on leaving."""
        async with self._open(body, "text/event-stream") as response:
            await self._refuse_json_body(response)
            async with aclosing(self._deltas(response)) as deltas:
                yield deltas

    def _request_headers(self, accept: str) -> dict[str, str]:
        headers = {**self._headers, "accept": accept}
        if accept == "text/event-stream":
            # Uncompressed, so the line cap counts text (and compressing SSE only adds latency).
            headers["accept-encoding"] = "identity"
        headers.update(self._options.extra_headers)
        return headers

    @asynccontextmanager
    async def _open(self, body: Mapping[str, Any], accept: str) -> AsyncIterator[httpx.Response]:
        """Send; yield the response once its status is a success (else raise the
        classified error); close it shielded however the caller leaves."""
        headers = self._request_headers(accept)
        request = self._client.build_request(
            "POST", self._url, json=body, headers=headers, timeout=self._timeout
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, in_body=False) from exc
        try:
            if not response.is_success:
                raw = await self._read_error_body(response)
                raise self._status_error(response.status_code, response.headers, raw)
            yield response
        finally:
            # Shielded so an interrupted step still returns its connection to the pool.
            with bounded_cleanup(self._config.close_timeout):
                await response.aclose()

    async def _events(
        self, response: httpx.Response, answered: Callable[[], bool]
    ) -> AsyncGenerator[httpx_sse.ServerSentEvent, None]:
        """The response's events. A transport error ends them quietly once `answered()`
        (the finish or stop reason came: the answer is whole), else it is a stream cut."""
        try:
            async with aclosing(sse_events(response, self._config.max_sse_line_chars)) as events:
                async for event in events:
                    yield event
        except httpx.HTTPError as exc:
            if not answered():
                raise self._transport_error(exc, in_body=True) from exc
            logger.info(
                "stream cut after the finish reason; the answer is complete",
                extra={"provider": self._provider, "model": self._model, "error": repr(exc)},
            )
        except (LineTooLong, httpx_sse.SSEError) as exc:
            raise self.malformed(str(exc)) from exc

    async def _refuse_json_body(self, response: httpx.Response) -> None:
        """A 2xx JSON body where an event stream was asked for: a proxy or server that
        ignored `stream: true` (or an error object sent with status 200)."""
        if not response.headers.get("content-type", "").startswith("application/json"):
            return
        found = error_object(await self._read_json(response))
        if found is not None:
            raise self.classified(None, found)
        raise self.malformed("expected an event stream, got a JSON body")

    async def _read_error_body(self, response: httpx.Response) -> bytes:
        limit = self._config.max_error_body_bytes
        buf = bytearray()
        try:
            # httpx implements aiter_bytes as an async generator; its annotation says less.
            pieces = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
            async with aclosing(pieces) as it:
                async for piece in it:
                    buf += piece
                    if len(buf) >= limit:
                        break
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, in_body=False) from exc
        return bytes(buf[:limit])

    async def _read_json(self, response: httpx.Response) -> object:
        try:
            raw = await response.aread()
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, in_body=True) from exc
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise self.malformed(f"body is not JSON: {raw[:200]!r}") from exc

    # -- errors ----------------------------------------------------------------

    def _clip(self, message: str) -> str:
        return message[: self._config.max_error_message_chars]

    def malformed(self, detail: str) -> ModelError:
        """The error of a response that breaks the protocol (never retried)."""
        logger.warning(
            "malformed model response",
            extra={"provider": self._provider, "model": self._model, "detail": detail[:200]},
        )
        return ModelError(
            self._clip(f"malformed response: {detail}"),
            retryable=False,
            kind=MALFORMED,
            provider=self._provider,
        )

    def classified(
        self, status: int | None, body: ErrorBody, retry_after: float | None = None
    ) -> ModelError:
        """The table's error for a status (None: inside a stream) and an error body."""
        verdict = classify(status, body, retryable_statuses=self._retryable)
        logger.info(
            "model call failed",
            extra={
                "provider": self._provider,
                "model": self._model,
                "status_code": status,
                "kind": verdict.kind,
                "code": body.code,
                "retryable": verdict.retryable,
                "retry_after": retry_after,
            },
        )
        return ModelError(
            self._clip(verdict.message),
            retryable=verdict.retryable,
            kind=verdict.kind,
            provider=self._provider,
            status_code=status,
            retry_after=retry_after,
        )

    def _status_error(self, status: int, headers: httpx.Headers, raw: bytes) -> ModelError:
        return self.classified(status, parse_error_body(raw), parse_retry_after(headers))

    def _transport_error(self, exc: httpx.HTTPError, *, in_body: bool) -> ModelError:
        retryable = True
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            # Nothing answered: a wrong base_url, DNS, a host that is down.
            kind = UNREACHABLE
        elif isinstance(exc, httpx.TimeoutException):
            kind = "timeout"
        elif isinstance(exc, httpx.DecodingError):
            kind, retryable = MALFORMED, False
        elif isinstance(exc, httpx.UnsupportedProtocol | httpx.ProxyError):
            kind, retryable = "configuration", False
        elif in_body:
            kind = STREAM_CUT
        else:
            kind = CONNECTION
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
        detail = str(exc) or type(exc).__name__
        return ModelError(
            self._clip(f"{kind}: {type(exc).__name__}: {detail}"),
            retryable=retryable,
            kind=kind,
            provider=self._provider,
        )

    def stream_cut(self, detail: str) -> ModelError:
        return ModelError(
            f"{STREAM_CUT}: {detail}",
            retryable=True,
            kind=STREAM_CUT,
            provider=self._provider,
        )
