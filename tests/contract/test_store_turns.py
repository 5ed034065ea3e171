"""Store contract: acquisition, heartbeats, stale recovery, persisting steps and the
final transition (docs/spec.md §1 and §2)."""

from __future__ import annotations

import uuid

import pytest

from chatd_trio.domain import ChatStatus, NewMessage, Role, TextPart
from chatd_trio.errors import ChatNotFound, PersistRefused
from chatd_trio.store.base import Store, TurnOutcome
from tests.contract.conftest import MAX_QUEUED, new_chat, running_chat, text, texts

W1 = uuid.UUID(int=1)
W2 = uuid.UUID(int=2)
BIG = 3600.0  # a stale_after no fresh heartbeat can exceed within a test


def step(s: str) -> list[NewMessage]:
    return [NewMessage(Role.ASSISTANT, (TextPart(s),))]


async def taken_over(store: Store) -> uuid.UUID:
    """A chat W1 acquired, recovered as stale, and now owned by W2."""
    chat = await running_chat(store, W1)
    assert await store.recover_stale(0) == [chat.id]
    (again,) = await store.acquire(W2, 1)
    assert again.id == chat.id and again.worker_id == W2
    return chat.id


# -- acquire / release ---------------------------------------------------------------


async def test_acquire_claims_oldest_first_and_sets_ownership(store: Store) -> None:
    chats = [(await new_chat(store, first=f"c{i}"))[0] for i in range(3)]
    got = await store.acquire(W1, 2)
    assert [c.id for c in got] == [chats[0].id, chats[1].id]
    for c in got:
        assert c.status is ChatStatus.RUNNING and c.worker_id == W1
        assert c.started_at is not None and c.heartbeat_at is not None
        assert await store.get_chat(c.id) == c
    rest = await store.acquire(W2, 10)
    assert [c.id for c in rest] == [chats[2].id]
    assert await store.acquire(W2, 10) == []


async def test_acquire_order_follows_updated_at(store: Store) -> None:
    old, _ = await new_chat(store)
    new, _ = await new_chat(store)
    (got,) = await store.acquire(W1, 1)
    assert got.id == old.id
    await store.release(W1, [old.id])  # back to pending, now the newest update
    assert [c.id for c in await store.acquire(W1, 10)] == [new.id, old.id]


async def test_release_only_returns_this_workers_chats(store: Store) -> None:
    mine = await running_chat(store, W1)
    theirs = await running_chat(store, W2)
    await store.release(W1, [mine.id, theirs.id])
    got_mine = await store.get_chat(mine.id)
    assert got_mine.status is ChatStatus.PENDING and got_mine.worker_id is None
    assert (await store.get_chat(theirs.id)).worker_id == W2


async def test_acquire_skips_non_pending(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.finish_turn(chat.id, W1, TurnOutcome.DONE)
    errored = await running_chat(store, W1)
    await store.finish_turn(errored.id, W1, TurnOutcome.ERROR, "boom")
    assert await store.acquire(W2, 10) == []


# -- heartbeat / stale recovery ------------------------------------------------------


async def test_heartbeat_refreshes_for_the_owner(store: Store) -> None:
    chat = await running_chat(store, W1)
    assert await store.heartbeat(chat.id, W1)
    got = await store.get_chat(chat.id)
    assert got.heartbeat_at is not None and chat.heartbeat_at is not None
    assert got.heartbeat_at >= chat.heartbeat_at


async def test_heartbeat_false_after_takeover(store: Store) -> None:
    chat_id = await taken_over(store)
    assert not await store.heartbeat(chat_id, W1)
    assert await store.heartbeat(chat_id, W2)


async def test_heartbeat_false_when_not_running(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.interrupt(chat.id)
    assert not await store.heartbeat(chat.id, W1)
    assert not await store.heartbeat(uuid.uuid4(), W1)


async def test_stale_recovery_with_zero_stale_after_recovers(store: Store) -> None:
    chat = await running_chat(store, W1)
    assert await store.recover_stale(0) == [chat.id]
    got = await store.get_chat(chat.id)
    assert got.status is ChatStatus.PENDING
    assert (got.worker_id, got.started_at, got.heartbeat_at, got.last_error) == (
        None,
        None,
        None,
        None,
    )


async def test_stale_recovery_skips_fresh_heartbeat(store: Store) -> None:
    chat = await running_chat(store, W1)
    assert await store.heartbeat(chat.id, W1)
    assert await store.recover_stale(BIG) == []
    assert (await store.get_chat(chat.id)).status is ChatStatus.RUNNING


async def test_stale_recovery_never_touches_waiting_pending_or_error(store: Store) -> None:
    waiting = await running_chat(store, W1)
    await store.finish_turn(waiting.id, W1, TurnOutcome.DONE)
    errored = await running_chat(store, W1)
    await store.finish_turn(errored.id, W1, TurnOutcome.ERROR, "boom")
    pending, _ = await new_chat(store)
    assert await store.recover_stale(0) == []
    assert (await store.get_chat(waiting.id)).status is ChatStatus.WAITING
    assert (await store.get_chat(errored.id)).status is ChatStatus.ERROR
    assert await store.get_chat(pending.id) == pending


# -- persist_step ----------------------------------------------------------------------


async def test_persist_step_by_owner(store: Store) -> None:
    chat = await running_chat(store, W1)
    saved = await store.persist_step(chat.id, W1, step("a1") + step("a2"))
    assert [m.role for m in saved] == [Role.ASSISTANT, Role.ASSISTANT]
    assert saved[0].id < saved[1].id
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "a1", "a2"]


async def test_persist_refused_after_edit(store: Store) -> None:
    chat = await running_chat(store, W1)
    first = (await store.messages_after(chat.id, 0))[0]
    await store.edit_message(chat.id, first.id, text("edited"))
    with pytest.raises(PersistRefused):
        await store.persist_step(chat.id, W1, step("late"))
    with pytest.raises(PersistRefused):
        await store.persist_compaction(chat.id, W1, step("late summary"))
    assert texts(await store.messages_after(chat.id, 0)) == ["edited"]


async def test_persist_allowed_when_waiting(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.interrupt(chat.id)
    saved = await store.persist_step(chat.id, W1, step("partial"))
    assert texts(saved) == ["partial"]
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "partial"]


async def test_persist_refused_when_another_worker_owns(store: Store) -> None:
    chat_id = await taken_over(store)
    with pytest.raises(PersistRefused):
        await store.persist_step(chat_id, W1, step("stale"))
    assert texts(await store.messages_after(chat_id, 0)) == ["hello"]


async def test_persist_unknown_chat_raises(store: Store) -> None:
    with pytest.raises(ChatNotFound):
        await store.persist_step(uuid.uuid4(), W1, step("x"))


# -- finish_turn -------------------------------------------------------------------------


async def test_finish_done_without_queue_goes_waiting(store: Store) -> None:
    chat = await running_chat(store, W1)
    res = await store.finish_turn(chat.id, W1, TurnOutcome.DONE)
    assert res.changed and not res.owned_elsewhere and res.promoted is None
    assert res.chat.status is ChatStatus.WAITING
    assert (res.chat.worker_id, res.chat.started_at, res.chat.heartbeat_at) == (None, None, None)
    assert await store.get_chat(chat.id) == res.chat


@pytest.mark.parametrize("outcome", [TurnOutcome.DONE, TurnOutcome.INTERRUPTED])
async def test_finish_promotes_the_oldest_queued_message(
    store: Store, outcome: TurnOutcome
) -> None:
    chat = await running_chat(store, W1)
    for s in ("q1", "q2"):
        await store.send_message(chat.id, text(s), max_queued=MAX_QUEUED)
    res = await store.finish_turn(chat.id, W1, outcome)
    assert res.changed and res.chat.status is ChatStatus.PENDING
    assert res.promoted is not None and res.promoted.parts == text("q1")
    assert res.promoted.role is Role.USER
    assert [q.parts for q in res.queue] == [text("q2")]
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "q1"]
    assert [q.parts for q in await store.list_queued(chat.id)] == [text("q2")]
    assert (await store.get_chat(chat.id)).worker_id is None


async def test_queued_messages_are_promoted_fifo(store: Store) -> None:
    chat = await running_chat(store, W1)
    for s in ("q1", "q2", "q3"):
        await store.send_message(chat.id, text(s), max_queued=MAX_QUEUED)
    promoted = []
    for _ in range(3):
        res = await store.finish_turn(chat.id, W1, TurnOutcome.DONE)
        assert res.promoted is not None
        promoted.append(res.promoted)
        assert [c.id for c in await store.acquire(W1, 1)] == [chat.id]
    assert texts(promoted) == ["q1", "q2", "q3"]
    assert [m.id for m in promoted] == sorted(m.id for m in promoted)
    res = await store.finish_turn(chat.id, W1, TurnOutcome.DONE)
    assert res.promoted is None and res.chat.status is ChatStatus.WAITING


async def test_finish_error_sets_error_and_keeps_the_queue(store: Store) -> None:
    chat = await running_chat(store, W1)
    queued = (await store.send_message(chat.id, text("q"), max_queued=MAX_QUEUED)).queued
    res = await store.finish_turn(chat.id, W1, TurnOutcome.ERROR, "the model failed")
    assert res.changed and res.promoted is None
    got = await store.get_chat(chat.id)
    assert got.status is ChatStatus.ERROR and got.last_error == "the model failed"
    assert got.worker_id is None
    assert await store.list_queued(chat.id) == [queued]


async def test_finish_shutdown_goes_pending_without_error(store: Store) -> None:
    chat = await running_chat(store, W1)
    res = await store.finish_turn(chat.id, W1, TurnOutcome.SHUTDOWN)
    assert res.changed and res.promoted is None
    got = await store.get_chat(chat.id)
    assert got.status is ChatStatus.PENDING
    assert (got.worker_id, got.last_error) == (None, None)
    assert [c.id for c in await store.acquire(W2, 1)] == [chat.id]


async def test_finish_leaves_a_pending_row_pending(store: Store) -> None:
    chat = await running_chat(store, W1)
    first = (await store.messages_after(chat.id, 0))[0]
    edited = await store.edit_message(chat.id, first.id, text("edited"))
    for outcome in TurnOutcome:
        res = await store.finish_turn(chat.id, W1, outcome, "x")
        assert not res.changed and not res.owned_elsewhere and res.promoted is None
        assert await store.get_chat(chat.id) == edited.chat


async def test_finish_owned_elsewhere_changes_nothing(store: Store) -> None:
    chat_id = await taken_over(store)
    await store.send_message(chat_id, text("q"), max_queued=MAX_QUEUED)
    before = await store.get_chat(chat_id)
    for outcome in TurnOutcome:
        res = await store.finish_turn(chat_id, W1, outcome, "x")
        assert not res.changed and res.owned_elsewhere and res.promoted is None
    assert await store.get_chat(chat_id) == before
    assert len(await store.list_queued(chat_id)) == 1


async def test_finish_after_interrupt_applies_the_outcome(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.send_message(chat.id, text("q"), max_queued=MAX_QUEUED)
    await store.interrupt(chat.id)
    res = await store.finish_turn(chat.id, W1, TurnOutcome.INTERRUPTED)
    assert res.changed and res.promoted is not None
    assert res.chat.status is ChatStatus.PENDING


async def test_finish_unknown_chat_raises(store: Store) -> None:
    with pytest.raises(ChatNotFound):
        await store.finish_turn(uuid.uuid4(), W1, TurnOutcome.DONE)
