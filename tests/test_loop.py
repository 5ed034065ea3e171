"""The agent loop (docs/spec.md §3 and §1): steps, tools, retries, interrupt and shutdown,
fenced and retried writes, recovery of an answered turn.

Tests that persist run against both store adapters (`store` fixture: MemoryStore and
PostgreSQL); the few that assert virtual time run on MemoryStore under a MockClock.
Store faults are injected by `FaultyStore`, which wraps a real store and fails a turn
write the way a lost connection does: before it reaches the database, or after it
committed with the acknowledgement lost.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import trio
import trio.testing

from chatd_trio.config import LoopConfig, RetryConfig, StoreRetryConfig
from chatd_trio.domain import (
    JSON,
    ChatStatus,
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
    Usage,
    Visibility,
)
from chatd_trio.errors import OwnershipLost, StoreError, StoreUnavailable
from chatd_trio.loop import (
    TurnCallbacks,
    TurnControl,
    TurnResult,
    already_answered,
    retry_delay,
    run_turn,
)
from chatd_trio.models.base import PromptMessage, ReasoningDelta, TextDelta, ToolCallDelta
from chatd_trio.models.scripted import (
    ScriptedModel,
    ScriptStep,
    error_step,
    model_error,
    text_step,
    tool_step,
)
from chatd_trio.store.base import FinishResult, Lease, Store, TurnOutcome
from chatd_trio.store.memory import MemoryStore
from chatd_trio.strategies import Strategies, ToolCalls
from chatd_trio.tools import ToolContext, ToolRegistry, tool
from statecharts.base import Step
from tests.contract.conftest import STORE_KINDS, open_store

# -- helpers shared by the loop test modules ------------------------------------


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_dsn(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    return str(request.getfixturevalue("pg_dsn")) if store_kind == "postgres" else None


@pytest.fixture
async def store(store_kind: str, store_dsn: str | None) -> AsyncIterator[Store]:
    """An empty store of each kind."""
    async with open_store(store_kind, store_dsn) as opened:
        yield opened


@pytest.fixture
def clock(store_kind: str) -> trio.testing.MockClock | None:
    """pytest-trio runs the test on this clock when it is one: virtual time on the memory
    store; PostgreSQL's I/O needs the real clock (its waits are real)."""
    return trio.testing.MockClock(autojump_threshold=0) if store_kind == "memory" else None


async def start_chat(store: Store, text: str = "hello") -> Lease:
    """A chat with one user message, acquired (running) by a fresh worker: its lease."""
    chat, _ = await store.create_chat(uuid.uuid4(), "test", [TextPart(text)])
    acquired = await store.acquire(uuid.uuid4(), 10)
    assert [c.id for c in acquired] == [chat.id]
    return Lease.of(acquired[0])


async def finish(store: Store, lease: Lease, result: TurnResult) -> FinishResult:
    """The final transition as the Server makes it: the turn's final messages with it."""
    return await store.finish_turn(
        lease,
        result.outcome,
        result.error.message if result.error else None,
        messages=result.final_messages,
    )


@dataclass
class Recorder:
    """Collects everything a turn reports, plus an ordered log of labels."""

    parts: list[MessagePartEvent] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    retries: list[RetryPayload] = field(default_factory=list)
    errors: list[ErrorPayload] = field(default_factory=list)
    store_retries: list[str] = field(default_factory=list)
    late: list[ToolCallPart] = field(default_factory=list)
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

    def on_store_retry(self, what: str, exc: BaseException) -> None:
        assert isinstance(exc, StoreUnavailable)
        self.store_retries.append(what)

    def on_late_tool_result(self, call: ToolCallPart) -> None:
        self.late.append(call)

    def callbacks(self) -> TurnCallbacks:
        return TurnCallbacks(
            self.on_part,
            self.on_message,
            self.on_retry,
            self.on_error,
            on_late_tool_result=self.on_late_tool_result,
            on_store_retry=self.on_store_retry,
        )


@tool("echo", "Return the arguments.")
async def echo(args: dict[str, JSON], ctx: ToolContext) -> JSON:
    await trio.lowlevel.checkpoint()
    return args


async def history(store: Store, chat_id: uuid.UUID) -> list[Message]:
    """Every user-visible message (what the store would stream)."""
    return await store.messages_after(chat_id, 0)


def tool_results(messages: Sequence[Message | NewMessage]) -> list[ToolResultPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ToolResultPart)]


def tool_calls(messages: Sequence[Message | NewMessage]) -> list[ToolCallPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ToolCallPart)]


# What a fault does to one call of a turn's store operation (see FaultyStore).
OK = "ok"
BEFORE = "before"  # StoreUnavailable before the write reaches the database
AFTER = "after"  # the write commits, then StoreUnavailable (the acknowledgement is lost)
STUCK = "stuck"  # the write commits, then the call waits until it is cancelled
FATAL = "fatal"  # a StoreError that is not transient


class FaultyStore:
    """A real store whose turn operations fail on cue, like a database connection does.

    The fault of a call of a turn operation (persist_step, persist_compaction,
    prompt_messages) is the next entry of `faults[op]`; when that runs out, `plan(n, op)`
    decides for the n-th call (1-based, over all three operations), if set; else every
    call of an operation in `outage` fails before it reaches the database. Every call
    is recorded with its operation id (`calls`) and its name appended to `log`; what
    the real store raised is kept in `errors`. `on_call(n, op)` runs first (a stop, an
    edit or a takeover landing just then); then the call yields once, as a round trip
    to the database does. Everything else goes to `inner`.
    """

    def __init__(self, inner: Store, log: list[str] | None = None) -> None:
        self.inner = inner
        self.log = log if log is not None else []
        self.faults: dict[str, list[str]] = {}
        self.plan: Callable[[int, str], str] | None = None
        self.outage: set[str] = set()
        self.calls: list[tuple[str, uuid.UUID | None]] = []
        self.errors: list[BaseException] = []  # raised by the real store
        self.stuck = trio.Event()
        self.on_call: Callable[[int, str], Awaitable[None]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def as_store(self) -> Store:
        return cast(Store, self)

    def ops(self, name: str) -> list[uuid.UUID | None]:
        """The operation ids of every call of `name`, in call order."""
        return [op_id for op, op_id in self.calls if op == name]

    async def _call(
        self, op: str, op_id: uuid.UUID | None, run: Callable[[], Awaitable[Any]]
    ) -> Any:
        self.calls.append((op, op_id))
        self.log.append(op)
        n = len(self.calls)
        if self.on_call is not None:
            await self.on_call(n, op)
        queue = self.faults.get(op)
        if queue:
            fault = queue.pop(0)
        elif self.plan is not None:
            fault = self.plan(n, op)
        else:
            fault = BEFORE if op in self.outage else OK
        await trio.lowlevel.checkpoint()
        if fault == BEFORE:
            raise StoreUnavailable(f"{op}: connection refused")
        if fault == FATAL:
            raise StoreError(f"{op}: value too long for column")
        try:
            out = await run()
        except Exception as exc:
            self.errors.append(exc)
            raise
        if fault == AFTER:
            raise StoreUnavailable(f"{op}: connection lost before the commit was acknowledged")
        if fault == STUCK:
            self.stuck.set()
            await trio.sleep_forever()
        return out

    async def persist_step(
        self, lease: Lease, messages: Sequence[NewMessage], **kw: Any
    ) -> list[Message]:
        out: list[Message] = await self._call(
            "persist_step",
            kw.get("op_id"),
            lambda: self.inner.persist_step(lease, messages, **kw),
        )
        return out

    async def persist_compaction(
        self, lease: Lease, messages: Sequence[NewMessage], **kw: Any
    ) -> list[Message]:
        out: list[Message] = await self._call(
            "persist_compaction",
            kw.get("op_id"),
            lambda: self.inner.persist_compaction(lease, messages, **kw),
        )
        return out

    async def prompt_messages(self, chat_id: uuid.UUID) -> list[Message]:
        out: list[Message] = await self._call(
            "prompt_messages", None, lambda: self.inner.prompt_messages(chat_id)
        )
        return out


# -- steps and tools ------------------------------------------------------------


async def test_multi_step_tool_execution(store: Store) -> None:
    lease = await start_chat(store)
    model = ScriptedModel([tool_step([("echo", {"x": 1})]), text_step("all done")])
    rec = Recorder()

    result = await run_turn(
        store, lease, model, tools=ToolRegistry([echo]), callbacks=rec.callbacks()
    )

    assert result.outcome is TurnOutcome.DONE
    assert (result.steps, result.final_state) == (2, "done")
    assert model.stream_count == 2
    assert [spec.name for spec in model.stream_tools[0]] == ["echo"]
    second = model.stream_prompts[1]
    assert [m.role for m in second] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    assert second[1].parts == (ToolCallPart("call_0", "echo", '{"x": 1}'),)
    assert second[2].parts == (ToolResultPart("call_0", "echo", {"x": 1}),)
    # The loop wrote the tool step (the next step built on it); the answer is the caller's
    # to write, with the final transition.
    stored = await history(store, lease.chat_id)
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    assert [(m.role, m.parts) for m in result.final_messages] == [
        (Role.ASSISTANT, (TextPart("all done"),))
    ]
    # every message the loop persisted was published as a durable message, in id order
    assert [m.id for m in rec.messages] == [m.id for m in stored[1:]]

    fin = await finish(store, lease, result)
    assert fin.changed and fin.chat.status is ChatStatus.WAITING
    stored = await history(store, lease.chat_id)
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.ASSISTANT]
    assert stored[-1].parts == (TextPart("all done"),)


async def test_signed_reasoning_blocks_are_stored_and_sent_back_as_they_came(
    store: Store,
) -> None:
    """Anthropic's thinking blocks: each closed by its signature (a redacted one whole),
    kept block by block with the signature, so the next request resends them unchanged."""
    lease = await start_chat(store)
    thinking = ScriptStep(
        deltas=(
            ReasoningDelta("I should "),
            ReasoningDelta("echo."),
            ReasoningDelta("", signature="sig-1"),
            ReasoningDelta("", signature="ENCRYPTED", redacted=True),
            ReasoningDelta("Then answer."),
            ReasoningDelta("", signature="sig-2"),
            TextDelta("Echoing."),
            *tool_step([("echo", {"x": 1})]).deltas,
        )
    )
    model = ScriptedModel([thinking, text_step("done")])
    rec = Recorder()

    result = await run_turn(
        store, lease, model, tools=ToolRegistry([echo]), callbacks=rec.callbacks()
    )

    assert result.outcome is TurnOutcome.DONE
    signed = (
        ReasoningPart("I should echo.", "sig-1"),
        ReasoningPart("", "ENCRYPTED", redacted=True),
        ReasoningPart("Then answer.", "sig-2"),
        TextPart("Echoing."),
        ToolCallPart("call_0", "echo", '{"x": 1}'),
    )
    assert model.stream_prompts[1][1].parts == signed
    assert (await history(store, lease.chat_id))[1].parts == signed
    # Subscribers see the reasoning text; signatures and redacted blocks are not text.
    reasoning = [e.part for e in rec.parts if isinstance(e.part, ReasoningPart)]
    assert reasoning == [
        ReasoningPart("I should "),
        ReasoningPart("echo."),
        ReasoningPart("Then answer."),
    ]


async def test_stored_usage_keeps_cached_and_reasoning_tokens(store: Store) -> None:
    lease = await start_chat(store)
    usage = Usage(
        input_tokens=400,
        output_tokens=300,
        cache_read_tokens=600,
        cache_creation_tokens=50,
        total_tokens=1350,
        reasoning_tokens=250,
    )
    model = ScriptedModel([tool_step([("echo", {})], usage=usage), text_step("ok")])

    await run_turn(store, lease, model, tools=ToolRegistry([echo]))

    assert (await history(store, lease.chat_id))[1].usage == usage


async def test_a_one_step_text_turn_writes_nothing_its_answer_comes_back(store: Store) -> None:
    """The final step is not written by the loop: it lands with the finish, atomically, so
    a stored answer always has its finish (docs/spec.md §1, idempotent completion)."""
    faulty = FaultyStore(store)
    lease = await start_chat(store)
    rec = Recorder()

    result = await run_turn(
        faulty.as_store(), lease, ScriptedModel([text_step("hi there")]), callbacks=rec.callbacks()
    )

    assert (result.outcome, result.final_state, result.steps) == (TurnOutcome.DONE, "done", 1)
    assert faulty.ops("persist_step") == []
    assert rec.messages == []
    assert [m.parts for m in await history(store, lease.chat_id)] == [(TextPart("hello"),)]
    (answer,) = result.final_messages
    assert (answer.role, answer.parts, answer.visibility) == (
        Role.ASSISTANT,
        (TextPart("hi there"),),
        Visibility.BOTH,
    )
    fin = await finish(store, lease, result)
    assert [m.parts for m in fin.inserted] == [(TextPart("hi there"),)]
    assert [m.parts for m in await history(store, lease.chat_id)] == [
        (TextPart("hello"),),
        (TextPart("hi there"),),
    ]


async def test_unknown_raising_and_error_tools_become_error_results(store: Store) -> None:
    @tool("boom", "Raise.")
    async def boom(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        raise RuntimeError("kaput")

    lease = await start_chat(store)
    model = ScriptedModel(
        [tool_step([("boom", {}), ("nope", {}), ("echo", "not json")]), text_step("ok")]
    )

    result = await run_turn(store, lease, model, tools=ToolRegistry([echo, boom]))

    assert result.outcome is TurnOutcome.DONE
    results = tool_results(await history(store, lease.chat_id))
    assert [r.call_id for r in results] == ["call_0", "call_1", "call_2"]
    assert all(r.is_error for r in results)
    assert "kaput" in results[0].result["error"]
    assert "unknown tool" in results[1].result["error"]
    assert "JSON" in results[2].result["error"]


async def test_a_store_error_that_is_not_transient_propagates(store: Store) -> None:
    """Only `StoreUnavailable` is retried; another store error leaves run_turn (the Server
    ends the turn in error) and nothing of the step is stored."""
    faulty = FaultyStore(store)
    faulty.faults["persist_step"] = [FATAL]
    lease = await start_chat(store)
    model = ScriptedModel([tool_step([("echo", {})]), text_step("never")])

    with pytest.raises(StoreError, match="value too long"):
        await run_turn(faulty.as_store(), lease, model, tools=ToolRegistry([echo]))

    assert model.stream_count == 1
    assert len(faulty.ops("persist_step")) == 1
    assert len(await history(store, lease.chat_id)) == 1


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
        lease = await start_chat(store)
        # Later calls are scheduled first so that completion order differs from call order.
        model = ScriptedModel([tool_step([("slow", {"i": i}) for i in range(5)]), text_step("ok")])
        rec = Recorder()
        start = trio.current_time()
        await run_turn(
            store,
            lease,
            model,
            tools=ToolRegistry([slow]),
            callbacks=rec.callbacks(),
            strategies=Strategies(
                tool_calls=ToolCalls.CONCURRENT if parallel else ToolCalls.SEQUENTIAL
            ),
        )
        return trio.current_time() - start, await history(store, lease.chat_id), rec

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


# -- model retries and errors ---------------------------------------------------------


async def test_retry_backoff_schedule_and_retry_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    lease = await start_chat(store)
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

    result = await run_turn(store, lease, model, callbacks=rec.callbacks())

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
    # the cut attempt's partial text was published, then discarded: only the answer is kept
    assert any(e.part == TextPart("partial ") for e in rec.parts)
    assert [m.parts for m in result.final_messages] == [(TextPart("answer"),)]
    assert len(await history(store, lease.chat_id)) == 1


def test_retry_delay_caps_and_honours_retry_after() -> None:
    cfg = RetryConfig(base_delay=1.0, max_delay=60.0)
    assert [retry_delay(cfg, n, None) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(cfg, 0, 7.5) == 7.5
    assert retry_delay(cfg, 4, 3.0) == 16
    assert retry_delay(cfg, 0, 600.0) == 600  # not capped: the step budget bounds it
    assert retry_delay(cfg, 10_000, None) == 60


async def test_retries_exhausted_end_in_error(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    lease = await start_chat(store)
    model = ScriptedModel([error_step(model_error(429))] * 3 + [text_step("late")])
    rec = Recorder()
    config = LoopConfig(retry=RetryConfig(max_attempts=3))

    result = await run_turn(store, lease, model, config=config, callbacks=rec.callbacks())

    assert (result.outcome, result.final_state) == (TurnOutcome.ERROR, "failed")
    assert model.stream_count == 3
    assert len(rec.retries) == 2
    assert result.error is not None
    assert (result.error.status_code, result.error.retryable) == (429, True)
    assert "gave up after 3 attempts" in result.error.message


async def test_non_retryable_error_ends_in_error(store: Store) -> None:
    lease = await start_chat(store)
    err = model_error(400, retryable=False, kind="bad_request", message="context too long")
    model = ScriptedModel([error_step(err), text_step("never")])
    rec = Recorder()

    result = await run_turn(store, lease, model, callbacks=rec.callbacks())

    assert (result.outcome, result.final_state) == (TurnOutcome.ERROR, "failed")
    assert result.trace[-1] == Step("stepping", "model_failed", "failed")
    assert result.error == ErrorPayload(
        message="context too long",
        kind="bad_request",
        provider="scripted",
        retryable=False,
        status_code=400,
    )
    assert model.stream_count == 1
    assert rec.retries == []
    assert result.final_messages == ()
    assert len(await history(store, lease.chat_id)) == 1


# -- transient store faults ---------------------------------------------------------------


async def test_a_step_write_cut_off_twice_is_retried_and_lands_once(
    store: Store, clock: trio.testing.MockClock | None
) -> None:
    """A write that fails before reaching the database, then one whose commit landed but
    whose acknowledgement was lost: both retried, under the step's one operation id, and
    the turn completes with the step stored once."""
    faulty = FaultyStore(store)
    faulty.faults["persist_step"] = [BEFORE, AFTER]
    lease = await start_chat(store)
    model = ScriptedModel([tool_step([("echo", {"a": 1})]), text_step("done")])
    rec = Recorder()
    start = trio.current_time()

    result = await run_turn(
        faulty.as_store(),
        lease,
        model,
        tools=ToolRegistry([echo]),
        callbacks=rec.callbacks(),
    )

    assert (result.outcome, result.final_state) == (TurnOutcome.DONE, "done")
    assert result.store_retries == 2
    assert rec.store_retries == ["persisting a step"] * 2
    ops = faulty.ops("persist_step")
    assert len(ops) == 3 and ops[0] is not None and len(set(ops)) == 1
    stored = await history(store, lease.chat_id)
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    assert [c.call_id for c in tool_calls(stored)] == ["call_0"]
    # The second step saw the step once, too.
    assert [m.role for m in model.stream_prompts[1]] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    if clock is not None:
        # StoreRetryConfig(): 0.2 s, then 0.4 s
        assert trio.current_time() - start == pytest.approx(0.6)


async def test_a_store_down_past_the_retry_budget_ends_the_turn_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Not `error`: a transient fault is nothing the user can act on; the chat is handed
    back (docs/spec.md §1, store faults)."""
    store = MemoryStore()
    faulty = FaultyStore(store)
    faulty.outage.add("persist_step")
    lease = await start_chat(store)
    model = ScriptedModel([tool_step([("echo", {})]), text_step("never")])
    retry = StoreRetryConfig(base_delay=0.5, max_delay=4.0, budget=20.0)
    start = trio.current_time()

    result = await run_turn(
        faulty.as_store(),
        lease,
        model,
        tools=ToolRegistry([echo]),
        config=LoopConfig(store_retry=retry),
    )

    assert (result.outcome, result.final_state) == (TurnOutcome.UNAVAILABLE, "unavailable")
    assert result.error is None
    # Waits 0.5, 1, 2, 4, 4, 4, 4 (19.5 s); one more would end past the 20 s budget.
    assert len(faulty.ops("persist_step")) == 8
    assert result.store_retries == 7
    assert trio.current_time() - start == pytest.approx(19.5)
    assert model.stream_count == 1
    # The step's write was started: it may have landed, so it is not the finish's to write.
    assert result.final_messages == ()
    fin = await finish(store, lease, result)
    assert (fin.changed, fin.chat.status) == (True, ChatStatus.PENDING)
    assert len(await history(store, lease.chat_id)) == 1


async def test_a_load_outage_past_the_budget_ends_unavailable_before_the_model(
    store: Store, clock: trio.testing.MockClock | None
) -> None:
    faulty = FaultyStore(store)
    faulty.outage.add("prompt_messages")
    lease = await start_chat(store)
    model = ScriptedModel([text_step("never")])
    retry = StoreRetryConfig(base_delay=0.01, max_delay=0.02, budget=0.05)

    result = await run_turn(faulty.as_store(), lease, model, config=LoopConfig(store_retry=retry))

    assert (result.outcome, result.final_state) == (TurnOutcome.UNAVAILABLE, "unavailable")
    assert result.trace == (Step("loading", "store_unavailable", "unavailable"),)
    assert model.stream_count == 0
    assert len(faulty.ops("prompt_messages")) >= 2


# -- interrupt, shutdown, refused writes ---------------------------------------------


async def test_shutdown_during_tool_yields_cancellation_and_records_shutdown(store: Store) -> None:
    started = trio.Event()

    @tool("hang", "Never finish.")
    async def hang(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        started.set()
        await trio.sleep_forever()

    lease = await start_chat(store)
    model = ScriptedModel(
        [tool_step([("echo", {})], text="first"), tool_step([("hang", {})], text="working")]
    )
    control = TurnControl()
    outcome: list[BaseException | None] = []

    async def turn() -> None:
        with control:
            try:
                await run_turn(
                    store, lease, model, tools=ToolRegistry([echo, hang]), control=control
                )
            except BaseException as exc:
                outcome.append(exc)
                raise
            outcome.append(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(turn)
        await started.wait()
        control.shutdown()

    # The cancellation left run_turn (grouped by the tools' nursery it went through).
    (raised,) = outcome
    assert isinstance(raised, BaseExceptionGroup)
    assert raised.split(trio.Cancelled)[1] is None
    assert control.shut_down
    result = control.result
    assert result is not None
    assert (result.outcome, result.final_state) == (TurnOutcome.SHUTDOWN, "shut_down")
    assert result.trace[-1] == Step("stepping", "shutdown", "shut_down")
    assert result.final_messages == ()
    # The first step was written (the second built on it); nothing of the stopped one
    # was: another replica will run it again.
    stored = await history(store, lease.chat_id)
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    assert [c.name for c in tool_calls(stored)] == ["echo"]


async def test_shutdown_while_the_model_streams_records_shutdown_and_groups_the_cancellation(
    store: Store,
) -> None:
    """No nursery between the model's stream and `run_turn`: the cancellation is bare
    when `run_turn` matches it (``except* trio.Cancelled``) and leaves in a group, as
    every cancellation through a nursery does; the control's scope absorbs it."""
    lease = await start_chat(store)
    model = ScriptedModel([ScriptStep(deltas=(TextDelta("hel"), TextDelta("lo")), hang_after=1)])
    control = TurnControl()
    outcome: list[BaseException] = []

    async def on_part(event: MessagePartEvent) -> None:
        control.shutdown()

    with control:
        try:
            await run_turn(
                store, lease, model, control=control, callbacks=TurnCallbacks(on_part=on_part)
            )
        except BaseException as exc:
            outcome.append(exc)
            raise
    (raised,) = outcome
    assert pytest.RaisesGroup(trio.Cancelled).matches(raised)
    assert control.shut_down
    result = control.result
    assert result is not None
    assert (result.outcome, result.final_state) == (TurnOutcome.SHUTDOWN, "shut_down")
    assert len(await history(store, lease.chat_id)) == 1


async def test_shutdown_while_a_step_write_lands_unacknowledged_stores_it_once(
    store: Store,
) -> None:
    """The step's write committed, the replica shuts down before it is acknowledged: the
    step is not handed to the finish as well (it would be stored twice)."""
    faulty = FaultyStore(store)
    faulty.faults["persist_step"] = [STUCK]
    lease = await start_chat(store)
    model = ScriptedModel([tool_step([("echo", {"a": 1})]), text_step("never")])
    control = TurnControl()

    async def turn() -> None:
        with control:
            await run_turn(
                faulty.as_store(), lease, model, tools=ToolRegistry([echo]), control=control
            )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(turn)
        await faulty.stuck.wait()
        control.shutdown()

    result = control.result
    assert result is not None and result.outcome is TurnOutcome.SHUTDOWN
    assert result.final_messages == ()
    fin = await finish(store, lease, result)
    assert (fin.changed, fin.chat.status) == (True, ChatStatus.PENDING)
    stored = await history(store, lease.chat_id)
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    assert model.stream_count == 1


async def test_interrupt_during_tool_persists_text_reasoning_call_and_synthetic_result(
    store: Store,
) -> None:
    started = trio.Event()

    @tool("hang", "Never finish.")
    async def hang(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        started.set()
        await trio.sleep_forever()

    lease = await start_chat(store)
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
                lease,
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

    assert (results[0].outcome, results[0].final_state) == (TurnOutcome.INTERRUPTED, "interrupted")
    assert results[0].final_messages == ()
    stored = await history(store, lease.chat_id)
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


async def test_interrupt_during_streaming_persists_partial_output(store: Store) -> None:
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
    lease = await start_chat(store)
    model = ScriptedModel([step])
    control = TurnControl()
    rec = Recorder()

    async def on_part(event: MessagePartEvent) -> None:
        await rec.on_part(event)
        if len(rec.parts) == 4:
            control.interrupt()

    callbacks = TurnCallbacks(on_part=on_part, on_message=rec.on_message)
    result = await run_turn(
        store, lease, model, tools=ToolRegistry([echo]), control=control, callbacks=callbacks
    )

    assert result.outcome is TurnOutcome.INTERRUPTED
    stored = await history(store, lease.chat_id)
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


async def test_an_interrupted_step_whose_write_fails_transiently_is_written_on_retry(
    store: Store,
) -> None:
    """The interrupted step's write meets a lost connection before it reaches the
    database: it is retried (same operation id) and lands, nothing of it is lost."""
    faulty = FaultyStore(store)
    faulty.faults["persist_step"] = [BEFORE]
    lease = await start_chat(store)
    model = ScriptedModel([ScriptStep(deltas=(TextDelta("hel"), TextDelta("lo")), hang_after=2)])
    control = TurnControl()
    rec = Recorder()

    async def on_part(event: MessagePartEvent) -> None:
        await rec.on_part(event)
        if len(rec.parts) == 2:
            control.interrupt()

    callbacks = TurnCallbacks(on_part=on_part, on_message=rec.on_message)
    result = await run_turn(faulty.as_store(), lease, model, control=control, callbacks=callbacks)

    assert result.outcome is TurnOutcome.INTERRUPTED
    ops = faulty.ops("persist_step")
    assert len(ops) == 2 and ops[0] is not None and ops[0] == ops[1]
    stored = await history(store, lease.chat_id)
    assert [(m.role, m.parts) for m in stored[1:]] == [(Role.ASSISTANT, (TextPart("hello"),))]
    assert [m.id for m in rec.messages] == [stored[1].id]


async def test_interrupt_before_the_turn_starts_writes_nothing(store: Store) -> None:
    lease = await start_chat(store)
    model = ScriptedModel([ScriptStep(deltas=(TextDelta("x"),), hang_after=0)])
    control = TurnControl()
    control.interrupt()

    result = await run_turn(store, lease, model, control=control)

    assert result.outcome is TurnOutcome.INTERRUPTED
    assert result.trace == (Step("loading", "interrupt", "interrupted"),)
    assert model.stream_count == 0
    assert len(await history(store, lease.chat_id)) == 1


async def test_a_turn_fenced_while_it_loads_its_prompt_ends_fenced_and_writes_nothing(
    store: Store,
) -> None:
    """The replica learns the run lost the chat (a heartbeat refused, the chat acquired
    again) before the turn wrote anything: it ends `fenced`, not with a chart error."""
    lease = await start_chat(store)
    model = ScriptedModel([text_step("never")])
    faulty = FaultyStore(store)
    control = TurnControl()

    async def fenced_while_loading(n: int, op: str) -> None:
        if op == "prompt_messages":
            control.fence("chat acquired again")

    faulty.on_call = fenced_while_loading

    result = await run_turn(faulty.as_store(), lease, model, control=control)

    assert (result.outcome, result.final_state) == (TurnOutcome.LOST, "fenced")
    assert result.trace == (Step("loading", "fence", "fenced"),)
    assert result.final_messages == ()
    assert model.stream_count == 0
    assert [op for op, _ in faulty.calls] == ["prompt_messages"]
    assert len(await history(store, lease.chat_id)) == 1


async def test_an_edit_meanwhile_refuses_the_next_write_and_fences_the_turn(
    store: Store,
) -> None:
    lease = await start_chat(store, "first")

    @tool("edit", "The user edits their message meanwhile.")
    async def edit(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        first = (await store.messages_after(ctx.chat_id, 0))[0]
        await store.edit_message(ctx.chat_id, first.id, [TextPart("edited")])
        return "ok"

    faulty = FaultyStore(store)
    model = ScriptedModel([tool_step([("edit", {})]), text_step("never")])
    rec = Recorder()

    result = await run_turn(
        faulty.as_store(), lease, model, tools=ToolRegistry([edit]), callbacks=rec.callbacks()
    )

    assert (result.outcome, result.final_state) == (TurnOutcome.LOST, "fenced")
    assert result.persist_refused
    assert result.trace[-1] == Step("stepping", "write_refused", "fenced")
    assert result.final_messages == ()
    assert model.stream_count == 1
    assert len(faulty.ops("persist_step")) == 1
    stored = await history(store, lease.chat_id)
    assert [m.parts for m in stored] == [(TextPart("edited"),)]
    assert rec.messages == []
    assert (await store.get_chat(lease.chat_id)).status is ChatStatus.PENDING


async def test_a_takeover_refuses_the_next_write_and_nothing_more_is_written(
    store: Store,
) -> None:
    """Another run took the chat (the old one was handed back and acquired again) while a
    tool ran: the old run's next write is refused (OwnershipLost), it ends `fenced` and
    writes nothing else."""
    lease = await start_chat(store)
    taken: list[Lease] = []

    @tool("slow", "Meanwhile the chat is taken over.")
    async def slow(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        await store.release([lease])
        (chat,) = await store.acquire(uuid.uuid4(), 1)
        taken.append(Lease.of(chat))
        return "ok"

    faulty = FaultyStore(store)
    model = ScriptedModel(
        [tool_step([("slow", {})]), tool_step([("echo", {})]), text_step("never")]
    )

    result = await run_turn(faulty.as_store(), lease, model, tools=ToolRegistry([slow, echo]))

    assert (result.outcome, result.final_state, result.persist_refused) == (
        TurnOutcome.LOST,
        "fenced",
        True,
    )
    assert [type(exc) for exc in faulty.errors] == [OwnershipLost]
    assert model.stream_count == 1
    assert [op for op, _ in faulty.calls] == ["prompt_messages", "persist_step"]
    assert result.final_messages == ()
    assert len(await history(store, lease.chat_id)) == 1
    (new,) = taken
    chat = await store.get_chat(lease.chat_id)
    assert (chat.status, chat.owner_token) == (ChatStatus.RUNNING, new.token)
    assert new.token > lease.token
    with pytest.raises(ValueError, match="writes nothing"):
        await finish(store, lease, result)


async def test_an_interrupt_while_the_steps_write_was_cut_off_does_not_write_it_twice(
    store: Store,
) -> None:
    """The complete step's write committed, then hung; the interrupt writes what the turn
    produced under the step's operation id, so the store recognises the landed write."""
    faulty = FaultyStore(store)
    faulty.faults["persist_step"] = [STUCK]
    lease = await start_chat(store)
    model = ScriptedModel([tool_step([("echo", {"a": 1})], text="one"), text_step("never")])
    control = TurnControl()
    rec = Recorder()
    results: list[TurnResult] = []

    async def turn() -> None:
        results.append(
            await run_turn(
                faulty.as_store(),
                lease,
                model,
                tools=ToolRegistry([echo]),
                control=control,
                callbacks=rec.callbacks(),
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(turn)
        await faulty.stuck.wait()
        control.interrupt()

    (result,) = results
    assert (result.outcome, result.final_state) == (TurnOutcome.INTERRUPTED, "interrupted")
    ops = faulty.ops("persist_step")
    assert len(ops) == 2 and ops[0] is not None and ops[0] == ops[1]
    stored = await history(store, lease.chat_id)
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    assert tool_results(stored) == [ToolResultPart("call_0", "echo", {"a": 1})]
    # What the replayed write returned is what was published.
    assert [m.id for m in rec.messages] == [m.id for m in stored[1:]]
    assert model.stream_count == 1


async def test_interrupt_while_a_persisted_step_is_published_still_publishes_all_of_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A step's write and the publishing of what it wrote are one unit: an interrupt that
    lands while the first message is being published does not drop the rest (each
    persisted message would otherwise reach subscribers only at their next read)."""
    store = MemoryStore()
    lease = await start_chat(store)
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
                lease,
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
    stored = await history(store, lease.chat_id)
    # The tool step (call + result) was persisted and is published in full, once.
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    assert published == [m.id for m in stored[1:]]


async def test_an_interrupted_tool_that_ignores_cancellation_does_not_hold_the_turn(
    store: Store,
) -> None:
    """With `tool_nursery`, the interrupted turn returns at once although its tool sits in
    a thread that cannot be cancelled; when the thread returns, its result is dropped
    (and reported once), never written."""
    release = threading.Event()
    in_thread = trio.Event()

    def blocking() -> str:
        trio.from_thread.run_sync(in_thread.set)
        release.wait()
        return "late"

    @tool("stuck", "A blocking call that ignores cancellation.")
    async def stuck(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        return await trio.to_thread.run_sync(blocking)

    lease = await start_chat(store)
    model = ScriptedModel([tool_step([("echo", {"a": 1}), ("stuck", {})]), text_step("never")])
    control = TurnControl()
    rec = Recorder()
    late_seen = trio.Event()

    def on_late(call: ToolCallPart) -> None:
        rec.on_late_tool_result(call)
        late_seen.set()

    callbacks = TurnCallbacks(on_message=rec.on_message, on_late_tool_result=on_late)

    async with trio.open_nursery() as tools_nursery:
        # The thread ignores cancellation: whatever fails here, let it end.
        try:
            async with trio.open_nursery() as nursery:
                results: list[TurnResult] = []

                async def turn() -> None:
                    results.append(
                        await run_turn(
                            store,
                            lease,
                            model,
                            tools=ToolRegistry([echo, stuck]),
                            control=control,
                            callbacks=callbacks,
                            tool_nursery=tools_nursery,
                        )
                    )

                nursery.start_soon(turn)
                await in_thread.wait()
                control.interrupt()
            # run_turn returned while the thread still blocks.
            assert not release.is_set()
            (result,) = results
            assert (result.outcome, result.final_state) == (TurnOutcome.INTERRUPTED, "interrupted")
            stored = await history(store, lease.chat_id)
            assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.TOOL]
            interrupted = ToolResultPart(
                "call_1",
                "stuck",
                {"error": "tool call was interrupted before it produced a result"},
                is_error=True,
            )
            assert tool_results(stored) == [ToolResultPart("call_0", "echo", {"a": 1}), interrupted]
            assert rec.late == []
        finally:
            release.set()
        await late_seen.wait()
    assert [c.call_id for c in rec.late] == ["call_1"]
    assert len(await history(store, lease.chat_id)) == 4
    assert [m.id for m in rec.messages] == [m.id for m in stored[1:]]


# -- recovery of a completed turn ---------------------------------------------------------


def _msg(role: Role, *parts: Any, compressed: bool = False) -> PromptMessage:
    return NewMessage(role, tuple(parts), compressed=compressed)


USER = _msg(Role.USER, TextPart("q"))
ANSWER = _msg(Role.ASSISTANT, TextPart("a"))
CALL = _msg(Role.ASSISTANT, ToolCallPart("c1", "echo", "{}"))
RESULT = _msg(Role.TOOL, ToolResultPart("c1", "echo", {}))


@pytest.mark.parametrize(
    ("prompt", "answered"),
    [
        ([USER, ANSWER], True),
        ([USER, CALL, RESULT, ANSWER], True),
        # a summary (compressed user message) is not the question being answered
        ([USER, _msg(Role.USER, TextPart("summary"), compressed=True), ANSWER], True),
        ([USER], False),
        ([USER, CALL, RESULT], False),  # the model has not answered the tool result yet
        ([USER, CALL], False),
        ([USER, _msg(Role.ASSISTANT, TextPart("a"), ToolCallPart("c2", "echo", "{}"))], False),
        ([USER, CALL, ANSWER], False),  # a call without a result
        ([USER, ANSWER, USER], False),  # a follow-up question
        ([ANSWER], False),
        ([], False),
    ],
)
def test_already_answered(prompt: list[PromptMessage], answered: bool) -> None:
    assert already_answered(prompt) is answered


async def test_a_recovered_turn_whose_answer_is_stored_ends_answered_without_the_model(
    store: Store,
) -> None:
    """The answer was stored, the run's finish was not (an older replica, a crash); the
    chat was recovered and acquired again: the new run finishes it without a second
    answer (docs/spec.md §1, idempotent completion)."""
    first = await start_chat(store, "question")
    await store.persist_step(first, [NewMessage(Role.ASSISTANT, (TextPart("the answer"),))])
    await store.release([first])
    (chat,) = await store.acquire(uuid.uuid4(), 1)
    lease = Lease.of(chat)
    model = ScriptedModel([text_step("a second answer")])

    result = await run_turn(store, lease, model)

    assert (result.outcome, result.final_state) == (TurnOutcome.DONE, "answered")
    assert result.trace == (Step("loading", "loaded", "answered", "already_answered"),)
    assert (result.steps, model.stream_count, result.final_messages) == (0, 0, ())
    fin = await finish(store, lease, result)
    assert (fin.changed, fin.chat.status) == (True, ChatStatus.WAITING)
    stored = await history(store, lease.chat_id)
    assert [m.parts for m in stored] == [(TextPart("question"),), (TextPart("the answer"),)]
