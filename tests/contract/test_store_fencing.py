"""Store contract: fenced ownership, completed turns, idempotent replays, guarded writes
and the owner check (docs/spec.md §1 and §2).

A run writes under the ownership token of its acquisition (`Lease`). Every write it
makes is guarded by that token in the same write: once the chat was recovered,
released, finished or acquired again, the old lease changes nothing, whatever the
row's status. A user stop keeps the token (the stopped run still writes its
interrupted partial and its finish); an edit or a new message makes the row
`pending`, which no run's write accepts.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from chatd_trio.domain import (
    Chat,
    ChatStatus,
    Message,
    NewMessage,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Visibility,
)
from chatd_trio.errors import OwnershipLost, PermissionDenied, PersistRefused
from chatd_trio.lifecycle import ChatView, Event, decide
from chatd_trio.store.base import Lease, Store, TurnOutcome, Write
from chatd_trio.store.ops import user_message
from tests.contract.conftest import MAX_QUEUED, new_chat, running_chat, text, texts

W1 = uuid.UUID(int=1)
W2 = uuid.UUID(int=2)
FINISHING = [o for o in TurnOutcome if o is not TurnOutcome.LOST]


def say(s: str) -> list[NewMessage]:
    return [NewMessage(Role.ASSISTANT, (TextPart(s),))]


def tool_step(s: str) -> list[NewMessage]:
    """An assistant tool call and its result, then the answer: a complete final step."""
    return [
        NewMessage(Role.ASSISTANT, (ToolCallPart(f"call-{s}", "read", "{}"),)),
        NewMessage(Role.TOOL, (ToolResultPart(f"call-{s}", "read", {"ok": s}),)),
        NewMessage(Role.ASSISTANT, (TextPart(s),)),
    ]


async def snapshot(store: Store, chat_id: uuid.UUID) -> tuple[Any, ...]:
    """Everything a write could change: the row, both histories, the queue."""
    return (
        await store.get_chat(chat_id),
        await store.messages_after(chat_id, 0),
        await store.prompt_messages(chat_id),
        await store.list_queued(chat_id),
    )


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Statements executed between two `statement_counts()` snapshots."""
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


# -- stale tokens ----------------------------------------------------------------------


async def _recovered(store: Store, lease: Lease) -> None:
    assert await store.recover_stale(0) == [lease.chat_id]


async def _reacquired(store: Store, lease: Lease) -> None:
    await _recovered(store, lease)
    (again,) = await store.acquire(W2, 1)
    assert again.worker_id == W2
    # The new run's queue: a stale finish must not promote it.
    sent = await store.send_message(lease.chat_id, text("queued"), max_queued=MAX_QUEUED)
    assert sent.queued is not None


async def _released(store: Store, lease: Lease) -> None:
    await store.release([lease])


async def _finished(store: Store, lease: Lease) -> None:
    # `waiting` under a new token: the row a stopped run's partial would once have landed in.
    res = await store.finish_turn(lease, TurnOutcome.DONE)
    assert res.changed and res.chat.status is ChatStatus.WAITING


async def _stopped_sent_reacquired(store: Store, lease: Lease) -> None:
    await store.interrupt(lease.chat_id)
    await store.send_message(lease.chat_id, text("again"), max_queued=MAX_QUEUED)
    (again,) = await store.acquire(W2, 1)
    assert again.id == lease.chat_id


STALE_BY: dict[str, Callable[[Store, Lease], Awaitable[None]]] = {
    "stale recovery": _recovered,
    "stale recovery and acquisition by another replica": _reacquired,
    "release": _released,
    "its own finish": _finished,
    "stop, new message, acquisition by another replica": _stopped_sent_reacquired,
}


@pytest.mark.parametrize("how", list(STALE_BY))
async def test_a_stale_lease_changes_nothing(store: Store, how: str) -> None:
    chat = await running_chat(store, W1)
    old = Lease.of(chat)
    await store.persist_step(old, say("before"))
    await STALE_BY[how](store, old)
    before = await snapshot(store, chat.id)
    assert before[0].owner_token != old.token
    counts = store.statement_counts()

    with pytest.raises(OwnershipLost):
        await store.persist_step(old, say("stale step"))
    with pytest.raises(OwnershipLost):
        await store.persist_step(old, [])  # an empty write still answers: fenced
    with pytest.raises(OwnershipLost):
        await store.persist_compaction(old, say("stale summary"))
    with pytest.raises(OwnershipLost):
        await store.update_binding(chat.id, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), lease=old)
    assert not await store.heartbeat(old)
    for outcome in FINISHING:
        res = await store.finish_turn(old, outcome, "stale", messages=say("stale answer"))
        assert not res.changed and res.promoted is None and res.inserted == ()
        assert res.owned_elsewhere is (before[0].status is ChatStatus.RUNNING)
        assert res.chat == before[0]
    await store.release([old])

    assert await snapshot(store, chat.id) == before
    # Nothing but the writes' gated batches ran (their inserts and updates found the guard
    # unmarked and changed nothing, as the snapshot shows); the release's statement ran
    # and matched nothing.
    writes = {"PopQueuedMessage", "UpdateChatBinding", "SoftDeleteMessagesFrom"}
    spent = delta(counts, store.statement_counts())
    assert not writes & set(spent)
    # One attempt each: two steps, the compaction, the binding, the heartbeat, the finishes.
    assert spent["LockChatForUpdate"] == spent["GetChatForWrite"] == 5 + len(FINISHING)
    # Those with messages: a step, the compaction and every finish.
    assert spent["InsertChatMessages"] == 2 + len(FINISHING)


async def test_the_new_run_writes_while_the_stale_one_is_fenced(store: Store) -> None:
    chat = await running_chat(store, W1)
    old = Lease.of(chat)
    await _recovered(store, old)
    (again,) = await store.acquire(W2, 1)
    new = Lease.of(again)
    (mine,) = await store.persist_step(new, say("new run"))
    with pytest.raises(OwnershipLost):
        await store.persist_step(old, say("old run"))
    assert await store.heartbeat(new) and not await store.heartbeat(old)
    fin = await store.finish_turn(new, TurnOutcome.DONE, messages=say("answer"))
    assert fin.changed
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "new run", "answer"]
    assert mine.id < fin.inserted[0].id


# -- a user stop keeps the stopped run's partial; an edit or a new message does not ---------


async def test_a_user_stop_keeps_the_interrupted_partial_and_its_finish(store: Store) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    stopped = await store.interrupt(chat.id)
    assert stopped.status is ChatStatus.WAITING and stopped.owner_token == lease.token
    assert not await store.heartbeat(lease)  # no longer running: the turn stops
    (partial,) = await store.persist_step(lease, say("partial"))
    fin = await store.finish_turn(lease, TurnOutcome.INTERRUPTED)
    assert fin.changed and fin.chat.status is ChatStatus.WAITING
    assert fin.chat.owner_token > lease.token
    # After its finish, the stopped run is fenced like any other.
    with pytest.raises(OwnershipLost):
        await store.persist_step(lease, say("after the finish"))
    history = await store.messages_after(chat.id, 0)
    assert texts(history) == ["hello", "partial"] and history[-1] == partial


@pytest.mark.parametrize("outcome", FINISHING)
async def test_a_user_stop_wins_over_the_runs_outcome(store: Store, outcome: TurnOutcome) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    await store.interrupt(chat.id)
    fin = await store.finish_turn(lease, outcome, "late failure", messages=say("last words"))
    assert fin.changed and fin.promoted is None
    assert (fin.chat.status, fin.chat.last_error, fin.chat.worker_id) == (
        ChatStatus.WAITING,
        None,
        None,
    )
    assert texts(fin.inserted) == ["last words"]
    assert await store.get_chat(chat.id) == fin.chat


@pytest.mark.parametrize("outcome", FINISHING)
async def test_a_stopped_runs_finish_promotes_the_queue_whatever_its_outcome(
    store: Store, outcome: TurnOutcome
) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    await store.send_message(chat.id, text("q1"), max_queued=MAX_QUEUED)
    await store.send_message(chat.id, text("q2"), max_queued=MAX_QUEUED)
    await store.interrupt(chat.id)
    fin = await store.finish_turn(lease, outcome, "late failure", messages=say("last words"))
    assert fin.changed and fin.chat.status is ChatStatus.PENDING and fin.chat.last_error is None
    assert fin.promoted is not None and fin.promoted.parts == text("q1")
    assert [q.parts for q in fin.queue] == [text("q2")]
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "last words", "q1"]


async def _stop_then_edit(store: Store, chat: Chat) -> None:
    await store.interrupt(chat.id)
    first = (await store.messages_after(chat.id, 0))[0]
    await store.edit_message(chat.id, first.id, text("edited"))


async def _stop_then_send(store: Store, chat: Chat) -> None:
    await store.interrupt(chat.id)
    sent = await store.send_message(chat.id, text("new question"), max_queued=MAX_QUEUED)
    assert sent.message is not None  # inserted: the chat is pending again


async def _edit_while_running(store: Store, chat: Chat) -> None:
    first = (await store.messages_after(chat.id, 0))[0]
    await store.edit_message(chat.id, first.id, text("edited"))


@pytest.mark.parametrize(
    "user_action",
    [_stop_then_edit, _stop_then_send, _edit_while_running],
    ids=["stop then edit", "stop then new message", "edit while running"],
)
async def test_an_edit_or_a_new_message_refuses_the_runs_writes(
    store: Store, user_action: Callable[[Store, Chat], Awaitable[None]]
) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    await user_action(store, chat)
    before = await snapshot(store, chat.id)
    # Same token, but `pending`: refused, and not as an ownership loss.
    assert before[0].status is ChatStatus.PENDING and before[0].owner_token == lease.token
    with pytest.raises(PersistRefused) as refused:
        await store.persist_step(lease, say("partial"))
    assert type(refused.value) is PersistRefused
    with pytest.raises(PersistRefused):
        await store.persist_compaction(lease, say("summary"))
    with pytest.raises(PersistRefused):
        await store.update_binding(chat.id, None, None, None, lease=lease)
    assert not await store.heartbeat(lease)
    for outcome in FINISHING:
        res = await store.finish_turn(lease, outcome, "x", messages=say("answer"))
        assert not res.changed and not res.owned_elsewhere and res.inserted == ()
    assert await snapshot(store, chat.id) == before


# -- completed turns: the final messages land with the finish ----------------------------


async def test_finish_with_messages_inserts_them_and_changes_status_in_one_write(
    store: Store,
) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    counts = store.statement_counts()
    fin = await store.finish_turn(lease, TurnOutcome.DONE, messages=tool_step("answer"))
    # One guarded write: one lock, one insert, one row update.
    assert delta(counts, store.statement_counts()) == {
        "LockChatForUpdate": 1,
        "GetChatForWrite": 1,
        "InsertChatMessages": 1,
        "UpdateChat": 1,
    }
    assert fin.changed and fin.chat.status is ChatStatus.WAITING and fin.promoted is None
    assert [m.role for m in fin.inserted] == [Role.ASSISTANT, Role.TOOL, Role.ASSISTANT]
    first = (await store.messages_after(chat.id, 0))[0]
    assert await store.messages_after(chat.id, 0) == [first, *fin.inserted]
    assert [m.prev_id for m in fin.inserted] == [first.id, *(m.id for m in fin.inserted[:-1])]


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (TurnOutcome.DONE, ChatStatus.WAITING),
        (TurnOutcome.INTERRUPTED, ChatStatus.WAITING),
        (TurnOutcome.ERROR, ChatStatus.ERROR),
        (TurnOutcome.SHUTDOWN, ChatStatus.PENDING),
        (TurnOutcome.UNAVAILABLE, ChatStatus.PENDING),
    ],
)
async def test_every_finishing_outcome_keeps_the_final_messages(
    store: Store, outcome: TurnOutcome, status: ChatStatus
) -> None:
    chat = await running_chat(store, W1)
    fin = await store.finish_turn(Lease.of(chat), outcome, "boom", messages=say("final"))
    assert fin.changed and fin.chat.status is status
    assert fin.chat.last_error == ("boom" if status is ChatStatus.ERROR else None)
    assert texts(fin.inserted) == ["final"]
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "final"]


async def test_the_final_messages_come_before_the_promoted_one(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.send_message(chat.id, text("next"), max_queued=MAX_QUEUED)
    counts = store.statement_counts()
    fin = await store.finish_turn(Lease.of(chat), TurnOutcome.DONE, messages=say("answer"))
    # The first attempt presumed an empty queue and missed (its gated insert and update
    # changed nothing); the second wrote once.
    spent = delta(counts, store.statement_counts())
    assert (spent["LockChatForUpdate"], spent["InsertChatMessages"], spent["UpdateChat"]) == (
        2,
        2,
        2,
    )
    assert fin.changed and fin.chat.status is ChatStatus.PENDING
    assert texts(fin.inserted) == ["answer"]
    assert fin.promoted is not None and fin.promoted.role is Role.USER
    assert fin.promoted.prev_id == fin.inserted[0].id
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "answer", "next"]
    assert fin.queue == () and await store.list_queued(chat.id) == []


async def test_a_fenced_finish_inserts_none_of_its_messages(store: Store) -> None:
    chat = await running_chat(store, W1)
    old = Lease.of(chat)
    await _reacquired(store, old)
    before = await snapshot(store, chat.id)
    counts = store.statement_counts()
    fin = await store.finish_turn(old, TurnOutcome.DONE, messages=tool_step("late"))
    assert not fin.changed and fin.owned_elsewhere and fin.inserted == ()
    # One attempt: its gated insert ran and inserted nothing.
    assert delta(counts, store.statement_counts())["InsertChatMessages"] == 1
    assert await snapshot(store, chat.id) == before


# -- idempotent replays ---------------------------------------------------------------------


async def test_a_replayed_step_returns_what_landed_and_inserts_nothing(store: Store) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    op = uuid.uuid4()
    first = await store.persist_step(lease, tool_step("a1"), op_id=op)
    # Another write lands in between: the replay still finds its own messages.
    second = await store.persist_step(lease, say("a2"), op_id=uuid.uuid4())
    before = await snapshot(store, chat.id)
    counts = store.statement_counts()
    again = await store.persist_step(lease, tool_step("a1"), op_id=op)
    assert delta(counts, store.statement_counts()) == {
        "LockChatForUpdate": 1,
        "GetChatForWrite": 1,
        "InsertChatMessages": 1,  # sent with the read, gated: it found the write landed
        "GetChatMessagesByOp": 1,
    }
    assert again == first and [m.id for m in again] == [m.id for m in first]
    assert await snapshot(store, chat.id) == before
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "", "", "a1", "a2"]
    assert second[0].id > first[-1].id


async def test_a_replayed_compaction_returns_what_landed(store: Store) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    op = uuid.uuid4()
    summary = [NewMessage(Role.USER, (TextPart("sum"),), Visibility.MODEL, compressed=True)]
    first = await store.persist_compaction(lease, summary, op_id=op)
    again = await store.persist_compaction(lease, summary, op_id=op)
    assert again == first
    assert texts(await store.prompt_messages(chat.id)) == ["sum"]


async def test_a_step_that_landed_before_the_run_was_fenced_replays(store: Store) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    op = uuid.uuid4()
    first = await store.persist_step(lease, say("landed"), op_id=op)
    await _reacquired(store, lease)
    before = await snapshot(store, chat.id)
    # The write did land under a valid token: its retry reports it rather than a loss.
    assert await store.persist_step(lease, say("landed"), op_id=op) == first
    # A new write of the fenced run is refused.
    with pytest.raises(OwnershipLost):
        await store.persist_step(lease, say("landed"), op_id=uuid.uuid4())
    assert await snapshot(store, chat.id) == before


async def test_a_replayed_finish_returns_what_landed_and_changes_nothing(store: Store) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    op = uuid.uuid4()
    fin = await store.finish_turn(lease, TurnOutcome.DONE, messages=say("answer"), op_id=op)
    assert fin.changed and fin.chat.status is ChatStatus.WAITING
    # The user writes in between: the chat is pending with a new message.
    sent = await store.send_message(chat.id, text("thanks"), max_queued=MAX_QUEUED)
    assert sent.message is not None
    before = await snapshot(store, chat.id)
    again = await store.finish_turn(lease, TurnOutcome.DONE, messages=say("answer"), op_id=op)
    assert again.changed and not again.owned_elsewhere
    assert again.inserted == fin.inserted and again.promoted is None
    assert again.chat == before[0]  # the row as it is now, untouched by the replay
    assert await snapshot(store, chat.id) == before
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "answer", "thanks"]


async def test_a_replayed_finish_without_messages_is_recognised(store: Store) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    op = uuid.uuid4()
    fin = await store.finish_turn(lease, TurnOutcome.ERROR, "boom", op_id=op)
    again = await store.finish_turn(lease, TurnOutcome.ERROR, "boom", op_id=op)
    assert again.changed and again.inserted == () and again.chat == fin.chat
    assert (await store.get_chat(chat.id)).owner_token == fin.chat.owner_token


async def test_a_replayed_finish_reports_the_message_it_promoted(store: Store) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    for s in ("q1", "q2"):
        await store.send_message(chat.id, text(s), max_queued=MAX_QUEUED)
    op = uuid.uuid4()
    fin = await store.finish_turn(lease, TurnOutcome.DONE, messages=say("answer"), op_id=op)
    assert fin.promoted is not None
    before = await snapshot(store, chat.id)
    again = await store.finish_turn(lease, TurnOutcome.DONE, messages=say("answer"), op_id=op)
    assert again.changed
    assert (again.inserted, again.promoted, again.queue) == (fin.inserted, fin.promoted, fin.queue)
    assert await snapshot(store, chat.id) == before
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "answer", "q1"]


# -- apply: a guard miss changes nothing and returns the row as it is -------------------------


async def test_apply_on_a_stale_status_returns_the_current_row(store: Store) -> None:
    chat = await running_chat(store, W1)
    plan = decide(Event.SEND_MESSAGE, ChatView(ChatStatus.WAITING, chat.owner_token), max_queued=3)
    before = await snapshot(store, chat.id)
    write = Write(messages=(user_message(text("x")),), parts=text("x"))
    res = await store.apply(chat.id, plan, write)
    assert not res.applied and not res.replayed
    assert res.chat == before[0] and res.inserted == () and res.queued is None
    assert await snapshot(store, chat.id) == before
    # Decided again on the row it returned, the same write lands (queued: the chat runs).
    res = await store.apply(chat.id, decide(Event.SEND_MESSAGE, res.view, max_queued=3), write)
    assert res.applied and res.queued is not None and res.chat.queued == 1


async def test_apply_on_a_stale_token_returns_the_current_row(store: Store) -> None:
    chat = await running_chat(store, W1)
    old = Lease.of(chat)
    await _reacquired(store, old)
    plan = decide(Event.HEARTBEAT, ChatView(ChatStatus.RUNNING, old.token), token=old.token)
    before = await snapshot(store, chat.id)
    res = await store.apply(chat.id, plan, Write())
    assert not res.applied and res.chat == before[0]
    assert res.chat.owner_token > old.token and res.chat.worker_id == W2
    assert await snapshot(store, chat.id) == before


async def test_apply_on_a_stale_queue_length_returns_the_current_row(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.send_message(chat.id, text("q"), max_queued=MAX_QUEUED)
    await store.interrupt(chat.id)  # waiting, one queued message
    before = await snapshot(store, chat.id)
    idle = ChatView(ChatStatus.WAITING, chat.owner_token, 0)
    write = Write(messages=(user_message(text("x")),), parts=text("x"))
    res = await store.apply(chat.id, decide(Event.SEND_MESSAGE, idle, max_queued=3), write)
    assert not res.applied and res.chat == before[0] and res.chat.queued == 1
    assert await snapshot(store, chat.id) == before


async def test_a_stale_view_costs_one_more_attempt_never_a_wrong_write(store: Store) -> None:
    chat, _ = await new_chat(store)
    seen = await store.get_chat(chat.id)  # pending
    (running,) = await store.acquire(W1, 1)
    counts = store.statement_counts()
    res = await store.send_message(chat.id, text("x"), max_queued=MAX_QUEUED, view=seen)
    assert res.queued is not None and res.message is None  # the chat runs now: queued
    assert delta(counts, store.statement_counts())["LockChatForUpdate"] == 2
    counts = store.statement_counts()
    res = await store.send_message(chat.id, text("y"), max_queued=MAX_QUEUED, view=res.chat)
    assert res.queued is not None and len(res.queue) == 2
    assert delta(counts, store.statement_counts())["LockChatForUpdate"] == 1
    assert (await store.get_chat(chat.id)).worker_id == running.worker_id


# -- the owner check inside the write ----------------------------------------------------------


async def _ready(store: Store, owner: uuid.UUID) -> tuple[Chat, Message, int]:
    """A running chat of `owner` with two queued messages: (chat, first message, the id
    of the second queued one: promoting it changes the queue's order)."""
    chat, first = await new_chat(store, owner)
    assert [c.id for c in await store.acquire(W1, 1)] == [chat.id]
    await store.send_message(chat.id, text("q1"), max_queued=MAX_QUEUED)
    sent = await store.send_message(chat.id, text("q2"), max_queued=MAX_QUEUED)
    assert sent.queued is not None
    return await store.get_chat(chat.id), first, sent.queued.id


USER_ACTIONS: dict[str, Callable[..., Awaitable[object]]] = {
    "send": lambda s, c, first, q, **kw: s.send_message(
        c.id, text("x"), max_queued=MAX_QUEUED, **kw
    ),
    "edit": lambda s, c, first, q, **kw: s.edit_message(c.id, first.id, text("x"), **kw),
    "interrupt": lambda s, c, first, q, **kw: s.interrupt(c.id, **kw),
    "promote": lambda s, c, first, q, **kw: s.promote_queued(c.id, q, **kw),
}


@pytest.mark.parametrize("action", list(USER_ACTIONS))
@pytest.mark.parametrize("with_view", [False, True], ids=["presumed", "viewed"])
async def test_another_users_action_is_denied_and_changes_nothing(
    store: Store, action: str, with_view: bool
) -> None:
    owner = uuid.uuid4()
    chat, first, queued_id = await _ready(store, owner)
    before = await snapshot(store, chat.id)
    view: dict[str, Any] = {"view": before[0]} if with_view else {}
    with pytest.raises(PermissionDenied):
        await USER_ACTIONS[action](store, chat, first, queued_id, owner_id=uuid.uuid4(), **view)
    assert await snapshot(store, chat.id) == before
    # The owner's own action goes through.
    await USER_ACTIONS[action](store, chat, first, queued_id, owner_id=owner, **view)
    assert await snapshot(store, chat.id) != before


async def test_an_op_id_replays_only_in_its_own_chat(store: Store) -> None:
    a, _ = await new_chat(store, first="a")
    b, _ = await new_chat(store, first="b")
    leases = {c.id: Lease.of(c) for c in await store.acquire(W1, 2)}
    op = uuid.uuid4()
    (in_a,) = await store.persist_step(leases[a.id], say("in a"), op_id=op)
    # The same op id on another chat is another write: it lands there, once.
    (in_b,) = await store.persist_step(leases[b.id], say("in b"), op_id=op)
    assert in_b.chat_id == b.id and in_b.id > in_a.id
    assert texts(await store.messages_after(a.id, 0)) == ["a", "in a"]
    assert texts(await store.messages_after(b.id, 0)) == ["b", "in b"]
