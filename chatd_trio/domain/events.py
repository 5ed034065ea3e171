"""The stream events a subscription yields (docs/spec.md §4), and their codec."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Union

from chatd_trio.domain.codec import (
    JSON,
    bool_field,
    datetime_field,
    enum_field,
    float_field,
    int_field,
    iso,
    json_object,
    list_field,
    optional_str,
    required,
    str_field,
    str_field_or,
    uuid_field,
)
from chatd_trio.domain.records import (
    ChatStatus,
    Message,
    Part,
    QueuedMessage,
    Role,
    part_from_json,
)

__all__ = [
    "ErrorEvent",
    "ErrorPayload",
    "EventType",
    "MessageEvent",
    "MessagePartEvent",
    "QueueUpdateEvent",
    "RetryEvent",
    "RetryPayload",
    "SnapshotEndEvent",
    "StatusEvent",
    "StreamEvent",
    "event_from_json",
]


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
            "worker_id": optional_str(self.worker_id),
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
        d = json_object(data, path)
        return cls(
            message=str_field(d, "message", path),
            kind=str_field_or(d, "kind", path, "unknown"),
            provider=str_field(d, "provider", path, optional=True) or "",
            retryable=bool_field(d, "retryable", path, default=False),
            status_code=int_field(d, "status_code", path, optional=True),
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
            "retrying_at": iso(self.retrying_at),
        }

    @classmethod
    def from_json(cls, data: JSON, path: str = "retry") -> RetryPayload:
        d = json_object(data, path)
        return cls(
            attempt=int_field(d, "attempt", path),
            delay_s=float_field(d, "delay_s", path),
            error=str_field(d, "error", path),
            kind=str_field_or(d, "kind", path, "unknown"),
            status_code=int_field(d, "status_code", path, optional=True),
            retrying_at=datetime_field(d, "retrying_at", path, optional=True),
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
    d = json_object(data, path)
    kind = enum_field(EventType, d, "type", path)
    chat_id = uuid_field(d, "chat_id", path)
    if kind is EventType.MESSAGE_PART:
        return MessagePartEvent(
            chat_id,
            enum_field(Role, d, "role", path),
            part_from_json(required(d, "part", path), f"{path}.part"),
        )
    if kind is EventType.MESSAGE:
        return MessageEvent(
            chat_id, Message.from_json(required(d, "message", path), f"{path}.message")
        )
    if kind is EventType.STATUS:
        return StatusEvent(
            chat_id,
            enum_field(ChatStatus, d, "status", path),
            uuid_field(d, "worker_id", path, optional=True),
        )
    if kind is EventType.ERROR:
        return ErrorEvent(chat_id, ErrorPayload.from_json(d, path))
    if kind is EventType.RETRY:
        return RetryEvent(chat_id, RetryPayload.from_json(d, path))
    if kind is EventType.SNAPSHOT_END:
        return SnapshotEndEvent(chat_id, int_field(d, "cursor", path))
    queued = list_field(d, "queued", path)
    return QueueUpdateEvent(
        chat_id,
        tuple(QueuedMessage.from_json(q, f"{path}.queued[{i}]") for i, q in enumerate(queued)),
    )
