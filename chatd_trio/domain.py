"""Chats, messages, parts, statuses, stream events and the notify payload.

Every record has a JSON codec: `to_json()` gives plain JSON data and
`from_json()` decodes strictly, raising `DecodeError` naming the field for any
malformed input (never a KeyError or TypeError from deep inside).
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar, Union, cast

from typing_extensions import TypeAliasType

from chatd_trio.config import RequestOptions
from chatd_trio.errors import DecodeError, PayloadTooLarge

# JSON data as `json.loads` returns it. Recursive, so a value's shape is checked all the
# way down; data from outside is narrowed with `isinstance` before use. A `TypeAliasType`
# rather than a plain alias: its forward references resolve in this module, so pydantic
# (the schema of a typed tool taking JSON) and `get_type_hints` (a tool returning it)
# work in modules that never import the name.
JSON = TypeAliasType("JSON", 'bool | int | float | str | list["JSON"] | dict[str, "JSON"] | None')
E = TypeVar("E", bound=enum.Enum)

# A raw notify payload or event larger than this is refused before parsing.
MAX_JSON_BYTES = 1024 * 1024


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
# strict field readers


def _obj(data: JSON, path: str) -> dict[str, JSON]:
    if not isinstance(data, Mapping):
        raise DecodeError(path, f"expected an object, got {type(data).__name__}")
    return data


def _get(d: Mapping[str, JSON], key: str, path: str) -> JSON:
    if key not in d:
        raise DecodeError(f"{path}.{key}", "missing")
    return d[key]


def _str(d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False) -> Any:
    if optional and d.get(key) is None:
        return None
    v = _get(d, key, path)
    if not isinstance(v, str):
        raise DecodeError(f"{path}.{key}", f"expected a string, got {type(v).__name__}")
    return v


def _int(d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False) -> Any:
    if optional and d.get(key) is None:
        return None
    v = _get(d, key, path)
    if not isinstance(v, int) or isinstance(v, bool):
        raise DecodeError(f"{path}.{key}", f"expected an integer, got {type(v).__name__}")
    return v


def _float(d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False) -> Any:
    if optional and d.get(key) is None:
        return None
    v = _get(d, key, path)
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise DecodeError(f"{path}.{key}", f"expected a number, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:
        raise DecodeError(f"{path}.{key}", "number out of range") from None


def _bool(d: Mapping[str, JSON], key: str, path: str, *, default: bool | None = None) -> bool:
    if default is not None and d.get(key) is None:
        return default
    v = _get(d, key, path)
    if not isinstance(v, bool):
        raise DecodeError(f"{path}.{key}", f"expected a boolean, got {type(v).__name__}")
    return v


def parse_uuid(value: object, path: str = "id") -> uuid.UUID:
    """Parse a UUID from a string, raising `DecodeError` naming `path`."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise DecodeError(path, f"expected a UUID string, got {type(value).__name__}")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise DecodeError(path, f"not a UUID: {value[:64]!r}") from None


def optional_uuid(value: object, path: str = "id") -> uuid.UUID | None:
    """`parse_uuid`, letting `None` through (an optional id)."""
    return None if value is None else parse_uuid(value, path)


def parse_row_id(value: object, path: str = "id") -> int:
    """A message or queue id: an integer (not a bool), else `DecodeError` naming `path`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise DecodeError(path, f"expected an integer, got {type(value).__name__}")
    return value


def _uuid(d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False) -> Any:
    if optional and d.get(key) is None:
        return None
    return parse_uuid(_get(d, key, path), f"{path}.{key}")


def _enum(
    cls: type[E], d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False
) -> Any:
    if optional and d.get(key) is None:
        return None
    v = _str(d, key, path)
    try:
        return cls(v)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in cls)
        raise DecodeError(f"{path}.{key}", f"{v[:64]!r} is not one of {allowed}") from None


def _dt(d: Mapping[str, JSON], key: str, path: str, *, optional: bool = False) -> Any:
    if optional and d.get(key) is None:
        return None
    v = _str(d, key, path)
    try:
        parsed = datetime.fromisoformat(v)
    except ValueError:
        raise DecodeError(f"{path}.{key}", f"not an ISO timestamp: {v[:64]!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _str_or(d: Mapping[str, JSON], key: str, path: str, default: str) -> str:
    # Only an absent (or null) field takes the default: "" must survive a round trip.
    v = _str(d, key, path, optional=True)
    return default if v is None else str(v)


def _list(d: Mapping[str, JSON], key: str, path: str) -> list[JSON]:
    v = _get(d, key, path)
    if not isinstance(v, list):
        raise DecodeError(f"{path}.{key}", f"expected a list, got {type(v).__name__}")
    return v


def _iso(v: datetime | None) -> str | None:
    return v.isoformat() if v is not None else None


def _opt(v: uuid.UUID | None) -> str | None:
    return str(v) if v is not None else None


def loads(raw: str | bytes, *, limit: int = MAX_JSON_BYTES, what: str = "payload") -> JSON:
    """Parse JSON text, refusing oversized or malformed input with `DecodeError`."""
    # surrogatepass: a lone surrogate must be measured (and then refused as JSON), not crash.
    size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    if size > limit:
        raise PayloadTooLarge(what, f"{size} bytes exceeds the limit of {limit}")
    try:
        value: JSON = json.loads(raw)
        return value
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(what, f"malformed JSON: {exc}") from None
    except RecursionError:
        # Deeply nested arrays exhaust the parser's recursion budget before the size limit.
        raise DecodeError(what, "malformed JSON: nested too deeply") from None


def dumps(data: object) -> str:
    """Compact, deterministic JSON text.

    Takes any object, as `json.dumps` does (a chat's request options may carry
    anything), and raises `TypeError` or `ValueError` for what is not JSON.
    """
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


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
    d = _obj(data, path)
    kind = _str(d, "type", path)
    if kind == "text":
        return TextPart(_str(d, "text", path))
    if kind == "reasoning":
        return ReasoningPart(
            _str(d, "text", path),
            _str(d, "signature", path, optional=True) or "",
            _bool(d, "redacted", path, default=False),
        )
    if kind == "tool_call":
        return ToolCallPart(
            _str(d, "call_id", path), _str(d, "name", path), _str(d, "arguments", path)
        )
    if kind == "tool_result":
        return ToolResultPart(
            _str(d, "call_id", path),
            _str(d, "name", path),
            _get(d, "result", path),
            _bool(d, "is_error", path, default=False),
        )
    if kind == "context_file":
        return ContextFilePart(
            _uuid(d, "agent_id", path), _str(d, "path", path), _str(d, "content", path)
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
        d = _obj(data, path)
        return cls(
            *(
                _int(d, k, path, optional=True) or 0
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
            "created_at": _iso(self.created_at),
        }
        if self.prev_id is not None:
            out["prev_id"] = self.prev_id
        return out

    @classmethod
    def from_json(cls, data: JSON, path: str = "message") -> Message:
        d = _obj(data, path)
        usage = d.get("usage")
        return cls(
            id=_int(d, "id", path),
            chat_id=_uuid(d, "chat_id", path),
            role=_enum(Role, d, "role", path),
            parts=parts_from_json(_get(d, "parts", path), f"{path}.parts"),
            visibility=_enum(Visibility, d, "visibility", path),
            usage=Usage.from_json(usage, f"{path}.usage") if usage is not None else None,
            context_limit=_int(d, "context_limit", path, optional=True),
            compressed=_bool(d, "compressed", path, default=False),
            deleted=_bool(d, "deleted", path, default=False),
            created_at=_dt(d, "created_at", path),
            prev_id=_int(d, "prev_id", path, optional=True),
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
            "created_at": _iso(self.created_at),
        }

    @classmethod
    def from_json(cls, data: JSON, path: str = "queued_message") -> QueuedMessage:
        d = _obj(data, path)
        return cls(
            id=_int(d, "id", path),
            chat_id=_uuid(d, "chat_id", path),
            parts=parts_from_json(_get(d, "parts", path), f"{path}.parts"),
            created_at=_dt(d, "created_at", path),
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
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "worker_id": _opt(self.worker_id),
            "started_at": _iso(self.started_at),
            "heartbeat_at": _iso(self.heartbeat_at),
            "parent_chat_id": _opt(self.parent_chat_id),
            "root_chat_id": _opt(self.root_chat_id),
            "workspace_id": _opt(self.workspace_id),
            "build_id": _opt(self.build_id),
            "agent_id": _opt(self.agent_id),
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
        d = _obj(data, path)
        servers = d.get("mcp_servers") or []
        names = tuple(s for s in servers if isinstance(s, str)) if isinstance(servers, list) else ()
        if not isinstance(servers, list) or len(names) != len(servers):
            raise DecodeError(f"{path}.mcp_servers", "expected a list of strings")
        return cls(
            id=_uuid(d, "id", path),
            owner_id=_uuid(d, "owner_id", path),
            title=_str(d, "title", path),
            status=_enum(ChatStatus, d, "status", path),
            created_at=_dt(d, "created_at", path),
            updated_at=_dt(d, "updated_at", path),
            worker_id=_uuid(d, "worker_id", path, optional=True),
            started_at=_dt(d, "started_at", path, optional=True),
            heartbeat_at=_dt(d, "heartbeat_at", path, optional=True),
            parent_chat_id=_uuid(d, "parent_chat_id", path, optional=True),
            root_chat_id=_uuid(d, "root_chat_id", path, optional=True),
            workspace_id=_uuid(d, "workspace_id", path, optional=True),
            build_id=_uuid(d, "build_id", path, optional=True),
            agent_id=_uuid(d, "agent_id", path, optional=True),
            last_error=_str(d, "last_error", path, optional=True),
            mcp_servers=names,
            owner_token=_int(d, "owner_token", path, optional=True) or 0,
            queued=_int(d, "queued", path, optional=True) or 0,
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


# ---------------------------------------------------------------------------
# stream events (docs/spec.md §4)


class EventType(enum.StrEnum):
    """The stream event types (docs/spec.md §4)."""

    MESSAGE_PART = "message_part"
    MESSAGE = "message"
    STATUS = "status"
    ERROR = "error"
    RETRY = "retry"
    QUEUE_UPDATE = "queue_update"
    SNAPSHOT_END = "snapshot_end"


@dataclass(frozen=True)
class MessagePartEvent:
    """An ephemeral streamed delta of the in-flight step."""

    chat_id: uuid.UUID
    role: Role
    part: Part
    type: ClassVar[EventType] = EventType.MESSAGE_PART

    def to_json(self) -> dict[str, JSON]:
        return {
            "type": self.type.value,
            "chat_id": str(self.chat_id),
            "role": self.role.value,
            "part": self.part.to_json(),
        }


@dataclass(frozen=True)
class MessageEvent:
    """A durable, persisted message."""

    chat_id: uuid.UUID
    message: Message
    type: ClassVar[EventType] = EventType.MESSAGE

    def to_json(self) -> dict[str, JSON]:
        return {
            "type": self.type.value,
            "chat_id": str(self.chat_id),
            "message": self.message.to_json(),
        }


@dataclass(frozen=True)
class StatusEvent:
    """A chat status change."""

    chat_id: uuid.UUID
    status: ChatStatus
    worker_id: uuid.UUID | None = None
    type: ClassVar[EventType] = EventType.STATUS

    def to_json(self) -> dict[str, JSON]:
        return {
            "type": self.type.value,
            "chat_id": str(self.chat_id),
            "status": self.status.value,
            "worker_id": _opt(self.worker_id),
        }


@dataclass(frozen=True)
class ErrorPayload:
    """A structured error: what a subscriber shows the user."""

    message: str
    kind: str = "unknown"
    provider: str = ""
    retryable: bool = False
    status_code: int | None = None

    def to_json(self) -> dict[str, JSON]:
        return {
            "message": self.message,
            "kind": self.kind,
            "provider": self.provider,
            "retryable": self.retryable,
            "status_code": self.status_code,
        }

    @classmethod
    def from_json(cls, data: JSON, path: str = "error_payload") -> ErrorPayload:
        d = _obj(data, path)
        return cls(
            message=_str(d, "message", path),
            kind=_str_or(d, "kind", path, "unknown"),
            provider=_str(d, "provider", path, optional=True) or "",
            retryable=_bool(d, "retryable", path, default=False),
            status_code=_int(d, "status_code", path, optional=True),
        )


@dataclass(frozen=True)
class ErrorEvent:
    """A structured error shown to subscribers."""

    chat_id: uuid.UUID
    error: ErrorPayload
    type: ClassVar[EventType] = EventType.ERROR

    def to_json(self) -> dict[str, JSON]:
        return {"type": self.type.value, "chat_id": str(self.chat_id), **self.error.to_json()}


@dataclass(frozen=True)
class RetryPayload:
    """One model retry: attempt, delay, error, and when it retries."""

    attempt: int
    delay_s: float
    error: str
    kind: str = "unknown"
    status_code: int | None = None
    retrying_at: datetime | None = None

    def to_json(self) -> dict[str, JSON]:
        return {
            "attempt": self.attempt,
            "delay_s": self.delay_s,
            "error": self.error,
            "kind": self.kind,
            "status_code": self.status_code,
            "retrying_at": _iso(self.retrying_at),
        }

    @classmethod
    def from_json(cls, data: JSON, path: str = "retry") -> RetryPayload:
        d = _obj(data, path)
        return cls(
            attempt=_int(d, "attempt", path),
            delay_s=_float(d, "delay_s", path),
            error=_str(d, "error", path),
            kind=_str_or(d, "kind", path, "unknown"),
            status_code=_int(d, "status_code", path, optional=True),
            retrying_at=_dt(d, "retrying_at", path, optional=True),
        )


@dataclass(frozen=True)
class RetryEvent:
    """A model retry announced to subscribers."""

    chat_id: uuid.UUID
    retry: RetryPayload
    type: ClassVar[EventType] = EventType.RETRY

    def to_json(self) -> dict[str, JSON]:
        return {"type": self.type.value, "chat_id": str(self.chat_id), **self.retry.to_json()}


@dataclass(frozen=True)
class QueueUpdateEvent:
    """The chat's current queue."""

    chat_id: uuid.UUID
    queued: tuple[QueuedMessage, ...]
    type: ClassVar[EventType] = EventType.QUEUE_UPDATE

    def to_json(self) -> dict[str, JSON]:
        return {
            "type": self.type.value,
            "chat_id": str(self.chat_id),
            "queued": [q.to_json() for q in self.queued],
        }


@dataclass(frozen=True)
class SnapshotEndEvent:
    """The subscription's snapshot is complete: every later event is live.

    Sent once per subscription, after the snapshot's status, buffered parts, messages
    and queue. `cursor` is the id of the last message the snapshot delivered (or the
    subscribe cursor when it delivered none). Never crosses replicas.
    """

    chat_id: uuid.UUID
    cursor: int
    type: ClassVar[EventType] = EventType.SNAPSHOT_END

    def to_json(self) -> dict[str, JSON]:
        return {"type": self.type.value, "chat_id": str(self.chat_id), "cursor": self.cursor}


StreamEvent = Union[  # noqa: UP007
    MessagePartEvent,
    MessageEvent,
    StatusEvent,
    ErrorEvent,
    RetryEvent,
    QueueUpdateEvent,
    SnapshotEndEvent,
]
"""Any event a subscription yields (docs/spec.md §4)."""


def event_from_json(data: JSON, path: str = "event") -> StreamEvent:
    """Decode any stream event."""
    d = _obj(data, path)
    kind = _enum(EventType, d, "type", path)
    chat_id = _uuid(d, "chat_id", path)
    if kind is EventType.MESSAGE_PART:
        return MessagePartEvent(
            chat_id,
            _enum(Role, d, "role", path),
            part_from_json(_get(d, "part", path), f"{path}.part"),
        )
    if kind is EventType.MESSAGE:
        return MessageEvent(chat_id, Message.from_json(_get(d, "message", path), f"{path}.message"))
    if kind is EventType.STATUS:
        return StatusEvent(
            chat_id,
            _enum(ChatStatus, d, "status", path),
            _uuid(d, "worker_id", path, optional=True),
        )
    if kind is EventType.ERROR:
        return ErrorEvent(chat_id, ErrorPayload.from_json(d, path))
    if kind is EventType.RETRY:
        return RetryEvent(chat_id, RetryPayload.from_json(d, path))
    if kind is EventType.SNAPSHOT_END:
        return SnapshotEndEvent(chat_id, _int(d, "cursor", path))
    queued = _list(d, "queued", path)
    return QueueUpdateEvent(
        chat_id,
        tuple(QueuedMessage.from_json(q, f"{path}.queued[{i}]") for i, q in enumerate(queued)),
    )


# ---------------------------------------------------------------------------
# notify payload (docs/spec.md §4)


def stream_channel(chat_id: uuid.UUID) -> str:
    """The pubsub channel of one chat's stream."""
    return f"chat:stream:{chat_id}"


def owner_channel(owner_id: uuid.UUID) -> str:
    """The pubsub channel of one owner's chat list events."""
    return f"chat:owner:{owner_id}"


@dataclass(frozen=True)
class NotifyPayload:
    """What crosses replicas on a chat's channel; every field optional.

    `message` carries a small durable message inline so that subscribers on
    other replicas can skip the database read (an extension of the reference design).
    """

    after_message_id: int | None = None
    full_refresh: bool = False
    status: ChatStatus | None = None
    worker_id: uuid.UUID | None = None
    # With `status`: the chat's ownership token after the change (docs/spec.md §1).
    owner_token: int | None = None
    retry: RetryPayload | None = None
    error_payload: ErrorPayload | None = None
    error: str | None = None
    queue_update: tuple[QueuedMessage, ...] | None = None
    message: Message | None = None
    # Read the chat again (after the cursor, then status and queue): the sender may have
    # written something it could not announce (a final transition it could not confirm).
    resync: bool = False

    def to_json(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {}
        if self.after_message_id is not None:
            out["after_message_id"] = self.after_message_id
        if self.full_refresh:
            out["full_refresh"] = True
        if self.resync:
            out["resync"] = True
        if self.status is not None:
            out["status"] = self.status.value
        if self.worker_id is not None:
            out["worker_id"] = str(self.worker_id)
        if self.owner_token is not None:
            out["owner_token"] = self.owner_token
        if self.retry is not None:
            out["retry"] = self.retry.to_json()
        if self.error_payload is not None:
            out["error_payload"] = self.error_payload.to_json()
        if self.error is not None:
            out["error"] = self.error
        if self.queue_update is not None:
            out["queue_update"] = [q.to_json() for q in self.queue_update]
        if self.message is not None:
            out["message"] = self.message.to_json()
        return out

    def encode(self) -> str:
        return dumps(self.to_json())

    @classmethod
    def from_json(cls, data: JSON, path: str = "notify") -> NotifyPayload:
        d = _obj(data, path)
        retry = d.get("retry")
        err = d.get("error_payload")
        queue = d.get("queue_update")
        msg = d.get("message")
        if queue is not None and not isinstance(queue, list):
            raise DecodeError(f"{path}.queue_update", "expected a list")
        return cls(
            after_message_id=_int(d, "after_message_id", path, optional=True),
            full_refresh=_bool(d, "full_refresh", path, default=False),
            status=_enum(ChatStatus, d, "status", path, optional=True),
            worker_id=_uuid(d, "worker_id", path, optional=True),
            owner_token=_int(d, "owner_token", path, optional=True),
            retry=RetryPayload.from_json(retry, f"{path}.retry") if retry is not None else None,
            error_payload=ErrorPayload.from_json(err, f"{path}.error_payload")
            if err is not None
            else None,
            error=_str(d, "error", path, optional=True),
            queue_update=tuple(
                QueuedMessage.from_json(q, f"{path}.queue_update[{i}]") for i, q in enumerate(queue)
            )
            if queue is not None
            else None,
            message=Message.from_json(msg, f"{path}.message") if msg is not None else None,
            resync=_bool(d, "resync", path, default=False),
        )

    @classmethod
    def decode(cls, raw: str | bytes, *, limit: int = MAX_JSON_BYTES) -> NotifyPayload:
        """Parse a raw notify; malformed or oversized input raises `DecodeError`."""
        return cls.from_json(loads(raw, limit=limit, what="notify"))


def new_id() -> uuid.UUID:
    """A fresh random id."""
    return uuid.uuid4()
