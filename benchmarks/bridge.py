"""psycopg from Trio: the Trio driver and the trio-asyncio bridge, against native asyncio.

    python benchmarks/bridge.py [--dsn DSN] [--n 2000] [--statements 5] [--busy 200]

In one process and one run, on one connection each (PostgreSQL from `--dsn`,
`CHATD_BENCH_DSN`, else the local default), it times `--n` operations of each kind
and prints one JSON object with the medians (microseconds per operation):

- `native_round_trip`: `SELECT 1` awaited on asyncio (`asyncio.run`).
- `trio_round_trip`: the same on `chatd_trio._pgtrio.TrioConnection` (what every
  PostgresStore operation does), with no answer wait (`trio_parked_round_trip`) and
  with the store's default one (`trio_round_trip`).
- `bridged_round_trip`: the same coroutine entered from Trio through trio-asyncio
  (`aio_as_trio`), the bridge the store used before the Trio driver.
- `*_operation_once`: an operation of `--statements` statements in one pipelined
  batch.
- `*_busy_hold`: the time an operation holds its connection while `--busy` other
  Trio tasks each burn 0.1 ms of CPU per step (a saturated replica): what the pool
  sees. Native asyncio is not measured there (no Trio loop).

Counts round trips with `chatd_trio._pgtrace` to show each variant's exchanges.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import psycopg
import trio
import trio_asyncio

from chatd_trio._pgtrace import RoundTrips, counting_connection_class
from chatd_trio._pgtrio import AnswerWait, TrioConnection, connect
from chatd_trio.config import PostgresConfig

DSN = os.environ.get("CHATD_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
BUSY_STEP_S = 0.0001


async def _select(conn: psycopg.AsyncConnection[Any]) -> None:
    await (await conn.execute("SELECT 1")).fetchall()


async def _batch(conn: psycopg.AsyncConnection[Any], statements: int) -> None:
    async with conn.pipeline():
        cursors = [await conn.execute("SELECT %s::int", (i,)) for i in range(statements)]
    for cursor in cursors:
        await cursor.fetchall()


def _median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 1)


async def _timed(n: int, op: Callable[[], Awaitable[Any]]) -> list[float]:
    """Durations of `n` awaits of `op()`, on whichever loop runs it."""
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await op()
        out.append(time.perf_counter() - started)
    return out


def native(dsn: str, n: int, statements: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        trips = RoundTrips()
        conn = await counting_connection_class(trips, psycopg.AsyncConnection).connect(
            dsn, autocommit=True
        )
        async with conn:
            await _timed(100, lambda: _select(conn))  # warm-up
            before = trips.count
            select = await _timed(n, lambda: _select(conn))
            select_trips = (trips.count - before) / n
            before = trips.count
            batch = await _timed(n, lambda: _batch(conn, statements))
            batch_trips = (trips.count - before) / n
        return {
            "native_round_trip": _median_us(select),
            "native_round_trip_round_trips": select_trips,
            "native_operation_once": _median_us(batch),
            "native_operation_once_round_trips": batch_trips,
        }

    return asyncio.run(main())


async def _under_load(busy: int, n: int, op: Callable[[], Awaitable[Any]]) -> list[float]:
    """Time `op` while `busy` tasks keep the Trio loop saturated."""
    stop = trio.Event()

    async def burn() -> None:
        while not stop.is_set():
            until = time.perf_counter() + BUSY_STEP_S
            while time.perf_counter() < until:
                pass
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for _ in range(busy):
            nursery.start_soon(burn)
        try:
            return await _timed(n, op)
        finally:
            stop.set()


def trio_native(dsn: str, n: int, statements: int, busy: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, budget in (("trio_parked", 0.0), ("trio", PostgresConfig().answer_wait)):
            trips = RoundTrips()
            cls = counting_connection_class(trips, TrioConnection)
            conn = await connect(dsn, cls=cls, answers=AnswerWait(budget))
            try:
                await _timed(100, partial(_select, conn))  # warm-up
                before = trips.count
                select = await _timed(n, partial(_select, conn))
                out[f"{name}_round_trip"] = _median_us(select)
                out[f"{name}_round_trip_round_trips"] = (trips.count - before) / n
                once = await _timed(n, partial(_batch, conn, statements))
                out[f"{name}_operation_once"] = _median_us(once)
                hold = await _under_load(busy, max(n // 20, 20), partial(_batch, conn, statements))
                out[f"{name}_busy_hold"] = _median_us(hold)
            finally:
                await conn.close()
        return out

    result: dict[str, Any] = trio.run(main)
    return result


def bridged(dsn: str, n: int, statements: int, busy: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        trips = RoundTrips()
        async with trio_asyncio.open_loop() as loop:
            # psycopg looks the running loop up by a name bound at its import.
            import psycopg.waiting

            vars(psycopg.waiting)["get_running_loop"] = asyncio.get_running_loop

            def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Awaitable[Any]:
                return trio_asyncio.aio_as_trio(fn, loop=loop)(*args)  # type: ignore[no-any-return]

            cls = counting_connection_class(trips, psycopg.AsyncConnection)
            conn = await run(lambda: cls.connect(dsn, autocommit=True))
            try:
                for _ in range(100):
                    await run(_select, conn)
                before = trips.count
                select = await _timed(n, lambda: run(_select, conn))
                select_trips = (trips.count - before) / n
                once = await _timed(n, partial(run, _batch, conn, statements))
                hold = await _under_load(
                    busy, max(n // 20, 20), partial(run, _batch, conn, statements)
                )
            finally:
                await run(conn.close)
        return {
            "bridged_round_trip": _median_us(select),
            "bridged_round_trip_round_trips": select_trips,
            "bridged_operation_once": _median_us(once),
            "bridged_busy_hold": _median_us(hold),
        }

    result: dict[str, Any] = trio.run(main)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default=DSN)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--statements", type=int, default=5)
    parser.add_argument("--busy", type=int, default=200)
    args = parser.parse_args()
    out: dict[str, Any] = {"n": args.n, "statements": args.statements, "busy": args.busy}
    out.update(native(args.dsn, args.n, args.statements))
    out.update(trio_native(args.dsn, args.n, args.statements, args.busy))
    out.update(bridged(args.dsn, args.n, args.statements, args.busy))
    for name in ("trio", "trio_parked", "bridged"):
        out[f"{name}_over_native"] = round(out[f"{name}_round_trip"] / out["native_round_trip"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
