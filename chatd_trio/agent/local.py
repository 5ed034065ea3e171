"""`LocalProvisioner`: workspaces whose agents run in-process (`serve_agent`).

The adapter of the `chatd_trio.workspace.WorkspaceProvisioner` port for the demo,
the scale test, the benchmarks and the tests: each workspace is a directory, each
start serves a real agent in a nursery, and the agent rows go through the store like
those of remote agents. It lives with the agent server it runs, so the workspace
driver (`chatd_trio.workspace`) never imports that server.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio.agent.mcp import McpServerConfig
from chatd_trio.agent.server import serve_agent
from chatd_trio.config import Config
from chatd_trio.domain import Workspace, WorkspaceAgent
from chatd_trio.store.base import Store

__all__ = ["LocalProvisioner"]

logger = logging.getLogger(__name__)


@dataclass
class _RunningAgent:
    scope: trio.CancelScope
    done: trio.Event
    agent: WorkspaceAgent | None = None


class LocalProvisioner:
    """A `WorkspaceProvisioner` running real agents (`serve_agent`) in `nursery`.

    Each workspace gets a directory under `base_dir` that survives rebuilds;
    each start is a new build with a new agent on a fresh port; stop is a new
    build without agents. Agent rows go through the store like real ones.
    """

    def __init__(
        self,
        store: Store,
        nursery: trio.Nursery,
        base_dir: Path,
        *,
        config: Config | None = None,
        mcp_servers: Mapping[str, McpServerConfig] | None = None,
        home_instruction_file: Path | None = None,
    ) -> None:
        self._store = store
        self._nursery = nursery
        self._base_dir = base_dir
        self._config = config if config is not None else Config()
        self._mcp_servers = dict(mcp_servers or {})
        self._home_instruction_file = home_instruction_file
        self._running: dict[uuid.UUID, _RunningAgent] = {}

    def directory(self, workspace_id: uuid.UUID) -> Path:
        """The workspace's directory."""
        return self._base_dir / workspace_id.hex

    def running_agent(self, workspace_id: uuid.UUID) -> WorkspaceAgent | None:
        """The workspace's running agent, if any."""
        running = self._running.get(workspace_id)
        return running.agent if running is not None else None

    async def create(self, owner_id: uuid.UUID, name: str) -> Workspace:
        ws = await self._store.create_workspace(owner_id, name)
        await self.start(ws.id)
        return ws

    async def start(self, workspace_id: uuid.UUID) -> WorkspaceAgent:
        await self._stop_agent(workspace_id)
        directory = self.directory(workspace_id)
        await trio.Path(directory).mkdir(parents=True, exist_ok=True)
        cfg = self._config.workspace
        token = secrets.token_urlsafe(cfg.local_agent_token_bytes)
        running = _RunningAgent(trio.CancelScope(), trio.Event())
        host, port = await self._nursery.start(self._serve, directory, token, running)
        self._running[workspace_id] = running
        try:
            build = await self._store.create_build(workspace_id)
            agent = await self._store.create_agent(
                build.id, cfg.local_agent_name, f"{host}:{port}", token, str(directory)
            )
        except BaseException:
            await self._stop_agent(workspace_id)
            raise
        running.agent = agent
        logger.info(
            "workspace agent started",
            extra={"workspace_id": str(workspace_id), "agent_id": str(agent.id)},
        )
        return agent

    async def stop(self, workspace_id: uuid.UUID) -> None:
        await self._store.create_build(workspace_id)
        await self._stop_agent(workspace_id)

    async def aclose(self) -> None:
        """Stop every running agent (their rows stay: the workspaces look stopped-but-bound)."""
        for workspace_id in list(self._running):
            await self._stop_agent(workspace_id)

    async def _serve(
        self,
        directory: Path,
        token: str,
        running: _RunningAgent,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with running.scope:
                await serve_agent(
                    directory,
                    host=self._config.workspace.local_agent_host,
                    port=0,
                    token=token,
                    mcp_servers=self._mcp_servers,
                    home_instruction_file=self._home_instruction_file,
                    config=self._config,
                    task_status=task_status,
                )
        finally:
            running.done.set()

    async def _stop_agent(self, workspace_id: uuid.UUID) -> None:
        running = self._running.pop(workspace_id, None)
        if running is None:
            return
        running.scope.cancel()
        with bounded_cleanup(self._config.workspace.local_agent_stop_timeout):
            await running.done.wait()
        logger.info(
            "workspace agent stopped",
            extra={
                "workspace_id": str(workspace_id),
                "agent_id": str(running.agent.id) if running.agent else None,
            },
        )
