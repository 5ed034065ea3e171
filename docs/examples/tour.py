"""A tour of chatd_trio: one replica, in memory, a scripted model and one tool.

Run it with `python docs/examples/tour.py`. tests/test_docs_tour.py runs it too,
so this file (and the copy in docs/index.md) cannot rot.
"""

from __future__ import annotations

import uuid

import trio

from chatd_trio import ChatStatus, Config
from chatd_trio.domain import (
    JSON,
    Message,
    MessageEvent,
    StatusEvent,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
from chatd_trio.models.scripted import ScriptedModel, text_step, tool_step
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.server import Server
from chatd_trio.store.memory import MemoryStore
from chatd_trio.tools import ToolContext, ToolRegistry, tool


@tool(
    "add",
    "Add two integers.",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)
async def add(args: dict[str, JSON], ctx: ToolContext) -> JSON:
    a, b = args["a"], args["b"]
    assert isinstance(a, int) and isinstance(b, int)
    return {"sum": a + b}


def describe(message: Message) -> str:
    """One line per message: its role and its parts."""
    shown: list[str] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            shown.append(part.text)
        elif isinstance(part, ToolCallPart):
            shown.append(f"calls {part.name}({part.arguments})")
        elif isinstance(part, ToolResultPart):
            shown.append(f"{part.name} returned {part.result}")
    return f"{message.role}: {' '.join(shown)}"


async def main() -> list[str]:
    """Run one chat to completion; return (and print) what happened, line by line."""
    lines: list[str] = []
    # The model: first step calls the tool, second step answers in three streamed deltas.
    model = ScriptedModel(
        [tool_step([("add", {"a": 2, "b": 3})]), text_step("2 + 3 = 5", chunks=3)]
    )
    store, pubsub = MemoryStore(), MemoryPubSub()
    owner = uuid.uuid4()

    async with Server(store, pubsub, model, Config(), tools=ToolRegistry([add])) as server:
        chat = await server.create_chat(owner, "What is 2 + 3?")
        # Subscribe: a snapshot (status, persisted messages), then live events. Streamed
        # deltas arrive as MessagePartEvent; each persisted message once, as MessageEvent.
        async with server.subscribe(owner, chat.id) as events:
            turn_over = False
            async for event in events:
                if isinstance(event, MessageEvent):
                    lines.append(describe(event.message))
                elif isinstance(event, StatusEvent):
                    # `waiting`: the turn is over, the chat waits for the next user message.
                    turn_over = event.status is ChatStatus.WAITING
                # A fast turn may be over before the snapshot is read: drain what it queued.
                if turn_over and events.backlog == 0:
                    break

        chat = await server.get_chat(owner, chat.id)
        stats = server.stats()
        lines.append(
            f"status: {chat.status}, steps: {stats.steps}, model calls: {model.stream_count}"
        )
    # Leaving the block closed the replica: no task of it is left running.
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    trio.run(main)
