"""Find or start a PostgreSQL server for the tests, and create/drop databases."""

from __future__ import annotations

import psycopg
from psycopg import sql

from chatd_trio.apps._pgcluster import Cluster, ClusterError, answers

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
THROWAWAY_PORT = 55432
_HOW = (
    "No PostgreSQL server answered. Point the tests at one with "
    "CHATD_TEST_DSN=postgresql://USER@HOST:PORT/DB (a role allowed to CREATE DATABASE), "
    "or install the PostgreSQL server binaries so a throwaway cluster can be started."
)


def _start_throwaway() -> str | None:
    # The cluster outlives the session (only the session's database is dropped): a
    # later session finds it on the same port.
    reused = f"postgresql://postgres@127.0.0.1:{THROWAWAY_PORT}/postgres"
    if answers(reused):
        return reused
    try:
        return Cluster.create(port=THROWAWAY_PORT).dsn
    except ClusterError:
        return None


def admin_dsn_or_start(configured: str | None) -> str:
    """A DSN of a server that answers, starting a throwaway cluster if needed."""
    dsn = configured or DEFAULT_DSN
    if answers(dsn):
        return dsn
    started = _start_throwaway() if not configured else None
    if started:
        return started
    raise RuntimeError(_HOW)


def _with_db(dsn: str, name: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{name}"


def create_database(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_db(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def truncate_all(dsn: str) -> None:
    """Empty every table of the store's schema (not `schema_migrations`), restarting ids."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables"
            " WHERE schemaname = current_schema() AND tablename <> 'schema_migrations'"
        ).fetchall()
        if rows:
            tables = sql.SQL(", ").join(sql.Identifier(r[0]) for r in rows)
            conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(tables))
