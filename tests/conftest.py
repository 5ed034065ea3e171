"""Test-wide fixtures: the PostgreSQL test database.

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

from tests.pgcluster import admin_dsn_or_start, create_database, drop_database


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
