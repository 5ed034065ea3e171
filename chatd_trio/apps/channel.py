"""The worker channel: how an application talks to the replica processes it starts.

`chatd-trio demo --dsn ... --replicas N` and `chatd-trio scaletest --store postgres`
run replicas as child processes, `python -m chatd_trio.apps.<app> worker`
(`worker_command`). Both directions carry JSON objects, one per line: the parent
writes to the child's stdin, the child answers on its stdout (`emit`); stderr is
left to logging. The first object the parent writes is the hello, which holds
everything the worker needs, secrets included (the DSN, the notify key): a command
line would show them in `ps`. EOF on the child's stdin asks it to leave.

What the objects say is each application's own protocol (the demo's requests and
replies, the scale test's progress events and controls); this module is the framing
both share.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import trio

__all__ = [
    "WORKER",
    "JsonLines",
    "emit",
    "encode",
    "flush_every",
    "replica_process_settings",
    "stdin_lines",
    "worker_command",
]

#: The argument that makes an application module run as a worker process.
WORKER = "worker"


#: Young-generation threshold of the cyclic GC in a replica process (Python's default: 700).
GC_YOUNG_THRESHOLD = 50_000


def replica_process_settings() -> None:
    """Settings of a process that runs a `Server` under load (docs/operating.md).

    A busy replica allocates many short-lived containers: with Python's default
    thresholds the cyclic GC ran a young collection every few hundred allocations and
    scanned the whole heap (caches, streams, charts) a dozen times a minute, about a
    tenth of its CPU in the scale test. Freezing what the imports left and raising the
    young threshold cut that to under 1 %.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


def worker_command(app: str) -> list[str]:
    """The command line of a worker process of `app` (a module of `chatd_trio.apps`)."""
    return [sys.executable, "-m", f"chatd_trio.apps.{app}", WORKER]


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as the line that carries it."""
    return (json.dumps(message) + "\n").encode()


class JsonLines:
    """JSON objects, one per line, read from a Trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def readline(self) -> str:
        """The next line, without its newline; `EOFError` once the stream has ended."""
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise EOFError("stream closed")
            self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line.decode()

    async def receive(self) -> Any:
        """The next message; `EOFError` once the stream has ended."""
        return json.loads(await self.readline())


def stdin_lines() -> JsonLines:
    """The worker's end: the messages its parent writes to its stdin.

    A duplicate of the descriptor, so that the Trio stream closing it leaves
    `sys.stdin` intact.
    """
    return JsonLines(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))


def emit(message: Mapping[str, Any], *, flush: bool = True) -> None:
    """The worker's end: write one message to stdout, flushed at once (the parent is
    waiting for it) unless `flush=False`: a message nobody waits for, left for the next
    flush (`flush_every`, or a later message that is flushed; order is kept)."""
    sys.stdout.write(json.dumps(message) + "\n")
    if flush:
        sys.stdout.flush()


async def flush_every(seconds: float) -> None:
    """Flush stdout every `seconds`, for messages emitted with `flush=False`: each
    flushed line wakes the parent, so frequent progress goes out in batches."""
    while True:
        await trio.sleep(seconds)
        sys.stdout.flush()
