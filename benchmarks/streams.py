"""Chat stream fan-out: latency and database reads per durable message. Prints JSON.

Usage: python benchmarks/streams.py [--messages N] [--dsn postgresql://...]

For 1, 10 and 100 subscribers on the publishing replica ("local") or on another
replica ("cross"), one message at a time is persisted and published; latency is
publish -> each subscriber's receipt (p50 / p99, milliseconds). Database reads
are the catch-up reads (`GetChatMessagesAfter` outside snapshots) per durable
message, with the optimised defaults and with the baseline: catch-up from the
database (`CatchUp.DATABASE`, chatd_trio.strategies) and notifies that carry no
message (`notify_carries_messages=False`). Runs on the
memory adapters, and on PostgreSQL when one answers (a throwaway database).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from chatd_trio.config import StreamConfig
from chatd_trio.domain import MessageEvent, NewMessage, Role, TextPart
from chatd_trio.pubsub.base import PubSub
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.store.base import Store
from chatd_trio.store.memory import MemoryStore
from chatd_trio.strategies import CatchUp, Strategies
from chatd_trio.streams import ChatStreams

SUBSCRIBERS = (1, 10, 100)
# Each variant: the streams' configuration and the strategies it measures.
VARIANTS = {
    "optimised": (StreamConfig(), Strategies()),
    "baseline": (
        StreamConfig(notify_carries_messages=False),
        Strategies(catch_up=CatchUp.DATABASE),
    ),
}
READS = "GetChatMessagesAfter"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def scenario(
    store: Store,
    pubsub: PubSub,
    variant: tuple[StreamConfig, Strategies],
    n_subs: int,
    cross: bool,
    messages: int,
) -> dict[str, Any]:
    config, strategies = variant
    publisher = ChatStreams(store, pubsub, config, strategies=strategies)
    receiver = ChatStreams(store, pubsub, config, strategies=strategies) if cross else publisher
    worker = uuid.uuid4()
    chat, first = await store.create_chat(uuid.uuid4(), "bench", (TextPart("hi"),))
    while not any(c.id == chat.id for c in await store.acquire(worker, 100)):
        pass
    publisher.start_turn(chat.id)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    remaining = 0
    all_received = trio.Event()
    ready = 0

    async def subscriber(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal remaining, all_received, ready
        async with receiver.subscribe(chat.id, first.id) as sub:
            await sub.receive()  # the snapshot's status
            task_status.started()
            async for ev in sub:
                if isinstance(ev, MessageEvent):
                    latencies.append(trio.current_time() - sent_at[ev.message.id])
                    remaining -= 1
                    if remaining == 0:
                        all_received.set()

    async with trio.open_nursery() as nursery:
        for _ in range(n_subs):
            await nursery.start(subscriber)
        reads_before = store.statement_counts().get(READS, 0)
        for i in range(messages):
            (msg,) = await store.persist_step(
                chat.id, worker, [NewMessage(Role.ASSISTANT, (TextPart(f"message {i}"),))]
            )
            remaining = n_subs
            all_received = trio.Event()
            sent_at[msg.id] = trio.current_time()
            await publisher.publish_message(msg)
            with trio.fail_after(30):
                await all_received.wait()
        reads = store.statement_counts().get(READS, 0) - reads_before
        nursery.cancel_scope.cancel()
    publisher.end_turn(chat.id)
    ms = [x * 1000 for x in latencies]
    stats = receiver.statistics()
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "db_reads_per_message": round(reads / messages, 3),
        "cache_hits": stats.cache_hits,
        "carried_hits": stats.carried_hits,
    }


async def run_backend(store: Store, pubsub: PubSub, messages: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, variant in VARIANTS.items():
        out[name] = {}
        for where in ("local", "cross"):
            out[name][where] = {
                str(n): await scenario(store, pubsub, variant, n, where == "cross", messages)
                for n in SUBSCRIBERS
            }
    return out


@asynccontextmanager
async def throwaway_database(admin_dsn: str) -> AsyncIterator[str]:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"chatd_bench_{uuid.uuid4().hex[:12]}"

    def create() -> None:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    await trio.to_thread.run_sync(create)
    try:
        params = conninfo_to_dict(admin_dsn)
        params["dbname"] = name
        yield make_conninfo("", **params)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(drop)


async def main(messages: int, dsn: str) -> dict[str, Any]:
    result: dict[str, Any] = {"messages_per_scenario": messages, "subscribers": SUBSCRIBERS}
    result["memory"] = await run_backend(MemoryStore(), MemoryPubSub(), messages)
    try:
        from chatd_trio.pubsub.auth import NotifyAuth
        from chatd_trio.pubsub.postgres import PostgresPubSub
        from chatd_trio.store.postgres import PostgresStore

        async with (
            throwaway_database(dsn) as db,
            PostgresStore.open(db) as store,
            # One process, its own database: a notify key of this run.
            PostgresPubSub.open(db, auth=NotifyAuth.generate()) as pubsub,
        ):
            result["postgres"] = await run_backend(store, pubsub, messages)
    except Exception as exc:  # no server: report it, keep the memory numbers
        result["postgres"] = {"skipped": repr(exc)}
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30)
    parser.add_argument("--dsn", default=os.environ.get("CHATD_BENCH_DSN", DEFAULT_DSN))
    args = parser.parse_args()
    json.dump(trio.run(main, args.messages, args.dsn), sys.stdout, indent=2)
    sys.stdout.write("\n")
