"""The workspace tools a turn offers the model: their schemas, arguments and results.

docs/spec.md §5. `workspace_tools(ctx)` turns one turn's `WorkspaceContext` into
tools: the built-in ones (`execute`, `read_file`, `write_file`, `list_dir`), the
management ones when the turn has a provisioner (`create_workspace`,
`start_workspace`, `stop_workspace`) and one per MCP tool the turn discovered. This
module says what the model sees and sends: each built-in is a typed function whose
signature and docstring give its JSON schema (`chatd_trio.tools.typed_tool` checks
the arguments against it), and workspace failures become error results naming their
kind. Doing the work (resolving the agent, dialing, releasing) is the context's.

Wiring it into a turn (the server's tools factory)::

    await ctx.prepare()
    registry = ToolRegistry(workspace_tools(ctx))
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated

import pydantic

from chatd_trio.agent.base import WorkspaceProvisioner
from chatd_trio.domain import JSON
from chatd_trio.errors import (
    AgentOperationError,
    AgentUnavailable,
    ChatdError,
    ChatHasNoWorkspace,
    DialError,
    NoWorkspaceAgent,
    ToolError,
)
from chatd_trio.tools import (
    ErrorResult,
    FunctionTool,
    Tool,
    ToolContext,
    ToolFunction,
    ToolOutput,
    typed_tool,
)
from chatd_trio.workspace import WorkspaceContext

__all__ = ["workspace_tools"]

logger = logging.getLogger(__name__)


# -- tool argument types -------------------------------------------------------------------

# A path or command the model left empty is refused before any agent sees it.
NonEmpty = Annotated[str, pydantic.Field(min_length=1)]
Seconds = Annotated[float, pydantic.Field(gt=0)]

# What model APIs accept in a tool name; an MCP tool whose name has anything else is
# skipped rather than offered under a name the model API would refuse.
_TOOL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _valid_tool_name(name: str, max_chars: int) -> bool:
    return 0 < len(name) <= max_chars and set(name) <= _TOOL_NAME_CHARS


# -- failures as results -------------------------------------------------------------------

# Error kinds the workspace tools report to the model.
_ERROR_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (NoWorkspaceAgent, "no_workspace_agent"),
    (ChatHasNoWorkspace, "chat_has_no_workspace"),
    (DialError, "dial_failed"),
    (AgentUnavailable, "agent_unavailable"),
)


def _error_result(exc: ChatdError) -> ErrorResult:
    if isinstance(exc, AgentOperationError):
        kind = exc.kind
    else:
        kind = next((k for t, k in _ERROR_KINDS if isinstance(exc, t)), "workspace_error")
    return ErrorResult({"error": str(exc), "kind": kind})


def _guard(fn: Callable[..., Awaitable[ToolOutput]]) -> Callable[..., Awaitable[ToolOutput]]:
    """`fn` with workspace failures as error results (kind included) for the model."""

    # `wraps` keeps the signature and docstring: `typed_tool` builds the schema from them.
    @functools.wraps(fn)
    async def run(**kwargs: object) -> ToolOutput:
        try:
            return await fn(**kwargs)
        except ToolError:
            raise
        except ChatdError as exc:
            return _error_result(exc)

    return run


def _guard_raw(fn: Callable[[dict[str, JSON]], Awaitable[ToolOutput]]) -> ToolFunction:
    guarded = _guard(lambda args: fn(args))

    async def run(args: dict[str, JSON], ctx: ToolContext) -> ToolOutput:
        return await guarded(args=args)

    return run


# -- the tools -----------------------------------------------------------------------------


def workspace_tools(ctx: WorkspaceContext) -> list[Tool]:
    """Workspace tools, this turn's MCP tools and (with a provisioner) management tools."""
    tools = _WorkspaceTools(ctx)
    out: list[Tool] = [
        typed_tool(_guard(tools.execute), name="execute"),
        typed_tool(_guard(tools.read_file), name="read_file"),
        typed_tool(_guard(tools.write_file), name="write_file"),
        typed_tool(_guard(tools.list_dir), name="list_dir"),
    ]
    if ctx.provisioner is not None:
        out += [
            typed_tool(_guard(tools.create), name="create_workspace"),
            typed_tool(_guard(tools.start), name="start_workspace"),
            typed_tool(_guard(tools.stop), name="stop_workspace"),
        ]
    names = {t.name for t in out}
    sep = ctx.config.mcp_tool_separator
    for mcp in ctx.mcp_tools:
        name = f"{mcp.server}{sep}{mcp.name}"
        if name in names or not _valid_tool_name(name, ctx.config.tool_name_max_chars):
            logger.warning("mcp tool name unusable; skipped", extra={"tool": name})
            continue
        names.add(name)
        # The MCP server validates its own arguments against the schema it declared.
        fn = _guard_raw(partial(tools.call_mcp, mcp.server, mcp.name))
        schema = mcp.input_schema or {"type": "object", "properties": {}}
        out.append(FunctionTool(name, mcp.description or name, schema, fn))
    return out


class _WorkspaceTools:
    """The tool functions of one turn; each docstring is what the model reads."""

    def __init__(self, ctx: WorkspaceContext) -> None:
        self._ctx = ctx

    async def execute(
        self,
        command: NonEmpty,
        timeout: Seconds | None = None,  # noqa: ASYNC109 - the model's limit for the agent
    ) -> JSON:
        """Run a shell command (/bin/sh -c) in the workspace directory; returns exit code
        and combined output.

        Args:
            command: the shell command
            timeout: seconds before the command is killed
        """
        limit = self._ctx.config.default_exec_timeout if timeout is None else timeout
        async with self._ctx.connection() as conn:
            r = await conn.execute(command, limit)
        return {
            "exit_code": r.exit_code,
            "output": r.output,
            "truncated": r.truncated,
            "timed_out": r.timed_out,
        }

    async def read_file(self, path: NonEmpty) -> JSON:
        """Read a text file of the workspace.

        Args:
            path: path in the workspace
        """
        async with self._ctx.connection() as conn:
            f = await conn.read_file(path)
        return {"path": f.path, "content": f.content, "size": f.size, "truncated": f.truncated}

    async def write_file(self, path: NonEmpty, content: str) -> JSON:
        """Create or replace a text file in the workspace.

        Args:
            path: path in the workspace
            content: the whole new content
        """
        async with self._ctx.connection() as conn:
            written = await conn.write_file(path, content)
        return {"path": path, "bytes": written}

    async def list_dir(self, path: NonEmpty = ".") -> JSON:
        """List a directory of the workspace (default: its root).

        Args:
            path: path in the workspace
        """
        async with self._ctx.connection() as conn:
            entries = await conn.list_dir(path)
        return {"entries": [{"name": e.name, "kind": e.kind, "size": e.size} for e in entries]}

    async def call_mcp(self, server: str, tool: str, args: dict[str, JSON]) -> ToolOutput:
        async with self._ctx.connection() as conn:
            r = await conn.mcp_call_tool(server, tool, args)
        # `list` is invariant: the blocks go into a `list[JSON]` of their own.
        content: list[JSON] = list(r.content)
        result: dict[str, JSON] = {"content": content}
        if r.structured_content is not None:
            result["structured_content"] = r.structured_content
        if r.is_error:
            name = f"{server}{self._ctx.config.mcp_tool_separator}{tool}"
            return ErrorResult({"error": r.text or f"{name} failed", **result})
        return result

    def _provisioner(self) -> WorkspaceProvisioner:
        provisioner = self._ctx.provisioner
        if provisioner is None:  # pragma: no cover - the tools exist only with one
            raise ToolError("workspaces cannot be managed here")
        return provisioner

    async def create(self, name: NonEmpty | None = None) -> JSON:
        """Create a new workspace for this chat and start it.

        Args:
            name: the workspace's name
        """
        chat = self._ctx.chat
        ws = await self._provisioner().create(chat.owner_id, name or f"chat-{chat.id.hex[:8]}")
        await self._ctx.change_workspace(ws.id)
        return {"workspace_id": str(ws.id), "name": ws.name, "status": "running"}

    async def start(self) -> JSON:
        """Start (or rebuild) the chat's workspace."""
        workspace_id = await self._ctx.workspace_id()
        agent = await self._provisioner().start(workspace_id)
        await self._ctx.change_workspace(workspace_id)
        return {"workspace_id": str(workspace_id), "agent_id": str(agent.id), "status": "running"}

    async def stop(self) -> JSON:
        """Stop the chat's workspace."""
        workspace_id = await self._ctx.workspace_id()
        await self._provisioner().stop(workspace_id)
        await self._ctx.change_workspace(workspace_id)
        return {"workspace_id": str(workspace_id), "status": "stopped"}
