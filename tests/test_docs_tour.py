"""The documentation's examples run as shown.

docs/examples/tour.py (quoted verbatim in docs/index.md) runs one chat in memory;
docs/examples/conversation.py (docs/guides/conversations.md) drives a chat through
queue, interrupt, edit, a failure and a retry; docs/examples/health.py
(docs/guides/production.md) answers health checks; docs/examples/replica.py (quoted in
docs/operating.md) serves chats from PostgreSQL, here as two replicas on the session's
test database.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

from chatd_trio.domain import Chat, ChatStatus, Role, StatusEvent, text_of
from chatd_trio.errors import StoreUnavailable
from chatd_trio.models.base import PromptMessage
from chatd_trio.models.scripted import ScriptedModel, ScriptStep, text_step
from chatd_trio.server import Server
from chatd_trio.store.memory import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
TOUR = EXAMPLES / "tour.py"
REPLICA = EXAMPLES / "replica.py"
CONVERSATION = EXAMPLES / "conversation.py"
HEALTH = EXAMPLES / "health.py"
INDEX = ROOT / "docs" / "index.md"
OPERATING = ROOT / "docs" / "operating.md"
GUIDES = ROOT / "docs" / "guides"

EXPECTED = [
    "user: What is 2 + 3?",
    'assistant: calls add({"a": 2, "b": 3})',
    "tool: add returned {'sum': 5}",
    "assistant: 2 + 3 = 5",
    "user: Thanks!",
    "assistant: You're welcome.",
    "status: waiting, steps: 3, model calls: 3",
]


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_tour_runs_one_chat_to_completion() -> None:
    lines = await _load(TOUR).main()
    assert lines == EXPECTED


def test_tour_runs_as_a_script() -> None:
    done = subprocess.run(
        [sys.executable, str(TOUR)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == EXPECTED


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text("utf-8"), flags=re.DOTALL)


def test_pages_quote_the_examples_verbatim() -> None:
    """The pages show the tested files, not drifting copies."""
    assert TOUR.read_text("utf-8") in _python_blocks(INDEX)
    assert REPLICA.read_text("utf-8") in _python_blocks(OPERATING)
    assert CONVERSATION.read_text("utf-8") in _python_blocks(GUIDES / "conversations.md")
    assert HEALTH.read_text("utf-8") in _python_blocks(GUIDES / "production.md")


def _text_blocks(page: Path) -> list[str]:
    return re.findall(r"```text\n(.*?)```", page.read_text("utf-8"), flags=re.DOTALL)


CONVERSATION_OUTPUT = [
    "answer: re: hello",
    "status: waiting",
    "caught up; live from here",
    "status: pending",
    "status: running",
    "streaming: Let me think",
    "queued: ['and then?']",
    "user: hang on",
    "assistant: Let me think",
    "user: and then?",
    "assistant: re: and then?",
    "after the edit: ['hello again', 're: hello again']",
    "error: bad_request: no",
    "retried after rate_limit (429)",
    "waiting: re: busy day",
]


async def test_the_conversation_example_prints_what_its_guide_shows() -> None:
    lines = await _load(CONVERSATION).main()
    assert lines == CONVERSATION_OUTPUT
    shown = "\n".join(CONVERSATION_OUTPUT) + "\n"
    assert shown in _text_blocks(GUIDES / "conversations.md")
    assert "\n".join(EXPECTED) + "\n" in _text_blocks(INDEX)


async def _get(port: int, path: str) -> tuple[str, dict[str, Any]]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        response = b""
        while chunk := await stream.receive_some(4096):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


class UnreachableStore(MemoryStore):
    async def list_chats(self, owner_id: uuid.UUID) -> list[Chat]:
        raise StoreUnavailable("database unreachable")


async def test_the_health_example_answers_liveness_and_readiness() -> None:
    serve_health = _load(HEALTH).serve_health
    for store, ready in (
        (MemoryStore(), "200 OK"),
        (UnreachableStore(), "503 Service Unavailable"),
    ):
        async with Server(store, None, ScriptedModel([])) as server, trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_health, server, 0)
            port = listeners[0].socket.getsockname()[1]
            with trio.fail_after(30):
                assert (await _get(port, "/live"))[0] == "HTTP/1.1 200 OK"
                status, body = await _get(port, "/ready")
                assert (await _get(port, "/nope"))[0] == "HTTP/1.1 404 Not Found"
            assert status == f"HTTP/1.1 {ready}"
            assert body["worker_id"] == str(server.worker_id) and body["running"] == 0
            nursery.cancel_scope.cancel()


def _answer(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
    return text_step(f"answer {index}")


@pytest.mark.postgres
async def test_replica_example_serves_chats_from_two_replicas(pg_dsn: str) -> None:
    run_replica = _load(REPLICA).run_replica
    owner = uuid.uuid4()
    async with trio.open_nursery() as nursery:
        first: Server = await nursery.start(run_replica, pg_dsn, ScriptedModel(_answer))
        second: Server = await nursery.start(run_replica, pg_dsn, ScriptedModel(_answer))
        assert first.worker_id != second.worker_id
        chats = [await first.create_chat(owner, f"question {i}") for i in range(4)]
        for chat in chats:
            # Subscribed through the other replica: its events cross via LISTEN/NOTIFY.
            async with second.subscribe(owner, chat.id) as events:
                with trio.fail_after(30):
                    async for event in events:
                        if isinstance(event, StatusEvent) and event.status is ChatStatus.WAITING:
                            break
            history = await second.messages(owner, chat.id)
            assert [m.role for m in history] == [Role.USER, Role.ASSISTANT]
            assert text_of(history[-1].parts).startswith("answer ")
        # Cancelling the replicas is their graceful shutdown: it returns, nothing leaks.
        nursery.cancel_scope.cancel()
    turns = first.stats().turns_started + second.stats().turns_started
    assert turns >= len(chats)
