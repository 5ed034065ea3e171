"""The in-memory Store: the embedded default for one process, and the reference
semantics the PostgreSQL adapter is tested against (tests/contract/).

Each operation starts with one Trio checkpoint and then runs synchronously, so
it is atomic (nothing else runs in between) and still a scheduling point, the
way one database transaction is.

Statement accounting mirrors what the PostgreSQL adapter executes on the same
branch, so `statement_counts()` compares across adapters. Every status change
(send, edit, interrupt, promote, heartbeat, a turn's writes and its finish) is a
decided plan executed by `apply` (`chatd_trio.store.ops` decides; see
`chatd_trio.lifecycle`), which runs, per attempt (`+` = also executed, `[..]` =
only when the plan has that effect):

=====================  ====================================================================
apply                  LockChatForUpdate + GetChatForWrite (row, queue length, write marks)
                       then, on a replayed write: [GetChatMessagesByOp when it inserted]
                       + [GetQueuedMessages when it promoted];
                       on a guard miss: nothing more (the caller decides again);
                       otherwise, in this order: [GetChatMessageByID (edit target)]
                       + [DeleteQueuedMessage (promote/move a chosen queued message)]
                       + [PopQueuedMessage (promote the oldest)]
                       + [SoftDeleteMessagesFrom] + [DeleteQueuedMessages (clear)]
                       + [InsertQueuedMessage (move to front, or enqueue)]
                       + [InsertChatMessages (+ NotifyInTransaction with announce=)]
                       + [UpdateChat when the row changes]
                       + [GetQueuedMessages when the queue changed]
create_chat            [GetChatByID (parent)] + InsertChat + InsertChatMessages
get_chat               GetChatByID
list_chats             GetChatsByOwner
messages_after         GetChatMessagesAfter
prompt_messages        GetPromptMessages
latest_assistant_text  GetLatestAssistantText
list_queued            GetQueuedMessages
delete_queued          DeleteQueuedMessage + [GetQueuedMessages when one was deleted]
acquire                AcquireChats (nothing when limit < 1)
release                ReleaseChats (nothing when no leases)
recover_stale          RecoverStaleChats
update_binding         UpdateChatBinding (without a lease; with one it is an `apply`)
create_workspace       InsertWorkspace
get_workspace          GetWorkspaceByID
create_build           InsertWorkspaceBuild
create_agent           InsertWorkspaceAgent
latest_build_agents    GetWorkspaceAgentsInLatestBuild
agent_by_id            GetWorkspaceAgentByID
child_chats            GetChildChats
parent_of              GetChatParent
=====================  ====================================================================

With `announce=`, the inserted messages' notifies are delivered to this adapter's
`pubsub` within the operation, as PostgreSQL does at COMMIT.

A statement that finds nothing still counts (it ran); an operation that fails on
a missing row stops after the statement that found it missing.

Decisions where the spec is silent:
- Collection reads by chat id (messages_after, prompt_messages, list_queued,
  child_chats, latest_assistant_text) return empty for an unknown chat: one
  statement, no existence check. Single-row lookups and mutations raise.
- prompt_messages after a compaction returns every model-visible message newer
  than the latest summary, compressed or not; the visible `chat_summarized`
  call and result are user-only, so the model-visible filter drops them.
- A write is atomic: everything that can fail (the storable-value gate, an edit's
  target, a chosen queued message, the announcer and the check of every notify it
  built) runs before the first change.
- Timestamps are strictly increasing per store, so "oldest updated_at first"
  follows operation order even when the clock does not advance.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import trio

from chatd_trio.config import LimitsConfig, RequestOptions
from chatd_trio.domain import (
    Chat,
    Message,
    NewMessage,
    Part,
    QueuedMessage,
    Role,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
    optional_uuid,
    parse_row_id,
    parse_uuid,
    text_of,
)
from chatd_trio.errors import (
    BuildNotFound,
    ChatNotFound,
    PermissionDenied,
    QueuedMessageNotFound,
    WorkspaceNotFound,
)
from chatd_trio.lifecycle import ChatView, Effect, Event, Plan
from chatd_trio.pubsub.base import InlineDelivery
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
    pipelined_statements,
    promoted_by,
    prompt_tail_plan,
)
from chatd_trio.store.ops import StoreOps, user_message

__all__ = ["MemoryStore"]

Clock = Callable[[], datetime]

# Timestamps advance by at least this much per operation (PostgreSQL's resolution).
_TICK = timedelta(microseconds=1)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _uncounted(*names: str) -> None:
    """Counting nothing: a pipelined write counted its statements up front."""


class MemoryStore(StoreOps):
    """A `Store` held in process memory; semantics identical to the PostgreSQL adapter."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        limits: LimitsConfig | None = None,
        pubsub: InlineDelivery | None = None,
    ) -> None:
        """`pubsub`: the replicas' pubsub (a `MemoryPubSub`), for notifies sent with an
        insert (`announce=`)."""
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
        # Idempotent writes: the last write applied to each chat, and what each inserted.
        self._last_op: dict[uuid.UUID, uuid.UUID] = {}
        self._op_messages: dict[tuple[uuid.UUID, uuid.UUID], list[int]] = {}
        # The last message a run wrote in each chat (PostgreSQL: chat_messages.owner_token).
        self._last_stamped: dict[uuid.UUID, int] = {}
        # Every message is in memory anyway: the prompt cache needs no bound here.
        self._prompts = PromptCache()

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

    def _deliver(self, notifies: Sequence[tuple[str, str]]) -> None:
        """Deliver the notifies of inserted messages within the operation, like PostgreSQL
        delivers a transaction's NOTIFYs at its commit."""
        assert self._pubsub is not None, "checked by _check_announce"
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

    def _new_messages(
        self,
        chat_id: uuid.UUID,
        messages: Sequence[NewMessage],
        now: datetime,
        before: int | None = None,
    ) -> list[Message]:
        """The rows `messages` become (ids, predecessor ids), not stored yet.

        `before`: the predecessor is the latest visible message older than this id
        (an edit's replacement follows what the edit keeps).
        """
        out: list[Message] = []
        ids = self._chat_message_ids.get(chat_id, [])
        prev = next(
            (
                i
                for i in reversed(ids)
                if self._messages[i].user_visible
                and not self._messages[i].deleted
                and (before is None or i < before)
            ),
            0,
        )
        next_id = self._next_message_id
        for new in messages:
            msg = Message(
                id=next_id,
                chat_id=chat_id,
                role=new.role,
                parts=tuple(new.parts),
                visibility=new.visibility,
                usage=new.usage,
                context_limit=new.context_limit,
                compressed=new.compressed,
                created_at=now,
            )
            next_id += 1
            if msg.user_visible:
                msg = dataclasses.replace(msg, prev_id=prev)
                prev = msg.id
            out.append(msg)
        return out

    def _store_messages(
        self,
        chat_id: uuid.UUID,
        messages: Sequence[Message],
        write: Write | None = None,
        *,
        counted: bool = False,
    ) -> None:
        if not counted:
            self._hit("InsertChatMessages")
        ids = self._chat_message_ids.setdefault(chat_id, [])
        for msg in messages:
            # Stored without prev_id: reads return None there, like the PostgreSQL adapter.
            self._messages[msg.id] = dataclasses.replace(msg, prev_id=None)
            ids.append(msg.id)
            self._next_message_id = msg.id + 1
        if write is not None:
            self._op_messages[chat_id, write.op_id] = [m.id for m in messages]

    def _insert_messages(
        self, chat_id: uuid.UUID, messages: Sequence[NewMessage], now: datetime
    ) -> list[Message]:
        out = self._new_messages(chat_id, messages, now)
        self._store_messages(chat_id, out)
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

    # -- chats and messages ---------------------------------------------------
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
        await trio.lowlevel.checkpoint()
        self._check_announce(announce)
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
            status=plan.target,
            created_at=now,
            updated_at=now,
            parent_chat_id=parent_chat_id,
            root_chat_id=root_chat_id,
            workspace_id=workspace_id,
            build_id=build_id,
            agent_id=agent_id,
            mcp_servers=tuple(mcp_servers),
            model_options=model_options,
        )
        self._chats[chat.id] = chat
        inserted = self._insert_messages(chat.id, messages, now)
        if announce is not None:
            self._deliver(announce.changes(Event.CREATE, Applied(True, chat)))
        return chat, inserted[-1]

    async def get_chat(self, chat_id: uuid.UUID) -> Chat:
        """Raises ChatNotFound."""
        chat_id = parse_uuid(chat_id, "chat_id")
        await trio.lowlevel.checkpoint()
        self._hit("GetChatByID")
        return self._out(self._chat(chat_id))

    async def list_chats(self, owner_id: uuid.UUID) -> list[Chat]:
        """The owner's chats, newest first."""
        owner_id = parse_uuid(owner_id, "owner_id")
        await trio.lowlevel.checkpoint()
        self._hit("GetChatsByOwner")
        chats = [self._out(c) for c in self._chats.values() if c.owner_id == owner_id]
        chats.sort(key=lambda c: (c.created_at, c.id), reverse=True)
        return chats

    async def messages_after(self, chat_id: uuid.UUID, after_id: int) -> list[Message]:
        """User-visible, non-deleted messages with id > after_id, in id order."""
        chat_id = parse_uuid(chat_id, "chat_id")
        after_id = parse_row_id(after_id, "after_id")
        await trio.lowlevel.checkpoint()
        self._hit("GetChatMessagesAfter")
        return [m for m in self._live_messages(chat_id) if m.id > after_id and m.user_visible]

    async def prompt_messages(self, chat_id: uuid.UUID) -> list[Message]:
        """Model-visible, non-deleted history after the compaction boundary (docs/spec.md §3.1)."""
        chat_id = parse_uuid(chat_id, "chat_id")
        await trio.lowlevel.checkpoint()
        self._hit("GetPromptMessages")
        prompt = self._prompt(chat_id)
        self._prompts.refresh(chat_id, prompt)
        return prompt

    def _prompt(self, chat_id: uuid.UUID) -> list[Message]:
        visible = [m for m in self._live_messages(chat_id) if m.model_visible]
        summaries = [m for m in visible if m.compressed and m.role is Role.USER]
        if not summaries:
            return visible
        boundary = summaries[-1].id
        system = [
            m for m in visible if m.role is Role.SYSTEM and not m.compressed and m.id < boundary
        ]
        return system + [m for m in visible if m.id >= boundary]

    def _last_model_visible(self, chat_id: uuid.UUID, up_to: int | None = None) -> int:
        return max(
            (
                m.id
                for m in self._live_messages(chat_id)
                if m.model_visible and (up_to is None or m.id <= up_to)
            ),
            default=0,
        )

    async def latest_assistant_text(self, chat_id: uuid.UUID) -> str | None:
        """The latest non-blank user-visible assistant text (a subagent's report)."""
        chat_id = parse_uuid(chat_id, "chat_id")
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
        chat_id = parse_uuid(chat_id, "chat_id")
        await trio.lowlevel.checkpoint()
        self._hit("GetQueuedMessages")
        return list(self._queues.get(chat_id, ()))

    async def delete_queued(
        self,
        chat_id: uuid.UUID,
        queued_id: int,
        *,
        owner_id: uuid.UUID | None = None,
        announce: Announcer | None = None,
    ) -> list[QueuedMessage]:
        """Delete one queued message; returns the remaining queue."""
        chat_id = parse_uuid(chat_id, "chat_id")
        owner_id = optional_uuid(owner_id, "owner_id")
        queued_id = parse_row_id(queued_id, "queued_id")
        await trio.lowlevel.checkpoint()
        self._check_announce(announce)
        # The PostgreSQL adapter sends these together (the delete guarded by the owner).
        if owner_id is not None:
            self._hit("GetChatByID")
        self._hit("DeleteQueuedMessage", "GetQueuedMessages")
        if owner_id is not None and self._chat(chat_id).owner_id != owner_id:
            raise PermissionDenied(f"chat {chat_id} does not belong to this user")
        queue = self._queues.get(chat_id, [])
        found = next((q for q in queue if q.id == queued_id), None)
        if found is None:
            raise QueuedMessageNotFound(f"queued message {queued_id} not found in chat {chat_id}")
        queue.remove(found)
        if announce is not None:
            chat = self._out(self._chat(chat_id))
            changed = Applied(True, chat, queue=tuple(queue))
            self._deliver(announce.changes(None, changed))
        return list(queue)

    # -- the guarded write ------------------------------------------------------
    def _out(self, chat: Chat) -> Chat:
        """The row as a read returns it: with the queue's current length."""
        return dataclasses.replace(chat, queued=len(self._queues.get(chat.id, ())))

    def _replayed(self, chat: Chat, write: Write) -> Applied | None:
        """The result of an earlier attempt of `write` that already landed, if any."""
        ids = self._op_messages.get((chat.id, write.op_id))
        if self._last_op.get(chat.id) != write.op_id and not ids:
            return None
        if ids:
            self._hit("GetChatMessagesByOp")
        inserted = tuple(self._messages[i] for i in ids or ())
        promoted = promoted_by(write, inserted)
        queue: tuple[QueuedMessage, ...] | None = None
        if promoted is not None:
            self._hit("GetQueuedMessages")
            queue = tuple(self._queues.get(chat.id, ()))
        return Applied(True, chat, inserted=inserted, promoted=promoted, queue=queue, replayed=True)

    def _write_row(
        self,
        chat: Chat,
        plan: Plan,
        now: datetime,
        *,
        worker_id: uuid.UUID | None = None,
        binding: Binding | None = None,
    ) -> Chat:
        """Set what `plan` says of the row (status, owner, token, heartbeat, error)."""
        changes: dict[str, object] = {"status": plan.target}
        if plan.owned_after:
            if plan.has(Effect.CLAIM):
                changes.update(worker_id=worker_id, started_at=now, heartbeat_at=now)
            elif plan.has(Effect.BEAT):
                changes.update(heartbeat_at=now)
        else:
            changes.update(worker_id=None, started_at=None, heartbeat_at=None)
        if plan.has(Effect.NEW_TOKEN):
            changes["owner_token"] = chat.owner_token + 1
        if plan.has(Effect.SET_ERROR):
            changes["last_error"] = plan.last_error
        elif plan.target is not chat.status:
            changes["last_error"] = None
        if plan.target is not chat.status or plan.has(Effect.CLAIM):
            changes["updated_at"] = now
        if binding is not None:
            changes.update(
                workspace_id=binding.workspace_id,
                build_id=binding.build_id,
                agent_id=binding.agent_id,
            )
        return self._set_chat(chat, **changes)

    async def apply(
        self,
        chat_id: uuid.UUID,
        plan: Plan,
        write: Write,
        *,
        announce: Announcer | None = None,
    ) -> Applied:
        """Execute `plan` if its guard still holds; all of it or nothing."""
        await trio.lowlevel.checkpoint()
        self._check_announce(announce)
        # A pipelined write sends every statement with its guard read: all of them count,
        # whatever the guard finds; the others count as they run.
        batched = pipelined(plan)
        if batched:
            self._hit(*pipelined_statements(plan, write))
        else:
            self._hit("LockChatForUpdate")
        stored = self._chat(chat_id)
        hit = self._hit if not batched else _uncounted
        hit("GetChatForWrite")
        if write.owner_id is not None and stored.owner_id != write.owner_id:
            raise PermissionDenied(f"chat {chat_id} does not belong to this user")
        chat = self._out(stored)
        replay = self._replayed(chat, write)
        if replay is not None:
            self._remember_write(chat_id, plan, write, replay, 0)
            return replay
        if not plan.guard.holds(ChatView.of(chat)):
            return Applied(False, chat)
        queue = self._queues.setdefault(chat_id, [])
        prev_model = self._last_model_visible(chat_id)
        # Everything that can fail runs before the first change: the write is atomic.
        if plan.has(Effect.REPLACE_FROM):
            assert write.edit_from is not None
            hit("GetChatMessageByID")
            check_edit_target(self._messages.get(write.edit_from), chat_id, write.edit_from)
        chosen: QueuedMessage | None = None
        if plan.has(Effect.PROMOTE_CHOSEN) or plan.has(Effect.QUEUE_TO_FRONT):
            hit("DeleteQueuedMessage")
            chosen = next((q for q in queue if q.id == write.queued_id), None)
            if chosen is None:
                raise QueuedMessageNotFound(
                    f"queued message {write.queued_id} not found in chat {chat_id}"
                )
        new: list[NewMessage] = list(write.messages) if plan.has(Effect.INSERT) else []
        promoted_from: QueuedMessage | None = None
        if plan.has(Effect.PROMOTE_OLDEST):
            hit("PopQueuedMessage")
            promoted_from = queue[0]
        elif plan.has(Effect.PROMOTE_CHOSEN):
            promoted_from = chosen
        if promoted_from is not None:
            new.append(user_message(promoted_from.parts))
        now = self._now()
        replace = plan.has(Effect.REPLACE_FROM)
        inserted = self._new_messages(chat_id, new, now, write.edit_from if replace else None)
        notifies: list[tuple[str, str]] = []
        if announce is not None and inserted:
            notifies += announce(inserted, refresh=replace)
            assert self._pubsub is not None, "checked by _check_announce"
            for channel, wire in notifies:
                self._pubsub.check_nowait(channel, wire)
        # -- nothing below can fail ------------------------------------------------------
        if replace:
            hit("SoftDeleteMessagesFrom")
            for mid in self._chat_message_ids.get(chat_id, ()):
                if mid >= (write.edit_from or 0) and not self._messages[mid].deleted:
                    self._messages[mid] = dataclasses.replace(self._messages[mid], deleted=True)
        if plan.has(Effect.CLEAR_QUEUE):
            hit("DeleteQueuedMessages")
            queue.clear()
        if promoted_from is not None:
            queue.remove(promoted_from)
        queued: QueuedMessage | None = None
        if plan.has(Effect.QUEUE_TO_FRONT):
            assert chosen is not None
            hit("InsertQueuedMessage")
            queue.remove(chosen)
            queue.insert(0, chosen)
            queued = chosen
        if plan.has(Effect.ENQUEUE):
            hit("InsertQueuedMessage")
            queued = self._new_queued(chat_id, write.parts, now)
            queue.append(queued)
        if inserted:
            self._store_messages(chat_id, inserted, write, counted=batched)
            if write.stamp is not None:
                self._last_stamped[chat_id] = inserted[-1].id
        if plan.changes_row or write.binding is not None:
            hit("UpdateChat")
            stored = self._write_row(
                stored, plan, now, worker_id=write.worker_id, binding=write.binding
            )
            self._last_op[chat_id] = write.op_id
        touched_queue = bool(
            plan.effects
            & {Effect.ENQUEUE, Effect.QUEUE_TO_FRONT, Effect.PROMOTE_OLDEST, Effect.PROMOTE_CHOSEN}
        )
        if touched_queue:
            hit("GetQueuedMessages")
        applied = Applied(
            True,
            self._out(stored),
            inserted=tuple(inserted),
            promoted=inserted[-1] if promoted_from is not None else None,
            queued=queued,
            queue=tuple(queue) if touched_queue else None,
        )
        if announce is not None:
            notifies += announce.changes(plan.event, applied)
        if notifies:
            self._deliver(notifies)
        self._remember_write(chat_id, plan, write, applied, prev_model)
        return applied

    # -- bulk ownership ---------------------------------------------------------
    async def _claim(
        self,
        plan: Plan,
        worker_id: uuid.UUID,
        limit: int,
        announce: Announcer | None,
        prompts: bool = False,
    ) -> list[Chat]:
        await trio.lowlevel.checkpoint()
        self._check_announce(announce)
        if limit < 1:
            return []
        self._hit("AcquireChats")
        ready = [c for c in self._chats.values() if c.status is plan.guard.status]
        ready.sort(key=lambda c: (c.updated_at, c.id))
        now = self._now()
        claimed = [
            self._out(self._write_row(c, plan, now, worker_id=worker_id)) for c in ready[:limit]
        ]
        if prompts:
            self._load_prompts(claimed)
        self._announce_each(announce, plan, claimed)
        return claimed

    def _load_prompts(self, claimed: Sequence[Chat]) -> None:
        """As the PostgreSQL adapter: the tails of every claim in one statement, then the
        prompts it could not complete from the cache in one more."""
        self._hit("GetPromptTails")
        missed = False
        for chat in claimed:
            stamped = self._last_stamped.get(chat.id, 0)
            anchor = self._last_model_visible(chat.id, stamped)
            tail = [m for m in self._live_messages(chat.id) if m.model_visible and m.id > stamped]
            prompt = prompt_tail_plan(chat.id, anchor, tail, self._prompts)
            if prompt is None:
                missed = True
                prompt = tuple(self._prompt(chat.id))
            self._prompts.put(chat.id, prompt, chat.owner_token)
        if missed:
            self._hit("GetPromptMessages")

    def _announce_each(self, announce: Announcer | None, plan: Plan, chats: Sequence[Chat]) -> None:
        if announce is None or not chats:
            return
        notifies = [n for c in chats for n in announce.changes(plan.event, Applied(True, c))]
        if notifies:
            self._deliver(notifies)

    async def _release(self, plan: Plan, leases: Sequence[Lease]) -> int:
        await trio.lowlevel.checkpoint()
        if not leases:
            return 0
        self._hit("ReleaseChats")
        now = self._now()
        released = 0
        for lease in leases:
            chat = self._chats.get(lease.chat_id)
            if chat and chat.status is plan.guard.status and chat.owner_token == lease.token:
                self._write_row(chat, plan, now)
                released += 1
        return released

    async def _recover(
        self, plan: Plan, stale_after: float, announce: Announcer | None
    ) -> list[uuid.UUID]:
        await trio.lowlevel.checkpoint()
        self._check_announce(announce)
        self._hit("RecoverStaleChats")
        now = self._now()
        cutoff = now - timedelta(seconds=stale_after)
        recovered: list[Chat] = []
        for chat in list(self._chats.values()):
            if (
                chat.status is plan.guard.status
                and chat.heartbeat_at is not None
                and chat.heartbeat_at <= cutoff
            ):
                recovered.append(self._out(self._write_row(chat, plan, now)))
        self._announce_each(announce, plan, recovered)
        return [c.id for c in recovered]

    # -- workspaces -----------------------------------------------------------
    async def create_workspace(self, owner_id: uuid.UUID, name: str) -> Workspace:
        """Insert a workspace (no builds yet)."""
        owner_id = parse_uuid(owner_id, "owner_id")
        (name,) = storable_texts(name=name)
        await trio.lowlevel.checkpoint()
        self._hit("InsertWorkspace")
        ws = Workspace(uuid.uuid4(), owner_id, name, self._now())
        self._workspaces[ws.id] = ws
        self._workspace_builds[ws.id] = []
        return ws

    async def get_workspace(self, workspace_id: uuid.UUID) -> Workspace | None:
        """The workspace, or None."""
        workspace_id = parse_uuid(workspace_id, "workspace_id")
        await trio.lowlevel.checkpoint()
        self._hit("GetWorkspaceByID")
        return self._workspaces.get(workspace_id)

    async def create_build(self, workspace_id: uuid.UUID) -> WorkspaceBuild:
        """A new latest build (no agents yet: the workspace looks stopped)."""
        workspace_id = parse_uuid(workspace_id, "workspace_id")
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
        build_id = parse_uuid(build_id, "build_id")
        name, address, token, directory = storable_texts(
            name=name, address=address, token=token, directory=directory
        )
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
        workspace_id = parse_uuid(workspace_id, "workspace_id")
        await trio.lowlevel.checkpoint()
        self._hit("GetWorkspaceAgentsInLatestBuild")
        builds = self._workspace_builds.get(workspace_id)
        if not builds:
            return []
        return [self._agents[a] for a in self._build_agents[builds[-1]]]

    async def agent_by_id(self, agent_id: uuid.UUID) -> WorkspaceAgent | None:
        """The agent, or None."""
        agent_id = parse_uuid(agent_id, "agent_id")
        await trio.lowlevel.checkpoint()
        self._hit("GetWorkspaceAgentByID")
        return self._agents.get(agent_id)

    async def _set_binding(self, chat_id: uuid.UUID, binding: Binding) -> None:
        await trio.lowlevel.checkpoint()
        self._hit("UpdateChatBinding")
        chat = self._chat(chat_id)
        self._set_chat(
            chat,
            workspace_id=binding.workspace_id,
            build_id=binding.build_id,
            agent_id=binding.agent_id,
        )

    # -- subagents ------------------------------------------------------------
    async def child_chats(self, parent_chat_id: uuid.UUID) -> list[Chat]:
        """Children of a chat, oldest first."""
        parent_chat_id = parse_uuid(parent_chat_id, "parent_chat_id")
        await trio.lowlevel.checkpoint()
        self._hit("GetChildChats")
        children = [
            self._out(c) for c in self._chats.values() if c.parent_chat_id == parent_chat_id
        ]
        children.sort(key=lambda c: (c.created_at, c.id))
        return children

    async def parent_of(self, chat_id: uuid.UUID) -> uuid.UUID | None:
        """The chat's parent id; ChatNotFound when the row is missing."""
        chat_id = parse_uuid(chat_id, "chat_id")
        await trio.lowlevel.checkpoint()
        self._hit("GetChatParent")
        return self._chat(chat_id).parent_chat_id

    # -- accounting -----------------------------------------------------------
    def statement_counts(self) -> dict[str, int]:
        """Executions per statement name since the store was created."""
        return self._counter.snapshot()
