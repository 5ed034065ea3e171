"""Round trips counted at the connection (`chatd_trio._pgtrace`), on real PostgreSQL.

Counts, never times: each store operation's cost on the wire is a fixed number
of exchanges with the server, whatever the machine.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from chatd_trio.config import PostgresConfig, PubSubConfig
from chatd_trio.pubsub.auth import NotifyAuth, new_key_text
from chatd_trio.pubsub.postgres import PostgresPubSub
from chatd_trio.store.postgres import PostgresStore
from tests.pgcluster import truncate_all

pytestmark = pytest.mark.postgres

COUNTED = PostgresConfig(count_round_trips=True)


@asynccontextmanager
async def counted_store(dsn: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore.open(dsn, config=COUNTED) as store:
        await trio.to_thread.run_sync(truncate_all, dsn)
        yield store


def trips(store: PostgresStore) -> int:
    counted = store.round_trips()
    assert counted is not None
    return counted


async def test_round_trips_are_not_counted_by_default(pg_dsn: str) -> None:
    async with PostgresStore.open(pg_dsn) as store:
        await store.messages_after(uuid.uuid4(), 0)
        assert store.round_trips() is None


async def test_a_read_is_one_round_trip(pg_dsn: str) -> None:
    async with counted_store(pg_dsn) as store:
        before = trips(store)
        await store.messages_after(uuid.uuid4(), 0)
        assert trips(store) - before == 1
        await store.list_queued(uuid.uuid4())
        await store.prompt_messages(uuid.uuid4())
        assert trips(store) - before == 3


async def test_a_pubsub_publish_is_one_round_trip(pg_dsn: str) -> None:
    auth = NotifyAuth.from_key_text(new_key_text())
    config = PubSubConfig(count_round_trips=True)
    # The LISTEN of a subscription is a round trip of the listener connection.
    async with (
        PostgresPubSub.open(pg_dsn, config=config, auth=auth) as pubsub,
        pubsub.subscribe("trips") as sub,
    ):
        before = pubsub.statistics().round_trips
        assert before is not None and before >= 1
        await pubsub.publish("trips", "hello")
        assert await sub.receive() == "hello"
        # Receiving the notify is pushed by the server: not a round trip.
        assert pubsub.statistics().round_trips == before + 1
    async with PostgresPubSub.open(pg_dsn, auth=auth) as plain:
        assert plain.statistics().round_trips is None
