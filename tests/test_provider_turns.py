"""Whole chat turns through `Server` against a real OpenAI-compatible wire server
(tests/fake_openai.py, on the loopback): what a user pointing chatd at a real provider
sees in the chat (its status, `last_error`, the retry events, the stored messages) when
credits run out, the base URL is wrong, or the prompt outgrows the model's context.

MemoryStore and MemoryPubSub; the real clock, except where retries must wait (then a
MockClock and a port nothing listens on, which refuses at once).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from chatd_trio.config import RequestOptions
from chatd_trio.domain import (
    ChatStatus,
    ErrorEvent,
    RetryEvent,
    Role,
    StreamEvent,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
from chatd_trio.models.classify import CONTEXT_LENGTH, UNREACHABLE
from chatd_trio.models.openai import OpenAIChatModel
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.server import Server
from chatd_trio.store.memory import MemoryStore
from tests.fake_openai import FakeOpenAI, Reply, completion_reply, text_stream, unused_port
from tests.server_replica import MEMORY_CONFIG, until_statuses


@pytest.fixture
async def fake(nursery: trio.Nursery) -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await nursery.start(server.serve)
    yield server
    server.close()


async def run_chat(
    model: OpenAIChatModel, final: ChatStatus
) -> tuple[MemoryStore, uuid.UUID, list[StreamEvent]]:
    """Create a chat, wait for running then `final`; the store, the chat and its events."""
    pubsub = MemoryPubSub()
    store = MemoryStore(pubsub=pubsub)
    owner = uuid.uuid4()
    async with Server(store, pubsub, model, MEMORY_CONFIG) as server:
        chat = await server.create_chat(owner, "hello", title="t")
        async with server.subscribe(owner, chat.id) as sub:
            events = await until_statuses(sub, [ChatStatus.RUNNING, final])
    return store, chat.id, events


async def test_exhausted_credits_end_the_chat_at_once_with_a_billing_error(
    fake: FakeOpenAI,
) -> None:
    """A 429 `insufficient_quota` is not a rate limit: one request, no retry, and the
    chat says why."""
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
    async with OpenAIChatModel(fake.base_url, "sk-test", "gpt-test") as model:
        store, chat_id, events = await run_chat(model, ChatStatus.ERROR)
    assert len(fake.requests) == 1
    assert not [e for e in events if isinstance(e, RetryEvent)]
    chat = await store.get_chat(chat_id)
    assert chat.last_error == (
        "HTTP 429 quota or credits exhausted: "
        "You exceeded your current quota, please check your plan. [insufficient_quota]"
    )
    (error,) = [e.error for e in events if isinstance(e, ErrorEvent)]
    assert (error.kind, error.retryable, error.status_code) == ("quota", False, 429)


async def test_a_wrong_base_url_fails_the_chat_within_a_minute_saying_retries_ran_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Nothing listens: each retry is published while the chat runs, and after about
    half a minute (virtual) the chat is in error with a `last_error` that says retries
    ran out, and why."""
    start = trio.current_time()
    url = f"http://127.0.0.1:{unused_port()}/v1"
    async with OpenAIChatModel(url, "sk-test", "gpt-test") as model:
        store, chat_id, events = await run_chat(model, ChatStatus.ERROR)
    retries = [e.retry for e in events if isinstance(e, RetryEvent)]
    assert [r.attempt for r in retries] == [1, 2, 3, 4, 5]
    assert {r.kind for r in retries} == {UNREACHABLE}
    assert trio.current_time() - start < 60
    chat = await store.get_chat(chat_id)
    assert chat.last_error is not None
    assert chat.last_error.startswith("gave up after 6 attempts over 31s: unreachable: ")


async def test_a_prompt_too_long_for_the_context_is_compacted_and_the_step_runs_again(
    fake: FakeOpenAI,
) -> None:
    fake.enqueue(
        Reply(
            status=400,
            body={
                "error": {
                    "message": "This model's maximum context length is 128000 tokens. "
                    "However, your messages resulted in 131072 tokens.",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
        ),
        completion_reply("The user said hello."),
        text_stream(["Hello again!"]),
    )
    async with OpenAIChatModel(fake.base_url, "sk-test", "gpt-test") as model:
        store, chat_id, events = await run_chat(model, ChatStatus.WAITING)
    (retry,) = [e.retry for e in events if isinstance(e, RetryEvent)]
    assert (retry.kind, retry.delay_s, retry.status_code) == (CONTEXT_LENGTH, 0.0, 400)
    chat = await store.get_chat(chat_id)
    assert (chat.status, chat.last_error) == (ChatStatus.WAITING, None)
    stored = await store.messages_after(chat_id, 0)
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.ASSISTANT]
    assert isinstance(stored[1].parts[0], ToolCallPart)
    assert stored[1].parts[0].name == "chat_summarized"
    report = stored[2].parts[0]
    assert isinstance(report, ToolResultPart) and isinstance(report.result, dict)
    assert (report.result["summary"], report.result["reason"]) == (
        "The user said hello.",
        CONTEXT_LENGTH,
    )
    assert stored[3].parts == (TextPart("Hello again!"),)
    # The step ran again on the summary alone.
    refused, summary, retried = (r.body for r in fake.requests)
    assert refused["messages"] == [{"role": "user", "content": "hello"}]
    assert summary["stream"] is False
    assert retried["messages"] == [
        {"role": "user", "content": "Summary of the conversation so far:\nThe user said hello."}
    ]


async def test_request_options_per_model_and_per_chat(fake: FakeOpenAI) -> None:
    """The model's options apply to every chat; a chat's own (`create_chat(model_options=
    ...)`, kept with the chat) override them field by field, in every request of its
    turns."""
    fake.enqueue(text_stream(["plain"]), text_stream(["tuned"]))
    pubsub = MemoryPubSub()
    store = MemoryStore(pubsub=pubsub)
    owner = uuid.uuid4()
    per_model = RequestOptions(temperature=0.7, max_tokens=100, extra_headers={"x-team": "a"})
    per_chat = RequestOptions(temperature=0.0, reasoning_effort="high", extra_body={"top_k": 5})
    async with (
        OpenAIChatModel(fake.base_url, "sk-test", "gpt-test", options=per_model) as model,
        Server(store, pubsub, model, MEMORY_CONFIG) as server,
    ):
        plain = await server.create_chat(owner, "hello", title="plain")
        async with server.subscribe(owner, plain.id) as sub:
            await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
        tuned = await server.create_chat(owner, "hello", title="tuned", model_options=per_chat)
        assert tuned.model_options == per_chat
        async with server.subscribe(owner, tuned.id) as sub:
            await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
    first, second = fake.requests
    assert (first.body["temperature"], first.body["max_tokens"]) == (0.7, 100)
    assert "reasoning_effort" not in first.body and "top_k" not in first.body
    assert (second.body["temperature"], second.body["max_tokens"]) == (0.0, 100)
    assert (second.body["reasoning_effort"], second.body["top_k"]) == ("high", 5)
    assert first.headers["x-team"] == second.headers["x-team"] == "a"
    assert (await store.get_chat(tuned.id)).model_options == per_chat
