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
from chatd_trio.errors import StoreError
from chatd_trio.store.base import Announcer, FinishResult, Lease, TurnOutcome
from tests.simulation.harness import (
    FakeDialer,
    Faults,
    Hooks,
    Op,
    Scenario,
    SimStore,
    SimulationFailure,
    WitnessStore,
    assert_ok,
    run_scenario,
)

PLAIN, TOOLS, SLOW, WS = 0, 1, 2, 3


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    # Faults make replicas log warnings by design; restore logging for later tests.
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def scenario(*ops: Op, replicas: int = 1, seed: int = 1) -> Scenario:
    return Scenario(seed=seed, replicas=replicas, ops=ops, faults=Faults())


def reported(sc: Scenario, hooks: Hooks) -> set[str]:
    """The invariants the checker reports with the bug planted; the same scenario
    without it holds every invariant, so what is reported is the bug's doing."""
    assert_ok(run_scenario(sc))
    result = run_scenario(sc, hooks=hooks)
    with pytest.raises(SimulationFailure, match=r"replay with: python -m tests\.simulation"):
        assert_ok(result)
    return {v.invariant for v in result.violations}


class DoublePersist(SimStore):
    """A step's write lands twice: the retry lost the step's operation id, so the store
    cannot recognise the first landing (with the same id it would report it instead)."""

    async def persist_step(
        self,
        lease: Lease,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
        op_id: uuid.UUID | None = None,
    ) -> list[Message]:
        await super().persist_step(lease, messages, announce=announce, op_id=op_id)
        return await super().persist_step(lease, messages, announce=announce)


class DoubleAcquire(SimStore):
    """Acquire also hands out chats another worker is running, under the ownership token
    that worker holds: the fence cannot tell the two runs apart, so both runs' writes land."""

    async def acquire(
        self,
        worker_id: uuid.UUID,
        limit: int,
        *,
        announce: Announcer | None = None,
        prompts: bool = False,
    ) -> list[Chat]:
        chats = await super().acquire(worker_id, limit, announce=announce, prompts=prompts)
        stolen = [
            dataclasses.replace(chat, worker_id=worker_id)
            for chat in list(self.inner._chats.values())
            if chat.status is ChatStatus.RUNNING and chat.worker_id not in (None, worker_id)
        ]
        self._acquired(stolen, self._observe())
        return chats + stolen


class LostFinish(SimStore):
    """The final transition is acknowledged but never written."""

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
        await trio.lowlevel.checkpoint()
        chat = self.inner._out(self.inner._chats[lease.chat_id])
        return FinishResult(chat, True, False, None, ())


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
    sc = scenario(Op("create", 0, TOOLS))
    assert reported(sc, Hooks(store=DoublePersist)) == {"tool_results"}


def test_duplicated_delivery_breaks_exactly_once() -> None:
    sc = scenario(Op("create", 0, TOOLS), Op("subscribe", 0, 0))

    def twice(ev: MessageEvent) -> list[MessageEvent]:
        return [ev, ev]

    assert reported(sc, Hooks(deliver=twice)) == {"stream_exactly_once"}


def test_dropped_delivery_breaks_exactly_once() -> None:
    sc = scenario(Op("create", 0, TOOLS), Op("subscribe", 0, 0))
    drop = random.Random(3)

    def lossy(ev: MessageEvent) -> list[MessageEvent]:
        return [] if ev.message.id == 2 or drop.random() < 0.0 else [ev]

    assert reported(sc, Hooks(deliver=lossy)) == {"stream_exactly_once"}


def test_unreleased_connection_is_reported() -> None:
    sc = scenario(Op("create", 0, WS, gap=5.0))
    assert reported(sc, Hooks(dialer=NeverRelease)) == {"connections_released"}


def test_chat_handed_to_two_workers_breaks_single_owner() -> None:
    sc = scenario(Op("create", 0, SLOW, gap=3.0), replicas=2)
    assert reported(sc, Hooks(store=DoubleAcquire)) == {"single_owner"}


def test_lost_final_transition_leaves_a_stuck_chat() -> None:
    assert reported(scenario(Op("create", 0, SLOW)), Hooks(store=LostFinish)) == {"terminal_status"}


class NewestFirst(SimStore):
    """The final transition promotes the newest queued message instead of the oldest."""

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
        self.inner._queues.get(lease.chat_id, []).reverse()
        return await super().finish_turn(
            lease, outcome, last_error, messages=messages, announce=announce, op_id=op_id
        )


class ErrorAfterWaiting(SimStore):
    """A finished chat is flipped from waiting to error: no lifecycle event does that."""

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
        result = await super().finish_turn(
            lease, outcome, last_error, messages=messages, announce=announce, op_id=op_id
        )
        chat = self.inner._chats[lease.chat_id]
        if chat.status is ChatStatus.WAITING:
            self.inner._chats[lease.chat_id] = dataclasses.replace(chat, status=ChatStatus.ERROR)
            self._observe()
        return result


def test_queue_promoted_out_of_order_breaks_queue_promotion() -> None:
    sc = scenario(Op("create", 0, SLOW), Op("send", 0, 0), Op("send", 0, 0))
    assert reported(sc, Hooks(store=NewestFirst)) == {"queue_promotion"}


def test_an_impossible_status_change_breaks_status_path() -> None:
    sc = scenario(Op("create", 0, TOOLS))
    assert reported(sc, Hooks(store=ErrorAfterWaiting)) == {"status_path"}


class BrokenWrite(SimStore):
    """A store bug: a step's write fails with an error no caller expects."""

    async def persist_step(
        self,
        lease: Lease,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
        op_id: uuid.UUID | None = None,
    ) -> list[Message]:
        await trio.lowlevel.checkpoint()
        raise ValueError("planted: the row does not decode")


def test_a_turn_that_crashes_is_reported() -> None:
    sc = scenario(Op("create", 0, TOOLS))
    assert reported(sc, Hooks(store=BrokenWrite)) == {"turn_crashes"}


class NoFence(SimStore):
    """A store whose final transition ignores the ownership token: refused because
    another run holds the chat, it is written again under the token the row holds."""

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
        out = await super().finish_turn(
            lease, outcome, last_error, messages=messages, announce=announce, op_id=op_id
        )
        if not out.owned_elsewhere:
            return out
        token = self.inner._chats[lease.chat_id].owner_token
        return await super().finish_turn(
            Lease(lease.chat_id, lease.worker_id, token),
            outcome,
            last_error,
            messages=messages,
            announce=announce,
            op_id=op_id,
        )


def test_a_write_under_a_stale_token_is_reported() -> None:
    """The replica running a slow answer (replica 1: it acquires first) retries its final
    transition through an outage and is paused while it does; the other replica
    recovers the chat and runs it again. When the first resumes, its final transition
    (shielded, already under way) reaches the store under its old token."""
    sc = scenario(
        Op("create", 0, SLOW, gap=6.5),
        Op("outage", 1, gap=3.0),
        Op("pause", 0, 1, 1),
        replicas=2,
    )
    assert reported(sc, Hooks(store=NoFence)) == {"stale_token_write"}


class AnswerTwice(SimStore):
    """The final answer lands twice: written once more before the finish under a new
    operation id (as a finish split in two writes, retried without its op id, would)."""

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
        if messages:
            await super().persist_step(lease, messages, announce=announce)
        return await super().finish_turn(
            lease, outcome, last_error, messages=messages, announce=announce, op_id=op_id
        )


def test_an_answer_written_twice_is_reported() -> None:
    sc = scenario(Op("create", 0, PLAIN))
    assert reported(sc, Hooks(store=AnswerTwice)) == {"answered_once"}


class Misclassified(SimStore):
    """An adapter that reports a lost connection as a failed statement (`StoreError`,
    not `StoreUnavailable`): the turn's final write looks refused for good."""

    def __init__(self, inner: WitnessStore, rng: random.Random, faults: Faults) -> None:
        super().__init__(inner, rng, faults)
        self.failed: set[uuid.UUID] = set()

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
        if messages and lease.chat_id not in self.failed:
            self.failed.add(lease.chat_id)
            await trio.lowlevel.checkpoint()
            raise StoreError("injected connection loss before finish_turn")
        return await super().finish_turn(
            lease, outcome, last_error, messages=messages, announce=announce, op_id=op_id
        )


def test_a_transient_fault_that_ends_a_turn_in_error_is_reported() -> None:
    sc = scenario(Op("create", 0, PLAIN))
    assert reported(sc, Hooks(store=Misclassified)) == {"no_transient_error"}


class LateRecovery(SimStore):
    """Stale recovery that waits four times too long before it takes a chat back."""

    async def recover_stale(
        self, stale_after: float, *, announce: Announcer | None = None
    ) -> list[uuid.UUID]:
        return await super().recover_stale(stale_after * 4, announce=announce)


def test_a_chat_left_running_without_an_owner_is_reported() -> None:
    """The replica running a slow answer crashes; its replacement recovers the chat only
    after four times stale_after."""
    sc = scenario(Op("create", 0, SLOW, gap=1.0), Op("crash", 0, 0))
    assert reported(sc, Hooks(store=LateRecovery)) == {"no_orphan_running"}
