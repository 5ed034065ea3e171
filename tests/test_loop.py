"""The agent loop (docs/spec.md §3): steps, tools, retries, interrupt and shutdown."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from chatd_trio.config import LoopConfig, RetryConfig
from chatd_trio.domain import (
    JSON,
    ErrorPayload,
    Message,
    MessagePartEvent,
    NewMessage,
    ReasoningPart,
    RetryPayload,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
from chatd_trio.errors import StoreError
from chatd_trio.loop import TurnCallbacks, TurnControl, retry_delay, run_turn
from chatd_trio.models.base import ReasoningDelta, TextDelta, ToolCallDelta
from chatd_trio.models.scripted import (
    ScriptedModel,
    ScriptStep,
    error_step,
    model_error,
    text_step,
    tool_step,
)
from chatd_trio.store.base import Announcer, TurnOutcome
from chatd_trio.store.memory import MemoryStore
from chatd_trio.tools import ToolContext, ToolRegistry, tool

# -- helpers shared by the loop test modules ------------------------------------


async def start_chat(store: MemoryStore, text: str = "hello") -> tuple[uuid.UUID, uuid.UUID]:
    """A chat with one user message, acquired (running) by a fresh worker."""
    chat, _ = await store.create_chat(uuid.uuid4(), "test", [TextPart(text)])
    worker = uuid.uuid4()
    acquired = await store.acquire(worker, 10)
    assert [c.id for c in acquired] == [chat.id]
    return chat.id, worker


@dataclass
class Recorder:
    """Collects everything a turn reports, plus an ordered log of labels."""

    parts: list[MessagePartEvent] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    retries: list[RetryPayload] = field(default_factory=list)
    errors: list[ErrorPayload] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    async def on_part(self, event: MessagePartEvent) -> None:
        self.parts.append(event)
        self.log.append(f"part:{event.part.type}:{getattr(event.part, 'name', '')}")

    async def on_message(self, message: Message) -> None:
        self.messages.append(message)
        self.log.append(f"message:{message.role.value}")

    async def on_retry(self, payload: RetryPayload) -> None:
        self.retries.append(payload)
        self.log.append("retry")

    async def on_error(self, payload: ErrorPayload) -> None:
        self.errors.append(payload)
        self.log.append("error")

    def callbacks(self) -> TurnCallbacks:
        return TurnCallbacks(self.on_part, self.on_message, self.on_retry, self.on_error)


@tool("echo", "Return the arguments.")
async def echo(args: dict[str, JSON], ctx: ToolContext) -> JSON:
    await trio.lowlevel.checkpoint()
    return args


async def history(store: MemoryStore, chat_id: uuid.UUID) -> list[Message]:
    """Every user-visible message (what the store would stream)."""
    return await store.messages_after(chat_id, 0)


def tool_results(messages: Sequence[Message]) -> list[ToolResultPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ToolResultPart)]


def tool_calls(messages: Sequence[Message]) -> list[ToolCallPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ToolCallPart)]


# -- steps and tools ------------------------------------------------------------


async def test_multi_step_tool_execution() -> None:
    store = MemoryStore()
    chat_id, worker = await start_chat(store)
    model = ScriptedModel([tool_step([("echo", {"x": 1})]), text_step("all done")])
    rec = Recorder()

    result = await run_turn(
        store, chat_id, worker, model, tools=ToolRegistry([echo]), callbacks=rec.callbacks()
    )

    assert result.outcome is TurnOutcome.DONE
    assert result.steps == 2
    assert model.stream_count == 2
    assert [spec.name for spec in model.stream_tools[0]] == ["echo"]
    second = model.stream_prompts[1]
    assert [m.role for m in second] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    assert second[1].parts == (ToolCallPart("call_0", "echo", '{"x": 1}'),)
    assert second[2].parts == (ToolResultPart("call_0", "echo", {"x": 1}),)
    stored = await history(store, chat_id)
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.ASSISTANT]
    assert stored[-1].parts == (TextPart("all done"),)
    # every persisted message was published as a durable message, in id order
    assert [m.id for m in rec.messages] == [m.id for m in stored[1:]]


async def test_unknown_raising_and_error_tools_become_error_results() -> None:
    @tool("boom", "Raise.")
    async def boom(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        raise RuntimeError("kaput")

    store = MemoryStore()
    chat_id, worker = await start_chat(store)
    model = ScriptedModel(
        [tool_step([("boom", {}), ("nope", {}), ("echo", "not json")]), text_step("ok")]
    )

    result = await run_turn(store, chat_id, worker, model, tools=ToolRegistry([echo, boom]))

    assert result.outcome is TurnOutcome.DONE
    results = tool_results(await history(store, chat_id))
    assert [r.call_id for r in results] == ["call_0", "call_1", "call_2"]
    assert all(r.is_error for r in results)
    assert "kaput" in results[0].result["error"]
    assert "unknown tool" in results[1].result["error"]
    assert "JSON" in results[2].result["error"]


async def test_persist_step_error_propagates() -> None:
    class BrokenStore(MemoryStore):
        async def persist_step(
            self,
            chat_id: uuid.UUID,
            worker_id: uuid.UUID,
            messages: Sequence[NewMessage],
            *,
            announce: Announcer | None = None,
        ) -> list[Message]:
            raise StoreError("database gone")

    store = BrokenStore()
    chat_id, worker = await start_chat(store)
    model = ScriptedModel([text_step("hi")])

    with pytest.raises(StoreError, match="database gone"):
        await run_turn(store, chat_id, worker, model)


async def test_five_tools_of_one_second_finish_in_one_virtual_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    finished: list[int] = []

    @tool("slow", "Take one second.")
    async def slow(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        await trio.sleep(1)
        finished.append(int(args["i"]))
        return {"i": args["i"]}

    async def run(parallel: bool) -> tuple[float, list[Message], Recorder]:
        store = MemoryStore()
        chat_id, worker = await start_chat(store)
        # Later calls are scheduled first so that completion order differs from call order.
        model = ScriptedModel([tool_step([("slow", {"i": i}) for i in range(5)]), text_step("ok")])
        rec = Recorder()
        start = trio.current_time()
        await run_turn(
            store,
            chat_id,
            worker,
            model,
            tools=ToolRegistry([slow]),
            config=LoopConfig(parallel_tools=parallel),
            callbacks=rec.callbacks(),
        )
        return trio.current_time() - start, await history(store, chat_id), rec

    elapsed, stored, rec = await run(parallel=True)
    assert elapsed == pytest.approx(1.0)
    expected = [f"call_{i}" for i in range(5)]
    assert [r.call_id for r in tool_results(stored)] == expected
    assert [r.result for r in tool_results(stored)] == [{"i": i} for i in range(5)]
    published = [e.part for e in rec.parts if isinstance(e.part, ToolResultPart)]
    assert [p.call_id for p in published] == expected

    finished.clear()
    elapsed, stored, _ = await run(parallel=False)
    assert elapsed == pytest.approx(5.0)
    assert finished == [0, 1, 2, 3, 4]


# -- retries and errors -----------------------------------------------------------


async def test_retry_backoff_schedule_and_retry_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    chat_id, worker = await start_chat(store)
    cut = ScriptStep(
        deltas=(TextDelta("partial "), TextDelta("never")),
        error=model_error(500, kind="server_error"),
        cut_after=1,
    )
    model = ScriptedModel(
        [
            error_step(model_error(429)),
            error_step(model_error(503, retry_after=5, kind="overloaded")),
            cut,
            text_step("answer"),
        ]
    )
    rec = Recorder()
    start = trio.current_time()

    result = await run_turn(store, chat_id, worker, model, callbacks=rec.callbacks())

    assert result.outcome is TurnOutcome.DONE
    assert result.retries == 3
    # backoff min(1 * 2^n, 60): 1, then max(2, retry_after 5) = 5, then 4
    assert [r.attempt for r in rec.retries] == [1, 2, 3]
    assert [r.delay_s for r in rec.retries] == [1.0, 5.0, 4.0]
    assert [r.status_code for r in rec.retries] == [429, 503, 500]
    assert [r.kind for r in rec.retries] == ["rate_limit", "overloaded", "server_error"]
    assert all(r.retrying_at is not None for r in rec.retries)
    assert trio.current_time() - start == pytest.approx(10.0)
    assert model.stream_count == 4
    # the cut attempt's partial text was published, then discarded: only the answer persists
    assert any(e.part == TextPart("partial ") for e in rec.parts)
    stored = await history(store, chat_id)
    assert [m.parts for m in stored[1:]] == [(TextPart("answer"),)]


def test_retry_delay_caps_and_honours_retry_after() -> None:
    cfg = RetryConfig(base_delay=1.0, max_delay=60.0)
    assert [retry_delay(cfg, n, None) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(cfg, 0, 7.5) == 7.5
    assert retry_delay(cfg, 4, 3.0) == 16
    assert retry_delay(cfg, 0, 600.0) == 600  # not capped: the step budget bounds it
    assert retry_delay(cfg, 10_000, None) == 60


async def test_retries_exhausted_end_in_error(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    chat_id, worker = await start_chat(store)
    model = ScriptedModel([error_step(model_error(429))] * 3 + [text_step("late")])
    rec = Recorder()
    config = LoopConfig(retry=RetryConfig(max_attempts=3))

    result = await run_turn(store, chat_id, worker, model, config=config, callbacks=rec.callbacks())

    assert result.outcome is TurnOutcome.ERROR
    assert model.stream_count == 3
    assert len(rec.retries) == 2
    assert result.error is not None
    assert (result.error.status_code, result.error.retryable) == (429, True)


async def test_non_retryable_error_ends_in_error() -> None:
    store = MemoryStore()
    chat_id, worker = await start_chat(store)
    err = model_error(400, retryable=False, kind="bad_request", message="context too long")
    model = ScriptedModel([error_step(err), text_step("never")])
    rec = Recorder()

    result = await run_turn(store, chat_id, worker, model, callbacks=rec.callbacks())

    assert result.outcome is TurnOutcome.ERROR
    assert result.error == ErrorPayload(
        message="context too long",
        kind="bad_request",
        provider="scripted",
        retryable=False,
        status_code=400,
    )
    assert model.stream_count == 1
    assert rec.retries == []
    assert len(await history(store, chat_id)) == 1


# -- interrupt, shutdown, refused writes ---------------------------------------------


async def test_shutdown_during_tool_yields_cancellation_not_interrupt() -> None:
    started = trio.Event()

    @tool("hang", "Never finish.")
    async def hang(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        started.set()
        await trio.sleep_forever()

    store = MemoryStore()
    chat_id, worker = await start_chat(store)
    model = ScriptedModel([tool_step([("echo", {}), ("hang", {})], text="working")])
    control = TurnControl()
    outcome: list[str] = []

    async def turn() -> None:
        with control:
            try:
                await run_turn(
                    store, chat_id, worker, model, tools=ToolRegistry([echo, hang]), control=control
                )
            except trio.Cancelled:
                outcome.append("cancelled")
                raise
            outcome.append("returned")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(turn)
        await started.wait()
        control.shutdown()

    assert outcome == ["cancelled"]
    assert control.shut_down
    # nothing of the step was written: another replica will run it again
    assert len(await history(store, chat_id)) == 1


async def test_interrupt_during_tool_persists_text_reasoning_call_and_synthetic_result() -> None:
    started = trio.Event()

    @tool("hang", "Never finish.")
    async def hang(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        started.set()
        await trio.sleep_forever()

    store = MemoryStore()
    chat_id, worker = await start_chat(store)
    model = ScriptedModel(
        [tool_step([("echo", {"a": 1}), ("hang", {})], text="looking", reasoning="hmm")]
    )
    control = TurnControl()
    rec = Recorder()
    results = []

    async def turn() -> None:
        results.append(
            await run_turn(
                store,
                chat_id,
                worker,
                model,
                tools=ToolRegistry([echo, hang]),
                control=control,
                callbacks=rec.callbacks(),
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(turn)
        await started.wait()
        await trio.testing.wait_all_tasks_blocked()
        control.interrupt()

    assert results[0].outcome is TurnOutcome.INTERRUPTED
    stored = await history(store, chat_id)
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.TOOL]
    assert stored[1].parts == (
        ReasoningPart("hmm"),
        TextPart("looking"),
        ToolCallPart("call_0", "echo", '{"a": 1}'),
        ToolCallPart("call_1", "hang", "{}"),
    )
    assert stored[2].parts == (ToolResultPart("call_0", "echo", {"a": 1}),)
    assert stored[3].parts == (
        ToolResultPart(
            "call_1",
            "hang",
            {"error": "tool call was interrupted before it produced a result"},
            is_error=True,
        ),
    )
    assert [m.id for m in rec.messages] == [m.id for m in stored[1:]]


async def test_interrupt_during_streaming_persists_partial_output() -> None:
    step = ScriptStep(
        deltas=(
            ReasoningDelta("think"),
            TextDelta("hel"),
            TextDelta("lo"),
            ToolCallDelta(0, "c1", "echo", '{"a"'),
            ToolCallDelta(0, None, None, ": 1}"),
        ),
        hang_after=4,
    )
    store = MemoryStore()
    chat_id, worker = await start_chat(store)
    model = ScriptedModel([step])
    control = TurnControl()
    rec = Recorder()

    async def on_part(event: MessagePartEvent) -> None:
        await rec.on_part(event)
        if len(rec.parts) == 4:
            control.interrupt()

    callbacks = TurnCallbacks(on_part=on_part, on_message=rec.on_message)
    result = await run_turn(
        store,
        chat_id,
        worker,
        model,
        tools=ToolRegistry([echo]),
        control=control,
        callbacks=callbacks,
    )

    assert result.outcome is TurnOutcome.INTERRUPTED
    stored = await history(store, chat_id)
    assert stored[1].parts == (
        ReasoningPart("think"),
        TextPart("hello"),
        ToolCallPart("c1", "echo", '{"a"'),
    )
    assert stored[2].parts == (
        ToolResultPart(
            "c1", "echo", {"error": "tool call was interrupted before it produced a result"}, True
        ),
    )
    assert len(stored) == 3


async def test_interrupt_before_anything_streamed_writes_nothing() -> None:
    store = MemoryStore()
    chat_id, worker = await start_chat(store)
    model = ScriptedModel([ScriptStep(deltas=(TextDelta("x"),), hang_after=0)])
    control = TurnControl()
    control.interrupt()

    result = await run_turn(store, chat_id, worker, model, control=control)

    assert result.outcome is TurnOutcome.INTERRUPTED
    assert len(await history(store, chat_id)) == 1


async def test_persist_refused_after_edit_ends_loop_as_interrupted() -> None:
    store = MemoryStore()
    chat_id, worker = await start_chat(store, "first")

    @tool("edit", "The user edits their message meanwhile.")
    async def edit(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        first = (await store.messages_after(ctx.chat_id, 0))[0]
        await store.edit_message(ctx.chat_id, first.id, [TextPart("edited")])
        return "ok"

    model = ScriptedModel([tool_step([("edit", {})]), text_step("never")])
    rec = Recorder()

    result = await run_turn(
        store, chat_id, worker, model, tools=ToolRegistry([edit]), callbacks=rec.callbacks()
    )

    assert result.outcome is TurnOutcome.INTERRUPTED
    assert result.persist_refused
    assert model.stream_count == 1
    stored = await history(store, chat_id)
    assert [m.parts for m in stored] == [(TextPart("edited"),)]
    assert rec.messages == []


async def test_interrupt_while_a_persisted_step_is_published_still_publishes_all_of_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A step's write and the publishing of what it wrote are one unit: an interrupt that
    lands while the first message is being published does not drop the rest (each
    persisted message would otherwise reach subscribers only at their next read)."""
    store = MemoryStore()
    chat_id, worker = await start_chat(store)
    model = ScriptedModel([tool_step([("echo", {"a": 1})], text="one"), text_step("two")])
    control = TurnControl()
    publishing = trio.Event()
    published: list[int] = []

    async def on_message(message: Message) -> None:
        publishing.set()
        await trio.sleep(1)  # a slow NOTIFY round trip
        published.append(message.id)

    results = []

    async def turn() -> None:
        results.append(
            await run_turn(
                store,
                chat_id,
                worker,
                model,
                tools=ToolRegistry([echo]),
                control=control,
                callbacks=TurnCallbacks(on_message=on_message),
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(turn)
        await publishing.wait()
        control.interrupt()

    assert results[0].outcome is TurnOutcome.INTERRUPTED
    stored = await history(store, chat_id)
    # The tool step (call + result) was persisted and is published in full.
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    assert published == [m.id for m in stored[1:]]
