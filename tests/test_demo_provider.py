"""`chatd-trio demo --provider`: one chat with a real adapter through a real Server, a
workspace on a real local agent, against the local wire servers of tests/fake_openai.py
and tests/fake_anthropic.py (the real clock)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import pytest
import trio

from chatd_trio.apps import cli
from chatd_trio.apps.demo_provider import DEFAULT_PROMPT, ProviderDemoOptions, run_provider_demo
from chatd_trio.config import RequestOptions
from tests.fake_anthropic import FakeAnthropic, Text, ToolUse, message_reply
from tests.fake_openai import FakeOpenAI, JSONDict, Reply, chunk, error_reply, text_stream


@pytest.fixture
async def openai(nursery: trio.Nursery) -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await nursery.start(server.serve)
    yield server
    server.close()


@pytest.fixture
async def anthropic(nursery: trio.Nursery) -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic()
    await nursery.start(server.serve)
    yield server
    server.close()


def tool_call_stream(call_id: str, name: str, arguments: JSONDict) -> Reply:
    text = json.dumps(arguments)
    first: JSONDict = {
        "index": 0,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": text[:5]},
    }
    rest: JSONDict = {"index": 0, "function": {"arguments": text[5:]}}
    return Reply(
        events=[
            chunk({"role": "assistant", "content": None}),
            chunk({"tool_calls": [first]}),
            chunk({"tool_calls": [rest]}),
            chunk(finish_reason="tool_calls"),
            "[DONE]",
        ]
    )


async def test_an_openai_compatible_server_runs_a_chat_with_workspace_tools(
    openai: FakeOpenAI,
) -> None:
    openai.enqueue(
        tool_call_stream("call_1", "write_file", {"path": "hello.txt", "content": "hi"}),
        tool_call_stream("call_2", "read_file", {"path": "hello.txt"}),
        text_stream(["I wrote ", "hello.txt and read it back."]),
    )
    out = io.StringIO()
    options = ProviderDemoOptions(
        "openai",
        "local-model",
        "",
        base_url=openai.base_url,
        options=RequestOptions(temperature=0.1),
    )

    status = await run_provider_demo(options, out)

    text = out.getvalue()
    assert status == 0, text
    assert "provider openai, model local-model at http://127.0.0.1:" in text
    assert f"user: {DEFAULT_PROMPT}" in text
    assert "  -> write_file(" in text
    assert "  <- read_file: " in text and "'content': 'hi'" in text
    assert "model: I wrote hello.txt and read it back." in text
    assert "[waiting]" in text and "done: 3 steps, 0 retries" in text
    first = openai.requests[0]
    assert first.body["temperature"] == 0.1
    assert "authorization" not in first.headers
    assert {t["function"]["name"] for t in first.body["tools"]} >= {
        "execute",
        "read_file",
        "write_file",
        "list_dir",
    }


async def test_anthropic_with_a_follow_up_prompt(anthropic: FakeAnthropic) -> None:
    anthropic.enqueue(
        message_reply([ToolUse("toolu_1", "list_dir", {})], stop_reason="tool_use"),
        message_reply([Text("The workspace is empty.")]),
        message_reply([Text("Still empty.")]),
    )
    out = io.StringIO()
    options = ProviderDemoOptions(
        "anthropic",
        "claude-test",
        "sk-ant-test",
        base_url=anthropic.base_url,
        prompts=("What is in the workspace?", "And now?"),
    )

    status = await run_provider_demo(options, out)

    text = out.getvalue()
    assert status == 0, text
    assert anthropic.refusals == []
    assert text.index("model: The workspace is empty.") < text.index("user: And now?")
    assert text.index("user: And now?") < text.index("model: Still empty.")
    last = anthropic.requests[-1].body["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "user"]


async def test_a_failing_turn_ends_the_demo_with_the_chats_error(openai: FakeOpenAI) -> None:
    openai.enqueue(error_reply(401, "Incorrect API key provided", err_type="invalid_api_key"))
    out = io.StringIO()
    options = ProviderDemoOptions("openai", "gpt-test", "sk-wrong", base_url=openai.base_url)

    status = await run_provider_demo(options, out)

    assert status == 1
    assert (
        "the turn ended in error: HTTP 401 authentication failed: Incorrect API key provided"
        in out.getvalue()
    )


def test_cli_needs_the_api_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("MY_KEY", raising=False)
    assert cli.main(["demo", "--provider", "anthropic"]) == 2
    assert "set ANTHROPIC_API_KEY to the API key" in capsys.readouterr().err
    assert cli.main(["demo", "--provider", "openai", "--api-key-env", "MY_KEY"]) == 2
    assert "set MY_KEY" in capsys.readouterr().err


def test_cli_provider_mode_runs_in_memory_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--provider", "openai", "--dsn", "postgresql://x"]) == 2
    assert "no --dsn or --replicas" in capsys.readouterr().err
