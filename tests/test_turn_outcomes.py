"""Awaiting a turn's outcome (`Server.wait_turn`, `Server.send_and_wait`) and the owner
channel's status announcements, on the memory store (with and without a pubsub, on a
MockClock) and on PostgreSQL."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from chatd_trio.config import Config
from chatd_trio.domain import ChatStatus, Role, StatusEvent, TextPart, owner_channel, text_of
from chatd_trio.errors import PermissionDenied
from chatd_trio.pubsub.base import PubSub, Resync
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.server import Server, TurnReport
from chatd_trio.store.base import Store
from chatd_trio.store.memory import MemoryStore
from tests.server_replica import (
    MEMORY_CONFIG,
    MODEL_ERROR_PREFIX,
    PARTIAL,
    POSTGRES_CONFIG,
    WAIT,
    registry,
    trio_clock,
    until_part,
    user_model,
)

OWNER = uuid.UUID(int=1)
OTHER = uuid.UUID(int=2)
READ_CHAT = "GetChatByID"


@dataclass
class Env:
    kind: str
    store: Store
    pubsub: PubSub | None
    config: Config

    def server(self) -> Server:
        return Server(self.store, self.pubsub, user_model(), self.config, tools=registry())


@pytest.fixture(params=["memory", "memory-no-pubsub", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock(kind: str) -> trio.testing.MockClock | None:
    return trio.testing.MockClock(autojump_threshold=0) if kind.startswith("memory") else None


@pytest.fixture
async def env(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    if kind == "memory":
        pubsub = MemoryPubSub()
        yield Env(kind, MemoryStore(clock=trio_clock, pubsub=pubsub), pubsub, MEMORY_CONFIG)
        return
    if kind == "memory-no-pubsub":
        yield Env(kind, MemoryStore(clock=trio_clock), None, MEMORY_CONFIG)
        return
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore
    from tests.pgcluster import truncate_all

    dsn = str(request.getfixturevalue("pg_dsn"))
    async with PostgresStore.open(dsn) as store:
        await trio.to_thread.run_sync(truncate_all, dsn)
        async with PostgresPubSub.open(dsn) as pg_pubsub:
            yield Env(kind, store, pg_pubsub, POSTGRES_CONFIG)


def texts(report: TurnReport) -> list[tuple[str, str]]:
    return [(m.role.value, text_of(m.parts)) for m in report.messages]


# -- awaiting outcomes -------------------------------------------------------------------


async def test_wait_turn_reports_the_first_turn_of_a_new_chat(env: Env, clock: Any) -> None:
    async with env.server() as server:
        chat = await server.create_chat(OWNER, "tools please", title="t")
        with trio.fail_after(WAIT):
            report = await server.wait_turn(OWNER, chat.id)
    assert report.status is ChatStatus.WAITING and not report.failed
    assert report.error is None
    assert [r for r, _ in texts(report)] == ["user", "assistant", "tool", "assistant"]
    assert texts(report)[0] == ("user", "tools please")
    assert report.text == "done"
    assert report.cursor == report.messages[-1].id
    assert report.chat.worker_id is None


async def test_send_and_wait_reports_the_answer_to_the_message_sent(env: Env, clock: Any) -> None:
    async with env.server() as server:
        chat = await server.create_chat(OWNER, "hello", title="t")
        with trio.fail_after(WAIT):
            first = await server.wait_turn(OWNER, chat.id)
            second = await server.send_and_wait(OWNER, chat.id, "again")
    assert texts(second) == [("user", "again"), ("assistant", "re: again")]
    assert second.after_message_id == first.cursor
    assert second.text == "re: again"


async def test_a_failed_turn_reports_its_error(env: Env, clock: Any) -> None:
    async with env.server() as server:
        chat = await server.create_chat(OWNER, "hello", title="t")
        with trio.fail_after(WAIT):
            await server.wait_turn(OWNER, chat.id)
            report = await server.send_and_wait(OWNER, chat.id, "fail now")
    assert report.failed and report.status is ChatStatus.ERROR
    assert report.error is not None
    assert report.error.message == MODEL_ERROR_PREFIX + "fail now"
    assert report.error.message == report.chat.last_error
    # The structured error the turn published, when the wait saw it (it subscribed
    # before the turn ended).
    assert report.error.kind == "bad_request"
    assert texts(report) == [("user", "fail now")]


async def test_waiting_on_a_settled_chat_returns_at_once(env: Env, clock: Any) -> None:
    async with env.server() as server:
        chat = await server.create_chat(OWNER, "hello", title="t")
        with trio.fail_after(WAIT):
            first = await server.wait_turn(OWNER, chat.id)
            again = await server.wait_turn(OWNER, chat.id, after_message_id=first.cursor)
    assert again.messages == () and again.cursor == first.cursor
    assert again.status is ChatStatus.WAITING


async def test_a_message_sent_to_a_busy_chat_is_awaited_through_the_next_turn(
    env: Env, clock: Any
) -> None:
    async with env.server() as server:
        chat = await server.create_chat(OWNER, "hang on", title="t")
        reports: list[TurnReport] = []

        async def send() -> None:
            reports.append(await server.send_and_wait(OWNER, chat.id, "next"))

        with trio.fail_after(WAIT):
            async with server.subscribe(OWNER, chat.id) as sub:
                await until_part(sub)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    # Queued behind the hanging turn until that turn is interrupted.
                    while (await server.get_chat(OWNER, chat.id)).queued == 0:
                        await sub.receive()
                    await server.interrupt(OWNER, chat.id)
    (report,) = reports
    # The interrupted turn's partial answer was persisted after the send.
    assert texts(report) == [("assistant", PARTIAL), ("user", "next"), ("assistant", "re: next")]
    assert report.text == "re: next"


async def test_send_and_wait_can_interrupt_the_running_turn(env: Env, clock: Any) -> None:
    async with env.server() as server:
        chat = await server.create_chat(OWNER, "hang on", title="t")
        with trio.fail_after(WAIT):
            async with server.subscribe(OWNER, chat.id) as sub:
                await until_part(sub)
            report = await server.send_and_wait(OWNER, chat.id, "stop", busy_behavior="interrupt")
    assert texts(report)[-2:] == [("user", "stop"), ("assistant", "re: stop")]


async def test_the_wait_reads_the_store_only_when_a_status_settles(env: Env, clock: Any) -> None:
    """No polling: a long turn costs the wait no reads until its status changes."""
    if not env.kind.startswith("memory"):
        pytest.skip("counts statements on a virtual clock")
    async with env.server() as server:
        chat = await server.create_chat(OWNER, "hang on", title="t")
        async with trio.open_nursery() as nursery:
            reports: list[TurnReport] = []

            async def wait() -> None:
                reports.append(await server.wait_turn(OWNER, chat.id))

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            before = server.stats().statements.get(READ_CHAT, 0)
            await trio.sleep(3600)  # an hour of heartbeats (virtual time)
            assert server.stats().statements.get(READ_CHAT, 0) == before
            assert reports == []
            await server.interrupt(OWNER, chat.id)
        (report,) = reports
        assert report.status is ChatStatus.WAITING
        assert texts(report) == [("user", "hang on"), ("assistant", PARTIAL)]


async def test_wait_turn_checks_the_owner(env: Env, clock: Any) -> None:
    async with env.server() as server:
        chat = await server.create_chat(OWNER, "hello", title="t")
        with pytest.raises(PermissionDenied):
            await server.wait_turn(OTHER, chat.id)
        with pytest.raises(PermissionDenied):
            await server.send_and_wait(OTHER, chat.id, "mine now")


# -- one event per change ------------------------------------------------------------------


async def test_each_status_change_reaches_a_subscriber_once(env: Env, clock: Any) -> None:
    async with env.server() as server:
        chat = await server.create_chat(OWNER, "hang on", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            seen: list[Any] = []
            with trio.fail_after(WAIT):
                while not any(e.type == "message_part" for e in seen):
                    seen.append(await sub.receive())
                await server.interrupt(OWNER, chat.id)
                await server.send_message(OWNER, chat.id, "hello")
                first_user = (await server.messages(OWNER, chat.id))[0]
                while not _ends_waiting(seen, 2):
                    seen.append(await sub.receive())
                await server.edit_message(OWNER, chat.id, first_user.id, "hello again")
                while not _ends_waiting(seen, 3):
                    seen.append(await sub.receive())
    statuses = [e.status for e in seen if isinstance(e, StatusEvent)]
    # Whatever the snapshot caught of the first turn's start, each change once.
    assert statuses[-7:] == [
        ChatStatus.WAITING,  # the interrupt (the stopped turn's finish says it again)
        ChatStatus.PENDING,  # the message
        ChatStatus.RUNNING,
        ChatStatus.WAITING,
        ChatStatus.PENDING,  # the edit
        ChatStatus.RUNNING,
        ChatStatus.WAITING,
    ]
    assert all(a != b for a, b in itertools.pairwise(statuses))
    # The edit cleared a queue that was already empty: no queue update at all.
    assert not any(e.type == "queue_update" for e in seen)


def _ends_waiting(events: list[Any], count: int) -> bool:
    waiting = [e for e in events if isinstance(e, StatusEvent) and e.status is ChatStatus.WAITING]
    return len(waiting) >= count and events[-1] is waiting[-1]


# -- the owner channel ----------------------------------------------------------------------


async def owner_events(pubsub: PubSub, count: int, task_status: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    async with pubsub.subscribe(owner_channel(OWNER)) as sub:
        task_status.started()
        while len(out) < count:
            delivery = await sub.receive()
            if isinstance(delivery, Resync):
                continue
            data = json.loads(delivery)
            out.append((data["kind"], data["status"]))
    return out


async def test_the_owner_channel_announces_every_status_change(env: Env, clock: Any) -> None:
    if env.pubsub is None:
        pytest.skip("the owner channel needs a pubsub")
    # A chat that is `waiting` with a queued message (its run was interrupted by a
    # store-level call and never finished): set up before the replica starts.
    worker = uuid.uuid4()
    parked, _ = await env.store.create_chat(OWNER, "parked", (TextPart("first"),))
    await env.store.acquire(worker, 10)
    queued = await env.store.send_message(parked.id, (TextPart("queued"),), max_queued=20)
    assert queued.queued is not None
    await env.store.interrupt(parked.id)
    got: list[list[tuple[str, str]]] = []
    expected = [
        ("status", "pending"),  # promote
        ("status", "running"),
        ("status", "waiting"),
        ("created", "pending"),
        ("status", "running"),
        ("status", "waiting"),
        ("status", "pending"),  # send
        ("status", "running"),
        ("status", "waiting"),  # interrupt; the stopped turn's finish announces nothing
        ("status", "pending"),  # edit
        ("status", "running"),
        ("status", "waiting"),
    ]

    async def listen(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        got.append(await owner_events(env.pubsub, len(expected), task_status))  # type: ignore[arg-type]

    with trio.fail_after(WAIT):
        async with env.server() as server, trio.open_nursery() as nursery:
            await nursery.start(listen)
            await server.promote_queued(OWNER, parked.id, queued.queued.id)
            await server.wait_turn(OWNER, parked.id)
            chat = await server.create_chat(OWNER, "hello", title="t")
            await server.wait_turn(OWNER, chat.id)
            async with server.subscribe(OWNER, chat.id) as sub:
                await server.send_message(OWNER, chat.id, "hang on")
                await until_part(sub)
                await server.interrupt(OWNER, chat.id)
            first = await server.wait_turn(OWNER, chat.id)
            await server.edit_message(OWNER, chat.id, first.messages[0].id, "hello again")
            await server.wait_turn(OWNER, chat.id)
    assert got == [expected]
    assert [m.role for m in first.messages] == [Role.USER, Role.ASSISTANT] * 2


class GatedStore:
    """A memory store whose turn writes wait for `gate` while it is set."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.gate: trio.Event | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def persist_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.gate is not None:
            await self.gate.wait()
        return await self.inner.persist_step(*args, **kwargs)


async def test_after_an_interrupt_the_wait_reports_the_stopped_turns_partial_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The interrupt makes the chat `waiting` at once; the report waits for the turn."""
    store = GatedStore(MemoryStore(clock=trio_clock))
    server = Server(store, None, user_model(), MEMORY_CONFIG, tools=registry())  # type: ignore[arg-type]
    async with server:
        chat = await server.create_chat(OWNER, "hang on", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            await until_part(sub)
        store.gate = gate = trio.Event()
        reports: list[TurnReport] = []

        async def wait() -> None:
            reports.append(await server.wait_turn(OWNER, chat.id))

        async with trio.open_nursery() as nursery:
            await server.interrupt(OWNER, chat.id)
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert (await store.get_chat(chat.id)).status is ChatStatus.WAITING
            assert reports == []  # the stopped turn is still storing its step
            gate.set()
    (report,) = reports
    assert texts(report) == [("user", "hang on"), ("assistant", PARTIAL)]
