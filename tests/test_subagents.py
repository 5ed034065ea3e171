"""Subagents (docs/spec.md §6): spawn/wait/message/close tools, the descendant walk, the wait.

Memory tests run on a MockClock (`autojump_clock`), so wake latency is measured in
virtual time: a notify wakes the waiter without the clock moving, a poll moves it
in whole poll intervals. The PostgreSQL cases use the real clock.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
import trio
import trio.testing

from chatd_trio.config import RequestOptions, SubagentConfig
from chatd_trio.domain import (
    Chat,
    ChatStatus,
    NewMessage,
    NotifyPayload,
    Role,
    TextPart,
    ToolCallPart,
    Visibility,
    stream_channel,
)
from chatd_trio.errors import SubagentError
from chatd_trio.pubsub.base import PubSub
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.store.base import Lease, Store, TurnOutcome
from chatd_trio.store.memory import MemoryStore
from chatd_trio.subagents import (
    NO_REPORT_ERROR,
    NO_SPAWN_FROM_CHILD,
    SubagentStats,
    await_subagent,
    is_descendant,
    subagent_tools,
    title_from_prompt,
)
from chatd_trio.tools import ToolContext, ToolRegistry
from tests.subagent_host import StoreSubagentHost

OWNER = uuid.UUID("00000000-0000-0000-0000-0000000000aa")
CFG = SubagentConfig()


# -- helpers -----------------------------------------------------------------------------


async def new_chat(store: Store, parent: Chat | None = None, **kw: Any) -> Chat:
    chat, _ = await store.create_chat(
        OWNER, "t", (TextPart("do it"),), parent_chat_id=parent.id if parent else None, **kw
    )
    return chat


async def finish(
    store: Store,
    chat_id: uuid.UUID,
    *texts: str,
    outcome: TurnOutcome = TurnOutcome.DONE,
    last_error: str | None = None,
) -> None:
    """Run the chat's turn to its end the way a replica would: acquire, persist, finish."""
    lease = await acquire(store, chat_id)
    if texts:
        await store.persist_step(
            lease, [NewMessage(Role.ASSISTANT, (TextPart(t),), Visibility.BOTH) for t in texts]
        )
    await store.finish_turn(lease, outcome, last_error)


async def acquire(store: Store, chat_id: uuid.UUID) -> Lease:
    """Acquire every pending chat under a fresh worker; the lease of `chat_id`'s run."""
    (chat,) = [c for c in await store.acquire(uuid.uuid4(), 10_000) if c.id == chat_id]
    return Lease.of(chat)


async def notify(pubsub: PubSub, chat_id: uuid.UUID, status: ChatStatus) -> None:
    await pubsub.publish(stream_channel(chat_id), NotifyPayload(status=status).encode())


def relink(store: MemoryStore, chat_id: uuid.UUID, parent_id: uuid.UUID) -> None:
    """Rewrite a parent id behind the store's back (broken chains and cycles; test only)."""
    chats = store._chats
    chats[chat_id] = dataclasses.replace(chats[chat_id], parent_chat_id=parent_id)


class FinishOnFirstRead:
    """Store proxy: the first read of `chat_id` returns the still-pending row, and only
    then does the child finish and publish. A waiter that subscribed after its first
    check would lose exactly this notify."""

    def __init__(
        self, inner: Store, chat_id: uuid.UUID, on_first_read: Callable[[], Awaitable[None]]
    ) -> None:
        self._inner = inner
        self._chat_id = chat_id
        self._on_first_read = on_first_read
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get_chat(self, chat_id: uuid.UUID) -> Chat:
        chat = await self._inner.get_chat(chat_id)
        if chat_id == self._chat_id and not self.fired:
            self.fired = True
            await self._on_first_read()
        return chat


def call(name: str, /, **args: Any) -> ToolCallPart:
    return ToolCallPart(f"call-{name}", name, json.dumps(args))


async def invoke(registry: ToolRegistry, caller: uuid.UUID, name: str, /, **args: Any) -> Any:
    """Call tool `name` from chat `caller` the way the agent loop does."""
    return await registry.invoke(call(name, **args), ToolContext(chat_id=caller))


def registry_for(
    store: Store, pubsub: PubSub | None, stats: SubagentStats | None = None
) -> ToolRegistry:
    host = StoreSubagentHost(store)
    return ToolRegistry(subagent_tools(host, store, pubsub, CFG, stats=stats))


# -- titles --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "title"),
    [
        ("", "New Chat"),
        ("   \n\t ", "New Chat"),
        ("fix the bug", "fix the bug"),
        ("one two three four five six", "one two three four five six"),
        ("one two three four five six seven", "one two three four five six…"),
        ("  spaced\n\nout   words  ", "spaced out words"),
    ],
)
def test_title_from_prompt(prompt: str, title: str) -> None:
    assert title_from_prompt(prompt, CFG) == title


def test_title_is_capped_including_the_ellipsis() -> None:
    prompt = " ".join(["x" * 30] * 6)  # six words, 185 characters
    title = title_from_prompt(prompt, CFG)
    assert len(title) == CFG.title_max_chars
    assert title.endswith("…")
    assert title.startswith("x" * 30 + " " + "x" * 30)


def test_title_follows_config() -> None:
    cfg = SubagentConfig(title_words=2, title_max_chars=5, fallback_title="Untitled")
    assert title_from_prompt("alpha beta gamma", cfg) == "alph…"
    assert title_from_prompt("ab cd ef", cfg) == "ab c…"
    assert title_from_prompt("ab", cfg) == "ab"
    assert title_from_prompt(" ", cfg) == "Untitled"


# -- the descendant walk -----------------------------------------------------------------


async def test_descendant_walk_memory() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    child = await new_chat(store, root)
    grandchild = await new_chat(store, child)
    other = await new_chat(store)

    assert await is_descendant(store, root.id, child.id)
    assert await is_descendant(store, root.id, grandchild.id)
    assert await is_descendant(store, child.id, grandchild.id)
    assert not await is_descendant(store, root.id, root.id)  # same id
    assert not await is_descendant(store, child.id, root.id)  # upwards is not down
    assert not await is_descendant(store, root.id, other.id)  # unrelated root
    assert not await is_descendant(store, other.id, grandchild.id)
    assert not await is_descendant(store, root.id, uuid.uuid4())  # missing target


async def test_descendant_walk_is_bottom_up_and_o_depth() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    chain = [root]
    for _ in range(5):
        chain.append(await new_chat(store, chain[-1]))
    # Many siblings under the root: a top-down search would read them all.
    for _ in range(20):
        await new_chat(store, root)
    before = store.statement_counts().get("GetChatParent", 0)
    assert await is_descendant(store, root.id, chain[-1].id)
    counts = store.statement_counts()
    assert counts["GetChatParent"] - before == 5  # one read per level
    assert "GetChildChats" not in counts


async def test_descendant_walk_broken_chain() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    child = await new_chat(store, root)
    grandchild = await new_chat(store, child)
    relink(store, child.id, uuid.uuid4())  # the child's parent row is gone
    assert not await is_descendant(store, root.id, grandchild.id)
    assert await is_descendant(store, child.id, grandchild.id)


async def test_descendant_walk_cycle_terminates() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    a = await new_chat(store)
    b = await new_chat(store, a)
    c = await new_chat(store, b)
    relink(store, a.id, c.id)  # a -> c -> b -> a
    with trio.fail_after(5):
        assert not await is_descendant(store, root.id, c.id)
    counts = store.statement_counts()["GetChatParent"]
    assert counts == 3  # c->b, b->a, a->c (seen): stops at the first repeat


async def test_descendant_self_loop() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    a = await new_chat(store)
    relink(store, a.id, a.id)
    assert not await is_descendant(store, root.id, a.id)


# -- spawning and the other tools ------------------------------------------------------------


async def test_spawn_inherits_owner_binding_mcp_servers_and_model_options() -> None:
    store = MemoryStore()
    ws = await store.create_workspace(OWNER, "ws")
    build = await store.create_build(ws.id)
    agent = await store.create_agent(build.id, "main", "127.0.0.1:1", "tok")
    root = await new_chat(
        store,
        workspace_id=ws.id,
        build_id=build.id,
        agent_id=agent.id,
        mcp_servers=("github", "fs"),
        model_options=RequestOptions(reasoning_effort="low"),
    )
    stats = SubagentStats()
    reg = registry_for(store, None, stats)
    prompt = "investigate the flaky test in the payments service please"
    result = await invoke(reg, root.id, "spawn_agent", prompt=prompt)
    assert not result.is_error, result.result
    child = await store.get_chat(uuid.UUID(result.result["chat_id"]))
    assert result.result["status"] == "pending"
    assert child.status is ChatStatus.PENDING
    assert child.owner_id == OWNER
    assert child.parent_chat_id == root.id
    assert child.root_chat_id == root.id
    assert (child.workspace_id, child.build_id, child.agent_id) == (ws.id, build.id, agent.id)
    assert child.mcp_servers == ("github", "fs")
    assert child.model_options == RequestOptions(reasoning_effort="low")
    assert child.title == "investigate the flaky test in the…"
    (first,) = await store.messages_after(child.id, 0)
    assert first.role is Role.USER
    assert first.parts == (TextPart(prompt),)
    assert await store.child_chats(root.id) == [child]
    assert stats.statistics().spawned == 1


async def test_spawn_with_title_and_without_binding() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    reg = registry_for(store, None)
    result = await invoke(reg, root.id, "spawn_agent", prompt="go", title="  Scout  ")
    child = await store.get_chat(uuid.UUID(result.result["chat_id"]))
    assert child.title == "Scout"
    assert (child.workspace_id, child.build_id, child.agent_id) == (None, None, None)
    assert child.mcp_servers == ()
    assert child.model_options is None


@pytest.mark.parametrize("args", [{}, {"prompt": "   "}, {"prompt": 3}])
async def test_spawn_requires_a_prompt(args: dict[str, Any]) -> None:
    store = MemoryStore()
    root = await new_chat(store)
    result = await invoke(registry_for(store, None), root.id, "spawn_agent", **args)
    assert result.is_error
    assert "prompt" in result.result["error"]
    assert result.result["error"].startswith("invalid arguments: prompt: ")
    assert await store.child_chats(root.id) == []


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("spawn_agent", {"prompt": "more"}),
        ("wait_agent", {"chat_id": "CHILD"}),
        ("message_agent", {"chat_id": "CHILD", "message": "hi"}),
        ("close_agent", {"chat_id": "CHILD"}),
    ],
)
async def test_children_cannot_use_subagent_tools(name: str, args: dict[str, Any]) -> None:
    store = MemoryStore()
    root = await new_chat(store)
    child = await new_chat(store, root)
    grandchild = await new_chat(store, child)
    args = {k: (str(grandchild.id) if v == "CHILD" else v) for k, v in args.items()}
    result = await invoke(registry_for(store, None), child.id, name, **args)
    assert result.is_error
    assert result.result == {"error": NO_SPAWN_FROM_CHILD}
    assert len(await store.child_chats(child.id)) == 1


async def test_wait_tool_returns_report(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    root = await new_chat(store)
    stats = SubagentStats()
    reg = registry_for(store, pubsub, stats)
    spawned = await invoke(reg, root.id, "spawn_agent", prompt="count the files")
    child_id = uuid.UUID(spawned.result["chat_id"])
    result: list[Any] = []

    async def waiter() -> None:
        result.append(await invoke(reg, root.id, "wait_agent", chat_id=str(child_id)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        await finish(store, child_id, "there are 42 files")
        await notify(pubsub, child_id, ChatStatus.WAITING)
    (res,) = result
    assert not res.is_error
    assert res.result == {"chat_id": str(child_id), "report": "there are 42 files"}
    assert stats.statistics().notify_wakes == 1


async def test_wait_tool_reports_errors() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    other = await new_chat(store)
    child = await new_chat(store, root)
    reg = registry_for(store, None)
    res = await invoke(reg, root.id, "wait_agent", chat_id=str(other.id))
    assert res.is_error and "not a descendant" in res.result["error"]
    res = await invoke(reg, root.id, "wait_agent", chat_id="nope")
    assert res.is_error and "chat_id" in res.result["error"]
    res = await invoke(reg, root.id, "wait_agent", chat_id=str(child.id), timeout_s="soon")
    assert res.is_error and "timeout_s" in res.result["error"]
    await finish(store, child.id, "I failed: disk full", outcome=TurnOutcome.ERROR)
    res = await invoke(reg, root.id, "wait_agent", chat_id=str(child.id))
    assert res.is_error and res.result == {"error": "I failed: disk full"}


async def test_message_and_close_agent() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    child = await new_chat(store, root)
    reg = registry_for(store, None)
    await finish(store, child.id, "first report")  # child is waiting now

    res = await invoke(reg, root.id, "message_agent", chat_id=str(child.id), message="again")
    assert not res.is_error, res.result
    assert (await store.get_chat(child.id)).status is ChatStatus.PENDING
    texts = [m.parts for m in await store.messages_after(child.id, 0) if m.role is Role.USER]
    assert texts[-1] == (TextPart("again"),)

    worker = uuid.uuid4()
    await store.acquire(worker, 10_000)
    assert (await store.get_chat(child.id)).status is ChatStatus.RUNNING
    res = await invoke(reg, root.id, "close_agent", chat_id=str(child.id))
    assert not res.is_error, res.result
    assert (await store.get_chat(child.id)).status is ChatStatus.WAITING


async def test_message_and_close_refuse_non_descendants() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    other = await new_chat(store)
    await finish(store, other.id, "done")
    reg = registry_for(store, None)
    res = await invoke(reg, root.id, "message_agent", chat_id=str(other.id), message="hi")
    assert res.is_error and "not a descendant" in res.result["error"]
    res = await invoke(reg, root.id, "close_agent", chat_id=str(root.id))
    assert res.is_error and "not a descendant" in res.result["error"]
    assert (await store.get_chat(other.id)).status is ChatStatus.WAITING
    assert len(await store.messages_after(other.id, 0)) == 2


# -- await_subagent: outcomes ------------------------------------------------------------------


async def test_not_descendant_is_refused_before_subscribing() -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    root = await new_chat(store)
    sibling_root = await new_chat(store)
    cousin = await new_chat(store, sibling_root)
    await finish(store, cousin.id, "done")
    stats = SubagentStats()
    for target in (cousin.id, root.id, uuid.uuid4()):
        with pytest.raises(SubagentError, match="not a descendant"):
            await await_subagent(store, pubsub, root.id, target, config=CFG, stats=stats)
    assert pubsub.statistics().published == 0
    assert stats.statistics().checks == 0
    assert stats.statistics().waits == 0


async def test_already_finished_returns_at_once(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    root = await new_chat(store)
    child = await new_chat(store, root)
    await finish(store, child.id, "older report", "the report", "   ")
    stats = SubagentStats()
    t0 = trio.current_time()
    report = await await_subagent(store, pubsub, root.id, child.id, config=CFG, stats=stats)
    assert report == "the report"  # the latest NON-BLANK assistant text
    assert trio.current_time() == t0
    s = stats.statistics()
    assert (s.checks, s.completed, s.notify_wakes, s.poll_wakes) == (1, 1, 0, 0)
    assert pubsub.statistics().subscriptions == 0


async def test_finished_without_report_returns_empty() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    child = await new_chat(store, root)
    await finish(store, child.id)
    assert await await_subagent(store, None, root.id, child.id, config=CFG) == ""


async def test_grandchild_can_be_awaited() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    child = await new_chat(store, root)
    grandchild = await new_chat(store, child)
    await finish(store, grandchild.id, "deep report")
    assert await await_subagent(store, None, root.id, grandchild.id, config=CFG) == "deep report"


async def test_error_with_text() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    child = await new_chat(store, root)
    await finish(
        store, child.id, "could not reach the API", outcome=TurnOutcome.ERROR, last_error="500"
    )
    stats = SubagentStats()
    with pytest.raises(SubagentError) as info:
        await await_subagent(store, None, root.id, child.id, config=CFG, stats=stats)
    assert str(info.value) == "could not reach the API"
    assert stats.statistics().errored == 1


async def test_error_without_report() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    child = await new_chat(store, root)
    await finish(store, child.id, outcome=TurnOutcome.ERROR, last_error="model failed")
    with pytest.raises(SubagentError) as info:
        await await_subagent(store, None, root.id, child.id, config=CFG)
    assert str(info.value) == NO_REPORT_ERROR == "agent reached error status"


async def test_model_only_assistant_text_is_not_a_report() -> None:
    store = MemoryStore()
    root = await new_chat(store)
    child = await new_chat(store, root)
    lease = await acquire(store, child.id)
    await store.persist_step(
        lease,
        [
            NewMessage(Role.ASSISTANT, (TextPart("visible"),), Visibility.BOTH),
            NewMessage(Role.ASSISTANT, (TextPart("hidden"),), Visibility.MODEL),
        ],
    )
    await store.finish_turn(lease, TurnOutcome.DONE)
    assert await await_subagent(store, None, root.id, child.id, config=CFG) == "visible"


# -- await_subagent: waking --------------------------------------------------------------------


async def test_completes_via_pubsub_without_advancing_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    root = await new_chat(store)
    child = await new_chat(store, root)
    stats = SubagentStats()
    reports: list[str] = []
    t0 = trio.current_time()

    async def waiter() -> None:
        reports.append(
            await await_subagent(store, pubsub, root.id, child.id, config=CFG, stats=stats)
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert pubsub.statistics().subscriptions == 1
        # A notify that does not finish the child wakes a check that finds it busy.
        await notify(pubsub, child.id, ChatStatus.RUNNING)
        await trio.testing.wait_all_tasks_blocked()
        assert not reports
        await finish(store, child.id, "all green")
        await notify(pubsub, child.id, ChatStatus.WAITING)
    assert reports == ["all green"]
    assert trio.current_time() == t0  # woken by the notify: zero latency, no poll
    s = stats.statistics()
    assert (s.notify_wakes, s.poll_wakes, s.checks) == (2, 0, 3)
    assert pubsub.statistics().subscriptions == 0


async def test_subscribes_before_first_check(autojump_clock: trio.testing.MockClock) -> None:
    inner = MemoryStore()
    pubsub = MemoryPubSub()
    root = await new_chat(inner)
    child = await new_chat(inner, root)

    async def complete() -> None:
        await finish(inner, child.id, "raced")
        await notify(pubsub, child.id, ChatStatus.WAITING)

    store = FinishOnFirstRead(inner, child.id, complete)
    stats = SubagentStats()
    t0 = trio.current_time()
    report = await await_subagent(
        cast(Store, store), pubsub, root.id, child.id, config=CFG, stats=stats
    )
    assert store.fired
    assert report == "raced"
    # Had the wait subscribed after its first check, the notify would be lost and only
    # the 5 s fallback poll would find the child done.
    assert trio.current_time() == t0
    assert (stats.notify_wakes, stats.poll_wakes) == (1, 0)


async def test_completes_via_poll_without_pubsub(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    root = await new_chat(store)
    child = await new_chat(store, root)
    stats = SubagentStats()
    t0 = trio.current_time()
    done_at: list[float] = []

    async def child_turn() -> None:
        await trio.sleep(0.5)
        await finish(store, child.id, "polled")
        done_at.append(trio.current_time() - t0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(child_turn)
        report = await await_subagent(store, None, root.id, child.id, config=CFG, stats=stats)
    assert report == "polled"
    elapsed = trio.current_time() - t0
    # Checks at 0, 0.2, 0.4 (busy), 0.6 (done): the wake lags completion by < 0.2 s.
    assert elapsed == pytest.approx(0.6)
    assert done_at == [pytest.approx(0.5)]
    s = stats.statistics()
    assert (s.poll_wakes, s.notify_wakes, s.checks) == (3, 0, 4)


async def test_lost_notify_falls_back_to_slow_poll(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    root = await new_chat(store)
    child = await new_chat(store, root)
    stats = SubagentStats()
    t0 = trio.current_time()

    async def child_turn() -> None:
        await trio.testing.wait_all_tasks_blocked()
        await finish(store, child.id, "silent")  # no notify: as if it were lost

    async with trio.open_nursery() as nursery:
        nursery.start_soon(child_turn)
        report = await await_subagent(store, pubsub, root.id, child.id, config=CFG, stats=stats)
    assert report == "silent"
    assert trio.current_time() - t0 == pytest.approx(CFG.poll_interval_pubsub)
    assert (stats.poll_wakes, stats.notify_wakes) == (1, 0)


async def test_resync_wakes_a_check(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    root = await new_chat(store)
    child = await new_chat(store, root)
    stats = SubagentStats()
    t0 = trio.current_time()

    async def child_turn() -> None:
        await trio.testing.wait_all_tasks_blocked()
        await finish(store, child.id, "after reconnect")
        assert pubsub.force_resync("reconnected") == 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(child_turn)
        report = await await_subagent(store, pubsub, root.id, child.id, config=CFG, stats=stats)
    assert report == "after reconnect"
    assert trio.current_time() == t0
    assert (stats.resync_wakes, stats.notify_wakes, stats.poll_wakes) == (1, 0, 0)


async def test_broken_subscription_falls_back_to_fast_poll(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    root = await new_chat(store)
    child = await new_chat(store, root)
    stats = SubagentStats()
    t0 = trio.current_time()

    async def child_turn() -> None:
        await trio.testing.wait_all_tasks_blocked()
        assert pubsub.break_subscriptions(stream_channel(child.id)) == 1
        await trio.testing.wait_all_tasks_blocked()
        await finish(store, child.id, "survived")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(child_turn)
        report = await await_subagent(store, pubsub, root.id, child.id, config=CFG, stats=stats)
    assert report == "survived"
    assert trio.current_time() - t0 == pytest.approx(CFG.poll_interval_no_pubsub)
    assert (stats.pubsub_fallbacks, stats.poll_wakes) == (1, 1)


# -- await_subagent: timeouts and cancellation ----------------------------------------------------


@pytest.mark.parametrize("with_pubsub", [True, False])
async def test_timeout(autojump_clock: trio.testing.MockClock, with_pubsub: bool) -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    root = await new_chat(store)
    child = await new_chat(store, root)
    stats = SubagentStats()
    t0 = trio.current_time()
    with pytest.raises(SubagentError, match=r"timed out after 0\.9 s"):
        await await_subagent(
            store,
            pubsub if with_pubsub else None,
            root.id,
            child.id,
            timeout=0.9,
            config=CFG,
            stats=stats,
        )
    assert trio.current_time() - t0 == pytest.approx(0.9)
    # 0.9 s holds four 200 ms polls without pubsub, none of the 5 s fallback polls with it.
    assert stats.poll_wakes == (0 if with_pubsub else 4)
    assert stats.timed_out == 1
    assert pubsub.statistics().subscriptions == 0


@pytest.mark.parametrize("given", [0, None, -1])
async def test_zero_timeout_uses_the_default(
    autojump_clock: trio.testing.MockClock, given: float | None
) -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    cfg = SubagentConfig(await_timeout=42.0)
    root = await new_chat(store)
    child = await new_chat(store, root)
    t0 = trio.current_time()
    with pytest.raises(SubagentError, match="timed out"):
        await await_subagent(store, pubsub, root.id, child.id, timeout=given, config=cfg)
    assert trio.current_time() - t0 == pytest.approx(42.0)


async def test_default_timeout_is_five_minutes(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    root = await new_chat(store)
    child = await new_chat(store, root)
    t0 = trio.current_time()
    with pytest.raises(SubagentError, match="timed out"):
        await await_subagent(store, MemoryPubSub(), root.id, child.id, timeout=0)
    assert trio.current_time() - t0 == pytest.approx(300.0)


async def test_cancellation_leaves_no_subscription(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    root = await new_chat(store)
    child = await new_chat(store, root)
    stats = SubagentStats()
    with trio.CancelScope() as scope:

        async def cancel_when_waiting() -> None:
            await trio.testing.wait_all_tasks_blocked()
            assert pubsub.statistics().subscriptions == 1
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_waiting)
            await await_subagent(store, pubsub, root.id, child.id, config=CFG, stats=stats)
    assert scope.cancelled_caught
    assert pubsub.statistics().subscriptions == 0
    assert pubsub.statistics().channels == 0
    assert stats.timed_out == 0
    # Nobody listens on the child channel any more.
    await notify(pubsub, child.id, ChatStatus.WAITING)
    assert pubsub.statistics().delivered == 0


# -- PostgreSQL --------------------------------------------------------------------------


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[tuple[Store, PubSub]]:
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore

    async with PostgresStore.open(pg_dsn) as store, PostgresPubSub.open(pg_dsn) as pubsub:
        yield store, pubsub


async def _pg_execute(dsn: str, query: str, *params: object) -> None:
    import psycopg

    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(query, params)

    await trio.to_thread.run_sync(run)


@pytest.mark.postgres
async def test_pg_completes_via_pubsub(pg: tuple[Store, PubSub]) -> None:
    inner, pubsub = pg
    # A 60 s fallback poll cannot fire within the 30 s timeout: only the notify can wake us.
    cfg = SubagentConfig(poll_interval_pubsub=60.0)
    root = await new_chat(inner)
    child = await new_chat(inner, root)

    async def complete() -> None:
        await finish(inner, child.id, "pg report")
        await notify(pubsub, child.id, ChatStatus.WAITING)

    store = FinishOnFirstRead(inner, child.id, complete)
    stats = SubagentStats()
    report = await await_subagent(
        cast(Store, store), pubsub, root.id, child.id, timeout=30.0, config=cfg, stats=stats
    )
    assert report == "pg report"
    assert (stats.notify_wakes, stats.poll_wakes, stats.checks) == (1, 0, 2)


@pytest.mark.postgres
async def test_pg_descendant_walk_and_cycle(pg: tuple[Store, PubSub], pg_dsn: str) -> None:
    store, _ = pg
    root = await new_chat(store)
    child = await new_chat(store, root)
    grandchild = await new_chat(store, child)
    other = await new_chat(store)
    assert await is_descendant(store, root.id, grandchild.id)
    assert not await is_descendant(store, root.id, root.id)
    assert not await is_descendant(store, grandchild.id, root.id)
    assert not await is_descendant(store, root.id, other.id)
    assert not await is_descendant(store, root.id, uuid.uuid4())
    # other -> grandchild -> child -> other: a cycle that does not contain `root`.
    await _pg_execute(
        pg_dsn, "UPDATE chats SET parent_chat_id = %s WHERE id = %s", grandchild.id, other.id
    )
    await _pg_execute(
        pg_dsn, "UPDATE chats SET parent_chat_id = %s WHERE id = %s", other.id, child.id
    )
    before = store.statement_counts()["GetChatParent"]
    with trio.fail_after(10):
        assert not await is_descendant(store, root.id, grandchild.id)
    assert store.statement_counts()["GetChatParent"] - before == 3
