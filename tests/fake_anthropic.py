"""A real local HTTP server speaking Anthropic's Messages API (`POST /v1/messages`).

The same h11 server as tests/fake_openai.py (scripted `Reply`s, cuts, stalls,
resets, recorded requests), with the Messages API's own event stream
(`event: <type>` + `data: <json>`: message_start, content_block_start/delta/stop
with text_delta, input_json_delta, thinking_delta and signature_delta, ping,
message_delta with usage, message_stop, error) and its error bodies
(`{"type": "error", "error": {"type": "overloaded_error", ...}}`).

Like the real API it refuses, before consuming the script, a request that
lacks `x-api-key` or `anthropic-version` (401/400), `model`, `max_tokens` or
`messages` (400), that leaves a tool_use without a tool_result in the next user
message, or that (with thinking enabled) continues after tool use without the
signed thinking block this server issued, its text unchanged (400
invalid_request_error).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.fake_openai import FakeOpenAI, JSONDict, RecordedRequest, Reply, SSEEvent

VERSION = "2023-06-01"


def error_body(err_type: str, message: str) -> JSONDict:
    return {"type": "error", "error": {"type": err_type, "message": message}}


def error_reply(status: int, err_type: str, message: str, *, retry_after: str = "") -> Reply:
    headers = [("retry-after", retry_after)] if retry_after else []
    return Reply(status=status, headers=headers, body=error_body(err_type, message))


@dataclass(frozen=True)
class Text:
    text: str
    pieces: int = 1


@dataclass(frozen=True)
class ToolUse:
    id: str
    name: str
    input: JSONDict
    # The input's JSON text is streamed in this many input_json_delta fragments.
    pieces: int = 3


@dataclass(frozen=True)
class Thinking:
    thinking: str
    signature: str
    pieces: int = 2


@dataclass(frozen=True)
class Redacted:
    data: str


Block = Text | ToolUse | Thinking | Redacted


def _split(text: str, pieces: int) -> list[str]:
    if pieces <= 1 or len(text) <= 1:
        return [text]
    size = -(-len(text) // pieces)
    return [text[i : i + size] for i in range(0, len(text), size)]


def message_events(
    blocks: Sequence[Block],
    *,
    stop_reason: str = "end_turn",
    input_tokens: int = 25,
    output_tokens: int = 12,
    cache_read: int = 0,
    cache_creation: int = 0,
    model: str = "claude-test",
    pings: bool = True,
) -> list[SSEEvent]:
    """The whole event stream of one assistant message made of `blocks`."""
    events: list[SSEEvent] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": input_tokens,
                        "cache_creation_input_tokens": cache_creation,
                        "cache_read_input_tokens": cache_read,
                        "output_tokens": 1,
                    },
                },
            },
        )
    ]
    if pings:
        events.append(("ping", {"type": "ping"}))
    for index, block in enumerate(blocks):
        events += _block_events(index, block)
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def _block_events(index: int, block: Block) -> list[SSEEvent]:
    def start(content: JSONDict) -> SSEEvent:
        return (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": content},
        )

    def delta(d: JSONDict) -> SSEEvent:
        return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})

    stop: SSEEvent = ("content_block_stop", {"type": "content_block_stop", "index": index})
    if isinstance(block, Text):
        pieces = _split(block.text, block.pieces)
        return [
            start({"type": "text", "text": ""}),
            *(delta({"type": "text_delta", "text": p}) for p in pieces),
            stop,
        ]
    if isinstance(block, ToolUse):
        pieces = _split(json.dumps(block.input), block.pieces)
        return [
            start({"type": "tool_use", "id": block.id, "name": block.name, "input": {}}),
            *(delta({"type": "input_json_delta", "partial_json": p}) for p in pieces),
            stop,
        ]
    if isinstance(block, Thinking):
        pieces = _split(block.thinking, block.pieces)
        return [
            start({"type": "thinking", "thinking": "", "signature": ""}),
            *(delta({"type": "thinking_delta", "thinking": p}) for p in pieces),
            delta({"type": "signature_delta", "signature": block.signature}),
            stop,
        ]
    return [start({"type": "redacted_thinking", "data": block.data}), stop]


def message_reply(blocks: Sequence[Block], **kwargs: Any) -> Reply:
    return Reply(events=message_events(blocks, **kwargs))


def message_body(text: str, *, input_tokens: int = 30, output_tokens: int = 9) -> Reply:
    """A non-streaming Messages API response."""
    return Reply(
        body={
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }
    )


class FakeAnthropic(FakeOpenAI):
    """The scriptable Messages API server; start it with `await nursery.start(server.serve)`."""

    def __init__(self) -> None:
        super().__init__()
        # Signatures this server issued, each with its block's thinking text: like the
        # real API it accepts a thinking block back only with both unchanged.
        self.issued_signatures: dict[str, str] = {}
        # Why requests were refused by the protocol checks, in order.
        self.refusals: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def enqueue(self, *replies: Reply) -> None:
        for reply in replies:
            thinking: dict[int, str] = {}
            for ev in reply.events or ():
                if isinstance(ev, tuple) and isinstance(ev[1], dict):
                    index = ev[1].get("index", -1)
                    d = ev[1].get("delta", {})
                    if isinstance(d, dict) and d.get("type") == "thinking_delta":
                        thinking[index] = thinking.get(index, "") + d["thinking"]
                    if isinstance(d, dict) and d.get("type") == "signature_delta":
                        self.issued_signatures[d["signature"]] = thinking.get(index, "")
                    block = ev[1].get("content_block", {})
                    if isinstance(block, dict) and block.get("type") == "redacted_thinking":
                        self.issued_signatures[block["data"]] = ""
        super().enqueue(*replies)

    def unscripted(self) -> Reply:
        return error_reply(500, "api_error", "unscripted")

    def check(self, request: RecordedRequest) -> Reply | None:
        problem = self._problem(request)
        if problem is None:
            return None
        status, err_type, message = problem
        self.refusals.append(message)
        return error_reply(status, err_type, message)

    def _problem(self, request: RecordedRequest) -> tuple[int, str, str] | None:
        if request.path != "/v1/messages":
            return (404, "not_found_error", f"no route {request.path}")
        if not request.headers.get("x-api-key"):
            return (401, "authentication_error", "invalid x-api-key")
        if request.headers.get("anthropic-version") != VERSION:
            return (400, "invalid_request_error", "anthropic-version header is required")
        body = request.body
        for key in ("model", "max_tokens", "messages"):
            if key not in body:
                return (400, "invalid_request_error", f"{key}: Field required")
        messages = body["messages"]
        thinking = isinstance(body.get("thinking"), dict)
        last_assistant = max(
            (i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1
        )
        for i, msg in enumerate(messages):
            content = msg["content"]
            blocks: Iterable[JSONDict] = content if isinstance(content, list) else []
            if msg["role"] == "assistant":
                uses = [b["id"] for b in blocks if b["type"] == "tool_use"]
                if uses:
                    nxt = messages[i + 1]["content"] if i + 1 < len(messages) else None
                    results = [
                        b["tool_use_id"]
                        for b in (nxt or [])
                        if isinstance(b, dict) and b["type"] == "tool_result"
                    ]
                    if nxt is not None and sorted(results) != sorted(uses):
                        return (
                            400,
                            "invalid_request_error",
                            f"messages.{i + 1}: tool_use ids were found without tool_result "
                            "blocks immediately after",
                        )
                    if (
                        thinking
                        and i == last_assistant
                        and not self._starts_with_signed_thinking(content)
                    ):
                        return (
                            400,
                            "invalid_request_error",
                            f"messages.{i}.content.0.type: Expected `thinking` or "
                            "`redacted_thinking`, but found `tool_use`. When `thinking` is "
                            "enabled, a final `assistant` message must start with a thinking "
                            "block",
                        )
        return None

    def _starts_with_signed_thinking(self, content: list[JSONDict]) -> bool:
        first = content[0]
        if first["type"] == "thinking":
            issued = self.issued_signatures.get(first.get("signature", ""))
            return issued is not None and issued == first.get("thinking")
        if first["type"] == "redacted_thinking":
            return first.get("data") in self.issued_signatures
        return False
