"""The run's own PostgreSQL database: on a throwaway cluster or on the `--dsn` server,
created at the start and dropped at the end (unless `--keep`)."""

from __future__ import annotations

import functools
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import trio
from psycopg import sql
from psycopg.conninfo import make_conninfo

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio.apps.scaletest.facts import wait_for_database
from chatd_trio.apps.scaletest.plan import FaultConfig, Plan, ScaleTestError

__all__ = [
    "Database",
    "create_database",
    "drop_database",
    "run_database",
]


@dataclass
class Database:
    admin_dsn: str
    dsn: str
    name: str
    cluster: Any  # chatd_trio.apps._pgcluster.Cluster | None


def create_database(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(admin_dsn, dbname=name)


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@asynccontextmanager
async def run_database(plan: Plan, fc: FaultConfig) -> AsyncIterator[Database]:
    """A database of the run's own: on a throwaway cluster or on the `--dsn` server.
    Dropped (and the cluster removed) at the end unless `plan.keep`."""
    from chatd_trio.apps._pgcluster import Cluster, ClusterError

    cluster: Cluster | None = None
    admin = plan.dsn
    if plan.throwaway:
        try:
            cluster = await trio.to_thread.run_sync(Cluster.create)
        except ClusterError as exc:
            raise ScaleTestError(f"cannot start a throwaway PostgreSQL cluster: {exc}") from exc
        admin = cluster.dsn
    try:
        name = f"{fc.database_prefix}{uuid.uuid4().hex[:10]}"
        try:
            dsn = await trio.to_thread.run_sync(create_database, admin, name)
        except psycopg.Error as exc:
            raise ScaleTestError(f"cannot create the run's database {name}: {exc}") from exc
        try:
            yield Database(admin, dsn, name, cluster)
        finally:
            if plan.keep:
                print(f"kept database: {dsn}", file=sys.stderr)
            else:
                with bounded_cleanup(fc.cleanup_timeout_s):
                    await wait_for_database(functools.partial(drop_database, admin, name), fc)
    finally:
        if cluster is not None:
            if plan.keep:
                print(
                    f"kept cluster: {cluster.datadir} (stop it with: "
                    f"{' '.join(cluster.as_postgres)} {cluster.bindir}/pg_ctl "
                    f"-D {cluster.datadir} stop; then remove the directory)",
                    file=sys.stderr,
                )
            else:
                with bounded_cleanup(fc.cleanup_timeout_s):
                    await trio.to_thread.run_sync(cluster.remove)
