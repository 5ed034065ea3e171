"""The raw floor: one steady turn's SQL replayed through psycopg, no framework.

    python benchmarks/raw_floor.py --scale docs/benchmarks/scale.json [--dsn DSN]
        [--chats 600 --turns 10 --concurrency 20]

Reads the optimised scale run's `steady_statements` (statement name -> count over
the steady turns), derives the per-turn mix, and replays it for `--chats x --turns`
turns with `--concurrency` asyncio workers on a psycopg pool: the same statement
texts as PostgresStore (imported from it), each in autocommit, with realistic
parameters (one user message, one assistant step with tool calls, the tool
results, the final answer). Prints one JSON object: the floor's turns/s, the
framework's, and their ratio. Transaction grouping is not replayed (every
statement commits alone), so the floor is slightly optimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from chatd_trio.store import postgres as pg

DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _messages(chat_id: uuid.UUID, role: str, n: int, content: Any) -> tuple[Any, ...]:
    none = [None] * n
    return (
        chat_id,
        [role] * n,
        [Jsonb(content)] * n,
        ["both"] * n,
        none,
        none,
        none,
        none,
        none,
        none,
        [False] * n,
    )


def _carried(chat_id: uuid.UUID, parts: Any) -> dict[str, Any]:
    message = {
        "id": 2,
        "chat_id": str(chat_id),
        "role": "assistant",
        "parts": parts,
        "visibility": "both",
        "usage": {"input_tokens": 120, "output_tokens": 8, "total_tokens": 128},
        "context_limit": 200000,
        "compressed": False,
        "deleted": False,
        "created_at": "2026-11-23T12:00:00.000000+00:00",
        "prev_id": 1,
    }
    return {"after_message_id": 1, "message": message}


def statement(
    name: str, chat_id: uuid.UUID, worker: uuid.UUID, agent: uuid.UUID
) -> tuple[str, Any]:
    """The SQL and parameters PostgresStore runs for `name`."""
    text = [{"type": "text", "text": "done"}]
    table: dict[str, tuple[str, Any]] = {
        "GetChatByID": (pg._SQL_GET_CHAT, (chat_id,)),
        "LockChatForUpdate": (pg._SQL_LOCK_CHAT, (chat_id,)),
        "GetChatMessagesAfter": (pg._SQL_MESSAGES_AFTER, (chat_id, 0)),
        "GetPromptMessages": (pg._SQL_PROMPT_MESSAGES, (chat_id,)),
        "GetQueuedMessages": (pg._SQL_GET_QUEUED, (chat_id,)),
        "PopQueuedMessage": (pg._SQL_POP_QUEUED, (chat_id,)),
        "InsertChatMessages": (pg._SQL_INSERT_MESSAGES, _messages(chat_id, "assistant", 1, text)),
        "UpdateChatStatus": (pg._SQL_UPDATE_STATUS, ("waiting", None, chat_id)),
        "GetWorkspaceAgentByID": (pg._SQL_GET_AGENT, (agent,)),
        "AcquireChats": (pg._SQL_ACQUIRE, (worker, 10)),
        "RecoverStaleChats": (pg._SQL_RECOVER_STALE, (300.0, 300.0)),
        # One carried message, shaped like the scale test's notifies.
        "NotifyInTransaction": (
            pg._SQL_NOTIFY_MANY,
            ([f"chat:stream:{chat_id}"], [json.dumps(_carried(chat_id, text))]),
        ),
    }
    return table[name]


async def setup(conn: AsyncConnection[Any], chats: int) -> tuple[list[uuid.UUID], uuid.UUID]:
    owner = uuid.uuid4()
    ws = uuid.uuid4()
    await conn.execute(pg._SQL_INSERT_WORKSPACE, (ws, owner, "floor"))
    build = await (await conn.execute(pg._SQL_INSERT_BUILD, (uuid.uuid4(), ws))).fetchone()
    assert build is not None
    row = await (
        await conn.execute(
            pg._SQL_INSERT_AGENT, (uuid.uuid4(), "main", "127.0.0.1:1", "t", "/tmp", build[0])
        )
    ).fetchone()
    assert row is not None
    ids = []
    for i in range(chats):
        chat_id = uuid.uuid4()
        await conn.execute(
            pg._SQL_INSERT_CHAT,
            (chat_id, owner, f"floor {i}", None, chat_id, ws, None, None, []),
        )
        await conn.execute(pg._SQL_UPDATE_STATUS, ("waiting", None, chat_id))
        ids.append(chat_id)
    return ids, row[0]


async def main_async(args: argparse.Namespace, scale: dict[str, Any]) -> None:
    opt = scale.get("output", scale)["optimised"]
    steady_turns = opt["chats"] * (opt["turns"] - 1)
    mix = {k: v / steady_turns for k, v in opt["steady_statements"].items()}
    async with AsyncConnectionPool(args.dsn, max_size=args.concurrency, open=False) as pool:
        await pool.open(wait=True)
        async with pool.connection() as conn:
            await conn.set_autocommit(True)
            chats, agent = await setup(conn, args.chats)
        worker = uuid.uuid4()
        queue: asyncio.Queue[uuid.UUID] = asyncio.Queue()
        for _ in range(args.turns):
            for chat_id in chats:
                queue.put_nowait(chat_id)
        owed = dict.fromkeys(mix, 0.0)
        executed = 0

        async def run_worker() -> None:
            nonlocal executed
            while True:
                try:
                    chat_id = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                async with pool.connection() as conn:
                    await conn.set_autocommit(True)
                    for name, per_turn in mix.items():
                        owed[name] += per_turn
                        while owed[name] >= 1.0:
                            owed[name] -= 1.0
                            sql, params = statement(name, chat_id, worker, agent)
                            await (await conn.execute(sql, params)).fetchall()
                            executed += 1

        started = time.monotonic()
        await asyncio.gather(*(run_worker() for _ in range(args.concurrency)))
        wall = time.monotonic() - started
    turns = args.chats * args.turns
    floor = turns / wall
    print(
        json.dumps(
            {
                "chats": args.chats,
                "turns": args.turns,
                "concurrency": args.concurrency,
                "statements_per_turn": round(sum(mix.values()), 3),
                "mix_per_turn": {k: round(v, 3) for k, v in mix.items()},
                "statements_executed": executed,
                "wall_s": round(wall, 3),
                "floor_turns_per_s": round(floor, 3),
                "framework_turns_per_s": opt["turns_per_s"],
                "framework_over_floor": round(opt["turns_per_s"] / floor, 3),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", default="docs/benchmarks/scale.json")
    parser.add_argument("--dsn", default=DSN)
    parser.add_argument("--chats", type=int, default=600)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main_async(args, json.loads(Path(args.scale).read_text())))


if __name__ == "__main__":
    main()
