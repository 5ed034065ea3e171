"""A tiny MCP stdio server for the agent tests: `python tests/fixtures_mcp_server.py`."""

from __future__ import annotations

import os

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

app = MCPServer("chatd-test-fixture")


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@app.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return text


@app.tool()
def fail(reason: str) -> str:
    """Always fails with the given reason."""
    raise ToolError(reason)


@app.tool()
def crash(code: int = 3) -> str:
    """Exit the server process at once, mid-request (the agent must restart it)."""
    os._exit(code)


if __name__ == "__main__":
    app.run()
