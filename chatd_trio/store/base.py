"""The Store port: use-case sized, atomic operations (one transaction each).

Both adapters (memory, PostgreSQL) pass the same contract suite in
`tests/contract/`. Every statement has a name; `statement_counts()` returns how
many times each ran, counted where the statement executes.
"""

from __future__ import annotations

import enum
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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
)
from chatd_trio.errors import DecodeError, EditRefused, MessageNotFound, PayloadTooLarge
from chatd_trio.lifecycle import ChatView, Effect, Event, Plan
from chatd_trio.storable import Cleaned, is_blank, storable_parts, storable_text, stored_size


class TurnOutcome(enum.StrEnum):
    """How a turn ended; decides the final transition (docs/spec.md §1)."""

    DONE = "done"  # loop finished normally -> waiting (or pending with a promoted message)
    INTERRUPTED = "interrupted"  # user interrupt -> waiting (queued message still promoted)
    ERROR = "error"  # run failed -> error with last_error
    SHUTDOWN = "shutdown"  # replica closing -> pending, no error
    UNAVAILABLE = "unavailable"  # the store stayed unavailable -> pending, no error
    LOST = "lost"  # the run lost the chat (fenced): it writes nothing more


@dataclass(frozen=True)
class Lease:
    """A run's claim on a chat: the replica that acquired it and the ownership token of
    that acquisition. Every write of the run carries it and is guarded by it."""

    chat_id: uuid.UUID
    worker_id: uuid.UUID
    token: int

    @classmethod
    def of(cls, chat: Chat) -> Lease:
        """The lease of a chat row just acquired."""
        if chat.worker_id is None:
            raise ValueError(f"chat {chat.id} is not owned")
        return cls(chat.id, chat.worker_id, chat.owner_token)


@dataclass(frozen=True)
class Binding:
    """A chat's workspace binding: an optimistic cache of the agent to use."""

    workspace_id: uuid.UUID | None
    build_id: uuid.UUID | None
    agent_id: uuid.UUID | None


@dataclass(frozen=True)
class Write:
    """What a decided plan carries: one guarded write of one chat.

    `op_id` makes the write idempotent: an attempt retried after an ambiguous
    failure (the connection died around COMMIT) finds its own mark on the row (or
    on the messages it inserted) and reports that instead of applying twice.
    """

    messages: tuple[NewMessage, ...] = ()  # INSERT, in order
    parts: tuple[Part, ...] = ()  # ENQUEUE
    queued_id: int | None = None  # PROMOTE_CHOSEN, QUEUE_TO_FRONT
    edit_from: int | None = None  # REPLACE_FROM
    worker_id: uuid.UUID | None = None  # CLAIM
    owner_id: uuid.UUID | None = None  # guard: the chat belongs to this user
    stamp: int | None = None  # the ownership token stamped on inserted messages
    binding: Binding | None = None
    op_id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(frozen=True)
class Applied:
    """What a guarded write did.

    `applied` is False when the guard no longer held: nothing changed and `chat`
    is the row as it is now, to decide again on. `replayed` is True when an earlier
    attempt of the same write had already landed.
    """

    applied: bool
    chat: Chat
    inserted: tuple[Message, ...] = ()
    promoted: Message | None = None
    queued: QueuedMessage | None = None
    queue: tuple[QueuedMessage, ...] | None = None
    replayed: bool = False

    @property
    def view(self) -> ChatView:
        return ChatView.of(self.chat)


def promoted_by(write: Write, inserted: Sequence[Message]) -> Message | None:
    """The queued message a write promoted, among the messages it inserted: a write
    inserts its own messages, then the promoted one (so a replay can tell them apart)."""
    return inserted[-1] if len(inserted) > len(write.messages) else None


@dataclass(frozen=True)
class SendResult:
    """Outcome of sending a user message: inserted (chat now pending) or queued."""

    chat: Chat
    message: Message | None
    queued: QueuedMessage | None
    queue: tuple[QueuedMessage, ...]


@dataclass(frozen=True)
class EditResult:
    chat: Chat
    message: Message


@dataclass(frozen=True)
class FinishResult:
    """Outcome of the final transition.

    `changed` is False when the run no longer held the chat (fenced: another run
    took it, or an edit made it `pending`): nothing changed and the caller
    publishes nothing. `inserted` are the turn's final messages written with it.
    """

    chat: Chat
    changed: bool
    owned_elsewhere: bool
    promoted: Message | None
    queue: tuple[QueuedMessage, ...]
    inserted: tuple[Message, ...] = ()


class Announcer(Protocol):
    """Builds the notifies of what a store operation changed: the stream notifies of
    the messages it inserted, and the status, queue and owner notifies of the change.

    A store that `announces_to` the replica's pubsub sends them inside the writing
    transaction: listeners then receive a chat's notifies in commit order, which is
    id order for messages (inserts hold the chat's row lock), whichever replica
    wrote them, and a status never overtakes the message it follows. Sent after the
    commit instead, a notify from the replica that wrote a message can overtake the
    notify of the message before it, and a subscriber would have to read the gap
    from the database; and every notify would be one more round trip.
    """

    def __call__(
        self, messages: Sequence[Message], *, refresh: bool = False
    ) -> Sequence[tuple[str, str]]:
        """(channel, payload) pairs for `messages`; `refresh` for an edit's replacement."""
        ...

    def changes(self, event: Event | None, applied: Applied) -> Sequence[tuple[str, str]]:
        """(channel, payload) pairs announcing what `event` did to the chat (status, queue,
        owner list), sent after the message notifies. `applied` is the write's result
        (for the bulk operations and `create_chat`: the changed row). `event` None: a
        change outside the lifecycle (`delete_queued`): `applied.queue` is the new queue."""
        ...


# Effects the PostgreSQL adapter sends in the same batch as the guard read, each gated
# by the mark the read sets when the guard holds: such a write is one exchange (two
# when its notifies depend on what it inserted). The others read before they write.
PIPELINED_EFFECTS = frozenset(
    {Effect.INSERT, Effect.ENQUEUE, Effect.CLAIM, Effect.BEAT, Effect.NEW_TOKEN, Effect.SET_ERROR}
)


def pipelined(plan: Plan) -> bool:
    """Whether `plan` is executed as one pipelined batch (see `PIPELINED_EFFECTS`)."""
    return plan.effects <= PIPELINED_EFFECTS


def pipelined_statements(plan: Plan, write: Write) -> list[str]:
    """The statements of a pipelined write, in order: all of them run (the effects as
    no-ops when the guard does not hold), so both adapters count all of them."""
    names = ["LockChatForUpdate", "GetChatForWrite"]
    if plan.has(Effect.ENQUEUE):
        names.append("InsertQueuedMessage")
    if plan.has(Effect.INSERT) and write.messages:
        names.append("InsertChatMessages")
    if plan.changes_row or write.binding is not None:
        names.append("UpdateChat")
    if plan.has(Effect.ENQUEUE):
        names.append("GetQueuedMessages")
    return names


@dataclass(frozen=True)
class _CachedPrompt:
    messages: tuple[Message, ...]
    # The ownership token the prompt was validated under at acquisition (None: read
    # outside one, usable only once an acquisition validates it).
    token: int | None

    @property
    def last(self) -> int:
        return self.messages[-1].id if self.messages else 0


class PromptCache:
    """The model-visible history (`prompt_messages`) of chats this replica runs, kept
    across their turns so that a steady turn reads no history.

    An acquisition validates an entry against the database in its own transaction:
    the entry is whole when its last message is the chat's last model-visible message
    up to the last one a run wrote (`anchor`); then the prompt is the entry plus the
    messages written since by the API (the user's). The turn's own writes extend it,
    when the first message written names the entry's last one as its predecessor.
    Anything else (an edit, a compaction, another replica's turn) fails a check and
    costs one read. `max_chats` bounds it (least recently used first out).
    """

    def __init__(self, max_chats: int | None = None) -> None:
        self._max = max_chats
        self._entries: OrderedDict[uuid.UUID, _CachedPrompt] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def valid(self, chat_id: uuid.UUID, anchor: int) -> tuple[Message, ...] | None:
        """The entry when its last message is `anchor`; else forget it."""
        entry = self._entries.get(chat_id)
        if entry is None:
            return None
        if entry.last != anchor:
            del self._entries[chat_id]
            return None
        self._entries.move_to_end(chat_id)
        return entry.messages

    def put(self, chat_id: uuid.UUID, messages: Sequence[Message], token: int | None) -> None:
        self._entries[chat_id] = _CachedPrompt(tuple(messages), token)
        self._entries.move_to_end(chat_id)
        while self._max is not None and len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def refresh(self, chat_id: uuid.UUID, messages: Sequence[Message]) -> None:
        """A whole read of the prompt: it replaces the entry (for the same run)."""
        entry = self._entries.get(chat_id)
        self.put(chat_id, messages, entry.token if entry is not None else None)

    def extend(self, chat_id: uuid.UUID, prev: int, messages: Sequence[Message]) -> None:
        """A run wrote `messages`; `prev` is the chat's last model-visible message before."""
        entry = self._entries.get(chat_id)
        if entry is None:
            return
        if entry.last != prev or any(m.compressed for m in messages):
            # Someone else wrote in between, or a compaction moved the boundary.
            del self._entries[chat_id]
            return
        added = tuple(m for m in messages if m.model_visible and not m.deleted)
        self._entries[chat_id] = _CachedPrompt(entry.messages + added, entry.token)

    def forget(self, chat_id: uuid.UUID) -> None:
        self._entries.pop(chat_id, None)

    def get(self, lease: Lease) -> list[Message] | None:
        """The prompt of the turn holding `lease`, when its acquisition loaded it."""
        entry = self._entries.get(lease.chat_id)
        if entry is None or entry.token != lease.token:
            return None
        return list(entry.messages)


def prompt_tail_plan(
    chat_id: uuid.UUID, anchor: int, tail: Sequence[Message], cache: PromptCache
) -> tuple[Message, ...] | None:
    """The prompt of a chat just claimed, from its tail (the model-visible messages after
    the last one a run wrote) and the cache; None when it must be read whole."""
    if anchor == 0:
        # No run wrote yet: the tail is the whole history (nothing compacted either).
        return tuple(tail)
    cached = cache.valid(chat_id, anchor)
    return None if cached is None else cached + tuple(tail)


@dataclass(frozen=True)
class StatementCounter:
    """Counts statement executions per name."""

    counts: Counter[str]

    @classmethod
    def new(cls) -> StatementCounter:
        return cls(Counter())

    def hit(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


# Input checks shared by both adapters: the same bad input fails the same way.


def check_user_parts(
    parts: object, limits: LimitsConfig, field: str = "parts"
) -> Cleaned[tuple[Part, ...]]:
    """A user message's parts as they will be stored (`chatd_trio.storable`).

    Refuses (`DecodeError` naming `field`) parts that cannot be stored and a blank
    message (no parts, or only empty or whitespace-only text), and (`PayloadTooLarge`)
    one whose stored size in UTF-8 bytes exceeds `limits.max_message_bytes`.
    """
    cleaned = storable_parts(parts, field)
    if is_blank(cleaned.value):
        raise DecodeError(field, "blank: a message needs text that is not only whitespace")
    size = stored_size(cleaned.value)
    if size > limits.max_message_bytes:
        raise PayloadTooLarge(
            field, f"{size} bytes exceeds the limit of {limits.max_message_bytes}"
        )
    return cleaned


def check_edit_target(target: Message | None, chat_id: uuid.UUID, message_id: int) -> None:
    """Refuse to edit anything but a live user message of this chat (nothing changes)."""
    if target is None:
        raise MessageNotFound(f"message {message_id} not found")
    if target.chat_id != chat_id:
        raise EditRefused(f"message {message_id} belongs to another chat")
    if target.deleted:
        raise EditRefused(f"message {message_id} was deleted")
    if target.role is not Role.USER:
        raise EditRefused(f"message {message_id} is not a user message")


def check_title(title: object, limits: LimitsConfig) -> str:
    """A title as it will be stored; `DecodeError` when it is not text or is longer
    than `limits.max_title_chars`."""
    text = storable_text(title, "title").value
    if len(text) > limits.max_title_chars:
        raise DecodeError(
            "title", f"{len(text)} characters exceeds the limit of {limits.max_title_chars}"
        )
    return text


@runtime_checkable
class Store(Protocol):
    """Persistence and coordination. Every method is atomic.

    Status changes are decided by `chatd_trio.lifecycle` and executed through
    `apply` as one guarded write; the use-case methods (send, edit, interrupt,
    persist, finish, ...) are `chatd_trio.store.ops.StoreOps`, shared by every
    adapter. An optional `view` (the caller's last read of the chat) lets them
    decide without reading first; a stale view costs one more attempt, never a
    wrong write.
    """

    # -- the primitive: one decided, guarded write ----------------------------------
    async def apply(
        self,
        chat_id: uuid.UUID,
        plan: Plan,
        write: Write,
        *,
        announce: Announcer | None = None,
    ) -> Applied:
        """Execute `plan` with `write`'s payload, atomically, if the plan's guard still holds;
        otherwise change nothing and return the row as it is. ChatNotFound when missing,
        PermissionDenied when `write.owner_id` is set and the chat belongs to someone else."""
        ...

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
        model_options: RequestOptions | None = None,
        limits: LimitsConfig | None = None,
        announce: Announcer | None = None,
    ) -> tuple[Chat, Message]:
        """Create a chat with its first user message; the chat starts `pending`.

        With `parent_chat_id`, root_chat_id is the parent's root (or the parent).
        With `system_prompt`, a system message is inserted before the user message.
        `model_options` are kept with the chat (`Chat.model_options`); DecodeError when
        they are not JSON.
        `limits` replaces the store's own (the Server passes `Config.limits`). Every
        value passes the storable-value gate (`check_user_parts`, `check_title`).
        With `announce`, `announce.changes(Event.CREATE, ...)` goes out in the transaction.
        """
        ...

    async def get_chat(self, chat_id: uuid.UUID) -> Chat:
        """Raises ChatNotFound."""
        ...

    async def list_chats(self, owner_id: uuid.UUID) -> list[Chat]:
        """The owner's chats, newest first."""
        ...

    async def send_message(
        self,
        chat_id: uuid.UUID,
        parts: Sequence[Part],
        *,
        max_queued: int,
        announce: Announcer | None = None,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
        limits: LimitsConfig | None = None,
    ) -> SendResult:
        """Insert a user message (chat -> pending) or queue it.

        Queued when the chat is running or pending or a queue exists; QueueFull
        beyond `max_queued`. Inserting clears worker, started, heartbeat, last_error.
        The parts are checked by `check_user_parts` under `limits` (else the store's).
        """
        ...

    async def edit_message(
        self,
        chat_id: uuid.UUID,
        message_id: int,
        parts: Sequence[Part],
        *,
        announce: Announcer | None = None,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
        limits: LimitsConfig | None = None,
    ) -> EditResult:
        """Soft-delete the user message and every later one, insert the replacement,
        clear the queue, set the chat pending. MessageNotFound / EditRefused change nothing.
        The parts are checked by `check_user_parts` under `limits` (else the store's)."""
        ...

    async def interrupt(
        self,
        chat_id: uuid.UUID,
        *,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
        announce: Announcer | None = None,
    ) -> Chat:
        """Set `waiting` and clear the worker, unless the chat is `pending`."""
        ...

    async def messages_after(self, chat_id: uuid.UUID, after_id: int) -> list[Message]:
        """User-visible, non-deleted messages with id > after_id, in id order."""
        ...

    async def prompt_messages(self, chat_id: uuid.UUID) -> list[Message]:
        """Model-visible, non-deleted history after the compaction boundary (docs/spec.md §3.1):
        uncompressed system messages + the latest compressed summary + everything newer."""
        ...

    async def latest_assistant_text(self, chat_id: uuid.UUID) -> str | None:
        """The latest non-blank user-visible assistant text (a subagent's report)."""
        ...

    # -- the queue ------------------------------------------------------------
    async def list_queued(self, chat_id: uuid.UUID) -> list[QueuedMessage]: ...

    async def promote_queued(
        self,
        chat_id: uuid.UUID,
        queued_id: int,
        *,
        announce: Announcer | None = None,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
    ) -> SendResult:
        """Move one queued message into the history now (chat -> pending) if the chat is
        not running; otherwise move it to the front of the queue."""
        ...

    async def delete_queued(
        self,
        chat_id: uuid.UUID,
        queued_id: int,
        *,
        owner_id: uuid.UUID | None = None,
        announce: Announcer | None = None,
    ) -> list[QueuedMessage]:
        """Delete one queued message; returns the remaining queue.

        ChatNotFound, PermissionDenied (when `owner_id` is set and the chat belongs to
        someone else) and QueuedMessageNotFound change nothing. With `announce`, the
        new queue's notify goes out in the transaction."""
        ...

    # -- ownership ------------------------------------------------------------
    async def acquire(
        self,
        worker_id: uuid.UUID,
        limit: int,
        *,
        announce: Announcer | None = None,
        prompts: bool = False,
    ) -> list[Chat]:
        """Claim up to `limit` pending chats, oldest `updated_at` first, in one statement;
        each claim gets a new ownership token (`Lease.of(chat)`). With `announce`, each
        claim's `announce.changes(Event.ACQUIRE, ...)` goes out in the transaction.

        With `prompts`, the same transaction loads each claimed chat's prompt (what
        `prompt_messages` returns) into the store's prompt cache: from the cache and the
        messages written since when the cache still holds the rest, else read whole.
        The turn takes it with `cached_prompt(lease)`."""
        ...

    def cached_prompt(self, lease: Lease) -> list[Message] | None:
        """The prompt the acquisition of `lease` loaded (`acquire(prompts=True)`), with
        the messages the run wrote since; None when there is none to trust (read it
        with `prompt_messages`)."""
        ...

    async def release(self, leases: Sequence[Lease]) -> None:
        """Hand chats still held under these leases straight back to `pending`."""
        ...

    async def heartbeat(self, lease: Lease) -> bool:
        """Refresh heartbeat_at; False when the lease no longer holds the running chat."""
        ...

    async def recover_stale(
        self, stale_after: float, *, announce: Announcer | None = None
    ) -> list[uuid.UUID]:
        """Running chats with heartbeat older than `stale_after` seconds -> pending, each
        with a new ownership token (the stale run is fenced out). With `announce`, each
        one's `announce.changes(Event.STALE_RECOVERED, ...)` goes out in the transaction."""
        ...

    async def persist_step(
        self,
        lease: Lease,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
        op_id: uuid.UUID | None = None,
    ) -> list[Message]:
        """Insert a step's messages in one transaction while the lease holds the chat
        (running, or `waiting` after a user stop); PersistRefused (OwnershipLost when
        another run holds it) otherwise, and nothing is written. Retried with the same
        `op_id`, a write that already landed returns what it inserted. The messages pass
        the storable-value gate; a tool result that cannot be stored is stored as an
        error result."""
        ...

    async def persist_compaction(
        self,
        lease: Lease,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
        op_id: uuid.UUID | None = None,
    ) -> list[Message]:
        """Insert the three compaction messages; same ownership rule as persist_step."""
        ...

    async def finish_turn(
        self,
        lease: Lease,
        outcome: TurnOutcome,
        last_error: str | None = None,
        *,
        messages: Sequence[NewMessage] = (),
        announce: Announcer | None = None,
        op_id: uuid.UUID | None = None,
    ) -> FinishResult:
        """The final transition, with the turn's final `messages`, in one guarded write
        (docs/spec.md §1): a completed answer and its finish commit together."""
        ...

    # -- workspaces -----------------------------------------------------------
    async def create_workspace(self, owner_id: uuid.UUID, name: str) -> Workspace: ...

    async def get_workspace(self, workspace_id: uuid.UUID) -> Workspace | None: ...

    async def create_build(self, workspace_id: uuid.UUID) -> WorkspaceBuild:
        """A new latest build (no agents yet: the workspace looks stopped)."""
        ...

    async def create_agent(
        self, build_id: uuid.UUID, name: str, address: str, token: str, directory: str = ""
    ) -> WorkspaceAgent: ...

    async def latest_build_agents(self, workspace_id: uuid.UUID) -> list[WorkspaceAgent]:
        """Agents of the workspace's latest build, oldest first."""
        ...

    async def agent_by_id(self, agent_id: uuid.UUID) -> WorkspaceAgent | None: ...

    async def update_binding(
        self,
        chat_id: uuid.UUID,
        workspace_id: uuid.UUID | None,
        build_id: uuid.UUID | None,
        agent_id: uuid.UUID | None,
        *,
        lease: Lease | None = None,
    ) -> None:
        """Set the chat's binding; with `lease`, only while the lease holds the chat
        (PersistRefused otherwise)."""
        ...

    # -- subagents ------------------------------------------------------------
    async def child_chats(self, parent_chat_id: uuid.UUID) -> list[Chat]: ...

    async def parent_of(self, chat_id: uuid.UUID) -> uuid.UUID | None:
        """The chat's parent id; ChatNotFound when the row is missing."""
        ...

    # -- notifies -------------------------------------------------------------
    def announces_to(self, pubsub: object) -> bool:
        """Whether `announce` notifies sent by this store reach `pubsub`'s listeners.

        Operations that insert messages take `announce=`: the store sends what it
        builds in the inserting transaction (rolled back with it). Only pass it when
        this is True; otherwise publish after the operation.
        """
        ...

    # -- accounting -----------------------------------------------------------
    def statement_counts(self) -> dict[str, int]:
        """Executions per statement name since the store was opened."""
        ...


# Canonical statement names. Both adapters count exactly these names, per
# statement executed (the memory adapter counts the statement the PostgreSQL
# adapter would run on the same branch), so counts compare across adapters.
STATEMENTS: dict[str, str] = {
    "InsertChat": "insert a chat row",
    "InsertChatMessages": "insert one or more chat messages (one statement)",
    "GetChatByID": "read one chat",
    "GetChatsByOwner": "list an owner's chats",
    "LockChatForUpdate": "SELECT ... FOR UPDATE of one chat row inside a transaction",
    "UpdateChat": "the row part of a decided write: status, owner, token, heartbeat, error",
    "GetChatForWrite": "a locked chat's row, queue length and write marks (guard check)",
    "GetChatMessagesByOp": "the messages an earlier attempt of a write inserted (replay)",
    "InsertQueuedMessage": "append to a chat's queue",
    "GetQueuedMessages": "read a chat's queue",
    "DeleteQueuedMessage": "delete one queued message",
    "DeleteQueuedMessages": "clear a chat's queue",
    "PopQueuedMessage": "delete and return the oldest queued message",
    "SoftDeleteMessagesFrom": "mark a message and every later one deleted",
    "GetChatMessageByID": "read one message",
    "GetChatMessagesAfter": "user-visible messages after a cursor (stream catch-up)",
    "GetPromptMessages": "model-visible history after the compaction boundary (of some chats)",
    "GetPromptTails": "claimed chats' messages since a run last wrote, and the one before",
    "GetLatestAssistantText": "latest assistant message of a chat (subagent report)",
    "AcquireChats": "claim pending chats FOR UPDATE SKIP LOCKED",
    "ReleaseChats": "hand owned chats back to pending",
    "RecoverStaleChats": "running chats with a stale heartbeat back to pending",
    "InsertWorkspace": "insert a workspace",
    "GetWorkspaceByID": "read a workspace",
    "InsertWorkspaceBuild": "insert a build",
    "InsertWorkspaceAgent": "insert an agent",
    "GetWorkspaceAgentsInLatestBuild": "agents of a workspace's latest build",
    "GetWorkspaceAgentByID": "read one agent",
    "UpdateChatBinding": "set workspace/build/agent of a chat",
    "GetChildChats": "children of a chat",
    "GetChatParent": "parent id of a chat (descendant walk)",
    "NotifyInTransaction": "pg_notify of the inserted messages' stream notifies, before commit",
}
