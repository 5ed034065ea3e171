"""Decisions about a turn's history: whether a recovered turn is already answered, and
how to shorten a summary prompt the model refused as too long. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence

from chatd_trio.domain import (
    Role,
    ToolCallPart,
    ToolResultPart,
)
from chatd_trio.models.base import (
    PromptMessage,
)

__all__ = ["already_answered", "shortened_for_summary"]


def already_answered(history: Sequence[PromptMessage]) -> bool:
    """Whether the history after its last user message ends in a final answer: an
    assistant message without tool calls, with every earlier tool call answered.

    A recovered turn over such a history is complete; running the model again
    would answer the same message twice.
    """
    last_user = None
    for index, message in enumerate(history):
        if message.role is Role.USER and not getattr(message, "compressed", False):
            last_user = index
    if last_user is None:
        return False
    tail = history[last_user + 1 :]
    if not tail or tail[-1].role is not Role.ASSISTANT:
        return False
    calls = {p.call_id for m in tail for p in m.parts if isinstance(p, ToolCallPart)}
    answered = {p.call_id for m in tail for p in m.parts if isinstance(p, ToolResultPart)}
    final_calls = any(isinstance(p, ToolCallPart) for p in tail[-1].parts)
    return not final_calls and calls <= answered


def shortened_for_summary(history: Sequence[PromptMessage]) -> list[PromptMessage] | None:
    """The history without its older half, for a summary prompt the model refused as too
    long; None when nothing more can go.

    System messages and an earlier summary (compressed) stay. The cut moves forward to
    a user message, or failing that past tool messages, so that no tool result is left
    without its call (providers refuse that).
    """
    pinned = [m.role is Role.SYSTEM or bool(getattr(m, "compressed", False)) for m in history]
    movable = [i for i, pin in enumerate(pinned) if not pin]
    if len(movable) < 2:
        return None
    rest = movable[len(movable) // 2 :]
    users = [i for i in rest if history[i].role is Role.USER]
    others = [i for i in rest if history[i].role is not Role.TOOL]
    if not (users or others):
        return None
    cut = (users or others)[0]
    return [m for i, m in enumerate(history) if pinned[i] or i >= cut]
