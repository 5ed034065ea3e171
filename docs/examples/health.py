"""Health checks for a replica, over plain HTTP on a private port.

    GET /live   200 while the replica's Trio loop runs (no answer: restart the process)
    GET /ready  200 when the store answers a read within a second, else 503

Both answer with the replica's counters as JSON. Start it next to the replica:
`await nursery.start(serve_health, server, 8081)`. docs/guides/production.md quotes
this file and tests/test_docs_tour.py runs it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import trio

from chatd_trio import ChatdError, Server

NOBODY = uuid.UUID(int=0)


async def ready(server: Server) -> bool:
    """Whether the store answers: one indexed read that finds nothing."""
    with trio.move_on_after(1.0):
        try:
            await server.store.list_chats(NOBODY)
        except ChatdError:
            return False
        return True
    return False


def counters(server: Server) -> dict[str, Any]:
    stats = server.stats()
    return {
        "worker_id": str(stats.worker_id),
        "running": stats.running,
        "turns_started": stats.turns_started,
        "turns_finished": stats.turns_finished,
        "acquire_statements": stats.acquire_statements,
        "notifies_rejected": stats.streams.notifies_rejected,
    }


async def serve_health(
    server: Server,
    port: int,
    host: str = "127.0.0.1",
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer health checks until cancelled; reports its listeners (port 0: any free one)."""

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in request and len(request) < 4096:
                chunk = await stream.receive_some(1024)
                if not chunk:
                    break
                request += chunk
        path = request.split(b" ", 2)[1].decode("ascii", "replace") if b" " in request else ""
        if path == "/live":
            status = "200 OK"
        elif path == "/ready":
            status = "200 OK" if await ready(server) else "503 Service Unavailable"
        else:
            status = "404 Not Found"
        body = json.dumps(counters(server)).encode()
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        await stream.send_all(head.encode() + body)
        await stream.aclose()

    await trio.serve_tcp(handle, port, host=host, task_status=task_status)
