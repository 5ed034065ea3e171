"""Round trips to PostgreSQL, counted at the connection.

A round trip is one exchange on the wire: the client sends (a statement, a BEGIN,
a COMMIT, a pipelined batch ending in a Sync) and then waits for the server's
answer. psycopg drives every exchange of a connection through `wait(gen)`, where
`gen` is a generator that sends and reads and yields when the socket would
block; it reads the server's answer only after being told the socket is
readable. So an exchange is counted once per `wait` call whose generator is
handed a readable socket, however many packets the answer spans and however
many statements a pipelined batch held.

Not counted: opening a connection (the pool opens them at start and recycles
them rarely) and a LISTEN connection waiting for notifications (the server
pushes those; nothing was asked).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

import psycopg
from psycopg.waiting import Ready

__all__ = ["RoundTrips", "counting_connection_class", "traced_class"]

C = TypeVar("C", bound=psycopg.AsyncConnection[Any])

# psycopg's generator waiting for notifications on a LISTEN connection: pushed, not asked.
_PUSHED = frozenset({"notifies"})


class RoundTrips:
    """A counter of round trips, shared by the connections of one store or pubsub."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


def _counted(gen: Generator[Any, Any, Any], trips: RoundTrips) -> Generator[Any, Any, Any]:
    answered = False
    try:
        wanted = next(gen)
        while True:
            ready = yield wanted
            # psycopg resumes a generator with None (next()) after a cancellation.
            if not answered and ready is not None and ready & Ready.R:
                answered = True
                trips.count += 1
            wanted = gen.send(ready)
    except StopIteration as stop:
        return stop.value


def counting_connection_class(trips: RoundTrips, base: type[C]) -> type[C]:
    """A subclass of `base` whose connections add their round trips to `trips`
    (pass it as a pool's `connection_class`, or call its `connect`)."""

    class CountingConnection(base):  # type: ignore[valid-type,misc]
        async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(gen, "__name__", "") not in _PUSHED:
                gen = _counted(gen, trips)
            return await super().wait(gen, *args, **kwargs)

    return CountingConnection


def traced_class(base: type[C], trips: RoundTrips | None) -> type[C]:
    """`base` itself, or with `trips` its subclass counting round trips into them."""
    return base if trips is None else counting_connection_class(trips, base)
