"""The Server (docs/spec.md §1 and §2) on the in-memory store and on PostgreSQL.

Every test runs twice: `memory` (MemoryStore + MemoryPubSub, MockClock with
autojump, store timestamps on Trio's clock) and `postgres` (PostgresStore +
PostgresPubSub on the session database, wiped first, real clock, short intervals).
Tests wait on stream events, on final transitions recorded by a thin store wrapper
(`ObservedStore`, which also injects store faults) or on turn ends recorded by the
server (`ObservedServer`: a fenced turn writes nothing, so the store never hears of
its end), never on time passing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import trio
import trio.testing

from chatd_trio.config import AcquireConfig, Config, StoreRetryConfig
from chatd_trio.domain import (
    JSON,
    ChatStatus,
    ErrorEvent,
    Message,
    MessageEvent,
    NewMessage,
    Role,
    TextPart,
    ToolResultPart,
    Visibility,
    text_of,
)
from chatd_trio.errors import (
    ChatNotFound,
    ConfigError,
    EditRefused,
    MessageNotFound,
    PermissionDenied,
    QueuedMessageNotFound,
    StoreError,
)
from chatd_trio.models.base import Model, PromptMessage
from chatd_trio.models.scripted import ScriptedModel, ScriptStep, text_step, tool_step
from chatd_trio.pubsub.base import PubSub
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.server import Server, TurnEnv
from chatd_trio.store.base import Lease, Store, TurnOutcome
from chatd_trio.store.memory import MemoryStore
from chatd_trio.strategies import Announce, Strategies
from chatd_trio.tools import ToolContext, ToolRegistry, tool
from tests.server_replica import (
    MEMORY_CONFIG,
    MODEL_ERROR_PREFIX,
    PARTIAL,
    POSTGRES_CONFIG,
    WAIT,
    Finished,
    ObservedServer,
    ObservedStore,
    answering_model,
    hanging_model,
    registry,
    status_events,
    trio_clock,
    until_part,
    until_statuses,
    user_model,
)

KINDS = ["memory", "postgres"]


@dataclass
class Env:
    kind: str
    store: ObservedStore
    pubsub: PubSub
    config: Config
    dsn: str | None

    def server(
        self,
        model: Model,
        *,
        config: Config | None = None,
        tools: ToolRegistry | None = None,
        on_turn: Callable[[TurnEnv], None] | None = None,
        notifies: bool = True,
        strategies: Strategies | None = None,
    ) -> ObservedServer:
        """A Server on this env; `on_turn` runs as each turn starts (its tools factory).

        `notifies=False` gives a replica without pubsub, that hears no notifies (its turns
        have no control listener): it learns of a lost chat only through its own writes."""
        reg = tools if tools is not None else registry()

        async def factory(env: TurnEnv) -> ToolRegistry:
            if on_turn is not None:
                on_turn(env)
            await trio.lowlevel.checkpoint()
            return reg

        return ObservedServer(
            self.store,  # type: ignore[arg-type]
            self.pubsub if notifies else None,
            model,
            config or self.config,
            tools_factory=factory,
            strategies=strategies,
        )

    async def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        assert self.dsn is not None
        return await trio.to_thread.run_sync(_sql, self.dsn, query, params)


def _sql(dsn: str, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock(kind: str) -> trio.testing.MockClock | None:
    """pytest-trio runs the test on this clock when it is one (memory only)."""
    return trio.testing.MockClock(autojump_threshold=0) if kind == "memory" else None


@pytest.fixture
def env_dsn(kind: str, request: pytest.FixtureRequest) -> str | None:
    return str(request.getfixturevalue("pg_dsn")) if kind == "postgres" else None


@pytest.fixture
async def env(kind: str, env_dsn: str | None) -> AsyncIterator[Env]:
    """An empty store + pubsub of the given kind."""
    if kind == "memory":
        pubsub = MemoryPubSub()
        store = ObservedStore(MemoryStore(clock=trio_clock, pubsub=pubsub))
        yield Env(kind, store, pubsub, MEMORY_CONFIG, None)
        return
    assert env_dsn is not None
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore
    from tests.pgcluster import truncate_all

    async with PostgresStore.open(env_dsn) as pg_store:
        await trio.to_thread.run_sync(truncate_all, env_dsn)
        async with PostgresPubSub.open(env_dsn) as pubsub:
            yield Env(kind, ObservedStore(pg_store), pubsub, POSTGRES_CONFIG, env_dsn)


# -- helpers ---------------------------------------------------------------------------


async def history(store: Store | ObservedStore, chat_id: uuid.UUID) -> list[tuple[str, str]]:
    """(role, text) of the chat's visible messages."""
    messages: list[Message] = await store.messages_after(chat_id, 0)
    return [(m.role.value, text_of(m.parts)) for m in messages]


def user_texts(pairs: list[tuple[str, str]]) -> list[str]:
    return [t for r, t in pairs if r == Role.USER.value]


async def settle(kind: str) -> None:
    """Let every task run until blocked (memory); a no-op checkpoint on PostgreSQL."""
    if kind == "memory":
        await trio.testing.wait_all_tasks_blocked()
    else:
        await trio.lowlevel.checkpoint()


OWNER = uuid.UUID(int=1)
OTHER = uuid.UUID(int=2)


def assert_changed_nothing(finishes: list[Finished], token: int) -> None:
    """Every final transition the run holding `token` tried was refused, inserted nothing."""
    for finish in finishes:
        if finish.lease.token == token:
            assert not finish.result.changed and finish.result.inserted == ()


# -- a turn end to end -------------------------------------------------------------------


async def test_turn_runs_to_waiting_and_publishes_in_order(env: Env, clock: Any) -> None:
    async with env.server(user_model()) as server:
        chat = await server.create_chat(OWNER, "tools please", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            events = await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
        stored = await env.store.get_chat(chat.id)
        assert stored.status is ChatStatus.WAITING
        assert stored.worker_id is None and stored.heartbeat_at is None
        assert (await history(env.store, chat.id))[-1] == ("assistant", "done")
        running = [e for e in status_events(events) if e.status is ChatStatus.RUNNING]
        assert running[-1].worker_id == server.worker_id
        # `waiting` is announced in the finish's transaction: it can arrive first.
        await env.store.wait_finished(chat.id)
        stats = server.stats()
        assert stats.turns_finished == {"done": 1}
        assert stats.steps == 2
        # The JSON form (health endpoints, the demo's replicas) carries the same counters.
        data = json.loads(json.dumps(stats.as_dict()))
        assert data["worker_id"] == str(server.worker_id)
        assert data["turns_finished"] == {"done": 1}
        assert data["steps"] == 2
        assert data["workspace"]["dials"] == stats.workspace.dials
        assert data["streams"]["notifies_rejected"] == stats.streams.notifies_rejected


# -- interrupt -------------------------------------------------------------------------


async def test_interrupt_clears_the_worker_and_keeps_the_partial_output(
    env: Env, clock: Any
) -> None:
    async with env.server(user_model()) as server:
        chat = await server.create_chat(OWNER, "hang on", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            await until_part(sub)
            interrupted = await server.interrupt(OWNER, chat.id)
            assert interrupted.status is ChatStatus.WAITING
            assert interrupted.worker_id is None
            await env.store.wait_finished(chat.id)
        stored = await env.store.get_chat(chat.id)
        assert stored.status is ChatStatus.WAITING
        assert stored.worker_id is None and stored.started_at is None
        assert await history(env.store, chat.id) == [("user", "hang on"), ("assistant", PARTIAL)]
        assert server.stats().turns_finished == {"interrupted": 1}
        # Counted once, though the control listener hears the stop too.
        assert server.stats().interrupts == 1


# -- heartbeat and ownership -----------------------------------------------------------


async def take_over(env: Env, chat_id: uuid.UUID, thief: uuid.UUID) -> None:
    """Another run holds the running chat now (a newer ownership token); nobody is
    notified."""
    if env.kind == "memory":
        assert await env.store.recover_stale(0) == [chat_id]
        (chat,) = await env.store.acquire(thief, 1)
        assert chat.id == chat_id
    else:
        # What a stale recovery and an acquisition by `thief` leave, without their notifies.
        await env.sql(
            "UPDATE chats SET worker_id = %s, owner_token = owner_token + 2 WHERE id = %s",
            thief,
            chat_id,
        )


async def test_heartbeat_requires_ownership_takeover_stops_the_turn_silently(
    env: Env, clock: Any
) -> None:
    thief = uuid.uuid4()
    async with env.server(user_model()) as server:
        chat = await server.create_chat(OWNER, "hang on", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            await until_part(sub)
            published = server.streams.statistics().events_published.copy()
            await take_over(env, chat.id, thief)
            # The heartbeat is refused; the turn ends fenced, without a final transition.
            assert await server.wait_ended(chat.id) is TurnOutcome.LOST
            assert env.store.finishes(chat.id) == []
            # Nothing was published after the takeover: no status, no message, no error.
            assert server.streams.statistics().events_published == published
            stats = server.stats()
            assert stats.heartbeats_lost == 1
            assert stats.fenced == 1
            assert stats.turns_finished == {"lost": 1}
        stored = await env.store.get_chat(chat.id)
        assert stored.status is ChatStatus.RUNNING and stored.worker_id == thief
        # The partial step was not written: the thief holds the row.
        assert await history(env.store, chat.id) == [("user", "hang on")]


# -- the queue ---------------------------------------------------------------------------


async def test_busy_chat_queues_fifo_even_behind_a_backlog_while_waiting(
    env: Env, clock: Any
) -> None:
    async with env.server(user_model()) as server:
        chat = await server.create_chat(OWNER, "hang first", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            await until_statuses(sub, [ChatStatus.RUNNING])
            first = await server.send_message(OWNER, chat.id, "second")
            assert first.message is None and first.queued is not None
            # The row goes waiting behind the server's back (no notify, no local stop):
            # a queue exists, so the next message still queues behind it.
            await env.store.interrupt(chat.id)
            second = await server.send_message(OWNER, chat.id, "third")
            assert second.message is None and second.queued is not None
            assert [text_of(q.parts) for q in second.queue] == ["second", "third"]
            await server.interrupt(OWNER, chat.id)
            # Turn 1 ends (promotes "second"), turn 2 answers and promotes "third", turn 3.
            await env.store.wait_finished(chat.id, 3)
            await until_statuses(sub, [ChatStatus.WAITING])
        pairs = await history(env.store, chat.id)
        assert user_texts(pairs) == ["hang first", "second", "third"]
        assert pairs[-1] == ("assistant", "re: third")
        assert await env.store.list_queued(chat.id) == []
        assert (await env.store.get_chat(chat.id)).status is ChatStatus.WAITING


async def test_busy_behavior_interrupt_queues_then_interrupts(env: Env, clock: Any) -> None:
    async with env.server(user_model()) as server:
        chat = await server.create_chat(OWNER, "hang first", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            await until_part(sub)
            sent = await server.send_message(OWNER, chat.id, "now", busy_behavior="interrupt")
            assert sent.message is None and sent.queued is not None
            fin = await env.store.wait_finished(chat.id)
            assert fin.promoted is not None and text_of(fin.promoted.parts) == "now"
            await env.store.wait_finished(chat.id, 2)
        assert await history(env.store, chat.id) == [
            ("user", "hang first"),
            ("assistant", PARTIAL),
            ("user", "now"),
            ("assistant", "re: now"),
        ]
        assert server.stats().turns_finished == {"interrupted": 1, "done": 1}
        assert (await env.store.get_chat(chat.id)).status is ChatStatus.WAITING


# -- edit ------------------------------------------------------------------------------


async def test_edit_truncates_clears_the_queue_and_sets_pending(env: Env, clock: Any) -> None:
    async with env.server(user_model()) as server:
        chat = await server.create_chat(OWNER, "hello", title="t")
        await env.store.wait_finished(chat.id)
        sent = await server.send_message(OWNER, chat.id, "hang here")
        assert sent.message is not None
        async with server.subscribe(OWNER, chat.id, after_message_id=sent.message.id) as sub:
            # A partial step exists: the stopped turn will try to write it.
            await until_part(sub)
            stopped_token = (await env.store.get_chat(chat.id)).owner_token
            queued = await server.send_message(OWNER, chat.id, "queued one")
            assert queued.queued is not None
            edited = await server.edit_message(OWNER, chat.id, sent.message.id, "edited")
            assert edited.chat.status is ChatStatus.PENDING
            assert edited.chat.worker_id is None
            assert await env.store.list_queued(chat.id) == []
            # The hanging turn is refused its partial step and its finish (if it gets as
            # far as trying) changes nothing: the row is pending, or held by the re-run.
            assert await server.wait_ended(chat.id, outcome=TurnOutcome.LOST)
            rerun = await env.store.wait_finish(chat.id, 2, outcome=TurnOutcome.DONE)
            assert rerun.result.changed and rerun.result.chat.status is ChatStatus.WAITING
            assert rerun.lease.token > stopped_token
        assert_changed_nothing(env.store.finishes(chat.id), stopped_token)
        assert await history(env.store, chat.id) == [
            ("user", "hello"),
            ("assistant", "re: hello"),
            ("user", "edited"),
            ("assistant", "re: edited"),
        ]
        assert await env.store.list_queued(chat.id) == []
    # The stopped turn wrote nothing into the re-run chat: its token was fenced out.
    assert server.stats().turns_finished == {"done": 2, "lost": 1}
    assert server.stats().fenced == 1


async def test_a_stopped_turn_ending_slowly_does_not_hold_up_or_touch_the_chat_run_again(
    env: Env, clock: Any
) -> None:
    """Ownership is the run's token: the edited chat is acquired here again at once,
    while the stopped turn is still releasing its resources, and that turn's final
    transition, arriving after the re-run's answer, changes nothing."""
    release = trio.Event()
    turns = 0

    async def slow_release() -> None:
        # A turn-local resource (a workspace connection) that takes a while to release.
        with trio.fail_after(WAIT):
            await release.wait()

    def on_turn(turn: TurnEnv) -> None:
        nonlocal turns
        turns += 1
        if turns == 1:
            turn.cleanups.append(slow_release)

    async with env.server(user_model(), on_turn=on_turn) as server:
        chat = await server.create_chat(OWNER, "hang here", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            await until_part(sub)
            stopped_token = (await env.store.get_chat(chat.id)).owner_token
            first = (await env.store.messages_after(chat.id, 0))[0]
            await server.edit_message(OWNER, chat.id, first.id, "edited")
            rerun = await env.store.wait_finish(chat.id)
            assert rerun.outcome is TurnOutcome.DONE and rerun.lease.token > stopped_token
            assert rerun.result.changed and rerun.result.chat.status is ChatStatus.WAITING
            # The stopped turn is still in its cleanup: it has not ended yet.
            assert server.stats().turns_finished == {"done": 1}
            release.set()
            assert await server.wait_ended(chat.id, outcome=TurnOutcome.LOST)
    assert_changed_nothing(env.store.finishes(chat.id), stopped_token)
    assert await history(env.store, chat.id) == [("user", "edited"), ("assistant", "re: edited")]
    assert server.stats().turns_finished == {"lost": 1, "done": 1}
    assert server.stats().fenced == 1


async def test_edit_of_a_missing_or_non_user_message_is_refused_and_changes_nothing(
    env: Env, clock: Any
) -> None:
    async with env.server(user_model()) as server:
        chat = await server.create_chat(OWNER, "hello", title="t")
        other = await server.create_chat(OWNER, "elsewhere", title="t2")
        await env.store.wait_finished(chat.id)
        await env.store.wait_finished(other.id)
        messages = await env.store.messages_after(chat.id, 0)
        assistant = next(m for m in messages if m.role is Role.ASSISTANT)
        other_first = (await env.store.messages_after(other.id, 0))[0]
        before = (await env.store.get_chat(chat.id), await history(env.store, chat.id))
        with pytest.raises(MessageNotFound):
            await server.edit_message(OWNER, chat.id, 10_000, "x")
        with pytest.raises(EditRefused):
            await server.edit_message(OWNER, chat.id, assistant.id, "x")
        with pytest.raises(EditRefused):
            await server.edit_message(OWNER, chat.id, other_first.id, "x")
        await settle(env.kind)
        after = (await env.store.get_chat(chat.id), await history(env.store, chat.id))
        assert after == before
        assert after[0].status is ChatStatus.WAITING


# -- errors ------------------------------------------------------------------------------


async def test_last_error_is_stored_on_error_and_cleared_by_the_next_send(
    env: Env, clock: Any
) -> None:
    async with env.server(user_model()) as server:
        chat = await server.create_chat(OWNER, "fail now", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            events = await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.ERROR])
            errors = [e for e in events if isinstance(e, ErrorEvent)]
            assert [e.error.message for e in errors] == [MODEL_ERROR_PREFIX + "fail now"]
            stored = await env.store.get_chat(chat.id)
            assert stored.status is ChatStatus.ERROR
            assert stored.last_error == MODEL_ERROR_PREFIX + "fail now"
            sent = await server.send_message(OWNER, chat.id, "try again")
            assert sent.chat.status is ChatStatus.PENDING and sent.chat.last_error is None
            await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
        stored = await env.store.get_chat(chat.id)
        assert stored.status is ChatStatus.WAITING and stored.last_error is None
        # `waiting` is announced in the finish's transaction: it can arrive before the
        # replica has counted the turn.
        await env.store.wait_finished(chat.id, 2)
        assert server.stats().turns_finished == {"error": 1, "done": 1}


@pytest.mark.parametrize(
    ("prompt", "error"),
    [
        # A tool step: its write (before the next model call) fails.
        ("tools boom", "disk on fire"),
        # A one-step answer: it is written with the finish, which fails.
        ("boom please", "the answer could not be stored: disk on fire"),
    ],
    ids=["step", "final_answer"],
)
async def test_persist_failure_ends_the_chat_in_error_and_the_server_keeps_serving(
    env: Env, clock: Any, prompt: str, error: str
) -> None:
    """A write the store refuses for good (not a transient fault) ends the turn in
    `error` and says why; nothing of the refused write is stored."""
    env.store.fail_marker = "boom"
    async with env.server(user_model()) as server:
        broken = await server.create_chat(OWNER, prompt, title="t")
        fin = await env.store.wait_finished(broken.id)
        assert fin.chat.status is ChatStatus.ERROR
        assert fin.chat.last_error == error
        healthy = await server.create_chat(OWNER, "hello", title="t2")
        fin = await env.store.wait_finished(healthy.id)
        assert fin.chat.status is ChatStatus.WAITING
        assert server.stats().turns_finished == {"error": 1, "done": 1}
        assert server.stats().store_retries == 0
    assert await history(env.store, broken.id) == [("user", prompt)]
    assert await history(env.store, healthy.id) == [("user", "hello"), ("assistant", "re: hello")]


# -- stale recovery ----------------------------------------------------------------------


async def make_stale(env: Env, chat_id: uuid.UUID, dead_worker: uuid.UUID) -> None:
    """The chat runs on a dead worker whose last heartbeat is older than stale_after."""
    if env.kind == "memory":
        (chat,) = await env.store.acquire(dead_worker, 1)
        assert chat.id == chat_id
        # Store time follows the mock clock: let it run past stale_after.
        await trio.sleep(env.config.acquire.stale_after + 1)
    else:
        await env.sql(
            "UPDATE chats SET status = 'running', worker_id = %s, started_at = now(),"
            " heartbeat_at = now() - interval '1 hour' WHERE id = %s",
            dead_worker,
            chat_id,
        )


async def age_heartbeat(env: Env, chat_id: uuid.UUID) -> None:
    """The running chat's last heartbeat is older than stale_after (its worker died)."""
    if env.kind == "memory":
        await trio.sleep(env.config.acquire.stale_after + 1)
    else:
        await env.sql(
            "UPDATE chats SET heartbeat_at = now() - interval '1 hour' WHERE id = %s", chat_id
        )


async def test_stale_chats_are_recovered_at_start_up_and_periodically_waiting_never(
    env: Env, clock: Any
) -> None:
    dead = uuid.uuid4()
    waiting, _ = await env.store.create_chat(OWNER, "w", (TextPart("hello"),))
    (acquired,) = await env.store.acquire(dead, 1)
    await env.store.finish_turn(Lease.of(acquired), TurnOutcome.DONE)
    waiting_before = await env.store.get_chat(waiting.id)
    assert waiting_before.status is ChatStatus.WAITING
    at_start, _ = await env.store.create_chat(OWNER, "s", (TextPart("from the dead"),))
    await make_stale(env, at_start.id, dead)
    # Only wakes acquire: chats created in the store directly wait for stale recovery.
    config = env.config.replace(
        acquire=dataclasses.replace(env.config.acquire, acquire_interval=10 * WAIT)
    )
    async with env.server(user_model(), config=config) as server:
        # Recovered by the start-up pass, before the first acquisition.
        assert server.stats().stale_recovered == 1
        fin = await env.store.wait_finished(at_start.id)
        assert fin.chat.status is ChatStatus.WAITING
        # Periodic: a chat whose worker dies while this server runs.
        later, _ = await env.store.create_chat(OWNER, "p", (TextPart("later"),))
        await make_stale(env, later.id, dead)
        fin = await env.store.wait_finished(later.id)
        assert fin.chat.status is ChatStatus.WAITING
        assert server.stats().stale_recovered == 2
    assert await history(env.store, at_start.id) == [
        ("user", "from the dead"),
        ("assistant", "re: from the dead"),
    ]
    assert await env.store.get_chat(waiting.id) == waiting_before


# -- close -------------------------------------------------------------------------------


async def test_close_during_a_stream_hands_the_chat_back_and_another_replica_completes_it(
    env: Env, clock: Any
) -> None:
    started = trio.Event()
    async with env.server(hanging_model(), on_turn=lambda _: started.set()) as first:
        chat = await first.create_chat(OWNER, "long story", title="t")
        with trio.fail_after(WAIT):
            await started.wait()
    fin = await env.store.wait_finished(chat.id)
    assert fin.changed and fin.chat.status is ChatStatus.PENDING
    assert fin.chat.last_error is None and fin.chat.worker_id is None
    assert first.stats().turns_finished == {"shutdown": 1}
    # A shutdown writes nothing: the partial stream is not persisted.
    assert await history(env.store, chat.id) == [("user", "long story")]
    async with env.server(answering_model()) as second:
        fin = await env.store.wait_finished(chat.id, 2)
        assert fin.chat.status is ChatStatus.WAITING
        assert second.stats().turns_finished == {"done": 1}
    assert await history(env.store, chat.id) == [
        ("user", "long story"),
        ("assistant", "re: long story"),
    ]


# -- acquisition -------------------------------------------------------------------------


async def test_acquisition_batches_and_loops_while_full(env: Env, clock: Any) -> None:
    created = []
    for i in range(25):
        chat, _ = await env.store.create_chat(OWNER, f"c{i}", (TextPart(f"hang {i}"),))
        created.append(chat.id)
    base = env.store.statement_counts().get("AcquireChats", 0)
    assert env.store.acquired == []
    order: list[uuid.UUID] = []
    all_started = trio.Event()

    def on_turn(turn: TurnEnv) -> None:
        order.append(turn.chat.id)
        if len(order) == 25:
            all_started.set()

    config = env.config.replace(
        acquire=dataclasses.replace(env.config.acquire, acquire_interval=10 * WAIT)
    )
    async with env.server(hanging_model(), config=config, on_turn=on_turn) as server:
        with trio.fail_after(WAIT):
            await all_started.wait()
        # One tick: 10 + 10 + 5, three statements, no fourth (the last batch was short).
        assert env.store.statement_counts()["AcquireChats"] - base == 3
        assert server.stats().acquire_statements == 3
        assert server.stats().acquired == 25
        assert server.running_chats == frozenset(created)
        # Oldest first, in batches of at most ten.
        batches = env.store.acquired[-3:]
        assert [len(b) for b in batches] == [10, 10, 5]
        assert [c for b in batches for c in b] == created
    assert server.stats().turns_finished == {"shutdown": 25}


@pytest.mark.parametrize("kind", ["memory"], indirect=True)
async def test_create_chat_wakes_acquisition_at_once(clock: Any) -> None:
    """With MockClock the turn starts at the virtual instant the chat was created."""
    store = MemoryStore(clock=trio_clock)
    starts: list[float] = []

    async def factory(turn: TurnEnv) -> ToolRegistry:
        starts.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        return registry()

    config = MEMORY_CONFIG.replace(acquire=AcquireConfig(acquire_interval=30.0))
    async with Server(store, None, answering_model(), config, tools_factory=factory) as server:
        first = await server.create_chat(OWNER, "at zero", title="t")
        async with server.subscribe(OWNER, first.id) as sub:
            await until_statuses(sub, [ChatStatus.WAITING])
        # Mid-way through an acquire interval: only the wake can start the turn now.
        await trio.sleep(7.25)
        created_at = trio.current_time()
        second = await server.create_chat(OWNER, "later", title="t")
        async with server.subscribe(OWNER, second.id) as sub:
            await until_statuses(sub, [ChatStatus.WAITING])
    assert starts == [0.0, created_at]
    assert created_at == 7.25


@pytest.mark.parametrize("kind", ["memory"], indirect=True)
async def test_acquire_loop_survives_a_store_failure(env: Env, clock: Any) -> None:
    """A failed acquisition is logged and the next wake acquires again."""
    real = env.store.inner.acquire
    calls = 0

    async def flaky(worker_id: uuid.UUID, limit: int, **kwargs: Any) -> list[Any]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            await trio.lowlevel.checkpoint()
            raise StoreError("connection reset")
        return await real(worker_id, limit, **kwargs)

    env.store.inner.acquire = flaky  # type: ignore[method-assign]
    async with env.server(answering_model()) as server:
        chat = await server.create_chat(OWNER, "hello", title="t")
        fin = await env.store.wait_finished(chat.id)
        assert fin.chat.status is ChatStatus.WAITING
    assert calls >= 3


# -- owner checks ------------------------------------------------------------------------


async def test_another_owner_gets_permission_denied_and_no_data(env: Env, clock: Any) -> None:
    async with env.server(user_model()) as server:
        chat = await server.create_chat(OWNER, "hang mine", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            await until_statuses(sub, [ChatStatus.RUNNING])
            queued = await server.send_message(OWNER, chat.id, "queued")
            assert queued.queued is not None
            first_id = (await env.store.messages_after(chat.id, 0))[0].id
            # The running turn's heartbeat may land meanwhile (every 0.2 s on PostgreSQL).
            before = (
                dataclasses.replace(await env.store.get_chat(chat.id), heartbeat_at=None),
                await history(env.store, chat.id),
                await env.store.list_queued(chat.id),
            )
            attempts: list[Callable[[], Awaitable[object]]] = [
                lambda: server.get_chat(OTHER, chat.id),
                lambda: server.messages(OTHER, chat.id),
                lambda: server.send_message(OTHER, chat.id, "mine now"),
                lambda: server.send_message(OTHER, chat.id, "x", busy_behavior="interrupt"),
                lambda: server.edit_message(OTHER, chat.id, first_id, "x"),
                lambda: server.interrupt(OTHER, chat.id),
                lambda: server.promote_queued(OTHER, chat.id, queued.queued.id),
                lambda: server.delete_queued(OTHER, chat.id, queued.queued.id),
                lambda: server.create_chat(OTHER, "child", title="c", parent_chat_id=chat.id),
            ]
            for attempt in attempts:
                with pytest.raises(PermissionDenied):
                    await attempt()
            with pytest.raises(PermissionDenied):
                async with server.subscribe(OTHER, chat.id):
                    pytest.fail("subscribed to another owner's chat")  # pragma: no cover
            with pytest.raises(ChatNotFound):
                await server.get_chat(OWNER, uuid.uuid4())
            with pytest.raises(QueuedMessageNotFound):
                await server.delete_queued(OWNER, chat.id, 10_000)
            after = (
                dataclasses.replace(await env.store.get_chat(chat.id), heartbeat_at=None),
                await history(env.store, chat.id),
                await env.store.list_queued(chat.id),
            )
            assert after == before
            assert after[0].status is ChatStatus.RUNNING
            assert server.stats().interrupts == 0
            assert await env.store.list_chats(OTHER) == []


# -- statement counts of a steady-state turn ---------------------------------------------

# Measured deltas of one steady-state turn (the chat's second turn, one tool call),
# from `send_message` to the final transition, with a subscriber attached. Acquisition,
# heartbeats and stale recovery are kept out of the way (long intervals): one wake-driven
# AcquireChats. Both adapters count the same statements.
#
# Changed with fenced ownership (issue 13): every status change is one guarded write
# that locks the row and reads it with its queue length (LockChatForUpdate +
# GetChatForWrite) and writes it as "UpdateChat" (was UpdateChatStatus). The owner check
# of send_message moved into that write (no GetChatByID), the queue's length comes
# with the row (no GetQueuedMessages; nothing to pop when it is empty: no
# PopQueuedMessage), and the final step is written by the finish itself: three
# guarded writes (send, step 1, step 2 + finish) instead of four locks.
STEADY_TURN = {
    "LockChatForUpdate": 3,  # send, step 1 (assistant + tool), step 2 with the finish
    "GetChatForWrite": 3,  # the row and its queue length, read under each lock
    "InsertChatMessages": 3,  # user message, step 1, step 2
    "UpdateChat": 2,  # pending (send), waiting (finish)
    "AcquireChats": 1,
    # The prompt: the acquisition reads the user's new message (the chat's tail) and
    # completes the prompt from the replica's cache (was GetPromptMessages, the whole
    # history).
    "GetPromptTails": 1,
    # Every notify, sent inside the writing transactions instead of by separate publishes
    # after the commits: the user message and `pending` (send), `running` (acquisition),
    # step 1, step 2 with `waiting` and the owner's list (finish).
    "NotifyInTransaction": 4,
}


async def test_steady_state_turn_statement_counts(env: Env, clock: Any) -> None:
    config = env.config.replace(
        acquire=AcquireConfig(
            acquire_interval=10 * WAIT, heartbeat_interval=10 * WAIT, stale_after=100 * WAIT
        )
    )
    async with env.server(user_model(), config=config) as server:
        chat = await server.create_chat(OWNER, "tools first", title="t")
        await env.store.wait_finished(chat.id)
        async with server.subscribe(OWNER, chat.id) as sub:
            await until_statuses(sub, [ChatStatus.WAITING])
            before = server.stats().statements
            await server.send_message(OWNER, chat.id, "tools again")
            await env.store.wait_finished(chat.id, 2)
            after = server.stats().statements
            await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
            after_sub = server.stats().statements
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v}
    sub_delta = {k: after_sub.get(k, 0) - after.get(k, 0) for k in after_sub}
    sub_delta = {k: v for k, v in sub_delta.items() if v}
    print(f"steady-state turn statements ({env.kind}): {delta}")
    assert delta == STEADY_TURN
    # The subscriber is served from the durable cache / the notify: no catch-up reads.
    assert sub_delta == {}
    assert sum(delta.values()) == sum(STEADY_TURN.values())


@pytest.mark.parametrize("kind", ["memory"], indirect=True)
async def test_store_error_in_a_shielded_write_during_cancellation_does_not_escape(
    clock: Any,
) -> None:
    """The replica's scope is cancelled while a step's write is in flight (a write the
    adapter shields: its COMMIT is under way) and that write then fails: the
    cancellation ends the server quietly (the error is logged, not raised out of its
    nursery) and the chat is handed back `pending`."""

    class FailingWrite(MemoryStore):
        entered = trio.Event()
        release = trio.Event()

        async def persist_step(self, *args: Any, **kwargs: Any) -> list[Message]:
            self.entered.set()
            with trio.CancelScope(shield=True):
                await self.release.wait()
            raise StoreError("database gone while the replica stops")

    store = FailingWrite(clock=trio_clock)
    # "tools ...": the tool step is written before the next model call.
    server = Server(store, None, user_model(), MEMORY_CONFIG, tools=registry())

    async def fail_the_write_once_cancelled() -> None:
        await trio.testing.wait_all_tasks_blocked()
        store.release.set()

    async with trio.open_nursery() as helper:
        with trio.CancelScope() as outer:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                chat = await server.create_chat(OWNER, "tools please", title="t")
                with trio.fail_after(WAIT):
                    await store.entered.wait()
                helper.start_soon(fail_the_write_once_cancelled)
                outer.cancel()
    assert outer.cancelled_caught and store.release.is_set()
    stored = await store.get_chat(chat.id)
    assert stored.status is ChatStatus.PENDING and stored.last_error is None
    assert await history(store, chat.id) == [("user", "tools please")]


async def test_a_turn_that_crashes_of_two_failures_at_once_names_both(env: Env, clock: Any) -> None:
    """A crash the server does not expect ends the turn in error with the crash as its
    message. A turn whose setup ran two things at once that both failed crashes of an
    exception group: the chat's error names every failure, not the first one only."""

    async def fail(message: str) -> None:
        raise RuntimeError(message)

    async def factory(turn: TurnEnv) -> ToolRegistry:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail, "instruction files unreadable")
            nursery.start_soon(fail, "mcp discovery failed")
        return registry()  # pragma: no cover - the nursery raised

    store: Any = env.store
    async with ObservedServer(
        store, env.pubsub, answering_model(), env.config, tools_factory=factory
    ) as server:
        chat = await server.create_chat(OWNER, "hello", title="t")
        fin = await env.store.wait_finish(chat.id)
    assert fin.outcome is TurnOutcome.ERROR
    error = fin.result.chat.last_error
    assert error is not None
    # Nursery order is the scheduler's: the failures in either order.
    assert sorted(error.split("; ")) == ["instruction files unreadable", "mcp discovery failed"]


async def test_an_exception_of_the_block_leaves_the_server_as_itself(env: Env, clock: Any) -> None:
    """The replica's nursery is an implementation detail: what the block raises leaves
    `async with Server` as itself, after the usual close (the running turn is shut
    down and its chat handed back)."""

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with env.server(hanging_model()) as server:
            chat = await server.create_chat(OWNER, "hang here", title="t")
            async with server.subscribe(OWNER, chat.id) as sub:
                await until_part(sub)
            raise Boom
    assert (await env.store.get_chat(chat.id)).status is ChatStatus.PENDING
    assert server.stats().turns_finished == {"shutdown": 1}


@pytest.mark.parametrize("kind", ["memory"], indirect=True)
async def test_a_close_cut_short_still_stops_the_replica(env: Env, clock: Any) -> None:
    """`close()` cancelled while a turn is still ending (its cleanup runs shielded, for
    up to `cleanup_timeout`): the replica stops anyway. `run` ends once that turn has
    ended, instead of waiting for a close that will not come back; leaving
    ``async with Server`` relies on this when `loop.close_timeout` cuts its close."""
    cleanup_started = trio.Event()

    async def slow_cleanup() -> None:
        cleanup_started.set()
        await trio.sleep_forever()

    def on_turn(turn: TurnEnv) -> None:
        turn.cleanups.append(slow_cleanup)

    server = env.server(hanging_model(), on_turn=on_turn)
    cleanup_timeout = env.config.loop.cleanup_timeout
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            chat = await server.create_chat(OWNER, "hang here", title="t")
            async with server.subscribe(OWNER, chat.id) as sub:
                await until_part(sub)
            closing = trio.current_time()
            with trio.move_on_after(1.0) as cut:
                await server.close()
            assert cut.cancelled_caught and cleanup_started.is_set()
    # The cleanup kept its whole bound, and the chat went back to pending.
    assert trio.current_time() == closing + cleanup_timeout
    assert (await env.store.get_chat(chat.id)).status is ChatStatus.PENDING
    assert server.stats().turns_finished == {"shutdown": 1}


# -- fenced ownership (issue 13) ---------------------------------------------------------


def paused_replica_config(config: Config) -> Config:
    """A replica frozen as by SIGSTOP: its heartbeat, stale recovery and acquisition poll
    do not run within the test (only a local wake acquires)."""
    frozen = 10_000 * WAIT
    return config.replace(
        acquire=dataclasses.replace(
            config.acquire,
            acquire_interval=frozen,
            heartbeat_interval=frozen,
            stale_after=frozen,
        )
    )


async def test_split_brain_the_paused_replica_writes_nothing_after_the_takeover(
    env: Env, clock: Any
) -> None:
    """Replica A is paused in a tool step past stale_after (its heartbeat cannot run, it
    hears no notify); B recovers the chat and answers. When A resumes, its step write
    carries a fenced token: nothing lands (no tool call or result after B's answer), A's
    turn ends fenced, counted, and the tool ran once."""
    entered, resume = trio.Event(), trio.Event()
    tool_runs = 0

    @tool("pause", "Blocks until the test resumes the replica.", {"type": "object"})
    async def pause(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        nonlocal tool_runs
        tool_runs += 1
        entered.set()
        await resume.wait()
        return {"resumed": True}

    def a_step(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
        if prompt and prompt[-1].role is Role.TOOL:
            return text_step("A's answer")
        return tool_step([("pause", {})], call_id_prefix=f"a{index}")

    a_server = env.server(
        ScriptedModel(a_step),
        config=paused_replica_config(env.config),
        tools=ToolRegistry([pause]),
        notifies=False,
    )
    async with a_server as a:
        chat = await a.create_chat(OWNER, "pause please", title="t")
        with trio.fail_after(WAIT):
            await entered.wait()
        a_token = (await env.store.get_chat(chat.id)).owner_token
        # B starts only now: the chat is running on A. Its stale recovery takes it back
        # once A's heartbeat is older than stale_after, and it answers.
        async with env.server(answering_model()) as b:
            answered = await env.store.wait_finish(chat.id)
            assert answered.lease.worker_id == b.worker_id and answered.lease.token > a_token
            assert answered.result.changed and answered.result.chat.status is ChatStatus.WAITING
            assert b.stats().stale_recovered == 1
            after_b = await history(env.store, chat.id)
            assert after_b == [("user", "pause please"), ("assistant", "re: pause please")]
            resume.set()
            assert await a.wait_ended(chat.id) is TurnOutcome.LOST
            assert b.stats().turns_finished == {"done": 1}
        stats = a.stats()
        assert stats.fenced == 1
        assert stats.turns_finished == {"lost": 1}
        assert stats.late_tool_results_dropped == 0
    # A tried no final transition; nothing of A's step landed.
    assert [f.lease.worker_id for f in env.store.finishes(chat.id)] == [b.worker_id]
    assert await history(env.store, chat.id) == after_b
    messages = await env.store.messages_after(chat.id, 0)
    assert all(isinstance(p, TextPart) for m in messages for p in m.parts)
    assert tool_runs == 1
    stored = await env.store.get_chat(chat.id)
    assert stored.status is ChatStatus.WAITING and stored.owner_token == answered.lease.token + 1


@pytest.mark.parametrize("after_commit", [False, True], ids=["before_commit", "after_commit"])
async def test_a_finish_failing_transiently_is_retried_and_answers_once(
    env: Env, clock: Any, after_commit: bool
) -> None:
    """The final transition (with the answer) meets StoreUnavailable twice: before its
    write, or after its COMMIT (the retry, same operation id, recognises it). The turn
    still ends `waiting`, with exactly one answer, published once."""
    env.store.fail_next("finish_turn", 2, after_commit=after_commit)
    async with env.server(user_model()) as server:
        chat = await server.create_chat(OWNER, "hello", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            events = await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
        fin = await env.store.wait_finished(chat.id)
        assert fin.changed and fin.chat.status is ChatStatus.WAITING
        stats = server.stats()
        assert env.store.injected == {"finish_turn": 2}
        assert stats.store_retries == 2
        assert stats.turns_finished == {"done": 1}
        assert stats.fenced == 0
    assert await history(env.store, chat.id) == [("user", "hello"), ("assistant", "re: hello")]
    answers = [
        e for e in events if isinstance(e, MessageEvent) and e.message.role is Role.ASSISTANT
    ]
    assert [text_of(e.message.parts) for e in answers] == ["re: hello"]
    assert ChatStatus.ERROR not in {e.status for e in status_events(events)}


@pytest.mark.parametrize("after_commit", [False, True], ids=["before_commit", "after_commit"])
async def test_a_step_write_failing_transiently_does_not_end_the_turn_in_error(
    env: Env, clock: Any, after_commit: bool
) -> None:
    """The tool step's write meets StoreUnavailable twice; it is retried under its
    operation id and lands once: one tool call, one result, the turn ends `done`."""
    env.store.fail_next("persist_step", 2, after_commit=after_commit)
    async with env.server(user_model()) as server:
        chat = await server.create_chat(OWNER, "tools please", title="t")
        fin = await env.store.wait_finished(chat.id)
        assert fin.changed and fin.chat.status is ChatStatus.WAITING
        assert fin.chat.last_error is None
        stats = server.stats()
        assert env.store.injected == {"persist_step": 2}
        assert stats.store_retries == 2
        assert stats.turns_finished == {"done": 1}
    messages = await env.store.messages_after(chat.id, 0)
    assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.ASSISTANT]
    assert text_of(messages[-1].parts) == "done"


@pytest.mark.parametrize("in_transaction", [True, False], ids=["notify_in_tx", "after_commit"])
async def test_a_finish_stored_unacknowledged_past_the_budget_still_reaches_subscribers(
    env: Env, clock: Any, in_transaction: bool
) -> None:
    """The final transition lands but its acknowledgement is lost on every attempt until
    the retry budget is spent: the replica cannot tell whether the answer is stored, so
    it tells the chat's subscribers to read the chat again. They receive the answer once
    and the `waiting` status, whether message notifies go with the insert or after it.
    (Found by the simulation: nothing announced the stored answer or the status.)"""
    loop = dataclasses.replace(
        env.config.loop,
        store_retry=StoreRetryConfig(base_delay=0.2, max_delay=0.4, budget=0.9),
    )
    config = env.config.replace(loop=loop)
    announce = Announce.IN_TRANSACTION if in_transaction else Announce.AFTER_COMMIT
    # Attempts at 0, 0.2 and 0.6 s: the first lands, the next two replay it; all three
    # answers are lost.
    env.store.fail_next("finish_turn", 3, after_commit=True)
    strategies = Strategies(announce=announce)
    async with env.server(user_model(), config=config, strategies=strategies) as server:
        chat = await server.create_chat(OWNER, "hello", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            events = await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
        # With notifies in the transaction, `waiting` arrives from the first attempt's
        # commit, before the replica has spent its retries.
        assert await server.wait_ended(chat.id) is TurnOutcome.DONE
        assert env.store.injected == {"finish_turn": 3}
        assert server.stats().store_retries == 2
    answers = [
        text_of(e.message.parts)
        for e in events
        if isinstance(e, MessageEvent) and e.message.role is Role.ASSISTANT
    ]
    assert answers == ["re: hello"]
    assert (await env.store.get_chat(chat.id)).status is ChatStatus.WAITING


async def test_a_store_outage_past_the_retry_budget_hands_the_chat_back_not_failed(
    env: Env, clock: Any
) -> None:
    """The step write stays unavailable past the retry budget: the turn ends
    `unavailable` and the chat goes back to `pending` (never `error`); the next turn,
    with the store back, completes it. The tool step is kept, the tool ran once."""
    loop = dataclasses.replace(
        env.config.loop,
        store_retry=StoreRetryConfig(base_delay=0.2, max_delay=0.4, budget=0.9),
    )
    # Attempts at 0, 0.2 and 0.6 s; the next (at 1.0 s) would start after the budget.
    env.store.fail_next("persist_step", 3)
    echoes = 0

    @tool("echo", "Echo the arguments.", {"type": "object"})
    async def counted_echo(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        nonlocal echoes
        echoes += 1
        await trio.lowlevel.checkpoint()
        return {"echo": args}

    config = env.config.replace(loop=loop)
    async with env.server(user_model(), config=config, tools=ToolRegistry([counted_echo])) as s:
        chat = await s.create_chat(OWNER, "tools please", title="t")
        async with s.subscribe(OWNER, chat.id) as sub:
            handed_back = await env.store.wait_finish(chat.id)
            assert handed_back.outcome is TurnOutcome.UNAVAILABLE
            assert handed_back.result.chat.status is ChatStatus.PENDING
            assert handed_back.result.chat.last_error is None
            done = await env.store.wait_finish(chat.id, 2)
            assert done.outcome is TurnOutcome.DONE
            assert done.result.chat.status is ChatStatus.WAITING
            events = await until_statuses(sub, [ChatStatus.WAITING])
        assert s.stats().turns_finished == {"unavailable": 1, "done": 1}
        assert s.stats().store_retries == 2
    assert env.store.injected == {"persist_step": 3}
    assert ChatStatus.ERROR not in {e.status for e in status_events(events)}
    messages = await env.store.messages_after(chat.id, 0)
    assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.ASSISTANT]
    assert echoes == 1


async def test_a_stuck_tool_never_blocks_its_replica(env: Env, clock: Any) -> None:
    """A tool blocks in a thread that ignores cancellation. Interrupting its chat ends
    the turn at once (`waiting`, the call kept with an interrupted result); another
    user's chat is acquired and answered while the thread is still blocked; when the
    thread returns, its late result is dropped (counted, not written)."""
    release = threading.Event()
    entered, returned = trio.Event(), trio.Event()

    @tool("stuck", "Blocks in a thread until the test releases it.", {"type": "object"})
    async def stuck(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        entered.set()
        # Not abandoned on cancel: the task waits for the thread whatever happens.
        result: bool = await trio.to_thread.run_sync(release.wait)
        returned.set()
        return {"released": result}

    def step(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
        if prompt and prompt[-1].role is Role.TOOL:
            return text_step("done")
        text = text_of(prompt[-1].parts) if prompt else ""
        if text.startswith("stuck"):
            return tool_step([("stuck", {})], call_id_prefix=f"s{index}")
        return text_step(f"re: {text}")

    async with env.server(ScriptedModel(step), tools=ToolRegistry([stuck])) as server:
        chat = await server.create_chat(OWNER, "stuck please", title="t")
        with trio.fail_after(WAIT):
            await entered.wait()
        stopped = await server.interrupt(OWNER, chat.id)
        assert stopped.status is ChatStatus.WAITING
        fin = await env.store.wait_finished(chat.id)
        assert fin.changed and fin.chat.status is ChatStatus.WAITING
        assert await server.wait_ended(chat.id) is TurnOutcome.INTERRUPTED
        assert not release.is_set() and server.running_chats == frozenset()
        other = await server.create_chat(OTHER, "hello", title="t2")
        answered = await env.store.wait_finished(other.id)
        assert answered.chat.status is ChatStatus.WAITING
        assert await history(env.store, other.id) == [("user", "hello"), ("assistant", "re: hello")]
        assert not release.is_set() and server.stats().late_tool_results_dropped == 0
        if clock is not None:
            # Virtual time stands still while the thread wakes up (nothing else is due).
            clock.autojump_threshold = math.inf
        release.set()
        with trio.fail_after(WAIT):
            await returned.wait()
        # The result was dropped as the tool returned, with no checkpoint in between.
        assert server.stats().late_tool_results_dropped == 1
        assert server.stats().turns_finished == {"interrupted": 1, "done": 1}
    messages = await env.store.messages_after(chat.id, 0)
    assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    (result,) = messages[-1].parts
    assert isinstance(result, ToolResultPart) and result.is_error
    assert result.result == {"error": env.config.loop.interrupted_tool_result}


async def test_a_recovered_turn_whose_answer_is_stored_is_not_answered_again(
    env: Env, clock: Any
) -> None:
    """A run died after its answer was stored but before its final transition (the chat
    is left `running`). Stale recovery hands it back; the next turn sees the answer and
    finishes without calling the model: one answer to the user's message."""
    dead = uuid.uuid4()
    chat, _ = await env.store.create_chat(OWNER, "t", (TextPart("question"),))
    (row,) = await env.store.acquire(dead, 1)
    answer = NewMessage(Role.ASSISTANT, (TextPart("the answer"),), Visibility.BOTH)
    await env.store.persist_step(Lease.of(row), [answer])
    await age_heartbeat(env, chat.id)
    model_calls: list[int] = []

    def step(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
        model_calls.append(index)
        return text_step("a second answer")

    async with env.server(ScriptedModel(step)) as server:
        fin = await env.store.wait_finished(chat.id)
        assert fin.changed and fin.chat.status is ChatStatus.WAITING
        assert fin.inserted == ()
        assert server.stats().stale_recovered == 1
        assert server.stats().turns_finished == {"done": 1}
    assert model_calls == []
    assert await history(env.store, chat.id) == [("user", "question"), ("assistant", "the answer")]


@pytest.mark.parametrize("kind", ["memory"], indirect=True)
async def test_a_full_replica_leaves_pending_chats_to_its_peers(env: Env, clock: Any) -> None:
    small = env.config.replace(acquire=dataclasses.replace(env.config.acquire, max_running_turns=2))
    async with env.server(hanging_model(), config=small) as a:
        chats = [await a.create_chat(OWNER, f"hang {i}", title="t") for i in range(5)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(a.running_chats) == 2
        statuses = [(await env.store.get_chat(c.id)).status for c in chats]
        assert statuses.count(ChatStatus.PENDING) == 3
        assert a.stats().acquire_skipped_full >= 1
        async with env.server(hanging_model()) as b:
            await trio.testing.wait_all_tasks_blocked()
            assert len(b.running_chats) == 3 and len(a.running_chats) == 2
            # One of A's turns ends: the room it leaves is used again.
            stopped = sorted(a.running_chats)[0]
            await a.interrupt(OWNER, stopped)
            await trio.testing.wait_all_tasks_blocked()
            assert len(a.running_chats) == 1
            late = await a.create_chat(OWNER, "hang late", title="t")
            await trio.testing.wait_all_tasks_blocked()
            assert late.id in a.running_chats and len(a.running_chats) == 2


@pytest.mark.parametrize("kind", ["memory"], indirect=True)
@pytest.mark.parametrize("field", ["max_running_turns", "max_chats_per_acquire"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
async def test_acquisition_bounds_must_be_positive_integers(
    kind: str, field: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=field):
        AcquireConfig(**{field: value})  # type: ignore[arg-type]
