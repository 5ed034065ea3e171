"""Random interleavings of two workers and a user against the store, with the
lifecycle chart as the oracle (docs/spec.md §1 and §2).

Operations: create, send, edit, interrupt (the user); acquire, heartbeat, persist,
finish with any outcome, stale recovery (workers `w0` and `w1`). A plain model
holds what docs/spec.md §1 says each operation does; after every operation the
store must agree with it.

Invariants checked after every operation, for every chat:
- status transitions: every change is an event of `ChatLifecycleChart` sent to a
  per-chat chart, whose state must then equal the stored status; the whole observed
  status sequence is a valid path (`check_status_path`);
- ownership: `running` if and only if a worker is set, and that worker is the one
  the model says acquired it; a heartbeat or a persist succeeds only for the owner
  (persist also on a `waiting` chat); a finish by anyone else changes nothing;
  acquisition claims exactly the pending chats, oldest first, never a running one;
- queue: queued messages are promoted in FIFO order, exactly once, only by a final
  transition; an edit clears the queue; the 4th queued message is refused;
- history: the live messages equal the model's, in id order (edits soft-delete the
  edited message and everything after it).

A user stop wins: once a chat is `waiting` (interrupted), the turn's final
transition ends like the interrupt whatever the turn's own outcome.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatd_trio.domain import ChatStatus, NewMessage, Role, TextPart, Visibility, text_of
from chatd_trio.errors import EditRefused, MessageNotFound, PersistRefused, QueueFull
from chatd_trio.store.base import Store, TurnOutcome
from chatd_trio.store.memory import MemoryStore
from statecharts.base import Step, transitions_of
from statecharts.lifecycle import EVENTS_BETWEEN, ChatLifecycleChart, check_status_path

MAX_QUEUED = 3
MAX_CHATS = 3
WORKERS = (uuid.UUID(int=100), uuid.UUID(int=101))
OWNER = uuid.UUID(int=1)

# Every chart transition fired by any example (coverage, asserted below).
FIRED: set[Step] = set()

chat_index = st.integers(0, MAX_CHATS - 1)
# One past the last worker means "the chat's owner, if any": races are rare otherwise.
worker_index = st.integers(0, len(WORKERS))
OPS = st.one_of(
    st.tuples(st.just("create")),
    st.tuples(st.just("send"), chat_index),
    # -1 picks the latest live user message.
    st.tuples(st.just("edit"), chat_index, st.integers(-1, 6)),
    st.tuples(st.just("interrupt"), chat_index),
    st.tuples(st.just("acquire"), st.integers(0, len(WORKERS) - 1), st.integers(1, 3)),
    st.tuples(st.just("heartbeat"), worker_index, chat_index),
    st.tuples(st.just("persist"), worker_index, chat_index),
    st.tuples(st.just("finish"), worker_index, chat_index, st.sampled_from(list(TurnOutcome))),
    st.tuples(st.just("stale")),
)


@dataclass
class Msg:
    id: int
    role: Role
    text: str
    deleted: bool = False


@dataclass
class ChatModel:
    id: uuid.UUID
    chart: ChatLifecycleChart
    status: ChatStatus = ChatStatus.PENDING
    worker: uuid.UUID | None = None
    queue: list[str] = field(default_factory=list)
    messages: list[Msg] = field(default_factory=list)
    # Order of the last status write: acquisition takes the oldest pending first.
    touched: int = 0
    path: list[str] = field(default_factory=lambda: ["new", "pending"])

    def live(self) -> list[tuple[str, str]]:
        return [(m.role.value, m.text) for m in self.messages if not m.deleted]


class Run:
    """Applies operations to the store and to the model, then compares them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.chats: list[ChatModel] = []
        self.counter = 0
        self.clock = 0

    def _text(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _transition(
        self, chat: ChatModel, status: ChatStatus, event: str | None = None, *, tick: bool = True
    ) -> None:
        """The model's status write; `event` names the chart event (else the table's).

        `tick=False`: written by the same statement as the previous write (same time)."""
        if tick:
            self.clock += 1
        chat.touched = self.clock
        if status is not chat.status or event == "edit":
            name = event or EVENTS_BETWEEN[(chat.status.value, status.value)][0]
            chat.chart.send(name)
            chat.path.append(status.value)
        chat.status = status
        if status is not ChatStatus.RUNNING:
            chat.worker = None

    async def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "create":
            await self.create()
            return
        if kind in ("acquire", "stale"):
            await (self.acquire(WORKERS[op[1]], op[2]) if kind == "acquire" else self.stale())
            return
        if not self.chats:
            return
        if kind == "send":
            await self.send(self.chats[op[1] % len(self.chats)])
        elif kind == "edit":
            await self.edit(self.chats[op[1] % len(self.chats)], op[2])
        elif kind == "interrupt":
            await self.interrupt(self.chats[op[1] % len(self.chats)])
        else:
            chat = self.chats[op[2] % len(self.chats)]
            owner = chat.worker or WORKERS[0]
            worker = WORKERS[op[1]] if op[1] < len(WORKERS) else owner
            if kind == "heartbeat":
                await self.heartbeat(worker, chat)
            elif kind == "persist":
                await self.persist(worker, chat)
            else:
                await self.finish(worker, chat, op[3])

    # -- the user -----------------------------------------------------------------
    async def create(self) -> None:
        if len(self.chats) >= MAX_CHATS:
            return
        text = self._text("u")
        row, first = await self.store.create_chat(OWNER, "t", (TextPart(text),))
        chart = ChatLifecycleChart()
        chart.send("create")
        self.clock += 1
        model = ChatModel(row.id, chart, touched=self.clock)
        model.messages.append(Msg(first.id, Role.USER, text))
        self.chats.append(model)

    async def send(self, chat: ChatModel) -> None:
        text = self._text("u")
        busy = chat.status in (ChatStatus.RUNNING, ChatStatus.PENDING) or chat.queue
        if busy and len(chat.queue) >= MAX_QUEUED:
            with pytest.raises(QueueFull):
                await self.store.send_message(chat.id, (TextPart(text),), max_queued=MAX_QUEUED)
            return
        result = await self.store.send_message(chat.id, (TextPart(text),), max_queued=MAX_QUEUED)
        if busy:
            assert result.message is None and result.queued is not None
            chat.queue.append(text)
            assert [text_of(q.parts) for q in result.queue] == chat.queue
            return
        assert result.message is not None
        chat.messages.append(Msg(result.message.id, Role.USER, text))
        self._transition(chat, ChatStatus.PENDING, "send_message")

    async def edit(self, chat: ChatModel, pick: int) -> None:
        text = self._text("e")
        if pick < 0:
            users = [
                i for i, m in enumerate(chat.messages) if m.role is Role.USER and not m.deleted
            ]
            pick = users[-1]
        if pick >= len(chat.messages):
            missing = 10_000_000 + pick
            with pytest.raises(MessageNotFound):
                await self.store.edit_message(chat.id, missing, (TextPart(text),))
            return
        target = chat.messages[pick]
        if target.deleted or target.role is not Role.USER:
            with pytest.raises(EditRefused):
                await self.store.edit_message(chat.id, target.id, (TextPart(text),))
            return
        result = await self.store.edit_message(chat.id, target.id, (TextPart(text),))
        for m in chat.messages:
            if m.id >= target.id:
                m.deleted = True
        chat.messages.append(Msg(result.message.id, Role.USER, text))
        chat.queue.clear()
        self._transition(chat, ChatStatus.PENDING, "edit")

    async def interrupt(self, chat: ChatModel) -> None:
        row = await self.store.interrupt(chat.id)
        if chat.status is ChatStatus.PENDING:
            assert row.status is ChatStatus.PENDING
            return
        self._transition(chat, ChatStatus.WAITING, "interrupt")

    # -- the workers ----------------------------------------------------------------
    async def acquire(self, worker: uuid.UUID, limit: int) -> None:
        # updated_at, then id: rows written by one statement share their updated_at.
        pending = sorted(
            (c for c in self.chats if c.status is ChatStatus.PENDING),
            key=lambda c: (c.touched, c.id),
        )
        expected = [c.id for c in pending[:limit]]
        claimed = await self.store.acquire(worker, limit)
        assert [c.id for c in claimed] == expected
        self.clock += 1
        for row in claimed:
            chat = next(c for c in self.chats if c.id == row.id)
            self._transition(chat, ChatStatus.RUNNING, "acquire", tick=False)
            chat.worker = worker
            assert row.worker_id == worker

    async def stale(self) -> None:
        # Store time strictly increases, so every running chat is older than 0 s.
        recovered = await self.store.recover_stale(0)
        running = {c.id for c in self.chats if c.status is ChatStatus.RUNNING}
        assert set(recovered) == running
        self.clock += 1
        for chat in self.chats:
            if chat.id in running:
                self._transition(chat, ChatStatus.PENDING, "stale_recovered", tick=False)

    def _owns(self, worker: uuid.UUID, chat: ChatModel) -> bool:
        return chat.status is ChatStatus.RUNNING and chat.worker == worker

    async def heartbeat(self, worker: uuid.UUID, chat: ChatModel) -> None:
        assert await self.store.heartbeat(chat.id, worker) == self._owns(worker, chat)

    async def persist(self, worker: uuid.UUID, chat: ChatModel) -> None:
        text = self._text("a")
        step = [NewMessage(Role.ASSISTANT, (TextPart(text),), Visibility.BOTH)]
        if not (self._owns(worker, chat) or chat.status is ChatStatus.WAITING):
            with pytest.raises(PersistRefused):
                await self.store.persist_step(chat.id, worker, step)
            return
        (msg,) = await self.store.persist_step(chat.id, worker, step)
        chat.messages.append(Msg(msg.id, Role.ASSISTANT, text))

    async def finish(self, worker: uuid.UUID, chat: ChatModel, outcome: TurnOutcome) -> None:
        allowed = self._owns(worker, chat) or chat.status is ChatStatus.WAITING
        was = chat.status
        if was is ChatStatus.WAITING:
            # A user stop wins: whatever the turn's outcome, it ends like the interrupt.
            outcome = TurnOutcome.INTERRUPTED
        result = await self.store.finish_turn(chat.id, worker, outcome, "boom")
        if not allowed:
            assert not result.changed and result.promoted is None
            assert result.owned_elsewhere == (chat.status is ChatStatus.RUNNING)
            return
        assert result.changed and not result.owned_elsewhere
        running = was is ChatStatus.RUNNING
        if outcome is TurnOutcome.ERROR:
            self._transition(chat, ChatStatus.ERROR, "fail")
            assert result.chat.last_error == "boom"
        elif outcome is TurnOutcome.SHUTDOWN:
            self._transition(chat, ChatStatus.PENDING, "shutdown" if running else None)
        elif chat.queue:
            head = chat.queue.pop(0)
            assert result.promoted is not None and text_of(result.promoted.parts) == head
            assert [text_of(q.parts) for q in result.queue] == chat.queue
            chat.messages.append(Msg(result.promoted.id, Role.USER, head))
            event = "finish_with_queued" if outcome is TurnOutcome.DONE else "interrupt_with_queued"
            self._transition(
                chat, ChatStatus.PENDING, event if running else "interrupt_with_queued"
            )
        else:
            assert result.promoted is None
            event = "finish_done" if outcome is TurnOutcome.DONE else "interrupt"
            self._transition(chat, ChatStatus.WAITING, event if running else None)

    # -- the oracle -------------------------------------------------------------------
    async def check(self) -> None:
        owners: dict[uuid.UUID, uuid.UUID] = {}
        for chat in self.chats:
            row = await self.store.get_chat(chat.id)
            assert row.status is chat.status
            assert chat.chart.state_id == row.status.value
            assert (row.status is ChatStatus.RUNNING) == (row.worker_id is not None)
            assert row.worker_id == chat.worker
            if row.worker_id is not None:
                owners[row.id] = row.worker_id
                assert row.heartbeat_at is not None and row.started_at is not None
            if row.status is not ChatStatus.ERROR:
                assert row.last_error is None
            queued = await self.store.list_queued(chat.id)
            assert [text_of(q.parts) for q in queued] == chat.queue
            live = await self.store.messages_after(chat.id, 0)
            assert [(m.role.value, text_of(m.parts)) for m in live] == chat.live()
        assert set(owners) == {c.id for c in self.chats if c.status is ChatStatus.RUNNING}

    def finish_run(self) -> None:
        for chat in self.chats:
            check_status_path(chat.path)
            FIRED.update(chat.chart.trace)


async def play(store: Store, ops: list[tuple[Any, ...]]) -> None:
    run = Run(store)
    for op in ops:
        await run.apply(op)
        await run.check()
    run.finish_run()


D, E, INT, S = TurnOutcome.DONE, TurnOutcome.ERROR, TurnOutcome.INTERRUPTED, TurnOutcome.SHUTDOWN
OWN = len(WORKERS)  # the chat's owner
# One walk through every lifecycle transition (random runs rarely reach all of them).
EVERY_TRANSITION: list[tuple[Any, ...]] = [
    ("create",),
    ("edit", 0, -1),  # pending -> pending
    ("acquire", 0, 1),
    ("finish", OWN, 0, D),  # finish_done
    ("send", 0),  # waiting -> pending
    ("acquire", 1, 1),
    ("send", 0),  # queued
    ("finish", OWN, 0, D),  # finish_with_queued
    ("acquire", 0, 1),
    ("edit", 0, -1),  # running -> pending
    ("acquire", 0, 1),
    ("finish", OWN, 0, E),  # fail
    ("send", 0),  # error -> pending
    ("acquire", 1, 1),
    ("finish", OWN, 0, E),
    ("edit", 0, -1),  # error -> pending
    ("acquire", 0, 1),
    ("interrupt", 0),  # running -> waiting
    ("edit", 0, -1),  # waiting -> pending
    ("acquire", 0, 1),
    ("send", 0),
    ("finish", OWN, 0, INT),  # interrupt_with_queued
    ("acquire", 1, 1),
    ("finish", OWN, 0, S),  # shutdown
    ("acquire", 0, 1),
    ("stale",),  # stale_recovered
    ("acquire", 0, 1),
    ("finish", OWN, 0, E),
    ("interrupt", 0),  # error -> waiting
    ("send", 0),
    ("acquire", 1, 1),
    ("send", 0),  # queued
    ("interrupt", 0),  # running -> waiting, the queue kept
    ("finish", OWN, 0, D),  # the user stop wins: interrupt_with_queued from waiting
]


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, min_size=1, max_size=60))
@example(ops=EVERY_TRANSITION)
def test_interleavings_on_memory_follow_the_lifecycle(ops: list[tuple[Any, ...]]) -> None:
    async def main() -> None:
        await play(MemoryStore(), ops)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_every_lifecycle_transition_was_reached() -> None:
    """Runs after the memory property test (file order): the chart is fully covered."""
    if not FIRED:
        pytest.skip("the property test did not run in this session")
    missing = set(transitions_of(ChatLifecycleChart)) - FIRED
    assert not missing, (sorted(missing), sorted(FIRED))


@pytest.mark.postgres
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(OPS, min_size=1, max_size=25))
def test_interleavings_on_postgres_follow_the_lifecycle(
    pg_dsn: str, ops: list[tuple[Any, ...]]
) -> None:
    from chatd_trio.store.postgres import PostgresStore
    from tests.pgcluster import truncate_all

    async def main() -> None:
        async with PostgresStore.open(pg_dsn, min_size=1, max_size=2) as store:
            await trio.to_thread.run_sync(truncate_all, pg_dsn)
            await play(store, ops)

    trio.run(main)


# -- a user stop wins over the turn's own outcome -------------------------------------


async def _memory(fn: Callable[[MemoryStore, uuid.UUID], Awaitable[None]]) -> None:
    store = MemoryStore()
    chat, _ = await store.create_chat(OWNER, "t", (TextPart("hi"),))
    await fn(store, chat.id)


async def test_interrupt_of_an_error_chat_follows_the_chart() -> None:
    async def scenario(store: MemoryStore, chat_id: uuid.UUID) -> None:
        await store.acquire(WORKERS[0], 1)
        await store.finish_turn(chat_id, WORKERS[0], TurnOutcome.ERROR, "boom")
        row = await store.interrupt(chat_id)
        assert row.status is ChatStatus.WAITING
        check_status_path(["running", "error", row.status.value])

    await _memory(scenario)


@pytest.mark.parametrize("outcome", [TurnOutcome.ERROR, TurnOutcome.SHUTDOWN])
async def test_a_user_stop_wins_over_a_failed_or_shut_down_turn(outcome: TurnOutcome) -> None:
    async def scenario(store: MemoryStore, chat_id: uuid.UUID) -> None:
        await store.acquire(WORKERS[0], 1)
        await store.interrupt(chat_id)
        result = await store.finish_turn(chat_id, WORKERS[0], outcome, "boom")
        assert result.chat.status is ChatStatus.WAITING
        assert result.chat.last_error is None
        check_status_path(["running", "waiting", result.chat.status.value])

    await _memory(scenario)
