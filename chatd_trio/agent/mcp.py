"""MCP servers of a workspace, reached over stdio by the agent server.

Uses the official `mcp` SDK (anyio-based, which runs on Trio as well). Each
configured server is spawned lazily on first use and kept alive in the agent
server's nursery; concurrent requests share its session (JSON-RPC ids
multiplex them).

A server that exits (its stdout reaches end of file) or whose transport breaks
is dropped at once and respawned by the next request, so its tools come back.
Consecutive failures (crashes and failed starts with no successful request in
between) back off: the first restart is immediate, each later one waits
`AgentConfig.mcp_restart_backoff_initial`, doubling up to
`mcp_restart_backoff_max`; a request during the wait fails at once with a
message saying when the next attempt is due.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from chatd_trio._closing import AsyncClosing
from chatd_trio.config import AgentConfig

if TYPE_CHECKING:
    from mcp.client.session import ClientSession

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class McpServerConfig:
    """How to start one MCP server: `command` with `args`, extra `env`, cwd = workspace dir."""

    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


class McpFailure(Exception):
    """An MCP operation failed; the message is meant for the remote caller."""


@dataclass
class _Running:
    session: ClientSession
    scope: trio.CancelScope


def restart_delay(failures: int, *, initial: float, maximum: float) -> float:
    """Seconds to wait after the last of `failures` consecutive failures before a restart."""
    if failures <= 1:
        return 0.0
    return min(initial * 2.0 ** (failures - 2), maximum)


@dataclass
class _Health:
    failures: int = 0
    last_failure: float = -math.inf


class _WatchedReadStream(AsyncClosing):
    """The server's read stream, noting its end: the server exited or its stdout closed."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.ended = trio.Event()

    async def receive(self) -> Any:
        import anyio

        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.ended.set()
            raise

    async def aclose(self) -> None:
        self.ended.set()
        await self._inner.aclose()

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> Any:
        import anyio

        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


class McpHub:
    """The MCP servers of one workspace agent, started lazily in `nursery`."""

    def __init__(
        self,
        servers: Mapping[str, McpServerConfig],
        *,
        directory: Path,
        config: AgentConfig,
        nursery: trio.Nursery,
    ) -> None:
        self._servers = dict(servers)
        self._directory = directory
        self._config = config
        self._nursery = nursery
        self._locks = {name: trio.Lock() for name in self._servers}
        self._running: dict[str, _Running] = {}
        self._health = {name: _Health() for name in self._servers}

    @property
    def server_names(self) -> list[str]:
        """Configured server names, sorted."""
        return sorted(self._servers)

    async def list_tools(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Tools of every server, and an error message per server that failed."""
        tools: list[dict[str, Any]] = []
        errors: dict[str, str] = {}

        async def one(name: str) -> None:
            try:
                found = await self._list_server_tools(name)
            except McpFailure as exc:
                errors[name] = str(exc)
                logger.warning("mcp tool discovery failed", extra={"mcp_server": name})
            else:
                tools.extend(found)

        async with trio.open_nursery() as nursery:
            for name in self.server_names:
                nursery.start_soon(one, name)
        tools.sort(key=lambda t: (t["server"], t["name"]))
        return tools, errors

    async def call_tool(self, server: str, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """Call `tool` on `server`; the result's content blocks as JSON objects."""
        from mcp.shared.exceptions import MCPError

        session = await self._session(server)
        try:
            with trio.fail_after(self._config.mcp_call_timeout):
                result = await session.call_tool(tool, arguments)
        except trio.TooSlowError:
            raise McpFailure(
                f"MCP server {server!r}: tool {tool!r} timed out after "
                f"{self._config.mcp_call_timeout} s"
            ) from None
        except MCPError as exc:
            raise self._mcp_failure(server, session, exc) from None
        except Exception as exc:
            self._drop(server, session)
            raise McpFailure(f"MCP server {server!r} failed: {exc!r}") from None
        self._health[server].failures = 0
        dumped = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        return {
            "content": dumped.get("content", []),
            "is_error": bool(dumped.get("isError", False)),
            "structured_content": dumped.get("structuredContent"),
        }

    async def _list_server_tools(self, name: str) -> list[dict[str, Any]]:
        from mcp.shared.exceptions import MCPError
        from mcp_types import PaginatedRequestParams

        session = await self._session(name)
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        try:
            with trio.fail_after(self._config.mcp_call_timeout):
                while True:
                    params = None if cursor is None else PaginatedRequestParams(cursor=cursor)
                    page = await session.list_tools(params=params)
                    found.extend(
                        {
                            "server": name,
                            "name": tool.name,
                            "description": tool.description or "",
                            "input_schema": tool.input_schema,
                        }
                        for tool in page.tools
                    )
                    cursor = page.next_cursor
                    if cursor is None:
                        self._health[name].failures = 0
                        return found
        except trio.TooSlowError:
            raise McpFailure(f"MCP server {name!r}: tools/list timed out") from None
        except MCPError as exc:
            raise self._mcp_failure(name, session, exc) from None
        except Exception as exc:
            self._drop(name, session)
            raise McpFailure(f"MCP server {name!r} failed: {exc!r}") from None

    def _mcp_failure(self, name: str, session: ClientSession, exc: Any) -> McpFailure:
        from mcp_types.jsonrpc import CONNECTION_CLOSED

        if exc.code == CONNECTION_CLOSED:
            self._drop(name, session)
            return McpFailure(
                f"MCP server {name!r} exited during the request; the next request restarts it"
            )
        return McpFailure(f"MCP server {name!r}: {exc.message}")

    async def _session(self, name: str) -> ClientSession:
        if name not in self._servers:
            known = ", ".join(self.server_names) or "none"
            raise McpFailure(f"unknown MCP server {name!r} (configured: {known})")
        async with self._locks[name]:
            running = self._running.get(name)
            if running is None:
                self._check_backoff(name)
                try:
                    with trio.fail_after(self._config.mcp_start_timeout):
                        running = await self._nursery.start(self._run_server, name)
                except trio.TooSlowError:
                    self._failed(name)
                    raise McpFailure(
                        f"MCP server {name!r} did not start within "
                        f"{self._config.mcp_start_timeout} s"
                    ) from None
                except Exception as exc:
                    self._failed(name)
                    raise McpFailure(f"MCP server {name!r} failed to start: {exc!r}") from None
            return running.session

    def _check_backoff(self, name: str) -> None:
        health = self._health[name]
        delay = restart_delay(
            health.failures,
            initial=self._config.mcp_restart_backoff_initial,
            maximum=self._config.mcp_restart_backoff_max,
        )
        wait = health.last_failure + delay - trio.current_time()
        if wait > 0:
            raise McpFailure(
                f"MCP server {name!r} failed {health.failures} times in a row; "
                f"the next restart is due in {wait:.1f} s"
            )

    def _failed(self, name: str) -> None:
        health = self._health[name]
        health.failures += 1
        health.last_failure = trio.current_time()

    def _drop(self, name: str, session: ClientSession) -> None:
        """Stop `session`'s server, if it is still the running one (not a newer restart)."""
        running = self._running.get(name)
        if running is not None and running.session is session:
            self._forget(name, running.scope)
            running.scope.cancel()

    async def _run_server(
        self, name: str, task_status: trio.TaskStatus[_Running] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own one MCP server process for as long as it is in use."""
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        spec = self._servers[name]
        params = StdioServerParameters(
            command=spec.command,
            args=list(spec.args),
            env=dict(spec.env) or None,
            cwd=self._directory,
        )
        started = False
        with trio.CancelScope() as scope:
            try:
                # The real process stderr: pytest or a daemon may swap sys.stderr for an
                # object without a file descriptor, which a subprocess cannot inherit.
                async with stdio_client(params, errlog=sys.__stderr__ or sys.stderr) as streams:
                    watched = _WatchedReadStream(streams[0])
                    async with ClientSession(watched, streams[1]) as session:
                        await session.initialize()
                        started = True
                        running = _Running(session=session, scope=scope)
                        # Registered here, not by the starter: a crash right after the
                        # start must find the entry to drop.
                        self._running[name] = running
                        task_status.started(running)
                        await watched.ended.wait()
                        # Forget it before the (bounded, but not instant) transport shutdown,
                        # so a request arriving meanwhile starts a fresh server.
                        self._forget(name, scope)
                        logger.warning("mcp server exited", extra={"mcp_server": name})
            except Exception:
                if not started:
                    raise
                # A broken server must not take the agent down: forget it, respawn later.
                logger.exception("mcp server stopped", extra={"mcp_server": name})
            finally:
                self._forget(name, scope)

    def _forget(self, name: str, scope: trio.CancelScope) -> None:
        """Drop the running server owned by `scope` (once) and count its end as a failure."""
        current = self._running.get(name)
        if current is not None and current.scope is scope:
            del self._running[name]
            self._failed(name)
