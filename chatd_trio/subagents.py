"""Subagents (docs/spec.md §6): spawn, wait for, message and close child chats.

A root chat may spawn child chats through four tools. A child inherits its
parent's owner, workspace binding and MCP servers and starts `pending`, so any
replica acquires it like every other chat. Waiting for a child wakes on the
child's stream notifies, with a slow fallback poll (a notify may be lost), or
polls quickly when there is no pubsub.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from typing import Annotated, Literal, Protocol

import pydantic
import trio

from chatd_trio.config import RequestOptions, SubagentConfig
from chatd_trio.domain import JSON, Chat, ChatStatus, Part, TextPart, stream_channel
from chatd_trio.errors import (
    ChatdError,
    ChatNotFound,
    PubSubError,
    SubagentError,
    ToolError,
)
from chatd_trio.pubsub.base import PubSub, Resync, Subscription
from chatd_trio.store.base import Store
from chatd_trio.tools import Tool, ToolContext, typed_tool

__all__ = [
    "NOT_DESCENDANT",
    "NO_REPORT_ERROR",
    "NO_SPAWN_FROM_CHILD",
    "SubagentHost",
    "SubagentStatistics",
    "SubagentStats",
    "await_subagent",
    "is_descendant",
    "subagent_tools",
    "title_from_prompt",
]

logger = logging.getLogger(__name__)

#: The error of a child that ended in `error` without any report text (docs/spec.md §6).
NO_REPORT_ERROR = "agent reached error status"
#: The error a child chat gets from any subagent tool.
NO_SPAWN_FROM_CHILD = "subagents cannot spawn subagents"
#: Part of the error when the awaited chat is not below the caller.
NOT_DESCENDANT = "not a descendant"
_ELLIPSIS = "…"

WakeSource = Literal["notify", "resync", "poll"]


# -- the host --------------------------------------------------------------------------------


class SubagentHost(Protocol):
    """What the subagent tools need from the replica: the Server implements it.

    Positional parameters are positional-only and results are `object` so that the
    Server's richer signatures (a `str | Sequence[Part]` content, returned results)
    satisfy this protocol.
    """

    async def create_chat(
        self,
        owner_id: uuid.UUID,
        parts: Sequence[Part],
        /,
        *,
        title: str | None,
        parent_chat_id: uuid.UUID | None,
        workspace_id: uuid.UUID | None,
        build_id: uuid.UUID | None,
        agent_id: uuid.UUID | None,
        mcp_servers: Sequence[str],
        model_options: RequestOptions | None,
    ) -> Chat:
        """Persist a chat (it starts `pending`), publish it and wake acquisition."""
        ...

    async def send_message(
        self, owner_id: uuid.UUID, chat_id: uuid.UUID, parts: Sequence[Part], /
    ) -> object:
        """Send a user message to the chat (queued when it is busy)."""
        ...

    async def interrupt(self, owner_id: uuid.UUID, chat_id: uuid.UUID, /) -> object:
        """Stop the chat's running turn."""
        ...


# -- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubagentStatistics:
    """A snapshot of `SubagentStats`."""

    spawned: int
    waits: int
    completed: int
    errored: int
    timed_out: int
    #: Completion checks (one chat read each, plus a report read when done).
    checks: int
    #: Wake-ups by source: a notify on the child's channel, a pubsub resync, a poll tick.
    notify_wakes: int
    resync_wakes: int
    poll_wakes: int
    #: Waits that lost their subscription (or never got one) and fell back to fast polling.
    pubsub_fallbacks: int


@dataclass
class SubagentStats:
    """Counters of one replica's subagent activity; pass one instance everywhere."""

    spawned: int = 0
    waits: int = 0
    completed: int = 0
    errored: int = 0
    timed_out: int = 0
    checks: int = 0
    notify_wakes: int = 0
    resync_wakes: int = 0
    poll_wakes: int = 0
    pubsub_fallbacks: int = 0

    def woke(self, source: WakeSource) -> None:
        """Count one wake-up."""
        if source == "notify":
            self.notify_wakes += 1
        elif source == "resync":
            self.resync_wakes += 1
        else:
            self.poll_wakes += 1

    def statistics(self) -> SubagentStatistics:
        """A frozen copy of the counters."""
        return SubagentStatistics(**asdict(self))


# -- pure helpers ----------------------------------------------------------------------------


def title_from_prompt(prompt: str, config: SubagentConfig | None = None) -> str:
    """A chat title from its prompt: the first `title_words` words, "…" when words were
    dropped, at most `title_max_chars` characters; `fallback_title` ("New Chat") when
    there are no words."""
    cfg = config or SubagentConfig()
    words = prompt.split()
    if not words:
        return cfg.fallback_title
    title = " ".join(words[: cfg.title_words])
    if len(words) > cfg.title_words:
        title += _ELLIPSIS
    if len(title) > cfg.title_max_chars:
        # The ellipsis counts towards the limit, so the title never exceeds it.
        title = title[: max(cfg.title_max_chars - len(_ELLIPSIS), 0)].rstrip() + _ELLIPSIS
    return title


async def is_descendant(store: Store, ancestor_id: uuid.UUID, target_id: uuid.UUID) -> bool:
    """True when `target_id` lies below `ancestor_id`.

    Walks UP from the target (one `parent_of` per level, O(depth)); the same id, a
    missing row, reaching a root, or a cycle all answer False.
    """
    if ancestor_id == target_id:
        return False
    visited = {target_id}
    current = target_id
    while True:
        try:
            parent = await store.parent_of(current)
        except ChatNotFound:
            return False
        if parent is None:
            return False
        if parent == ancestor_id:
            return True
        if parent in visited:
            logger.warning(
                "cycle in the chat parent chain",
                extra={"chat_id": str(target_id), "cycle_at": str(parent)},
            )
            return False
        visited.add(parent)
        current = parent


# -- waiting ---------------------------------------------------------------------------------


async def _report_if_done(store: Store, child_id: uuid.UUID, stats: SubagentStats) -> str | None:
    """The child's report once it is done, None while it still has work."""
    stats.checks += 1
    try:
        chat = await store.get_chat(child_id)
    except ChatNotFound:
        raise SubagentError(f"chat {child_id} no longer exists") from None
    if chat.status in (ChatStatus.PENDING, ChatStatus.RUNNING):
        return None
    report = await store.latest_assistant_text(child_id) or ""
    if chat.status is ChatStatus.ERROR:
        stats.errored += 1
        raise SubagentError(report.strip() or NO_REPORT_ERROR)
    stats.completed += 1
    return report


async def _next_wake(sub: Subscription | None, interval: float) -> WakeSource:
    """Wait for a delivery on `sub` or `interval` seconds, whichever comes first."""
    if sub is None:
        await trio.sleep(interval)
        return "poll"
    with trio.move_on_after(interval):
        delivery = await sub.receive()
        return "resync" if isinstance(delivery, Resync) else "notify"
    return "poll"


async def await_subagent(
    store: Store,
    pubsub: PubSub | None,
    parent_id: uuid.UUID,
    child_id: uuid.UUID,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 (0 or None means the configured default)
    config: SubagentConfig | None = None,
    stats: SubagentStats | None = None,
) -> str:
    """Wait until the child chat is done and return its report.

    Raises `SubagentError` when the child is not a descendant of `parent_id`, ends in
    `error` (its report text, or "agent reached error status"), disappears, or is not
    done within `timeout` seconds (0, negative or None: `config.await_timeout`).
    """
    cfg = config or SubagentConfig()
    st = stats if stats is not None else SubagentStats()
    limit = timeout if timeout is not None and timeout > 0 else cfg.await_timeout
    if not await is_descendant(store, parent_id, child_id):
        raise SubagentError(f"chat {child_id} is {NOT_DESCENDANT} of chat {parent_id}")
    st.waits += 1
    extra = {"chat_id": str(parent_id), "child_chat_id": str(child_id)}
    with trio.move_on_after(limit):
        async with AsyncExitStack() as stack:
            sub: Subscription | None = None
            if pubsub is not None:
                try:
                    # Subscribed BEFORE the first check: a completion between the check
                    # and the wait still leaves its notify in the subscription.
                    sub = await stack.enter_async_context(
                        pubsub.subscribe(stream_channel(child_id))
                    )
                except PubSubError as exc:
                    st.pubsub_fallbacks += 1
                    logger.warning(
                        "subagent wait cannot subscribe; polling",
                        extra={**extra, "error": str(exc)},
                    )
            while True:
                report = await _report_if_done(store, child_id, st)
                if report is not None:
                    return report
                interval = cfg.poll_interval_no_pubsub if sub is None else cfg.poll_interval_pubsub
                try:
                    st.woke(await _next_wake(sub, interval))
                except PubSubError as exc:
                    # The subscription can no longer wake us: poll fast from here on.
                    st.pubsub_fallbacks += 1
                    sub = None
                    logger.warning(
                        "subagent wait lost its subscription; polling",
                        extra={**extra, "error": str(exc)},
                    )
    st.timed_out += 1
    raise SubagentError(f"timed out after {limit:g} s waiting for chat {child_id}")


# -- tools -----------------------------------------------------------------------------------


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Text = Annotated[str, pydantic.Field(min_length=1), pydantic.AfterValidator(_not_blank)]
Seconds = Annotated[float, pydantic.Field(allow_inf_nan=False)]


def subagent_tools(
    host: SubagentHost,
    store: Store,
    pubsub: PubSub | None,
    config: SubagentConfig | None = None,
    *,
    stats: SubagentStats | None = None,
) -> list[Tool]:
    """`spawn_agent`, `wait_agent`, `message_agent` and `close_agent` for a root chat.

    The caller offers them to root chats only; a child calling one gets the error
    "subagents cannot spawn subagents". The calling chat comes from `ToolContext.chat_id`.
    """
    cfg = config or SubagentConfig()
    st = stats if stats is not None else SubagentStats()

    async def root_chat(ctx: ToolContext) -> Chat:
        try:
            chat = await store.get_chat(ctx.chat_id)
        except ChatNotFound as exc:
            raise ToolError(str(exc)) from None
        if chat.parent_chat_id is not None:
            raise ToolError(NO_SPAWN_FROM_CHILD)
        return chat

    async def own_child(parent: Chat, child_id: uuid.UUID) -> uuid.UUID:
        if not await is_descendant(store, parent.id, child_id):
            raise ToolError(f"chat {child_id} is {NOT_DESCENDANT} of this chat")
        return child_id

    async def spawn_agent(prompt: Text, ctx: ToolContext, title: str | None = None) -> JSON:
        """Start a subagent: a child chat that works on `prompt` in this chat's workspace.
        Returns its chat_id at once; use wait_agent for its report.

        Args:
            prompt: The task for the subagent.
            title: A short title for the subagent chat.
        """
        parent = await root_chat(ctx)
        chosen = title.strip() if title else ""
        try:
            child = await host.create_chat(
                parent.owner_id,
                (TextPart(prompt),),
                title=chosen or title_from_prompt(prompt, cfg),
                parent_chat_id=parent.id,
                workspace_id=parent.workspace_id,
                build_id=parent.build_id,
                agent_id=parent.agent_id,
                mcp_servers=parent.mcp_servers,
                model_options=parent.model_options,
            )
        except ChatdError as exc:
            raise ToolError(f"cannot spawn the subagent: {exc}") from exc
        st.spawned += 1
        logger.info(
            "subagent spawned", extra={"chat_id": str(parent.id), "child_chat_id": str(child.id)}
        )
        return {"chat_id": str(child.id), "title": child.title, "status": child.status.value}

    async def wait_agent(
        chat_id: uuid.UUID, ctx: ToolContext, timeout_s: Seconds | None = None
    ) -> JSON:
        """Wait until a subagent has finished and return its report (its latest reply).

        Args:
            chat_id: The subagent's chat id.
            timeout_s: Seconds to wait; omitted or 0 means the default.
        """
        parent = await root_chat(ctx)
        try:
            report = await await_subagent(
                store, pubsub, parent.id, chat_id, timeout=timeout_s, config=cfg, stats=st
            )
        except SubagentError as exc:
            raise ToolError(str(exc)) from exc
        return {"chat_id": str(chat_id), "report": report}

    async def message_agent(chat_id: uuid.UUID, message: Text, ctx: ToolContext) -> JSON:
        """Send a follow-up message to a subagent (queued while it is busy).

        Args:
            chat_id: The subagent's chat id.
            message: The message to send.
        """
        parent = await root_chat(ctx)
        child_id = await own_child(parent, chat_id)
        try:
            await host.send_message(parent.owner_id, child_id, (TextPart(message),))
        except ChatdError as exc:
            raise ToolError(f"cannot message the subagent: {exc}") from exc
        return {"chat_id": str(child_id), "sent": True}

    async def close_agent(chat_id: uuid.UUID, ctx: ToolContext) -> JSON:
        """Stop a subagent's current run.

        Args:
            chat_id: The subagent's chat id.
        """
        parent = await root_chat(ctx)
        child_id = await own_child(parent, chat_id)
        try:
            await host.interrupt(parent.owner_id, child_id)
        except ChatdError as exc:
            raise ToolError(f"cannot close the subagent: {exc}") from exc
        return {"chat_id": str(child_id), "closed": True}

    return [typed_tool(fn) for fn in (spawn_agent, wait_agent, message_agent, close_agent)]
