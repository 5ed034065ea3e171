"""The in-memory Store: the embedded default for one process, and the reference
semantics the PostgreSQL adapter is tested against (tests/contract/).

Each operation starts with one Trio checkpoint and then runs synchronously, so
it is atomic (nothing else runs in between) and still a scheduling point, the
way one database transaction is.

Statement accounting mirrors what the PostgreSQL adapter executes on the same
branch, so `statement_counts()` compares across adapters. Per operation
(`+` = also executed, `|` = one branch or the other, `[..]` = only on that path):

=====================  ====================================================================
operation              statements
=====================  ====================================================================
create_chat            [GetChatByID (parent)] + InsertChat + InsertChatMessages
get_chat               GetChatByID
list_chats             GetChatsByOwner
send_message           LockChatForUpdate + GetQueuedMessages
                       + (InsertQueuedMessage | InsertChatMessages + UpdateChatStatus)
edit_message           LockChatForUpdate + GetChatMessageByID + [SoftDeleteMessagesFrom
                       + InsertChatMessages + DeleteQueuedMessages + UpdateChatStatus]
interrupt              LockChatForUpdate + [UpdateChatStatus unless pending]
messages_after         GetChatMessagesAfter
prompt_messages        GetPromptMessages
latest_assistant_text  GetLatestAssistantText
list_queued            GetQueuedMessages
promote_queued         LockChatForUpdate + GetQueuedMessages + DeleteQueuedMessage
                       + (InsertQueuedMessage (running: re-inserted at the front)
                          | InsertChatMessages + UpdateChatStatus)
delete_queued          DeleteQueuedMessage + [GetQueuedMessages when one was deleted]
acquire                AcquireChats (nothing when limit < 1)
release                ReleaseChats (nothing when no ids)
heartbeat              HeartbeatChat
recover_stale          RecoverStaleChats
persist_step           LockChatForUpdate + [InsertChatMessages when allowed and non-empty]
persist_compaction     same as persist_step
finish_turn            LockChatForUpdate + [when this worker owns the row or it is waiting:
                       DONE/INTERRUPTED: PopQueuedMessage + (InsertChatMessages
                       + UpdateChatStatus + GetQueuedMessages | UpdateChatStatus);
                       ERROR/SHUTDOWN: UpdateChatStatus]
create_workspace       InsertWorkspace
get_workspace          GetWorkspaceByID
create_build           InsertWorkspaceBuild
create_agent           InsertWorkspaceAgent
latest_build_agents    GetWorkspaceAgentsInLatestBuild
agent_by_id            GetWorkspaceAgentByID
update_binding         UpdateChatBinding
child_chats            GetChildChats
parent_of              GetChatParent
=====================  ====================================================================

With `announce=` (send_message, edit_message, promote_queued, persist_step,
persist_compaction, finish_turn), every InsertChatMessages is followed by one
NotifyInTransaction when the announcer returns notifies; this adapter then delivers
them to its `pubsub` within the operation, as PostgreSQL does at COMMIT.

A statement that finds nothing still counts (it ran); an operation that fails on
a missing row stops after the statement that found it missing.

Decisions where the spec is silent:
- Collection reads by chat id (messages_after, prompt_messages, list_queued,
  child_chats, latest_assistant_text) return empty for an unknown chat: one
  statement, no existence check. Single-row lookups and mutations raise.
- prompt_messages after a compaction returns every model-visible message newer
  than the latest summary, compressed or not; the visible `chat_summarized`
  call and result are user-only, so the model-visible filter drops them.
- interrupt of a `waiting` or `error` chat sets `waiting` again (the docstring's
  "unless pending" is the only exception); last_error is kept.
- finish_turn on a row in `error` changes nothing (another run already ended it).
- Timestamps are strictly increasing per store, so "oldest updated_at first"
  follows operation order even when the clock does not advance.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta

import trio

from chatd_trio.config import LimitsConfig
from chatd_trio.domain import (
    Chat,
    ChatStatus,
    Message,
    NewMessage,
    Part,
    QueuedMessage,
    Role,
    TextPart,
    Visibility,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
    text_of,
)
from chatd_trio.errors import (
    BuildNotFound,
    ChatNotFound,
    EditRefused,
    MessageNotFound,
    PersistRefused,
    QueuedMessageNotFound,
    QueueFull,
    WorkspaceNotFound,
)
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.store.base import (
    Announcer,
    EditResult,
    FinishResult,
    SendResult,
    StatementCounter,
    TurnOutcome,
    check_title,
    check_user_parts,
)

__all__ = ["MemoryStore"]

Clock = Callable[[], datetime]

# Timestamps advance by at least this much per operation (PostgreSQL's resolution).
_TICK = timedelta(microseconds=1)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class MemoryStore:
    """A `Store` held in process memory; semantics identical to the PostgreSQL adapter."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        limits: LimitsConfig | None = None,
        pubsub: MemoryPubSub | None = None,
    ) -> None:
        """`pubsub`: the replicas' pubsub, for notifies sent with an insert (`announce=`)."""
        self._clock: Clock = clock or _utc_now
        self._limits = limits or LimitsConfig()
        self._pubsub = pubsub
        self._last_now: datetime | None = None
        self._counter = StatementCounter.new()
        self._chats: dict[uuid.UUID, Chat] = {}
        self._messages: dict[int, Message] = {}
        self._chat_message_ids: dict[uuid.UUID, list[int]] = {}
        self._queues: dict[uuid.UUID, list[QueuedMessage]] = {}
        self._next_message_id = 1
        self._next_queued_id = 1
        self._workspaces: dict[uuid.UUID, Workspace] = {}
        self._builds: dict[uuid.UUID, WorkspaceBuild] = {}
        self._workspace_builds: dict[uuid.UUID, list[uuid.UUID]] = {}
        self._agents: dict[uuid.UUID, WorkspaceAgent] = {}
        self._build_agents: dict[uuid.UUID, list[uuid.UUID]] = {}

    # -- internals ------------------------------------------------------------
    def _now(self) -> datetime:
        now = self._clock()
        if self._last_now is not None and now <= self._last_now:
            now = self._last_now + _TICK
        self._last_now = now
        return now

    def _hit(self, *names: str) -> None:
        for name in names:
            self._counter.hit(name)

    def _chat(self, chat_id: uuid.UUID) -> Chat:
        chat = self._chats.get(chat_id)
        if chat is None:
            raise ChatNotFound(f"chat {chat_id} not found")
        return chat

    def _set_chat(self, chat: Chat, **changes: object) -> Chat:
        updated = dataclasses.replace(chat, **changes)  # type: ignore[arg-type]
        self._chats[chat.id] = updated
        return updated

    def _set_status(
        self,
        chat: Chat,
        status: ChatStatus,
        now: datetime,
        *,
        last_error: str | None = None,
    ) -> Chat:
        """Every status change except acquisition: the row is no longer owned."""
        self._hit("UpdateChatStatus")
        return self._set_chat(
            chat,
            status=status,
            worker_id=None,
            started_at=None,
            heartbeat_at=None,
            last_error=last_error,
            updated_at=now,
        )

    def _announce(self, announce: Announcer, messages: Sequence[Message], *, refresh: bool) -> None:
        """Deliver the notifies of inserted messages within the operation, like PostgreSQL
        delivers a transaction's NOTIFYs at its commit."""
        assert self._pubsub is not None, "checked by _check_announce"
        notifies = announce(messages, refresh=refresh)
        if notifies:
            self._hit("NotifyInTransaction")
        for channel, payload in notifies:
            self._pubsub.publish_nowait(channel, payload)

    def _check_announce(self, announce: Announcer | None) -> None:
        """Refuse `announce=` without a pubsub before the operation changes anything."""
        if announce is not None and self._pubsub is None:
            raise ValueError("announce= needs a store created with MemoryStore(pubsub=...)")

    def announces_to(self, pubsub: object) -> bool:
        """True for the pubsub this store was created with."""
        return pubsub is not None and pubsub is self._pubsub

    def _insert_messages(
        self,
        chat_id: uuid.UUID,
        messages: Iterable[NewMessage],
        now: datetime,
        announce: Announcer | None = None,
        *,
        refresh: bool = False,
    ) -> list[Message]:
        self._hit("InsertChatMessages")
        out: list[Message] = []
        ids = self._chat_message_ids.setdefault(chat_id, [])
        prev = next(
            (
                i
                for i in reversed(ids)
                if self._messages[i].user_visible and not self._messages[i].deleted
            ),
            0,
        )
        for new in messages:
            msg = Message(
                id=self._next_message_id,
                chat_id=chat_id,
                role=new.role,
                parts=tuple(new.parts),
                visibility=new.visibility,
                usage=new.usage,
                context_limit=new.context_limit,
                compressed=new.compressed,
                created_at=now,
            )
            self._next_message_id += 1
            # Stored without prev_id: reads return None there, like the PostgreSQL adapter.
            self._messages[msg.id] = msg
            ids.append(msg.id)
            if msg.user_visible:
                out.append(dataclasses.replace(msg, prev_id=prev))
                prev = msg.id
            else:
                out.append(msg)
        if announce is not None:
            self._announce(announce, out, refresh=refresh)
        return out

    def _live_messages(self, chat_id: uuid.UUID) -> list[Message]:
        """Non-deleted messages of a chat in id order."""
        msgs = (self._messages[i] for i in self._chat_message_ids.get(chat_id, ()))
        return [m for m in msgs if not m.deleted]

    def _new_queued(
        self, chat_id: uuid.UUID, parts: Sequence[Part], now: datetime
    ) -> QueuedMessage:
        queued = QueuedMessage(self._next_queued_id, chat_id, tuple(parts), now)
        self._next_queued_id += 1
        return queued

    @staticmethod
    def _user_message(parts: Sequence[Part]) -> NewMessage:
        return NewMessage(Role.USER, tuple(parts), Visibility.BOTH)

    # -- chats and messages ---------------------------------------------------
    async def create_chat(
        self,
        owner_id: uuid.UUID,
        title: str,
        parts: Sequence[Part],
        *,
        workspace_id: uuid.UUID | None = None,
        build_id: uuid.UUID | None = None,
        agent_id: uuid.UUID | None = None,
        parent_chat_id: uuid.UUID | None = None,
        mcp_servers: Sequence[str] = (),
        system_prompt: str | None = None,
    ) -> tuple[Chat, Message]:
        """Create a chat with its first user message; the chat starts `pending`."""
        await trio.lowlevel.checkpoint()
        check_title(title, self._limits)
        check_user_parts(parts, self._limits)
        root_chat_id: uuid.UUID | None = None
        if parent_chat_id is not None:
            self._hit("GetChatByID")
            parent = self._chat(parent_chat_id)
            root_chat_id = parent.root_chat_id or parent.id
        now = self._now()
        self._hit("InsertChat")
        chat = Chat(
            id=uuid.uuid4(),
            owner_id=owner_id,
            title=title,
            status=ChatStatus.PENDING,
            created_at=now,
            updated_at=now,
            parent_chat_id=parent_chat_id,
            root_chat_id=root_chat_id,
            workspace_id=workspace_id,
            build_id=build_id,
            agent_id=agent_id,
            mcp_servers=tuple(mcp_servers),
        )
        self._chats[chat.id] = chat
        new: list[NewMessage] = []
        if system_prompt is not None:
            new.append(NewMessage(Role.SYSTEM, (TextPart(system_prompt),), Visibility.MODEL))
        new.append(self._user_message(parts))
        inserted = self._insert_messages(chat.id, new, now)
        return chat, inserted[-1]

    async def get_chat(self, chat_id: uuid.UUID) -> Chat:
        """Raises ChatNotFound."""
        await trio.lowlevel.checkpoint()
        self._hit("GetChatByID")
        return self._chat(chat_id)

    async def list_chats(self, owner_id: uuid.UUID) -> list[Chat]:
        """The owner's chats, newest first."""
        await trio.lowlevel.checkpoint()
        self._hit("GetChatsByOwner")
        chats = [c for c in self._chats.values() if c.owner_id == owner_id]
        chats.sort(key=lambda c: (c.created_at, c.id), reverse=True)
        return chats

    async def send_message(
        self,
        chat_id: uuid.UUID,
        parts: Sequence[Part],
        *,
        max_queued: int,
        announce: Announcer | None = None,
    ) -> SendResult:
        """Insert a user message (chat -> pending) or queue it (docs/spec.md §1)."""
        await trio.lowlevel.checkpoint()
        self._check_announce(announce)
        check_user_parts(parts, self._limits)
        self._hit("LockChatForUpdate")
        chat = self._chat(chat_id)
        self._hit("GetQueuedMessages")
        queue = self._queues.setdefault(chat_id, [])
        now = self._now()
        busy = chat.status in (ChatStatus.RUNNING, ChatStatus.PENDING)
        if busy or queue:
            if len(queue) >= max_queued:
                raise QueueFull(f"chat {chat_id} already has {len(queue)} queued messages")
            self._hit("InsertQueuedMessage")
            queued = self._new_queued(chat_id, parts, now)
            queue.append(queued)
            return SendResult(chat, None, queued, tuple(queue))
        (message,) = self._insert_messages(chat_id, [self._user_message(parts)], now, announce)
        chat = self._set_status(chat, ChatStatus.PENDING, now)
        return SendResult(chat, message, None, ())

    async def edit_message(
        self,
        chat_id: uuid.UUID,
        message_id: int,
        parts: Sequence[Part],
        *,
        announce: Announcer | None = None,
    ) -> EditResult:
        """Soft-delete the user message and every later one, insert the replacement,
        clear the queue, set the chat pending. MessageNotFound / EditRefused change nothing."""
        await trio.lowlevel.checkpoint()
        self._check_announce(announce)
        check_user_parts(parts, self._limits)
        self._hit("LockChatForUpdate")
        chat = self._chat(chat_id)
        self._hit("GetChatMessageByID")
        target = self._messages.get(message_id)
        if target is None:
            raise MessageNotFound(f"message {message_id} not found")
        if target.chat_id != chat_id:
            raise EditRefused(f"message {message_id} belongs to another chat")
        if target.deleted:
            raise EditRefused(f"message {message_id} was deleted")
        if target.role is not Role.USER:
            raise EditRefused(f"message {message_id} is not a user message")
        now = self._now()
        self._hit("SoftDeleteMessagesFrom")
        for mid in self._chat_message_ids.get(chat_id, ()):
            if mid >= message_id and not self._messages[mid].deleted:
                self._messages[mid] = dataclasses.replace(self._messages[mid], deleted=True)
        (message,) = self._insert_messages(
            chat_id, [self._user_message(parts)], now, announce, refresh=True
        )
        self._hit("DeleteQueuedMessages")
        self._queues[chat_id] = []
        chat = self._set_status(chat, ChatStatus.PENDING, now)
        return EditResult(chat, message)

    async def interrupt(self, chat_id: uuid.UUID) -> Chat:
        """Set `waiting` and clear the worker, unless the chat is `pending`."""
        await trio.lowlevel.checkpoint()
        self._hit("LockChatForUpdate")
        chat = self._chat(chat_id)
        if chat.status is ChatStatus.PENDING:
            return chat
        # `last_error` belongs to the `error` status: a stopped chat is clean.
        return self._set_status(chat, ChatStatus.WAITING, self._now())

    async def messages_after(self, chat_id: uuid.UUID, after_id: int) -> list[Message]:
        """User-visible, non-deleted messages with id > after_id, in id order."""
        await trio.lowlevel.checkpoint()
        self._hit("GetChatMessagesAfter")
        return [m for m in self._live_messages(chat_id) if m.id > after_id and m.user_visible]

    async def prompt_messages(self, chat_id: uuid.UUID) -> list[Message]:
        """Model-visible, non-deleted history after the compaction boundary (docs/spec.md §3.1)."""
        await trio.lowlevel.checkpoint()
        self._hit("GetPromptMessages")
        visible = [m for m in self._live_messages(chat_id) if m.model_visible]
        summaries = [m for m in visible if m.compressed and m.role is Role.USER]
        if not summaries:
            return visible
        boundary = summaries[-1].id
        system = [
            m for m in visible if m.role is Role.SYSTEM and not m.compressed and m.id < boundary
        ]
        return system + [m for m in visible if m.id >= boundary]

    async def latest_assistant_text(self, chat_id: uuid.UUID) -> str | None:
        """The latest non-blank user-visible assistant text (a subagent's report)."""
        await trio.lowlevel.checkpoint()
        self._hit("GetLatestAssistantText")
        for m in reversed(self._live_messages(chat_id)):
            if m.role is Role.ASSISTANT and m.user_visible:
                text = text_of(m.parts)
                if text.strip():
                    return text
        return None

    # -- the queue ------------------------------------------------------------
    async def list_queued(self, chat_id: uuid.UUID) -> list[QueuedMessage]:
        """The chat's queue, oldest first."""
        await trio.lowlevel.checkpoint()
        self._hit("GetQueuedMessages")
        return list(self._queues.get(chat_id, ()))

    async def promote_queued(
        self, chat_id: uuid.UUID, queued_id: int, *, announce: Announcer | None = None
    ) -> SendResult:
        """Move one queued message into the history now (chat -> pending) if the chat is
        not running; otherwise move it to the front of the queue."""
        await trio.lowlevel.checkpoint()
        self._check_announce(announce)
        self._hit("LockChatForUpdate")
        chat = self._chat(chat_id)
        self._hit("GetQueuedMessages")
        queue = self._queues.setdefault(chat_id, [])
        found = next((q for q in queue if q.id == queued_id), None)
        if found is None:
            raise QueuedMessageNotFound(f"queued message {queued_id} not found in chat {chat_id}")
        self._hit("DeleteQueuedMessage")
        queue.remove(found)
        if chat.status is ChatStatus.RUNNING:
            self._hit("InsertQueuedMessage")
            queue.insert(0, found)
            return SendResult(chat, None, found, tuple(queue))
        now = self._now()
        (message,) = self._insert_messages(
            chat_id, [self._user_message(found.parts)], now, announce
        )
        chat = self._set_status(chat, ChatStatus.PENDING, now)
        return SendResult(chat, message, None, tuple(queue))

    async def delete_queued(self, chat_id: uuid.UUID, queued_id: int) -> list[QueuedMessage]:
        """Delete one queued message; returns the remaining queue."""
        await trio.lowlevel.checkpoint()
        self._hit("DeleteQueuedMessage")
        queue = self._queues.get(chat_id, [])
        found = next((q for q in queue if q.id == queued_id), None)
        if found is None:
            raise QueuedMessageNotFound(f"queued message {queued_id} not found in chat {chat_id}")
        queue.remove(found)
        self._hit("GetQueuedMessages")
        return list(queue)

    # -- ownership ------------------------------------------------------------
    async def acquire(self, worker_id: uuid.UUID, limit: int) -> list[Chat]:
        """Claim up to `limit` pending chats, oldest `updated_at` first, in one statement."""
        await trio.lowlevel.checkpoint()
        if limit < 1:
            return []
        self._hit("AcquireChats")
        pending = [c for c in self._chats.values() if c.status is ChatStatus.PENDING]
        pending.sort(key=lambda c: (c.updated_at, c.id))
        now = self._now()
        return [
            self._set_chat(
                c,
                status=ChatStatus.RUNNING,
                worker_id=worker_id,
                started_at=now,
                heartbeat_at=now,
                updated_at=now,
            )
            for c in pending[:limit]
        ]

    async def release(self, worker_id: uuid.UUID, chat_ids: Sequence[uuid.UUID]) -> None:
        """Hand chats this worker owns straight back to `pending` (closing server)."""
        await trio.lowlevel.checkpoint()
        if not chat_ids:
            return
        self._hit("ReleaseChats")
        now = self._now()
        for chat_id in chat_ids:
            chat = self._chats.get(chat_id)
            if chat and chat.status is ChatStatus.RUNNING and chat.worker_id == worker_id:
                self._set_chat(
                    chat,
                    status=ChatStatus.PENDING,
                    worker_id=None,
                    started_at=None,
                    heartbeat_at=None,
                    updated_at=now,
                )

    async def heartbeat(self, chat_id: uuid.UUID, worker_id: uuid.UUID) -> bool:
        """Refresh heartbeat_at; False when this worker no longer owns the running chat."""
        await trio.lowlevel.checkpoint()
        self._hit("HeartbeatChat")
        chat = self._chats.get(chat_id)
        if chat is None or chat.status is not ChatStatus.RUNNING or chat.worker_id != worker_id:
            return False
        self._set_chat(chat, heartbeat_at=self._now())
        return True

    async def recover_stale(self, stale_after: float) -> list[uuid.UUID]:
        """Running chats with heartbeat older than `stale_after` seconds -> pending."""
        await trio.lowlevel.checkpoint()
        self._hit("RecoverStaleChats")
        now = self._now()
        cutoff = now - timedelta(seconds=stale_after)
        recovered: list[uuid.UUID] = []
        for chat in list(self._chats.values()):
            if (
                chat.status is ChatStatus.RUNNING
                and chat.heartbeat_at is not None
                and chat.heartbeat_at <= cutoff
            ):
                self._set_chat(
                    chat,
                    status=ChatStatus.PENDING,
                    worker_id=None,
                    started_at=None,
                    heartbeat_at=None,
                    updated_at=now,
                )
                recovered.append(chat.id)
        return recovered

    def _check_persist(self, chat_id: uuid.UUID, worker_id: uuid.UUID) -> None:
        self._hit("LockChatForUpdate")
        chat = self._chat(chat_id)
        owned = chat.status is ChatStatus.RUNNING and chat.worker_id == worker_id
        if not (owned or chat.status is ChatStatus.WAITING):
            raise PersistRefused(
                f"chat {chat_id} is {chat.status.value}"
                + (f" (worker {chat.worker_id})" if chat.worker_id else "")
            )

    async def persist_step(
        self,
        chat_id: uuid.UUID,
        worker_id: uuid.UUID,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
    ) -> list[Message]:
        """Insert a step's messages in one transaction; PersistRefused unless this worker
        owns the running chat or the chat is `waiting`."""
        await trio.lowlevel.checkpoint()
        self._check_announce(announce)
        self._check_persist(chat_id, worker_id)
        if not messages:
            return []
        return self._insert_messages(chat_id, messages, self._now(), announce)

    async def persist_compaction(
        self,
        chat_id: uuid.UUID,
        worker_id: uuid.UUID,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
    ) -> list[Message]:
        """Insert the three compaction messages; same ownership rule as persist_step."""
        return await self.persist_step(chat_id, worker_id, messages, announce=announce)

    async def finish_turn(
        self,
        chat_id: uuid.UUID,
        worker_id: uuid.UUID,
        outcome: TurnOutcome,
        last_error: str | None = None,
        *,
        announce: Announcer | None = None,
    ) -> FinishResult:
        """The final transition under a row lock (docs/spec.md §1)."""
        await trio.lowlevel.checkpoint()
        self._check_announce(announce)
        self._hit("LockChatForUpdate")
        chat = self._chat(chat_id)
        owned = chat.status is ChatStatus.RUNNING and chat.worker_id == worker_id
        if not (owned or chat.status is ChatStatus.WAITING):
            elsewhere = chat.status is ChatStatus.RUNNING
            return FinishResult(
                chat, changed=False, owned_elsewhere=elsewhere, promoted=None, queue=()
            )
        now = self._now()
        if not owned:
            # The user stopped the chat while the turn ran: the stop wins, so a
            # shutdown or a failure landing afterwards ends like the interrupt.
            outcome = TurnOutcome.INTERRUPTED
        if outcome is TurnOutcome.ERROR:
            chat = self._set_status(chat, ChatStatus.ERROR, now, last_error=last_error)
            return FinishResult(chat, changed=True, owned_elsewhere=False, promoted=None, queue=())
        if outcome is TurnOutcome.SHUTDOWN:
            chat = self._set_status(chat, ChatStatus.PENDING, now)
            return FinishResult(chat, changed=True, owned_elsewhere=False, promoted=None, queue=())
        self._hit("PopQueuedMessage")
        queue = self._queues.setdefault(chat_id, [])
        if not queue:
            chat = self._set_status(chat, ChatStatus.WAITING, now)
            return FinishResult(chat, changed=True, owned_elsewhere=False, promoted=None, queue=())
        oldest = queue.pop(0)
        (promoted,) = self._insert_messages(
            chat_id, [self._user_message(oldest.parts)], now, announce
        )
        chat = self._set_status(chat, ChatStatus.PENDING, now)
        self._hit("GetQueuedMessages")
        return FinishResult(
            chat, changed=True, owned_elsewhere=False, promoted=promoted, queue=tuple(queue)
        )

    # -- workspaces -----------------------------------------------------------
    async def create_workspace(self, owner_id: uuid.UUID, name: str) -> Workspace:
        """Insert a workspace (no builds yet)."""
        await trio.lowlevel.checkpoint()
        self._hit("InsertWorkspace")
        ws = Workspace(uuid.uuid4(), owner_id, name, self._now())
        self._workspaces[ws.id] = ws
        self._workspace_builds[ws.id] = []
        return ws

    async def get_workspace(self, workspace_id: uuid.UUID) -> Workspace | None:
        """The workspace, or None."""
        await trio.lowlevel.checkpoint()
        self._hit("GetWorkspaceByID")
        return self._workspaces.get(workspace_id)

    async def create_build(self, workspace_id: uuid.UUID) -> WorkspaceBuild:
        """A new latest build (no agents yet: the workspace looks stopped)."""
        await trio.lowlevel.checkpoint()
        self._hit("InsertWorkspaceBuild")
        builds = self._workspace_builds.get(workspace_id)
        if builds is None:
            raise WorkspaceNotFound(f"workspace {workspace_id} not found")
        build = WorkspaceBuild(uuid.uuid4(), workspace_id, len(builds) + 1, self._now())
        self._builds[build.id] = build
        builds.append(build.id)
        self._build_agents[build.id] = []
        return build

    async def create_agent(
        self, build_id: uuid.UUID, name: str, address: str, token: str, directory: str = ""
    ) -> WorkspaceAgent:
        """Insert an agent into a build."""
        await trio.lowlevel.checkpoint()
        self._hit("InsertWorkspaceAgent")
        build = self._builds.get(build_id)
        if build is None:
            raise BuildNotFound(f"build {build_id} not found")
        agent = WorkspaceAgent(
            uuid.uuid4(), build_id, build.workspace_id, name, address, token, directory, self._now()
        )
        self._agents[agent.id] = agent
        self._build_agents[build_id].append(agent.id)
        return agent

    async def latest_build_agents(self, workspace_id: uuid.UUID) -> list[WorkspaceAgent]:
        """Agents of the workspace's latest build, oldest first."""
        await trio.lowlevel.checkpoint()
        self._hit("GetWorkspaceAgentsInLatestBuild")
        builds = self._workspace_builds.get(workspace_id)
        if not builds:
            return []
        return [self._agents[a] for a in self._build_agents[builds[-1]]]

    async def agent_by_id(self, agent_id: uuid.UUID) -> WorkspaceAgent | None:
        """The agent, or None."""
        await trio.lowlevel.checkpoint()
        self._hit("GetWorkspaceAgentByID")
        return self._agents.get(agent_id)

    async def update_binding(
        self,
        chat_id: uuid.UUID,
        workspace_id: uuid.UUID | None,
        build_id: uuid.UUID | None,
        agent_id: uuid.UUID | None,
    ) -> None:
        """Set the chat's workspace/build/agent binding; ChatNotFound when missing."""
        await trio.lowlevel.checkpoint()
        self._hit("UpdateChatBinding")
        chat = self._chat(chat_id)
        self._set_chat(chat, workspace_id=workspace_id, build_id=build_id, agent_id=agent_id)

    # -- subagents ------------------------------------------------------------
    async def child_chats(self, parent_chat_id: uuid.UUID) -> list[Chat]:
        """Children of a chat, oldest first."""
        await trio.lowlevel.checkpoint()
        self._hit("GetChildChats")
        children = [c for c in self._chats.values() if c.parent_chat_id == parent_chat_id]
        children.sort(key=lambda c: (c.created_at, c.id))
        return children

    async def parent_of(self, chat_id: uuid.UUID) -> uuid.UUID | None:
        """The chat's parent id; ChatNotFound when the row is missing."""
        await trio.lowlevel.checkpoint()
        self._hit("GetChatParent")
        return self._chat(chat_id).parent_chat_id

    # -- accounting -----------------------------------------------------------
    def statement_counts(self) -> dict[str, int]:
        """Executions per statement name since the store was created."""
        return self._counter.snapshot()
