"""The asyncio bridge: psycopg's async API runs on a trio-asyncio loop.

The rule (docs/architecture.md): one store operation = one asyncio coroutine entered once from Trio,
so a transaction begins and ends inside that coroutine and a cancellation never
leaves a connection mid-transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import trio_asyncio

from chatd_trio._groups import unwrapped

P = ParamSpec("P")
T = TypeVar("T")


def bind_psycopg_loop_lookup() -> None:
    """Make psycopg find the trio-asyncio loop.

    psycopg.waiting binds `asyncio.get_running_loop` by name at import, while
    trio-asyncio replaces that function when it is imported: if psycopg came first
    (a test helper, another module) it would see "no running event loop".
    Idempotent; `asyncio_bridge` calls it when a store or pubsub opens (never at
    import: importing the package imports no psycopg).
    """
    import psycopg.waiting

    namespace = vars(psycopg.waiting)
    if namespace.get("get_running_loop") is not asyncio.get_running_loop:
        namespace["get_running_loop"] = asyncio.get_running_loop


class Bridge:
    """Runs asyncio coroutine functions on one trio-asyncio loop, from any Trio task."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        # Crossings into asyncio so far: a store operation is one, whatever its statements.
        self.crossings = 0

    async def run(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call `fn(*args, **kwargs)` as one asyncio coroutine and return its result."""
        self.crossings += 1
        result: T = await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args, **kwargs)
        return result


@asynccontextmanager
async def asyncio_bridge() -> AsyncIterator[Bridge]:
    """Reuse the trio-asyncio loop of the current context, or open one for this block.

    The loop's nurseries are the bridge's business: an exception of the block leaves
    as itself, not in an exception group (`chatd_trio._groups.unwrapped`), whether or
    not a loop was opened here. A store that fails to open raises its `StoreError`.
    """
    bind_psycopg_loop_lookup()
    loop = trio_asyncio.current_loop.get()
    if loop is not None:
        yield Bridge(loop)
        return
    async with unwrapped(trio_asyncio.open_loop()) as opened:
        yield Bridge(opened)
