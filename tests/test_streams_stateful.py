"""Stateful property test of chat streams against a reference model (docs/spec.md §4).

Two replicas (two `ChatStreams` sharing one store and one pubsub) run random
sequences of: persist + publish, edits, parts, subscribe / unsubscribe /
re-subscribe with the last id, slow (paused) subscribers that overflow their
queue, pubsub resyncs and failures. The rules run in Hypothesis' thread and
call into one Trio loop through `trio.from_thread.run`.

What "lossless" means here (see chatd_trio/streams/__init__.py): every durable message
reaches every subscriber exactly once per history epoch, in id order, after its
cursor; an edit's full refresh may start a new epoch (ids go back to the start
of the history), and only an edit may. A subscriber whose queue overflowed
catches up from the store instead of losing a durable message. Parts may be
dropped, and every dropped part is counted.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import psycopg
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from chatd_trio.config import StreamConfig
from chatd_trio.domain import Message, MessageEvent, MessagePartEvent, Role, StreamEvent, TextPart
from chatd_trio.pubsub.base import PubSub
from chatd_trio.store.base import Store
from chatd_trio.streams import ChatStreams, StreamSubscription
from tests.test_streams import acquire_lease, open_backend, persist, running_chat

T = TypeVar("T")
SETTLE_TIMEOUT = 15.0
# How long every other task must stay blocked before a re-check (seconds).
IDLE_CUSHION = 0.01
# Small queues and cache so that overflow and eviction happen within a few steps.
CONFIG = StreamConfig(subscriber_queue_size=2, durable_cache_size=3, buffer_limit=8)


class Harness:
    """One Trio loop in a thread holding the store and pubsub; rules call into it."""

    def __init__(self, kind: str, dsn: str | None) -> None:
        self.kind = kind
        self.dsn = dsn
        self.store: Store
        self.pubsub: PubSub
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, daemon=True)
        self.changed = trio.Event()

    def __enter__(self) -> Harness:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with open_backend(self.kind, self.dsn) as (store, pubsub), trio.open_nursery() as n:
            self.store, self.pubsub = store, pubsub
            self.nursery = n
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            n.cancel_scope.cancel()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def poke(self) -> None:
        """Wake every waiter of `changed` (called from the Trio thread)."""
        self.changed.set()
        self.changed = trio.Event()

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait (bounded) until `done()` holds.

        Re-checked on every `poke` and whenever every other task is blocked: a
        subscription may advance its cursor inside `receive()` (a catch-up that
        delivers nothing new) without producing an event, hence without a poke.
        """
        with trio.fail_after(SETTLE_TIMEOUT):
            while not done():
                async with trio.open_nursery() as nursery:

                    async def woken(wait: Callable[[], Awaitable[object]]) -> None:
                        await wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(woken, self.changed.wait)
                    nursery.start_soon(
                        woken, partial(trio.testing.wait_all_tasks_blocked, IDLE_CUSHION)
                    )


@dataclass(eq=False)
class Sub:
    """The model's view of one subscriber."""

    replica: int
    start: int
    edits_at_start: int
    events: list[StreamEvent] = field(default_factory=list)
    handle: StreamSubscription | None = None
    scope: trio.CancelScope | None = None
    gate: trio.Event = field(default_factory=trio.Event)
    ended: bool = False
    parts_expected: set[str] = field(default_factory=set)

    @property
    def cursor(self) -> int:
        assert self.handle is not None
        return self.handle.cursor

    def messages(self) -> list[Message]:
        return [e.message for e in self.events if isinstance(e, MessageEvent)]

    def parts(self) -> set[str]:
        return {
            e.part.text  # type: ignore[union-attr]
            for e in self.events
            if isinstance(e, MessagePartEvent)
        }


async def run_sub(
    harness: Harness,
    streams: ChatStreams,
    chat_id: uuid.UUID,
    sub: Sub,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope() as scope:
        sub.scope = scope
        async with streams.subscribe(chat_id, sub.start) as handle:
            sub.handle = handle
            sub.gate.set()
            task_status.started()
            while True:
                await sub.gate.wait()
                try:
                    ev = await handle.receive()
                except trio.EndOfChannel:
                    sub.ended = True
                    harness.poke()
                    return
                sub.events.append(ev)
                harness.poke()


def epochs(sub: Sub) -> list[list[Message]]:
    """Split the delivered messages where ids go back (a full refresh)."""
    out: list[list[Message]] = [[]]
    last = sub.start
    for m in sub.messages():
        if m.id <= last:
            out.append([])
        out[-1].append(m)
        last = m.id
    return out


class StreamsMachine(RuleBasedStateMachine):
    harness: Harness
    resync: Callable[[Harness], None] | None = None
    can_break = False

    @initialize()
    def setup(self) -> None:
        h = self.harness
        self.replicas = [ChatStreams(h.store, h.pubsub, CONFIG) for _ in range(2)]
        self.chat_id, first, self.lease = h.call(running_chat, h.store)
        self.owner = 0
        self.user_ids = [first.id]
        self.edits = 0
        self.parts_seq = 0
        self.subs: list[Sub] = []
        self.closed_cursors: list[int] = []
        # Another chat whose messages take ids in between: ids are global across chats.
        self.other_id, _, self.other_lease = h.call(running_chat, h.store)
        h.call_sync(self.replicas[0].start_turn, self.chat_id)

    # -- helpers ------------------------------------------------------------------------
    def live(self) -> list[Message]:
        return self.harness.call(self.harness.store.messages_after, self.chat_id, 0)

    def add_sub(self, replica: int, start: int) -> None:
        sub = Sub(replica, start, self.edits)
        h = self.harness
        h.call(h.nursery.start, run_sub, h, self.replicas[replica], self.chat_id, sub)
        self.subs.append(sub)

    # -- rules --------------------------------------------------------------------------
    @rule(k=st.integers(1, 6))
    def publish_parts(self, k: int) -> None:
        streams = self.replicas[self.owner]

        def publish() -> None:
            for _ in range(k):
                self.parts_seq += 1
                text = f"p{self.parts_seq}"
                for sub in self.subs:
                    if sub.replica == self.owner and not sub.ended:
                        sub.parts_expected.add(text)
                streams.publish_part(MessagePartEvent(self.chat_id, Role.ASSISTANT, TextPart(text)))

        self.harness.call_sync(publish)

    @rule(n=st.integers(1, 3), user=st.booleans())
    def persist_and_publish(self, n: int, user: bool) -> None:
        streams = self.replicas[self.owner]
        role = Role.USER if user else Role.ASSISTANT
        texts = [f"m{i}" for i in range(n)]

        async def step() -> list[Message]:
            msgs = await persist(self.harness.store, self.lease, *texts, role=role)
            streams.step_persisted(self.chat_id)
            await streams.publish_messages(msgs)
            return msgs

        msgs = self.harness.call(step)
        if user:
            self.user_ids += [m.id for m in msgs]

    @rule()
    def other_chat_message(self) -> None:
        h = self.harness
        h.call(persist, h.store, self.other_lease, "elsewhere")

    @precondition(lambda self: bool(self.subs))
    @rule(data=st.data(), n=st.integers(2, 6))
    def slow_subscriber_overflows(self, data: st.DataObject, n: int) -> None:
        """Pause one subscriber, then publish more than its queue holds."""
        sub = data.draw(st.sampled_from(self.subs))

        def pause() -> None:
            if sub.gate.is_set():
                sub.gate = trio.Event()

        self.harness.call_sync(pause)
        for _ in range(n):
            self.persist_and_publish(1, False)
            self.publish_parts(2)

    @rule(replica=st.integers(0, 1))
    def switch_turn(self, replica: int) -> None:
        def switch() -> None:
            self.replicas[self.owner].end_turn(self.chat_id)
            self.replicas[replica].start_turn(self.chat_id)

        self.harness.call_sync(switch)
        self.owner = replica

    @precondition(lambda self: bool(self.user_ids))
    @rule(replica=st.integers(0, 1), data=st.data())
    def edit(self, replica: int, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(self.user_ids))
        h = self.harness

        async def edit() -> Message:
            result = await h.store.edit_message(self.chat_id, target, (TextPart("edited"),))
            await self.replicas[replica].publish_edited_message(result.message)
            # The edit ends the turn; the chat is acquired again and a new turn starts.
            self.replicas[self.owner].end_turn(self.chat_id)
            self.lease = await acquire_lease(h.store, self.chat_id, self.lease.worker_id)
            self.replicas[self.owner].start_turn(self.chat_id)
            return result.message

        edited = h.call(edit)
        self.edits += 1
        self.user_ids = [i for i in self.user_ids if i < target] + [edited.id]

    @rule(replica=st.integers(0, 1), where=st.sampled_from(["zero", "last", "random"]))
    def subscribe(self, replica: int, where: str) -> None:
        ids = [m.id for m in self.live()]
        start = 0
        if where == "last" and ids:
            start = ids[-1]
        elif where == "random" and ids:
            start = ids[len(ids) // 2]
        self.add_sub(replica, start)

    @precondition(lambda self: bool(self.closed_cursors))
    @rule(replica=st.integers(0, 1))
    def resubscribe_with_last_id(self, replica: int) -> None:
        self.add_sub(replica, self.closed_cursors.pop())

    @precondition(lambda self: bool(self.subs))
    @rule(data=st.data())
    def unsubscribe(self, data: st.DataObject) -> None:
        sub = data.draw(st.sampled_from(self.subs))
        self.check_order(sub)
        assert sub.scope is not None
        self.harness.call_sync(sub.scope.cancel)
        self.subs.remove(sub)
        self.closed_cursors.append(sub.cursor)

    @precondition(lambda self: bool(self.subs))
    @rule(data=st.data(), paused=st.booleans())
    def pause_or_resume(self, data: st.DataObject, paused: bool) -> None:
        sub = data.draw(st.sampled_from(self.subs))

        def flip() -> None:
            if paused and sub.gate.is_set():
                sub.gate = trio.Event()
            elif not paused:
                sub.gate.set()

        self.harness.call_sync(flip)

    @precondition(lambda self: self.resync is not None)
    @rule()
    def pubsub_resync(self) -> None:
        assert self.resync is not None
        self.resync(self.harness)

    @precondition(lambda self: self.can_break and bool(self.subs))
    @rule()
    def pubsub_failure(self) -> None:
        """Every subscription fails; each client re-subscribes with its last id."""
        h = self.harness
        self.resume_all()
        h.call_sync(h.pubsub.break_subscriptions)  # type: ignore[attr-defined]

        async def wait_ended() -> None:
            await h.until(lambda: all(s.ended for s in self.subs))

        h.call(wait_ended)
        for sub in self.subs:
            assert sub.events[-1].type.value == "error"
            self.check_order(sub)
        old, self.subs = self.subs, []
        for sub in old:
            self.add_sub(sub.replica, sub.cursor)

    @rule()
    def settle_and_check(self) -> None:
        self.settle()

    # -- checks -------------------------------------------------------------------------
    def resume_all(self) -> None:
        def resume() -> None:
            for sub in self.subs:
                sub.gate.set()

        self.harness.call_sync(resume)

    def check_order(self, sub: Sub) -> None:
        """Strictly increasing ids within an epoch; a new epoch only after an edit."""
        parts = epochs(sub)
        assert len(parts) - 1 <= self.edits - sub.edits_at_start, [[m.id for m in e] for e in parts]
        for m in sub.messages():
            assert m.chat_id == self.chat_id

    def settle(self) -> None:
        """Resume everyone, wait until every subscriber has caught up, then compare."""
        self.resume_all()
        live = self.live()
        live_ids = [m.id for m in live]
        target = live_ids[-1] if live_ids else 0
        h = self.harness

        def caught_up(sub: Sub) -> bool:
            assert sub.handle is not None
            return sub.cursor == target and sub.handle.backlog == 0

        async def wait() -> None:
            await h.until(lambda: all(caught_up(s) for s in self.subs))

        try:
            h.call(wait)
        except trio.TooSlowError:
            raise AssertionError(
                [(s.start, s.cursor, s.handle.backlog if s.handle else None) for s in self.subs]
                + [target]
            ) from None
        dropped_ok = {
            r: self.replicas[r].statistics().dropped_subscriber for r in range(len(self.replicas))
        }
        missing_parts = dict.fromkeys(dropped_ok, 0)
        for sub in self.subs:
            self.check_order(sub)
            parts = epochs(sub)
            expected_from = 0 if len(parts) > 1 else sub.start
            expected = [i for i in live_ids if i > expected_from]
            # An undetectable refresh (all its ids above the cursor) may leave messages
            # an edit deleted in the view; the client drops them by id when it sees the
            # edit's replacement. Everything live must be there exactly once, in order.
            got = [m.id for m in parts[-1] if m.id in set(live_ids)]
            assert got == expected, (sub.start, [[m.id for m in e] for e in parts], live_ids)
            received = sub.parts()
            assert received <= {f"p{i}" for i in range(1, self.parts_seq + 1)}
            missing_parts[sub.replica] += len(sub.parts_expected - received)
        for r, missing in missing_parts.items():
            assert missing <= dropped_ok[r], (missing, dropped_ok[r])

    def teardown(self) -> None:
        if not hasattr(self, "replicas"):
            return
        try:
            self.settle()
        finally:

            def stop() -> None:
                for sub in self.subs:
                    assert sub.scope is not None
                    sub.scope.cancel()
                self.replicas[self.owner].end_turn(self.chat_id)

            self.harness.call_sync(stop)

    @invariant()
    def cursors_only_move_forward_within_an_epoch(self) -> None:
        for sub in getattr(self, "subs", []):
            if sub.handle is not None:
                self.check_order(sub)


def memory_resync(h: Harness) -> None:
    h.call_sync(h.pubsub.force_resync)  # type: ignore[attr-defined]


def postgres_disconnect(h: Harness) -> None:
    """Kill the listener's connection: the adapter reconnects and tells everyone to resync."""
    pid = h.pubsub.listener_pid  # type: ignore[attr-defined]
    if pid is None:
        return
    assert h.dsn is not None
    with psycopg.connect(h.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_streams_stateful_memory() -> None:
    with Harness("memory", None) as harness:

        class Machine(StreamsMachine):
            pass

        Machine.harness = harness
        Machine.resync = staticmethod(memory_resync)  # type: ignore[assignment]
        Machine.can_break = True
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=60,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )


@pytest.mark.postgres
def test_streams_stateful_postgres(pg_dsn: str) -> None:
    with Harness("postgres", pg_dsn) as harness:

        class Machine(StreamsMachine):
            pass

        Machine.harness = harness
        Machine.resync = staticmethod(postgres_disconnect)  # type: ignore[assignment]
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=15,
                stateful_step_count=20,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
