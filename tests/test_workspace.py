"""The turn-local workspace context (docs/spec.md §5, 5.1, 5.2) against a fake dialer.

Dial timing runs on the MockClock (`autojump_clock`); statement counts come
from the store. The statement-sequence test of a switch also runs on PostgreSQL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from chatd_trio.agent import (
    DirEntry,
    ExecResult,
    FileContent,
    InstructionFile,
    McpCallResult,
    McpTool,
)
from chatd_trio.config import WorkspaceConfig
from chatd_trio.domain import (
    Chat,
    ContextFilePart,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Visibility,
    WorkspaceAgent,
)
from chatd_trio.errors import (
    AgentConnectionLost,
    AgentUnavailable,
    ChatHasNoWorkspace,
    NoWorkspaceAgent,
)
from chatd_trio.store.base import Lease, Store
from chatd_trio.store.memory import MemoryStore
from chatd_trio.strategies import AgentResolution, Strategies
from chatd_trio.tools import ToolContext, ToolRegistry
from chatd_trio.workspace import (
    InstructionOutcome,
    McpToolCache,
    WorkspaceContext,
    WorkspaceStats,
)
from chatd_trio.workspace_tools import workspace_tools

CFG = WorkspaceConfig()
DELAY = CFG.dial_validation_delay
WORKER = uuid.UUID(int=7)

BY_ID = "GetWorkspaceAgentByID"
LATEST = "GetWorkspaceAgentsInLatestBuild"
# The binding is written under the turn's lease: a guarded write of the chat row, counted
# as "UpdateChat" (after the "LockChatForUpdate" + "GetChatForWrite" every guarded write runs).
BIND = "UpdateChat"
PROMPT = "GetPromptMessages"
GET_CHAT = "GetChatByID"
INSERT = "InsertChatMessages"
WATCHED = (BY_ID, LATEST, BIND, PROMPT, GET_CHAT, INSERT)
BUILTIN = {"execute", "read_file", "write_file", "list_dir"}


# -- fakes ----------------------------------------------------------------------------


@dataclass(eq=False)
class FakeConn:
    """A connection to a fake agent; records calls and releases."""

    agent: WorkspaceAgent
    world: FakeAgents
    releases: int = 0
    calls: list[str] = field(default_factory=list)

    async def release(self) -> None:
        self.releases += 1

    async def execute(
        self,
        command: str,
        timeout: float,  # noqa: ASYNC109
        *,
        output_limit: int | None = None,
    ) -> ExecResult:
        self.calls.append(f"execute:{command}")
        await trio.lowlevel.checkpoint()
        if self.world.lost:
            raise AgentConnectionLost("connection lost")
        return ExecResult(0, f"{self.agent.name}:{command}", False, False)

    async def read_file(self, path: str) -> FileContent:
        self.calls.append(f"read:{path}")
        return FileContent(path, "content", 7, False)

    async def write_file(self, path: str, content: str) -> int:
        self.calls.append(f"write:{path}")
        return len(content)

    async def list_dir(self, path: str = ".") -> list[DirEntry]:
        self.calls.append(f"list:{path}")
        return [DirEntry("a.txt", "file", 1)]

    async def instruction_files(self) -> list[InstructionFile]:
        self.calls.append("instructions")
        return list(self.world.files)

    async def mcp_list_tools(self) -> list[McpTool]:
        self.calls.append("mcp_list")
        return list(self.world.mcp)

    async def mcp_call_tool(
        self, server: str, tool: str, arguments: dict[str, Any]
    ) -> McpCallResult:
        self.calls.append(f"mcp:{server}.{tool}")
        return McpCallResult([{"type": "text", "text": json.dumps(arguments)}], False)


@dataclass
class FakeAgents:
    """The dialer: per agent "ok", "refuse" (fails at once) or "hang" (never answers)."""

    behaviour: dict[uuid.UUID, str] = field(default_factory=dict)
    files: list[InstructionFile] = field(default_factory=list)
    mcp: list[McpTool] = field(default_factory=list)
    conns: list[FakeConn] = field(default_factory=list)
    attempts: list[uuid.UUID] = field(default_factory=list)
    lost: bool = False

    async def dial(self, agent: WorkspaceAgent) -> tuple[FakeConn, Any]:
        self.attempts.append(agent.id)
        how = self.behaviour.get(agent.id, "ok")
        if how == "hang":
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        if how == "refuse":
            raise AgentUnavailable(f"agent {agent.id}: connection refused")
        conn = FakeConn(agent, self)
        self.conns.append(conn)
        return conn, conn.release


@dataclass
class World:
    store: Store
    chat: Chat
    agent: WorkspaceAgent
    agents: FakeAgents
    cache: McpToolCache
    stats: WorkspaceStats

    def ctx(
        self,
        nursery: trio.Nursery,
        config: WorkspaceConfig = CFG,
        chat: Chat | None = None,
        strategies: Strategies | None = None,
    ) -> WorkspaceContext:
        return WorkspaceContext(
            self.store,
            chat or self.chat,
            Lease.of(chat or self.chat),
            self.agents.dial,
            config,
            nursery,
            self.cache,
            self.stats,
            strategies=strategies,
        )

    async def reload(self) -> Chat:
        self.chat = await self.store.get_chat(self.chat.id)
        return self.chat


async def make_world(store: Store, *, bound: bool = False, workspace: bool = True) -> World:
    owner = uuid.uuid4()
    ws = await store.create_workspace(owner, "ws")
    build = await store.create_build(ws.id)
    agent = await store.create_agent(build.id, "main", "127.0.0.1:1", "token")
    chat, _ = await store.create_chat(
        owner,
        "a chat",
        (TextPart("hi"),),
        workspace_id=ws.id if workspace else None,
        build_id=build.id if bound else None,
        agent_id=agent.id if bound else None,
    )
    (running,) = await store.acquire(WORKER, 1)
    assert running.id == chat.id
    return World(store, running, agent, FakeAgents(), McpToolCache(), WorkspaceStats())


class Counts:
    """Statement counts since the last `take()`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.base = store.statement_counts()

    def take(self) -> dict[str, int]:
        now = self.store.statement_counts()
        delta = {name: now.get(name, 0) - self.base.get(name, 0) for name in WATCHED}
        self.base = now
        return {k: v for k, v in delta.items() if v}


async def call(ctx: WorkspaceContext, name: str, /, **args: Any) -> ToolResultPart:
    registry = ToolRegistry(workspace_tools(ctx))
    return await registry.invoke(
        ToolCallPart(uuid.uuid4().hex, name, json.dumps(args)), ToolContext(ctx.chat.id)
    )


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    yield MemoryStore()


# -- binding ---------------------------------------------------------------------------


async def test_bound_agent_is_looked_up_once_per_turn(store: Store) -> None:
    w = await make_world(store, bound=True)
    counts = Counts(store)
    async with trio.open_nursery() as nursery:
        async with w.ctx(nursery) as ctx:
            first = await ctx.conn()
            assert counts.take() == {BY_ID: 1}
            assert await ctx.conn() is first
            for name, args in [("execute", {"command": "ls"}), ("list_dir", {})]:
                result = await call(ctx, name, **args)
                assert not result.is_error, result
            assert counts.take() == {}
        # Turn two: the binding is reused, no latest-build lookup, no write.
        async with w.ctx(nursery, chat=await w.reload()) as ctx:
            await ctx.conn()
    assert counts.take() == {GET_CHAT: 1, BY_ID: 1}
    assert len(w.agents.conns) == 2
    assert [c.releases for c in w.agents.conns] == [1, 1]
    assert w.stats.validations == 0 and w.stats.binding_updates == 0


async def test_unbound_chat_binds_lazily_and_persists(store: Store) -> None:
    w = await make_world(store)
    counts = Counts(store)
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        assert await ctx.agent() == w.agent
        assert counts.take() == {LATEST: 1, BIND: 1}
        await ctx.conn()
        assert counts.take() == {}
    chat = await w.reload()
    assert (chat.build_id, chat.agent_id) == (w.agent.build_id, w.agent.id)
    async with trio.open_nursery() as nursery, w.ctx(nursery, chat=chat) as ctx:
        await ctx.conn()
    assert counts.take() == {GET_CHAT: 1, BY_ID: 1}


async def test_stale_binding_is_repaired(store: Store) -> None:
    w = await make_world(store)
    gone = uuid.uuid4()
    await store.update_binding(w.chat.id, w.chat.workspace_id, uuid.uuid4(), gone)
    chat = await w.reload()
    counts = Counts(store)
    async with trio.open_nursery() as nursery, w.ctx(nursery, chat=chat) as ctx:
        await ctx.conn()
    assert counts.take() == {BY_ID: 1, LATEST: 1, BIND: 1}
    chat = await w.reload()
    assert (chat.build_id, chat.agent_id) == (w.agent.build_id, w.agent.id)
    assert w.agents.attempts == [w.agent.id]


async def test_no_agents_in_latest_build(store: Store) -> None:
    w = await make_world(store)
    assert w.chat.workspace_id is not None
    await store.create_build(w.chat.workspace_id)
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        with pytest.raises(NoWorkspaceAgent):
            await ctx.conn()
        result = await call(ctx, "execute", command="ls")
    assert result.is_error and result.result["kind"] == "no_workspace_agent"
    assert w.agents.attempts == []
    assert (await w.reload()).agent_id is None


async def test_chat_without_workspace_reloads_once_then_errors(store: Store) -> None:
    w = await make_world(store, workspace=False)
    counts = Counts(store)
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        with pytest.raises(ChatHasNoWorkspace):
            await ctx.agent()
        assert counts.take() == {GET_CHAT: 1}
        result = await call(ctx, "read_file", path="x")
        assert result.is_error and result.result["kind"] == "chat_has_no_workspace"
        # A tool elsewhere attaches a workspace: the next resolution reloads and finds it.
        ws = await store.create_workspace(w.chat.owner_id, "new")
        build = await store.create_build(ws.id)
        agent = await store.create_agent(build.id, "main", "127.0.0.1:1", "t")
        await store.update_binding(w.chat.id, ws.id, None, None)
        counts.take()
        assert await ctx.agent() == agent
        assert counts.take() == {GET_CHAT: 1, LATEST: 1, BIND: 1}


@pytest.mark.parametrize("kind", ["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_switch_after_fast_failing_stale_dial_statement_sequence(
    kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "memory":
        await _switch_sequence(MemoryStore())
        return
    from chatd_trio.store.postgres import PostgresStore
    from tests.pgcluster import truncate_all

    dsn = str(request.getfixturevalue("pg_dsn"))
    async with PostgresStore.open(dsn) as pg:
        await trio.to_thread.run_sync(truncate_all, dsn)
        await _switch_sequence(pg)


async def _switch_sequence(store: Store) -> None:
    w = await make_world(store, bound=True)
    assert w.chat.workspace_id is not None
    rebuilt = await store.create_build(w.chat.workspace_id)
    fresh = await store.create_agent(rebuilt.id, "main", "127.0.0.1:2", "t2")
    w.agents.behaviour[w.agent.id] = "refuse"
    counts = Counts(store)
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        conn = await ctx.conn()
        assert counts.take() == {BY_ID: 1, LATEST: 1, BIND: 1}
        assert ctx.cached_agent == fresh
        result = await call(ctx, "execute", command="pwd")
        assert result.result["output"] == "main:pwd"
        assert await ctx.conn() is conn
        assert counts.take() == {}
    assert w.agents.attempts == [w.agent.id, fresh.id]
    assert (w.stats.dials, w.stats.validations, w.stats.switches) == (2, 1, 1)
    chat = await w.reload()
    assert (chat.workspace_id, chat.build_id, chat.agent_id) == (
        fresh.workspace_id,
        rebuilt.id,
        fresh.id,
    )
    # The next turn dials the new agent directly.
    async with trio.open_nursery() as nursery, w.ctx(nursery, chat=chat) as ctx:
        await ctx.conn()
    assert counts.take() == {GET_CHAT: 1, BY_ID: 1}
    assert w.agents.attempts[-1] == fresh.id


# -- a stopped workspace never hangs ---------------------------------------------------------


async def stop(w: World) -> None:
    assert w.chat.workspace_id is not None
    await w.store.create_build(w.chat.workspace_id)


async def test_stopped_workspace_with_hanging_dial_fails_at_the_delay(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    w = await make_world(store, bound=True)
    await stop(w)
    w.agents.behaviour[w.agent.id] = "hang"
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        start = trio.current_time()
        with pytest.raises(NoWorkspaceAgent):
            await ctx.conn()
        assert trio.current_time() - start == pytest.approx(DELAY)
        assert ctx.cached_agent is None
        start = trio.current_time()
        result = await call(ctx, "execute", command="ls")
        assert trio.current_time() - start == pytest.approx(DELAY)
    assert result.is_error and result.result["kind"] == "no_workspace_agent"
    assert w.stats.validations == 2 and w.agents.conns == []


async def test_stopped_workspace_with_refusing_agent_fails_at_once(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    w = await make_world(store, bound=True)
    await stop(w)
    w.agents.behaviour[w.agent.id] = "refuse"
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        start = trio.current_time()
        result = await call(ctx, "execute", command="ls")
        assert trio.current_time() == start
    assert result.result["kind"] == "no_workspace_agent"


async def test_prepare_on_stopped_workspace_is_bounded_and_persists_nothing(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    w = await make_world(store, bound=True)
    await stop(w)
    w.agents.behaviour[w.agent.id] = "hang"
    counts = Counts(store)
    bound = max(CFG.instruction_timeout, CFG.mcp_discovery_timeout, DELAY)
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        start = trio.current_time()
        await ctx.prepare()
        assert trio.current_time() - start <= bound
        names = {t.name for t in workspace_tools(ctx)}
    assert names == BUILTIN
    assert INSERT not in counts.take()
    assert w.stats.instruction_persists == 0 and w.stats.mcp_discoveries == 0


async def test_prepare_with_warm_caches_needs_no_dial(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    w = await make_world(store, bound=True)
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        await ctx.prepare()
    assert len(w.agents.attempts) == 1
    # The workspace stops; the next turn's setup is served from the caches, instantly.
    await stop(w)
    w.agents.behaviour[w.agent.id] = "hang"
    counts = Counts(store)
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        start = trio.current_time()
        await ctx.prepare()
        assert trio.current_time() == start
    assert counts.take() == {BY_ID: 1}
    assert len(w.agents.attempts) == 1
    assert w.stats.mcp_cache_hits == 1


async def test_prepare_without_workspace_returns_quietly(store: Store) -> None:
    w = await make_world(store, workspace=False)
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        await ctx.prepare()
        assert len(workspace_tools(ctx)) == 4
    assert w.agents.attempts == []


# -- the cached connection ----------------------------------------------------------------------


async def test_parallel_tool_calls_share_one_dial(store: Store) -> None:
    w = await make_world(store, bound=True)
    results: list[ToolResultPart] = []
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:

        async def one(i: int) -> None:
            results.append(await call(ctx, "execute", command=f"echo {i}"))

        async with trio.open_nursery() as tools:
            for i in range(5):
                tools.start_soon(one, i)
    assert len(results) == 5 and not any(r.is_error for r in results)
    (conn,) = w.agents.conns
    assert len(conn.calls) == 5 and conn.releases == 1


async def test_aclose_releases_exactly_once(store: Store) -> None:
    w = await make_world(store, bound=True)
    async with trio.open_nursery() as nursery:
        ctx = w.ctx(nursery)
        await ctx.conn()
        await ctx.conn()
        await ctx.aclose()
        await ctx.aclose()
        with pytest.raises(Exception, match="closed"):
            await ctx.conn()
    assert [c.releases for c in w.agents.conns] == [1]


async def test_changing_workspace_releases_the_cached_connection_once(store: Store) -> None:
    w = await make_world(store, bound=True)
    other = await store.create_workspace(w.chat.owner_id, "other")
    build = await store.create_build(other.id)
    other_agent = await store.create_agent(build.id, "other", "127.0.0.1:3", "t3")
    counts = Counts(store)
    async with trio.open_nursery() as nursery:
        async with w.ctx(nursery) as ctx:
            await ctx.conn()
            (first,) = w.agents.conns
            await ctx.change_workspace(other.id)
            assert first.releases == 1
            assert ctx.cached_agent is None
            assert counts.take() == {BY_ID: 1, BIND: 1}
            chat = await w.reload()
            assert (chat.workspace_id, chat.build_id, chat.agent_id) == (other.id, None, None)
            result = await call(ctx, "execute", command="hostname")
            assert result.result["output"] == "other:hostname"
            assert counts.take() == {GET_CHAT: 1, LATEST: 1, BIND: 1}
        assert first.releases == 1
    second = w.agents.conns[1]
    assert second.agent == other_agent and second.releases == 1
    assert (await w.reload()).agent_id == other_agent.id


async def test_lost_connection_is_dropped_and_redialed(store: Store) -> None:
    w = await make_world(store, bound=True)
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        w.agents.lost = True
        result = await call(ctx, "execute", command="ls")
        assert result.is_error and result.result["kind"] == "agent_unavailable"
        assert w.agents.conns[0].releases == 1
        w.agents.lost = False
        result = await call(ctx, "execute", command="ls")
        assert not result.is_error
    assert [c.releases for c in w.agents.conns] == [1, 1]


async def test_baseline_mode_resolves_and_dials_per_call(store: Store) -> None:
    w = await make_world(store, bound=True)
    counts = Counts(store)
    per_call = Strategies(agent_resolution=AgentResolution.PER_CALL)
    async with trio.open_nursery() as nursery, w.ctx(nursery, strategies=per_call) as ctx:
        for _ in range(3):
            assert not (await call(ctx, "execute", command="ls")).is_error
    assert counts.take() == {LATEST: 3}
    assert [c.releases for c in w.agents.conns] == [1, 1, 1]


async def test_tool_argument_errors(store: Store) -> None:
    w = await make_world(store, bound=True)
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        missing = await call(ctx, "execute")
        bad = await call(ctx, "execute", command="ls", timeout=-1)
        written = await call(ctx, "write_file", path="a", content="")
        read = await call(ctx, "read_file", path="a")
    assert missing.is_error and "command" in missing.result["error"]
    assert bad.is_error and "timeout" in bad.result["error"]
    # The one argument check of every typed tool (chatd_trio.tools).
    assert missing.result["error"] == "invalid arguments: command: Field required"
    assert bad.result["error"] == "invalid arguments: timeout: Input should be greater than 0"
    assert written.result == {"path": "a", "bytes": 0}
    assert read.result["content"] == "content"


# -- instruction files ------------------------------------------------------------------------


async def context_messages(store: Store, chat_id: uuid.UUID) -> list[tuple[ContextFilePart, ...]]:
    out = []
    for m in await store.prompt_messages(chat_id):
        parts = tuple(p for p in m.parts if isinstance(p, ContextFilePart))
        if parts:
            assert (m.role, m.visibility) == (Role.SYSTEM, Visibility.MODEL)
            out.append(parts)
    return out


async def test_instruction_files_persisted_once_per_agent(store: Store) -> None:
    w = await make_world(store, bound=True)
    w.agents.files = [
        InstructionFile("/home/u/.agents.md", "home rules", False),
        InstructionFile("/ws/AGENTS.md", "repo rules", False),
    ]
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        assert await ctx.ensure_instructions() is InstructionOutcome.PERSISTED
    assert await context_messages(store, w.chat.id) == [
        (
            ContextFilePart(w.agent.id, "/home/u/.agents.md", "home rules"),
            ContextFilePart(w.agent.id, "/ws/AGENTS.md", "repo rules"),
        )
    ]
    counts = Counts(store)
    # Next turn on this replica: known, no history read, no dial.
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        assert await ctx.ensure_instructions() is InstructionOutcome.KNOWN
    assert counts.take() == {BY_ID: 1}
    # Another replica (empty cache) reads the history once and finds them.
    w.cache = McpToolCache()
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        assert await ctx.ensure_instructions() is InstructionOutcome.PRESENT
        assert await ctx.ensure_instructions() is InstructionOutcome.KNOWN
    assert counts.take() == {BY_ID: 1, PROMPT: 1}
    assert len(w.agents.attempts) == 1
    assert len(await context_messages(store, w.chat.id)) == 1
    assert w.stats.instruction_persists == 1


async def test_instructions_of_unreachable_agent_persist_nothing(store: Store) -> None:
    w = await make_world(store, bound=True)
    w.agents.behaviour[w.agent.id] = "refuse"
    w.agents.files = [InstructionFile("/ws/AGENTS.md", "rules", False)]
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        assert await ctx.ensure_instructions() is InstructionOutcome.UNAVAILABLE
    assert await context_messages(store, w.chat.id) == []
    # The workspace comes back: the next turn retries and persists.
    w.agents.behaviour.clear()
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        assert await ctx.ensure_instructions() is InstructionOutcome.PERSISTED
    assert len(await context_messages(store, w.chat.id)) == 1


async def test_instructions_time_out_without_persisting(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    w = await make_world(store, bound=True)
    w.agents.behaviour[w.agent.id] = "hang"
    config = WorkspaceConfig(instruction_timeout=1.0)
    async with trio.open_nursery() as nursery, w.ctx(nursery, config) as ctx:
        start = trio.current_time()
        assert await ctx.ensure_instructions() is InstructionOutcome.UNAVAILABLE
        assert trio.current_time() - start == pytest.approx(1.0)
    assert await context_messages(store, w.chat.id) == []


async def test_sentinel_when_the_agent_has_no_instruction_files(store: Store) -> None:
    w = await make_world(store, bound=True)
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        assert await ctx.ensure_instructions() is InstructionOutcome.SENTINEL
    ((sentinel,),) = await context_messages(store, w.chat.id)
    assert sentinel == ContextFilePart(w.agent.id) and sentinel.is_sentinel
    w.cache = McpToolCache()
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        assert await ctx.ensure_instructions() is InstructionOutcome.PRESENT
    assert len(w.agents.attempts) == 1


# -- MCP tools ---------------------------------------------------------------------------------


async def test_mcp_discovery_is_cached_across_turns(store: Store) -> None:
    w = await make_world(store, bound=True)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    w.agents.mcp = [
        McpTool("fx", "add", "Add.", schema),
        McpTool("fx", "bad name", "Unusable in a tool list.", schema),
        McpTool("fx", "x" * 70, "Too long.", schema),
    ]
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        await ctx.prepare()
        assert {t.name for t in workspace_tools(ctx)} - BUILTIN == {"fx__add"}
    assert (w.stats.mcp_discoveries, w.stats.mcp_cache_hits) == (1, 0)
    assert w.agents.conns[0].calls.count("mcp_list") == 1
    async with trio.open_nursery() as nursery, w.ctx(nursery, chat=await w.reload()) as ctx:
        await ctx.prepare()
        assert len(w.agents.attempts) == 1  # steady state: no dial, no discovery
        result = await call(ctx, "fx__add", a=2)
    assert (w.stats.mcp_discoveries, w.stats.mcp_cache_hits) == (1, 1)
    assert not result.is_error and result.result["content"][0]["text"] == '{"a": 2}'
    assert w.agents.conns[1].calls == ["mcp:fx.add"]


async def test_mcp_discovery_failure_caches_nothing(store: Store) -> None:
    w = await make_world(store, bound=True)
    w.agents.behaviour[w.agent.id] = "refuse"
    async with trio.open_nursery() as nursery, w.ctx(nursery) as ctx:
        assert await ctx.discover_mcp_tools() == ()
    assert w.cache.get(w.agent.id) is None and w.stats.mcp_discoveries == 0


def test_replica_cache_is_lru_bounded_and_forgets_edited_chats() -> None:
    cache = McpToolCache(WorkspaceConfig(mcp_cache_max_agents=2, instruction_ledger_max_entries=2))
    a, b, c = (uuid.UUID(int=i) for i in (1, 2, 3))
    tool = McpTool("s", "t", "", {})
    cache.put(a, [tool])
    cache.put(b, [])
    assert cache.get(a) == (tool,)  # a is now the most recently used
    cache.put(c, [])
    assert (cache.get(a), cache.get(b), cache.get(c)) == ((tool,), None, ())
    chat, other = uuid.UUID(int=10), uuid.UUID(int=11)
    cache.remember_instructions(chat, a)
    cache.remember_instructions(other, a)
    cache.forget_chat(chat)
    assert not cache.instructions_known(chat, a) and cache.instructions_known(other, a)
    cache.remember_instructions(chat, b)
    cache.remember_instructions(chat, c)
    assert not cache.instructions_known(other, a)  # evicted: the ledger holds two entries
