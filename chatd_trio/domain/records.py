"""The domain records: chats, messages and their parts, statuses, workspaces.

Every record that crosses a wire or a table has a JSON codec: `to_json()` gives
plain JSON data and `from_json()` decodes strictly (`chatd_trio.domain.codec`),
raising `DecodeError` naming the field for any malformed input.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar, Union, cast

from chatd_trio.config import RequestOptions
from chatd_trio.domain.codec import (
    JSON,
    bool_field,
    datetime_field,
    enum_field,
    int_field,
    iso,
    json_object,
    optional_str,
    required,
    str_field,
    uuid_field,
)
from chatd_trio.errors import DecodeError

__all__ = [
    "Chat",
    "ChatStatus",
    "ContextFilePart",
    "Message",
    "NewMessage",
    "Part",
    "QueuedMessage",
    "ReasoningPart",
    "Role",
    "TextPart",
    "ToolCallPart",
    "ToolResultPart",
    "Usage",
    "Visibility",
    "Workspace",
    "WorkspaceAgent",
    "WorkspaceBuild",
    "new_id",
    "part_from_json",
    "parts_from_json",
    "parts_to_json",
    "text_of",
]


class ChatStatus(enum.StrEnum):
    """Chat statuses (docs/spec.md §1)."""

    WAITING = "waiting"
    PENDING = "pending"
    RUNNING = "running"
    ERROR = "error"


class Role(enum.StrEnum):
    """Who wrote a message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class Visibility(enum.StrEnum):
    """Who sees a message: the user, the model, or both."""

    USER = "user"
    MODEL = "model"
    BOTH = "both"


# ---------------------------------------------------------------------------
# message parts


@dataclass(frozen=True)
class TextPart:
    """Plain text."""

    text: str
    type: ClassVar[str] = "text"

    def to_json(self) -> dict[str, JSON]:
        return {"type": self.type, "text": self.text}


@dataclass(frozen=True)
class ReasoningPart:
    """The model's reasoning text.

    `signature` is the provider's proof of an Anthropic thinking block, which must be
    sent back unchanged with the block; a `redacted` block carries its encrypted
    content in `signature` and no text.
    """

    text: str
    signature: str = ""
    redacted: bool = False
    type: ClassVar[str] = "reasoning"

    def to_json(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {"type": self.type, "text": self.text}
        if self.signature:
            out["signature"] = self.signature
        if self.redacted:
            out["redacted"] = True
        return out


@dataclass(frozen=True)
class ToolCallPart:
    """A tool call; `arguments` is the JSON text the model produced (possibly partial)."""

    call_id: str
    name: str
    arguments: str
    type: ClassVar[str] = "tool_call"

    def to_json(self) -> dict[str, JSON]:
        return {
            "type": self.type,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
        }


@dataclass(frozen=True)
class ToolResultPart:
    """The result of one tool call; `is_error` marks a failed call."""

    call_id: str
    name: str
    result: JSON
    is_error: bool = False
    type: ClassVar[str] = "tool_result"

    def to_json(self) -> dict[str, JSON]:
        return {
            "type": self.type,
            "call_id": self.call_id,
            "name": self.name,
            "result": self.result,
            "is_error": self.is_error,
        }


@dataclass(frozen=True)
class ContextFilePart:
    """An instruction file read from a workspace agent; `path` empty marks the sentinel."""

    agent_id: uuid.UUID
    path: str = ""
    content: str = ""
    type: ClassVar[str] = "context_file"

    @property
    def is_sentinel(self) -> bool:
        return not self.path

    def to_json(self) -> dict[str, JSON]:
        return {
            "type": self.type,
            "agent_id": str(self.agent_id),
            "path": self.path,
            "content": self.content,
        }


Part = Union[TextPart, ReasoningPart, ToolCallPart, ToolResultPart, ContextFilePart]  # noqa: UP007
"""Any message part."""


def part_from_json(data: JSON, path: str = "part") -> Part:
    """Decode one message part."""
    d = json_object(data, path)
    kind = str_field(d, "type", path)
    if kind == "text":
        return TextPart(str_field(d, "text", path))
    if kind == "reasoning":
        return ReasoningPart(
            str_field(d, "text", path),
            str_field(d, "signature", path, optional=True) or "",
            bool_field(d, "redacted", path, default=False),
        )
    if kind == "tool_call":
        return ToolCallPart(
            str_field(d, "call_id", path),
            str_field(d, "name", path),
            str_field(d, "arguments", path),
        )
    if kind == "tool_result":
        return ToolResultPart(
            str_field(d, "call_id", path),
            str_field(d, "name", path),
            required(d, "result", path),
            bool_field(d, "is_error", path, default=False),
        )
    if kind == "context_file":
        return ContextFilePart(
            uuid_field(d, "agent_id", path),
            str_field(d, "path", path),
            str_field(d, "content", path),
        )
    raise DecodeError(f"{path}.type", f"unknown part type {kind[:64]!r}")


def parts_from_json(data: JSON, path: str = "parts") -> tuple[Part, ...]:
    """Decode a list of message parts."""
    if not isinstance(data, list):
        raise DecodeError(path, f"expected a list, got {type(data).__name__}")
    return tuple(part_from_json(p, f"{path}[{i}]") for i, p in enumerate(data))


def parts_to_json(parts: Sequence[Part]) -> JSON:
    """Encode message parts as JSON data."""
    return [p.to_json() for p in parts]


def text_of(parts: Sequence[Part]) -> str:
    """The concatenated text of the text parts.

    A text part whose text is not a string (parts handed in by an untyped caller,
    not yet checked by the store) is skipped rather than raising here: the store's
    check refuses it with a `DecodeError` naming the field.
    """
    return "".join(p.text for p in parts if isinstance(p, TextPart) and isinstance(p.text, str))


# ---------------------------------------------------------------------------
# usage, messages


@dataclass(frozen=True)
class Usage:
    """Token usage of one model call. `reasoning_tokens` is the part of `output_tokens`
    the model spent reasoning (0 when the provider does not say)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    total_tokens: int = 0
    reasoning_tokens: int = 0

    def context_tokens(self) -> int:
        """Input + cache-read + cache-creation when any is positive, else total (spec §3.1)."""
        prompt = self.input_tokens + self.cache_read_tokens + self.cache_creation_tokens
        return prompt if prompt > 0 else self.total_tokens

    def to_json(self) -> dict[str, JSON]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_creation_tokens": self.cache_creation_tokens,
            "total_tokens": self.total_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }

    @classmethod
    def from_json(cls, data: JSON, path: str = "usage") -> Usage:
        d = json_object(data, path)
        return cls(
            *(
                int_field(d, k, path, optional=True) or 0
                for k in (
                    "input_tokens",
                    "output_tokens",
                    "cache_read_tokens",
                    "cache_creation_tokens",
                    "total_tokens",
                    "reasoning_tokens",
                )
            )
        )


@dataclass(frozen=True)
class NewMessage:
    """A message to insert (the store assigns id and timestamps)."""

    role: Role
    parts: tuple[Part, ...]
    visibility: Visibility = Visibility.BOTH
    usage: Usage | None = None
    context_limit: int | None = None
    compressed: bool = False


@dataclass(frozen=True)
class Message:
    """A persisted chat message."""

    id: int
    chat_id: uuid.UUID
    role: Role
    parts: tuple[Part, ...]
    visibility: Visibility = Visibility.BOTH
    usage: Usage | None = None
    context_limit: int | None = None
    compressed: bool = False
    deleted: bool = False
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Id of the chat's previous user-visible, non-deleted message at insert time (0 when
    # none), None when unknown. Set by the store on inserted messages only; metadata about
    # the insert, not part of the message's identity, so it is left out of equality.
    prev_id: int | None = field(default=None, compare=False)

    @property
    def user_visible(self) -> bool:
        return self.visibility in (Visibility.USER, Visibility.BOTH)

    @property
    def model_visible(self) -> bool:
        return self.visibility in (Visibility.MODEL, Visibility.BOTH)

    def to_json(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {
            "id": self.id,
            "chat_id": str(self.chat_id),
            "role": self.role.value,
            "parts": parts_to_json(self.parts),
            "visibility": self.visibility.value,
            "usage": self.usage.to_json() if self.usage else None,
            "context_limit": self.context_limit,
            "compressed": self.compressed,
            "deleted": self.deleted,
            "created_at": iso(self.created_at),
        }
        if self.prev_id is not None:
            out["prev_id"] = self.prev_id
        return out

    @classmethod
    def from_json(cls, data: JSON, path: str = "message") -> Message:
        d = json_object(data, path)
        usage = d.get("usage")
        return cls(
            id=int_field(d, "id", path),
            chat_id=uuid_field(d, "chat_id", path),
            role=enum_field(Role, d, "role", path),
            parts=parts_from_json(required(d, "parts", path), f"{path}.parts"),
            visibility=enum_field(Visibility, d, "visibility", path),
            usage=Usage.from_json(usage, f"{path}.usage") if usage is not None else None,
            context_limit=int_field(d, "context_limit", path, optional=True),
            compressed=bool_field(d, "compressed", path, default=False),
            deleted=bool_field(d, "deleted", path, default=False),
            created_at=datetime_field(d, "created_at", path),
            prev_id=int_field(d, "prev_id", path, optional=True),
        )


@dataclass(frozen=True)
class QueuedMessage:
    """A user message waiting in a chat's queue."""

    id: int
    chat_id: uuid.UUID
    parts: tuple[Part, ...]
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> dict[str, JSON]:
        return {
            "id": self.id,
            "chat_id": str(self.chat_id),
            "parts": parts_to_json(self.parts),
            "created_at": iso(self.created_at),
        }

    @classmethod
    def from_json(cls, data: JSON, path: str = "queued_message") -> QueuedMessage:
        d = json_object(data, path)
        return cls(
            id=int_field(d, "id", path),
            chat_id=uuid_field(d, "chat_id", path),
            parts=parts_from_json(required(d, "parts", path), f"{path}.parts"),
            created_at=datetime_field(d, "created_at", path),
        )


# ---------------------------------------------------------------------------
# chats and workspaces


@dataclass(frozen=True)
class Chat:
    """A chat row: status, ownership, workspace binding, parentage."""

    id: uuid.UUID
    owner_id: uuid.UUID
    title: str
    status: ChatStatus
    created_at: datetime
    updated_at: datetime
    worker_id: uuid.UUID | None = None
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    parent_chat_id: uuid.UUID | None = None
    root_chat_id: uuid.UUID | None = None
    workspace_id: uuid.UUID | None = None
    build_id: uuid.UUID | None = None
    agent_id: uuid.UUID | None = None
    last_error: str | None = None
    mcp_servers: tuple[str, ...] = ()
    # Incremented by every acquisition, stale recovery, release and finish: the token
    # of the run that holds (or last held) the chat. A turn's writes carry it (fencing).
    owner_token: int = 0
    # The queue's length when the row was read.
    queued: int = 0
    # Request options of this chat's model calls, merged over the model's own
    # (`Server.create_chat(model_options=...)`); None: the model's options alone.
    model_options: RequestOptions | None = None

    @property
    def is_child(self) -> bool:
        return self.parent_chat_id is not None

    def to_json(self) -> dict[str, JSON]:
        return {
            "id": str(self.id),
            "owner_id": str(self.owner_id),
            "title": self.title,
            "status": self.status.value,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "worker_id": optional_str(self.worker_id),
            "started_at": iso(self.started_at),
            "heartbeat_at": iso(self.heartbeat_at),
            "parent_chat_id": optional_str(self.parent_chat_id),
            "root_chat_id": optional_str(self.root_chat_id),
            "workspace_id": optional_str(self.workspace_id),
            "build_id": optional_str(self.build_id),
            "agent_id": optional_str(self.agent_id),
            "last_error": self.last_error,
            "mcp_servers": list(self.mcp_servers),
            "owner_token": self.owner_token,
            "queued": self.queued,
            "model_options": (
                None if self.model_options is None else cast(JSON, self.model_options.to_json())
            ),
        }

    @classmethod
    def from_json(cls, data: JSON, path: str = "chat") -> Chat:
        d = json_object(data, path)
        servers = d.get("mcp_servers") or []
        names = tuple(s for s in servers if isinstance(s, str)) if isinstance(servers, list) else ()
        if not isinstance(servers, list) or len(names) != len(servers):
            raise DecodeError(f"{path}.mcp_servers", "expected a list of strings")
        return cls(
            id=uuid_field(d, "id", path),
            owner_id=uuid_field(d, "owner_id", path),
            title=str_field(d, "title", path),
            status=enum_field(ChatStatus, d, "status", path),
            created_at=datetime_field(d, "created_at", path),
            updated_at=datetime_field(d, "updated_at", path),
            worker_id=uuid_field(d, "worker_id", path, optional=True),
            started_at=datetime_field(d, "started_at", path, optional=True),
            heartbeat_at=datetime_field(d, "heartbeat_at", path, optional=True),
            parent_chat_id=uuid_field(d, "parent_chat_id", path, optional=True),
            root_chat_id=uuid_field(d, "root_chat_id", path, optional=True),
            workspace_id=uuid_field(d, "workspace_id", path, optional=True),
            build_id=uuid_field(d, "build_id", path, optional=True),
            agent_id=uuid_field(d, "agent_id", path, optional=True),
            last_error=str_field(d, "last_error", path, optional=True),
            mcp_servers=names,
            owner_token=int_field(d, "owner_token", path, optional=True) or 0,
            queued=int_field(d, "queued", path, optional=True) or 0,
            model_options=(
                None
                if d.get("model_options") is None
                else RequestOptions.from_json(d["model_options"], f"{path}.model_options")
            ),
        )


@dataclass(frozen=True)
class Workspace:
    """A workspace (a machine that runs tools)."""

    id: uuid.UUID
    owner_id: uuid.UUID
    name: str
    created_at: datetime


@dataclass(frozen=True)
class WorkspaceBuild:
    """One build of a workspace; the latest build holds its current agents."""

    id: uuid.UUID
    workspace_id: uuid.UUID
    build_number: int
    created_at: datetime


@dataclass(frozen=True)
class WorkspaceAgent:
    """A workspace agent; `address` is host:port of its TCP server, `token` its secret."""

    id: uuid.UUID
    build_id: uuid.UUID
    workspace_id: uuid.UUID
    name: str
    address: str
    token: str
    directory: str
    created_at: datetime


def new_id() -> uuid.UUID:
    """A fresh random id."""
    return uuid.uuid4()
