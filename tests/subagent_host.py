"""`StoreSubagentHost`: a `SubagentHost` for tests of the subagent tools without a Server.

It calls the store directly: it publishes nothing and wakes nothing, so whoever
acquires chats from the store (polling) picks the children up.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from chatd_trio.config import QueueConfig, RequestOptions, SubagentConfig
from chatd_trio.domain import Chat, Part, text_of
from chatd_trio.errors import PermissionDenied
from chatd_trio.store.base import Store
from chatd_trio.subagents import title_from_prompt


class StoreSubagentHost:
    """A `SubagentHost` that calls the store directly (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        config: SubagentConfig | None = None,
        queue: QueueConfig | None = None,
    ) -> None:
        self._store = store
        self._config = config or SubagentConfig()
        self._queue = queue or QueueConfig()

    async def _owned(self, owner_id: uuid.UUID, chat_id: uuid.UUID) -> Chat:
        chat = await self._store.get_chat(chat_id)
        if chat.owner_id != owner_id:
            raise PermissionDenied(f"chat {chat_id} does not belong to this user")
        return chat

    async def create_chat(
        self,
        owner_id: uuid.UUID,
        parts: Sequence[Part],
        /,
        *,
        title: str | None = None,
        parent_chat_id: uuid.UUID | None = None,
        workspace_id: uuid.UUID | None = None,
        build_id: uuid.UUID | None = None,
        agent_id: uuid.UUID | None = None,
        mcp_servers: Sequence[str] = (),
        model_options: RequestOptions | None = None,
    ) -> Chat:
        """Create the chat with its first user message; it starts `pending`."""
        if parent_chat_id is not None:
            await self._owned(owner_id, parent_chat_id)
        if title is None:
            title = title_from_prompt(text_of(parts), self._config)
        chat, _ = await self._store.create_chat(
            owner_id,
            title,
            parts,
            workspace_id=workspace_id,
            build_id=build_id,
            agent_id=agent_id,
            parent_chat_id=parent_chat_id,
            mcp_servers=mcp_servers,
            model_options=model_options,
        )
        return chat

    async def send_message(
        self, owner_id: uuid.UUID, chat_id: uuid.UUID, parts: Sequence[Part], /
    ) -> None:
        """Insert the message (chat -> pending) or queue it when the chat is busy."""
        await self._owned(owner_id, chat_id)
        await self._store.send_message(chat_id, parts, max_queued=self._queue.max_queued)

    async def interrupt(self, owner_id: uuid.UUID, chat_id: uuid.UUID, /) -> None:
        """Set the chat `waiting` (a `pending` chat stays pending)."""
        await self._owned(owner_id, chat_id)
        await self._store.interrupt(chat_id)
