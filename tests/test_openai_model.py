"""The OpenAI-compatible adapter against a real local HTTP server (tests/fake_openai.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import trio

from chatd_trio.config import ModelHTTPConfig, RequestOptions
from chatd_trio.domain import (
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
from chatd_trio.models.classify import CONTEXT_LENGTH, UNREACHABLE
from chatd_trio.models.openai import OpenAIChatModel
from tests.fake_openai import (
    FakeOpenAI,
    JSONDict,
    Reply,
    chunk,
    completion_reply,
    error_reply,
    text_stream,
    unused_port,
    usage_chunk,
)

HELLO = (NewMessage(Role.USER, (TextPart("hi"),)),)


@pytest.fixture
async def fake(nursery: trio.Nursery) -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await nursery.start(server.serve)
    yield server
    server.close()


@pytest.fixture
async def model(fake: FakeOpenAI) -> AsyncIterator[OpenAIChatModel]:
    async with OpenAIChatModel(
        fake.base_url,
        "sk-test",
        "gpt-test",
        context_limit=128_000,
        extra_headers={"x-team": "chatd"},
    ) as m:
        yield m


async def collect(
    model: OpenAIChatModel,
    messages: Sequence[PromptMessage] = HELLO,
    tools: Sequence[ToolSpec] = (),
    into: list[Delta] | None = None,
) -> list[Delta]:
    out = into if into is not None else []
    async with model.stream(messages, tools) as deltas:
        async for d in deltas:
            out.append(d)
    return out


def finishes(deltas: list[Delta]) -> list[Finish]:
    return [d for d in deltas if isinstance(d, Finish)]


# ---------------------------------------------------------------------------
# streaming success


async def test_text_stream_yields_text_then_one_finish_with_usage(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(text_stream(["Hel", "lo", " world"], prompt=100, completion=5, cached=40))
    deltas = await collect(model)
    assert deltas[:-1] == [TextDelta("Hel"), TextDelta("lo"), TextDelta(" world")]
    assert finishes(deltas) == [deltas[-1]]
    finish = deltas[-1]
    assert isinstance(finish, Finish)
    assert finish.finish_reason == "stop"
    assert finish.context_limit == 128_000
    assert finish.usage == Usage(
        input_tokens=60, output_tokens=5, cache_read_tokens=40, total_tokens=105
    )
    # prompt_tokens already includes the cached ones: no double counting.
    assert finish.usage.context_tokens() == 100
    assert fake.pending == 0


async def test_model_satisfies_the_port(model: OpenAIChatModel) -> None:
    assert isinstance(model, Model)
    assert (model.name, model.provider) == ("gpt-test", "openai")


async def test_request_converts_messages_tools_and_stream_options(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    agent = uuid.uuid4()
    messages = [
        NewMessage(
            Role.SYSTEM,
            (
                TextPart("You are helpful."),
                ContextFilePart(agent, "AGENTS.md", "run make test"),
                ContextFilePart(agent),  # the sentinel carries no text
            ),
        ),
        NewMessage(Role.USER, (TextPart("list files"),)),
        NewMessage(
            Role.ASSISTANT,
            (
                ReasoningPart("I should call ls"),
                TextPart("Let me look."),
                ToolCallPart("call_1", "ls", '{"path": "."}'),
                ToolCallPart("call_2", "pwd", ""),
            ),
        ),
        NewMessage(
            Role.TOOL,
            (
                ToolResultPart("call_1", "ls", {"files": ["a.py"]}),
                ToolResultPart("call_2", "pwd", "permission denied", is_error=True),
            ),
        ),
        NewMessage(Role.ASSISTANT, (ReasoningPart("only thoughts"),)),
    ]
    tools = [
        ToolSpec("ls", "List files", {"type": "object", "properties": {"path": {"type": "string"}}})
    ]
    fake.enqueue(text_stream(["ok"]))
    await collect(model, messages, tools)

    [req] = fake.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.headers["authorization"] == "Bearer sk-test"
    assert req.headers["x-team"] == "chatd"
    assert req.headers["accept"] == "text/event-stream"
    body = req.body
    assert body["model"] == "gpt-test"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "ls",
                "description": "List files",
                "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
            },
        }
    ]
    assert body["messages"] == [
        {
            "role": "system",
            "content": 'You are helpful.\n\n<context_file path="AGENTS.md">\n'
            "run make test\n</context_file>",
        },
        {"role": "user", "content": "list files"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "ls", "arguments": '{"path": "."}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "pwd", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"files": ["a.py"]}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "Error: permission denied"},
    ]


async def test_no_tools_omits_the_tools_key(fake: FakeOpenAI, model: OpenAIChatModel) -> None:
    fake.enqueue(text_stream(["x"]))
    await collect(model)
    assert "tools" not in fake.requests[0].body


async def test_parallel_tool_calls_split_mid_json_are_accumulated(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    def call(index: int, args: str, *, cid: str | None = None, name: str | None = None) -> JSONDict:
        tc: JSONDict = {"index": index, "function": {"arguments": args}}
        if cid:
            tc["id"], tc["type"], tc["function"]["name"] = cid, "function", name
        return chunk({"tool_calls": [tc]})

    fake.enqueue(
        Reply(
            events=[
                chunk({"role": "assistant", "content": None}),
                call(0, "", cid="call_a", name="read_file"),
                call(0, '{"pa'),
                call(1, "", cid="call_b", name="run"),
                call(1, '{"cmd": "ma'),
                call(0, 'th": "x.py"'),
                call(1, 'ke test"}'),
                call(0, "}"),
                chunk(finish_reason="tool_calls"),
                usage_chunk(50, 20),
                "[DONE]",
            ]
        )
    )
    deltas = await collect(model, tools=[ToolSpec("read_file", "", {}), ToolSpec("run", "", {})])

    fragments = [d for d in deltas if isinstance(d, ToolCallDelta)]
    assert fragments == [
        ToolCallDelta(0, "call_a", "read_file", ""),
        ToolCallDelta(0, None, None, '{"pa'),
        ToolCallDelta(1, "call_b", "run", ""),
        ToolCallDelta(1, None, None, '{"cmd": "ma'),
        ToolCallDelta(0, None, None, 'th": "x.py"'),
        ToolCallDelta(1, None, None, 'ke test"}'),
        ToolCallDelta(0, None, None, "}"),
    ]
    done = [d for d in deltas if isinstance(d, ToolCallDone)]
    assert done == [
        ToolCallDone(0, "call_a", "read_file", '{"path": "x.py"}'),
        ToolCallDone(1, "call_b", "run", '{"cmd": "make test"}'),
    ]
    assert [json.loads(d.arguments) for d in done] == [{"path": "x.py"}, {"cmd": "make test"}]
    # Every call is done before the step finishes; Finish comes last and once.
    assert deltas.index(done[-1]) < len(deltas) - 1
    assert finishes(deltas) == [deltas[-1]]
    assert deltas[-1] == Finish(
        Usage(input_tokens=50, output_tokens=20, total_tokens=70), "tool_calls", 128_000
    )
    assert not any(isinstance(d, TextDelta) for d in deltas)


async def test_tool_calls_are_done_when_the_finish_reason_arrives(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    tc = {"index": 0, "id": "c", "type": "function", "function": {"name": "ls", "arguments": "{}"}}
    # The server stalls before the usage chunk: Done must not wait for it.
    events: list[JSONDict | str] = [
        chunk({"tool_calls": [tc]}),
        chunk(finish_reason="tool_calls"),
        usage_chunk(1, 1),
    ]
    fake.enqueue(Reply(events=events, stall_after=2))
    got: list[Delta] = []
    with trio.fail_after(5):  # a hang guard only; the Done arrives without waiting
        async with model.stream(HELLO, ()) as deltas:
            async for d in deltas:
                got.append(d)
                if isinstance(d, ToolCallDone):
                    break
    assert got[-1] == ToolCallDone(0, "c", "ls", "{}")


async def test_reasoning_content_becomes_reasoning_deltas(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(
        Reply(
            events=[
                chunk({"role": "assistant", "reasoning_content": "think"}),
                chunk({"reasoning_content": "ing"}),
                chunk({"reasoning": "!"}),  # OpenRouter spelling
                chunk({"content": "answer"}),
                chunk(finish_reason="stop"),
                "[DONE]",
            ]
        )
    )
    deltas = await collect(model)
    assert deltas[:-1] == [
        ReasoningDelta("think"),
        ReasoningDelta("ing"),
        ReasoningDelta("!"),
        TextDelta("answer"),
    ]
    # No usage chunk: the Finish still comes, with zero usage.
    assert deltas[-1] == Finish(Usage(), "stop", 128_000)


async def test_finish_without_done_marker_is_complete(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(Reply(events=[chunk({"content": "a"}), chunk(finish_reason="length")]))
    deltas = await collect(model)
    assert deltas == [TextDelta("a"), Finish(Usage(), "length", 128_000)]


async def test_connection_is_reused_after_a_consumer_stops_early(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(text_stream([str(i) for i in range(50)]), text_stream(["second"]))
    async with model.stream(HELLO, ()) as deltas:
        async for d in deltas:
            assert d == TextDelta("0")
            break
    deltas2 = await collect(model)
    assert deltas2[0] == TextDelta("second")
    assert len(fake.requests) == 2


# ---------------------------------------------------------------------------
# HTTP status errors


async def open_error(model: OpenAIChatModel) -> ModelError:
    with pytest.raises(ModelError) as info:
        await collect(model)
    return info.value


async def test_429_is_retryable_rate_limit_with_retry_after_seconds(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(error_reply(429, "Rate limit reached", err_type="requests", retry_after="3"))
    err = await open_error(model)
    assert (err.retryable, err.kind, err.status_code, err.retry_after) == (
        True,
        "rate_limit",
        429,
        3.0,
    )
    assert err.provider == "openai"
    assert "Rate limit reached" in str(err)


async def test_retry_after_http_date(fake: FakeOpenAI, model: OpenAIChatModel) -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    fake.enqueue(error_reply(503, "busy", retry_after=format_datetime(when, usegmt=True)))
    err = await open_error(model)
    assert (err.retryable, err.kind, err.status_code) == (True, "server_error", 503)
    assert err.retry_after is not None
    assert 60 < err.retry_after <= 120


async def test_retry_after_ms_wins(fake: FakeOpenAI, model: OpenAIChatModel) -> None:
    reply = error_reply(529, "overloaded", retry_after="30")
    reply.headers.append(("retry-after-ms", "1500"))
    fake.enqueue(reply)
    err = await open_error(model)
    assert (err.retryable, err.kind, err.retry_after) == (True, "overloaded", 1.5)


@pytest.mark.parametrize(
    ("status", "kind"),
    [(408, "timeout"), (500, "server_error"), (502, "server_error"), (504, "server_error")],
)
async def test_retryable_statuses(
    fake: FakeOpenAI, model: OpenAIChatModel, status: int, kind: str
) -> None:
    fake.enqueue(error_reply(status, "upstream trouble", err_type="server_error"))
    err = await open_error(model)
    assert (err.retryable, err.kind, err.status_code, err.retry_after) == (
        True,
        kind,
        status,
        None,
    )


@pytest.mark.parametrize(
    ("status", "kind", "message"),
    [
        (400, "bad_request", "Invalid value for 'messages'"),
        (401, "auth", "Incorrect API key provided"),
        (403, "permission", "Country not supported"),
        (404, "not_found", "The model `gpt-test` does not exist"),
        (422, "bad_request", "Unprocessable"),
        (418, "client_error", "I am a teapot"),
        (501, "not_implemented", "Not implemented"),
    ],
)
async def test_non_retryable_statuses_carry_the_provider_message(
    fake: FakeOpenAI, model: OpenAIChatModel, status: int, kind: str, message: str
) -> None:
    fake.enqueue(error_reply(status, message))
    err = await open_error(model)
    assert (err.retryable, err.kind, err.status_code) == (False, kind, status)
    assert message in err.message
    assert fake.pending == 0


async def test_context_length_error_gets_its_own_kind(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    reply = error_reply(400, "This model's maximum context length is 128000 tokens")
    assert isinstance(reply.body, dict)
    reply.body["error"]["code"] = "context_length_exceeded"
    fake.enqueue(reply)
    err = await open_error(model)
    assert (err.retryable, err.kind) == (False, CONTEXT_LENGTH)


async def test_html_error_page_becomes_a_short_readable_message(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    page = (
        "<html><head><title>501 Not Implemented</title><style>body{color:red}</style></head>"
        "<body><h1>Not Implemented</h1>" + "<p>padding</p>" * 2000 + "</body></html>"
    )
    fake.enqueue(Reply(status=501, body=page), Reply(status=502, body="<html>Bad Gateway</html>"))
    err = await open_error(model)
    assert (err.retryable, err.kind, err.status_code) == (False, "not_implemented", 501)
    assert err.message == "HTTP 501 not implemented: 501 Not Implemented"
    err = await open_error(model)
    assert (err.retryable, err.kind) == (True, "server_error")
    assert err.message == "HTTP 502 server error: Bad Gateway"


# ---------------------------------------------------------------------------
# transport failures and broken streams


async def test_stream_cut_midway_is_retryable_after_partial_deltas(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(Reply(events=text_stream(["a", "b", "c"]).events, cut_after=3))
    got: list[Delta] = []
    with pytest.raises(ModelError) as info:
        await collect(model, into=got)
    assert got == [TextDelta("a"), TextDelta("b")]
    assert (info.value.retryable, info.value.kind) == (True, "stream_cut")
    assert not finishes(got)


async def test_body_ending_cleanly_before_finish_is_a_stream_cut(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(Reply(events=[chunk({"content": "a"})]))
    got: list[Delta] = []
    with pytest.raises(ModelError) as info:
        await collect(model, into=got)
    assert got == [TextDelta("a")]
    assert (info.value.retryable, info.value.kind) == (True, "stream_cut")


async def test_tool_call_cut_before_finish_emits_no_done(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    tc = {"index": 0, "id": "c", "type": "function", "function": {"name": "ls", "arguments": "{"}}
    fake.enqueue(Reply(events=[chunk({"tool_calls": [tc]}), chunk({"content": "x"})], cut_after=1))
    got: list[Delta] = []
    with pytest.raises(ModelError) as info:
        await collect(model, into=got)
    assert got == [ToolCallDelta(0, "c", "ls", "{")]
    assert info.value.kind == "stream_cut"


async def test_malformed_chunk_is_not_retryable(fake: FakeOpenAI, model: OpenAIChatModel) -> None:
    fake.enqueue(Reply(events=[chunk({"content": "ok"}), "{not json", chunk({"content": "x"})]))
    got: list[Delta] = []
    with pytest.raises(ModelError) as info:
        await collect(model, into=got)
    assert got == [TextDelta("ok")]
    assert (info.value.retryable, info.value.kind) == (False, "malformed_response")


async def test_chunk_of_the_wrong_shape_is_malformed(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(Reply(events=[{"choices": "nope"}, "[DONE]"]))
    err = await open_error(model)
    assert (err.retryable, err.kind) == (False, "malformed_response")


async def test_json_body_instead_of_an_event_stream_is_malformed(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(completion_reply("not streamed"))
    err = await open_error(model)
    assert (err.retryable, err.kind) == (False, "malformed_response")


async def test_error_event_inside_the_stream_is_retryable(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(
        Reply(
            events=[
                chunk({"content": "a"}),
                {"error": {"message": "The server had an error", "type": "server_error"}},
            ]
        )
    )
    got: list[Delta] = []
    with pytest.raises(ModelError) as info:
        await collect(model, into=got)
    assert got == [TextDelta("a")]
    assert (info.value.retryable, info.value.kind) == (True, "server_error")
    assert "The server had an error" in info.value.message


async def test_connect_error_is_retryable_unreachable() -> None:
    async with OpenAIChatModel(f"http://127.0.0.1:{unused_port()}/v1", "k", "m") as m:
        with pytest.raises(ModelError) as info:
            await collect(m)
    # Its own kind: the retry policy gives a server nobody reached a short budget.
    assert (info.value.retryable, info.value.kind, info.value.status_code) == (
        True,
        UNREACHABLE,
        None,
    )


async def test_reset_before_response_is_retryable_connection(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(Reply(reset=True))
    err = await open_error(model)
    assert (err.retryable, err.kind) == (True, "connection")
    assert len(fake.requests) == 1


async def test_read_timeout_is_retryable_timeout(fake: FakeOpenAI) -> None:
    fake.enqueue(Reply(stall=True))
    async with OpenAIChatModel(fake.base_url, "k", "m", timeout=0.2) as m:
        with pytest.raises(ModelError) as info:
            await collect(m)
    assert (info.value.retryable, info.value.kind) == (True, "timeout")


async def test_cancelling_a_stream_raises_cancelled_not_model_error(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(Reply(events=[chunk({"content": "a"}), chunk({"content": "b"})], stall_after=1))
    fake.enqueue(text_stream(["next"]))
    got: list[Delta] = []
    with trio.CancelScope() as scope:
        async with model.stream(HELLO, ()) as deltas:
            async for d in deltas:
                got.append(d)
                scope.cancel()
    assert scope.cancelled_caught
    assert got == [TextDelta("a")]
    # The interrupted response was released: the next step works.
    assert (await collect(model))[0] == TextDelta("next")


# ---------------------------------------------------------------------------
# generate()


async def test_generate_returns_text_and_usage(fake: FakeOpenAI, model: OpenAIChatModel) -> None:
    fake.enqueue(completion_reply("A summary.", prompt=300, completion=12))
    result = await model.generate(HELLO)
    assert result.text == "A summary."
    assert result.usage == Usage(input_tokens=300, output_tokens=12, total_tokens=312)
    body = fake.requests[0].body
    assert body["stream"] is False
    assert "tools" not in body
    assert "stream_options" not in body
    assert body["messages"] == [{"role": "user", "content": "hi"}]


async def test_generate_classifies_errors(fake: FakeOpenAI, model: OpenAIChatModel) -> None:
    fake.enqueue(
        error_reply(429, "slow down", retry_after="7"),
        error_reply(401, "bad key"),
        Reply(body={"choices": []}),
    )
    with pytest.raises(ModelError) as info:
        await model.generate(HELLO)
    assert (info.value.retryable, info.value.kind, info.value.retry_after) == (
        True,
        "rate_limit",
        7.0,
    )
    with pytest.raises(ModelError) as info:
        await model.generate(HELLO)
    assert (info.value.retryable, info.value.kind) == (False, "auth")
    assert "bad key" in info.value.message
    with pytest.raises(ModelError) as info:
        await model.generate(HELLO)
    assert (info.value.retryable, info.value.kind) == (False, "malformed_response")


# ---------------------------------------------------------------------------
# request options (issue 17: nothing but model, messages, stream and tools was sent)

ALL_OPTIONS = RequestOptions(
    temperature=0.2,
    top_p=0.9,
    max_tokens=512,
    max_completion_tokens=1024,
    stop=("END", "STOP"),
    seed=7,
    tool_choice="required",
    parallel_tool_calls=False,
    reasoning_effort="high",
    response_format={"type": "json_object"},
    user="user-42",
    extra_headers={"x-trace": "abc", "openai-organization": "org-1"},
    extra_body={"logit_bias": {"50256": -100}, "top_k": 20},
)


async def test_every_request_option_reaches_the_body_unchanged(fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream(["ok"]), completion_reply("summary"))
    async with OpenAIChatModel(fake.base_url, "k", "m", options=ALL_OPTIONS) as model:
        await collect(model, tools=[ToolSpec("ls", "", {"type": "object"})])
        await model.generate(HELLO)
    step, summary = fake.requests
    body = step.body
    assert {k: body[k] for k in body if k not in ("messages", "tools")} == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 512,
        "max_completion_tokens": 1024,
        "stop": ["END", "STOP"],
        "seed": 7,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "reasoning_effort": "high",
        "response_format": {"type": "json_object"},
        "user": "user-42",
        "logit_bias": {"50256": -100},
        "top_k": 20,
    }
    assert (step.headers["x-trace"], step.headers["openai-organization"]) == ("abc", "org-1")
    # A summary takes the sampling options but neither tool options nor the response format.
    assert "tool_choice" not in summary.body and "parallel_tool_calls" not in summary.body
    assert "response_format" not in summary.body and "stream_options" not in summary.body
    assert (summary.body["temperature"], summary.body["top_k"]) == (0.2, 20)
    assert summary.headers["x-trace"] == "abc"


async def test_unset_options_are_not_sent_and_tool_options_need_tools(fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream(["ok"]))
    opts = RequestOptions(tool_choice="auto", parallel_tool_calls=True)
    async with OpenAIChatModel(fake.base_url, "k", "m", options=opts) as model:
        await collect(model)
    assert set(fake.requests[0].body) == {"model", "messages", "stream", "stream_options"}


async def test_with_options_overrides_per_copy_and_shares_the_client(fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream(["a"]), text_stream(["b"]))
    base_opts = RequestOptions(temperature=0.5, extra_headers={"x-a": "1"}, extra_body={"k": 1})
    async with OpenAIChatModel(fake.base_url, "k", "m", options=base_opts) as model:
        cold = model.with_options(
            RequestOptions(temperature=0.0, extra_headers={"x-b": "2"}, extra_body={"j": 2})
        )
        assert isinstance(cold, Model)
        await collect(cold)
        await collect(model)
    first, second = fake.requests
    assert (first.body["temperature"], first.body["k"], first.body["j"]) == (0.0, 1, 2)
    assert (first.headers["x-a"], first.headers["x-b"]) == ("1", "2")
    assert second.body["temperature"] == 0.5 and "j" not in second.body
    assert "x-b" not in second.headers


async def test_stream_options_are_dropped_for_good_when_the_server_refuses_them(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(
        error_reply(400, "Unrecognized request argument supplied: stream_options"),
        text_stream(["ok"]),
        text_stream(["again"]),
    )
    deltas = await collect(model)
    assert deltas[0] == TextDelta("ok")
    copy = model.with_options(RequestOptions(temperature=1.0))
    await collect(copy)
    assert ["stream_options" in r.body for r in fake.requests] == [True, False, False]


async def test_include_usage_false_never_sends_stream_options(fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream(["ok"]))
    opts = RequestOptions(include_usage=False)
    async with OpenAIChatModel(fake.base_url, "k", "m", options=opts) as model:
        await collect(model)
    assert "stream_options" not in fake.requests[0].body


async def test_a_400_about_something_else_is_not_resent(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(error_reply(400, "Invalid value for 'messages'"), text_stream(["never"]))
    err = await open_error(model)
    assert err.kind == "bad_request"
    assert len(fake.requests) == 1


# ---------------------------------------------------------------------------
# the error table on the wire


async def test_insufficient_quota_429_is_final_not_a_rate_limit(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(
        Reply(
            status=429,
            body={
                "error": {
                    "message": "You exceeded your current quota, please check your plan.",
                    "type": "insufficient_quota",
                    "param": None,
                    "code": "insufficient_quota",
                }
            },
        )
    )
    err = await open_error(model)
    assert (err.retryable, err.kind, err.status_code) == (False, "quota", 429)
    assert err.message == (
        "HTTP 429 quota or credits exhausted: "
        "You exceeded your current quota, please check your plan. [insufficient_quota]"
    )


async def test_top_level_message_and_code_bodies_are_read(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    # Mistral's (and vLLM's) shape: message and code at the top level.
    fake.enqueue(
        Reply(
            status=401,
            body={
                "object": "error",
                "message": "Unauthorized",
                "type": "unauthorized",
                "param": None,
                "code": None,
            },
        ),
        Reply(
            status=400,
            body={
                "object": "error",
                "message": "Prompt contains 40000 tokens, too large",
                "type": "invalid_request_error",
                "param": None,
                "code": "context_length_exceeded",
            },
        ),
    )
    err = await open_error(model)
    assert (err.kind, err.message) == ("auth", "HTTP 401 authentication failed: Unauthorized")
    err = await open_error(model)
    assert (err.retryable, err.kind) == (False, CONTEXT_LENGTH)
    assert "{" not in err.message


@pytest.mark.parametrize(
    ("error", "kind", "retryable"),
    [
        ({"message": "too long", "code": "context_length_exceeded"}, CONTEXT_LENGTH, False),
        ({"message": "no money", "type": "insufficient_quota"}, "quota", False),
        ({"message": "bad tools", "type": "invalid_request_error"}, "bad_request", False),
        ({"message": "slow down", "type": "rate_limit_exceeded"}, "rate_limit", True),
        ({"message": "The server had an error", "type": "server_error"}, "server_error", True),
        ({"message": "something odd"}, "server_error", True),
    ],
)
async def test_an_error_inside_the_stream_is_classified_by_its_code(
    fake: FakeOpenAI, model: OpenAIChatModel, error: JSONDict, kind: str, retryable: bool
) -> None:
    fake.enqueue(Reply(events=[chunk({"content": "a"}), {"error": error}]))
    got: list[Delta] = []
    with pytest.raises(ModelError) as info:
        await collect(model, into=got)
    assert got == [TextDelta("a")]
    assert (info.value.kind, info.value.retryable) == (kind, retryable)
    assert error["message"] in info.value.message


async def test_an_sse_error_event_with_a_top_level_message_is_an_error(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(
        Reply(raw=[b'event: error\ndata: {"object": "error", "message": "prompt is too long"}\n\n'])
    )
    err = await open_error(model)
    assert (err.kind, err.retryable) == (CONTEXT_LENGTH, False)


# ---------------------------------------------------------------------------
# complete answers, reasoning, usage


async def test_a_cut_after_the_finish_reason_keeps_the_complete_answer(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    events: list[JSONDict | str] = [
        chunk({"content": "the whole answer"}),
        chunk(finish_reason="stop"),
        usage_chunk(10, 3),
        "[DONE]",
    ]
    fake.enqueue(Reply(events=events, cut_after=2), text_stream(["generated twice"]))
    deltas = await collect(model)
    assert deltas == [TextDelta("the whole answer"), Finish(Usage(), "stop", 128_000)]
    assert fake.pending == 1


async def test_a_cut_after_a_tool_call_finish_keeps_the_calls(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    tc = {"index": 0, "id": "c", "type": "function", "function": {"name": "ls", "arguments": "{}"}}
    events: list[JSONDict | str] = [chunk({"tool_calls": [tc]}), chunk(finish_reason="tool_calls")]
    fake.enqueue(Reply(events=[*events, usage_chunk(1, 1)], cut_after=2))
    deltas = await collect(model)
    assert deltas[-2:] == [ToolCallDone(0, "c", "ls", "{}"), Finish(Usage(), "tool_calls", 128_000)]


async def test_reasoning_sent_under_both_names_is_yielded_once(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(
        Reply(
            events=[
                chunk({"reasoning_content": "think", "reasoning": "think"}),
                chunk({"reasoning": "more"}),
                chunk({"content": "answer"}),
                chunk(finish_reason="stop"),
                "[DONE]",
            ]
        )
    )
    deltas = await collect(model)
    assert deltas[:-1] == [ReasoningDelta("think"), ReasoningDelta("more"), TextDelta("answer")]


async def test_usage_keeps_reasoning_and_cached_tokens(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    usage = usage_chunk(1000, 300, cached=600)
    usage["usage"]["completion_tokens_details"] = {"reasoning_tokens": 250}
    fake.enqueue(
        Reply(events=[chunk({"content": "x"}), chunk(finish_reason="stop"), usage, "[DONE]"])
    )
    finish = (await collect(model))[-1]
    assert finish == Finish(
        Usage(
            input_tokens=400,
            output_tokens=300,
            cache_read_tokens=600,
            total_tokens=1300,
            reasoning_tokens=250,
        ),
        "stop",
        128_000,
    )
    assert finish.usage.context_tokens() == 1000


# ---------------------------------------------------------------------------
# hostile and broken bodies (issue 15: RecursionError escaped the adapter)


@pytest.mark.parametrize(
    "payload",
    [
        "[" * 100_000,
        '{"choices": ' + "[" * 100_000,
        '{"choices": [{"delta": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}]}",
        '{"choices": [{"delta": {"tool_calls": [{"index": true}]}}]}',
        '{"choices": [{"delta": {"tool_calls": "x"}}]}',
        '{"choices": [7]}',
        '"just a string"',
        "null",
    ],
)
async def test_every_malformed_chunk_is_the_adapters_own_error(
    fake: FakeOpenAI, model: OpenAIChatModel, payload: str
) -> None:
    fake.enqueue(Reply(events=[chunk({"content": "ok"}), payload, chunk({"content": "x"})]))
    got: list[Delta] = []
    with pytest.raises(ModelError) as info:
        await collect(model, into=got)
    assert got == [TextDelta("ok")]
    assert (info.value.retryable, info.value.kind) == (False, "malformed_response")
    assert len(info.value.message) <= 2000


async def test_deeply_nested_bodies_outside_the_stream_are_own_errors_too(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(Reply(status=500, body="[" * 100_000), Reply(body="[" * 100_000))
    err = await open_error(model)
    assert (err.kind, err.status_code) == ("server_error", 500)
    assert len(err.message) < 400
    with pytest.raises(ModelError) as info:
        await model.generate(HELLO)
    assert info.value.kind == "malformed_response"


async def test_a_runaway_sse_line_is_refused(fake: FakeOpenAI) -> None:
    fake.enqueue(Reply(raw=[b"data: " + b"x" * 4096] * 8))
    config = ModelHTTPConfig(max_sse_line_chars=10_000)
    async with OpenAIChatModel(fake.base_url, "k", "m", config=config) as model:
        with pytest.raises(ModelError) as info:
            await collect(model)
    assert info.value.kind == "malformed_response"
    assert "longer than 10000" in info.value.message


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
async def test_events_do_not_depend_on_how_the_bytes_are_split(
    fake: FakeOpenAI, model: OpenAIChatModel, newline: bytes
) -> None:
    """Line endings of every SSE flavour, a comment, an event field and multi-byte
    characters, sent one byte per write: the same deltas as in one piece."""
    events = [
        json.dumps(chunk({"content": "héllo ✓"}), ensure_ascii=False),
        json.dumps(chunk({"content": " wörld"}), ensure_ascii=False),
        json.dumps(chunk(finish_reason="stop")),
        "[DONE]",
    ]
    body = b": keep-alive" + newline + newline
    body += b"".join(
        b"event: message" + newline + b"data: " + e.encode() + newline + newline for e in events
    )
    fake.enqueue(Reply(raw=[body]), Reply(raw=[body[i : i + 1] for i in range(len(body))]))
    whole = await collect(model)
    split = await collect(model)
    assert (
        whole
        == split
        == [
            TextDelta("héllo ✓"),
            TextDelta(" wörld"),
            Finish(Usage(), "stop", 128_000),
        ]
    )


async def test_a_mid_stream_error_mentioning_stream_options_is_not_resent(
    fake: FakeOpenAI, model: OpenAIChatModel
) -> None:
    fake.enqueue(
        Reply(
            events=[
                chunk({"content": "a"}),
                {"error": {"message": "bad stream_options", "type": "invalid_request_error"}},
            ]
        ),
        text_stream(["never"]),
    )
    got: list[Delta] = []
    with pytest.raises(ModelError) as info:
        await collect(model, into=got)
    assert (info.value.kind, got) == ("bad_request", [TextDelta("a")])
    assert len(fake.requests) == 1
