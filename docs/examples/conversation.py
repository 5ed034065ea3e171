"""A conversation: awaiting outcomes, watching a turn, queue, interrupt, edit, failures.

Run it with `python docs/examples/conversation.py`. docs/guides/conversations.md quotes
it and tests/test_docs_tour.py runs it. The scripted model stands in for a real one:
it answers "re: <your message>", streams forever on "hang", fails on "fail" and hits a
rate limit once on "busy".
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import trio

from chatd_trio import (
    Config,
    LoopConfig,
    MemoryPubSub,
    MemoryStore,
    MessagePartEvent,
    RetryConfig,
    RetryEvent,
    ScriptedModel,
    ScriptStep,
    Server,
    SnapshotEndEvent,
    StatusEvent,
    TextDelta,
    error_step,
    model_error,
    text_of,
    text_step,
)
from chatd_trio.models.base import PromptMessage

retried: set[str] = set()


def step(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
    """What the stand-in model does with the latest user message."""
    said = text_of(prompt[-1].parts)
    if said.startswith("hang"):
        return ScriptStep((TextDelta("Let me think"),), hang_after=1)
    if said.startswith("fail"):
        return error_step(model_error(400, retryable=False, kind="bad_request", message="no"))
    if said.startswith("busy") and said not in retried:
        retried.add(said)
        return error_step(model_error(429, retry_after=0.01))
    return text_step(f"re: {said}")


async def main() -> list[str]:
    lines: list[str] = []
    owner = uuid.uuid4()
    # Retries wait 10 ms here instead of 1 s doubling, to keep the example quick.
    config = Config(loop=LoopConfig(retry=RetryConfig(base_delay=0.01)))
    async with Server(MemoryStore(), MemoryPubSub(), ScriptedModel(step), config) as server:
        # Awaiting an outcome.
        chat = await server.create_chat(owner, "hello")
        report = await server.wait_turn(owner, chat.id)
        lines.append(f"answer: {report.text}")

        # Watching a turn while queueing behind it, then interrupting it.
        async with server.subscribe(owner, chat.id, after_message_id=report.cursor) as events:
            await server.send_message(owner, chat.id, "hang on")
            async for event in events:
                if isinstance(event, SnapshotEndEvent):
                    lines.append("caught up; live from here")
                elif isinstance(event, StatusEvent):
                    lines.append(f"status: {event.status}")
                elif isinstance(event, MessagePartEvent):
                    lines.append(f"streaming: {text_of([event.part])}")
                    break
        queued = await server.send_message(owner, chat.id, "and then?")
        lines.append(f"queued: {[text_of(q.parts) for q in queued.queue]}")
        await server.interrupt(owner, chat.id)
        # The stopped turn kept what it streamed; the queued message was answered next.
        report = await server.wait_turn(owner, chat.id, after_message_id=report.cursor)
        lines += [f"{m.role}: {text_of(m.parts)}" for m in report.messages]

        # Editing the first message replaces it and everything after it.
        first = (await server.messages(owner, chat.id))[0]
        await server.edit_message(owner, chat.id, first.id, "hello again")
        report = await server.wait_turn(owner, chat.id)
        lines.append(f"after the edit: {[text_of(m.parts) for m in report.messages]}")

        # A failed turn: the chat is `error`, the report says why.
        report = await server.send_and_wait(owner, chat.id, "fail, please")
        assert report.error is not None
        lines.append(f"{report.status}: {report.error.kind}: {report.error.message}")

        # A retried model call: a `retry` event, then the answer.
        async with server.subscribe(owner, chat.id, after_message_id=report.cursor) as events:
            report = await server.send_and_wait(owner, chat.id, "busy day")
            async for event in events:
                if isinstance(event, RetryEvent):
                    lines.append(f"retried after {event.retry.kind} ({event.retry.status_code})")
                    break
        lines.append(f"{report.status}: {report.text}")
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    trio.run(main)
