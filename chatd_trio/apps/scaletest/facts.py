"""What the database holds at the end of a run (`Facts`), read through the memory store
or with SQL, and the stale-token witness a PostgreSQL run installs first."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import psycopg
import trio
from psycopg import sql

from chatd_trio.apps.scaletest.answers import StoredMessage
from chatd_trio.apps.scaletest.plan import FaultConfig
from chatd_trio.store.base import Store

__all__ = [
    "Facts",
    "install_witness",
    "memory_facts",
    "postgres_facts",
    "wait_for_database",
]

T = TypeVar("T")


@dataclass
class Facts:
    """The run's chats as stored at the end (non-deleted messages in id order)."""

    statuses: dict[str, str]
    messages: dict[str, list[StoredMessage]]
    stale_writes: int | None = None
    witness: str = "unavailable: the memory store has no ownership tokens"


async def memory_facts(store: Store, chat_ids: Sequence[str]) -> Facts:
    """`Facts` read through the store (the memory store has no SQL)."""
    statuses: dict[str, str] = {}
    messages: dict[str, list[StoredMessage]] = {}
    for raw in chat_ids:
        chat_id = uuid.UUID(raw)
        statuses[raw] = (await store.get_chat(chat_id)).status.value
        rows = await store.messages_after(chat_id, 0)
        messages[raw] = [StoredMessage.from_message(m) for m in rows]
    return Facts(statuses, messages)


_WITNESS_COLUMNS = """
SELECT count(*) FROM information_schema.columns
 WHERE table_schema = current_schema() AND column_name = 'owner_token'
   AND table_name IN ('chats', 'chat_messages')
"""

# Every insert into chat_messages carrying an ownership token other than the chat row's
# current one is recorded: the library's own guard is what is being checked, so the
# witness reads the row itself, after the insert, in the inserting transaction.
_WITNESS_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    id             bigserial PRIMARY KEY,
    chat_id        uuid NOT NULL,
    message_id     bigint NOT NULL,
    role           text NOT NULL,
    message_token  bigint NOT NULL,
    chat_token     bigint,
    at             timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    current_token bigint;
BEGIN
    IF NEW.owner_token IS NOT NULL THEN
        SELECT owner_token INTO current_token FROM chats WHERE id = NEW.chat_id;
        IF current_token IS DISTINCT FROM NEW.owner_token THEN
            INSERT INTO {table} (chat_id, message_id, role, message_token, chat_token)
            VALUES (NEW.chat_id, NEW.id, NEW.role, NEW.owner_token, current_token);
        END IF;
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS {trigger} ON chat_messages;
CREATE TRIGGER {trigger} AFTER INSERT ON chat_messages
    FOR EACH ROW EXECUTE FUNCTION {function}();
"""


def install_witness(dsn: str, fc: FaultConfig | None = None) -> str:
    """Install the stale-token witness in the database at `dsn` (the run's own).

    Only when both `chats.owner_token` and `chat_messages.owner_token` exist: a trigger
    naming a missing column would fail every insert. Returns "installed" or why not.
    Idempotent. Synchronous: run it in a thread.
    """
    fc = fc or FaultConfig()
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(_WITNESS_COLUMNS).fetchone()
        if row is None or row[0] < 2:
            return "unavailable: the schema has no chats/chat_messages.owner_token"
        names = {
            "table": sql.Identifier(fc.witness_table),
            "function": sql.Identifier(f"{fc.witness_table}_record"),
            "trigger": sql.Identifier(f"{fc.witness_table}_witness"),
        }
        with conn.transaction():
            conn.execute(sql.SQL(_WITNESS_DDL).format(**names))
    return "installed"


def postgres_facts(dsn: str, chat_ids: Sequence[str], fc: FaultConfig | None = None) -> Facts:
    """`Facts` read with SQL from the database at `dsn` (synchronous: run in a thread)."""
    fc = fc or FaultConfig()
    ids = [uuid.UUID(c) for c in chat_ids]
    with psycopg.connect(dsn, autocommit=True) as conn:
        statuses = {
            str(r[0]): str(r[1])
            for r in conn.execute("SELECT id, status FROM chats WHERE id = ANY(%s)", (ids,))
        }
        messages: dict[str, list[StoredMessage]] = {c: [] for c in chat_ids}
        rows = conn.execute(
            "SELECT chat_id, id, role, content, visibility, compressed FROM chat_messages"
            " WHERE chat_id = ANY(%s) AND NOT deleted ORDER BY chat_id, id",
            (ids,),
        )
        for chat_id, id_, role, content, visibility, compressed in rows:
            messages[str(chat_id)].append(
                StoredMessage.from_row(id_, role, content, visibility, compressed)
            )
        table = conn.execute("SELECT to_regclass(%s)", (fc.witness_table,)).fetchone()
        if table is None or table[0] is None:
            return Facts(statuses, messages, None, "unavailable: witness not installed")
        stale = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE chat_id = ANY(%s)").format(
                sql.Identifier(fc.witness_table)
            ),
            (ids,),
        ).fetchone()
        return Facts(statuses, messages, int(stale[0]) if stale else 0, "installed")


async def wait_for_database(call: Callable[[], T], fc: FaultConfig) -> T:
    """Run a synchronous database call in a thread, retrying while PostgreSQL is down."""
    deadline = trio.current_time() + fc.db_ready_timeout_s
    while True:
        try:
            return await trio.to_thread.run_sync(call)
        except psycopg.OperationalError:
            if trio.current_time() >= deadline:
                raise
        await trio.sleep(fc.db_ready_interval_s)
