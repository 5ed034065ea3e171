"""Test-wide fixtures: the PostgreSQL test database and the notify key.

The server comes from CHATD_TEST_DSN, else postgresql://postgres@127.0.0.1:5432/postgres.
Each test session creates its own database and drops it afterwards. When no
server answers, a throwaway cluster is started from the PostgreSQL binaries if
they exist; otherwise the session fails with instructions.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from chatd_trio.pubsub.auth import new_key_text
from tests.pgcluster import admin_dsn_or_start, create_database, drop_database


@pytest.fixture(scope="session", autouse=True)
def notify_key() -> Iterator[str]:
    """A fresh notify key for this test run in CHATD_NOTIFY_KEY: every PostgresPubSub
    a test opens without `auth=`, and every replica process a test starts (they inherit
    the environment), seals and opens with it."""
    with pytest.MonkeyPatch.context() as patch:
        key = new_key_text()
        patch.setenv("CHATD_NOTIFY_KEY", key)
        yield key


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a fresh database for this test session (dropped at the end)."""
    admin = admin_dsn_or_start(os.environ.get("CHATD_TEST_DSN"))
    name = f"chatd_test_{uuid.uuid4().hex[:12]}"
    dsn = create_database(admin, name)
    try:
        yield dsn
    finally:
        drop_database(admin, name)
