"""Find or start a PostgreSQL server for the tests, and create/drop databases."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time

import psycopg
from psycopg import sql

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
_HOW = (
    "No PostgreSQL server answered. Point the tests at one with "
    "CHATD_TEST_DSN=postgresql://USER@HOST:PORT/DB (a role allowed to CREATE DATABASE), "
    "or install the PostgreSQL server binaries so a throwaway cluster can be started."
)


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def _start_throwaway() -> str | None:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = shutil.which("initdb") or (bins[-1] if bins else None)
    if initdb is None:
        return None
    bindir = os.path.dirname(initdb)
    datadir = tempfile.mkdtemp(prefix="chatd-pg-")
    port = "55432"
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(datadir, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, initdb, "-D", datadir, "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_postgres,
            os.path.join(bindir, "pg_ctl"),
            "-D",
            datadir,
            "-o",
            f"-p {port} -k {datadir} -c listen_addresses=127.0.0.1",
            "-l",
            os.path.join(datadir, "log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    for _ in range(50):
        if _answers(dsn):
            return dsn
        time.sleep(0.1)
    return None


def admin_dsn_or_start(configured: str | None) -> str:
    """A DSN of a server that answers, starting a throwaway cluster if needed."""
    dsn = configured or DEFAULT_DSN
    if _answers(dsn):
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
