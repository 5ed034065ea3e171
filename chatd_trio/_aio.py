"""The asyncio bridge: psycopg's async API runs on an asyncio loop in its own thread.

The rule (docs/architecture.md): one store operation = one asyncio coroutine entered
once from Trio, so a transaction begins and ends inside that coroutine and a
cancellation never leaves a connection mid-transaction.

Why a thread: on a busy replica, a coroutine whose answer has arrived would resume
only when the Trio scheduler next reached an asyncio loop running inside Trio, after
every other runnable task of that batch, and it holds its pooled connection all that
time. On its own thread the loop resumes as soon as the socket is readable and it can
take the GIL, so a connection is held for the round trips and little more. The
coroutines share no state with Trio tasks but what they are handed and return (and
the counters documented as thread-safe where they are kept).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import ParamSpec, TypeVar

import trio

from chatd_trio._cleanup import bounded_cleanup

P = ParamSpec("P")
T = TypeVar("T")

# How long leaving the bridge waits for the loop's thread to finish what it holds
# (the adapters close their pools first, within their own timeouts).
_STOP_TIMEOUT = 10.0
# How long a cancelled caller waits for its coroutine to unwind (roll back, return
# the connection) before it stops waiting; the coroutine still finishes on its loop.
_UNWIND_TIMEOUT = 5.0


class Bridge:
    """Runs asyncio coroutine functions on one asyncio loop thread, from any Trio task."""

    def __init__(self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken) -> None:
        self._loop = loop
        self._token = token
        # Crossings into asyncio so far: a store operation is one, whatever its statements.
        self.crossings = 0

    async def run(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call `fn(*args, **kwargs)` as one asyncio coroutine and return its result.

        Cancelling the caller cancels the coroutine and waits (shielded, bounded) for
        it to unwind, so the caller goes on only once its connection is back; if the
        coroutine had already finished, its result stands.
        """
        self.crossings += 1
        done = trio.Event()
        token = self._token
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:  # on the loop's thread
            task = self._loop.create_task(_coroutine(fn, *args, **kwargs))
            task.add_done_callback(lambda _: token.run_sync_soon(done.set))
            tasks.append(task)

        self._loop.call_soon_threadsafe(start)
        try:
            await done.wait()
        except trio.Cancelled:
            # Runs after `start` (the loop runs its callbacks in order): the task exists.
            self._loop.call_soon_threadsafe(lambda: tasks[0].cancel())
            with bounded_cleanup(_UNWIND_TIMEOUT):
                await done.wait()
            if not done.is_set() or tasks[0].cancelled():
                raise
            # The coroutine finished before the cancellation reached it: what it did
            # happened (a commit, notifications read off the socket), so it is returned
            # or raised rather than lost; the cancellation comes at the next checkpoint.
        return tasks[0].result()


async def _coroutine(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    return await fn(*args, **kwargs)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        # Whatever is left (a coroutine whose caller stopped waiting) is cancelled and
        # allowed to unwind before the loop closes.
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


@asynccontextmanager
async def asyncio_bridge() -> AsyncIterator[Bridge]:
    """Start an asyncio loop on its own thread for this block; stop it on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_serve, args=(loop,), name="chatd-asyncio", daemon=True)
    thread.start()
    try:
        yield Bridge(loop, trio.lowlevel.current_trio_token())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        with bounded_cleanup(_STOP_TIMEOUT):
            await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
