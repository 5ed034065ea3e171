"""The workspace context against real agents (`serve_agent` via LocalProvisioner), real clock.

`GUARD` only bounds a broken test; assertions are on results and counts.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from chatd_trio.agent import McpServerConfig, dial_agent
from chatd_trio.agent.local import LocalProvisioner
from chatd_trio.config import AgentConfig, WorkspaceConfig
from chatd_trio.domain import Chat, ContextFilePart, TextPart, ToolCallPart, ToolResultPart
from chatd_trio.store.base import Lease
from chatd_trio.store.memory import MemoryStore
from chatd_trio.tools import ToolContext, ToolRegistry
from chatd_trio.workspace import (
    InstructionOutcome,
    McpToolCache,
    WorkspaceContext,
    WorkspaceStats,
)
from chatd_trio.workspace_tools import workspace_tools

GUARD = 30
WORKER = uuid.UUID(int=9)
FIXTURE_MCP = Path(__file__).with_name("fixtures_mcp_server.py")
# The binding is written under the turn's lease: a guarded write of the chat row ("UpdateChat").
WATCHED = ("GetWorkspaceAgentByID", "GetWorkspaceAgentsInLatestBuild", "UpdateChat")


@dataclass
class Env:
    store: MemoryStore
    provisioner: LocalProvisioner
    nursery: trio.Nursery
    cache: McpToolCache
    stats: WorkspaceStats
    config: WorkspaceConfig

    def ctx(self, chat: Chat, *, manage: bool = False) -> WorkspaceContext:
        return WorkspaceContext(
            self.store,
            chat,
            Lease.of(chat),
            dial_agent,
            self.config,
            self.nursery,
            self.cache,
            self.stats,
            provisioner=self.provisioner if manage else None,
        )

    async def chat(self, workspace_id: uuid.UUID | None) -> Chat:
        await self.store.create_chat(
            uuid.uuid4(), "e2e", (TextPart("hi"),), workspace_id=workspace_id
        )
        (chat,) = await self.store.acquire(WORKER, 1)
        return chat

    def counts(self) -> dict[str, int]:
        now = self.store.statement_counts()
        return {name: now.get(name, 0) for name in WATCHED}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in WATCHED if after[k] != before[k]}


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = MemoryStore()
    config = WorkspaceConfig(mcp_discovery_timeout=GUARD, instruction_timeout=GUARD)
    async with trio.open_nursery() as nursery:
        servers = {"fx": McpServerConfig(command=sys.executable, args=(str(FIXTURE_MCP),))}
        provisioner = LocalProvisioner(store, nursery, tmp_path, mcp_servers=servers)
        yield Env(store, provisioner, nursery, McpToolCache(config), WorkspaceStats(), config)
        await provisioner.aclose()
        nursery.cancel_scope.cancel()


async def call(ctx: WorkspaceContext, name: str, /, **args: Any) -> ToolResultPart:
    registry = ToolRegistry(workspace_tools(ctx))
    return await registry.invoke(
        ToolCallPart(uuid.uuid4().hex, name, json.dumps(args)), ToolContext(ctx.chat.id)
    )


async def context_files(env: Env, chat_id: uuid.UUID) -> list[ContextFilePart]:
    return [
        part
        for m in await env.store.prompt_messages(chat_id)
        for part in m.parts
        if isinstance(part, ContextFilePart)
    ]


async def test_execute_then_rebuild_switches_and_persists_the_binding(env: Env) -> None:
    ws = await env.provisioner.create(uuid.uuid4(), "ws")
    first = env.provisioner.running_agent(ws.id)
    assert first is not None
    (env.provisioner.directory(ws.id) / "AGENTS.md").write_text("be kind to the tests")
    chat = await env.chat(ws.id)
    with trio.fail_after(GUARD):
        async with env.ctx(chat) as ctx:
            await ctx.prepare()
            result = await call(ctx, "execute", command="echo hi > f.txt && cat f.txt")
            assert not result.is_error and result.result["output"] == "hi\n"
        chat = await env.store.get_chat(chat.id)
        assert chat.agent_id == first.id
        (instructions,) = await context_files(env, chat.id)
        assert instructions.agent_id == first.id
        assert instructions.path.endswith("AGENTS.md")
        assert instructions.content == "be kind to the tests"

        # Rebuild: the old agent stops, a new build gets a new agent on a new port.
        second = await env.provisioner.start(ws.id)
        before = env.counts()
        async with env.ctx(chat) as ctx:
            await ctx.prepare()  # served from the replica's caches: no dial
            assert env.stats.dials == 1
            result = await call(ctx, "execute", command="cat f.txt")
            assert not result.is_error and result.result["output"] == "hi\n"
        assert delta(before, env.counts()) == {
            "GetWorkspaceAgentByID": 1,
            "GetWorkspaceAgentsInLatestBuild": 1,
            "UpdateChat": 1,
        }
        assert (env.stats.switches, env.stats.validations, env.stats.dials) == (1, 1, 3)
        chat = await env.store.get_chat(chat.id)
        assert (chat.build_id, chat.agent_id) == (second.build_id, second.id)

        # The next turn binds directly and reads the new agent's instruction files once.
        before = env.counts()
        async with env.ctx(chat) as ctx:
            assert await ctx.ensure_instructions() is InstructionOutcome.PERSISTED
        assert delta(before, env.counts()) == {"GetWorkspaceAgentByID": 1}
        assert [p.agent_id for p in await context_files(env, chat.id)] == [first.id, second.id]


async def test_stopped_workspace_returns_no_workspace_agent(env: Env) -> None:
    ws = await env.provisioner.create(uuid.uuid4(), "ws")
    chat = await env.chat(ws.id)
    with trio.fail_after(GUARD):
        async with env.ctx(chat) as ctx:
            await ctx.prepare()
        await env.provisioner.stop(ws.id)
        chat = await env.store.get_chat(chat.id)
        async with env.ctx(chat) as ctx:
            await ctx.prepare()
            result = await call(ctx, "execute", command="true")
    assert result.is_error and result.result["kind"] == "no_workspace_agent"
    assert env.stats.validations == 1


async def test_silent_agent_is_abandoned_at_the_validation_delay(env: Env) -> None:
    # Accepts TCP (kernel backlog) but never answers: the dial would wait for auth_timeout.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port = listeners[0].socket.getsockname()[:2]
    ws = await env.store.create_workspace(uuid.uuid4(), "silent")
    build = await env.store.create_build(ws.id)
    agent = await env.store.create_agent(build.id, "main", f"{host}:{port}", "token")
    await env.store.create_build(ws.id)  # stopped: the latest build has no agents
    chat = await env.chat(ws.id)
    await env.store.update_binding(chat.id, ws.id, build.id, agent.id)
    chat = await env.store.get_chat(chat.id)
    env.config = WorkspaceConfig(dial_validation_delay=0.2)
    try:
        # Half the auth timeout: passing proves the hanging dial was not waited for.
        with trio.fail_after(AgentConfig().auth_timeout / 2):
            async with env.ctx(chat) as ctx:
                result = await call(ctx, "execute", command="true")
    finally:
        for listener in listeners:
            await listener.aclose()
    assert result.result["kind"] == "no_workspace_agent"
    assert (env.stats.dials, env.stats.validations) == (1, 1)


async def test_workspace_management_tools_within_one_turn(env: Env) -> None:
    chat = await env.chat(None)
    with trio.fail_after(GUARD):
        async with env.ctx(chat, manage=True) as ctx:
            missing = await call(ctx, "execute", command="true")
            assert missing.result["kind"] == "chat_has_no_workspace"
            created = await call(ctx, "create_workspace", name="fresh")
            assert not created.is_error, created
            workspace_id = uuid.UUID(created.result["workspace_id"])
            ran = await call(ctx, "execute", command="echo one")
            assert ran.result["output"] == "one\n"
            bound = await env.store.get_chat(chat.id)
            running = env.provisioner.running_agent(workspace_id)
            assert running is not None and bound.agent_id == running.id

            assert not (await call(ctx, "stop_workspace")).is_error
            stopped = await call(ctx, "execute", command="true")
            assert stopped.result["kind"] == "no_workspace_agent"

            started = await call(ctx, "start_workspace")
            assert not started.is_error
            again = await call(ctx, "execute", command="echo two")
            assert again.result["output"] == "two\n"
    chat = await env.store.get_chat(chat.id)
    assert (chat.workspace_id, str(chat.agent_id)) == (workspace_id, started.result["agent_id"])


async def test_mcp_tools_discovered_once_and_callable(env: Env) -> None:
    ws = await env.provisioner.create(uuid.uuid4(), "ws")
    chat = await env.chat(ws.id)
    with trio.fail_after(GUARD):
        async with env.ctx(chat) as ctx:
            await ctx.prepare()
            assert {"fx__add", "fx__echo", "fx__fail"} <= {t.name for t in workspace_tools(ctx)}
            added = await call(ctx, "fx__add", a=2, b=3)
            failed = await call(ctx, "fx__fail", reason="nope")
        assert not added.is_error and added.result["content"][0]["text"] == "5"
        assert failed.is_error and "nope" in failed.result["error"]
        async with env.ctx(await env.store.get_chat(chat.id)) as ctx:
            await ctx.prepare()
            assert "fx__echo" in {t.name for t in workspace_tools(ctx)}
    assert (env.stats.mcp_discoveries, env.stats.mcp_cache_hits) == (1, 1)
    assert env.stats.dials == 1
