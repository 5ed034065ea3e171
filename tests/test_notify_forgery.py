"""A database login with no table privileges cannot forge or read a chat's notifies.

docs/security.md, "A database login role". Any role that can log in may LISTEN and
NOTIFY on every channel. The test creates such a role in the test database, checks
that it can read no table, then, against a live Server on PostgreSQL:

* LISTENs on the chats' channels while turns run: it receives every notify, but
  each is sealed, and none contains the text of the messages they carry;
* NOTIFYs well-formed payloads on a live chat's channel: an assistant message that
  follows the subscriber's cursor, a message and a cursor at 10**15, fake status,
  error, retry and queue events, and a genuine sealed payload copied from another
  chat's channel. None reaches the subscriber, its cursor stays where the real
  messages put it, the next real turn's messages and statuses arrive, and every
  forged notify is counted in `Server.stats().streams.notifies_rejected`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from chatd_trio.domain import (
    ChatStatus,
    ErrorEvent,
    ErrorPayload,
    Message,
    MessageEvent,
    NotifyPayload,
    QueuedMessage,
    QueueUpdateEvent,
    RetryEvent,
    RetryPayload,
    Role,
    StatusEvent,
    StreamEvent,
    TextPart,
    stream_channel,
    text_of,
)
from chatd_trio.pubsub.auth import PREFIX, NotifyAuth
from chatd_trio.pubsub.postgres import PostgresPubSub
from chatd_trio.server import Server
from chatd_trio.store.postgres import PostgresStore
from chatd_trio.streams import StreamSubscription
from tests.pgcluster import truncate_all
from tests.server_replica import POSTGRES_CONFIG, WAIT, registry, user_model

pytestmark = pytest.mark.postgres

OWNER = uuid.UUID(int=7)
SECRET = "the vault combination is 31-41-59"
FORGED = "FORGED"
HUGE = 10**15
# The forger's own channel: its marker there arrives after everything sent before it.
MARKER = "forger:marker"


class Forger:
    """A session of a login with no privileges but CONNECT (PUBLIC's default)."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.heard: list[tuple[str, str]] = []

    def listen(self, channels: list[str]) -> None:
        for channel in [*channels, MARKER]:
            self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def notify(self, notifies: list[tuple[str, str]]) -> None:
        for channel, payload in notifies:
            self.conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def drain(self) -> list[tuple[str, str]]:
        """Everything delivered to this session so far: its own marker comes after all
        notifies committed before it (NOTIFY delivers in commit order)."""
        token = uuid.uuid4().hex
        self.notify([(MARKER, token)])
        for note in self.conn.notifies(timeout=WAIT):
            if note.channel == MARKER and note.payload == token:
                return self.heard
            if note.channel != MARKER:
                self.heard.append((note.channel, note.payload))
        raise AssertionError("the forger's marker never arrived")

    def select_chats(self) -> None:
        self.conn.execute("SELECT count(*) FROM chats")


@contextmanager
def login_without_privileges(admin_dsn: str) -> Iterator[str]:
    """A fresh LOGIN role in the test database; its DSN."""
    role = f"chatd_forger_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        params = conninfo_to_dict(admin_dsn)
        params.pop("password", None)
        yield make_conninfo("", **{**params, "user": role})
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def until_answered(sub: StreamSubscription, answer: str) -> list[StreamEvent]:
    """Events until both the assistant message `answer` and a `waiting` status have
    arrived (a snapshot sends the status before the messages, a live turn after)."""
    events: list[StreamEvent] = []
    answered = waiting = False
    with trio.fail_after(WAIT):
        async for event in sub:
            events.append(event)
            if isinstance(event, MessageEvent) and text_of(event.message.parts) == answer:
                answered = True
            if isinstance(event, StatusEvent):
                waiting = event.status is ChatStatus.WAITING
            if answered and waiting:
                return events
    raise AssertionError("the subscription ended")


def forgeries(chat_id: uuid.UUID, cursor: int) -> list[str]:
    """Well-formed notifies (each decodes) a forger would send on `chat_id`'s channel."""

    def message(msg_id: int) -> Message:
        return Message(msg_id, chat_id, Role.ASSISTANT, (TextPart(f"{FORGED} answer"),))

    payloads = [
        # Follows the cursor exactly: taken without a read if believed.
        NotifyPayload(after_message_id=cursor, message=message(cursor + 1)),
        # Moves the cursor past every real message to come.
        NotifyPayload(after_message_id=HUGE - 1, message=message(HUGE)),
        NotifyPayload(after_message_id=HUGE),
        NotifyPayload(status=ChatStatus.ERROR),
        NotifyPayload(status=ChatStatus.RUNNING, worker_id=uuid.uuid4(), owner_token=HUGE),
        NotifyPayload(error_payload=ErrorPayload(f"{FORGED} error", kind="model")),
        NotifyPayload(error=f"{FORGED} legacy error"),
        NotifyPayload(retry=RetryPayload(attempt=1, delay_s=1.0, error=f"{FORGED} retry")),
        NotifyPayload(queue_update=(QueuedMessage(1, chat_id, (TextPart(FORGED),)),)),
        NotifyPayload(full_refresh=True),
    ]
    wires = [p.encode() for p in payloads]
    for wire in wires:
        NotifyPayload.decode(wire)  # well-formed: only the seal stops them
    return wires


def forged_text(event: StreamEvent) -> bool:
    return FORGED in json.dumps(_jsonable(event), default=str)


def _jsonable(event: StreamEvent) -> Any:
    if isinstance(event, MessageEvent):
        return text_of(event.message.parts)
    return repr(event)


async def test_a_login_without_table_privileges_cannot_forge_or_read_notifies(
    pg_dsn: str,
) -> None:
    auth = NotifyAuth.generate()
    with login_without_privileges(pg_dsn) as forger_dsn:
        forger = await trio.to_thread.run_sync(Forger, forger_dsn)
        try:
            async with PostgresStore.open(pg_dsn) as store:
                await trio.to_thread.run_sync(truncate_all, pg_dsn)
                # The tables exist (migrated above); this login cannot read them.
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    await trio.to_thread.run_sync(forger.select_chats)
                async with PostgresPubSub.open(pg_dsn, auth=auth) as pubsub:
                    await _attack(store, pubsub, forger, auth)
        finally:
            await trio.to_thread.run_sync(forger.conn.close)


async def _attack(
    store: PostgresStore, pubsub: PostgresPubSub, forger: Forger, auth: NotifyAuth
) -> None:
    # Two chats, created before any replica runs so the forger listens from the start.
    chat_a, _ = await store.create_chat(OWNER, "a", (TextPart(f"remember: {SECRET}"),))
    chat_b, _ = await store.create_chat(OWNER, "b", (TextPart(f"also: {SECRET}"),))
    channel_a, channel_b = stream_channel(chat_a.id), stream_channel(chat_b.id)
    await trio.to_thread.run_sync(forger.listen, [channel_a, channel_b])

    async with Server(store, pubsub, user_model(), POSTGRES_CONFIG, tools=registry()) as server:
        async with server.subscribe(OWNER, chat_b.id) as sub_b:
            await until_answered(sub_b, f"re: also: {SECRET}")
        async with server.subscribe(OWNER, chat_a.id) as sub:
            await until_answered(sub, f"re: remember: {SECRET}")
            cursor = sub.cursor
            assert cursor == (await store.messages_after(chat_a.id, 0))[-1].id

            # LISTENing reveals no message text: every notify is sealed. Opened with the
            # key, some carry the messages, so the text did travel (encrypted).
            heard = await trio.to_thread.run_sync(forger.drain)
            assert {c for c, _ in heard} == {channel_a, channel_b}
            assert all(p.startswith(PREFIX) and SECRET not in p for _, p in heard)
            opened = [auth.open(c, p) for c, p in heard]
            assert any(SECRET in p and '"message"' in p for p in opened)

            # Forge: well-formed payloads, and a genuine one copied from chat b.
            copied = next(p for c, p in heard if c == channel_b)
            forged = [*forgeries(chat_a.id, cursor), copied]
            rejected_before = server.stats().streams.notifies_rejected
            await trio.to_thread.run_sync(forger.notify, [(channel_a, p) for p in forged])

            # A real turn after the forgeries: its notifies are committed after them, so
            # the replica's listener has handled every forged one when these arrive.
            await server.send_message(OWNER, chat_a.id, "and now?")
            second = await until_answered(sub, "re: and now?")

            assert not [e for e in second if forged_text(e)]
            assert not [e for e in second if isinstance(e, ErrorEvent | RetryEvent)]
            assert not [e for e in second if isinstance(e, QueueUpdateEvent) and e.queued]
            statuses = [e for e in second if isinstance(e, StatusEvent)]
            assert {e.status for e in statuses} <= {
                ChatStatus.PENDING,
                ChatStatus.RUNNING,
                ChatStatus.WAITING,
            }
            running = [e for e in statuses if e.status is ChatStatus.RUNNING]
            assert running and all(e.worker_id == server.worker_id for e in running)
            got = [e.message for e in second if isinstance(e, MessageEvent)]
            assert [(m.role, text_of(m.parts)) for m in got] == [
                (Role.USER, "and now?"),
                (Role.ASSISTANT, "re: and now?"),
            ]
            assert cursor < got[0].id < got[1].id == sub.cursor < HUGE
            stored = await store.messages_after(chat_a.id, 0)
            assert [m.id for m in stored][-2:] == [m.id for m in got]
            assert not any(FORGED in text_of(m.parts) for m in stored)
            rejected = server.stats().streams.notifies_rejected - rejected_before
            assert rejected == len(forged)
