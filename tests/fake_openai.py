"""A real local HTTP server speaking the OpenAI Chat Completions protocol.

It listens on 127.0.0.1 with an ephemeral port, runs inside the test's Trio
nursery (trio sockets + h11) and answers each request with the next scripted
`Reply`: an SSE stream of chunks, a JSON body, an error status, a stream cut
mid-way (the socket closes before the chunked body ends), a stall, or a reset
before any response. Every request is recorded so tests can assert what the
client sent.
"""

from __future__ import annotations

import json
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

JSONDict = dict[str, Any]
# An SSE event: its data (a dict is JSON-encoded, a string sent verbatim), or a
# (name, data) pair sent with an `event:` field as the Anthropic API does.
SSEEvent = JSONDict | str | tuple[str, JSONDict | str]

# Enough for any test request in one read; h11 reassembles larger ones anyway.
RECV_BYTES = 65536


@dataclass
class Reply:
    """One scripted answer.

    `events` are SSE data payloads sent in order (dicts are JSON-encoded, strings
    sent verbatim, e.g. "[DONE]" or a malformed line); `raw` is an event-stream body
    sent as these exact writes (line endings, event fields and split points chosen by
    the test). `cut_after` closes the
    socket after that many events without ending the body; `stall_after`
    stops sending after that many events until the server is closed. `stall`
    sends nothing until the server is closed. `reset` closes the socket before any
    response.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    events: list[SSEEvent] | None = None
    raw: list[bytes] | None = None
    body: JSONDict | str | None = None
    cut_after: int | None = None
    stall_after: int | None = None
    stall: bool = False
    reset: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: JSONDict


def chunk(
    delta: JSONDict | None = None,
    *,
    finish_reason: str | None = None,
    model: str = "fake-model",
) -> JSONDict:
    """A `chat.completion.chunk` with one choice."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}],
    }


def usage_chunk(prompt: int, completion: int, *, cached: int | None = None) -> JSONDict:
    """The final `include_usage` chunk: empty choices plus usage."""
    usage: JSONDict = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake-model",
        "choices": [],
        "usage": usage,
    }


def text_stream(
    pieces: list[str], *, prompt: int = 10, completion: int = 5, cached: int | None = None
) -> Reply:
    """A complete text stream: role chunk, one chunk per piece, stop, usage, [DONE]."""
    events: list[JSONDict | str] = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": p}) for p in pieces]
    events.append(chunk(finish_reason="stop"))
    events.append(usage_chunk(prompt, completion, cached=cached))
    events.append("[DONE]")
    return Reply(events=events)


def error_reply(
    status: int, message: str, *, err_type: str = "invalid_request_error", retry_after: str = ""
) -> Reply:
    """An OpenAI-style JSON error body with an optional Retry-After header."""
    headers = [("retry-after", retry_after)] if retry_after else []
    return Reply(
        status=status,
        headers=headers,
        body={"error": {"message": message, "type": err_type, "param": None, "code": None}},
    )


def completion_reply(text: str, *, prompt: int = 20, completion: int = 7) -> Reply:
    """A non-streaming `chat.completion` body."""
    return Reply(
        body={
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": "fake-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )


class FakeOpenAI:
    """The scriptable server; start it with `await nursery.start(server.serve)`."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._replies: deque[Reply] = deque()
        self._port = 0
        self._closed = trio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def enqueue(self, *replies: Reply) -> None:
        self._replies.extend(replies)

    @property
    def pending(self) -> int:
        """Scripted replies not yet consumed."""
        return len(self._replies)

    def close(self) -> None:
        """Release stalled connections."""
        self._closed.set()

    def check(self, request: RecordedRequest) -> Reply | None:
        """An answer that replaces the script for a request the real API would refuse."""
        return None

    def unscripted(self) -> Reply:
        return error_reply(500, "unscripted")

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self._port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(conn, stream)
                if request is None:
                    return
                self.requests.append(request)
                reply = self.check(request)
                if reply is None:
                    reply = self._replies.popleft() if self._replies else self.unscripted()
                if not await self._respond(conn, stream, reply):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await _abort(stream)

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> RecordedRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECV_BYTES))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return RecordedRequest(
                    method=head.method.decode(),
                    path=head.target.decode(),
                    headers={k.decode(): v.decode() for k, v in head.headers},
                    body=json.loads(body) if body else {},
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _respond(self, conn: h11.Connection, stream: trio.SocketStream, reply: Reply) -> bool:
        """Send one reply; False when the connection must be dropped afterwards."""
        if reply.reset:
            return False
        if reply.stall:
            await self._closed.wait()
            return False

        async def send(event: h11.Event) -> None:
            data = conn.send(event)
            if data:
                await stream.send_all(data)

        if reply.raw is not None:
            headers = [("content-type", "text/event-stream"), *reply.headers]
            await send(h11.Response(status_code=reply.status, headers=headers))
            for piece in reply.raw:
                await send(h11.Data(data=piece))
        elif reply.events is not None:
            headers = [("content-type", "text/event-stream"), *reply.headers]
            await send(h11.Response(status_code=reply.status, headers=headers))
            for i, ev in enumerate(reply.events):
                if reply.cut_after is not None and i >= reply.cut_after:
                    return False
                if reply.stall_after is not None and i >= reply.stall_after:
                    await self._closed.wait()
                    return False
                name, data = ev if isinstance(ev, tuple) else ("", ev)
                payload = data if isinstance(data, str) else json.dumps(data)
                field = f"event: {name}\n" if name else ""
                await send(h11.Data(data=f"{field}data: {payload}\n\n".encode()))
            if reply.cut_after is not None:
                return False
        else:
            raw = reply.body if isinstance(reply.body, str) else json.dumps(reply.body or {})
            data = raw.encode()
            headers = [
                ("content-type", "application/json"),
                ("content-length", str(len(data))),
                *reply.headers,
            ]
            await send(h11.Response(status_code=reply.status, headers=headers))
            await send(h11.Data(data=data))
        await send(h11.EndOfMessage())
        return True


async def _abort(stream: trio.SocketStream) -> None:
    # SO_LINGER 0 would send RST; a plain close is enough: the client sees EOF mid-body.
    with trio.CancelScope(shield=True):
        await stream.aclose()


def unused_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
