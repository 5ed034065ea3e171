"""psycopg on Trio, natively: a connection whose waits are Trio's, and a small pool.

psycopg drives every exchange with the server through `AsyncConnection.wait(gen)`:
`gen` sends and reads without blocking and yields what the socket must become
(readable, writable) before it can go on. `TrioConnection.wait` answers those
yields with `trio.lowlevel.wait_readable` / `wait_writable`, so a store operation
runs in the calling Trio task from borrow to return: no asyncio loop, no task
hand-off, one scheduling round per server answer. psycopg's connection lock is
replaced by one that costs nothing when free (a connection is borrowed by one
task at a time) and parks on a Trio `ParkingLot` when it is not.

A Trio task cancelled while a statement is in flight cannot leave the protocol
half-read: the connection is closed at once and the server asked to cancel what
it runs (its transaction rolls back), and the pool never lends a closed or
non-idle connection again.

Waiting for an answer. On a busy Trio loop a parked task runs again only after
every other runnable task has had its step (tens of milliseconds on a saturated
replica), and the connection stays borrowed all that time, although the server
answered in well under a millisecond. So a task first waits on the socket itself
for up to `AnswerWait.budget` (a `select` with that timeout: the loop is blocked,
the CPU is free for the database) and parks only if the answer is later than
that. When most answers miss the budget (a distant or overloaded server), or the
waits take more than half the loop's time, it stops trying for a while, doubling
the pause each time, so a slow link costs the loop little (`AnswerWait`).

A pipeline sends each batch in one write (`BatchingPipeline`), where psycopg's
writes every statement as it is queued.

Connections open in a worker thread through libpq's blocking connect (which
resolves host names and honours `connect_timeout` itself); opening is rare (pool
start, recycling), the exchanges that follow never leave the Trio thread.

psycopg names used: `AsyncConnection` and its `wait`, `lock`, `set_autocommit`;
`psycopg.pq.PGconn.connect`; `psycopg.waiting.Wait`/`Ready`; and, for the
batching pipeline, the pipeline's internals (`command_queue`, `_communicate_gen`,
`_fetch_gen`, the connection's `_pipeline` and `_check_connection_ok`). pyproject
pins psycopg to the minor version tests/test_pgtrio.py holds all of it to.
"""

from __future__ import annotations

import collections
import contextlib
import random
import select
import time
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

import psycopg
import trio
from psycopg import errors, pq
from psycopg.conninfo import make_conninfo
from psycopg.rows import AsyncRowFactory
from psycopg.waiting import Ready, Wait

from chatd_trio._cleanup import bounded_cleanup

__all__ = [
    "AnswerWait",
    "PoolSettings",
    "PoolTimeout",
    "TrioConnection",
    "TrioPool",
    "connect",
]

RV = TypeVar("RV")
C = TypeVar("C", bound="TrioConnection")

_WAIT_R = int(Wait.R)
_WAIT_W = int(Wait.W)
_READY_R = int(Ready.R)
_READY_W = int(Ready.W)
_IDLE = pq.TransactionStatus.IDLE
# How long a cancelled operation waits for the server to accept its cancel request.
CANCEL_TIMEOUT = 5.0


class AnswerWait:
    """How long a connection waits on its socket for an answer before parking.

    Shared by the connections of one pool. `budget` 0 always parks. Counts every
    wait: `answered` within the budget, `parked` after it, `skipped` while paused.
    Judged every `window` tries: if fewer than half were answered in time (the
    server is slow or far), or the tries blocked the loop for more than `max_share`
    of the window's time (answers in time, but not quick), tries pause for
    `window` x 2**k waits (k = consecutive failing windows, at most 6). A pause for
    answers that were quick (a quarter of the budget on average) but so many that
    they blocked the loop is bounded: its waits park only while fewer than
    `max_parked` answers are awaited parked (`parked_now`), past that they use the
    budget, so the pause lets tasks run beside a few outstanding answers instead of
    lending a connection to every task with a statement. A pause for late or distant
    answers parks every wait: that time is the server's, not the loop's.
    """

    __slots__ = (
        "_blocked",
        "_bounded",
        "_hits",
        "_pause",
        "_since",
        "_strikes",
        "_tries",
        "answered",
        "budget",
        "max_parked",
        "max_share",
        "parked",
        "parked_now",
        "skipped",
        "window",
    )

    def __init__(
        self, budget: float, window: int = 64, max_share: float = 0.5, max_parked: int = 2
    ) -> None:
        self.budget = budget
        self.window = window
        self.max_share = max_share
        self.max_parked = max_parked
        self.parked_now = 0
        self.answered = 0
        self.parked = 0
        self.skipped = 0
        self._tries = 0
        self._hits = 0
        self._blocked = 0.0
        self._since = 0.0
        self._pause = 0
        self._bounded = False
        self._strikes = 0

    def now(self) -> float:
        """The budget for the next wait: 0 while paused, unless the pause is bounded and
        `max_parked` answers are already awaited parked."""
        if self.budget <= 0:
            return 0.0
        if self._pause > 0 and not (self._bounded and self.parked_now >= self.max_parked):
            self._pause -= 1
            self.skipped += 1
            return 0.0
        return self.budget

    def tried(self, hit: bool, blocked: float, now: float) -> None:
        """Record a wait that tried the budget: answered in time or not, the seconds it
        blocked the loop, and the `time.perf_counter()` when it ended."""
        if hit:
            self.answered += 1
            self._hits += 1
        else:
            self.parked += 1
        if self._tries == 0:
            self._since = now - blocked
        self._tries += 1
        self._blocked += blocked
        if self._tries < self.window:
            return
        elapsed = now - self._since
        late = 2 * self._hits < self._tries
        if late or self._blocked > self.max_share * elapsed:
            self._pause = self.window << self._strikes
            self._strikes = min(self._strikes + 1, 6)
            self._bounded = not late and 4 * self._blocked < self._tries * self.budget
        else:
            # Waits past `max_parked` try the budget during a bounded pause: a window of
            # them that passes ends it.
            self._pause = 0
            self._strikes = 0
        self._tries = self._hits = 0
        self._blocked = 0.0


_NEVER = AnswerWait(0.0)


class _ConnectionLock:
    """psycopg's per-connection lock for Trio: free costs nothing, held parks the caller.

    Ownership passes straight to the first parked task on release, so a task that
    was woken never finds the lock taken again.
    """

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        if not self._held:
            self._held = True
            return
        await self._lot.park()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lot:
            self._lot.unpark()
        else:
            self._held = False


class _Waiter:
    __slots__ = ("event", "granted", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.event = trio.Event()
        self.granted = False


class Slots:
    """At most `total` holders at once (`take`, `give`): the pool's connection slots and
    its write slots.

    A free slot goes to whichever task asks first: handed to a parked waiter, as
    `trio.Semaphore` does, it would sit unused until that task runs, a whole
    scheduling round on a busy loop, while tasks that could use it queue behind (a
    scale-test replica's pool showed every slot taken, 2 connections lent, 8 idle and
    21 borrowers waiting). Woken waiters ask again (at the head of the queue if a
    runner took the slot first); one that has waited `fair_after` seconds is handed
    the next slot outright, so no waiter starves. Each slot given back wakes one
    waiter, so a long queue (a burst at the start of a run) drains one waiter per
    returned connection per scheduling round, with runnable tasks taking free slots
    meanwhile.
    """

    __slots__ = ("_waiters", "fair_after", "free")

    def __init__(self, total: int, fair_after: float = 0.5) -> None:
        self.free = total
        self.fair_after = fair_after
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def waiting(self) -> int:
        """Tasks parked in `take`."""
        return len(self._waiters)

    def take_nowait(self) -> bool:
        """Take a free slot if there is one."""
        if self.free > 0:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        """Take a slot, waiting for one; a cancelled wait leaves none taken."""
        if self.take_nowait():
            return
        waiter = _Waiter(trio.current_time())
        self._waiters.append(waiter)
        try:
            while True:
                await waiter.event.wait()
                if waiter.granted or self.take_nowait():
                    return
                waiter.event = trio.Event()
                self._waiters.appendleft(waiter)
        except BaseException:
            if waiter.granted:
                self.give()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            else:
                # Woken for a free slot it will not take: the next waiter may.
                self._wake()
            raise

    def give(self) -> None:
        """Give a slot back."""
        if self._waiters and trio.current_time() - self._waiters[0].since >= self.fair_after:
            waiter = self._waiters.popleft()
            waiter.granted = True
            waiter.event.set()
            return
        self.free += 1
        self._wake()

    def _wake(self) -> None:
        if self.free > 0 and self._waiters:
            self._waiters.popleft().event.set()


def _ready_now(fileno: int, wanted: int) -> int:
    """What the socket is ready for right now (a poll with zero timeout)."""
    poller = select.poll()
    mask = (select.POLLIN if wanted & _WAIT_R else 0) | (select.POLLOUT if wanted & _WAIT_W else 0)
    poller.register(fileno, mask)
    ready = 0
    for _, events in poller.poll(0):
        if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
            ready |= _READY_R if wanted & _WAIT_R else 0
        if events & (select.POLLOUT | select.POLLERR | select.POLLHUP):
            ready |= _READY_W if wanted & _WAIT_W else 0
    return ready


async def _readable_or_writable(fileno: int) -> int:
    """Wait until the socket is readable or writable (psycopg flushing a large send
    must also read, or the server could block writing to us)."""
    ready = 0

    async def until(waiter: Callable[[int], Any], flag: int, scope: trio.CancelScope) -> None:
        nonlocal ready
        await waiter(fileno)
        ready |= flag
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(until, trio.lowlevel.wait_readable, _READY_R, nursery.cancel_scope)
        nursery.start_soon(until, trio.lowlevel.wait_writable, _READY_W, nursery.cancel_scope)
    return ready


async def wait_trio(gen: Generator[Any, Any, RV], fileno: int, answers: AnswerWait = _NEVER) -> RV:
    """Run one of psycopg's generators to completion, waiting on the socket with Trio.

    A generator that completes without blocking (statements queued in a pipeline,
    results already read) does not yield to the scheduler: the round trip it is
    part of has a wait of its own. A wait for an answer first waits on the socket
    for `answers`' budget (module docstring); without one, an answer that is already
    there is read at once.
    """
    try:
        wanted = next(gen)
        while True:
            if wanted & _WAIT_W:
                # A socket asked for writing nearly always is: a poll is cheaper than a
                # scheduling round.
                ready = _ready_now(fileno, wanted)
                if not ready:
                    if wanted & _WAIT_R:
                        ready = await _readable_or_writable(fileno)
                    else:
                        await trio.lowlevel.wait_writable(fileno)
                        ready = _READY_W
            else:
                budget = answers.now()
                if budget:
                    started = time.perf_counter()
                    answered = bool(select.select([fileno], (), (), budget)[0])
                    ended = time.perf_counter()
                    answers.tried(answered, ended - started, ended)
                    if answered:
                        wanted = gen.send(_READY_R)
                        continue
                elif _ready_now(fileno, _WAIT_R):
                    # Already there (a LISTEN connection behind on its notifications):
                    # read it now; the caller decides when to let others in.
                    wanted = gen.send(_READY_R)
                    continue
                answers.parked_now += 1
                try:
                    await trio.lowlevel.wait_readable(fileno)
                finally:
                    answers.parked_now -= 1
                ready = _READY_R
            wanted = gen.send(ready)
    except StopIteration as stop:
        result: RV = stop.value
        return result
    except OSError as exc:
        raise psycopg.OperationalError("connection socket closed") from exc


class BatchingPipeline(psycopg.AsyncPipeline):
    """psycopg's pipeline, sending each batch in one write.

    psycopg hands every statement of a pipeline to libpq and flushes the socket at
    once: one `send` per statement, each waking the server's backend for one message.
    Here statements wait in the pipeline's queue until the batch ends (a sync, the
    pipeline's exit, or a result read before them), then go out together. The batches,
    the round trips and the results are psycopg's; only the writes are fewer (a
    pipelined transaction of seven statements costs about 30 % less CPU). Built on
    psycopg's pipeline internals (`command_queue`, `_communicate_gen`, `_fetch_gen`),
    for the psycopg versions the project pins; tests/test_pgtrio.py holds it to the
    plain pipeline's results and errors.
    """

    def _communicate_gen(self) -> Generator[Any, Any, None]:
        queue = self.command_queue
        if queue and queue[-1] != self.pgconn.pipeline_sync:
            return  # not the end of a batch: keep queueing
        yield from self._send_queued()

    def _fetch_gen(self, *, flush: bool) -> Generator[Any, Any, None]:
        if self.command_queue:
            yield from self._send_queued()
        yield from super()._fetch_gen(flush=flush)

    def _send_queued(self) -> Generator[Any, Any, None]:
        queue = self.command_queue
        while queue:
            queue.popleft()()
        # With nothing left to queue, psycopg's exchange flushes once and reads what
        # has come back.
        yield from super()._communicate_gen()


class BatchedPipelines(psycopg.AsyncConnection[Any]):
    """An `AsyncConnection` whose `pipeline()` is a `BatchingPipeline`."""

    @asynccontextmanager
    async def pipeline(self) -> AsyncIterator[psycopg.AsyncPipeline]:
        """psycopg's `pipeline()`, with a `BatchingPipeline`."""
        async with self.lock:
            self._check_connection_ok()
            if (pipeline := self._pipeline) is None:
                pipeline = self._pipeline = BatchingPipeline(self)
        try:
            async with pipeline:
                yield pipeline
        finally:
            if pipeline.level == 0:
                async with self.lock:
                    self._pipeline = None


class TrioConnection(BatchedPipelines):
    """A psycopg `AsyncConnection` whose waits run on Trio. Open one with `connect`."""

    def __init__(self, pgconn: pq.abc.PGconn, row_factory: Any = None) -> None:
        if row_factory is None:
            super().__init__(pgconn)
        else:
            super().__init__(pgconn, row_factory)
        self.lock = _ConnectionLock()  # type: ignore[assignment]
        # Set by `connect`: shared by the connections of one pool.
        self.answers = _NEVER
        # Set by `TrioPool`: when the connection must be retired, and the pool's drain
        # generation it belongs to.
        self.retire_at = float("inf")
        self.generation = 0
        # Set by `TrioPool.getconn`: lent for a write (it holds one of the write slots).
        self.lent_for_writing = False

    async def wait(
        self,
        gen: Generator[Any, Any, RV],
        interval: float = 0.0,
        timeout: float | None = None,  # noqa: ASYNC109 (psycopg's signature)
    ) -> RV:
        """Consume a psycopg generator on this connection's socket, on Trio.

        `timeout` (psycopg passes one only for `notifies(timeout=...)` and query
        cancellation) raises psycopg's wait timeout when it expires. A cancellation
        or any other interruption while an exchange is unfinished closes the
        connection: what the server was sending cannot be read any more.
        """
        try:
            if timeout is None:
                return await wait_trio(gen, self.pgconn.socket, self.answers)
            try:
                with trio.fail_after(timeout):
                    return await wait_trio(gen, self.pgconn.socket)
            except trio.TooSlowError:
                expired = getattr(errors, "_WaitTimeout", TimeoutError)
                raise expired("wait timeout expired") from None
        except psycopg.Error:
            raise
        except BaseException:
            pgconn = self.pgconn
            if pgconn.status == pq.ConnStatus.OK and (
                pgconn.transaction_status != _IDLE or pgconn.pipeline_status
            ):
                await self._abandon()
            raise

    def hang_up(self) -> None:
        """Close the socket now (no await), telling Trio first: a task may wait on it."""
        if not self.closed:
            trio.lowlevel.notify_closing(self.pgconn.socket)
            self.pgconn.finish()

    async def _abandon(self) -> None:
        """Close the connection mid-exchange and ask the server to cancel what it runs.

        Closing alone would not stop a statement waiting for a lock: the server notices
        a vanished client only when it next writes to it, and could still commit a
        transaction whose COMMIT was already sent. The cancel request (a connection of
        its own, in a worker thread) is bounded by `CANCEL_TIMEOUT`.
        """
        cancel = self.pgconn.get_cancel()
        self.hang_up()
        with bounded_cleanup(CANCEL_TIMEOUT):
            await trio.to_thread.run_sync(cancel.cancel, abandon_on_cancel=True)


async def connect(
    conninfo: str,
    *,
    cls: type[C],
    row_factory: AsyncRowFactory[Any] | None = None,
    autocommit: bool = True,
    answers: AnswerWait = _NEVER,
    **kwargs: Any,
) -> C:
    """Open a connection of class `cls` (a `TrioConnection`) to `conninfo` + `kwargs`,
    waiting for answers as `answers` says.

    libpq connects in a worker thread (host names, `connect_timeout`, several hosts
    are its business); a cancelled connect abandons the thread, whose connection is
    closed when it finishes. Raises `psycopg.OperationalError` when it fails.
    """
    dsn = make_conninfo(conninfo, **kwargs)
    # libpq's connect_timeout (0: none) bounds each attempt; this bounds the thread too,
    # a second later, should name resolution hang.
    limit = float(kwargs.get("connect_timeout") or 0)
    try:
        with trio.fail_after(limit + 1) if limit > 0 else contextlib.nullcontext():
            pgconn = await trio.to_thread.run_sync(
                pq.PGconn.connect, dsn.encode(), abandon_on_cancel=True
            )
    except trio.TooSlowError:
        raise psycopg.OperationalError("connection timeout expired") from None
    if pgconn.status != pq.ConnStatus.OK:
        message = pgconn.get_error_message()
        pgconn.finish()
        raise psycopg.OperationalError(f"connection failed: {message}")
    pgconn.nonblocking = 1
    conn = cls(pgconn, row_factory)
    conn.answers = answers
    if autocommit:
        await conn.set_autocommit(True)
    return conn


class PoolTimeout(psycopg.OperationalError):
    """No connection of the pool became free within its timeout."""


@dataclass(frozen=True)
class PoolSettings:
    """Sizes and ages of a `TrioPool` (seconds). `max_writing`: at most this many
    connections lent for writes at once (None: `max_size`)."""

    min_size: int
    max_size: int
    max_idle: float
    max_lifetime: float
    timeout: float
    max_writing: int | None = None

    @property
    def write_slots(self) -> int:
        """How many connections writes may hold at once."""
        return self.max_size if self.max_writing is None else min(self.max_writing, self.max_size)


class Lending:
    """How many connections a pool has lent, over time: now, the high-water mark, and
    the seconds spent with n lent, n = 0..max_size (how long the pool was that busy,
    not only its peak), since the pool opened or the last `reset`."""

    __slots__ = ("_changed", "_seconds", "high", "now")

    def __init__(self, max_size: int) -> None:
        self.now = 0
        self.high = 0
        self._seconds = [0.0] * (max_size + 1)
        self._changed = time.monotonic()

    def change(self, delta: int) -> None:
        """One more connection lent (+1) or one back (-1)."""
        at = time.monotonic()
        self._seconds[min(self.now, len(self._seconds) - 1)] += at - self._changed
        self._changed = at
        self.now += delta
        self.high = max(self.high, self.now)

    def reset(self) -> None:
        """Restart the high-water mark and the distribution from what is lent now."""
        self.high = self.now
        self._seconds = [0.0] * len(self._seconds)
        self._changed = time.monotonic()

    def mean(self) -> float:
        """The time-weighted mean of connections lent."""
        seconds = self._seconds_so_far()
        total = sum(seconds)
        return sum(n * spent for n, spent in enumerate(seconds)) / total if total > 0 else 0.0

    def quantile(self, q: float) -> int:
        """The smallest n such that at most n connections were lent for at least `q` of
        the time."""
        seconds = self._seconds_so_far()
        total = sum(seconds)
        seen = 0.0
        for n, spent in enumerate(seconds):
            seen += spent
            if total > 0 and seen >= q * total:
                return n
        return self.high

    def share_at_least(self, n: int) -> float:
        """The share of the time with `n` or more connections lent."""
        seconds = self._seconds_so_far()
        total = sum(seconds)
        return round(sum(seconds[n:]) / total, 4) if total > 0 else 0.0

    def _seconds_so_far(self) -> list[float]:
        seconds = list(self._seconds)
        seconds[min(self.now, len(seconds) - 1)] += time.monotonic() - self._changed
        return seconds


class TrioPool(Generic[C]):
    """A connection pool on Trio: at most `max_size` connections lent at once, at most
    `max_writing` of them to writers (`getconn(writing=True)`).

    Connections open on demand up to `max_size`; `min_size` of them open with the
    pool and are never closed for idleness. An idle connection above `min_size`
    is closed when it has waited `max_idle`, and every connection is retired
    after about `max_lifetime` (minus up to 5 %, so they do not all expire
    together). A returned connection that is closed, broken or not idle (a
    cancelled operation) is closed instead of lent again; `drain()` retires every
    connection, the borrowed ones when they come back (after a server restart).
    The most recently returned connection is lent first; `lending` tells how many
    are lent, over time. A writer waits for a write slot before it waits for a
    connection, both within one `timeout`; the other connections stay for readers.
    """

    def __init__(
        self,
        open_connection: Callable[[], Any],
        answers: AnswerWait,
        settings: PoolSettings,
    ) -> None:
        self._open_connection = open_connection
        # What `open_connection` gives its connections (for statistics).
        self.answers = answers
        self.settings = settings
        self.lending = Lending(settings.max_size)
        self._slots = Slots(settings.max_size)
        self._write_slots = Slots(settings.write_slots)
        # (connection, returned at), most recent last.
        self._idle: collections.deque[tuple[C, float]] = collections.deque()
        self._size = 0
        self._generation = 0
        self._closed = False
        self._opened = 0
        self._lent = 0
        self._timeouts = 0
        self._retired = 0
        self._write_waits = 0
        self._write_wait_s = 0.0

    async def open(self) -> None:
        """Open `min_size` connections, one after the other; raise what a failure raised."""
        for _ in range(self.settings.min_size):
            conn = await self._new()
            self._idle.append((conn, trio.current_time()))

    async def _new(self) -> C:
        self._size += 1
        try:
            conn: C = await self._open_connection()
        except BaseException:
            self._size -= 1
            raise
        conn.generation = self._generation
        lifetime = self.settings.max_lifetime
        conn.retire_at = trio.current_time() + lifetime * (1 - 0.05 * random.random())
        self._opened += 1
        return conn

    async def getconn(self, *, writing: bool = False) -> C:
        """Borrow a connection (for a write: within the write slots); raise `PoolTimeout`
        after `timeout` seconds without one."""
        if self._closed:
            raise psycopg.OperationalError("the pool is closed")
        deadline = None
        if writing and not self._write_slots.take_nowait():
            began = trio.current_time()
            deadline = began + self.settings.timeout
            self._write_waits += 1
            await self._wait(self._write_slots, deadline)
            self._write_wait_s += trio.current_time() - began
        try:
            # A free slot is taken without a scheduling round: holding it through one
            # would keep an idle connection from every other borrower meanwhile.
            if not self._slots.take_nowait():
                if deadline is None:
                    deadline = trio.current_time() + self.settings.timeout
                await self._wait(self._slots, deadline)
            try:
                conn = await self._idle_or_new()
            except BaseException:
                self._slots.give()
                raise
        except BaseException:
            if writing:
                self._write_slots.give()
            raise
        conn.lent_for_writing = writing
        self._lent += 1
        self.lending.change(1)
        return conn

    async def _idle_or_new(self) -> C:
        now = trio.current_time()
        while self._idle:
            conn, _ = self._idle.pop()
            if self._usable(conn, now):
                return conn
            self._retire(conn)
        return await self._new()

    async def _wait(self, slots: Slots, deadline: float) -> None:
        """Take one of `slots` by `deadline`, else raise `PoolTimeout`."""
        with trio.move_on_at(deadline) as waited:
            await slots.take()
        if waited.cancelled_caught:
            raise self._timed_out()

    def _timed_out(self) -> PoolTimeout:
        self._timeouts += 1
        return PoolTimeout(
            f"no connection free in {self.settings.timeout} s (a pool of"
            f" {self.settings.max_size}, at most {self.settings.write_slots} for writes)"
        )

    def putconn(self, conn: C) -> None:
        """Give a borrowed connection back (it is closed if it may not be lent again)."""
        self.lending.change(-1)
        try:
            now = trio.current_time()
            if self._closed or not self._usable(conn, now):
                self._retire(conn)
            else:
                self._idle.append((conn, now))
                self._close_idle_ones(now)
        finally:
            self._slots.give()
            if conn.lent_for_writing:
                conn.lent_for_writing = False
                self._write_slots.give()

    @asynccontextmanager
    async def connection(self, *, writing: bool = False) -> AsyncIterator[C]:
        """Borrow a connection for the block (`writing`: in a write slot)."""
        conn = await self.getconn(writing=writing)
        try:
            yield conn
        finally:
            self.putconn(conn)

    def drain(self) -> None:
        """Retire every connection: the idle ones now, the borrowed ones on return."""
        self._generation += 1
        while self._idle:
            self._retire(self._idle.popleft()[0])

    def close(self) -> None:
        """Close the idle connections; borrowed ones are closed when they come back."""
        self._closed = True
        self.drain()

    def _usable(self, conn: C, now: float) -> bool:
        pgconn = conn.pgconn
        return (
            not conn.closed
            and pgconn.transaction_status == _IDLE
            and not pgconn.pipeline_status
            and conn.generation == self._generation
            and conn.retire_at > now
        )

    def _close_idle_ones(self, now: float) -> None:
        # The oldest-returned connections sit at the left: retire those idle too long.
        while (
            self._idle
            and self._size > self.settings.min_size
            and now - self._idle[0][1] > self.settings.max_idle
        ):
            self._retire(self._idle.popleft()[0])

    def _retire(self, conn: C) -> None:
        self._size -= 1
        self._retired += 1
        conn.hang_up()

    def get_stats(self) -> dict[str, int]:
        """Open and idle connections, waiting borrowers, and counters since the start."""
        return {
            "pool_min": self.settings.min_size,
            "pool_max": self.settings.max_size,
            "pool_size": self._size,
            "pool_available": len(self._idle),
            "requests_waiting": self._slots.waiting,
            "connections_num": self._opened,
            "connections_retired": self._retired,
            "requests_num": self._lent,
            "requests_errors": self._timeouts,
            "max_writing": self.settings.write_slots,
            "writers_waiting": self._write_slots.waiting,
            "write_slots_free": self._write_slots.free,
            "write_waits": self._write_waits,
            "write_wait_ms": round(self._write_wait_s * 1000),
        }
