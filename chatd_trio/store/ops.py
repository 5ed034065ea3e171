"""The store's use-case operations, shared by every adapter: decide, then write once, guarded.

Each operation asks `chatd_trio.lifecycle.decide` for a plan on the caller's view
of the chat (or a presumed one: the usual state for that operation), then hands
the plan to the adapter's `apply`, which executes it as one guarded write. When
the guard no longer holds, `apply` changes nothing and returns the row as it is;
the operation decides again on that view. An adapter implements `apply`, the
bulk primitives (`_claim`, `_recover`, `_release`, `_insert_chat`) and the reads;
it holds no status logic.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from typing import TypeVar

from chatd_trio.config import LimitsConfig, RequestOptions
from chatd_trio.domain import (
    Chat,
    ChatStatus,
    Message,
    NewMessage,
    Part,
    Role,
    TextPart,
    Visibility,
    dumps,
    optional_uuid,
    parse_row_id,
    parse_uuid,
)
from chatd_trio.errors import (
    ChatNotFound,
    DecodeError,
    OwnershipLost,
    PersistRefused,
    QueueFull,
    StoreError,
)
from chatd_trio.lifecycle import ChatView, Effect, Event, Plan, Refused, decide, taken
from chatd_trio.storable import Cleaned, storable_messages, storable_text
from chatd_trio.store.base import (
    Announcer,
    Applied,
    Binding,
    EditResult,
    FinishResult,
    Lease,
    PromptCache,
    SendResult,
    TurnOutcome,
    Write,
    check_title,
    check_user_parts,
)

__all__ = ["StoreOps", "stored_options", "user_message"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Each miss means another writer changed the row between decision and write; a row
# that keeps changing this often is a bug or a storm, not a race to keep losing.
_MAX_ATTEMPTS = 16

_FINISH_EVENTS: dict[TurnOutcome, Event] = {
    TurnOutcome.DONE: Event.FINISH_DONE,
    TurnOutcome.INTERRUPTED: Event.FINISH_INTERRUPTED,
    TurnOutcome.ERROR: Event.FINISH_ERROR,
    TurnOutcome.SHUTDOWN: Event.FINISH_SHUTDOWN,
    TurnOutcome.UNAVAILABLE: Event.FINISH_SHUTDOWN,
}


def user_message(parts: Sequence[Part]) -> NewMessage:
    """A user message as the history stores it."""
    return NewMessage(Role.USER, tuple(parts), Visibility.BOTH)


def stored_options(options: RequestOptions | None) -> RequestOptions | None:
    """A chat's request options as both stores keep them: through their JSON form (so
    what a read returns does not depend on the adapter), None when none is set."""
    if options is None:
        return None
    data = options.to_json()
    if not data:
        return None
    try:
        return RequestOptions.from_json(json.loads(dumps(data)))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError("model_options", f"not JSON: {exc}") from exc


def _presumed(status: ChatStatus, token: int = 0) -> ChatView:
    return ChatView(status, token, 0)


def _flagged(cleaned: Cleaned[T], what: str) -> T:
    """The cleaned value; replaced characters are logged (the value was altered)."""
    if cleaned.replaced:
        logger.warning(
            "replaced %d characters that cannot be stored (NUL, lone surrogates) in %s",
            cleaned.replaced,
            what,
        )
    return cleaned.value


def _turn_messages(messages: Sequence[NewMessage]) -> tuple[NewMessage, ...]:
    """A turn's messages as they can be stored: its own output never fails the write, a
    tool result that cannot be stored becomes an error result."""
    return _flagged(storable_messages(messages, tool_results="error"), "a turn's messages")


class StoreOps:
    """Use-case operations on top of an adapter's `apply` (mixed into each adapter).

    The adapter implements the primitives below; everything else is shared.
    """

    _limits: LimitsConfig
    _prompts: PromptCache

    # -- what an adapter implements ---------------------------------------------------------

    async def apply(
        self,
        chat_id: uuid.UUID,
        plan: Plan,
        write: Write,
        *,
        announce: Announcer | None = None,
    ) -> Applied:
        raise NotImplementedError

    async def get_chat(self, chat_id: uuid.UUID) -> Chat:
        raise NotImplementedError

    async def _set_binding(self, chat_id: uuid.UUID, binding: Binding) -> None:
        raise NotImplementedError

    async def _claim(
        self,
        plan: Plan,
        worker_id: uuid.UUID,
        limit: int,
        announce: Announcer | None,
        prompts: bool = False,
    ) -> list[Chat]:
        raise NotImplementedError

    async def _recover(
        self, plan: Plan, stale_after: float, announce: Announcer | None
    ) -> list[uuid.UUID]:
        raise NotImplementedError

    async def _release(self, plan: Plan, leases: Sequence[Lease]) -> int:
        """Execute `plan` on the chats still held under `leases`; how many it changed."""
        raise NotImplementedError

    async def _insert_chat(
        self,
        plan: Plan,
        owner_id: uuid.UUID,
        title: str,
        messages: Sequence[NewMessage],
        *,
        workspace_id: uuid.UUID | None,
        build_id: uuid.UUID | None,
        agent_id: uuid.UUID | None,
        parent_chat_id: uuid.UUID | None,
        mcp_servers: Sequence[str],
        model_options: RequestOptions | None,
        announce: Announcer | None,
    ) -> tuple[Chat, Message]:
        raise NotImplementedError

    # -- shared operations -------------------------------------------------------------------

    async def _decided(
        self,
        chat_id: uuid.UUID,
        event: Event,
        view: ChatView,
        write: Write,
        *,
        announce: Announcer | None = None,
        token: int | None = None,
        max_queued: int = 0,
        error: str | None = None,
    ) -> Applied:
        """Decide on `view` and apply; on a guard miss decide again on the row as it is now.

        Raises `Refused` (with the current row when one was read) when the chart has no
        transition for the event in the row's state.
        """
        current: Chat | None = None
        for _ in range(_MAX_ATTEMPTS):
            try:
                plan = decide(event, view, token=token, max_queued=max_queued, error=error)
            except Refused as refused:
                raise Refused(event, view, current) from refused
            result = await self.apply(chat_id, plan, write, announce=announce)
            if result.applied:
                # A replay is the landing of an earlier attempt that did not report it.
                taken(plan)
                return result
            current = result.chat
            view = result.view
        raise StoreError(f"chat {chat_id} changed under {_MAX_ATTEMPTS} attempts of {event}")

    # -- chats --------------------------------------------------------------------------
    async def create_chat(
        self,
        owner_id: uuid.UUID,
        title: str,
        parts: Sequence[Part],
        *,
        workspace_id: uuid.UUID | None = None,
        build_id: uuid.UUID | None = None,
        agent_id: uuid.UUID | None = None,
        parent_chat_id: uuid.UUID | None = None,
        mcp_servers: Sequence[str] = (),
        system_prompt: str | None = None,
        model_options: RequestOptions | None = None,
        limits: LimitsConfig | None = None,
        announce: Announcer | None = None,
    ) -> tuple[Chat, Message]:
        """Create a chat with its first user message; the chat starts `pending`."""
        owner_id = parse_uuid(owner_id, "owner_id")
        parent_chat_id = optional_uuid(parent_chat_id, "parent_chat_id")
        workspace_id = optional_uuid(workspace_id, "workspace_id")
        agent_id = optional_uuid(agent_id, "agent_id")
        options = stored_options(model_options)
        limits = limits or self._limits
        title = check_title(title, limits)
        stored = _flagged(check_user_parts(parts, limits), "a user message")
        if isinstance(mcp_servers, str):
            raise DecodeError("mcp_servers", "expected a sequence of names, got one string")
        servers = tuple(
            storable_text(s, f"mcp_servers[{i}]").value for i, s in enumerate(mcp_servers)
        )
        plan = decide(Event.CREATE, None)
        messages: list[NewMessage] = []
        if system_prompt is not None:
            prompt = _flagged(storable_text(system_prompt, "system_prompt"), "a system prompt")
            messages.append(NewMessage(Role.SYSTEM, (TextPart(prompt),), Visibility.MODEL))
        messages.append(user_message(stored))
        created = await self._insert_chat(
            plan,
            owner_id,
            title,
            messages,
            workspace_id=workspace_id,
            build_id=build_id,
            agent_id=agent_id,
            parent_chat_id=parent_chat_id,
            mcp_servers=servers,
            model_options=options,
            announce=announce,
        )
        taken(plan)
        return created

    async def send_message(
        self,
        chat_id: uuid.UUID,
        parts: Sequence[Part],
        *,
        max_queued: int,
        announce: Announcer | None = None,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
        limits: LimitsConfig | None = None,
    ) -> SendResult:
        """Insert a user message (chat -> pending) or queue it (docs/spec.md §1)."""
        chat_id = parse_uuid(chat_id, "chat_id")
        owner_id = optional_uuid(owner_id, "owner_id")
        stored = _flagged(check_user_parts(parts, limits or self._limits), "a user message")
        start = ChatView.of(view) if view else _presumed(ChatStatus.WAITING)
        write = Write(messages=(user_message(stored),), parts=stored, owner_id=owner_id)
        try:
            res = await self._decided(
                chat_id, Event.SEND_MESSAGE, start, write, announce=announce, max_queued=max_queued
            )
        except Refused as refused:
            raise QueueFull(
                f"chat {chat_id} already has {refused.view.queued} queued messages"
            ) from None
        if res.inserted:
            return SendResult(res.chat, res.inserted[0], None, ())
        assert res.queued is not None and res.queue is not None
        return SendResult(res.chat, None, res.queued, res.queue)

    async def edit_message(
        self,
        chat_id: uuid.UUID,
        message_id: int,
        parts: Sequence[Part],
        *,
        announce: Announcer | None = None,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
        limits: LimitsConfig | None = None,
    ) -> EditResult:
        """Replace a user message and drop everything after it; the chat goes `pending`."""
        chat_id = parse_uuid(chat_id, "chat_id")
        owner_id = optional_uuid(owner_id, "owner_id")
        message_id = parse_row_id(message_id, "message_id")
        stored = _flagged(check_user_parts(parts, limits or self._limits), "a user message")
        start = ChatView.of(view) if view else _presumed(ChatStatus.WAITING)
        write = Write(
            messages=(user_message(stored),),
            edit_from=message_id,
            owner_id=owner_id,
        )
        res = await self._decided(chat_id, Event.EDIT, start, write, announce=announce)
        return EditResult(res.chat, res.inserted[0])

    async def interrupt(
        self,
        chat_id: uuid.UUID,
        *,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
        announce: Announcer | None = None,
    ) -> Chat:
        """Stop the chat: `waiting` and no owner, unless it is `pending`."""
        chat_id = parse_uuid(chat_id, "chat_id")
        owner_id = optional_uuid(owner_id, "owner_id")
        start = ChatView.of(view) if view else _presumed(ChatStatus.RUNNING)
        write = Write(owner_id=owner_id)
        return (await self._decided(chat_id, Event.INTERRUPT, start, write, announce=announce)).chat

    async def promote_queued(
        self,
        chat_id: uuid.UUID,
        queued_id: int,
        *,
        announce: Announcer | None = None,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
    ) -> SendResult:
        """Send a queued message now (chat -> pending), or move it to the front while the
        chat runs."""
        chat_id = parse_uuid(chat_id, "chat_id")
        owner_id = optional_uuid(owner_id, "owner_id")
        queued_id = parse_row_id(queued_id, "queued_id")
        start = ChatView.of(view) if view else _presumed(ChatStatus.WAITING)
        write = Write(queued_id=queued_id, owner_id=owner_id)
        res = await self._decided(chat_id, Event.PROMOTE_QUEUED, start, write, announce=announce)
        queue = res.queue or ()
        if res.promoted is not None:
            return SendResult(res.chat, res.promoted, None, queue)
        return SendResult(res.chat, None, res.queued, queue)

    # -- ownership ----------------------------------------------------------------------
    async def acquire(
        self,
        worker_id: uuid.UUID,
        limit: int,
        *,
        announce: Announcer | None = None,
        prompts: bool = False,
    ) -> list[Chat]:
        """Claim up to `limit` pending chats, oldest `updated_at` first, in one statement;
        with `announce`, each claim's `running` status is sent in the same transaction;
        with `prompts`, each claim's prompt is loaded too (`cached_prompt`)."""
        chats = await self._claim(_ACQUIRE, worker_id, limit, announce, prompts)
        taken(_ACQUIRE, len(chats))
        return chats

    def cached_prompt(self, lease: Lease) -> list[Message] | None:
        """The prompt `acquire(prompts=True)` loaded for this run, with its writes since."""
        return self._prompts.get(lease)

    def _remember_write(
        self, chat_id: uuid.UUID, plan: Plan, write: Write, applied: Applied, prev: int
    ) -> None:
        """Keep the prompt cache in step with a write that landed (`prev`: the chat's last
        model-visible message before it)."""
        if applied.replayed or plan.has(Effect.REPLACE_FROM):
            self._prompts.forget(chat_id)
        elif applied.inserted and write.stamp is not None:
            # A run's write: what the next acquisition finds before the user's messages.
            self._prompts.extend(chat_id, prev, applied.inserted)

    async def recover_stale(
        self, stale_after: float, *, announce: Announcer | None = None
    ) -> list[uuid.UUID]:
        """Running chats whose heartbeat is older than `stale_after` seconds -> pending;
        with `announce`, each one's `pending` status is sent in the same transaction."""
        recovered = await self._recover(_STALE_RECOVERED, stale_after, announce)
        taken(_STALE_RECOVERED, len(recovered))
        return recovered

    async def release(self, leases: Sequence[Lease]) -> None:
        """Hand chats still held under these leases back to `pending`."""
        taken(_RELEASE, await self._release(_RELEASE, leases))

    async def heartbeat(self, lease: Lease) -> bool:
        """Refresh heartbeat_at; False when the lease no longer holds the running chat."""
        write = Write()
        try:
            await self._decided(
                lease.chat_id,
                Event.HEARTBEAT,
                _presumed(ChatStatus.RUNNING, lease.token),
                write,
                token=lease.token,
            )
        except (Refused, ChatNotFound):
            # A lease on a chat that does not exist holds nothing (as before fencing).
            return False
        return True

    async def _write(
        self,
        lease: Lease,
        write: Write,
        announce: Announcer | None,
    ) -> Applied:
        try:
            return await self._decided(
                lease.chat_id,
                Event.WRITE,
                _presumed(ChatStatus.RUNNING, lease.token),
                write,
                announce=announce,
                token=lease.token,
            )
        except Refused as refused:
            raise _refusal(lease, refused.view) from None

    async def persist_step(
        self,
        lease: Lease,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
        op_id: uuid.UUID | None = None,
    ) -> list[Message]:
        """Insert a step's messages while the lease holds the chat. Retried with the
        same `op_id`, a write that already landed returns what it inserted."""
        if not messages:
            # Still a guarded check: an empty write tells the caller whether it was refused.
            await self._write(lease, Write(), None)
            return []
        write = Write(
            messages=_turn_messages(messages), stamp=lease.token, op_id=op_id or uuid.uuid4()
        )
        return list((await self._write(lease, write, announce)).inserted)

    async def persist_compaction(
        self,
        lease: Lease,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
        op_id: uuid.UUID | None = None,
    ) -> list[Message]:
        """Insert the three compaction messages; same ownership rule as persist_step."""
        return await self.persist_step(lease, messages, announce=announce, op_id=op_id)

    async def update_binding(
        self,
        chat_id: uuid.UUID,
        workspace_id: uuid.UUID | None,
        build_id: uuid.UUID | None,
        agent_id: uuid.UUID | None,
        *,
        lease: Lease | None = None,
    ) -> None:
        """Set the chat's workspace binding (guarded by `lease` when given)."""
        chat_id = parse_uuid(chat_id, "chat_id")
        workspace_id = optional_uuid(workspace_id, "workspace_id")
        build_id = optional_uuid(build_id, "build_id")
        agent_id = optional_uuid(agent_id, "agent_id")
        binding = Binding(workspace_id, build_id, agent_id)
        if lease is not None:
            await self._write(lease, Write(binding=binding), None)
            return
        await self._set_binding(chat_id, binding)

    async def finish_turn(
        self,
        lease: Lease,
        outcome: TurnOutcome,
        last_error: str | None = None,
        *,
        messages: Sequence[NewMessage] = (),
        announce: Announcer | None = None,
        op_id: uuid.UUID | None = None,
    ) -> FinishResult:
        """The final transition with the turn's final messages, in one guarded write.
        Retried with the same `op_id`, a finish that already landed is recognised."""
        event = _FINISH_EVENTS.get(outcome)
        if event is None:
            raise ValueError(f"{outcome} writes nothing")
        if last_error is not None:
            last_error = _flagged(storable_text(last_error, "last_error"), "an error message")
        write = Write(
            messages=_turn_messages(messages), stamp=lease.token, op_id=op_id or uuid.uuid4()
        )
        try:
            res = await self._decided(
                lease.chat_id,
                event,
                _presumed(ChatStatus.RUNNING, lease.token),
                write,
                announce=announce,
                token=lease.token,
                error=last_error,
            )
        except Refused as refused:
            current = refused.view
            elsewhere = current.status is ChatStatus.RUNNING and current.token != lease.token
            chat = refused.chat if refused.chat is not None else await self.get_chat(lease.chat_id)
            return FinishResult(chat, False, elsewhere, None, ())
        return FinishResult(
            res.chat,
            changed=True,
            owned_elsewhere=False,
            promoted=res.promoted,
            queue=res.queue or (),
            inserted=tuple(m for m in res.inserted if m is not res.promoted),
        )


def _refusal(lease: Lease, view: ChatView) -> PersistRefused:
    if view.token != lease.token:
        return OwnershipLost(
            f"chat {lease.chat_id} is held by ownership token {view.token},"
            f" not {lease.token} ({view.status.value})"
        )
    return PersistRefused(f"chat {lease.chat_id} is {view.status.value}")


# Plans of the bulk operations do not depend on any row's facts beyond its status.
_ACQUIRE = decide(Event.ACQUIRE, ChatView(ChatStatus.PENDING))
_STALE_RECOVERED = decide(Event.STALE_RECOVERED, ChatView(ChatStatus.RUNNING))
_RELEASE = decide(Event.RELEASE, ChatView(ChatStatus.RUNNING, 0), token=0)
