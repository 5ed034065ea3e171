"""What the two PostgreSQL adapters (store and pubsub) share.

Kept out of both adapters so that neither imports the other: the store decides
whether it can send a pubsub's notifies by comparing `database_address` values
(`chatd_trio.pubsub.base.DatabaseChannels`), not by knowing the pubsub's class.
"""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict

__all__ = ["database_address"]


def database_address(dsn: str) -> str:
    """host:port/dbname of a DSN, without credentials (errors, and "same database?")."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the configured database"
    host = info.get("host") or "localhost"
    return f"{host}:{info.get('port') or 5432}/{info.get('dbname') or ''}"
