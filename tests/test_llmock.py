"""The adapters against LLMock, an OpenAI- and Anthropic-compatible mock server from the
package index that this project did not write (https://pypi.org/project/llmock/),
with its fault injection: HTTP errors with Retry-After, context overflow,
disconnects, truncated streams, corrupt chunks, stalls and broken tool calls.

The server runs on 127.0.0.1 (an ephemeral port) in LLMock's own thread, started
and stopped by the module fixture; each test resets it. Its verdict (how a client
handled the faults: Retry-After ignored, truncated stream accepted, retry storms,
non-retryable errors retried) grades our retry loop from the outside.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import trio
from llmock.pytest_plugin import LLMock
from llmock.testing import LLMockServer

from chatd_trio.config import LoopConfig, RequestOptions, RetryConfig
from chatd_trio.domain import JSON, NewMessage, Role, TextPart, ToolCallPart, ToolResultPart
from chatd_trio.errors import ModelError
from chatd_trio.loop import TurnResult, run_turn
from chatd_trio.models.anthropic import AnthropicModel
from chatd_trio.models.base import Delta, Finish, Model, TextDelta, ToolCallDone, ToolSpec
from chatd_trio.models.classify import CONTEXT_LENGTH
from chatd_trio.models.openai import OpenAIChatModel
from chatd_trio.store.base import Lease, TurnOutcome
from chatd_trio.store.memory import MemoryStore
from chatd_trio.tools import ToolContext, ToolRegistry, tool

HELLO = (NewMessage(Role.USER, (TextPart("What is the weather in Paris?"),)),)
WEATHER = ToolSpec(
    "get_weather",
    "Get the current weather for a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
# Bound of every exchange with the mock (real time: it runs in its own thread).
WAIT = 30.0


@pytest.fixture(scope="module")
def mock_server() -> Iterator[LLMockServer]:
    with LLMockServer(host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture
def mock(mock_server: LLMockServer) -> LLMock:
    """A clean LLMock handle (faults, scripted replies, journal, verdict)."""
    return LLMock(mock_server).reset()


@pytest.fixture
async def openai(mock: LLMock) -> AsyncIterator[OpenAIChatModel]:
    async with OpenAIChatModel(
        mock.base_url("openai"),
        "sk-test",
        "gpt-4o-mini",
        timeout=5.0,
    ) as model:
        yield model


async def collect(
    model: Model, tools: Sequence[ToolSpec] = (), into: list[Delta] | None = None
) -> list[Delta]:
    out = into if into is not None else []
    with trio.fail_after(WAIT):
        async with model.stream(HELLO, tools) as deltas:
            async for d in deltas:
                out.append(d)
    return out


def text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas if isinstance(d, TextDelta))


async def error_of(model: Model, into: list[Delta] | None = None) -> ModelError:
    with pytest.raises(ModelError) as info:
        await collect(model, into=into)
    return info.value


# -- what a healthy mock says ---------------------------------------------------------


async def test_a_scripted_answer_streams_with_usage(mock: LLMock, openai: OpenAIChatModel) -> None:
    mock.reply("Sunny and 21 degrees in Paris.")
    deltas = await collect(openai)
    assert text(deltas) == "Sunny and 21 degrees in Paris."
    finish = deltas[-1]
    assert isinstance(finish, Finish) and finish.finish_reason == "stop"
    # We asked for stream_options.include_usage; LLMock honours it.
    assert finish.usage.output_tokens > 0 and finish.usage.context_tokens() > 0
    (record,) = mock.requests
    assert record.path == "/v1/chat/completions"


async def test_a_scripted_tool_call_arrives_whole(mock: LLMock, openai: OpenAIChatModel) -> None:
    mock.call_tool("get_weather", {"city": "Paris"})
    deltas = await collect(openai, tools=[WEATHER])
    done = [d for d in deltas if isinstance(d, ToolCallDone)]
    assert [(d.name, json.loads(d.arguments)) for d in done] == [("get_weather", {"city": "Paris"})]
    finish = deltas[-1]
    assert isinstance(finish, Finish) and finish.finish_reason == "tool_calls"


async def test_request_options_reach_a_foreign_server(
    mock: LLMock, openai: OpenAIChatModel
) -> None:
    mock.reply("ok")
    tuned = openai.with_options(RequestOptions(temperature=0.1, max_tokens=64, seed=3))
    assert text(await collect(tuned)) == "ok"


# -- its faults --------------------------------------------------------------------------


async def test_rate_limit_with_retry_after(mock: LLMock, openai: OpenAIChatModel) -> None:
    mock.rate_limit(retry_after=2.5)
    err = await error_of(openai)
    assert (err.kind, err.retryable, err.status_code, err.retry_after) == (
        "rate_limit",
        True,
        429,
        2.5,
    )


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [(503, "server_error", True), (500, "server_error", True), (401, "auth", False)],
)
async def test_http_errors(
    mock: LLMock, openai: OpenAIChatModel, status: int, kind: str, retryable: bool
) -> None:
    mock.fail(status)
    err = await error_of(openai)
    assert (err.kind, err.retryable, err.status_code) == (kind, retryable, status)
    assert "{" not in err.message


async def test_context_overflow_is_the_context_length_kind(
    mock: LLMock, openai: OpenAIChatModel
) -> None:
    mock.context_overflow()
    err = await error_of(openai)
    assert (err.kind, err.retryable) == (CONTEXT_LENGTH, False)


async def test_disconnect_mid_stream_is_a_stream_cut(mock: LLMock, openai: OpenAIChatModel) -> None:
    mock.reply("one two three four five six seven eight").disconnect(after_chunks=2)
    got: list[Delta] = []
    err = await error_of(openai, into=got)
    assert (err.kind, err.retryable) == ("stream_cut", True)
    assert not any(isinstance(d, Finish) for d in got)


async def test_a_silently_truncated_stream_is_not_accepted(
    mock: LLMock, openai: OpenAIChatModel
) -> None:
    """The stream ends cleanly without a finish reason (no SDK reports this one)."""
    mock.reply("one two three four five six seven eight").truncate(after_chunks=2)
    got: list[Delta] = []
    err = await error_of(openai, into=got)
    assert (err.kind, err.retryable) == ("stream_cut", True)
    assert not any(isinstance(d, Finish) for d in got)


async def test_a_corrupt_chunk_is_malformed(mock: LLMock, openai: OpenAIChatModel) -> None:
    mock.reply("one two three four five six").corrupt(after_chunks=2)
    err = await error_of(openai)
    assert (err.kind, err.retryable) == ("malformed_response", False)


async def test_a_stalled_stream_hits_the_read_timeout(mock: LLMock) -> None:
    mock.reply("one two three four").stall(after_chunks=1, seconds=3.0)
    base = mock.base_url("openai")
    async with OpenAIChatModel(base, "k", "gpt-4o-mini", timeout=0.5) as model:
        err = await error_of(model)
    assert (err.kind, err.retryable) == ("timeout", True)


# -- the retry loop, graded by LLMock's verdict ---------------------------------------


@tool("get_weather", "Get the current weather for a city.", WEATHER.parameters)
async def get_weather(args: dict[str, JSON], ctx: ToolContext) -> JSON:
    await trio.lowlevel.checkpoint()
    return f"21C in {args.get('city')}"


async def start_chat(store: MemoryStore) -> tuple[uuid.UUID, Lease]:
    chat, _ = await store.create_chat(uuid.uuid4(), "t", [TextPart("Weather in Paris?")])
    (running,) = await store.acquire(uuid.uuid4(), 1)
    return chat.id, Lease.of(running)


async def turn(store: MemoryStore, lease: Lease, model: Model, **kw: Any) -> TurnResult:
    """One turn and its final transition, the way the Server writes it."""
    result = await run_turn(store, lease, model, **kw)
    await store.finish_turn(
        lease,
        result.outcome,
        result.error.message if result.error else None,
        messages=result.final_messages,
    )
    return result


FAST_RETRY = LoopConfig(retry=RetryConfig(base_delay=0.05, max_delay=0.5, max_elapsed=20.0))


async def test_a_turn_rides_out_faults_and_llmock_finds_no_resilience_bug(
    mock: LLMock, openai: OpenAIChatModel
) -> None:
    """Two 429s (Retry-After 0.3 s), then a disconnect, then LLMock's own agent flow: a
    tool call, our tool runs, the final answer. LLMock's verdict then says whether the
    client waited as told, backed off, and never retried what it should not."""
    mock.rate_limit(times=2, retry_after=0.3)
    mock.disconnect(after_chunks=1)
    store = MemoryStore()
    chat_id, lease = await start_chat(store)
    with trio.fail_after(WAIT):
        result = await turn(
            store, lease, openai, tools=ToolRegistry([get_weather]), config=FAST_RETRY
        )
    assert result.outcome is TurnOutcome.DONE
    assert result.retries == 3
    stored = await store.messages_after(chat_id, 0)
    calls = [p for m in stored for p in m.parts if isinstance(p, ToolCallPart)]
    results = [p for m in stored for p in m.parts if isinstance(p, ToolResultPart)]
    assert [c.name for c in calls] == ["get_weather"]
    assert results[0].is_error is False
    assert stored[-1].role is Role.ASSISTANT and stored[-1].parts
    verdict = mock.verdict()
    assert not verdict.errors, verdict.render()


async def test_a_non_retryable_error_is_not_retried_by_the_loop(
    mock: LLMock, openai: OpenAIChatModel
) -> None:
    mock.fail(401)
    store = MemoryStore()
    _chat_id, lease = await start_chat(store)
    with trio.fail_after(WAIT):
        result = await turn(store, lease, openai, config=FAST_RETRY)
    assert result.outcome is TurnOutcome.ERROR
    assert result.retries == 0
    assert len(mock.requests) == 1
    assert not mock.verdict().errors


async def test_a_broken_tool_call_becomes_an_error_result_and_the_turn_goes_on(
    mock: LLMock, openai: OpenAIChatModel
) -> None:
    mock.break_tool_call("malformed_arguments")
    store = MemoryStore()
    chat_id, lease = await start_chat(store)
    with trio.fail_after(WAIT):
        result = await turn(
            store, lease, openai, tools=ToolRegistry([get_weather]), config=FAST_RETRY
        )
    assert result.outcome is TurnOutcome.DONE
    stored = await store.messages_after(chat_id, 0)
    results = [p for m in stored for p in m.parts if isinstance(p, ToolResultPart)]
    assert results and results[0].is_error


# -- the Anthropic adapter against LLMock's Messages API ---------------------------------


async def test_anthropic_adapter_against_llmock(mock: LLMock) -> None:
    base = mock.base_url("anthropic")
    async with AnthropicModel("sk-ant-test", "claude-sonnet-4-5", base_url=base) as model:
        mock.reply("Bonjour from a foreign server.")
        deltas = await collect(model)
        assert text(deltas) == "Bonjour from a foreign server."
        assert isinstance(deltas[-1], Finish) and deltas[-1].usage.output_tokens > 0
        mock.call_tool("get_weather", {"city": "Paris"})
        done = [d for d in await collect(model, tools=[WEATHER]) if isinstance(d, ToolCallDone)]
        assert [(d.name, json.loads(d.arguments)) for d in done] == [
            ("get_weather", {"city": "Paris"})
        ]
        mock.fail(529, provider="anthropic")
        err = await error_of(model)
        assert (err.kind, err.retryable, err.status_code) == ("overloaded", True, 529)
        mock.reply("a b c d e f").truncate(after_chunks=3)
        err = await error_of(model)
        assert (err.kind, err.retryable) == ("stream_cut", True)
