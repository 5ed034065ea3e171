"""Answers: what counts as one, twice, or none, in one chat's stored messages."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from chatd_trio.domain import (
    Message,
    Role,
    TextPart,
    ToolCallPart,
    text_of,
)

__all__ = [
    "AnswerCounts",
    "StoredMessage",
    "answer_counts",
]


@dataclass(frozen=True)
class StoredMessage:
    """The fields of a stored message the reliability counts look at."""

    id: int
    role: str
    part_types: tuple[str, ...]
    text: str
    compressed: bool
    user_visible: bool

    @classmethod
    def from_message(cls, m: Message) -> StoredMessage:
        return cls(
            m.id,
            m.role.value,
            tuple(p.type for p in m.parts),
            text_of(m.parts),
            m.compressed,
            m.user_visible,
        )

    @classmethod
    def from_row(
        cls, id_: int, role: str, content: Any, visibility: str, compressed: bool
    ) -> StoredMessage:
        parts = content if isinstance(content, list) else []
        types = tuple(str(p.get("type")) for p in parts if isinstance(p, dict))
        text = "".join(
            str(p.get("text", ""))
            for p in parts
            if isinstance(p, dict) and p.get("type") == TextPart.type
        )
        return cls(id_, role, types, text, compressed, visibility in ("user", "both"))

    @property
    def is_answer(self) -> bool:
        """An assistant message without tool calls and with non-blank text."""
        return (
            self.role == Role.ASSISTANT.value
            and not self.compressed
            and ToolCallPart.type not in self.part_types
            and bool(self.text.strip())
        )

    @property
    def is_user_message(self) -> bool:
        """A user's message (the compaction summary, stored as a compressed user
        message, is not one)."""
        return self.role == Role.USER.value and not self.compressed


@dataclass(frozen=True)
class AnswerCounts:
    """Answers to the user messages of one chat."""

    users: int = 0
    answered: int = 0
    unanswered: int = 0
    duplicates: int = 0
    last_answered: bool = False


def answer_counts(messages: Iterable[StoredMessage]) -> AnswerCounts:
    """Count answers per user message in one chat's non-deleted messages (id order).

    A user message is answered by the answers (`StoredMessage.is_answer`) before the
    next user message. Each answer after the first is a duplicate, except the first
    answer after a compaction (any compressed message): that is the loop's re-entry.
    """
    users = answered = unanswered = duplicates = 0
    in_turn = turn_answered = False
    since_boundary = 0
    for m in messages:
        if m.is_user_message:
            if in_turn:
                answered += turn_answered
                unanswered += not turn_answered
            users += 1
            in_turn, turn_answered, since_boundary = True, False, 0
        elif m.compressed:
            since_boundary = 0
        elif m.is_answer and in_turn:
            if since_boundary >= 1:
                duplicates += 1
            since_boundary += 1
            turn_answered = True
    if in_turn:
        answered += turn_answered
        unanswered += not turn_answered
    return AnswerCounts(users, answered, unanswered, duplicates, in_turn and turn_answered)
