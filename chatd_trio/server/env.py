"""The turn environment: what a running turn knows (`TurnEnv`), and the tools it is
offered (`TurnTools`: the replica's tools, workspace tools, subagent tools)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from chatd_trio.agent.base import AgentDialer, WorkspaceProvisioner
from chatd_trio.domain import Chat
from chatd_trio.loop import TurnControl
from chatd_trio.models.base import Model
from chatd_trio.store.base import Lease
from chatd_trio.strategies import SubagentWake
from chatd_trio.subagents import subagent_tools
from chatd_trio.tools import ToolRegistry
from chatd_trio.workspace import WorkspaceContext
from chatd_trio.workspace_tools import workspace_tools

if TYPE_CHECKING:
    from chatd_trio.server.replica import Server

__all__ = ["ModelSource", "ToolsFactory", "TurnEnv", "TurnTools"]

ModelSource = Model | Callable[[Chat], Model]
ToolsFactory = Callable[["TurnEnv"], Awaitable[ToolRegistry]]


@dataclass
class TurnEnv:
    """What a running turn knows: handed to tool factories and turn hooks."""

    server: Server
    chat: Chat
    control: TurnControl
    nursery: trio.Nursery
    extras: dict[str, object] = field(default_factory=dict)
    # The turn's claim on the chat (`None` only for environments built outside a Server).
    lease: Lease | None = None
    # Run after the turn (shielded, in reverse order): release turn-local resources.
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@dataclass(frozen=True)
class TurnTools:
    """How a replica builds each turn's tool registry (the `Server`'s tool arguments).

    `factory`, when given, builds it; otherwise `default` does.
    """

    tools: ToolRegistry
    factory: ToolsFactory | None = None
    dialer: AgentDialer | None = None
    provisioner: WorkspaceProvisioner | None = None
    subagents: bool = True

    async def registry(self, env: TurnEnv) -> ToolRegistry:
        """The turn's tools."""
        factory = self.factory or self.default
        return await factory(env)

    async def default(self, env: TurnEnv) -> ToolRegistry:
        """The configured tools, plus workspace tools (with a dialer) and, for root
        chats, the subagent tools."""
        server = env.server
        tools = list(self.tools)
        if self.dialer is not None:
            assert env.lease is not None
            ctx = WorkspaceContext(
                server.store,
                env.chat,
                env.lease,
                self.dialer,
                server.config.workspace,
                env.nursery,
                server.mcp_cache,
                server.workspace_stats,
                provisioner=self.provisioner,
                agent_rows=server.agent_rows,
                strategies=server.strategies,
            )
            env.cleanups.append(ctx.aclose)
            env.extras["workspace"] = ctx
            # Bounded by the workspace timeouts; a stopped workspace leaves built-ins only.
            await ctx.prepare()
            tools.extend(workspace_tools(ctx))
        if self.subagents and env.chat.parent_chat_id is None:
            # Waits without the pubsub poll fast, as in single-process mode.
            notify = server.strategies.subagent_wake is SubagentWake.NOTIFY
            tools.extend(
                subagent_tools(
                    server,
                    server.store,
                    server.pubsub if notify else None,
                    server.config.subagents,
                    stats=server.subagent_stats,
                )
            )
        return ToolRegistry(tools)
