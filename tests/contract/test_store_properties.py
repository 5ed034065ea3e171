"""Store contract, property-based: concurrent acquisition and lifecycle invariants.

Each Hypothesis example runs in its own `trio.run` with a fresh (or wiped) store;
`st.random_module()` plus Trio's Hypothesis-registered scheduler randomness
explores task interleavings, and a failure shrinks and replays.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd_trio.domain import Chat, ChatStatus, NewMessage, Role, TextPart, text_of
from chatd_trio.errors import PersistRefused, QueueFull
from chatd_trio.store.base import Lease, Store, TurnOutcome
from tests.contract.conftest import new_chat, open_store, text

EXAMPLES = {"memory": 200, "postgres": 30}

batch_sizes = st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=4)


async def _drain(store: Store, worker: uuid.UUID, sizes: list[int], got: list[uuid.UUID]) -> None:
    """Acquire with the given batch sizes (cycled) until a call returns nothing."""
    i = 0
    while True:
        batch = await store.acquire(worker, sizes[i % len(sizes)])
        i += 1
        if not batch:
            return
        assert len(batch) <= sizes[(i - 1) % len(sizes)]
        for chat in batch:
            assert chat.worker_id == worker and chat.status is ChatStatus.RUNNING
        got.extend(c.id for c in batch)


def test_concurrent_acquire_claims_each_pending_chat_exactly_once(
    store_kind: str, store_dsn: str | None
) -> None:
    """Invariant: two workers acquiring concurrently with arbitrary batch sizes never
    receive the same chat, together receive every pending chat exactly once, and
    every chat ends up `running` under the worker that received it."""

    @settings(
        max_examples=EXAMPLES[store_kind],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        n_chats=st.integers(min_value=0, max_value=12),
        sizes_a=batch_sizes,
        sizes_b=batch_sizes,
        _rnd=st.random_module(),
    )
    def check(n_chats: int, sizes_a: list[int], sizes_b: list[int], _rnd: object) -> None:
        async def main() -> None:
            async with open_store(store_kind, store_dsn) as store:
                created = {(await new_chat(store))[0].id for _ in range(n_chats)}
                wa, wb = uuid.uuid4(), uuid.uuid4()
                got_a: list[uuid.UUID] = []
                got_b: list[uuid.UUID] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_drain, store, wa, sizes_a, got_a)
                    nursery.start_soon(_drain, store, wb, sizes_b, got_b)
                assert not set(got_a) & set(got_b)
                assert Counter(got_a + got_b) == Counter(created)
                for worker, ids in ((wa, got_a), (wb, got_b)):
                    for chat_id in ids:
                        chat = await store.get_chat(chat_id)
                        assert (chat.status, chat.worker_id) == (ChatStatus.RUNNING, worker)

        if store_kind == "memory":
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        else:
            trio.run(main)  # real sockets: real clock

    check()


OPS = st.sampled_from(
    ["send", "acquire", "heartbeat", "persist", "finish", "interrupt", "promote", "edit", "recover"]
)
SMALL_QUEUE = 3  # small, so QueueFull is reached within a short sequence
FINISHING = [o for o in TurnOutcome if o is not TurnOutcome.LOST]  # LOST writes nothing


async def _apply(
    store: Store,
    chat_id: uuid.UUID,
    op: str,
    worker: int,
    leases: list[Lease],
    outcome: TurnOutcome,
    n: int,
) -> tuple[bool, Chat | None]:
    """Run one operation: (whether it may legitimately drop user messages (an edit), the
    chat row it returned, if any).

    `leases[worker]` is the lease of that worker's latest acquisition (a never-acquired
    worker holds token 0, which no run ever has): its turn writes carry it, stale or not.
    """
    lease = leases[worker]
    if op == "send":
        with contextlib.suppress(QueueFull):
            return False, (
                await store.send_message(chat_id, text(f"m{n}"), max_queued=SMALL_QUEUE)
            ).chat
    elif op == "acquire":
        for chat in await store.acquire(lease.worker_id, 1):
            leases[worker] = Lease.of(chat)
            return False, chat
    elif op == "heartbeat":
        await store.heartbeat(lease)
    elif op == "persist":
        with contextlib.suppress(PersistRefused):
            await store.persist_step(lease, [NewMessage(Role.ASSISTANT, (TextPart(f"a{n}"),))])
    elif op == "finish":
        return False, (await store.finish_turn(lease, outcome, "failed")).chat
    elif op == "interrupt":
        return False, await store.interrupt(chat_id)
    elif op == "promote":
        queue = await store.list_queued(chat_id)
        if queue:
            return False, (await store.promote_queued(chat_id, queue[-1].id)).chat
    elif op == "edit":
        users = [m for m in await store.messages_after(chat_id, 0) if m.role is Role.USER]
        return True, (await store.edit_message(chat_id, users[-1].id, text(f"e{n}"))).chat
    else:
        await store.recover_stale(0)
    return False, None


async def _alive(store: Store, chat_id: uuid.UUID) -> tuple[set[str], set[str]]:
    history = {
        text_of(m.parts) for m in await store.messages_after(chat_id, 0) if m.role is Role.USER
    }
    queued = {text_of(q.parts) for q in await store.list_queued(chat_id)}
    return history, queued


def test_random_operation_sequences_keep_the_lifecycle_invariants(
    store_kind: str, store_dsn: str | None
) -> None:
    """Invariants after every operation of any sequence on one chat, by two workers:
    - `running` if and only if a worker, started_at and heartbeat_at are set;
    - the queue never exceeds `max_queued`; no message is both queued and in the history;
    - the visible history is in strictly increasing id order and has no deleted message;
    - a user message is never lost (history or queue) except by an edit;
    - the history always holds at least one user message;
    - the row an operation returns is the row a read returns right after it (status,
      owner, token, queue length);
    - the ownership token never decreases, a chat becomes `running` only with a new
      token, and while it stays `running` under one token its owner does not change;
    - a turn write lands only under the row's current token, while the chat is running
      or stopped by the user (a persist that lands carried the token the row held)."""

    @settings(
        max_examples=EXAMPLES[store_kind],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(steps=st.lists(st.tuples(OPS, st.booleans(), st.sampled_from(FINISHING)), max_size=15))
    def check(steps: list[tuple[str, bool, TurnOutcome]]) -> None:
        async def main() -> None:
            async with open_store(store_kind, store_dsn) as store:
                chat, _ = await new_chat(store, first="m0")
                leases = [Lease(chat.id, uuid.uuid4(), 0), Lease(chat.id, uuid.uuid4(), 0)]
                prev = chat
                for n, (op, second, outcome) in enumerate(steps, start=1):
                    before = await _alive(store, chat.id)
                    count_before = len(await store.messages_after(chat.id, 0))
                    may_drop, reported = await _apply(
                        store, chat.id, op, int(second), leases, outcome, n
                    )
                    history, queued = await _alive(store, chat.id)
                    got = await store.get_chat(chat.id)
                    assert reported is None or reported == got, op
                    assert got.queued == len(queued)
                    assert got.owner_token >= prev.owner_token
                    if got.status is ChatStatus.RUNNING and got.owner_token == prev.owner_token:
                        # Still the same run: same owner, nobody else acquired it.
                        assert prev.status is ChatStatus.RUNNING
                        assert got.worker_id == prev.worker_id
                    if op == "persist" and len(await store.messages_after(chat.id, 0)) > (
                        count_before
                    ):
                        assert leases[int(second)].token == prev.owner_token
                        assert prev.status in (ChatStatus.RUNNING, ChatStatus.WAITING)
                    prev = got
                    owned = (got.worker_id, got.started_at, got.heartbeat_at)
                    if got.status is ChatStatus.RUNNING:
                        assert None not in owned
                    else:
                        assert owned == (None, None, None)
                    assert len(queued) <= SMALL_QUEUE
                    assert not history & queued
                    assert history
                    visible = await store.messages_after(chat.id, 0)
                    ids = [m.id for m in visible]
                    assert ids == sorted(set(ids)) and not any(m.deleted for m in visible)
                    if not may_drop:
                        assert before[0] | before[1] <= history | queued, op

        if store_kind == "memory":
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        else:
            trio.run(main)

    check()
