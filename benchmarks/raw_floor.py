"""The raw floor: a steady turn's store operations replayed through psycopg, no framework.

    python benchmarks/raw_floor.py [--dsn DSN] [--chats 600 --turns 10 --concurrency 20]
        [--scale FILE]

Replays what PostgresStore sends for a steady turn of the scale test, batch for
batch, with the same SQL texts (imported from it) and the same pipelining:

- send: BEGIN + lock + guard read (mark) + gated insert of the user message + gated
  row update (-> pending); then its notifies (the message, `pending`) + COMMIT;
- acquire (up to 10 pending chats, as `AcquireConfig.max_chats_per_acquire`): BEGIN +
  claim + prompt tails; then a `running` notify per claim + COMMIT;
- the tool step: BEGIN + lock + guard read + gated insert of the assistant message
  and its two tool results; then their three notifies + COMMIT;
- the finish: BEGIN + lock + guard read + gated insert of the answer + gated row
  update (-> waiting); then its notifies (the answer, `waiting`, the owner's list) +
  COMMIT.

Each batch goes out in one write, as the store sends it (`chatd_trio._pgtrio.
BatchingPipeline`, on asyncio here).

Notify payloads are real: the same JSON the replicas send (a carried message), sealed
with `chatd_trio.pubsub.auth` under a random key. Workers are asyncio tasks on one
psycopg pool (`--concurrency` connections, as many as the replicas' pools together):
each sends the next message of a chat whose turn is over, then acquires, and runs the
step and the finish of every chat it claimed (a chat another worker claimed is run
there). No model, no agent, no streams, no Trio: an optimistic floor for the same
work on the wire. Prints one JSON object; with `--scale FILE` (a `chatd-trio
scaletest --json` output, or `benchmarks/scale.py`'s) also the framework's turns/s
and its ratio to the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from chatd_trio._pgtrace import RoundTrips, counting_connection_class
from chatd_trio._pgtrio import BatchedPipelines
from chatd_trio.domain import (
    ChatStatus,
    NewMessage,
    NotifyPayload,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Visibility,
    dumps,
    owner_channel,
    parts_to_json,
    stream_channel,
)
from chatd_trio.lifecycle import ChatView, Event, decide
from chatd_trio.pubsub.auth import NotifyAuth, new_key_text
from chatd_trio.store import postgres as pg
from chatd_trio.store.base import Write

DSN = os.environ.get("CHATD_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
MAX_QUEUED = 20
ACQUIRE_LIMIT = 10
OWNER = uuid.UUID(int=1)
WORKER = uuid.UUID(int=2)


class Floor:
    def __init__(self, pool: AsyncConnectionPool[Any], auth: NotifyAuth) -> None:
        self.pool = pool
        self.auth = auth
        self.statements = 0
        self.turns = 0

    def _sealed(self, channel: str, payload: str) -> tuple[str, str]:
        return channel, self.auth.seal(channel, payload)

    def _message_notifies(self, rows: list[Any]) -> list[tuple[str, str]]:
        out = []
        for m in pg._inserted(rows):
            payload = NotifyPayload(after_message_id=m.prev_id, message=m).encode()
            out.append(self._sealed(stream_channel(m.chat_id), payload))
        return out

    def _status(self, row: Any) -> tuple[str, str]:
        status = ChatStatus(row["status"])
        payload = NotifyPayload(
            status=status,
            worker_id=row["worker_id"] if status is ChatStatus.RUNNING else None,
            owner_token=row["owner_token"],
        ).encode()
        return self._sealed(stream_channel(row["id"]), payload)

    async def _send(self, conn: Any, query: str, params: Any = None) -> Any:
        self.statements += 1
        return await conn.execute(query, params)

    async def write(
        self,
        chat_id: uuid.UUID,
        event: Event,
        view: ChatView,
        messages: list[NewMessage],
        *,
        token: int | None = None,
        owner: bool = False,
    ) -> Any:
        """One guarded write as PostgresStore sends it (two batches)."""
        plan = decide(event, view, token=token, max_queued=MAX_QUEUED)
        write = Write(
            messages=tuple(messages),
            parts=tuple(messages[0].parts),
            owner_id=OWNER if token is None else None,
            stamp=token,
        )
        mark = uuid.uuid4().hex
        async with self.pool.connection() as conn, conn.pipeline() as pipe:
            await conn.execute("BEGIN")
            await self._send(conn, pg._SQL_LOCK_CHAT, (chat_id,))
            read = await self._send(
                conn, pg._SQL_CHAT_FOR_WRITE, pg._guard_params(chat_id, plan, write, mark)
            )
            params = pg._insert_params(chat_id, messages, token, write.op_id, mark)
            inserted = await self._send(conn, pg._SQL_INSERT_MESSAGES_GATED, params)
            updated = None
            if plan.changes_row:
                updated = await self._send(conn, *pg._update_chat_sql(plan, write, chat_id, mark))
            await pipe.sync()
            row = await read.fetchone()
            assert row is not None and row["marked"], "the floor's guard must hold"
            notifies = self._message_notifies(await inserted.fetchall())
            after = row
            if updated is not None:
                after = (await updated.fetchall())[0]
                notifies.append(self._status(after))
            if owner:
                payload = dumps(
                    {
                        "kind": "status",
                        "chat_id": str(chat_id),
                        "status": after["status"],
                        "title": after["title"],
                    }
                )
                notifies.append(self._sealed(owner_channel(OWNER), payload))
            await self._send(conn, pg._SQL_NOTIFY_MANY, pg._notify_params(notifies))
            await conn.execute("COMMIT")
        return after

    async def acquire(self) -> list[Any]:
        params = {"target": "running", "source": "pending", "worker": WORKER}
        params["limit"] = ACQUIRE_LIMIT
        async with self.pool.connection() as conn, conn.pipeline() as pipe:
            await conn.execute("BEGIN")
            claim = await self._send(conn, pg._SQL_ACQUIRE, params)
            tails = await self._send(conn, pg._SQL_PROMPT_TAILS)
            await pipe.sync()
            rows = await claim.fetchall()
            await tails.fetchall()
            if not rows:
                await conn.execute("ROLLBACK")
                return []
            await self._send(
                conn, pg._SQL_NOTIFY_MANY, pg._notify_params([self._status(r) for r in rows])
            )
            await conn.execute("COMMIT")
        return rows

    async def run_turn(self, claimed: Any, waiting: asyncio.Queue[uuid.UUID]) -> None:
        chat_id, token = claimed["id"], claimed["owner_token"]
        running = ChatView(ChatStatus.RUNNING, token, 0)
        calls = [ToolCallPart(f"call_{i}", "list_dir", "{}") for i in range(2)]
        step = [NewMessage(Role.ASSISTANT, tuple(calls), Visibility.BOTH)] + [
            NewMessage(
                Role.TOOL,
                (ToolResultPart(c.call_id, c.name, {"entries": ["AGENTS.md", "f.txt"]}),),
                Visibility.BOTH,
            )
            for c in calls
        ]
        await self.write(chat_id, Event.WRITE, running, step, token=token)
        answer = [NewMessage(Role.ASSISTANT, (TextPart("done"),), Visibility.BOTH)]
        await self.write(chat_id, Event.FINISH_DONE, running, answer, token=token, owner=True)
        self.turns += 1
        waiting.put_nowait(chat_id)


async def setup(pool: AsyncConnectionPool[Any], chats: int) -> list[tuple[uuid.UUID, int]]:
    """`chats` waiting chats, each after one turn's history, with their tokens."""
    ids = []
    first = Jsonb(parts_to_json((TextPart("turn 1"),)))
    answer = Jsonb(parts_to_json((TextPart("done"),)))
    async with pool.connection() as conn:
        for i in range(chats):
            chat_id = uuid.uuid4()
            await conn.execute(
                pg._SQL_INSERT_CHAT,
                (chat_id, OWNER, f"floor {i}", "waiting", None, None, None, None, None, [], None),
            )
            await conn.execute(
                "INSERT INTO chat_messages (chat_id, role, content, visibility, owner_token)"
                " VALUES (%s, 'user', %s, 'both', NULL), (%s, 'assistant', %s, 'both', 1)",
                (chat_id, first, chat_id, answer),
            )
            await conn.execute("UPDATE chats SET owner_token = 1 WHERE id = %s", (chat_id,))
            ids.append((chat_id, 1))
    return ids


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    trips = RoundTrips()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        args.dsn,
        connection_class=counting_connection_class(trips, BatchedPipelines),
        kwargs={"autocommit": True, "row_factory": dict_row},
        min_size=args.concurrency,
        max_size=args.concurrency,
        open=False,
    )
    async with pool:
        await pool.wait()
        chats = await setup(pool, args.chats)
        floor = Floor(pool, NotifyAuth.from_key_text(new_key_text()))
        waiting: asyncio.Queue[uuid.UUID] = asyncio.Queue()
        sends = {chat_id: 0 for chat_id, _ in chats}
        for chat_id, _ in chats:
            waiting.put_nowait(chat_id)
        total = args.chats * args.turns
        done = asyncio.Event()

        async def worker() -> None:
            # Like a replica: the messages that arrived (up to one acquisition's worth),
            # then acquisitions until one comes back short, then the claimed turns.
            while not done.is_set():
                batch: list[uuid.UUID] = []
                while len(batch) < ACQUIRE_LIMIT and not waiting.empty():
                    chat_id = waiting.get_nowait()
                    if sends[chat_id] < args.turns:
                        batch.append(chat_id)
                if not batch:
                    if floor.turns >= total:
                        done.set()
                    await asyncio.sleep(0.001)
                    continue
                for chat_id in batch:
                    sends[chat_id] += 1
                    user = [NewMessage(Role.USER, (TextPart("next"),), Visibility.BOTH)]
                    row = await floor.write(
                        chat_id, Event.SEND_MESSAGE, ChatView(ChatStatus.WAITING), user
                    )
                    assert row["status"] == "pending"
                while True:
                    claimed = await floor.acquire()
                    for row in claimed:
                        await floor.run_turn(row, waiting)
                    if len(claimed) < ACQUIRE_LIMIT:
                        break
                if floor.turns >= total:
                    done.set()

        before = trips.count
        started = time.monotonic()
        cpu_started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.monotonic() - started
        cpu = time.process_time() - cpu_started
        round_trips = trips.count - before
    return {
        "chats": args.chats,
        "turns": args.turns,
        "concurrency": args.concurrency,
        "turns_done": floor.turns,
        "statements_per_turn": round(floor.statements / floor.turns, 3),
        "round_trips_per_turn": round(round_trips / floor.turns, 3),
        "wall_s": round(wall, 3),
        "floor_turns_per_s": round(floor.turns / wall, 3),
        # This client's CPU (psycopg, asyncio, sealing) per turn; PostgreSQL's is apart.
        "client_cpu_ms_per_turn": round(cpu / floor.turns * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default=DSN)
    parser.add_argument("--chats", type=int, default=600)
    parser.add_argument("--turns", type=int, default=10, help="steady turns per chat")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--scale", default=None, help="a scale test JSON output to compare")
    parser.add_argument("--database", default=None, help="use this database (created, dropped)")
    args = parser.parse_args()
    name = args.database or f"chatd_floor_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = psycopg.conninfo.make_conninfo(args.dsn, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _, text in pg.load_migrations():
                conn.execute(text)  # type: ignore[call-overload]
        out = asyncio.run(main_async(argparse.Namespace(**{**vars(args), "dsn": dsn})))
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if args.scale:
        scale = json.loads(Path(args.scale).read_text())
        framework = scale.get("output", scale)
        framework = framework.get("optimised", framework)
        out["framework_turns_per_s"] = framework["turns_per_s"]
        out["framework_over_floor"] = round(framework["turns_per_s"] / out["floor_turns_per_s"], 3)
        if "steady_turns_per_s" in framework:
            out["steady_framework_over_floor"] = round(
                framework["steady_turns_per_s"] / out["floor_turns_per_s"], 3
            )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
