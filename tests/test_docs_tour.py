"""The documentation's examples run as shown.

docs/examples/tour.py (quoted verbatim in docs/index.md) runs one chat in memory;
docs/examples/replica.py (quoted in docs/operating.md) serves chats from PostgreSQL,
here as two replicas on the session's test database.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest
import trio

from chatd_trio.domain import ChatStatus, Role, StatusEvent, text_of
from chatd_trio.models.base import PromptMessage
from chatd_trio.models.scripted import ScriptedModel, ScriptStep, text_step
from chatd_trio.server import Server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
TOUR = EXAMPLES / "tour.py"
REPLICA = EXAMPLES / "replica.py"
INDEX = ROOT / "docs" / "index.md"
OPERATING = ROOT / "docs" / "operating.md"

EXPECTED = [
    "user: What is 2 + 3?",
    'assistant: calls add({"a": 2, "b": 3})',
    "tool: add returned {'sum': 5}",
    "assistant: 2 + 3 = 5",
    "status: waiting, steps: 2, model calls: 2",
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
