"""A tour of chatd_trio: one replica, in memory, a scripted model and one typed tool.

Run it with `python docs/examples/tour.py`. tests/test_docs_tour.py runs it too,
so this file (and the copy in docs/index.md) cannot rot.
"""

from __future__ import annotations

import uuid

import trio

from chatd_trio import (
    Config,
    MemoryPubSub,
    MemoryStore,
    Message,
    ScriptedModel,
    Server,
    TextPart,
    ToolCallPart,
    ToolRegistry,
    ToolResultPart,
    text_step,
    tool,
    tool_step,
)


@tool
async def add(a: int, b: int) -> dict[str, int]:
    """Add two integers.

    Args:
        a: the first addend
        b: the second addend
    """
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
    """Run two exchanges of one chat; return (and print) what happened, line by line."""
    # The model: the first step calls the tool, the second answers in three streamed
    # deltas; the next turn is one step.
    model = ScriptedModel(
        [
            tool_step([("add", {"a": 2, "b": 3})]),
            text_step("2 + 3 = 5", chunks=3),
            text_step("You're welcome."),
        ]
    )
    owner = uuid.uuid4()
    tools = ToolRegistry([add])
    async with Server(MemoryStore(), MemoryPubSub(), model, Config(), tools=tools) as server:
        chat = await server.create_chat(owner, "What is 2 + 3?")
        # Wait until the chat has no work left: the report holds the new messages.
        first = await server.wait_turn(owner, chat.id)
        # Send and wait in one call: the report starts with the message sent.
        second = await server.send_and_wait(owner, chat.id, "Thanks!")
        lines = [describe(m) for m in first.messages + second.messages]
        lines.append(
            f"status: {second.status}, steps: {server.stats().steps}, "
            f"model calls: {model.stream_count}"
        )
    # Leaving the block closed the replica: no task of it is left running.
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    trio.run(main)
