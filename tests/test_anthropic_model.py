"""The Anthropic Messages adapter against a local server speaking the real event
stream (tests/fake_anthropic.py), and a whole chat turn with tools through `Server`."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
import trio

from chatd_trio.config import RequestOptions
from chatd_trio.domain import (
    Chat,
    ChatStatus,
    ContextFilePart,
    NewMessage,
    ReasoningPart,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Usage,
)
from chatd_trio.errors import ModelError
from chatd_trio.models.anthropic import AnthropicModel
from chatd_trio.models.base import (
    Delta,
    Finish,
    Model,
    PromptMessage,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    ToolSpec,
)
from chatd_trio.models.classify import CONTEXT_LENGTH
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.server import Server
from chatd_trio.store.memory import MemoryStore
from tests.fake_anthropic import (
    FakeAnthropic,
    Redacted,
    Text,
    Thinking,
    ToolUse,
    error_body,
    error_reply,
    message_body,
    message_events,
    message_reply,
)
from tests.fake_openai import Reply
from tests.server_replica import MEMORY_CONFIG, registry, until_statuses

HELLO = (NewMessage(Role.USER, (TextPart("hi"),)),)
TOOLS = (ToolSpec("echo", "Echo.", {"type": "object"}), ToolSpec("ls", "List.", {}))


@pytest.fixture
async def fake(nursery: trio.Nursery) -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic()
    await nursery.start(server.serve)
    yield server
    server.close()


@pytest.fixture
async def model(fake: FakeAnthropic) -> AsyncIterator[AnthropicModel]:
    async with AnthropicModel(
        "sk-ant-test", "claude-test", base_url=fake.base_url, context_limit=200_000
    ) as m:
        yield m


async def collect(
    model: Model,
    messages: Sequence[PromptMessage] = HELLO,
    tools: Sequence[ToolSpec] = (),
    into: list[Delta] | None = None,
) -> list[Delta]:
    out = into if into is not None else []
    async with model.stream(messages, tools) as deltas:
        async for d in deltas:
            out.append(d)
    return out


async def open_error(model: Model) -> ModelError:
    with pytest.raises(ModelError) as info:
        await collect(model)
    return info.value


# -- streaming ---------------------------------------------------------------------------


async def test_text_stream_with_cache_usage(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.enqueue(
        message_reply(
            [Text("Hello there", pieces=3)],
            input_tokens=50,
            output_tokens=7,
            cache_read=1000,
            cache_creation=200,
        )
    )
    deltas = await collect(model)
    assert deltas == [
        TextDelta("Hell"),
        TextDelta("o th"),
        TextDelta("ere"),
        Finish(
            Usage(
                input_tokens=50,
                output_tokens=7,
                cache_read_tokens=1000,
                cache_creation_tokens=200,
                total_tokens=1257,
            ),
            "stop",
            200_000,
        ),
    ]
    assert isinstance(model, Model)
    assert (model.name, model.provider) == ("claude-test", "anthropic")
    request = fake.requests[0]
    assert (request.path, request.headers["x-api-key"]) == ("/v1/messages", "sk-ant-test")
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.body == {
        "model": "claude-test",
        "max_tokens": 8192,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "stream": True,
    }
    assert fake.refusals == []


async def test_parallel_tool_use_streams_fragments_then_done_calls(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    fake.enqueue(
        message_reply(
            [
                Text("Let me look."),
                ToolUse("toolu_1", "echo", {"text": "a fairly long argument"}, pieces=4),
                ToolUse("toolu_2", "ls", {"path": "."}, pieces=2),
            ],
            stop_reason="tool_use",
        )
    )
    deltas = await collect(model, tools=TOOLS)
    assert deltas[0] == TextDelta("Let me look.")
    fragments = [d for d in deltas if isinstance(d, ToolCallDelta)]
    assert fragments[0] == ToolCallDelta(0, "toolu_1", "echo", "")
    assert "".join(f.arguments_delta for f in fragments if f.index == 0) == json.dumps(
        {"text": "a fairly long argument"}
    )
    done = [d for d in deltas if isinstance(d, ToolCallDone)]
    assert done == [
        ToolCallDone(0, "toolu_1", "echo", '{"text": "a fairly long argument"}'),
        ToolCallDone(1, "toolu_2", "ls", '{"path": "."}'),
    ]
    finish = deltas[-1]
    assert isinstance(finish, Finish) and finish.finish_reason == "tool_calls"
    body = fake.requests[0].body
    assert body["tools"] == [
        {"name": "echo", "description": "Echo.", "input_schema": {"type": "object"}},
        {"name": "ls", "description": "List.", "input_schema": {}},
    ]


async def test_thinking_blocks_stream_as_reasoning_closed_by_their_signature(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    fake.enqueue(
        message_reply(
            [Thinking("Let me think about it.", "sig-1"), Redacted("ENCRYPTED"), Text("42")]
        )
    )
    deltas = await collect(model)
    assert deltas[:-1] == [
        ReasoningDelta("Let me thin"),
        ReasoningDelta("k about it."),
        ReasoningDelta("", signature="sig-1"),
        ReasoningDelta("", signature="ENCRYPTED", redacted=True),
        TextDelta("42"),
    ]


async def test_history_goes_back_in_the_shape_the_api_requires(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    """Signed thinking leads the assistant message, tool results of one step share one
    user message, system text is top level; unsigned reasoning is left out."""
    fake.enqueue(message_reply([Thinking("ok", "sig-A")]), message_reply([Text("fine")]))
    await collect(model)  # the server issues sig-A
    agent = uuid.uuid4()
    history = [
        NewMessage(Role.SYSTEM, (TextPart("Be brief."), ContextFilePart(agent, "A.md", "x"))),
        NewMessage(Role.USER, (TextPart("list and echo"),)),
        NewMessage(
            Role.ASSISTANT,
            (
                ReasoningPart("ok", signature="sig-A"),
                ReasoningPart("unsigned thoughts of another provider"),
                TextPart("Running both."),
                ToolCallPart("toolu_1", "echo", '{"text": "hi"}'),
                ToolCallPart("toolu_2", "ls", "not json"),
            ),
        ),
        NewMessage(Role.TOOL, (ToolResultPart("toolu_1", "echo", {"echo": "hi"}),)),
        NewMessage(Role.TOOL, (ToolResultPart("toolu_2", "ls", "no such dir", is_error=True),)),
    ]
    thinking = model.with_options(RequestOptions(thinking_budget_tokens=2048))
    deltas = await collect(thinking, history, TOOLS)
    assert deltas[0] == TextDelta("fine")
    body = fake.requests[1].body
    assert fake.refusals == []
    assert body["system"] == [
        {"type": "text", "text": "Be brief."},
        {"type": "text", "text": '<context_file path="A.md">\nx\n</context_file>'},
    ]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "list and echo"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "ok", "signature": "sig-A"},
                {"type": "text", "text": "Running both."},
                {"type": "tool_use", "id": "toolu_1", "name": "echo", "input": {"text": "hi"}},
                {"type": "tool_use", "id": "toolu_2", "name": "ls", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"echo": "hi"}'},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": "no such dir",
                    "is_error": True,
                },
            ],
        },
    ]


async def test_the_fake_refuses_tool_use_after_thinking_without_the_signed_block(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    """The wire check the test above passes: a thinking block without a signature is
    dropped, and the real API (like this server) then refuses the continuation."""
    history = [
        NewMessage(Role.USER, (TextPart("go"),)),
        NewMessage(Role.ASSISTANT, (ReasoningPart("plan"), ToolCallPart("toolu_1", "echo", "{}"))),
        NewMessage(Role.TOOL, (ToolResultPart("toolu_1", "echo", "ok"),)),
    ]
    thinking = model.with_options(RequestOptions(thinking_budget_tokens=1024))
    with pytest.raises(ModelError) as info:
        await collect(thinking, history, TOOLS)
    assert (info.value.kind, info.value.retryable) == ("bad_request", False)
    assert "must start with a thinking block" in info.value.message


async def test_the_fake_refuses_a_signed_thinking_block_whose_text_changed(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    """A signature vouches for its block's text: merging or editing blocks breaks it."""
    fake.enqueue(message_reply([Thinking("plan A", "sig-A")]))
    await collect(model)
    history = [
        NewMessage(Role.USER, (TextPart("go"),)),
        NewMessage(
            Role.ASSISTANT,
            (ReasoningPart("plan A, then B", "sig-A"), ToolCallPart("toolu_1", "echo", "{}")),
        ),
        NewMessage(Role.TOOL, (ToolResultPart("toolu_1", "echo", "ok"),)),
    ]
    thinking = model.with_options(RequestOptions(thinking_budget_tokens=1024))
    with pytest.raises(ModelError) as info:
        await collect(thinking, history, TOOLS)
    assert "must start with a thinking block" in info.value.message


async def test_request_options_map_to_the_messages_api(fake: FakeAnthropic) -> None:
    fake.enqueue(message_reply([Text("ok")]), message_body("sum"))
    opts = RequestOptions(
        temperature=0.3,
        top_p=0.8,
        top_k=40,
        max_tokens=1000,
        stop=("###",),
        tool_choice="required",
        parallel_tool_calls=False,
        user="user-7",
        seed=1,
        reasoning_effort="high",
        response_format={"type": "json_object"},
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
        extra_body={"service_tier": "auto"},
    )
    async with AnthropicModel("k", "claude-test", base_url=fake.base_url, options=opts) as m:
        await collect(m, tools=TOOLS)
        await m.generate(HELLO)
    step, summary = fake.requests
    body = {k: v for k, v in step.body.items() if k not in ("messages", "tools")}
    assert body == {
        "model": "claude-test",
        "max_tokens": 1000,
        "stream": True,
        "temperature": 0.3,
        "top_p": 0.8,
        "top_k": 40,
        "stop_sequences": ["###"],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "user-7"},
        "service_tier": "auto",
    }
    assert step.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert summary.body["stream"] is False and "tools" not in summary.body
    assert "tool_choice" not in summary.body


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "err_type", "message", "kind", "retryable"),
    [
        (529, "overloaded_error", "Overloaded", "overloaded", True),
        (500, "api_error", "Internal server error", "server_error", True),
        (401, "authentication_error", "invalid x-api-key", "auth", False),
        (403, "permission_error", "not allowed", "permission", False),
        (404, "not_found_error", "model: claude-nope", "not_found", False),
        (413, "request_too_large", "Request exceeds the maximum size", "request_too_large", False),
        (
            400,
            "invalid_request_error",
            "prompt is too long: 210000 tokens > 200000 maximum",
            CONTEXT_LENGTH,
            False,
        ),
        (
            400,
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API.",
            "quota",
            False,
        ),
        (400, "billing_error", "billing problem", "quota", False),
        (400, "invalid_request_error", "messages: field required", "bad_request", False),
    ],
)
async def test_http_errors_are_classified_by_the_table(
    fake: FakeAnthropic,
    model: AnthropicModel,
    status: int,
    err_type: str,
    message: str,
    kind: str,
    retryable: bool,
) -> None:
    fake.enqueue(error_reply(status, err_type, message))
    err = await open_error(model)
    assert (err.kind, err.retryable, err.status_code, err.provider) == (
        kind,
        retryable,
        status,
        "anthropic",
    )
    assert message in err.message and "{" not in err.message


async def test_rate_limit_carries_retry_after(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.enqueue(error_reply(429, "rate_limit_error", "Number of requests", retry_after="17"))
    err = await open_error(model)
    assert (err.kind, err.retryable, err.retry_after) == ("rate_limit", True, 17.0)


@pytest.mark.parametrize(
    ("err_type", "kind", "retryable"),
    [
        ("overloaded_error", "overloaded", True),
        ("api_error", "server_error", True),
        ("rate_limit_error", "rate_limit", True),
        ("invalid_request_error", "bad_request", False),
    ],
)
async def test_an_error_event_mid_stream_is_classified_by_its_type(
    fake: FakeAnthropic, model: AnthropicModel, err_type: str, kind: str, retryable: bool
) -> None:
    events = message_events([Text("partial answer")])[:4]
    events.append(("error", error_body(err_type, "went wrong")))
    fake.enqueue(Reply(events=events))
    got: list[Delta] = []
    with pytest.raises(ModelError) as info:
        await collect(model, into=got)
    assert got == [TextDelta("partial answer")]
    assert (info.value.kind, info.value.retryable) == (kind, retryable)


async def test_a_cut_before_the_stop_reason_is_a_stream_cut(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    events = message_events([Text("half"), ToolUse("t", "echo", {"a": 1})], stop_reason="tool_use")
    cut = next(i for i, e in enumerate(events) if e[0] == "message_delta")
    fake.enqueue(Reply(events=events, cut_after=cut))
    got: list[Delta] = []
    with pytest.raises(ModelError) as info:
        await collect(model, tools=TOOLS, into=got)
    assert (info.value.kind, info.value.retryable) == ("stream_cut", True)
    assert not any(isinstance(d, Finish) for d in got)


async def test_a_cut_after_the_stop_reason_keeps_the_answer(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    events = message_events([Text("all of it")], output_tokens=3)
    fake.enqueue(Reply(events=events, cut_after=len(events) - 1))  # no message_stop
    deltas = await collect(model)
    assert deltas[0] == TextDelta("all of it")
    assert isinstance(deltas[-1], Finish) and deltas[-1].usage.output_tokens == 3


@pytest.mark.parametrize(
    "event",
    [
        ("content_block_delta", "{not json"),
        ("content_block_delta", "[" * 100_000),
        ("content_block_delta", {"type": "content_block_delta", "index": 9, "delta": {}}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}},
        ),
        ("content_block_start", {"type": "content_block_start", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": "x"}),
        ("error", {"type": "error"}),
    ],
)
async def test_malformed_events_are_the_adapters_own_error(
    fake: FakeAnthropic, model: AnthropicModel, event: tuple[str, object]
) -> None:
    events = message_events([Text("ok")])
    # After message_start, ping, content_block_start(0) and the first text delta.
    fake.enqueue(Reply(events=[*events[:4], event, *events[4:]]))  # type: ignore[list-item]
    got: list[Delta] = []
    with pytest.raises(ModelError) as info:
        await collect(model, into=got)
    assert (info.value.kind, info.value.retryable) == ("malformed_response", False)


async def test_generate_returns_text_and_usage(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.enqueue(message_body("A summary.", input_tokens=300, output_tokens=12))
    result = await model.generate(HELLO)
    assert result.text == "A summary."
    assert result.usage == Usage(input_tokens=300, output_tokens=12, total_tokens=312)
    fake.enqueue(error_reply(529, "overloaded_error", "Overloaded"))
    with pytest.raises(ModelError) as info:
        await model.generate(HELLO)
    assert (info.value.kind, info.value.retryable) == ("overloaded", True)


# -- a whole chat turn through Server --------------------------------------------------


async def test_a_chat_turn_with_parallel_tools_runs_through_server(fake: FakeAnthropic) -> None:
    """MemoryStore + MemoryPubSub, the real clock; the model is chosen per chat and its
    request options overridden per chat with `with_options`."""
    fake.enqueue(
        message_reply(
            [
                Text("Echoing twice."),
                ToolUse("toolu_a", "echo", {"n": 1}),
                ToolUse("toolu_b", "echo", {"n": 2}),
            ],
            stop_reason="tool_use",
            input_tokens=120,
            cache_read=800,
        ),
        message_reply([Text("Both echoed.")], input_tokens=200, output_tokens=5),
    )
    pubsub = MemoryPubSub()
    store = MemoryStore(pubsub=pubsub)
    owner = uuid.uuid4()
    async with AnthropicModel("sk-ant", "claude-test", base_url=fake.base_url) as base:

        def pick(chat: Chat) -> Model:
            return base.with_options(RequestOptions(temperature=0.0, user=str(chat.owner_id)))

        async with Server(store, pubsub, pick, MEMORY_CONFIG, tools=registry()) as server:
            chat = await server.create_chat(owner, "echo 1 and 2", title="t")
            async with server.subscribe(owner, chat.id) as sub:
                with trio.fail_after(30):
                    await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
    stored = await store.messages_after(chat.id, 0)
    assert [m.role for m in stored] == [
        Role.USER,
        Role.ASSISTANT,
        Role.TOOL,
        Role.TOOL,
        Role.ASSISTANT,
    ]
    assert stored[1].parts == (
        TextPart("Echoing twice."),
        ToolCallPart("toolu_a", "echo", '{"n": 1}'),
        ToolCallPart("toolu_b", "echo", '{"n": 2}'),
    )
    assert stored[1].usage is not None and stored[1].usage.cache_read_tokens == 800
    assert [m.parts for m in stored[2:4]] == [
        (ToolResultPart("toolu_a", "echo", {"echo": {"n": 1}}),),
        (ToolResultPart("toolu_b", "echo", {"echo": {"n": 2}}),),
    ]
    assert stored[4].parts == (TextPart("Both echoed."),)
    assert (await store.get_chat(chat.id)).status is ChatStatus.WAITING
    # The second request carried both results in one user message; nothing was refused.
    assert fake.refusals == []
    first, second = fake.requests
    assert first.body["temperature"] == 0.0
    assert first.body["metadata"] == {"user_id": str(owner)}
    assert second.body["messages"][-1] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": '{"echo": {"n": 1}}'},
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": '{"echo": {"n": 2}}'},
        ],
    }


async def test_thinking_with_tools_runs_through_server_with_signed_blocks_kept(
    fake: FakeAnthropic,
) -> None:
    """Extended thinking across a tool call: the loop stores each thinking block with its
    signature and sends it back unchanged ahead of the tool use, as the API requires (the
    fake refuses the continuation otherwise, like the real API)."""
    fake.enqueue(
        message_reply(
            [
                Thinking("I should echo the number.", "sig-1"),
                Redacted("ENCRYPTED"),
                Text("Echoing."),
                ToolUse("toolu_a", "echo", {"n": 7}),
            ],
            stop_reason="tool_use",
        ),
        message_reply([Thinking("It came back.", "sig-2"), Text("Echoed 7.")]),
    )
    pubsub = MemoryPubSub()
    store = MemoryStore(pubsub=pubsub)
    owner = uuid.uuid4()
    options = RequestOptions(max_tokens=4096, thinking_budget_tokens=1024)
    async with (
        AnthropicModel("sk-ant", "claude-test", base_url=fake.base_url, options=options) as model,
        Server(store, pubsub, model, MEMORY_CONFIG, tools=registry()) as server,
    ):
        chat = await server.create_chat(owner, "echo 7", title="t")
        async with server.subscribe(owner, chat.id) as sub:
            with trio.fail_after(30):
                await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
    assert fake.refusals == []
    final = await store.get_chat(chat.id)
    assert (final.status, final.last_error) == (ChatStatus.WAITING, None)
    stored = await store.messages_after(chat.id, 0)
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.ASSISTANT]
    assert stored[1].parts == (
        ReasoningPart("I should echo the number.", "sig-1"),
        ReasoningPart("", "ENCRYPTED", redacted=True),
        TextPart("Echoing."),
        ToolCallPart("toolu_a", "echo", '{"n": 7}'),
    )
    assert stored[3].parts == (ReasoningPart("It came back.", "sig-2"), TextPart("Echoed 7."))
    second = fake.requests[1].body
    assert second["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert second["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "I should echo the number.", "signature": "sig-1"},
            {"type": "redacted_thinking", "data": "ENCRYPTED"},
            {"type": "text", "text": "Echoing."},
            {"type": "tool_use", "id": "toolu_a", "name": "echo", "input": {"n": 7}},
        ],
    }


async def test_cancelling_a_stream_releases_the_connection(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    events = message_events([Text("a b c", pieces=3)])
    fake.enqueue(Reply(events=events, stall_after=4), message_reply([Text("next")]))
    got: list[Delta] = []
    with trio.CancelScope() as scope:
        async with model.stream(HELLO, ()) as deltas:
            async for d in deltas:
                got.append(d)
                scope.cancel()
    assert scope.cancelled_caught
    assert got == [TextDelta("a ")]
    assert (await collect(model))[0] == TextDelta("next")
