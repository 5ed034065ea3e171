"""The workspace agent port: what a turn asks of a workspace agent, and of a provisioner.

`WorkspaceConnection` is what a turn uses of an agent connection, `AgentDialer`
connects to an agent, `WorkspaceProvisioner` creates, starts and stops
workspaces; the records here are what they return. The runtime
(`chatd_trio.workspace`, `chatd_trio.workspace_tools`) drives these protocols;
the adapters implement them: `chatd_trio.agent.client` (`AgentConn`,
`dial_agent`, over TCP) and `chatd_trio.agent.local` (`LocalProvisioner`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from chatd_trio.domain import JSON, Workspace, WorkspaceAgent

__all__ = [
    "AgentDialer",
    "DirEntry",
    "ExecResult",
    "FileContent",
    "InstructionFile",
    "McpCallResult",
    "McpTool",
    "Release",
    "WorkspaceConnection",
    "WorkspaceProvisioner",
]

Release = Callable[[], Awaitable[None]]
"""Gives a dialled connection back."""


@dataclass(frozen=True)
class ExecResult:
    """A finished command: `exit_code` is negative when a signal (timeout) killed it."""

    exit_code: int
    output: str
    truncated: bool
    timed_out: bool


@dataclass(frozen=True)
class FileContent:
    """A file read from the workspace; `content` holds at most the agent's byte limit."""

    path: str
    content: str
    size: int
    truncated: bool


@dataclass(frozen=True)
class DirEntry:
    """One directory entry; `kind` is "file", "dir", "symlink" or "other".

    `name` holds a lone surrogate per byte that is not UTF-8 (see the module docstring).
    """

    name: str
    kind: str
    size: int

    @property
    def raw_name(self) -> bytes:
        """The name's bytes on disk."""
        return self.name.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class InstructionFile:
    """An instruction file (home file or `<dir>/AGENTS.md`), capped at the configured size."""

    path: str
    content: str
    truncated: bool


class McpTool(NamedTuple):
    """A tool offered by an MCP server of the workspace."""

    server: str
    name: str
    description: str
    input_schema: dict[str, JSON]


@dataclass(frozen=True)
class McpCallResult:
    """An MCP tool result: content blocks as MCP JSON objects."""

    content: list[dict[str, JSON]]
    is_error: bool
    structured_content: JSON = None

    @property
    def text(self) -> str:
        """The text blocks joined by newlines."""
        return "\n".join(
            text
            for block in self.content
            if block.get("type") == "text" and isinstance(text := block.get("text"), str)
        )


class WorkspaceConnection(Protocol):
    """What a turn uses of an agent connection (`chatd_trio.agent.AgentConn` is one)."""

    async def execute(
        self,
        command: str,
        timeout: float,  # noqa: ASYNC109 - the command's limit on the agent
        *,
        output_limit: int | None = None,
    ) -> ExecResult: ...

    async def read_file(self, path: str) -> FileContent: ...

    async def write_file(self, path: str, content: str) -> int: ...

    async def list_dir(self, path: str = ".") -> list[DirEntry]: ...

    async def instruction_files(self) -> list[InstructionFile]: ...

    async def mcp_list_tools(self) -> list[McpTool]: ...

    async def mcp_call_tool(
        self, server: str, tool: str, arguments: dict[str, JSON]
    ) -> McpCallResult: ...


# `chatd_trio.agent.dial_agent` is the production dialer.
AgentDialer = Callable[[WorkspaceAgent], Awaitable[tuple[WorkspaceConnection, Release]]]


class WorkspaceProvisioner(Protocol):
    """Creates, starts and stops workspaces (the built-in workspace tools call it)."""

    async def create(self, owner_id: uuid.UUID, name: str) -> Workspace:
        """A new workspace with a first build whose agent is running."""
        ...

    async def start(self, workspace_id: uuid.UUID) -> WorkspaceAgent:
        """A new build with a new running agent (a running agent is replaced)."""
        ...

    async def stop(self, workspace_id: uuid.UUID) -> None:
        """A new build without agents; the running agent stops."""
        ...
