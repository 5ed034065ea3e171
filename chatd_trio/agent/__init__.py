"""The workspace agent: its port, a Trio TCP server running commands and file
operations, and its dialer.

`chatd_trio.agent.base` is the port a turn drives (the connection, the dialer, the
provisioner, the records they return); the other modules are adapters. `serve_agent`
runs the server (in a nursery, or as `chatd-trio agent`); `dial_agent` connects to one
and returns ``(AgentConn, release)``.
"""

from chatd_trio.agent.base import (
    DirEntry,
    ExecResult,
    FileContent,
    InstructionFile,
    McpCallResult,
    McpTool,
    Release,
)
from chatd_trio.agent.client import AgentConn, dial_agent
from chatd_trio.agent.mcp import McpServerConfig
from chatd_trio.agent.server import add_agent_command, run_agent_command, serve_agent

__all__ = [
    "AgentConn",
    "DirEntry",
    "ExecResult",
    "FileContent",
    "InstructionFile",
    "McpCallResult",
    "McpServerConfig",
    "McpTool",
    "Release",
    "add_agent_command",
    "dial_agent",
    "run_agent_command",
    "serve_agent",
]
