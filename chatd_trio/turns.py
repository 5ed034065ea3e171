"""Waiting for a chat's work to end: what `Server.wait_turn` and `Server.send_and_wait` do.

A chat has work while it is `pending` or `running`; it is settled once it is `error`,
or `waiting` with an empty queue. (A turn that ends by promoting a queued message
leaves the chat `pending`, so the wait goes on through the next turn; a chat that is
`waiting` with queued messages was interrupted and its stopped run has yet to promote
one.) The wait subscribes to the chat's stream and wakes on its status events (no
polling); the store has the last word: a status event only prompts a read of the row,
since a notify may be older than the row. The messages of the report are read from the
store once the chat settled.

An interrupt makes the chat `waiting` before its stopped run has stored what it
produced. The replica running that turn waits for it to end (`quiesce`); another
replica cannot know of it, so a report made there right after an interrupt may come
before the stopped turn's partial answer is stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from chatd_trio.domain import (
    Chat,
    ChatStatus,
    ErrorEvent,
    ErrorPayload,
    Message,
    Role,
    StatusEvent,
    text_of,
)
from chatd_trio.errors import PubSubError, StoreError
from chatd_trio.store.base import Store
from chatd_trio.streams import ChatStreams

SETTLED = frozenset({ChatStatus.WAITING, ChatStatus.ERROR})

# `error` events of these kinds are about the subscription, not about the chat's turn.
_SUBSCRIPTION_KINDS = frozenset({"snapshot", "pubsub"})


@dataclass(frozen=True)
class TurnReport:
    """How a chat's work ended.

    `chat` is the row once settled (`waiting` or `error`). `messages` are the
    user-visible messages after `after_message_id`, in order: the user message and
    what the turns answered (after an edit, the history as it is now). `error` says
    why the chat is in `error`: the structured error the failed turn published, or the
    row's `last_error` when the wait did not see it; None when the chat is `waiting`.
    """

    chat: Chat
    messages: tuple[Message, ...]
    error: ErrorPayload | None
    after_message_id: int = 0

    @property
    def status(self) -> ChatStatus:
        """The chat's status: `waiting`, or `error` when its last turn failed."""
        return self.chat.status

    @property
    def failed(self) -> bool:
        """Whether the chat ended in `error`."""
        return self.chat.status is ChatStatus.ERROR

    @property
    def cursor(self) -> int:
        """The id of the last message reported: where the next wait starts."""
        return self.messages[-1].id if self.messages else self.after_message_id

    @property
    def text(self) -> str:
        """The text of the last assistant message reported ("" when there is none)."""
        for message in reversed(self.messages):
            if message.role is Role.ASSISTANT:
                text = text_of(message.parts)
                if text:
                    return text
        return ""


def settled(chat: Chat) -> bool:
    """Whether the chat has no work left (and no stopped run about to promote some)."""
    return chat.status is ChatStatus.ERROR or (
        chat.status is ChatStatus.WAITING and chat.queued == 0
    )


async def wait_settled(
    streams: ChatStreams,
    store: Store,
    chat_id: uuid.UUID,
    after_message_id: int = 0,
    *,
    quiesce: Callable[[uuid.UUID], Awaitable[bool]] | None = None,
) -> TurnReport:
    """Wait until the chat is settled and report (at once if it already is).

    `quiesce(chat_id)` waits for a turn of the chat still ending on this replica and
    says whether there was one. Raises `StoreError` or `PubSubError` when the chat's
    stream fails before it settles (the snapshot cannot be read, the pubsub
    subscription is lost): call again to go on. Not bounded in time: wrap it in
    `trio.fail_after` or `trio.move_on_after`.
    """
    error: ErrorPayload | None = None
    chat: Chat | None = None
    async with streams.subscribe(chat_id, after_message_id) as sub:
        async for event in sub:
            if isinstance(event, ErrorEvent):
                if event.error.kind in _SUBSCRIPTION_KINDS:
                    raise _lost(event.error)
                error = event.error
            elif isinstance(event, StatusEvent) and event.status in SETTLED:
                row = await store.get_chat(chat_id)
                if settled(row) and quiesce is not None and await quiesce(chat_id):
                    row = await store.get_chat(chat_id)
                if settled(row):
                    chat = row
                    break
        else:
            # The subscription ended: a catch-up read failed (its `error` event came last).
            raise _lost(error or ErrorPayload("chat stream ended", kind="store"))
    assert chat is not None
    messages = await store.messages_after(chat_id, after_message_id)
    if chat.status is ChatStatus.ERROR:
        if error is None or (chat.last_error and error.message != chat.last_error):
            error = ErrorPayload(chat.last_error or "the turn failed", kind="unknown")
    else:
        error = None
    return TurnReport(chat, tuple(messages), error, after_message_id)


def _lost(error: ErrorPayload) -> StoreError | PubSubError:
    if error.kind == "pubsub":
        return PubSubError(error.message)
    return StoreError(error.message)


__all__ = ["SETTLED", "TurnReport", "settled", "wait_settled"]
