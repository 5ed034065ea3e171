"""The checker can fail: each test plants one bug through a broken wrapper or fake and
shows the simulation reports the matching invariant with a replay command."""

from __future__ import annotations

import dataclasses
import logging
import random
import uuid
from collections.abc import Iterator, Sequence

import pytest
import trio

from chatd_trio.domain import Chat, ChatStatus, Message, MessageEvent, NewMessage
from chatd_trio.store.base import Announcer, FinishResult, TurnOutcome
from tests.simulation.harness import (
    FakeDialer,
    Faults,
    Hooks,
    Op,
    Scenario,
    SimStore,
    SimulationFailure,
    assert_ok,
    run_scenario,
)

TOOLS, SLOW, WS = 1, 2, 3


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    # Faults make replicas log warnings by design; restore logging for later tests.
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def scenario(*ops: Op, replicas: int = 1) -> Scenario:
    return Scenario(seed=1, replicas=replicas, ops=ops, faults=Faults())


def reported(sc: Scenario, hooks: Hooks) -> set[str]:
    result = run_scenario(sc, hooks=hooks)
    with pytest.raises(SimulationFailure, match=r"replay with: python scripts/simulate\.py"):
        assert_ok(result)
    return {v.invariant for v in result.violations}


class DoublePersist(SimStore):
    async def persist_step(
        self,
        chat_id: uuid.UUID,
        worker_id: uuid.UUID,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
    ) -> list[Message]:
        await super().persist_step(chat_id, worker_id, messages, announce=announce)
        return await super().persist_step(chat_id, worker_id, messages, announce=announce)


class DoubleAcquire(SimStore):
    """Acquire also hands out chats another worker is running."""

    async def acquire(self, worker_id: uuid.UUID, limit: int) -> list[Chat]:
        chats = await super().acquire(worker_id, limit)
        seq = self._observe()
        for chat in list(self.inner._chats.values()):
            if chat.status is ChatStatus.RUNNING and chat.worker_id not in (None, worker_id):
                from tests.simulation.harness import Interval

                iv = Interval(worker_id, chat.id, seq, seq)
                self.obs.intervals.append(iv)
                self.obs.open_interval[(worker_id, chat.id)] = iv
                chats.append(chat)
        return chats


class LostFinish(SimStore):
    """The final transition is acknowledged but never written."""

    async def finish_turn(
        self,
        chat_id: uuid.UUID,
        worker_id: uuid.UUID,
        outcome: TurnOutcome,
        last_error: str | None = None,
        *,
        announce: Announcer | None = None,
    ) -> FinishResult:
        await trio.lowlevel.checkpoint()
        chat = self.inner._chats[chat_id]
        return FinishResult(chat, False, False, None, ())


class NeverRelease(FakeDialer):
    async def __call__(self, agent):  # type: ignore[no-untyped-def]
        conn, _release = await super().__call__(agent)

        async def no_release() -> None:
            await trio.lowlevel.checkpoint()

        return conn, no_release


def test_checker_passes_the_unbroken_scenarios() -> None:
    sc = scenario(Op("create", 0, TOOLS), Op("subscribe", 0, 0), Op("create", 0, WS, gap=5.0))
    assert_ok(run_scenario(sc))


def test_step_persisted_twice_breaks_tool_results() -> None:
    assert "tool_results" in reported(scenario(Op("create", 0, TOOLS)), Hooks(store=DoublePersist))


def test_duplicated_delivery_breaks_exactly_once() -> None:
    sc = scenario(Op("create", 0, TOOLS), Op("subscribe", 0, 0))

    def twice(ev: MessageEvent) -> list[MessageEvent]:
        return [ev, ev]

    assert "stream_exactly_once" in reported(sc, Hooks(deliver=twice))


def test_dropped_delivery_breaks_exactly_once() -> None:
    sc = scenario(Op("create", 0, TOOLS), Op("subscribe", 0, 0))
    drop = random.Random(3)

    def lossy(ev: MessageEvent) -> list[MessageEvent]:
        return [] if ev.message.id == 2 or drop.random() < 0.0 else [ev]

    assert "stream_exactly_once" in reported(sc, Hooks(deliver=lossy))


def test_unreleased_connection_is_reported() -> None:
    sc = scenario(Op("create", 0, WS, gap=5.0))
    assert "connections_released" in reported(sc, Hooks(dialer=NeverRelease))


def test_chat_handed_to_two_workers_breaks_single_owner() -> None:
    sc = scenario(Op("create", 0, SLOW, gap=3.0), replicas=2)
    assert "single_owner" in reported(sc, Hooks(store=DoubleAcquire))


def test_lost_final_transition_leaves_a_stuck_chat() -> None:
    assert "terminal_status" in reported(scenario(Op("create", 0, SLOW)), Hooks(store=LostFinish))


class NewestFirst(SimStore):
    """The final transition promotes the newest queued message instead of the oldest."""

    async def finish_turn(
        self,
        chat_id: uuid.UUID,
        worker_id: uuid.UUID,
        outcome: TurnOutcome,
        last_error: str | None = None,
        *,
        announce: Announcer | None = None,
    ) -> FinishResult:
        self.inner._queues.get(chat_id, []).reverse()
        return await super().finish_turn(chat_id, worker_id, outcome, last_error, announce=announce)


class ErrorAfterWaiting(SimStore):
    """A finished chat is flipped from waiting to error: no lifecycle event does that."""

    async def finish_turn(
        self,
        chat_id: uuid.UUID,
        worker_id: uuid.UUID,
        outcome: TurnOutcome,
        last_error: str | None = None,
        *,
        announce: Announcer | None = None,
    ) -> FinishResult:
        result = await super().finish_turn(
            chat_id, worker_id, outcome, last_error, announce=announce
        )
        chat = self.inner._chats[chat_id]
        if chat.status is ChatStatus.WAITING:
            self.inner._chats[chat_id] = dataclasses.replace(chat, status=ChatStatus.ERROR)
            self._observe()
        return result


def test_queue_promoted_out_of_order_breaks_queue_promotion() -> None:
    sc = scenario(Op("create", 0, SLOW), Op("send", 0, 0), Op("send", 0, 0))
    assert "queue_promotion" in reported(sc, Hooks(store=NewestFirst))


def test_an_impossible_status_change_breaks_status_path() -> None:
    sc = scenario(Op("create", 0, TOOLS))
    assert "status_path" in reported(sc, Hooks(store=ErrorAfterWaiting))
