"""The Store port: use-case sized, atomic operations (one transaction each).

Both adapters (memory, PostgreSQL) pass the same contract suite in
`tests/contract/`. Every statement has a name; `statement_counts()` returns how
many times each ran, counted where the statement executes.
"""

from __future__ import annotations

import enum
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from chatd_trio.config import LimitsConfig
from chatd_trio.domain import (
    Chat,
    Message,
    NewMessage,
    Part,
    QueuedMessage,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
    dumps,
    parts_to_json,
)
from chatd_trio.errors import DecodeError, PayloadTooLarge


class TurnOutcome(enum.StrEnum):
    """How a turn ended; decides the final transition (docs/spec.md §1)."""

    DONE = "done"  # loop finished normally -> waiting (or pending with a promoted message)
    INTERRUPTED = "interrupted"  # user interrupt -> waiting (queued message still promoted)
    ERROR = "error"  # run failed -> error with last_error
    SHUTDOWN = "shutdown"  # replica closing -> pending, no error


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

    `changed` is False when another replica owns the row (nothing changed, the
    caller publishes nothing) or when the row stays as it was (already pending).
    """

    chat: Chat
    changed: bool
    owned_elsewhere: bool
    promoted: Message | None
    queue: tuple[QueuedMessage, ...]


class Announcer(Protocol):
    """Builds the stream notifies of the messages a store operation inserts.

    A store that `announces_to` the replica's pubsub sends them inside the
    inserting transaction: listeners then receive a chat's message notifies in
    commit order, which is id order (inserts hold the chat's row lock), whichever
    replica inserted them. Sent after the commit instead, a notify from the replica
    that wrote a message can overtake the notify of the message before it, and a
    subscriber would have to read the gap from the database.
    """

    def __call__(
        self, messages: Sequence[Message], *, refresh: bool = False
    ) -> Sequence[tuple[str, str]]:
        """(channel, payload) pairs for `messages`; `refresh` for an edit's replacement."""
        ...


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


def check_user_parts(parts: Sequence[Part], limits: LimitsConfig) -> None:
    """Refuse a user message whose encoded parts exceed `limits.max_message_bytes`."""
    size = len(dumps(parts_to_json(parts)).encode())
    if size > limits.max_message_bytes:
        raise PayloadTooLarge(
            "parts", f"{size} bytes exceeds the limit of {limits.max_message_bytes}"
        )


def check_title(title: str, limits: LimitsConfig) -> None:
    """Refuse a title longer than `limits.max_title_chars`."""
    if len(title) > limits.max_title_chars:
        raise DecodeError(
            "title", f"{len(title)} characters exceeds the limit of {limits.max_title_chars}"
        )


@runtime_checkable
class Store(Protocol):
    """Persistence and coordination. All methods are atomic."""

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
        """Create a chat with its first user message; the chat starts `pending`.

        With `parent_chat_id`, root_chat_id is the parent's root (or the parent).
        With `system_prompt`, a system message is inserted before the user message.
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
    ) -> SendResult:
        """Insert a user message (chat -> pending) or queue it.

        Queued when the chat is running or pending or a queue exists; QueueFull
        beyond `max_queued`. Inserting clears worker, started, heartbeat, last_error.
        """
        ...

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
        ...

    async def interrupt(self, chat_id: uuid.UUID) -> Chat:
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
        self, chat_id: uuid.UUID, queued_id: int, *, announce: Announcer | None = None
    ) -> SendResult:
        """Move one queued message into the history now (chat -> pending) if the chat is
        not running; otherwise move it to the front of the queue."""
        ...

    async def delete_queued(self, chat_id: uuid.UUID, queued_id: int) -> list[QueuedMessage]:
        """Delete one queued message; returns the remaining queue."""
        ...

    # -- ownership ------------------------------------------------------------
    async def acquire(self, worker_id: uuid.UUID, limit: int) -> list[Chat]:
        """Claim up to `limit` pending chats, oldest `updated_at` first, in one statement."""
        ...

    async def release(self, worker_id: uuid.UUID, chat_ids: Sequence[uuid.UUID]) -> None:
        """Hand chats this worker owns straight back to `pending` (closing server)."""
        ...

    async def heartbeat(self, chat_id: uuid.UUID, worker_id: uuid.UUID) -> bool:
        """Refresh heartbeat_at; False when this worker no longer owns the running chat."""
        ...

    async def recover_stale(self, stale_after: float) -> list[uuid.UUID]:
        """Running chats with heartbeat older than `stale_after` seconds -> pending."""
        ...

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
        ...

    async def persist_compaction(
        self,
        chat_id: uuid.UUID,
        worker_id: uuid.UUID,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
    ) -> list[Message]:
        """Insert the three compaction messages; same ownership rule as persist_step."""
        ...

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
    ) -> None: ...

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
    "UpdateChatStatus": "set status/worker/timestamps/last_error of one chat",
    "InsertQueuedMessage": "append to a chat's queue",
    "GetQueuedMessages": "read a chat's queue",
    "DeleteQueuedMessage": "delete one queued message",
    "DeleteQueuedMessages": "clear a chat's queue",
    "PopQueuedMessage": "delete and return the oldest queued message",
    "SoftDeleteMessagesFrom": "mark a message and every later one deleted",
    "GetChatMessageByID": "read one message",
    "GetChatMessagesAfter": "user-visible messages after a cursor (stream catch-up)",
    "GetPromptMessages": "model-visible history after the compaction boundary",
    "GetLatestAssistantText": "latest assistant message of a chat (subagent report)",
    "AcquireChats": "claim pending chats FOR UPDATE SKIP LOCKED",
    "ReleaseChats": "hand owned chats back to pending",
    "HeartbeatChat": "refresh heartbeat_at of an owned running chat",
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
