"""Turn-local workspace context: binding, lazy-validation dial, instructions, MCP.

docs/spec.md §5. One `WorkspaceContext` lives for one turn. It resolves the
chat's agent once (the persisted binding first, the latest build as the
fallback, repairing the binding), dials it once through
`dial_with_lazy_validation` and shares that connection with every tool call,
the instruction files and MCP discovery of the turn. `aclose()` releases the
connection at turn end. This module drives; the tools the model sees (schemas,
arguments, results) are `chatd_trio.workspace_tools`; the ports it drives
(`WorkspaceConnection`, `AgentDialer`, `WorkspaceProvisioner`, re-exported here) are
`chatd_trio.agent.base`, and the agents behind them are adapters
(`chatd_trio.agent`: `dial_agent`, `LocalProvisioner`).

Replica-level state lives outside the turn: `McpToolCache` (MCP tools per
agent, and which chats already hold an agent's instruction files) and
`WorkspaceStats` (counters for `Server.stats()`).

Wiring it into a turn (the server's tools factory)::

    ctx = WorkspaceContext(store, chat, lease, dial_agent, config.workspace,
                           turn_nursery, mcp_cache, stats, provisioner=provisioner)
    env.cleanups.append(ctx.aclose)
    await ctx.prepare()  # bounded, never raises for workspace problems
    registry = ToolRegistry(workspace_tools(ctx))
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from chatd_trio._closing import AsyncClosing
from chatd_trio.agent.base import (
    AgentDialer,
    InstructionFile,
    McpTool,
    WorkspaceConnection,
    WorkspaceProvisioner,
)
from chatd_trio.config import WorkspaceConfig
from chatd_trio.dial import (
    DialCounter,
    DialResult,
    Release,
    dial_with_lazy_validation,
    release_logged,
)
from chatd_trio.domain import (
    Chat,
    ContextFilePart,
    NewMessage,
    Role,
    Visibility,
    WorkspaceAgent,
)
from chatd_trio.errors import (
    AgentUnavailable,
    ChatdError,
    ChatHasNoWorkspace,
    NoWorkspaceAgent,
)
from chatd_trio.store.base import Lease, Store
from chatd_trio.strategies import AgentResolution, Strategies

__all__ = [
    "AgentDialer",
    "AgentRows",
    "InstructionOutcome",
    "McpToolCache",
    "WorkspaceConnection",
    "WorkspaceContext",
    "WorkspaceProvisioner",
    "WorkspaceStatistics",
    "WorkspaceStats",
]

logger = logging.getLogger(__name__)


# -- replica-level state --------------------------------------------------------------


@dataclass(frozen=True)
class WorkspaceStatistics:
    """A snapshot of `WorkspaceStats`."""

    # Dials of agents, bindings validated against the latest build, and dials that
    # switched to another agent (`DialCounter`).
    dials: int
    validations: int
    switches: int
    agent_lookups: int
    latest_build_lookups: int
    binding_updates: int
    instruction_persists: int
    mcp_discoveries: int
    mcp_cache_hits: int


@dataclass
class WorkspaceStats(DialCounter):
    """Workspace counters of one replica; as a `DialCounter` it observes its dials."""

    agent_lookups: int = 0
    latest_build_lookups: int = 0
    binding_updates: int = 0
    instruction_persists: int = 0
    mcp_discoveries: int = 0
    mcp_cache_hits: int = 0

    def statistics(self) -> WorkspaceStatistics:
        """A frozen copy of the counters."""
        return WorkspaceStatistics(**dataclasses.asdict(self))


class AgentRows:
    """Replica-level memory of workspace agent rows by id (LRU-bounded).

    An agent row never changes once inserted (a rebuild inserts new agents), so a
    turn bound to an agent this replica has seen reads no row: whether that agent
    still runs is what the dial finds out, as with a row just read.
    """

    def __init__(self, config: WorkspaceConfig | None = None) -> None:
        cfg = config if config is not None else WorkspaceConfig()
        self._max = cfg.mcp_cache_max_agents
        self._rows: OrderedDict[uuid.UUID, WorkspaceAgent] = OrderedDict()

    def get(self, agent_id: uuid.UUID) -> WorkspaceAgent | None:
        """The agent's row, or None when not seen (or evicted)."""
        row = self._rows.get(agent_id)
        if row is not None:
            self._rows.move_to_end(agent_id)
        return row

    def put(self, agent: WorkspaceAgent) -> None:
        self._rows[agent.id] = agent
        self._rows.move_to_end(agent.id)
        while len(self._rows) > self._max:
            self._rows.popitem(last=False)


class McpToolCache:
    """Replica-level, per-agent memory shared by every turn of the replica.

    Holds the MCP tools discovered through each agent (a steady-state turn does
    no discovery round trip; stale tools fail at invocation, which is harmless)
    and which chats already hold an agent's instruction files (a steady-state
    turn reads no history). Both are LRU-bounded.

    The instruction ledger is an optimistic cache too: an edit soft-deletes
    the instruction message with everything after it, so whoever handles an
    edit calls `forget_chat`. A replica that did not see the edit keeps its
    entry until it is evicted or the replica restarts.
    """

    def __init__(self, config: WorkspaceConfig | None = None) -> None:
        cfg = config if config is not None else WorkspaceConfig()
        self._max_agents = cfg.mcp_cache_max_agents
        self._max_ledger = cfg.instruction_ledger_max_entries
        self._tools: OrderedDict[uuid.UUID, tuple[McpTool, ...]] = OrderedDict()
        self._ledger: OrderedDict[tuple[uuid.UUID, uuid.UUID], None] = OrderedDict()

    def get(self, agent_id: uuid.UUID) -> tuple[McpTool, ...] | None:
        """The agent's cached tools, or None when never discovered (or evicted)."""
        tools = self._tools.get(agent_id)
        if tools is not None:
            self._tools.move_to_end(agent_id)
        return tools

    def put(self, agent_id: uuid.UUID, tools: Sequence[McpTool]) -> None:
        self._tools[agent_id] = tuple(tools)
        self._tools.move_to_end(agent_id)
        while len(self._tools) > self._max_agents:
            self._tools.popitem(last=False)

    def discard(self, agent_id: uuid.UUID) -> None:
        self._tools.pop(agent_id, None)

    def instructions_known(self, chat_id: uuid.UUID, agent_id: uuid.UUID) -> bool:
        """True when this replica knows the chat's history holds the agent's instructions."""
        key = (chat_id, agent_id)
        if key in self._ledger:
            self._ledger.move_to_end(key)
            return True
        return False

    def remember_instructions(self, chat_id: uuid.UUID, agent_id: uuid.UUID) -> None:
        self._ledger[(chat_id, agent_id)] = None
        self._ledger.move_to_end((chat_id, agent_id))
        while len(self._ledger) > self._max_ledger:
            self._ledger.popitem(last=False)

    def forget_chat(self, chat_id: uuid.UUID) -> None:
        """Drop what is known about a chat's history (call it after an edit)."""
        for key in [k for k in self._ledger if k[0] == chat_id]:
            del self._ledger[key]


class InstructionOutcome(enum.StrEnum):
    """What `WorkspaceContext.ensure_instructions` did."""

    KNOWN = "known"  # the replica's ledger says the history holds them: no I/O
    PRESENT = "present"  # found in the history
    PERSISTED = "persisted"  # read from the agent and persisted
    SENTINEL = "sentinel"  # the agent has none: a sentinel was persisted
    UNAVAILABLE = "unavailable"  # no workspace, no agent or no connection: nothing persisted


# -- the turn-local context -------------------------------------------------------------


@dataclass(frozen=True)
class _Lease:
    conn: WorkspaceConnection
    agent: WorkspaceAgent


class WorkspaceContext(AsyncClosing):
    """The workspace of one turn: resolve the agent once, dial once, release at the end.

    `dialer` connects to an agent (`dial_agent`); `nursery` is the turn's
    nursery, where a stale dial finishes and its late connection is released;
    `mcp_cache`, `stats` and `agent_rows` belong to the replica. With
    `strategies.agent_resolution` `PER_CALL` (the baseline) every operation resolves
    the latest build and dials anew, releasing the connection after the call.
    """

    def __init__(
        self,
        store: Store,
        chat: Chat,
        lease: Lease,
        dialer: AgentDialer,
        config: WorkspaceConfig,
        nursery: trio.Nursery,
        mcp_cache: McpToolCache,
        stats: WorkspaceStats,
        *,
        provisioner: WorkspaceProvisioner | None = None,
        agent_rows: AgentRows | None = None,
        strategies: Strategies | None = None,
    ) -> None:
        self._store = store
        self._rows = agent_rows
        self._chat = chat
        # The turn's claim on the chat: its writes (binding, instruction files) carry it.
        self._claim = lease
        self._dialer = dialer
        self._config = config
        self._bound = (strategies or Strategies()).agent_resolution is AgentResolution.BOUND
        self._nursery = nursery
        self._cache = mcp_cache
        self._stats = stats
        self._provisioner = provisioner
        # One resolution and one dial at a time: parallel tools share the result.
        self._lock = trio.Lock()
        self._agent: WorkspaceAgent | None = None
        self._dialed: DialResult[WorkspaceConnection] | None = None
        self._dialed_agent: WorkspaceAgent | None = None
        # Agent rows seen this turn, so a switched dial needs no extra lookup.
        self._known: dict[uuid.UUID, WorkspaceAgent] = {}
        # Agent ids whose context files the history holds (read at most once per turn).
        self._history_agents: set[uuid.UUID] | None = None
        self._mcp_tools: tuple[McpTool, ...] = ()
        self._closed = False

    # -- properties -------------------------------------------------------------------

    @property
    def chat(self) -> Chat:
        """The chat as this turn knows it (binding updates included)."""
        return self._chat

    @property
    def config(self) -> WorkspaceConfig:
        """The workspace settings of the turn."""
        return self._config

    @property
    def provisioner(self) -> WorkspaceProvisioner | None:
        """What creates, starts and stops workspaces, when this replica may manage them."""
        return self._provisioner

    @property
    def cached_agent(self) -> WorkspaceAgent | None:
        """The agent resolved for this turn, if any."""
        return self._agent

    @property
    def mcp_tools(self) -> tuple[McpTool, ...]:
        """MCP tools offered this turn (filled by `discover_mcp_tools`)."""
        return self._mcp_tools

    # -- lifecycle --------------------------------------------------------------------

    async def aclose(self) -> None:
        """Release the cached connection (exactly once); later calls change nothing."""
        self._closed = True
        await self._drop_connection()

    # -- agent resolution ---------------------------------------------------------------

    async def agent(self) -> WorkspaceAgent:
        """The turn's agent, resolved once.

        Raises `ChatHasNoWorkspace` or `NoWorkspaceAgent`. Resolving per call (the
        baseline), every call asks the latest build.
        """
        if not self._bound:
            return (await self._latest_agents(await self.workspace_id()))[0]
        if self._agent is not None:
            return self._agent
        async with self._lock:
            return await self._resolve_locked()

    async def _resolve_locked(self) -> WorkspaceAgent:
        if self._agent is not None:
            return self._agent
        workspace_id = await self.workspace_id()
        bound_id = self._chat.agent_id
        if bound_id is not None:
            bound = self._rows.get(bound_id) if self._rows is not None else None
            if bound is None:
                self._stats.agent_lookups += 1
                bound = await self._store.agent_by_id(bound_id)
                if bound is not None and self._rows is not None:
                    self._rows.put(bound)
            if bound is not None and bound.workspace_id == workspace_id:
                self._known[bound.id] = bound
                self._agent = bound
                return bound
            logger.info(
                "bound agent is gone; resolving the latest build",
                extra={"chat_id": str(self._chat.id), "agent_id": str(bound_id)},
            )
        agent = (await self._latest_agents(workspace_id))[0]
        await self._bind(agent)
        self._agent = agent
        return agent

    async def workspace_id(self) -> uuid.UUID:
        """The chat's workspace; raises `ChatHasNoWorkspace` when it has none."""
        if self._chat.workspace_id is None:
            # A tool (create_workspace) may have just attached one elsewhere.
            self._chat = await self._store.get_chat(self._chat.id)
        if self._chat.workspace_id is None:
            raise ChatHasNoWorkspace()
        return self._chat.workspace_id

    async def _latest_agents(self, workspace_id: uuid.UUID) -> list[WorkspaceAgent]:
        self._stats.latest_build_lookups += 1
        agents = await self._store.latest_build_agents(workspace_id)
        if not agents:
            raise NoWorkspaceAgent()
        for a in agents:
            self._known[a.id] = a
            if self._rows is not None:
                self._rows.put(a)
        return agents

    async def _bind(self, agent: WorkspaceAgent) -> None:
        chat = self._chat
        if (chat.workspace_id, chat.build_id, chat.agent_id) == (
            agent.workspace_id,
            agent.build_id,
            agent.id,
        ):
            return
        self._chat = dataclasses.replace(
            chat, workspace_id=agent.workspace_id, build_id=agent.build_id, agent_id=agent.id
        )
        self._stats.binding_updates += 1
        try:
            await self._store.update_binding(
                chat.id, agent.workspace_id, agent.build_id, agent.id, lease=self._claim
            )
        except ChatdError as exc:
            # The binding is an optimistic cache: a failed write costs a lookup next turn.
            logger.warning(
                "persisting the workspace binding failed",
                extra={"chat_id": str(chat.id), "agent_id": str(agent.id), "error": repr(exc)},
            )

    # -- connections ----------------------------------------------------------------

    async def conn(self) -> WorkspaceConnection:
        """The turn's cached connection, dialed on first use (binding mode only).

        Raises `ChatHasNoWorkspace`, `NoWorkspaceAgent` (cached state cleared)
        or `DialError`.
        """
        return (await self._cached_lease()).conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[WorkspaceConnection]:
        """A connection for one operation: the cached one, or a fresh one in baseline mode."""
        async with self._lease() as lease:
            yield lease.conn

    @asynccontextmanager
    async def _lease(self) -> AsyncIterator[_Lease]:
        if self._bound:
            lease = await self._cached_lease()
            try:
                yield lease
            except AgentUnavailable:
                # The agent went away mid-turn: the next call dials (and validates) anew.
                await self._drop_connection(lease.conn)
                raise
            return
        agent = await self.agent()
        self._stats.dials += 1
        conn, release = await self._dialer(agent)
        try:
            yield _Lease(conn, agent)
        finally:
            await self._release(release, agent.id)

    async def _cached_lease(self) -> _Lease:
        if self._closed:
            raise ChatdError("the turn's workspace context is closed")
        dialed, agent = self._dialed, self._dialed_agent
        if dialed is not None and agent is not None:
            return _Lease(dialed.conn, agent)
        async with self._lock:
            if self._dialed is not None and self._dialed_agent is not None:
                return _Lease(self._dialed.conn, self._dialed_agent)
            bound = await self._resolve_locked()
            try:
                result = await dial_with_lazy_validation(
                    bound.id,
                    bound.workspace_id,
                    dial=self._dial_by_id,
                    validate=self._validate,
                    delay=self._config.dial_validation_delay,
                    nursery=self._nursery,
                    observer=self._stats,
                    release_timeout=self._config.dial_release_timeout,
                )
            except NoWorkspaceAgent:
                self._agent = None
                raise
            target = self._known[result.agent_id]
            if self._closed:
                await self._release(result.release, target.id)
                raise ChatdError("the turn's workspace context is closed")
            self._dialed, self._dialed_agent = result, target
            if result.was_switched:
                self._agent = target
                await self._bind(target)
            return _Lease(result.conn, target)

    async def _dial_by_id(self, agent_id: uuid.UUID) -> tuple[WorkspaceConnection, Release]:
        agent = self._known.get(agent_id)
        if agent is None:  # pragma: no cover - resolution and validation record every id
            raise AgentUnavailable(f"agent {agent_id} is unknown")
        return await self._dialer(agent)

    async def _validate(self, workspace_id: uuid.UUID) -> uuid.UUID:
        return (await self._latest_agents(workspace_id))[0].id

    async def _drop_connection(self, only: WorkspaceConnection | None = None) -> None:
        dialed = self._dialed
        if dialed is None or (only is not None and dialed.conn is not only):
            return
        self._dialed, self._dialed_agent = None, None
        await self._release(dialed.release, dialed.agent_id)

    async def _release(self, release: Release, agent_id: uuid.UUID) -> None:
        timeout = self._config.dial_release_timeout
        await release_logged(release, agent_id, timeout, logger, "an agent connection")

    async def change_workspace(self, workspace_id: uuid.UUID | None) -> None:
        """Point the chat at `workspace_id` (binding build/agent cleared, bound lazily later);
        the cached connection is released exactly once and the cached agent forgotten."""
        # Under the lock: a dial in flight for the old workspace must not land afterwards.
        async with self._lock:
            chat = self._chat
            self._chat = dataclasses.replace(
                chat, workspace_id=workspace_id, build_id=None, agent_id=None
            )
            self._agent = None
            self._stats.binding_updates += 1
            try:
                await self._store.update_binding(
                    chat.id, workspace_id, None, None, lease=self._claim
                )
            finally:
                await self._drop_connection()

    # -- instruction files ----------------------------------------------------------

    async def ensure_instructions(self) -> InstructionOutcome:
        """Persist the agent's instruction files once per agent (docs/spec.md §5.2).

        Reads within `instruction_timeout`; when the agent has none a sentinel is
        persisted; when the workspace or connection fails nothing is persisted
        (the next turn retries). Never raises for workspace problems.
        """
        chat_id = self._chat.id
        try:
            agent = await self.agent()
        except (ChatHasNoWorkspace, NoWorkspaceAgent):
            return InstructionOutcome.UNAVAILABLE
        if self._cache.instructions_known(chat_id, agent.id):
            return InstructionOutcome.KNOWN
        present = await self._agents_in_history()
        if agent.id in present:
            self._cache.remember_instructions(chat_id, agent.id)
            return InstructionOutcome.PRESENT
        files: list[InstructionFile] | None = None
        with trio.move_on_after(self._config.instruction_timeout):
            try:
                async with self._lease() as lease:
                    target = lease.agent
                    files = await lease.conn.instruction_files()
            except ChatdError as exc:
                logger.info(
                    "instruction files unavailable; retrying next turn",
                    extra={"chat_id": str(chat_id), "agent_id": str(agent.id), "error": str(exc)},
                )
        if files is None:
            return InstructionOutcome.UNAVAILABLE
        if target.id in present:  # the dial switched to an agent already recorded
            self._cache.remember_instructions(chat_id, target.id)
            return InstructionOutcome.PRESENT
        parts = tuple(ContextFilePart(target.id, f.path, f.content) for f in files if f.path)
        outcome = InstructionOutcome.PERSISTED if parts else InstructionOutcome.SENTINEL
        message = NewMessage(
            Role.SYSTEM, parts or (ContextFilePart(target.id),), visibility=Visibility.MODEL
        )
        try:
            await self._store.persist_step(self._claim, [message])
        except ChatdError as exc:
            logger.warning(
                "persisting instruction files failed",
                extra={"chat_id": str(chat_id), "agent_id": str(target.id), "error": repr(exc)},
            )
            return InstructionOutcome.UNAVAILABLE
        self._stats.instruction_persists += 1
        present.add(target.id)
        self._cache.remember_instructions(chat_id, target.id)
        return outcome

    async def _agents_in_history(self) -> set[uuid.UUID]:
        if self._history_agents is None:
            messages = await self._store.prompt_messages(self._chat.id)
            self._history_agents = {
                part.agent_id
                for m in messages
                for part in m.parts
                if isinstance(part, ContextFilePart)
            }
        return self._history_agents

    # -- MCP discovery --------------------------------------------------------------

    async def discover_mcp_tools(self) -> tuple[McpTool, ...]:
        """The agent's MCP tools: from the replica cache, else discovered within
        `mcp_discovery_timeout`. Never raises for workspace problems (no tools then)."""
        try:
            agent = await self.agent()
        except (ChatHasNoWorkspace, NoWorkspaceAgent):
            return self._mcp_tools
        cached = self._cache.get(agent.id)
        if cached is not None:
            self._stats.mcp_cache_hits += 1
            self._mcp_tools = cached
            return cached
        with trio.move_on_after(self._config.mcp_discovery_timeout) as scope:
            try:
                async with self._lease() as lease:
                    tools = tuple(await lease.conn.mcp_list_tools())
                    target = lease.agent
            except ChatdError as exc:
                logger.info(
                    "mcp discovery failed",
                    extra={
                        "chat_id": str(self._chat.id),
                        "agent_id": str(agent.id),
                        "error": str(exc),
                    },
                )
                return self._mcp_tools
        if scope.cancelled_caught:
            logger.info(
                "mcp discovery timed out",
                extra={"chat_id": str(self._chat.id), "agent_id": str(agent.id)},
            )
            return self._mcp_tools
        self._stats.mcp_discoveries += 1
        self._cache.put(target.id, tools)
        self._mcp_tools = tools
        return tools

    # -- pre-model setup ------------------------------------------------------------

    async def prepare(self) -> None:
        """Resolve the agent, then persist instructions and discover MCP tools concurrently.

        Bounded by `instruction_timeout` / `mcp_discovery_timeout`; never raises
        for workspace problems: a stopped workspace leaves built-in tools only.
        """
        try:
            await self.agent()
        except (ChatHasNoWorkspace, NoWorkspaceAgent) as exc:
            logger.info(
                "turn runs without workspace tools setup",
                extra={"chat_id": str(self._chat.id), "reason": str(exc)},
            )
            return
        except ChatdError as exc:
            logger.warning(
                "resolving the workspace agent failed",
                extra={"chat_id": str(self._chat.id), "error": repr(exc)},
            )
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._quietly, self.ensure_instructions, "instruction files")
            nursery.start_soon(self._quietly, self.discover_mcp_tools, "mcp discovery")

    async def _quietly(self, fn: Callable[[], Awaitable[object]], what: str) -> None:
        try:
            await fn()
        except ChatdError as exc:  # a store error: the turn still starts
            logger.warning(
                "workspace setup step failed",
                extra={"chat_id": str(self._chat.id), "step": what, "error": repr(exc)},
            )
