"""What crosses replicas: the pubsub channels of a chat and of an owner, and their
payloads (docs/spec.md §4)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from chatd_trio.domain.codec import (
    JSON,
    MAX_JSON_BYTES,
    bool_field,
    dumps,
    enum_field,
    int_field,
    json_object,
    loads,
    str_field,
    uuid_field,
)
from chatd_trio.domain.events import ErrorPayload, RetryPayload
from chatd_trio.domain.records import Chat, ChatStatus, Message, QueuedMessage
from chatd_trio.errors import DecodeError

__all__ = ["NotifyPayload", "owner_channel", "owner_payload", "stream_channel"]


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
        d = json_object(data, path)
        retry = d.get("retry")
        err = d.get("error_payload")
        queue = d.get("queue_update")
        msg = d.get("message")
        if queue is not None and not isinstance(queue, list):
            raise DecodeError(f"{path}.queue_update", "expected a list")
        return cls(
            after_message_id=int_field(d, "after_message_id", path, optional=True),
            full_refresh=bool_field(d, "full_refresh", path, default=False),
            status=enum_field(ChatStatus, d, "status", path, optional=True),
            worker_id=uuid_field(d, "worker_id", path, optional=True),
            owner_token=int_field(d, "owner_token", path, optional=True),
            retry=RetryPayload.from_json(retry, f"{path}.retry") if retry is not None else None,
            error_payload=ErrorPayload.from_json(err, f"{path}.error_payload")
            if err is not None
            else None,
            error=str_field(d, "error", path, optional=True),
            queue_update=tuple(
                QueuedMessage.from_json(q, f"{path}.queue_update[{i}]") for i, q in enumerate(queue)
            )
            if queue is not None
            else None,
            message=Message.from_json(msg, f"{path}.message") if msg is not None else None,
            resync=bool_field(d, "resync", path, default=False),
        )

    @staticmethod
    def may_hold_status(raw: str) -> bool:
        """False when `raw` (an encoded payload) certainly holds no `status`: cheaper than
        decoding, for a reader that acts on statuses only. `encode` writes keys as plain
        ASCII, so a payload with a status holds the text `"status"`; one that spells the
        key with escapes did not come from `encode` and is skipped."""
        return '"status"' in raw

    @classmethod
    def decode(cls, raw: str | bytes, *, limit: int = MAX_JSON_BYTES) -> NotifyPayload:
        """Parse a raw notify; malformed or oversized input raises `DecodeError`."""
        return cls.from_json(loads(raw, limit=limit, what="notify"))


def owner_payload(chat: Chat, kind: str) -> str:
    """The event on the owner's chat-list channel (`owner_channel`): a chat was created
    or changed status."""
    return dumps(
        {"kind": kind, "chat_id": str(chat.id), "status": chat.status.value, "title": chat.title}
    )
