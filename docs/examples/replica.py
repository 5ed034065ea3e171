"""One production replica: PostgreSQL store, LISTEN/NOTIFY pubsub, an OpenAI-compatible model.

    CHATD_DSN=postgresql://chatd@db.internal/chatd \
    CHATD_NOTIFY_KEY=$(cat /run/secrets/chatd_notify_key) \
    OPENAI_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=... CHATD_MODEL=gpt-4o-mini \
    python docs/examples/replica.py

CHATD_NOTIFY_KEY is the deployment's notify key, the same on every replica
(`python -m chatd_trio.pubsub.auth` prints a fresh one; docs/security.md).

Start it as many times as you like, on one machine or many, against one database:
each process is one replica. SIGINT or SIGTERM shuts it down gracefully: its running
chats go back to `pending` (no error) and another replica picks them up.
tests/test_docs_tour.py runs `run_replica` twice on the test database.
"""

from __future__ import annotations

import logging
import os
import signal

import trio

from chatd_trio import Config
from chatd_trio.models.base import Model
from chatd_trio.models.openai import OpenAIChatModel
from chatd_trio.pubsub.postgres import PostgresPubSub
from chatd_trio.server import Server
from chatd_trio.store.postgres import PostgresStore


async def run_replica(
    dsn: str,
    model: Model,
    config: Config | None = None,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve chats until cancelled; cancelling is a graceful shutdown."""
    async with (
        # Migrations run here, under an advisory lock: replicas may start together.
        PostgresStore.open(dsn) as store,
        # One dedicated LISTEN connection plus a small publish pool; notifies are sealed
        # with the key in CHATD_NOTIFY_KEY (it refuses to start without one).
        PostgresPubSub.open(dsn) as pubsub,
        Server(store, pubsub, model, config) as server,
    ):
        task_status.started(server)
        await trio.sleep_forever()


async def main() -> None:
    logging.basicConfig(level=logging.INFO)
    async with (
        OpenAIChatModel(
            os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
            os.environ["OPENAI_API_KEY"],
            os.environ.get("CHATD_MODEL", "gpt-4o-mini"),
        ) as model,
        trio.open_nursery() as nursery,
    ):
        server = await nursery.start(run_replica, os.environ["CHATD_DSN"], model)
        logging.info("replica serving", extra={"worker_id": str(server.worker_id)})
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
