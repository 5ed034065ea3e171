"""A replica killed with SIGKILL mid-turn; the surviving replica finishes the chat.

The victim runs in a subprocess (`python -m tests.server_replica`): its model asks
for one tool call, and the next step hangs mid-stream. Once that first step is
persisted (seen as a durable `message` event through LISTEN/NOTIFY), a second chat
is answered by the victim, and the process is killed as soon as that final answer is
seen. With a 0.5 s heartbeat and `stale_after` 2 s, the survivor's periodic stale
recovery hands the running chat back, acquires it and completes it: no user message
lost (a message queued while the victim ran is promoted and answered), no assistant
message persisted twice, and no user message answered twice (the answered chat's
answer landed with its final transition: nothing is left to recover there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
import trio

from chatd_trio.domain import ChatStatus, Message, MessageEvent, Role, TextPart, text_of
from chatd_trio.pubsub.postgres import PostgresPubSub
from chatd_trio.server import Server
from chatd_trio.store.postgres import PostgresStore
from chatd_trio.streams import ChatStreams
from tests.pgcluster import truncate_all
from tests.server_replica import CRASH_CONFIG, ObservedStore, answering_model, registry

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parent.parent
# Starting a Python process that opens two pools can be slow on a loaded machine.
START_DEADLINE = 60.0
STEP_DEADLINE = 30.0


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            raise AssertionError(f"replica exited before it was ready: {data!r}")
        data += chunk
    return data


async def _until_message(streams: ChatStreams, after: Message, role: Role) -> None:
    """Wait until a message of `role` follows `after` in its chat (a durable notify)."""
    async with streams.subscribe(after.chat_id, after.id) as sub:
        with trio.fail_after(STEP_DEADLINE):
            async for event in sub:
                if isinstance(event, MessageEvent) and event.message.role is role:
                    return


async def test_sigkilled_replica_mid_turn_is_recovered_by_the_survivor(pg_dsn: str) -> None:
    await trio.to_thread.run_sync(truncate_all, pg_dsn)
    victim = uuid.uuid4()
    owner = uuid.uuid4()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with PostgresStore.open(pg_dsn) as pg, PostgresPubSub.open(pg_dsn) as pubsub:
        store = ObservedStore(pg)
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.server_replica", pg_dsn, str(victim)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            with trio.fail_after(START_DEADLINE):
                assert await _read_line(proc.stdout) == b"ready\n"
            streams = ChatStreams(store, pubsub)  # type: ignore[arg-type]
            chat, first = await store.create_chat(owner, "t", (TextPart("start"),))
            # The victim acquires by its 0.2 s poll, runs the tool step and persists it.
            await _until_message(streams, first, Role.TOOL)
            running = await store.get_chat(chat.id)
            assert running.status is ChatStatus.RUNNING and running.worker_id == victim
            queued = await store.send_message(chat.id, (TextPart("follow up"),), max_queued=20)
            assert queued.queued is not None
            quick, asked = await store.create_chat(owner, "q", (TextPart("quick one"),))
            await _until_message(streams, asked, Role.ASSISTANT)
            proc.kill()  # SIGKILL: no shutdown, no final transition, no release.
            with trio.fail_after(STEP_DEADLINE):
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
        assert proc.returncode == -9
        killed = await store.get_chat(chat.id)
        assert killed.status is ChatStatus.RUNNING and killed.worker_id == victim

        async with Server(
            store, pubsub, answering_model(), CRASH_CONFIG, tools=registry()
        ) as survivor:
            # Turn 1 completes the interrupted history; the queued message is promoted.
            fin = await store.wait_finished(chat.id)
            assert fin.promoted is not None and text_of(fin.promoted.parts) == "follow up"
            fin = await store.wait_finished(chat.id, 2)
            assert fin.chat.status is ChatStatus.WAITING
            assert survivor.stats().stale_recovered == 1
            assert survivor.stats().turns_finished == {"done": 2}
        # The victim's answer was stored with its final transition: the chat is waiting
        # and the survivor never ran it.
        answered = await store.get_chat(quick.id)
        assert answered.status is ChatStatus.WAITING and answered.worker_id is None
        assert store.finishes(quick.id) == []

    messages = await _messages(pg_dsn, chat.id)
    assert [(role, text) for role, text, _ in messages] == [
        ("user", "start"),
        ("assistant", ""),  # the victim's tool call
        ("tool", ""),
        ("assistant", "done"),
        ("user", "follow up"),
        ("assistant", "re: follow up"),
    ]
    # Nothing persisted twice: every tool call id appears once.
    calls = Counter(call for _, _, call in messages if call)
    assert calls and all(n == 2 for n in calls.values())  # the call and its result
    quick_messages = await _messages(pg_dsn, quick.id)
    assert [(role, text) for role, text, _ in quick_messages] == [
        ("user", "quick one"),
        ("assistant", "re: quick one"),
    ]
    # Every user message has at most one final answer (here: exactly one).
    for history in (messages, quick_messages):
        assert all(n == 1 for n in _final_answers(history).values())


def _final_answers(messages: list[tuple[str, str, str]]) -> dict[int, int]:
    """For each user message (by position), how many final answers follow it before the
    next user message: assistant messages that call no tool."""
    answers: dict[int, int] = {}
    current: int | None = None
    for index, (role, _, call) in enumerate(messages):
        if role == "user":
            current = index
            answers[current] = 0
        elif role == "assistant" and not call and current is not None:
            answers[current] += 1
    return answers


async def _messages(dsn: str, chat_id: uuid.UUID) -> list[tuple[str, str, str]]:
    async with PostgresStore.open(dsn) as store:
        out = []
        for m in await store.messages_after(chat_id, 0):
            call = next((getattr(p, "call_id", "") for p in m.parts if hasattr(p, "call_id")), "")
            out.append((m.role.value, text_of(m.parts), call))
        return out
