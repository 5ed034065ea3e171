"""Store operation benchmark: acquire, persist_step, messages_after on PostgreSQL and memory.

Prints JSON: per store and operation, the median latency (µs) of sequential calls
and the throughput (ops/s) of `--concurrency` tasks calling at once. The PostgreSQL
run creates a temporary database on the server of CHATD_BENCH_DSN / CHATD_TEST_DSN
(default postgresql://postgres@127.0.0.1:5432/postgres) and drops it afterwards.
Never run by the test suite.

    python benchmarks/store_ops.py [--ops 500] [--concurrency 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import trio
from psycopg import sql

from chatd_trio.domain import NewMessage, Role, TextPart
from chatd_trio.store.base import Lease, Store
from chatd_trio.store.memory import MemoryStore
from chatd_trio.store.postgres import PostgresStore

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
WORKER = uuid.UUID(int=1)
STEP = [
    NewMessage(Role.ASSISTANT, (TextPart("the model's answer " * 8),)),
    NewMessage(Role.TOOL, (TextPart("a tool result"),)),
]


def _admin_dsn() -> str:
    return (
        os.environ.get("CHATD_BENCH_DSN") or os.environ.get("CHATD_TEST_DSN") or DEFAULT_ADMIN_DSN
    )


def _with_db(dsn: str, name: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{name}"


def _create_db(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _drop_db(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


async def _latency_us(op: Callable[[int], Awaitable[Any]], n: int) -> float:
    samples: list[float] = []
    for i in range(n):
        t0 = trio.current_time()
        await op(i)
        samples.append((trio.current_time() - t0) * 1e6)
    return statistics.median(samples)


async def _throughput(op: Callable[[int], Awaitable[Any]], n: int, concurrency: int) -> float:
    per_task = max(1, n // concurrency)

    async def worker(k: int) -> None:
        for i in range(per_task):
            await op(k * per_task + i)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for k in range(concurrency):
            nursery.start_soon(worker, k)
    return per_task * concurrency / (trio.current_time() - t0)


async def _bench(store: Store, n: int, concurrency: int) -> dict[str, dict[str, float]]:
    owner = uuid.uuid4()
    text = (TextPart("hello"),)
    out: dict[str, dict[str, float]] = {}

    # acquire: one pending chat claimed per call (2n chats: n sequential, n concurrent).
    for _ in range(2 * n):
        await store.create_chat(owner, "bench", text)

    async def acquire(_: int) -> None:
        assert len(await store.acquire(WORKER, 1)) == 1

    out["acquire"] = {
        "median_us": await _latency_us(acquire, n),
        "ops_per_s": await _throughput(acquire, n, concurrency),
    }

    # persist_step: one step (assistant + tool message) into chats this worker owns.
    (chat, _) = await store.create_chat(owner, "bench", text)
    chats = [chat]
    for _ in range(concurrency - 1):
        chats.append((await store.create_chat(owner, "bench", text))[0])
    leases = [Lease.of(c) for c in await store.acquire(WORKER, concurrency)]
    assert len(leases) == concurrency

    async def persist(i: int) -> None:
        await store.persist_step(leases[i % concurrency], STEP)

    out["persist_step"] = {
        "median_us": await _latency_us(persist, n),
        "ops_per_s": await _throughput(persist, n, concurrency),
    }

    # messages_after: a catch-up read of the last 10 messages of a 40-message chat.
    reader, _ = await store.create_chat(owner, "bench", text)
    (running,) = await store.acquire(WORKER, 1)
    assert running.id == reader.id
    for _ in range(20):
        persisted = await store.persist_step(Lease.of(running), STEP)
    cursor = persisted[-1].id - 10

    async def read(_: int) -> None:
        assert len(await store.messages_after(reader.id, cursor)) == 10

    out["messages_after"] = {
        "median_us": await _latency_us(read, n),
        "ops_per_s": await _throughput(read, n, concurrency),
    }
    return {op: {k: round(v, 1) for k, v in r.items()} for op, r in out.items()}


@asynccontextmanager
async def _postgres(admin: str, max_size: int) -> AsyncIterator[PostgresStore]:
    name = f"chatd_bench_{uuid.uuid4().hex[:12]}"
    await trio.to_thread.run_sync(_create_db, admin, name)
    try:
        async with PostgresStore.open(_with_db(admin, name), max_size=max_size) as store:
            yield store
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_drop_db, admin, name)


async def main(n: int, concurrency: int) -> dict[str, Any]:
    result: dict[str, Any] = {"ops": n, "concurrency": concurrency}
    result["memory"] = await _bench(MemoryStore(), n, concurrency)
    async with _postgres(_admin_dsn(), concurrency) as store:
        result["postgres"] = await _bench(store, n, concurrency)
        result["postgres_pool"] = {
            k: store.pool_stats()[k] for k in ("size", "max_in_use", "max_size")
        }
        result["postgres_statements"] = store.statement_counts()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=500, help="calls per measurement")
    parser.add_argument("--concurrency", type=int, default=10, help="concurrent tasks")
    args = parser.parse_args()
    print(json.dumps(trio.run(main, args.ops, args.concurrency), indent=2))
