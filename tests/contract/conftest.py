"""The `store` fixture: every contract test runs against each Store adapter.

The PostgreSQL adapter is opened on the session's test database and wiped
before each test, so every test starts from an empty store with zero counts.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from chatd_trio.config import QueueConfig
from chatd_trio.domain import Chat, Message, Part, TextPart, text_of
from chatd_trio.store.base import Store
from chatd_trio.store.memory import MemoryStore

STORE_KINDS = ["memory", "postgres"]


@asynccontextmanager
async def open_store(kind: str, pg_dsn: str | None) -> AsyncIterator[Store]:
    """An empty store of the given kind (a fresh MemoryStore, or a wiped PostgreSQL one)."""
    if kind == "memory":
        yield MemoryStore()
        return
    assert pg_dsn is not None
    # Imported here so the memory branch runs while the PostgreSQL adapter is absent.
    from chatd_trio.store.postgres import PostgresStore
    from tests.pgcluster import truncate_all

    async with PostgresStore.open(pg_dsn) as store:
        await trio.to_thread.run_sync(truncate_all, pg_dsn)
        yield store


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_dsn(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    """The test database DSN for the postgres kind; None (no database) for memory."""
    if store_kind == "postgres":
        return str(request.getfixturevalue("pg_dsn"))
    return None


@pytest.fixture
async def store(store_kind: str, store_dsn: str | None) -> AsyncIterator[Store]:
    async with open_store(store_kind, store_dsn) as s:
        yield s


# -- helpers shared by the contract tests ---------------------------------------

MAX_QUEUED = QueueConfig().max_queued


def text(s: str) -> tuple[Part, ...]:
    """User message parts holding one text."""
    return (TextPart(s),)


async def new_chat(
    store: Store, owner: uuid.UUID | None = None, first: str = "hello", **kw: Any
) -> tuple[Chat, Message]:
    """A fresh pending chat with one user message."""
    return await store.create_chat(owner or uuid.uuid4(), "a chat", text(first), **kw)


async def running_chat(store: Store, worker: uuid.UUID, first: str = "hello") -> Chat:
    """A fresh chat acquired by `worker` (the store must hold no other pending chat)."""
    chat, _ = await new_chat(store, first=first)
    acquired = await store.acquire(worker, 1)
    assert [c.id for c in acquired] == [chat.id]
    return acquired[0]


def texts(messages: Sequence[Message]) -> list[str]:
    return [text_of(m.parts) for m in messages]
