"""Announcing a change: which notifies a store write sends inside its transaction.

`change_notices` decides (pure: the lifecycle event and what the write applied in,
the notices out, in the order the server would publish them after the write);
`StreamAnnouncer` is the replica's `Announcer` that the store calls, and
`ChatStreams` seals what it hands over for the pubsub.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatd_trio.domain import (
    ChatStatus,
    ErrorEvent,
    ErrorPayload,
    EventType,
    Message,
    NotifyPayload,
    QueuedMessage,
    QueueUpdateEvent,
    StatusEvent,
)
from chatd_trio.lifecycle import Event
from chatd_trio.store.base import Applied

if TYPE_CHECKING:
    from chatd_trio.streams.replica import ChatStreams

__all__ = ["OwnerNotice", "StreamAnnouncer", "StreamNotice", "change_notices"]

_FINISHES = frozenset(
    {Event.FINISH_DONE, Event.FINISH_INTERRUPTED, Event.FINISH_ERROR, Event.FINISH_SHUTDOWN}
)


@dataclass(frozen=True)
class StreamNotice:
    """A control notify on the chat's stream channel."""

    payload: NotifyPayload
    kind: EventType


@dataclass(frozen=True)
class OwnerNotice:
    """An event on the owner's chat-list channel (`owner_payload`'s kind)."""

    kind: str


def change_notices(
    event: Event | None, applied: Applied, error: ErrorPayload | None
) -> list[StreamNotice | OwnerNotice]:
    """The control notifies of a change, as the server would publish them after it.

    `event` is the lifecycle event the write applied (None: a queue change alone),
    `error` the error of a turn whose finish may leave the chat `error`.
    """
    chat = applied.chat
    status = StreamNotice(
        NotifyPayload(
            status=chat.status,
            worker_id=chat.worker_id if chat.status is ChatStatus.RUNNING else None,
            owner_token=chat.owner_token,
        ),
        StatusEvent.type,
    )
    owner = OwnerNotice("status")

    def queue(queued: Sequence[QueuedMessage] | None) -> StreamNotice:
        return StreamNotice(NotifyPayload(queue_update=tuple(queued or ())), QueueUpdateEvent.type)

    # The owner channel hears of every status change (docs/spec.md §4).
    if event is None:
        return [queue(applied.queue)]
    if event is Event.CREATE:
        return [OwnerNotice("created")]
    if event is Event.SEND_MESSAGE:
        if applied.inserted:
            return [status, owner]
        return [] if applied.queue is None else [queue(applied.queue)]
    if event is Event.EDIT:
        return [status, queue(()), owner]
    if event is Event.PROMOTE_QUEUED:
        promoted: list[StreamNotice | OwnerNotice] = []
        if applied.promoted is not None:
            promoted = [status, owner]
        return [*promoted, queue(applied.queue)]
    if event is Event.INTERRUPT:
        # A pending chat is left as it was: its owner hears nothing new.
        return [status] if chat.status is ChatStatus.PENDING else [status, owner]
    if event in (Event.ACQUIRE, Event.STALE_RECOVERED):
        return [status, owner]
    if event not in _FINISHES:
        return []
    out: list[StreamNotice | OwnerNotice] = []
    if error is not None and chat.status is ChatStatus.ERROR:
        payload = NotifyPayload(error_payload=error, error=error.message)
        out.append(StreamNotice(payload, ErrorEvent.type))
    if applied.promoted is not None:
        out.append(queue(applied.queue))
    out.append(status)
    # A stopped turn that leaves the chat `waiting` changed no status: the interrupt
    # did, and announced it.
    if not (event is Event.FINISH_INTERRUPTED and chat.status is ChatStatus.WAITING):
        out.append(owner)
    return out


class StreamAnnouncer:
    """The replica's `Announcer`: the notifies its publishes would send, sealed for its
    pubsub, for the store to send inside the writing transaction."""

    def __init__(self, streams: ChatStreams, error: ErrorPayload | None = None) -> None:
        self._streams = streams
        self._error = error

    def __call__(
        self, messages: Sequence[Message], *, refresh: bool = False
    ) -> list[tuple[str, str]]:
        """The stream notifies of inserted messages (a full refresh after an edit)."""
        return self._streams._announce(messages, refresh=refresh)

    def changes(self, event: Event | None, applied: Applied) -> list[tuple[str, str]]:
        """Status, queue and owner notifies of the change (and the error of a failed turn)."""
        return self._streams._changes(event, applied, self._error)

    def with_error(self, error: ErrorPayload | None) -> StreamAnnouncer:
        """This announcer, also announcing `error` when a finish leaves the chat `error`."""
        return StreamAnnouncer(self._streams, error)
