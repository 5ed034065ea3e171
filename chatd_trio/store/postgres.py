"""The PostgreSQL Store: the production store and the coordination engine between replicas.

psycopg's async API runs on a trio-asyncio loop (`chatd_trio._aio`). Each store
operation is ONE asyncio coroutine entered once from Trio: it borrows a pooled
connection, runs its statements (inside one transaction when there are several)
and returns the connection before it ends, so a cancelled Trio task never leaves
a connection mid-transaction and no connection is held between operations
(docs/architecture.md).

Semantics and statement accounting are those of `chatd_trio.store.memory`
(its module docstring tabulates the statements per operation and the decisions
where the spec is silent); the shared contract suite holds both adapters to it.

PostgreSQL-specific choices:
- Row timestamps are the server's transaction time `now()`: every row one
  operation writes carries the same instant, as in the memory adapter.
- `acquire` is one statement: `UPDATE ... FROM (SELECT ... ORDER BY updated_at, id
  LIMIT n FOR UPDATE SKIP LOCKED)`; the subquery's pre-update `updated_at` orders
  the result. Stale recovery is one statement whose lock step re-checks the row
  (SKIP LOCKED passes over a row a heartbeat is refreshing right now).
- Connection failures raise `StoreUnavailable`; every other database failure
  raises `StoreError`. After a lost connection the pool is drained so the next
  operation does not pick another dead connection (e.g. after a server restart).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias, TypeVar

import psycopg
import psycopg.waiting
import trio
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from chatd_trio._aio import Bridge, asyncio_bridge, bind_psycopg_loop_lookup
from chatd_trio._pgtrace import RoundTrips, counting_connection_class
from chatd_trio.config import LimitsConfig, PostgresConfig
from chatd_trio.domain import (
    Chat,
    ChatStatus,
    Message,
    NewMessage,
    QueuedMessage,
    Role,
    Usage,
    Visibility,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
    parts_from_json,
    parts_to_json,
)
from chatd_trio.errors import (
    BuildNotFound,
    ChatdError,
    ChatNotFound,
    DecodeError,
    PermissionDenied,
    QueuedMessageNotFound,
    StoreError,
    StoreUnavailable,
    WorkspaceNotFound,
)
from chatd_trio.lifecycle import ChatView, Effect, Plan
from chatd_trio.pubsub.postgres import PostgresPubSub, database_address
from chatd_trio.store.base import (
    Announcer,
    Applied,
    Binding,
    Lease,
    StatementCounter,
    Write,
    check_edit_target,
    check_title,
    check_user_parts,
    promoted_by,
)
from chatd_trio.store.ops import StoreOps, user_message

__all__ = ["PostgresStore", "load_migrations"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Conn: TypeAlias = psycopg.AsyncConnection[DictRow]
_Pool: TypeAlias = AsyncConnectionPool[psycopg.AsyncConnection[DictRow]]
_Body: TypeAlias = Callable[[_Conn], Awaitable[T]]
_Params: TypeAlias = Sequence[object] | Mapping[str, object]

_DEFAULTS = PostgresConfig()


bind_psycopg_loop_lookup()

# Python's str.strip() removes exactly the characters for which str.isspace() is true;
# all of them lie below U+3001. Trimming these in SQL makes "non-blank" mean the same
# thing in both adapters (latest_assistant_text).
_PY_WHITESPACE = "".join(ch for ch in map(chr, range(0x3001)) if ch.isspace())

# -- SQL ------------------------------------------------------------------------------

_CHAT_COLUMNS = (
    "id",
    "owner_id",
    "title",
    "status",
    "worker_id",
    "started_at",
    "heartbeat_at",
    "created_at",
    "updated_at",
    "parent_chat_id",
    "root_chat_id",
    "workspace_id",
    "build_id",
    "agent_id",
    "last_error",
    "mcp_servers",
    "owner_token",
)
# A chat as reads return it: the row plus its queue's length.
_QUEUED_COUNT = "(SELECT count(*) FROM chat_queued_messages q WHERE q.chat_id = {t}.id)"
_CHAT = ", ".join(_CHAT_COLUMNS) + ", " + _QUEUED_COUNT.format(t="chats") + " AS queued"
_CHAT_C = ", ".join(f"c.{col}" for col in _CHAT_COLUMNS) + ", " + _QUEUED_COUNT.format(t="c")
_CHAT_C += " AS queued"
_MSG = (
    "id, chat_id, role, content, visibility, input_tokens, output_tokens, cache_read_tokens,"
    " cache_creation_tokens, total_tokens, context_limit, compressed, deleted, created_at"
)
_QUEUED = "id, chat_id, content, created_at"
_WORKSPACE = "id, owner_id, name, created_at"
_BUILD = "id, workspace_id, build_number, created_at"
_AGENT = "id, build_id, workspace_id, name, address, token, directory, created_at"

_SQL_GET_CHAT = f"SELECT {_CHAT} FROM chats WHERE id = %s"
# A guarded write first locks the row, then reads what its guard needs in a second
# statement: that statement's snapshot starts after the lock was granted, so it sees
# every write committed before (the queue, the messages of an earlier attempt).
_SQL_LOCK_CHAT = "SELECT id FROM chats WHERE id = %s FOR UPDATE"
_SQL_CHAT_FOR_WRITE = (
    f"SELECT {_CHAT}, last_op_id,"
    " EXISTS (SELECT 1 FROM chat_messages m WHERE m.op_id = %s AND m.chat_id = chats.id)"
    " AS op_inserted FROM chats WHERE id = %s"
)
_SQL_CHATS_BY_OWNER = (
    f"SELECT {_CHAT} FROM chats WHERE owner_id = %s ORDER BY created_at DESC, id DESC"
)
_SQL_INSERT_CHAT = (
    "INSERT INTO chats (id, owner_id, title, status, parent_chat_id, root_chat_id,"
    " workspace_id, build_id, agent_id, mcp_servers)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::text[])"
    f" RETURNING {_CHAT}"
)
# Array order is evaluation order: the notifies go out (at commit) in message order.
_SQL_NOTIFY_MANY = "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS t(c, p)"
# One statement for any number of messages; ORDER BY ordinality assigns ids in input order.
_SQL_INSERT_MESSAGES = (
    "INSERT INTO chat_messages (chat_id, role, content, visibility, input_tokens,"
    " output_tokens, cache_read_tokens, cache_creation_tokens, total_tokens, context_limit,"
    " compressed, owner_token, op_id)"
    " SELECT %s, m.role, m.content, m.visibility, m.input_tokens, m.output_tokens,"
    " m.cache_read_tokens, m.cache_creation_tokens, m.total_tokens, m.context_limit,"
    " m.compressed, %s, %s"
    " FROM unnest(%s::text[], %s::jsonb[], %s::text[], %s::bigint[], %s::bigint[],"
    " %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::boolean[])"
    " WITH ORDINALITY AS m(role, content, visibility, input_tokens, output_tokens,"
    " cache_read_tokens, cache_creation_tokens, total_tokens, context_limit, compressed, ord)"
    f" ORDER BY m.ord RETURNING {_MSG},"
    # The statement's snapshot excludes its own rows: this is the chat's latest visible
    # message before the insert (the chat row is locked, so nothing else inserts).
    " (SELECT max(p.id) FROM chat_messages p WHERE p.chat_id = chat_messages.chat_id"
    " AND NOT p.deleted AND p.visibility IN ('user', 'both')) AS prev_visible_id"
)
_SQL_MESSAGES_BY_OP = (
    f"SELECT {_MSG} FROM chat_messages WHERE chat_id = %s AND op_id = %s ORDER BY id"
)
_SQL_GET_MESSAGE = f"SELECT {_MSG} FROM chat_messages WHERE id = %s"
_SQL_SOFT_DELETE_FROM = (
    "UPDATE chat_messages SET deleted = true WHERE chat_id = %s AND id >= %s AND NOT deleted"
)
_SQL_MESSAGES_AFTER = (
    f"SELECT {_MSG} FROM chat_messages WHERE chat_id = %s AND id > %s AND NOT deleted"
    " AND visibility IN ('user', 'both') ORDER BY id"
)
# The boundary is the latest compressed summary (a compressed user message); before it
# only uncompressed system messages survive (docs/spec.md §3.1).
_SQL_PROMPT_MESSAGES = (
    f"WITH visible AS (SELECT {_MSG} FROM chat_messages WHERE chat_id = %s AND NOT deleted"
    " AND visibility IN ('model', 'both')),"
    " boundary AS (SELECT max(id) AS id FROM visible WHERE compressed AND role = 'user')"
    f" SELECT {', '.join('v.' + c.strip() for c in _MSG.split(','))}"
    " FROM visible v CROSS JOIN boundary b"
    " WHERE b.id IS NULL OR v.id >= b.id OR (v.role = 'system' AND NOT v.compressed)"
    " ORDER BY v.id"
)
_SQL_LATEST_ASSISTANT_TEXT = (
    "SELECT t.txt FROM chat_messages m CROSS JOIN LATERAL ("
    " SELECT string_agg(p.value->>'text', '' ORDER BY p.ord) AS txt"
    " FROM jsonb_array_elements(m.content) WITH ORDINALITY AS p(value, ord)"
    " WHERE p.value->>'type' = 'text') t"
    " WHERE m.chat_id = %s AND m.role = 'assistant' AND NOT m.deleted"
    " AND m.visibility IN ('user', 'both') AND btrim(t.txt, %s) <> ''"
    " ORDER BY m.id DESC LIMIT 1"
)
_SQL_GET_QUEUED = (
    f"SELECT {_QUEUED} FROM chat_queued_messages WHERE chat_id = %s ORDER BY position, id"
)
_SQL_APPEND_QUEUED = (
    "INSERT INTO chat_queued_messages (chat_id, content, position)"
    " SELECT %s, %s, coalesce(max(position), 0) + 1 FROM chat_queued_messages"
    f" WHERE chat_id = %s RETURNING {_QUEUED}"
)
# Re-insert a queued message (same id, same created_at) ahead of every other one.
_SQL_PREPEND_QUEUED = (
    "INSERT INTO chat_queued_messages (id, chat_id, content, created_at, position)"
    " SELECT %s, %s, %s, %s, coalesce(min(position), 1) - 1 FROM chat_queued_messages"
    f" WHERE chat_id = %s RETURNING {_QUEUED}"
)
_SQL_DELETE_QUEUED = (
    f"DELETE FROM chat_queued_messages WHERE chat_id = %s AND id = %s RETURNING {_QUEUED}"
)
_SQL_CLEAR_QUEUE = "DELETE FROM chat_queued_messages WHERE chat_id = %s"
_SQL_POP_QUEUED = (
    "DELETE FROM chat_queued_messages WHERE id = (SELECT id FROM chat_queued_messages"
    f" WHERE chat_id = %s ORDER BY position, id LIMIT 1) RETURNING {_QUEUED}"
)
# The bulk ownership statements execute a lifecycle plan: its source and target status,
# and a new ownership token for every row they change.
_SQL_ACQUIRE = (
    "UPDATE chats AS c SET status = %(target)s, worker_id = %(worker)s, started_at = now(),"
    " heartbeat_at = now(), updated_at = now(), last_error = NULL,"
    " owner_token = c.owner_token + 1"
    " FROM (SELECT id, updated_at FROM chats WHERE status = %(source)s"
    " ORDER BY updated_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) AS p"
    f" WHERE c.id = p.id RETURNING {_CHAT_C}, p.updated_at AS pending_since"
)
_SQL_RELEASE = (
    "UPDATE chats AS c SET status = %(target)s, worker_id = NULL, started_at = NULL,"
    " heartbeat_at = NULL, updated_at = now(), last_error = NULL,"
    " owner_token = c.owner_token + 1"
    " FROM unnest(%(ids)s::uuid[], %(tokens)s::bigint[]) AS l(id, token)"
    " WHERE c.id = l.id AND c.owner_token = l.token AND c.status = %(source)s"
)
_SQL_RECOVER_STALE = (
    "UPDATE chats SET status = %(target)s, worker_id = NULL, started_at = NULL,"
    " heartbeat_at = NULL, updated_at = now(), last_error = NULL,"
    " owner_token = owner_token + 1"
    " WHERE id IN (SELECT id FROM chats WHERE status = %(source)s"
    " AND heartbeat_at <= now() - make_interval(secs => %(secs)s) FOR UPDATE SKIP LOCKED)"
    " AND status = %(source)s AND heartbeat_at <= now() - make_interval(secs => %(secs)s)"
    " RETURNING id, created_at"
)
_SQL_INSERT_WORKSPACE = (
    f"INSERT INTO workspaces (id, owner_id, name) VALUES (%s, %s, %s) RETURNING {_WORKSPACE}"
)
_SQL_GET_WORKSPACE = f"SELECT {_WORKSPACE} FROM workspaces WHERE id = %s"
_SQL_INSERT_BUILD = (
    "INSERT INTO workspace_builds (id, workspace_id, build_number)"
    " SELECT %s, w.id, coalesce((SELECT max(build_number) FROM workspace_builds"
    " WHERE workspace_id = w.id), 0) + 1"
    f" FROM workspaces w WHERE w.id = %s RETURNING {_BUILD}"
)
_SQL_INSERT_AGENT = (
    "INSERT INTO workspace_agents (id, build_id, workspace_id, name, address, token, directory)"
    " SELECT %s, b.id, b.workspace_id, %s, %s, %s, %s FROM workspace_builds b WHERE b.id = %s"
    f" RETURNING {_AGENT}"
)
_SQL_LATEST_BUILD_AGENTS = (
    f"SELECT {_AGENT} FROM workspace_agents WHERE build_id = (SELECT id FROM workspace_builds"
    " WHERE workspace_id = %s ORDER BY build_number DESC LIMIT 1) ORDER BY seq"
)
_SQL_GET_AGENT = f"SELECT {_AGENT} FROM workspace_agents WHERE id = %s"
_SQL_UPDATE_BINDING = (
    "UPDATE chats SET workspace_id = %s, build_id = %s, agent_id = %s WHERE id = %s"
)
_SQL_CHILD_CHATS = f"SELECT {_CHAT} FROM chats WHERE parent_chat_id = %s ORDER BY created_at, id"
_SQL_CHAT_PARENT = "SELECT parent_chat_id FROM chats WHERE id = %s"

_SQL_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
)


# -- row decoding ---------------------------------------------------------------------


def _chat(r: DictRow) -> Chat:
    return Chat(
        id=r["id"],
        owner_id=r["owner_id"],
        title=r["title"],
        status=ChatStatus(r["status"]),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        worker_id=r["worker_id"],
        started_at=r["started_at"],
        heartbeat_at=r["heartbeat_at"],
        parent_chat_id=r["parent_chat_id"],
        root_chat_id=r["root_chat_id"],
        workspace_id=r["workspace_id"],
        build_id=r["build_id"],
        agent_id=r["agent_id"],
        last_error=r["last_error"],
        mcp_servers=tuple(r["mcp_servers"] or ()),
        owner_token=r["owner_token"],
        queued=r["queued"],
    )


def _message(r: DictRow) -> Message:
    usage = None
    if r["total_tokens"] is not None:
        usage = Usage(
            input_tokens=r["input_tokens"],
            output_tokens=r["output_tokens"],
            cache_read_tokens=r["cache_read_tokens"],
            cache_creation_tokens=r["cache_creation_tokens"],
            total_tokens=r["total_tokens"],
        )
    return Message(
        id=r["id"],
        chat_id=r["chat_id"],
        role=Role(r["role"]),
        parts=parts_from_json(r["content"], f"chat_messages[{r['id']}].content"),
        visibility=Visibility(r["visibility"]),
        usage=usage,
        context_limit=r["context_limit"],
        compressed=r["compressed"],
        deleted=r["deleted"],
        created_at=r["created_at"],
    )


def _queued(r: DictRow) -> QueuedMessage:
    return QueuedMessage(
        id=r["id"],
        chat_id=r["chat_id"],
        parts=parts_from_json(r["content"], f"chat_queued_messages[{r['id']}].content"),
        created_at=r["created_at"],
    )


def _workspace(r: DictRow) -> Workspace:
    return Workspace(r["id"], r["owner_id"], r["name"], r["created_at"])


def _build(r: DictRow) -> WorkspaceBuild:
    return WorkspaceBuild(r["id"], r["workspace_id"], r["build_number"], r["created_at"])


def _agent(r: DictRow) -> WorkspaceAgent:
    return WorkspaceAgent(
        r["id"],
        r["build_id"],
        r["workspace_id"],
        r["name"],
        r["address"],
        r["token"],
        r["directory"],
        r["created_at"],
    )


def _status(status: ChatStatus | None) -> str:
    assert status is not None, "bulk plans start from an existing status"
    return status.value


def load_migrations() -> list[tuple[str, str]]:
    """(version, SQL text) of every migration file, in version order."""
    root = importlib.resources.files("chatd_trio.store").joinpath("migrations")
    found = [(p.name, p.read_text("utf-8")) for p in root.iterdir() if p.name.endswith(".sql")]
    return sorted(found)


async def _apply_migrations(conn: _Conn, migrations: Sequence[tuple[str, str]], key: int) -> None:
    """Apply missing migrations in one transaction; the advisory lock serialises replicas."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        await conn.execute(_SQL_MIGRATIONS_TABLE)
        cur = await conn.execute("SELECT version FROM schema_migrations")
        done = {row["version"] for row in await cur.fetchall()}
        for version, text in migrations:
            if version in done:
                continue
            # No parameters: psycopg sends the file as one simple query (several statements).
            await conn.execute(text)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            logger.info("applied migration", extra={"migration": version})


class PostgresStore(StoreOps):
    """A `Store` on PostgreSQL through a psycopg async connection pool. Use `open`."""

    def __init__(
        self,
        pool: _Pool,
        bridge: Bridge,
        config: PostgresConfig,
        limits: LimitsConfig,
        database: str = "",
        round_trips: RoundTrips | None = None,
    ) -> None:
        self._database = database
        self._round_trips = round_trips
        self._pool = pool
        self._bridge = bridge
        self._config = config
        self._limits = limits
        self._counter = StatementCounter.new()
        self._in_use = 0
        self._max_in_use = 0

    # -- lifecycle ------------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = _DEFAULTS.min_size,
        max_size: int = _DEFAULTS.max_size,
        max_idle: float = _DEFAULTS.max_idle,
        max_lifetime: float = _DEFAULTS.max_lifetime,
        config: PostgresConfig | None = None,
        limits: LimitsConfig | None = None,
    ) -> AsyncIterator[PostgresStore]:
        """Apply migrations, open the pool, yield the store; close the pool on exit.

        The keyword pool sizes and recycling ages win over `config`, which supplies
        the timeouts. Raises StoreUnavailable when the database cannot be reached.
        """
        cfg = dataclasses.replace(
            config or _DEFAULTS,
            min_size=min_size,
            max_size=max_size,
            max_idle=max_idle,
            max_lifetime=max_lifetime,
        )
        migrations = await trio.to_thread.run_sync(load_migrations)
        failure: ChatdError | None = None
        trips = RoundTrips() if cfg.count_round_trips else None
        async with asyncio_bridge() as bridge:
            try:
                pool = await bridge.run(_open_pool, dsn, cfg, migrations, trips)
            except ChatdError as exc:
                # Raised after the bridge closes, so the caller sees the StoreError itself
                # rather than the bridge nursery's exception group.
                failure = exc
            else:
                store = cls(
                    pool, bridge, cfg, limits or LimitsConfig(), database_address(dsn), trips
                )
                try:
                    yield store
                finally:
                    with trio.move_on_after(cfg.close_timeout, shield=True):
                        await bridge.run(pool.close, cfg.close_timeout)
        if failure is not None:
            raise failure

    def pool_stats(self) -> dict[str, float]:
        """Pool size, connections in use and their high-water mark, recycling settings,
        and psycopg_pool's own counters."""
        stats: dict[str, float] = dict(self._pool.get_stats())
        stats.update(
            size=stats.get("pool_size", 0),
            available=stats.get("pool_available", 0),
            in_use=self._in_use,
            max_in_use=self._max_in_use,
            min_size=self._pool.min_size,
            max_size=self._pool.max_size,
            max_idle=self._pool.max_idle,
            max_lifetime=self._pool.max_lifetime,
            timeout=self._pool.timeout,
        )
        return stats

    def reset_pool_high_water(self) -> None:
        """Restart `pool_stats()["max_in_use"]` from the connections in use now (a
        benchmark's steady phase)."""
        self._max_in_use = self._in_use

    def statement_counts(self) -> dict[str, int]:
        """Executions per statement name since the store was opened."""
        return self._counter.snapshot()

    def round_trips(self) -> int | None:
        """Network round trips of the pool's connections since the store was opened
        (statements, BEGIN, COMMIT, pipelined batches: `chatd_trio._pgtrace`), or None
        unless `PostgresConfig.count_round_trips`."""
        return None if self._round_trips is None else self._round_trips.count

    def announces_to(self, pubsub: object) -> bool:
        """True for a `PostgresPubSub` on the same database (host, port, name)."""
        return isinstance(pubsub, PostgresPubSub) and pubsub.database == self._database

    # -- operation plumbing ---------------------------------------------------------
    async def _run(self, op: str, body: _Body[T], *, transaction: bool = False) -> T:
        """Run `body` as one asyncio coroutine on one pooled connection."""
        return await self._bridge.run(self._in_pool, op, body, transaction)

    async def _in_pool(self, op: str, body: _Body[T], transaction: bool) -> T:
        # Runs on the asyncio side: everything from borrow to return happens here.
        borrowed: _Conn | None = None
        try:
            async with self._pool.connection() as conn:
                borrowed = conn
                self._in_use += 1
                self._max_in_use = max(self._max_in_use, self._in_use)
                try:
                    if transaction:
                        async with conn.transaction():
                            return await body(conn)
                    return await body(conn)
                finally:
                    self._in_use -= 1
        except DecodeError as exc:
            raise StoreError(f"{op}: a stored row does not decode: {exc}") from exc
        except ChatdError:
            raise
        except psycopg.OperationalError as exc:
            lost = borrowed is not None and (borrowed.broken or borrowed.closed)
            logger.warning(
                "PostgreSQL unavailable",
                extra={"op": op, "error": str(exc), "connection_lost": lost},
            )
            if lost:
                # The server dropped this connection; its siblings are probably dead too
                # (restart, failover, terminate): replace them all.
                await self._pool.drain()
            raise StoreUnavailable(f"PostgreSQL unavailable during {op}: {exc}") from exc
        except psycopg.Error as exc:
            logger.warning("PostgreSQL statement failed", extra={"op": op, "error": str(exc)})
            raise StoreError(f"PostgreSQL error during {op}: {exc}") from exc

    async def _fetch(
        self, conn: _Conn, name: str, query: str, params: _Params = ()
    ) -> list[DictRow]:
        self._counter.hit(name)
        cur = await conn.execute(query, params)
        return await cur.fetchall()

    async def _fetchone(
        self, conn: _Conn, name: str, query: str, params: _Params = ()
    ) -> DictRow | None:
        rows = await self._fetch(conn, name, query, params)
        return rows[0] if rows else None

    async def _execute(self, conn: _Conn, name: str, query: str, params: _Params = ()) -> int:
        """Run a statement without result rows; the number of rows it touched."""
        self._counter.hit(name)
        cur = await conn.execute(query, params)
        return cur.rowcount

    async def _lock_chat(self, conn: _Conn, chat_id: uuid.UUID) -> Chat:
        row = await self._fetchone(conn, "LockChatForUpdate", _SQL_LOCK_CHAT, (chat_id,))
        if row is None:
            raise ChatNotFound(f"chat {chat_id} not found")
        return _chat(row)

    async def _insert_messages(
        self,
        conn: _Conn,
        chat_id: uuid.UUID,
        messages: Sequence[NewMessage],
        announce: Announcer | None = None,
        *,
        refresh: bool = False,
        stamp: int | None = None,
        op: uuid.UUID | None = None,
    ) -> list[Message]:
        inserted = await self._insert_rows(conn, chat_id, messages, stamp, op)
        if announce is not None:
            notifies = announce(inserted, refresh=refresh)
            if notifies:
                # Delivered at COMMIT, in commit order; discarded by a rollback.
                await self._execute(
                    conn,
                    "NotifyInTransaction",
                    _SQL_NOTIFY_MANY,
                    ([c for c, _ in notifies], [p for _, p in notifies]),
                )
        return inserted

    async def _insert_rows(
        self,
        conn: _Conn,
        chat_id: uuid.UUID,
        messages: Sequence[NewMessage],
        stamp: int | None,
        op: uuid.UUID | None,
    ) -> list[Message]:
        def usage(m: NewMessage, field: str) -> int | None:
            return getattr(m.usage, field) if m.usage is not None else None

        fields = (
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_creation_tokens",
            "total_tokens",
        )
        params: list[object] = [
            chat_id,
            stamp,
            op,
            [m.role.value for m in messages],
            [Jsonb(parts_to_json(m.parts)) for m in messages],
            [m.visibility.value for m in messages],
            *([usage(m, f) for m in messages] for f in fields),
            [m.context_limit for m in messages],
            [m.compressed for m in messages],
        ]
        rows = await self._fetch(conn, "InsertChatMessages", _SQL_INSERT_MESSAGES, params)
        rows = sorted(rows, key=lambda r: int(r["id"]))
        if not rows:
            return []
        prev: int = rows[0]["prev_visible_id"] or 0
        out: list[Message] = []
        for r in rows:
            m = _message(r)
            if m.user_visible:
                m = dataclasses.replace(m, prev_id=prev)
                prev = m.id
            out.append(m)
        return out

    async def _queue(self, conn: _Conn, chat_id: uuid.UUID) -> list[QueuedMessage]:
        rows = await self._fetch(conn, "GetQueuedMessages", _SQL_GET_QUEUED, (chat_id,))
        return [_queued(r) for r in rows]

    # -- chats and messages ---------------------------------------------------------
    async def _insert_chat(
        self,
        plan: Plan,
        owner_id: uuid.UUID,
        title: str,
        messages: Sequence[NewMessage],
        *,
        workspace_id: uuid.UUID | None,
        build_id: uuid.UUID | None,
        agent_id: uuid.UUID | None,
        parent_chat_id: uuid.UUID | None,
        mcp_servers: Sequence[str],
    ) -> tuple[Chat, Message]:
        check_title(title, self._limits)
        check_user_parts(messages[-1].parts, self._limits)

        async def body(conn: _Conn) -> tuple[Chat, Message]:
            root_chat_id: uuid.UUID | None = None
            if parent_chat_id is not None:
                row = await self._fetchone(conn, "GetChatByID", _SQL_GET_CHAT, (parent_chat_id,))
                if row is None:
                    raise ChatNotFound(f"chat {parent_chat_id} not found")
                root_chat_id = row["root_chat_id"] or row["id"]
            chat_row = await self._fetchone(
                conn,
                "InsertChat",
                _SQL_INSERT_CHAT,
                (
                    uuid.uuid4(),
                    owner_id,
                    title,
                    plan.target.value,
                    parent_chat_id,
                    root_chat_id,
                    workspace_id,
                    build_id,
                    agent_id,
                    list(mcp_servers),
                ),
            )
            assert chat_row is not None
            chat = _chat(chat_row)
            inserted = await self._insert_messages(conn, chat.id, messages)
            return chat, inserted[-1]

        return await self._run("create_chat", body, transaction=True)

    async def get_chat(self, chat_id: uuid.UUID) -> Chat:
        """Raises ChatNotFound."""

        async def body(conn: _Conn) -> Chat:
            row = await self._fetchone(conn, "GetChatByID", _SQL_GET_CHAT, (chat_id,))
            if row is None:
                raise ChatNotFound(f"chat {chat_id} not found")
            return _chat(row)

        return await self._run("get_chat", body)

    async def list_chats(self, owner_id: uuid.UUID) -> list[Chat]:
        """The owner's chats, newest first."""

        async def body(conn: _Conn) -> list[Chat]:
            rows = await self._fetch(conn, "GetChatsByOwner", _SQL_CHATS_BY_OWNER, (owner_id,))
            return [_chat(r) for r in rows]

        return await self._run("list_chats", body)

    async def messages_after(self, chat_id: uuid.UUID, after_id: int) -> list[Message]:
        """User-visible, non-deleted messages with id > after_id, in id order."""

        async def body(conn: _Conn) -> list[Message]:
            rows = await self._fetch(
                conn, "GetChatMessagesAfter", _SQL_MESSAGES_AFTER, (chat_id, after_id)
            )
            return [_message(r) for r in rows]

        return await self._run("messages_after", body)

    async def prompt_messages(self, chat_id: uuid.UUID) -> list[Message]:
        """Model-visible, non-deleted history after the compaction boundary (docs/spec.md §3.1)."""

        async def body(conn: _Conn) -> list[Message]:
            rows = await self._fetch(conn, "GetPromptMessages", _SQL_PROMPT_MESSAGES, (chat_id,))
            return [_message(r) for r in rows]

        return await self._run("prompt_messages", body)

    async def latest_assistant_text(self, chat_id: uuid.UUID) -> str | None:
        """The latest non-blank user-visible assistant text (a subagent's report)."""

        async def body(conn: _Conn) -> str | None:
            row = await self._fetchone(
                conn,
                "GetLatestAssistantText",
                _SQL_LATEST_ASSISTANT_TEXT,
                (chat_id, _PY_WHITESPACE),
            )
            return None if row is None else str(row["txt"])

        return await self._run("latest_assistant_text", body)

    # -- the queue ------------------------------------------------------------------
    async def list_queued(self, chat_id: uuid.UUID) -> list[QueuedMessage]:
        """The chat's queue, front first."""
        return await self._run("list_queued", lambda conn: self._queue(conn, chat_id))

    async def delete_queued(self, chat_id: uuid.UUID, queued_id: int) -> list[QueuedMessage]:
        """Delete one queued message; returns the remaining queue."""

        async def body(conn: _Conn) -> list[QueuedMessage]:
            row = await self._fetchone(
                conn, "DeleteQueuedMessage", _SQL_DELETE_QUEUED, (chat_id, queued_id)
            )
            if row is None:
                raise QueuedMessageNotFound(
                    f"queued message {queued_id} not found in chat {chat_id}"
                )
            return await self._queue(conn, chat_id)

        return await self._run("delete_queued", body, transaction=True)

    # -- the guarded write ----------------------------------------------------------
    async def apply(
        self,
        chat_id: uuid.UUID,
        plan: Plan,
        write: Write,
        *,
        announce: Announcer | None = None,
    ) -> Applied:
        """Execute `plan` in one transaction if its guard still holds under the row lock."""

        async def body(conn: _Conn) -> Applied:
            locked = await self._fetchone(conn, "LockChatForUpdate", _SQL_LOCK_CHAT, (chat_id,))
            if locked is None:
                raise ChatNotFound(f"chat {chat_id} not found")
            row = await self._fetchone(
                conn, "GetChatForWrite", _SQL_CHAT_FOR_WRITE, (write.op_id, chat_id)
            )
            assert row is not None, "the row is locked by this transaction"
            chat = _chat(row)
            if write.owner_id is not None and chat.owner_id != write.owner_id:
                raise PermissionDenied(f"chat {chat_id} does not belong to this user")
            if row["last_op_id"] == write.op_id or row["op_inserted"]:
                inserted: tuple[Message, ...] = ()
                if row["op_inserted"]:
                    rows = await self._fetch(
                        conn, "GetChatMessagesByOp", _SQL_MESSAGES_BY_OP, (chat_id, write.op_id)
                    )
                    inserted = tuple(_message(r) for r in rows)
                promoted = promoted_by(write, inserted)
                queue: tuple[QueuedMessage, ...] | None = None
                if promoted is not None:
                    queue = tuple(await self._queue(conn, chat_id))
                return Applied(
                    True, chat, inserted=inserted, promoted=promoted, queue=queue, replayed=True
                )
            if not plan.guard.holds(ChatView.of(chat)):
                return Applied(False, chat)
            return await self._execute_plan(conn, chat, plan, write, announce)

        # Named by the decided event, so a failure says which operation failed.
        return await self._run(plan.event.value, body, transaction=True)

    async def _execute_plan(
        self,
        conn: _Conn,
        chat: Chat,
        plan: Plan,
        write: Write,
        announce: Announcer | None,
    ) -> Applied:
        chat_id = chat.id
        replace = plan.has(Effect.REPLACE_FROM)
        if replace:
            found = await self._fetchone(
                conn, "GetChatMessageByID", _SQL_GET_MESSAGE, (write.edit_from,)
            )
            assert write.edit_from is not None
            check_edit_target(
                _message(found) if found is not None else None, chat_id, write.edit_from
            )
        chosen: QueuedMessage | None = None
        if plan.has(Effect.PROMOTE_CHOSEN) or plan.has(Effect.QUEUE_TO_FRONT):
            gone = await self._fetchone(
                conn, "DeleteQueuedMessage", _SQL_DELETE_QUEUED, (chat_id, write.queued_id)
            )
            if gone is None:
                raise QueuedMessageNotFound(
                    f"queued message {write.queued_id} not found in chat {chat_id}"
                )
            chosen = _queued(gone)
        new: list[NewMessage] = list(write.messages) if plan.has(Effect.INSERT) else []
        promoted_from: QueuedMessage | None = None
        if plan.has(Effect.PROMOTE_OLDEST):
            popped = await self._fetchone(conn, "PopQueuedMessage", _SQL_POP_QUEUED, (chat_id,))
            assert popped is not None, "the guard saw a non-empty queue under the lock"
            promoted_from = _queued(popped)
        elif plan.has(Effect.PROMOTE_CHOSEN):
            promoted_from = chosen
        if promoted_from is not None:
            new.append(user_message(promoted_from.parts))
        if replace:
            await self._execute(
                conn, "SoftDeleteMessagesFrom", _SQL_SOFT_DELETE_FROM, (chat_id, write.edit_from)
            )
        if plan.has(Effect.CLEAR_QUEUE):
            await self._execute(conn, "DeleteQueuedMessages", _SQL_CLEAR_QUEUE, (chat_id,))
            # The row read before holds the old length; a plan may leave the row unwritten.
            chat = dataclasses.replace(chat, queued=0)
        queued: QueuedMessage | None = None
        if plan.has(Effect.QUEUE_TO_FRONT):
            assert chosen is not None
            params = (
                chosen.id,
                chat_id,
                Jsonb(parts_to_json(chosen.parts)),
                chosen.created_at,
                chat_id,
            )
            await self._execute(conn, "InsertQueuedMessage", _SQL_PREPEND_QUEUED, params)
            queued = chosen
        if plan.has(Effect.ENQUEUE):
            row = await self._fetchone(
                conn,
                "InsertQueuedMessage",
                _SQL_APPEND_QUEUED,
                (chat_id, Jsonb(parts_to_json(write.parts)), chat_id),
            )
            assert row is not None
            queued = _queued(row)
        inserted: list[Message] = []
        if new:
            inserted = await self._insert_messages(
                conn, chat_id, new, announce, refresh=replace, stamp=write.stamp, op=write.op_id
            )
        if plan.changes_row or write.binding is not None:
            chat = await self._update_chat(conn, chat, plan, write)
        touched_queue = bool(
            plan.effects
            & {Effect.ENQUEUE, Effect.QUEUE_TO_FRONT, Effect.PROMOTE_OLDEST, Effect.PROMOTE_CHOSEN}
        )
        queue: tuple[QueuedMessage, ...] | None = None
        if touched_queue:
            queue = tuple(await self._queue(conn, chat_id))
            chat = dataclasses.replace(chat, queued=len(queue))
        return Applied(
            True,
            chat,
            inserted=tuple(inserted),
            promoted=inserted[-1] if promoted_from is not None else None,
            queued=queued,
            queue=queue,
        )

    async def _update_chat(self, conn: _Conn, chat: Chat, plan: Plan, write: Write) -> Chat:
        """Write what `plan` says of the row: status, owner, token, heartbeat, error."""
        sets = ["status = %(target)s", "last_op_id = %(op)s"]
        params: dict[str, object] = {"target": plan.target.value, "op": write.op_id}
        if plan.owned_after:
            if plan.has(Effect.CLAIM):
                sets += ["worker_id = %(worker)s", "started_at = now()", "heartbeat_at = now()"]
                params["worker"] = write.worker_id
            elif plan.has(Effect.BEAT):
                sets.append("heartbeat_at = now()")
        else:
            sets += ["worker_id = NULL", "started_at = NULL", "heartbeat_at = NULL"]
        if plan.has(Effect.NEW_TOKEN):
            sets.append("owner_token = owner_token + 1")
        if plan.has(Effect.SET_ERROR):
            sets.append("last_error = %(error)s")
            params["error"] = plan.last_error
        elif plan.target is not chat.status:
            sets.append("last_error = NULL")
        if plan.target is not chat.status or plan.has(Effect.CLAIM):
            sets.append("updated_at = now()")
        if write.binding is not None:
            sets += ["workspace_id = %(ws)s", "build_id = %(build)s", "agent_id = %(agent)s"]
            params.update(
                ws=write.binding.workspace_id,
                build=write.binding.build_id,
                agent=write.binding.agent_id,
            )
        params["id"] = chat.id
        query = f"UPDATE chats SET {', '.join(sets)} WHERE id = %(id)s RETURNING {_CHAT}"
        row = await self._fetchone(conn, "UpdateChat", query, params)
        assert row is not None, "the row is locked by this transaction"
        return _chat(row)

    # -- bulk ownership -------------------------------------------------------------
    async def _claim(self, plan: Plan, worker_id: uuid.UUID, limit: int) -> list[Chat]:
        if limit < 1:
            await trio.lowlevel.checkpoint()
            return []
        params = {
            "target": plan.target.value,
            "source": _status(plan.guard.status),
            "worker": worker_id,
            "limit": limit,
        }

        async def body(conn: _Conn) -> list[Chat]:
            rows = await self._fetch(conn, "AcquireChats", _SQL_ACQUIRE, params)
            rows.sort(key=lambda r: (r["pending_since"], r["id"]))
            return [_chat(r) for r in rows]

        return await self._run("acquire", body)

    async def _release(self, plan: Plan, leases: Sequence[Lease]) -> int:
        if not leases:
            await trio.lowlevel.checkpoint()
            return 0
        params = {
            "target": plan.target.value,
            "source": _status(plan.guard.status),
            "ids": [lease.chat_id for lease in leases],
            "tokens": [lease.token for lease in leases],
        }

        async def body(conn: _Conn) -> int:
            return await self._execute(conn, "ReleaseChats", _SQL_RELEASE, params)

        return await self._run("release", body)

    async def _recover(self, plan: Plan, stale_after: float) -> list[uuid.UUID]:
        params = {
            "target": plan.target.value,
            "source": _status(plan.guard.status),
            "secs": stale_after,
        }

        async def body(conn: _Conn) -> list[uuid.UUID]:
            rows = await self._fetch(conn, "RecoverStaleChats", _SQL_RECOVER_STALE, params)
            rows.sort(key=lambda r: (r["created_at"], r["id"]))
            return [r["id"] for r in rows]

        return await self._run("recover_stale", body)

    async def _set_binding(self, chat_id: uuid.UUID, binding: Binding) -> None:
        async def body(conn: _Conn) -> None:
            n = await self._execute(
                conn,
                "UpdateChatBinding",
                _SQL_UPDATE_BINDING,
                (binding.workspace_id, binding.build_id, binding.agent_id, chat_id),
            )
            if n == 0:
                raise ChatNotFound(f"chat {chat_id} not found")

        await self._run("update_binding", body)

    # -- workspaces -----------------------------------------------------------------
    async def create_workspace(self, owner_id: uuid.UUID, name: str) -> Workspace:
        """Insert a workspace (no builds yet)."""

        async def body(conn: _Conn) -> Workspace:
            row = await self._fetchone(
                conn, "InsertWorkspace", _SQL_INSERT_WORKSPACE, (uuid.uuid4(), owner_id, name)
            )
            assert row is not None
            return _workspace(row)

        return await self._run("create_workspace", body)

    async def get_workspace(self, workspace_id: uuid.UUID) -> Workspace | None:
        """The workspace, or None."""

        async def body(conn: _Conn) -> Workspace | None:
            row = await self._fetchone(
                conn, "GetWorkspaceByID", _SQL_GET_WORKSPACE, (workspace_id,)
            )
            return None if row is None else _workspace(row)

        return await self._run("get_workspace", body)

    async def create_build(self, workspace_id: uuid.UUID) -> WorkspaceBuild:
        """A new latest build (no agents yet: the workspace looks stopped)."""

        async def body(conn: _Conn) -> WorkspaceBuild:
            row = await self._fetchone(
                conn, "InsertWorkspaceBuild", _SQL_INSERT_BUILD, (uuid.uuid4(), workspace_id)
            )
            if row is None:
                raise WorkspaceNotFound(f"workspace {workspace_id} not found")
            return _build(row)

        return await self._run("create_build", body)

    async def create_agent(
        self, build_id: uuid.UUID, name: str, address: str, token: str, directory: str = ""
    ) -> WorkspaceAgent:
        """Insert an agent into a build."""

        async def body(conn: _Conn) -> WorkspaceAgent:
            row = await self._fetchone(
                conn,
                "InsertWorkspaceAgent",
                _SQL_INSERT_AGENT,
                (uuid.uuid4(), name, address, token, directory, build_id),
            )
            if row is None:
                raise BuildNotFound(f"build {build_id} not found")
            return _agent(row)

        return await self._run("create_agent", body)

    async def latest_build_agents(self, workspace_id: uuid.UUID) -> list[WorkspaceAgent]:
        """Agents of the workspace's latest build, oldest first."""

        async def body(conn: _Conn) -> list[WorkspaceAgent]:
            rows = await self._fetch(
                conn, "GetWorkspaceAgentsInLatestBuild", _SQL_LATEST_BUILD_AGENTS, (workspace_id,)
            )
            return [_agent(r) for r in rows]

        return await self._run("latest_build_agents", body)

    async def agent_by_id(self, agent_id: uuid.UUID) -> WorkspaceAgent | None:
        """The agent, or None."""

        async def body(conn: _Conn) -> WorkspaceAgent | None:
            row = await self._fetchone(conn, "GetWorkspaceAgentByID", _SQL_GET_AGENT, (agent_id,))
            return None if row is None else _agent(row)

        return await self._run("agent_by_id", body)

    # -- subagents ------------------------------------------------------------------
    async def child_chats(self, parent_chat_id: uuid.UUID) -> list[Chat]:
        """Children of a chat, oldest first."""

        async def body(conn: _Conn) -> list[Chat]:
            rows = await self._fetch(conn, "GetChildChats", _SQL_CHILD_CHATS, (parent_chat_id,))
            return [_chat(r) for r in rows]

        return await self._run("child_chats", body)

    async def parent_of(self, chat_id: uuid.UUID) -> uuid.UUID | None:
        """The chat's parent id; ChatNotFound when the row is missing."""

        async def body(conn: _Conn) -> uuid.UUID | None:
            row = await self._fetchone(conn, "GetChatParent", _SQL_CHAT_PARENT, (chat_id,))
            if row is None:
                raise ChatNotFound(f"chat {chat_id} not found")
            parent: uuid.UUID | None = row["parent_chat_id"]
            return parent

        return await self._run("parent_of", body)


async def _open_pool(
    dsn: str,
    cfg: PostgresConfig,
    migrations: Sequence[tuple[str, str]],
    trips: RoundTrips | None = None,
) -> _Pool:
    """asyncio side of `PostgresStore.open`: migrate on a direct connection, open the pool.

    The direct connection fails fast on a refused or unreachable server, where the
    pool would keep retrying until its timeout.
    """
    where = database_address(dsn)
    connect_kwargs: dict[str, Any] = {
        "connect_timeout": cfg.connect_timeout,
        "application_name": cfg.application_name,
    }
    try:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, row_factory=dict_row, **connect_kwargs
        )
        async with conn:
            await _apply_migrations(conn, migrations, cfg.migration_lock_key)
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"cannot reach PostgreSQL at {where}: {exc}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"migrating PostgreSQL at {where} failed: {exc}") from exc

    connection_class: type[_Conn] = psycopg.AsyncConnection[DictRow]
    if trips is not None:
        connection_class = counting_connection_class(trips)
    pool: _Pool = AsyncConnectionPool(
        dsn,
        connection_class=connection_class,
        kwargs={"autocommit": True, "row_factory": dict_row, **connect_kwargs},
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        max_idle=cfg.max_idle,
        max_lifetime=cfg.max_lifetime,
        timeout=cfg.pool_timeout,
        name=cfg.application_name,
        open=False,
    )
    try:
        await pool.open(wait=True, timeout=cfg.open_timeout)
    except BaseException as exc:
        await pool.close()
        if isinstance(exc, psycopg.OperationalError):
            raise StoreUnavailable(f"cannot open a pool to PostgreSQL at {where}: {exc}") from exc
        raise
    return pool
