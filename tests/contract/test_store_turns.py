"""Store contract: acquisition, heartbeats, stale recovery, persisting steps and the
final transition (docs/spec.md §1 and §2)."""

from __future__ import annotations

import uuid

import pytest

from chatd_trio.domain import ChatStatus, NewMessage, Role, TextPart
from chatd_trio.errors import ChatNotFound, OwnershipLost, PersistRefused
from chatd_trio.store.base import Lease, Store, TurnOutcome
from tests.contract.conftest import MAX_QUEUED, new_chat, running_chat, text, texts

W1 = uuid.UUID(int=1)
W2 = uuid.UUID(int=2)
BIG = 3600.0  # a stale_after no fresh heartbeat can exceed within a test
# The outcomes a finish writes (LOST writes nothing: finish_turn refuses it).
FINISHING = [o for o in TurnOutcome if o is not TurnOutcome.LOST]


def step(s: str) -> list[NewMessage]:
    return [NewMessage(Role.ASSISTANT, (TextPart(s),))]


async def taken_over(store: Store) -> tuple[Lease, Lease]:
    """A chat W1 acquired, recovered as stale, and now owned by W2: (W1's lease, W2's)."""
    chat = await running_chat(store, W1)
    assert await store.recover_stale(0) == [chat.id]
    (again,) = await store.acquire(W2, 1)
    assert again.id == chat.id and again.worker_id == W2
    assert again.owner_token > chat.owner_token
    return Lease.of(chat), Lease.of(again)


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
    await store.release([Lease.of(got)])  # back to pending, now the newest update
    assert [c.id for c in await store.acquire(W1, 10)] == [new.id, old.id]


async def test_release_only_returns_chats_still_held_under_the_lease(store: Store) -> None:
    old, theirs = await taken_over(store)  # W1's lease on it is stale
    mine = await running_chat(store, W1)
    before = await store.get_chat(theirs.chat_id)
    await store.release([Lease.of(mine), old])
    got_mine = await store.get_chat(mine.id)
    assert got_mine.status is ChatStatus.PENDING and got_mine.worker_id is None
    # Released: a new token, so the released run can write nothing more.
    assert got_mine.owner_token > mine.owner_token
    assert await store.get_chat(theirs.chat_id) == before
    assert before.worker_id == W2


async def test_acquire_skips_non_pending(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.finish_turn(Lease.of(chat), TurnOutcome.DONE)
    errored = await running_chat(store, W1)
    await store.finish_turn(Lease.of(errored), TurnOutcome.ERROR, "boom")
    assert await store.acquire(W2, 10) == []


# -- heartbeat / stale recovery ------------------------------------------------------


async def test_heartbeat_refreshes_for_the_owner(store: Store) -> None:
    chat = await running_chat(store, W1)
    assert await store.heartbeat(Lease.of(chat))
    got = await store.get_chat(chat.id)
    assert got.heartbeat_at is not None and chat.heartbeat_at is not None
    assert got.heartbeat_at >= chat.heartbeat_at


async def test_heartbeat_false_after_takeover(store: Store) -> None:
    old, new = await taken_over(store)
    assert not await store.heartbeat(old)
    assert await store.heartbeat(new)


async def test_heartbeat_false_when_not_running(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.interrupt(chat.id)
    assert not await store.heartbeat(Lease.of(chat))
    assert not await store.heartbeat(Lease(uuid.uuid4(), W1, chat.owner_token))


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
    assert await store.heartbeat(Lease.of(chat))
    assert await store.recover_stale(BIG) == []
    assert (await store.get_chat(chat.id)).status is ChatStatus.RUNNING


async def test_stale_recovery_never_touches_waiting_pending_or_error(store: Store) -> None:
    waiting = await running_chat(store, W1)
    await store.finish_turn(Lease.of(waiting), TurnOutcome.DONE)
    errored = await running_chat(store, W1)
    await store.finish_turn(Lease.of(errored), TurnOutcome.ERROR, "boom")
    pending, _ = await new_chat(store)
    assert await store.recover_stale(0) == []
    assert (await store.get_chat(waiting.id)).status is ChatStatus.WAITING
    assert (await store.get_chat(errored.id)).status is ChatStatus.ERROR
    assert await store.get_chat(pending.id) == pending


# -- persist_step ----------------------------------------------------------------------


async def test_persist_step_by_owner(store: Store) -> None:
    chat = await running_chat(store, W1)
    saved = await store.persist_step(Lease.of(chat), step("a1") + step("a2"))
    assert [m.role for m in saved] == [Role.ASSISTANT, Role.ASSISTANT]
    assert saved[0].id < saved[1].id
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "a1", "a2"]


async def test_persist_refused_after_edit(store: Store) -> None:
    chat = await running_chat(store, W1)
    lease = Lease.of(chat)
    first = (await store.messages_after(chat.id, 0))[0]
    await store.edit_message(chat.id, first.id, text("edited"))
    with pytest.raises(PersistRefused):
        await store.persist_step(lease, step("late"))
    with pytest.raises(PersistRefused):
        await store.persist_compaction(lease, step("late summary"))
    assert texts(await store.messages_after(chat.id, 0)) == ["edited"]


async def test_persist_allowed_when_waiting(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.interrupt(chat.id)
    saved = await store.persist_step(Lease.of(chat), step("partial"))
    assert texts(saved) == ["partial"]
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "partial"]


async def test_persist_refused_when_another_worker_owns(store: Store) -> None:
    old, _ = await taken_over(store)
    with pytest.raises(OwnershipLost):
        await store.persist_step(old, step("stale"))
    assert texts(await store.messages_after(old.chat_id, 0)) == ["hello"]


async def test_persist_unknown_chat_raises(store: Store) -> None:
    with pytest.raises(ChatNotFound):
        await store.persist_step(Lease(uuid.uuid4(), W1, 1), step("x"))


# -- finish_turn -------------------------------------------------------------------------


async def test_finish_done_without_queue_goes_waiting(store: Store) -> None:
    chat = await running_chat(store, W1)
    res = await store.finish_turn(Lease.of(chat), TurnOutcome.DONE)
    assert res.changed and not res.owned_elsewhere and res.promoted is None
    assert res.inserted == ()
    assert res.chat.owner_token > chat.owner_token  # every finish ends the run's token
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
    res = await store.finish_turn(Lease.of(chat), outcome)
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
        res = await store.finish_turn(Lease.of(chat), TurnOutcome.DONE)
        assert res.promoted is not None
        promoted.append(res.promoted)
        (chat,) = await store.acquire(W1, 1)
    assert texts(promoted) == ["q1", "q2", "q3"]
    assert [m.id for m in promoted] == sorted(m.id for m in promoted)
    res = await store.finish_turn(Lease.of(chat), TurnOutcome.DONE)
    assert res.promoted is None and res.chat.status is ChatStatus.WAITING


async def test_finish_error_sets_error_and_keeps_the_queue(store: Store) -> None:
    chat = await running_chat(store, W1)
    queued = (await store.send_message(chat.id, text("q"), max_queued=MAX_QUEUED)).queued
    res = await store.finish_turn(Lease.of(chat), TurnOutcome.ERROR, "the model failed")
    assert res.changed and res.promoted is None
    got = await store.get_chat(chat.id)
    assert got.status is ChatStatus.ERROR and got.last_error == "the model failed"
    assert got.worker_id is None
    assert await store.list_queued(chat.id) == [queued]


async def test_finish_shutdown_goes_pending_without_error(store: Store) -> None:
    chat = await running_chat(store, W1)
    res = await store.finish_turn(Lease.of(chat), TurnOutcome.SHUTDOWN)
    assert res.changed and res.promoted is None
    got = await store.get_chat(chat.id)
    assert got.status is ChatStatus.PENDING
    assert (got.worker_id, got.last_error) == (None, None)
    assert [c.id for c in await store.acquire(W2, 1)] == [chat.id]


async def test_finish_leaves_a_pending_row_pending(store: Store) -> None:
    chat = await running_chat(store, W1)
    first = (await store.messages_after(chat.id, 0))[0]
    edited = await store.edit_message(chat.id, first.id, text("edited"))
    for outcome in FINISHING:
        res = await store.finish_turn(Lease.of(chat), outcome, "x", messages=step("late"))
        assert not res.changed and not res.owned_elsewhere and res.promoted is None
        assert res.inserted == ()
        assert await store.get_chat(chat.id) == edited.chat
    assert texts(await store.messages_after(chat.id, 0)) == ["edited"]


async def test_finish_owned_elsewhere_changes_nothing(store: Store) -> None:
    old, _ = await taken_over(store)
    chat_id = old.chat_id
    await store.send_message(chat_id, text("q"), max_queued=MAX_QUEUED)
    before = await store.get_chat(chat_id)
    for outcome in FINISHING:
        res = await store.finish_turn(old, outcome, "x", messages=step("stale"))
        assert not res.changed and res.owned_elsewhere and res.promoted is None
        assert res.inserted == () and res.chat == before
    assert await store.get_chat(chat_id) == before
    assert len(await store.list_queued(chat_id)) == 1
    assert texts(await store.messages_after(chat_id, 0)) == ["hello"]


async def test_finish_after_interrupt_applies_the_outcome(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.send_message(chat.id, text("q"), max_queued=MAX_QUEUED)
    await store.interrupt(chat.id)
    res = await store.finish_turn(Lease.of(chat), TurnOutcome.INTERRUPTED)
    assert res.changed and res.promoted is not None
    assert res.chat.status is ChatStatus.PENDING


async def test_finish_unknown_chat_raises(store: Store) -> None:
    with pytest.raises(ChatNotFound):
        await store.finish_turn(Lease(uuid.uuid4(), W1, 1), TurnOutcome.DONE)


async def test_finish_lost_is_refused_as_bad_input(store: Store) -> None:
    chat = await running_chat(store, W1)
    with pytest.raises(ValueError, match="lost"):
        await store.finish_turn(Lease.of(chat), TurnOutcome.LOST, messages=step("x"))
    assert await store.get_chat(chat.id) == chat
    assert texts(await store.messages_after(chat.id, 0)) == ["hello"]
