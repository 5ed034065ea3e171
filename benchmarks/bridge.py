"""The trio-asyncio bridge's cost per round trip, against native asyncio psycopg.

    python benchmarks/bridge.py [--dsn DSN] [--n 2000] [--statements 5]

In one process and one run, on one connection each (PostgreSQL from `--dsn`,
`CHATD_BENCH_DSN`, else the local default), it times `--n` operations of each kind
and prints one JSON object with the medians (microseconds per operation):

- `native_round_trip`: `SELECT 1` awaited on asyncio (`asyncio.run`), no bridge.
- `bridged_round_trip`: the same coroutine entered from Trio through
  `chatd_trio._aio.Bridge` (what every PostgresStore operation does): the bridge's
  cost is the difference.
- `bridge_crossing`: entering an asyncio coroutine that does no I/O from Trio.
- `operation_once` / `operation_per_statement`: an operation of `--statements`
  statements in one pipelined batch, crossing the bridge once (as the store does)
  or once per statement with a round trip each (as an adapter that crossed per
  statement would).

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
from typing import Any

import psycopg
import trio

from chatd_trio._aio import asyncio_bridge
from chatd_trio._pgtrace import RoundTrips, counting_connection_class

DSN = os.environ.get("CHATD_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _select(conn: psycopg.AsyncConnection[Any]) -> None:
    await (await conn.execute("SELECT 1")).fetchall()


async def _batch(conn: psycopg.AsyncConnection[Any], statements: int) -> None:
    async with conn.pipeline():
        cursors = [await conn.execute("SELECT %s::int", (i,)) for i in range(statements)]
    for cursor in cursors:
        await cursor.fetchall()


async def _nothing() -> None:
    await asyncio.sleep(0)


def _median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 1)


async def _timed_asyncio(n: int, op: Callable[[], Awaitable[None]]) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await op()
        out.append(time.perf_counter() - started)
    return out


def native(dsn: str, n: int, statements: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        trips = RoundTrips()
        conn = await counting_connection_class(trips).connect(dsn, autocommit=True)
        async with conn:
            await _timed_asyncio(100, lambda: _select(conn))  # warm-up
            before = trips.count
            select = await _timed_asyncio(n, lambda: _select(conn))
            select_trips = (trips.count - before) / n
            before = trips.count
            batch = await _timed_asyncio(n, lambda: _batch(conn, statements))
            batch_trips = (trips.count - before) / n
        return {
            "native_round_trip": _median_us(select),
            "native_round_trip_round_trips": select_trips,
            "native_operation_once": _median_us(batch),
            "native_operation_once_round_trips": batch_trips,
        }

    return asyncio.run(main())


def bridged(dsn: str, n: int, statements: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        trips = RoundTrips()
        async with asyncio_bridge() as bridge:
            cls = counting_connection_class(trips)
            conn = await bridge.run(cls.connect, dsn, autocommit=True)
            try:

                async def timed(op: Callable[[], Awaitable[None]]) -> list[float]:
                    out = []
                    for _ in range(n):
                        started = time.perf_counter()
                        await op()
                        out.append(time.perf_counter() - started)
                    return out

                async def per_statement() -> None:
                    for _ in range(statements):
                        await bridge.run(_select, conn)

                for _ in range(100):
                    await bridge.run(_select, conn)
                crossing = await timed(lambda: bridge.run(_nothing))
                before = trips.count
                select = await timed(lambda: bridge.run(_select, conn))
                select_trips = (trips.count - before) / n
                before = trips.count
                once = await timed(lambda: bridge.run(_batch, conn, statements))
                once_trips = (trips.count - before) / n
                before = trips.count
                each = await timed(per_statement)
                each_trips = (trips.count - before) / n
            finally:
                await bridge.run(conn.close)
        return {
            "bridge_crossing": _median_us(crossing),
            "bridged_round_trip": _median_us(select),
            "bridged_round_trip_round_trips": select_trips,
            "operation_once": _median_us(once),
            "operation_once_round_trips": once_trips,
            "operation_per_statement": _median_us(each),
            "operation_per_statement_round_trips": each_trips,
        }

    result: dict[str, Any] = trio.run(main)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default=DSN)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--statements", type=int, default=5)
    args = parser.parse_args()
    out: dict[str, Any] = {"n": args.n, "statements": args.statements}
    out.update(native(args.dsn, args.n, args.statements))
    out.update(bridged(args.dsn, args.n, args.statements))
    out["bridge_cost_per_round_trip"] = round(
        out["bridged_round_trip"] - out["native_round_trip"], 1
    )
    out["bridged_over_native"] = round(out["bridged_round_trip"] / out["native_round_trip"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
