"""The PostgreSQL Store: the production store and the coordination engine between replicas.

psycopg's async API runs natively on Trio (`chatd_trio._pgtrio`: its socket
waits are Trio's). Each store operation runs in the calling task: it borrows a
pooled connection, runs its statements (inside one transaction when there are
several) and returns the connection before it ends. A task cancelled mid-exchange
closes its connection (the server rolls the transaction back) and the pool never
lends a connection that is not idle, so no connection is held between operations
or reused mid-transaction (docs/architecture.md).

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

import contextlib
import dataclasses
import importlib.resources
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias, TypeVar

import psycopg
import trio
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb

from chatd_trio._pg import database_address
from chatd_trio._pgtrace import RoundTrips, traced_class
from chatd_trio._pgtrio import AnswerWait, PoolSettings, TrioConnection, TrioPool, connect
from chatd_trio.config import LimitsConfig, PostgresConfig, RequestOptions
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
    optional_uuid,
    parse_row_id,
    parse_uuid,
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
from chatd_trio.pubsub.base import DatabaseChannels
from chatd_trio.storable import storable_texts
from chatd_trio.store.base import (
    Announcer,
    Applied,
    Binding,
    Lease,
    PromptCache,
    StatementCounter,
    Write,
    check_edit_target,
    pipelined,
    promoted_by,
    prompt_tail_plan,
)
from chatd_trio.store.ops import StoreOps, user_message

__all__ = ["PostgresStore", "load_migrations"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Conn: TypeAlias = TrioConnection
_Pool: TypeAlias = TrioPool[TrioConnection]
_Body: TypeAlias = Callable[[_Conn], Awaitable[T]]
_Params: TypeAlias = Sequence[object] | Mapping[str, object]
_Cursor: TypeAlias = psycopg.AsyncCursor[DictRow]

_IN_TRANSACTION = frozenset({TransactionStatus.INTRANS, TransactionStatus.INERROR})

_DEFAULTS = PostgresConfig()


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
    "model_options",
)
# A chat as reads return it: the row plus its queue's length.
_QUEUED_COUNT = "(SELECT count(*) FROM chat_queued_messages q WHERE q.chat_id = {t}.id)"
_CHAT = ", ".join(_CHAT_COLUMNS) + ", " + _QUEUED_COUNT.format(t="chats") + " AS queued"
_CHAT_C = ", ".join(f"c.{col}" for col in _CHAT_COLUMNS) + ", " + _QUEUED_COUNT.format(t="c")
_CHAT_C += " AS queued"
_MSG = (
    "id, chat_id, role, content, visibility, input_tokens, output_tokens, cache_read_tokens,"
    " cache_creation_tokens, total_tokens, reasoning_tokens, context_limit, compressed, deleted,"
    " created_at"
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
# The read also decides, in SQL, what the caller re-decides in Python on the same row:
# when the guard holds (the owner matches, the write has not landed before, and the
# row has the status, token and queue length the plan rests on) it sets the
# transaction-local mark `chatd.apply` that every effect statement of the write is
# gated on. So the effects can be sent with the read, in one batch, without waiting
# for its answer: when the guard does not hold they change nothing.
_APPLY_MARK = "chatd.apply"
_GATE = f"current_setting('{_APPLY_MARK}', true) = %(mark)s::text"
_SQL_CHAT_FOR_WRITE = (
    f"SELECT r.*, set_config('{_APPLY_MARK}', CASE WHEN"
    " (%(owner)s::uuid IS NULL OR r.owner_id = %(owner)s::uuid)"
    " AND r.last_op_id IS DISTINCT FROM %(op)s::uuid AND NOT r.op_inserted"
    " AND r.status = %(status)s::text"
    " AND (%(token)s::bigint IS NULL OR r.owner_token = %(token)s::bigint)"
    " AND (%(queued)s::bigint IS NULL OR r.queued = %(queued)s::bigint)"
    " THEN %(mark)s::text ELSE '' END, true) = %(mark)s::text AS marked"
    f" FROM (SELECT {_CHAT}, last_op_id,"
    " EXISTS (SELECT 1 FROM chat_messages m WHERE m.op_id = %(op)s::uuid"
    " AND m.chat_id = chats.id) AS op_inserted"
    # OFFSET 0 keeps the row a subquery: set_config runs once, on the row as read.
    " FROM chats WHERE id = %(id)s OFFSET 0) AS r"
)
_SQL_CHATS_BY_OWNER = (
    f"SELECT {_CHAT} FROM chats WHERE owner_id = %s ORDER BY created_at DESC, id DESC"
)
_SQL_INSERT_CHAT = (
    "INSERT INTO chats (id, owner_id, title, status, parent_chat_id, root_chat_id,"
    " workspace_id, build_id, agent_id, mcp_servers, model_options)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::text[], %s)"
    f" RETURNING {_CHAT}"
)
# Array order is evaluation order: the notifies go out (at commit) in message order.
_SQL_NOTIFY_MANY = "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS t(c, p)"
# One statement for any number of messages; ORDER BY ordinality assigns ids in input order.
# `{gate}`: empty, or the guarded write's mark (see _SQL_CHAT_FOR_WRITE).
_SQL_INSERT_MESSAGES_TEMPLATE = (
    "INSERT INTO chat_messages (chat_id, role, content, visibility, input_tokens,"
    " output_tokens, cache_read_tokens, cache_creation_tokens, total_tokens, reasoning_tokens,"
    " context_limit, compressed, owner_token, op_id)"
    " SELECT %(chat)s, m.role, m.content, m.visibility, m.input_tokens, m.output_tokens,"
    " m.cache_read_tokens, m.cache_creation_tokens, m.total_tokens, m.reasoning_tokens,"
    " m.context_limit,"
    " m.compressed, %(stamp)s, %(op)s"
    " FROM unnest(%(roles)s::text[], %(contents)s::jsonb[], %(visibilities)s::text[],"
    " %(input_tokens)s::bigint[], %(output_tokens)s::bigint[], %(cache_read_tokens)s::bigint[],"
    " %(cache_creation_tokens)s::bigint[], %(total_tokens)s::bigint[],"
    " %(reasoning_tokens)s::bigint[],"
    " %(context_limits)s::bigint[], %(compressed)s::boolean[])"
    " WITH ORDINALITY AS m(role, content, visibility, input_tokens, output_tokens,"
    " cache_read_tokens, cache_creation_tokens, total_tokens, reasoning_tokens, context_limit,"
    " compressed, ord)"
    "{gate}"
    f" ORDER BY m.ord RETURNING {_MSG},"
    # The statement's snapshot excludes its own rows: this is the chat's latest visible
    # message before the insert (the chat row is locked, so nothing else inserts).
    " (SELECT max(p.id) FROM chat_messages p WHERE p.chat_id = chat_messages.chat_id"
    " AND NOT p.deleted AND p.visibility IN ('user', 'both')) AS prev_visible_id,"
    # And its latest model-visible one: the prompt cache extends only from there.
    " (SELECT max(p.id) FROM chat_messages p WHERE p.chat_id = chat_messages.chat_id"
    " AND NOT p.deleted AND p.visibility IN ('model', 'both')) AS prev_model_id"
)
_SQL_INSERT_MESSAGES = _SQL_INSERT_MESSAGES_TEMPLATE.format(gate="")
_SQL_INSERT_MESSAGES_GATED = _SQL_INSERT_MESSAGES_TEMPLATE.format(gate=f" WHERE {_GATE}")
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
# only uncompressed system messages survive (docs/spec.md §3.1). For any number of chats.
_SQL_PROMPT_MESSAGES = (
    f"WITH visible AS (SELECT {_MSG} FROM chat_messages WHERE chat_id = ANY(%s::uuid[])"
    " AND NOT deleted AND visibility IN ('model', 'both')),"
    " boundary AS (SELECT chat_id, max(id) AS id FROM visible WHERE compressed"
    " AND role = 'user' GROUP BY chat_id)"
    f" SELECT {', '.join('v.' + c.strip() for c in _MSG.split(','))}"
    " FROM visible v LEFT JOIN boundary b ON b.chat_id = v.chat_id"
    " WHERE b.id IS NULL OR v.id >= b.id OR (v.role = 'system' AND NOT v.compressed)"
    " ORDER BY v.chat_id, v.id"
)
# The chats the acquisition in this transaction claimed (see _SQL_ACQUIRE), each with
# the id of the last message a run wrote (`stamped`), the last model-visible message up
# to it (`anchor`, what a cached prompt must end with), and the model-visible messages
# after it (one row each; none: one row of NULLs), which the API wrote: the user's.
_CLAIMED = "chatd.claimed"
_SQL_PROMPT_TAILS = (
    "SELECT k.id AS tail_of, k.anchor,"
    f" {', '.join('m.' + c.strip() for c in _MSG.split(','))}"
    " FROM (SELECT s.id, s.stamped, (SELECT coalesce(max(a.id), 0) FROM chat_messages a"
    " WHERE a.chat_id = s.id AND a.id <= s.stamped AND NOT a.deleted"
    " AND a.visibility IN ('model', 'both')) AS anchor"
    " FROM (SELECT i.id, (SELECT coalesce(max(x.id), 0) FROM chat_messages x"
    " WHERE x.chat_id = i.id AND x.owner_token IS NOT NULL) AS stamped"
    f" FROM unnest(string_to_array(current_setting('{_CLAIMED}', true), ',')::uuid[])"
    " AS i(id)) AS s) AS k"
    " LEFT JOIN chat_messages m ON m.chat_id = k.id AND m.id > k.stamped AND NOT m.deleted"
    " AND m.visibility IN ('model', 'both')"
    " ORDER BY k.id, m.id"
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
    " SELECT %(chat)s, %(content)s, s.next FROM (SELECT coalesce(max(position), 0) + 1 AS next"
    f" FROM chat_queued_messages WHERE chat_id = %(chat)s) AS s WHERE {_GATE}"
    f" RETURNING {_QUEUED}"
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
_SQL_DELETE_QUEUED_OWNED = (
    "DELETE FROM chat_queued_messages q WHERE q.chat_id = %(chat)s AND q.id = %(id)s"
    " AND (%(owner)s::uuid IS NULL OR EXISTS (SELECT 1 FROM chats c WHERE c.id = q.chat_id"
    f" AND c.owner_id = %(owner)s::uuid)) RETURNING {_QUEUED}"
)
_SQL_CLEAR_QUEUE = "DELETE FROM chat_queued_messages WHERE chat_id = %s"
_SQL_POP_QUEUED = (
    "DELETE FROM chat_queued_messages WHERE id = (SELECT id FROM chat_queued_messages"
    f" WHERE chat_id = %s ORDER BY position, id LIMIT 1) RETURNING {_QUEUED}"
)
# The bulk ownership statements execute a lifecycle plan: its source and target status,
# and a new ownership token for every row they change.
# It also names the claimed chats in the transaction-local `chatd.claimed`, for the
# prompt read sent with it (_SQL_PROMPT_TAILS).
_SQL_ACQUIRE = (
    "WITH claimed AS (UPDATE chats AS c SET status = %(target)s, worker_id = %(worker)s,"
    " started_at = now(), heartbeat_at = now(), updated_at = now(), last_error = NULL,"
    " owner_token = c.owner_token + 1"
    " FROM (SELECT id, updated_at FROM chats WHERE status = %(source)s"
    " ORDER BY updated_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) AS p"
    f" WHERE c.id = p.id RETURNING {_CHAT_C}, p.updated_at AS pending_since)"
    f" SELECT k.*, set_config('{_CLAIMED}',"
    " (SELECT string_agg(id::text, ',') FROM claimed), true) AS claimed_ids FROM claimed k"
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
    f" RETURNING {_CHAT}"
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
        model_options=(
            None if r["model_options"] is None else RequestOptions.from_json(r["model_options"])
        ),
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
            reasoning_tokens=r["reasoning_tokens"] or 0,
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


def _insert_params(
    chat_id: uuid.UUID,
    messages: Sequence[NewMessage],
    stamp: int | None,
    op: uuid.UUID | None,
    mark: str | None = None,
) -> dict[str, object]:
    """Parameters of `_SQL_INSERT_MESSAGES` (with `mark`: of its gated form)."""

    def usage(field: str) -> list[int | None]:
        return [getattr(m.usage, field) if m.usage is not None else None for m in messages]

    params: dict[str, object] = {
        "chat": chat_id,
        "stamp": stamp,
        "op": op,
        "roles": [m.role.value for m in messages],
        "contents": [Jsonb(parts_to_json(m.parts)) for m in messages],
        "visibilities": [m.visibility.value for m in messages],
        "input_tokens": usage("input_tokens"),
        "output_tokens": usage("output_tokens"),
        "cache_read_tokens": usage("cache_read_tokens"),
        "cache_creation_tokens": usage("cache_creation_tokens"),
        "total_tokens": usage("total_tokens"),
        "reasoning_tokens": usage("reasoning_tokens"),
        "context_limits": [m.context_limit for m in messages],
        "compressed": [m.compressed for m in messages],
    }
    if mark is not None:
        params["mark"] = mark
    return params


def _inserted(rows: Sequence[DictRow]) -> list[Message]:
    """The inserted messages in id order, each user-visible one with its predecessor."""
    ordered = sorted(rows, key=lambda r: int(r["id"]))
    if not ordered:
        return []
    prev: int = ordered[0]["prev_visible_id"] or 0
    out: list[Message] = []
    for r in ordered:
        m = _message(r)
        if m.user_visible:
            m = dataclasses.replace(m, prev_id=prev)
            prev = m.id
        out.append(m)
    return out


def _by_chat(rows: Sequence[DictRow]) -> dict[uuid.UUID, list[Message]]:
    out: dict[uuid.UUID, list[Message]] = {}
    for r in rows:
        out.setdefault(r["chat_id"], []).append(_message(r))
    return out


def _prev_model(rows: Sequence[DictRow]) -> int:
    """The chat's last model-visible message before an insert (its rows)."""
    first = min(rows, key=lambda r: int(r["id"]), default=None)
    return int(first["prev_model_id"] or 0) if first is not None else 0


def _notify_params(notifies: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [c for c, _ in notifies], [p for _, p in notifies]


def _guard_params(chat_id: uuid.UUID, plan: Plan, write: Write, mark: str) -> dict[str, object]:
    """Parameters of `_SQL_CHAT_FOR_WRITE`: the guard the mark is set under."""
    return {
        "id": chat_id,
        "owner": write.owner_id,
        "op": write.op_id,
        "status": _status(plan.guard.status),
        "token": plan.guard.token,
        "queued": plan.guard.queued,
        "mark": mark,
    }


def _update_chat_sql(
    plan: Plan, write: Write, chat_id: uuid.UUID, mark: str
) -> tuple[str, dict[str, object]]:
    """The row part of a decided write (status, owner, token, heartbeat, error, binding),
    gated on the write's mark. The row's status before is the guard's (it held)."""
    before = plan.guard.status
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
    elif plan.target is not before:
        sets.append("last_error = NULL")
    if plan.target is not before or plan.has(Effect.CLAIM):
        sets.append("updated_at = now()")
    if write.binding is not None:
        sets += ["workspace_id = %(ws)s", "build_id = %(build)s", "agent_id = %(agent)s"]
        params.update(
            ws=write.binding.workspace_id,
            build=write.binding.build_id,
            agent=write.binding.agent_id,
        )
    params.update(id=chat_id, mark=mark)
    query = f"UPDATE chats SET {', '.join(sets)} WHERE id = %(id)s AND {_GATE} RETURNING {_CHAT}"
    return query, params


def _announce_each(announce: Announcer, plan: Plan, chats: Sequence[Chat]) -> list[tuple[str, str]]:
    """The notifies of a bulk change, chat by chat."""
    return [n for chat in chats for n in announce.changes(plan.event, Applied(True, chat))]


def _announced(announce: Announcer, plan: Plan, applied: Applied) -> list[tuple[str, str]]:
    """What a write that landed announces: its messages, then the change itself."""
    refresh = plan.has(Effect.REPLACE_FROM)
    notifies = list(announce(applied.inserted, refresh=refresh)) if applied.inserted else []
    notifies += announce.changes(plan.event, applied)
    return notifies


class _Batch:
    """A transaction sent through a pipeline (see `_batched`)."""

    def __init__(self, conn: _Conn, pipeline: psycopg.AsyncPipeline) -> None:
        self._conn = conn
        self._pipeline = pipeline
        self.ended = False

    async def sync(self) -> None:
        """Send what is queued and wait for its results: one round trip."""
        await self._pipeline.sync()

    async def commit(self) -> None:
        """Queue the COMMIT: it goes out with the last batch (the pipeline's exit)."""
        await self._conn.execute("COMMIT")
        self.ended = True

    async def rollback(self) -> None:
        """Queue a ROLLBACK instead (nothing changed, or nothing may)."""
        await self._conn.execute("ROLLBACK")
        self.ended = True


@asynccontextmanager
async def _batched(conn: _Conn) -> AsyncIterator[_Batch]:
    """BEGIN, the block's statements and COMMIT through one pipeline.

    Statements are queued, not sent: a batch goes out at `sync()` (the block then
    reads its results) and the last one, with the COMMIT, when the pipeline closes.
    The block ends with `commit()` or `rollback()`, or COMMIT is queued after it; an
    exception queues a ROLLBACK, and a last batch that fails is rolled back here.
    Each batch is one round trip; psycopg's `transaction()` would sync at its start
    and end, three round trips more.
    """
    try:
        async with conn.pipeline() as pipeline:
            await conn.execute("BEGIN")
            batch = _Batch(conn, pipeline)
            try:
                yield batch
            except Exception:
                if not batch.ended:
                    await conn.execute("ROLLBACK")
                raise
            if not batch.ended:
                await conn.execute("COMMIT")
    except BaseException:
        if not conn.closed and conn.info.transaction_status in _IN_TRANSACTION:
            with contextlib.suppress(psycopg.Error):
                await conn.execute("ROLLBACK")
        raise


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
        config: PostgresConfig,
        limits: LimitsConfig,
        database: str = "",
        round_trips: RoundTrips | None = None,
    ) -> None:
        self._database = database
        self._round_trips = round_trips
        self._pool = pool
        self._config = config
        self._limits = limits
        self._counter = StatementCounter.new()
        self._prompts = PromptCache(config.prompt_cache_chats)

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
        the timeouts. Raises StoreUnavailable when the database cannot be reached; an
        exception of the block leaves as itself (as with the memory store).
        """
        cfg = dataclasses.replace(
            config or _DEFAULTS,
            min_size=min_size,
            max_size=max_size,
            max_idle=max_idle,
            max_lifetime=max_lifetime,
        )
        migrations = await trio.to_thread.run_sync(load_migrations)
        trips = RoundTrips() if cfg.count_round_trips else None
        pool = await _open_pool(dsn, cfg, migrations, trips)
        try:
            yield cls(pool, cfg, limits or LimitsConfig(), database_address(dsn), trips)
        finally:
            pool.close()

    def pool_stats(self) -> dict[str, float]:
        """Pool size, connections in use and their high-water mark, recycling settings,
        and the pool's own counters (`chatd_trio._pgtrio.TrioPool.get_stats`)."""
        settings = self._pool.settings
        lending = self._pool.lending
        stats: dict[str, float] = dict(self._pool.get_stats())
        stats.update(
            size=stats.get("pool_size", 0),
            available=stats.get("pool_available", 0),
            in_use=lending.now,
            max_in_use=lending.high,
            mean_in_use=lending.mean(),
            p99_in_use=lending.quantile(0.99),
            share_at_half_or_more=lending.share_at_least((settings.max_size + 1) // 2),
            min_size=settings.min_size,
            max_size=settings.max_size,
            max_idle=settings.max_idle,
            answer_wait=self._pool.answers.budget,
            answers_in_time=self._pool.answers.answered,
            answers_parked=self._pool.answers.parked,
            answers_unwaited=self._pool.answers.skipped,
            max_lifetime=settings.max_lifetime,
            timeout=settings.timeout,
        )
        return stats

    def reset_pool_high_water(self) -> None:
        """Restart `pool_stats()["max_in_use"]` and `["mean_in_use"]` from the connections
        in use now (a benchmark's steady phase)."""
        self._pool.lending.reset()

    def statement_counts(self) -> dict[str, int]:
        """Executions per statement name since the store was opened."""
        return self._counter.snapshot()

    def round_trips(self) -> int | None:
        """Network round trips of the pool's connections since the store was opened
        (statements, BEGIN, COMMIT, pipelined batches: `chatd_trio._pgtrace`), or None
        unless `PostgresConfig.count_round_trips`."""
        return None if self._round_trips is None else self._round_trips.count

    def announces_to(self, pubsub: object) -> bool:
        """True for a pubsub whose channels are on this store's database (host, port, name):
        a `PostgresPubSub` on the same database (`DatabaseChannels`)."""
        return isinstance(pubsub, DatabaseChannels) and pubsub.database == self._database

    # -- operation plumbing ---------------------------------------------------------
    async def _run(
        self, op: str, body: _Body[T], *, transaction: bool = False, writes: bool = True
    ) -> T:
        """Run `body` on one pooled connection, from borrow to return in this task; an
        operation that `writes` borrows within the pool's write slots."""
        # A store operation is a checkpoint, as every Trio operation is: an answer read
        # within the answer wait would otherwise let it finish without ever letting a
        # cancellation or another task in. Taken before the borrow, so no connection
        # waits through the scheduling round.
        await trio.lowlevel.checkpoint()
        borrowed: _Conn | None = None
        try:
            async with self._pool.connection(writing=writes) as conn:
                borrowed = conn
                if transaction:
                    async with conn.transaction():
                        return await body(conn)
                return await body(conn)
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
                self._pool.drain()
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
        rows = await self._fetch(
            conn,
            "InsertChatMessages",
            _SQL_INSERT_MESSAGES,
            _insert_params(chat_id, messages, stamp, op),
        )
        inserted = _inserted(rows)
        if announce is not None:
            await self._notify(conn, announce(inserted, refresh=refresh))
        return inserted

    async def _fetch_chat(self, conn: _Conn, chat_id: uuid.UUID) -> Chat:
        row = await self._fetchone(conn, "GetChatByID", _SQL_GET_CHAT, (chat_id,))
        if row is None:
            raise ChatNotFound(f"chat {chat_id} not found")
        return _chat(row)

    async def _notify(self, conn: _Conn, notifies: Sequence[tuple[str, str]]) -> None:
        """pg_notify each (channel, payload), in order: delivered at COMMIT, in commit
        order, and discarded by a rollback."""
        if notifies:
            await self._execute(
                conn, "NotifyInTransaction", _SQL_NOTIFY_MANY, _notify_params(notifies)
            )

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
        model_options: RequestOptions | None,
        announce: Announcer | None,
    ) -> tuple[Chat, Message]:

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
                    None if model_options is None else Jsonb(model_options.to_json()),
                ),
            )
            assert chat_row is not None
            chat = _chat(chat_row)
            inserted = await self._insert_messages(conn, chat.id, messages)
            if announce is not None:
                await self._notify(conn, announce.changes(plan.event, Applied(True, chat)))
            return chat, inserted[-1]

        return await self._run("create_chat", body, transaction=True)

    async def get_chat(self, chat_id: uuid.UUID) -> Chat:
        """Raises ChatNotFound."""
        chat_id = parse_uuid(chat_id, "chat_id")

        async def body(conn: _Conn) -> Chat:
            row = await self._fetchone(conn, "GetChatByID", _SQL_GET_CHAT, (chat_id,))
            if row is None:
                raise ChatNotFound(f"chat {chat_id} not found")
            return _chat(row)

        return await self._run("get_chat", body, writes=False)

    async def list_chats(self, owner_id: uuid.UUID) -> list[Chat]:
        """The owner's chats, newest first."""
        owner_id = parse_uuid(owner_id, "owner_id")

        async def body(conn: _Conn) -> list[Chat]:
            rows = await self._fetch(conn, "GetChatsByOwner", _SQL_CHATS_BY_OWNER, (owner_id,))
            return [_chat(r) for r in rows]

        return await self._run("list_chats", body, writes=False)

    async def messages_after(self, chat_id: uuid.UUID, after_id: int) -> list[Message]:
        """User-visible, non-deleted messages with id > after_id, in id order."""
        chat_id = parse_uuid(chat_id, "chat_id")
        after_id = parse_row_id(after_id, "after_id")

        async def body(conn: _Conn) -> list[Message]:
            rows = await self._fetch(
                conn, "GetChatMessagesAfter", _SQL_MESSAGES_AFTER, (chat_id, after_id)
            )
            return [_message(r) for r in rows]

        return await self._run("messages_after", body, writes=False)

    async def prompt_messages(self, chat_id: uuid.UUID) -> list[Message]:
        """Model-visible, non-deleted history after the compaction boundary (docs/spec.md §3.1)."""
        chat_id = parse_uuid(chat_id, "chat_id")

        async def body(conn: _Conn) -> list[Message]:
            rows = await self._fetch(conn, "GetPromptMessages", _SQL_PROMPT_MESSAGES, ([chat_id],))
            return [_message(r) for r in rows]

        prompt = await self._run("prompt_messages", body, writes=False)
        self._prompts.refresh(chat_id, prompt)
        return prompt

    async def latest_assistant_text(self, chat_id: uuid.UUID) -> str | None:
        """The latest non-blank user-visible assistant text (a subagent's report)."""
        chat_id = parse_uuid(chat_id, "chat_id")

        async def body(conn: _Conn) -> str | None:
            row = await self._fetchone(
                conn,
                "GetLatestAssistantText",
                _SQL_LATEST_ASSISTANT_TEXT,
                (chat_id, _PY_WHITESPACE),
            )
            return None if row is None else str(row["txt"])

        return await self._run("latest_assistant_text", body, writes=False)

    # -- the queue ------------------------------------------------------------------
    async def list_queued(self, chat_id: uuid.UUID) -> list[QueuedMessage]:
        """The chat's queue, front first."""
        chat_id = parse_uuid(chat_id, "chat_id")
        return await self._run("list_queued", lambda conn: self._queue(conn, chat_id), writes=False)

    async def delete_queued(
        self,
        chat_id: uuid.UUID,
        queued_id: int,
        *,
        owner_id: uuid.UUID | None = None,
        announce: Announcer | None = None,
    ) -> list[QueuedMessage]:
        """Delete one queued message; returns the remaining queue.

        One batch: [the chat's row,] the delete (guarded by the owner) and the queue
        left; with `announce`, its notify and the COMMIT follow in a second one."""
        chat_id = parse_uuid(chat_id, "chat_id")
        owner_id = optional_uuid(owner_id, "owner_id")
        queued_id = parse_row_id(queued_id, "queued_id")

        async def body(conn: _Conn) -> list[QueuedMessage]:
            queue: list[QueuedMessage] = []
            async with _batched(conn) as batch:
                owner = None
                if owner_id is not None:
                    self._counter.hit("GetChatByID")
                    owner = await conn.execute(_SQL_GET_CHAT, (chat_id,))
                self._counter.hit("DeleteQueuedMessage")
                gone = await conn.execute(
                    _SQL_DELETE_QUEUED_OWNED, {"chat": chat_id, "id": queued_id, "owner": owner_id}
                )
                self._counter.hit("GetQueuedMessages")
                left = await conn.execute(_SQL_GET_QUEUED, (chat_id,))
                await batch.sync()
                chat: Chat | None = None
                if owner is not None:
                    row = await owner.fetchone()
                    if row is None:
                        raise ChatNotFound(f"chat {chat_id} not found")
                    chat = _chat(row)
                    if chat.owner_id != owner_id:
                        raise PermissionDenied(f"chat {chat_id} does not belong to this user")
                if not await gone.fetchall():
                    raise QueuedMessageNotFound(
                        f"queued message {queued_id} not found in chat {chat_id}"
                    )
                queue = [_queued(r) for r in await left.fetchall()]
                if announce is not None:
                    if chat is None:
                        chat = await self._fetch_chat(conn, chat_id)
                    chat = dataclasses.replace(chat, queued=len(queue))
                    await self._notify(
                        conn, announce.changes(None, Applied(True, chat, queue=tuple(queue)))
                    )
            return queue

        return await self._run("delete_queued", body)

    # -- the guarded write ----------------------------------------------------------
    async def apply(
        self,
        chat_id: uuid.UUID,
        plan: Plan,
        write: Write,
        *,
        announce: Announcer | None = None,
    ) -> Applied:
        """Execute `plan` in one transaction if its guard still holds under the row lock.

        A pipelined plan (`chatd_trio.store.base.pipelined`: inserts, queue appends,
        row changes) is one batch: BEGIN, the lock, the guard read that sets the mark,
        the gated effects and the reads of what they changed. The COMMIT rides in
        that batch when the write announces nothing; otherwise the notifies depend on
        what the batch inserted and go with the COMMIT in a second one. Other plans
        (an edit, a promotion) read the row, then write what it holds.
        """
        # Named by the decided event, so a failure says which operation failed.
        if pipelined(plan):

            async def batched(conn: _Conn) -> Applied:
                return await self._apply_pipelined(conn, chat_id, plan, write, announce)

            return await self._run(plan.event.value, batched)

        async def body(conn: _Conn) -> Applied:
            mark = uuid.uuid4().hex
            locked = await self._fetchone(conn, "LockChatForUpdate", _SQL_LOCK_CHAT, (chat_id,))
            if locked is None:
                raise ChatNotFound(f"chat {chat_id} not found")
            row = await self._fetchone(
                conn,
                "GetChatForWrite",
                _SQL_CHAT_FOR_WRITE,
                _guard_params(chat_id, plan, write, mark),
            )
            assert row is not None, "the row is locked by this transaction"
            chat = _chat(row)
            if write.owner_id is not None and chat.owner_id != write.owner_id:
                raise PermissionDenied(f"chat {chat_id} does not belong to this user")
            if row["last_op_id"] == write.op_id or row["op_inserted"]:
                self._prompts.forget(chat_id)
                return await self._replayed(conn, chat, write, bool(row["op_inserted"]))
            if not plan.guard.holds(ChatView.of(chat)):
                return Applied(False, chat)
            applied = await self._execute_plan(conn, chat, plan, write, mark)
            # An edit or a promotion: the next acquisition reads the prompt whole.
            self._prompts.forget(chat_id)
            if announce is not None:
                await self._notify(conn, _announced(announce, plan, applied))
            return applied

        return await self._run(plan.event.value, body, transaction=True)

    async def _apply_pipelined(
        self,
        conn: _Conn,
        chat_id: uuid.UUID,
        plan: Plan,
        write: Write,
        announce: Announcer | None,
    ) -> Applied:
        mark = uuid.uuid4().hex
        new = list(write.messages) if plan.has(Effect.INSERT) else []
        sent: dict[str, _Cursor] = {}

        async def send(name: str, query: str, params: _Params) -> None:
            self._counter.hit(name)
            sent[name] = await conn.execute(query, params)

        applied: Applied | None = None
        async with _batched(conn) as batch:
            await send("LockChatForUpdate", _SQL_LOCK_CHAT, (chat_id,))
            await send(
                "GetChatForWrite", _SQL_CHAT_FOR_WRITE, _guard_params(chat_id, plan, write, mark)
            )
            if plan.has(Effect.ENQUEUE):
                content = Jsonb(parts_to_json(write.parts))
                await send(
                    "InsertQueuedMessage",
                    _SQL_APPEND_QUEUED,
                    {"chat": chat_id, "content": content, "mark": mark},
                )
            if new:
                params = _insert_params(chat_id, new, write.stamp, write.op_id, mark)
                await send("InsertChatMessages", _SQL_INSERT_MESSAGES_GATED, params)
            if plan.changes_row or write.binding is not None:
                await send("UpdateChat", *_update_chat_sql(plan, write, chat_id, mark))
            if plan.has(Effect.ENQUEUE):
                await send("GetQueuedMessages", _SQL_GET_QUEUED, (chat_id,))
            if announce is not None:
                await batch.sync()
                applied = await self._pipelined_result(conn, chat_id, plan, write, sent)
                if applied.applied and not applied.replayed:
                    await self._notify(conn, _announced(announce, plan, applied))
                    await batch.commit()
                else:
                    await batch.rollback()
        if applied is None:
            # Committed with the batch: the effects ran exactly when the guard held.
            applied = await self._pipelined_result(conn, chat_id, plan, write, sent)
        return applied

    async def _pipelined_result(
        self,
        conn: _Conn,
        chat_id: uuid.UUID,
        plan: Plan,
        write: Write,
        sent: Mapping[str, _Cursor],
    ) -> Applied:
        """Re-decide on the row the batch read, check that the gated effects agree, and
        return what they did."""
        row = await sent["GetChatForWrite"].fetchone()
        if row is None:
            raise ChatNotFound(f"chat {chat_id} not found")
        chat = _chat(row)
        marked = bool(row["marked"])
        effects = {
            name: await cursor.fetchall()
            for name, cursor in sent.items()
            if name in ("InsertQueuedMessage", "InsertChatMessages", "UpdateChat")
        }
        if write.owner_id is not None and chat.owner_id != write.owner_id:
            holds = False
        else:
            replay = row["last_op_id"] == write.op_id or bool(row["op_inserted"])
            holds = not replay and plan.guard.holds(ChatView.of(chat))
        expected = {
            "InsertQueuedMessage": 1,
            "InsertChatMessages": len(write.messages),
            "UpdateChat": 1,
        }
        done = {name: len(rows) for name, rows in effects.items()}
        if marked != holds or done != {n: expected[n] if holds else 0 for n in done}:
            raise StoreError(
                f"guarded write on chat {chat_id} is inconsistent: decided {holds},"
                f" marked {marked}, rows {done}"
            )
        if write.owner_id is not None and chat.owner_id != write.owner_id:
            raise PermissionDenied(f"chat {chat_id} does not belong to this user")
        if not holds:
            if row["last_op_id"] == write.op_id or row["op_inserted"]:
                replayed = await self._replayed(conn, chat, write, bool(row["op_inserted"]))
                self._remember_write(chat_id, plan, write, replayed, 0)
                return replayed
            return Applied(False, chat)
        inserted = _inserted(effects.get("InsertChatMessages", ()))
        prev_model = _prev_model(effects.get("InsertChatMessages", ()))
        if "UpdateChat" in effects:
            chat = _chat(effects["UpdateChat"][0])
        queued: QueuedMessage | None = None
        queue: tuple[QueuedMessage, ...] | None = None
        if "InsertQueuedMessage" in effects:
            queued = _queued(effects["InsertQueuedMessage"][0])
            queue = tuple(_queued(r) for r in await sent["GetQueuedMessages"].fetchall())
            chat = dataclasses.replace(chat, queued=len(queue))
        applied = Applied(True, chat, inserted=tuple(inserted), queued=queued, queue=queue)
        self._remember_write(chat_id, plan, write, applied, prev_model)
        return applied

    async def _replayed(
        self, conn: _Conn, chat: Chat, write: Write, inserted_some: bool
    ) -> Applied:
        """An earlier attempt of `write` landed: what it inserted (and the queue, when it
        promoted a queued message)."""
        inserted: tuple[Message, ...] = ()
        if inserted_some:
            rows = await self._fetch(
                conn, "GetChatMessagesByOp", _SQL_MESSAGES_BY_OP, (chat.id, write.op_id)
            )
            inserted = tuple(_message(r) for r in rows)
        promoted = promoted_by(write, inserted)
        queue: tuple[QueuedMessage, ...] | None = None
        if promoted is not None:
            queue = tuple(await self._queue(conn, chat.id))
        return Applied(True, chat, inserted=inserted, promoted=promoted, queue=queue, replayed=True)

    async def _execute_plan(
        self,
        conn: _Conn,
        chat: Chat,
        plan: Plan,
        write: Write,
        mark: str,
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
        inserted: list[Message] = []
        if new:
            inserted = await self._insert_messages(
                conn, chat_id, new, stamp=write.stamp, op=write.op_id
            )
        if plan.changes_row or write.binding is not None:
            row = await self._fetchone(
                conn, "UpdateChat", *_update_chat_sql(plan, write, chat_id, mark)
            )
            assert row is not None, "the row is locked by this transaction and marked"
            chat = _chat(row)
        touched_queue = bool(
            plan.effects & {Effect.QUEUE_TO_FRONT, Effect.PROMOTE_OLDEST, Effect.PROMOTE_CHOSEN}
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

    # -- bulk ownership -------------------------------------------------------------
    async def _claim(
        self,
        plan: Plan,
        worker_id: uuid.UUID,
        limit: int,
        announce: Announcer | None,
        prompts: bool = False,
    ) -> list[Chat]:
        if limit < 1:
            await trio.lowlevel.checkpoint()
            return []
        params = {
            "target": plan.target.value,
            "source": _status(plan.guard.status),
            "worker": worker_id,
            "limit": limit,
        }

        def claimed(rows: list[DictRow]) -> list[Chat]:
            rows.sort(key=lambda r: (r["pending_since"], r["id"]))
            return [_chat(r) for r in rows]

        async def body(conn: _Conn) -> list[Chat]:
            return claimed(await self._fetch(conn, "AcquireChats", _SQL_ACQUIRE, params))

        async def batched(conn: _Conn) -> list[Chat]:
            # The claim and the prompts' tails, then (they need the claims' new tokens and
            # what the tails showed) the notifies, the prompts the cache could not
            # complete and the COMMIT; a ROLLBACK when nothing was claimed.
            loaded: dict[uuid.UUID, tuple[Message, ...]] = {}
            full: _Cursor | None = None
            async with _batched(conn) as batch:
                self._counter.hit("AcquireChats")
                cursor = await conn.execute(_SQL_ACQUIRE, params)
                tails: _Cursor | None = None
                if prompts:
                    self._counter.hit("GetPromptTails")
                    tails = await conn.execute(_SQL_PROMPT_TAILS)
                await batch.sync()
                chats = claimed(await cursor.fetchall())
                if not chats:
                    await batch.rollback()
                    return []
                if tails is not None:
                    missing = self._complete_prompts(await tails.fetchall(), loaded)
                    if missing:
                        self._counter.hit("GetPromptMessages")
                        full = await conn.execute(_SQL_PROMPT_MESSAGES, (missing,))
                if announce is not None:
                    await self._notify(conn, _announce_each(announce, plan, chats))
                await batch.commit()
            if full is not None:
                for chat_id, messages in _by_chat(await full.fetchall()).items():
                    loaded[chat_id] = tuple(messages)
            if prompts:
                for chat in chats:
                    self._prompts.put(chat.id, loaded.get(chat.id, ()), chat.owner_token)
            return chats

        plain = announce is None and not prompts
        return await self._run("acquire", body if plain else batched)

    def _complete_prompts(
        self, rows: Sequence[DictRow], loaded: dict[uuid.UUID, tuple[Message, ...]]
    ) -> list[uuid.UUID]:
        """Fill `loaded` with the prompts the cache completes from the claims' tails; the
        chats whose prompt must be read whole."""
        anchors: dict[uuid.UUID, int] = {}
        tails: dict[uuid.UUID, list[Message]] = {}
        for r in rows:
            chat_id = r["tail_of"]
            anchors[chat_id] = r["anchor"]
            tail = tails.setdefault(chat_id, [])
            if r["id"] is not None:
                tail.append(_message(r))
        missing: list[uuid.UUID] = []
        for chat_id, anchor in anchors.items():
            prompt = prompt_tail_plan(chat_id, anchor, tails[chat_id], self._prompts)
            if prompt is None:
                missing.append(chat_id)
            else:
                loaded[chat_id] = prompt
        return missing

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

    async def _recover(
        self, plan: Plan, stale_after: float, announce: Announcer | None
    ) -> list[uuid.UUID]:
        params = {
            "target": plan.target.value,
            "source": _status(plan.guard.status),
            "secs": stale_after,
        }

        async def body(conn: _Conn) -> list[uuid.UUID]:
            rows = await self._fetch(conn, "RecoverStaleChats", _SQL_RECOVER_STALE, params)
            rows.sort(key=lambda r: (r["created_at"], r["id"]))
            if announce is not None and rows:
                chats = [_chat(r) for r in rows]
                await self._notify(conn, _announce_each(announce, plan, chats))
            return [r["id"] for r in rows]

        return await self._run("recover_stale", body, transaction=announce is not None)

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
        owner_id = parse_uuid(owner_id, "owner_id")
        (name,) = storable_texts(name=name)

        async def body(conn: _Conn) -> Workspace:
            row = await self._fetchone(
                conn, "InsertWorkspace", _SQL_INSERT_WORKSPACE, (uuid.uuid4(), owner_id, name)
            )
            assert row is not None
            return _workspace(row)

        return await self._run("create_workspace", body)

    async def get_workspace(self, workspace_id: uuid.UUID) -> Workspace | None:
        """The workspace, or None."""
        workspace_id = parse_uuid(workspace_id, "workspace_id")

        async def body(conn: _Conn) -> Workspace | None:
            row = await self._fetchone(
                conn, "GetWorkspaceByID", _SQL_GET_WORKSPACE, (workspace_id,)
            )
            return None if row is None else _workspace(row)

        return await self._run("get_workspace", body, writes=False)

    async def create_build(self, workspace_id: uuid.UUID) -> WorkspaceBuild:
        """A new latest build (no agents yet: the workspace looks stopped)."""
        workspace_id = parse_uuid(workspace_id, "workspace_id")

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
        build_id = parse_uuid(build_id, "build_id")
        name, address, token, directory = storable_texts(
            name=name, address=address, token=token, directory=directory
        )

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
        workspace_id = parse_uuid(workspace_id, "workspace_id")

        async def body(conn: _Conn) -> list[WorkspaceAgent]:
            rows = await self._fetch(
                conn, "GetWorkspaceAgentsInLatestBuild", _SQL_LATEST_BUILD_AGENTS, (workspace_id,)
            )
            return [_agent(r) for r in rows]

        return await self._run("latest_build_agents", body, writes=False)

    async def agent_by_id(self, agent_id: uuid.UUID) -> WorkspaceAgent | None:
        """The agent, or None."""
        agent_id = parse_uuid(agent_id, "agent_id")

        async def body(conn: _Conn) -> WorkspaceAgent | None:
            row = await self._fetchone(conn, "GetWorkspaceAgentByID", _SQL_GET_AGENT, (agent_id,))
            return None if row is None else _agent(row)

        return await self._run("agent_by_id", body, writes=False)

    # -- subagents ------------------------------------------------------------------
    async def child_chats(self, parent_chat_id: uuid.UUID) -> list[Chat]:
        """Children of a chat, oldest first."""
        parent_chat_id = parse_uuid(parent_chat_id, "parent_chat_id")

        async def body(conn: _Conn) -> list[Chat]:
            rows = await self._fetch(conn, "GetChildChats", _SQL_CHILD_CHATS, (parent_chat_id,))
            return [_chat(r) for r in rows]

        return await self._run("child_chats", body, writes=False)

    async def parent_of(self, chat_id: uuid.UUID) -> uuid.UUID | None:
        """The chat's parent id; ChatNotFound when the row is missing."""
        chat_id = parse_uuid(chat_id, "chat_id")

        async def body(conn: _Conn) -> uuid.UUID | None:
            row = await self._fetchone(conn, "GetChatParent", _SQL_CHAT_PARENT, (chat_id,))
            if row is None:
                raise ChatNotFound(f"chat {chat_id} not found")
            parent: uuid.UUID | None = row["parent_chat_id"]
            return parent

        return await self._run("parent_of", body, writes=False)


async def _open_pool(
    dsn: str,
    cfg: PostgresConfig,
    migrations: Sequence[tuple[str, str]],
    trips: RoundTrips | None = None,
) -> _Pool:
    """`PostgresStore.open`'s work: migrate on a direct connection, then open the pool.

    The direct connection fails fast on a refused or unreachable server.
    """
    where = database_address(dsn)
    connect_kwargs: dict[str, Any] = {
        "connect_timeout": cfg.connect_timeout,
        "application_name": cfg.application_name,
    }
    connection_class = traced_class(TrioConnection, trips)
    try:
        with trio.fail_after(cfg.open_timeout):
            conn = await connect(dsn, cls=TrioConnection, row_factory=dict_row, **connect_kwargs)
            try:
                await _apply_migrations(conn, migrations, cfg.migration_lock_key)
            finally:
                await conn.close()
    except trio.TooSlowError:
        raise StoreUnavailable(
            f"opening PostgreSQL at {where} took over {cfg.open_timeout} s"
        ) from None
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"cannot reach PostgreSQL at {where}: {exc}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"migrating PostgreSQL at {where} failed: {exc}") from exc

    answers = AnswerWait(cfg.answer_wait)

    async def open_connection() -> _Conn:
        return await connect(
            dsn, cls=connection_class, row_factory=dict_row, answers=answers, **connect_kwargs
        )

    pool: _Pool = TrioPool(
        open_connection,
        answers,
        PoolSettings(
            min_size=cfg.min_size,
            max_size=cfg.max_size,
            max_idle=cfg.max_idle,
            max_lifetime=cfg.max_lifetime,
            timeout=cfg.pool_timeout,
            max_writing=cfg.write_slots,
        ),
    )
    try:
        with trio.fail_after(cfg.open_timeout):
            await pool.open()
    except BaseException as exc:
        pool.close()
        if isinstance(exc, trio.TooSlowError):
            raise StoreUnavailable(
                f"cannot open a pool to PostgreSQL at {where} in {cfg.open_timeout} s"
            ) from None
        if isinstance(exc, psycopg.OperationalError):
            raise StoreUnavailable(f"cannot open a pool to PostgreSQL at {where}: {exc}") from exc
        raise
    return pool
