"""Exception groups: how chatd_trio lets them through.

Trio's nurseries wrap whatever leaves them in an `ExceptionGroup`, and the package
lets those groups propagate: callers match them with ``except*``. Nothing here keeps
one leaf of a group and drops the others. Two helpers serve the two places that
need more than that:

- `leaves` flattens a group for a message or a log line that must name every error
  (a crashed turn's error lists them all);
- `unwrapped` serves the context managers whose block runs inline while their own
  tasks run beside it (the PostgreSQL pubsub's listener, a stream subscription's
  pump, the asyncio bridge's loop). Their nurseries are an implementation detail: the
  block's exception leaves as itself, as the in-memory adapters raise it, while a
  failure of their own tasks still leaves as a group, beside the block's exception
  when both failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypeVar

T = TypeVar("T")


def leaves(exc: BaseException) -> list[BaseException]:
    """Every exception in `exc` that is not a group, depth first, in order; `[exc]`
    for an exception that is not a group."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for inner in exc.exceptions for leaf in leaves(inner)]


@asynccontextmanager
async def unwrapped(manager: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """Enter `manager` so that an `Exception` raised by the block leaves as itself.

    ``async with unwrapped(trio.open_nursery()) as nursery: ...``: the block's
    exception is taken out before it reaches `manager`'s nurseries (which would wrap
    it in a group), `manager` exits as after a block that ended normally, and the
    exception is raised again once it has. A block that leaves tasks running forever
    cancels them in its `finally`, or `manager` waits for them.

    When `manager` fails on the way out as well (one of its tasks failed, or a
    cancellation arrived while it closed), both leave together in one group: neither
    hides the other. Cancellations and other `BaseException`s of the block are not
    carried: they must pass through `manager`'s cancel scopes, and leave as Trio
    delivers them.
    """
    carried: Exception | None = None
    try:
        async with manager as value:
            try:
                yield value
            except Exception as exc:
                carried = exc
    except BaseException as exc:
        if carried is None:
            raise
        raise BaseExceptionGroup(
            "the block failed, and so did closing its context", [carried, exc]
        ) from None
    if carried is not None:
        raise carried
