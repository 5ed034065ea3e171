"""Helpers for the Server tests, and a replica process for the crash test.

As a module: scripted models keyed on the user's text, an observing store wrapper,
waits on stream events, test configurations.

As a script (`python -m tests.server_replica DSN WORKER_ID`): one replica on
PostgreSQL whose model answers the first step of a turn with a tool call and then
hangs in the middle of the next step's stream, so that the test can SIGKILL it
mid-turn (a `quick...` message is answered at once). It prints `ready` once it serves.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from chatd_trio.config import AcquireConfig, Config
from chatd_trio.domain import (
    JSON,
    Chat,
    ChatStatus,
    Message,
    MessagePartEvent,
    NewMessage,
    Role,
    StatusEvent,
    StreamEvent,
    Usage,
    dumps,
    parts_to_json,
    text_of,
)
from chatd_trio.errors import StoreError, StoreUnavailable
from chatd_trio.loop import TurnControl
from chatd_trio.models.base import Finish, PromptMessage, TextDelta
from chatd_trio.models.scripted import (
    ScriptedModel,
    ScriptStep,
    error_step,
    model_error,
    text_step,
    tool_step,
)
from chatd_trio.server import Server
from chatd_trio.store.base import Announcer, FinishResult, Lease, Store, TurnOutcome
from chatd_trio.streams import StreamSubscription
from chatd_trio.tools import ToolContext, ToolRegistry, tool

EPOCH = datetime(2030, 1, 1, tzinfo=UTC)

# Memory tests run on MockClock(autojump_threshold=0): intervals are virtual seconds.
MEMORY_CONFIG = Config(
    acquire=AcquireConfig(acquire_interval=1.0, heartbeat_interval=1.0, stale_after=10.0)
)
# PostgreSQL tests run on the real clock: short intervals keep them quick.
POSTGRES_CONFIG = Config(
    acquire=AcquireConfig(acquire_interval=0.2, heartbeat_interval=0.2, stale_after=3.0)
)
# Bound of every event wait (virtual seconds on memory, real seconds on PostgreSQL).
WAIT = 60.0

PARTIAL = "partial"
MODEL_ERROR_PREFIX = "model refused: "


def trio_clock() -> datetime:
    """Store timestamps that follow Trio's (mock) clock."""
    return EPOCH + timedelta(seconds=trio.current_time())


def hang_step() -> ScriptStep:
    """Streams `PARTIAL`, then blocks until cancelled."""
    return ScriptStep((TextDelta(PARTIAL), Finish(Usage(), "stop")), hang_after=1)


def _last_user_text(prompt: Sequence[PromptMessage]) -> str | None:
    if not prompt or prompt[-1].role is not Role.USER:
        return None
    return text_of(prompt[-1].parts)


def user_driven_step(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
    """What the model does is chosen by the user's latest message.

    `hang...` streams `PARTIAL` and hangs; `fail...` is a non-retryable model error;
    `tools...` calls `echo` once, then answers `done`; anything else is answered
    `re: <text>`.
    """
    if prompt and prompt[-1].role is Role.TOOL:
        return text_step("done")
    text = _last_user_text(prompt)
    if text is None:
        return text_step("ok")
    if text.startswith("hang"):
        return hang_step()
    if text.startswith("fail"):
        return error_step(
            model_error(400, retryable=False, kind="bad_request", message=MODEL_ERROR_PREFIX + text)
        )
    if text.startswith("tools"):
        return tool_step([("echo", {"text": text})], call_id_prefix=f"call{index}")
    return text_step(f"re: {text}")


def user_model() -> ScriptedModel:
    return ScriptedModel(user_driven_step)


def hanging_model() -> ScriptedModel:
    """Every step hangs mid-stream."""
    return ScriptedModel(lambda prompt, index: hang_step())


def answering_model() -> ScriptedModel:
    """Every step answers at once, whatever the prompt ends with."""

    def step(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
        if prompt and prompt[-1].role is Role.TOOL:
            return text_step("done")
        return text_step(f"re: {_last_user_text(prompt) or 'continued'}")

    return ScriptedModel(step)


@tool("echo", "Echo the arguments.", {"type": "object"})
async def echo(args: dict[str, JSON], ctx: ToolContext) -> JSON:
    await trio.lowlevel.checkpoint()
    return {"echo": args}


def registry() -> ToolRegistry:
    return ToolRegistry([echo])


@dataclass(frozen=True)
class Finished:
    """One final transition a turn asked for, and what the store did."""

    lease: Lease
    outcome: TurnOutcome
    result: FinishResult


class ObservedStore:
    """A thin wrapper around a real store: records final transitions, and injects faults
    into a turn's writes (`persist_step`, `finish_turn`).

    - `fail_marker`: a write whose messages contain it (in any part) raises StoreError,
      a fault the store keeps refusing; nothing is written.
    - `fail_next(operation, times, after_commit=...)`: the next `times` calls raise
      StoreUnavailable, a transient fault: before the write (nothing landed) or after
      the real write committed (as a connection lost around COMMIT).
    """

    def __init__(self, inner: Store, *, fail_marker: str | None = None) -> None:
        self.inner = inner
        self.fail_marker = fail_marker
        # Ids claimed by each acquire statement, in order.
        self.acquired: list[list[uuid.UUID]] = []
        self.finished: list[Finished] = []
        self._finish_event = trio.Event()
        self._faults: dict[str, list[bool]] = {}
        # Transient faults injected so far, by operation.
        self.injected: dict[str, int] = {}

    def fail_next(self, operation: str, times: int = 1, *, after_commit: bool = False) -> None:
        """Make the next `times` calls of `operation` raise StoreUnavailable."""
        self._faults.setdefault(operation, []).extend([after_commit] * times)

    def _fault(self, operation: str) -> bool | None:
        """None: no fault; else whether this call's fault comes after the commit."""
        pending = self._faults.get(operation)
        if not pending:
            return None
        self.injected[operation] = self.injected.get(operation, 0) + 1
        return pending.pop(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _maybe_fail(self, messages: Sequence[NewMessage]) -> None:
        if self.fail_marker is not None and any(
            self.fail_marker in dumps(parts_to_json(m.parts)) for m in messages
        ):
            raise StoreError("disk on fire")

    async def persist_step(
        self,
        lease: Lease,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
        op_id: uuid.UUID | None = None,
    ) -> list[Message]:
        await trio.lowlevel.checkpoint()
        self._maybe_fail(messages)
        fault = self._fault("persist_step")
        if fault is False:
            raise StoreUnavailable("connection lost (injected)")
        inserted = await self.inner.persist_step(lease, messages, announce=announce, op_id=op_id)
        if fault:
            raise StoreUnavailable("connection lost around COMMIT (injected)")
        return inserted

    async def acquire(self, worker_id: uuid.UUID, limit: int, **kwargs: Any) -> list[Chat]:
        chats = await self.inner.acquire(worker_id, limit, **kwargs)
        self.acquired.append([c.id for c in chats])
        return chats

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
        self._maybe_fail(messages)
        fault = self._fault("finish_turn")
        if fault is False:
            raise StoreUnavailable("connection lost (injected)")
        result = await self.inner.finish_turn(
            lease, outcome, last_error, messages=messages, announce=announce, op_id=op_id
        )
        if fault:
            raise StoreUnavailable("connection lost around COMMIT (injected)")
        self.finished.append(Finished(lease, outcome, result))
        self._finish_event.set()
        self._finish_event = trio.Event()
        return result

    def finishes(self, chat_id: uuid.UUID, outcome: TurnOutcome | None = None) -> list[Finished]:
        """The chat's final transitions so far (of one outcome, if given), in order."""
        return [
            f
            for f in self.finished
            if f.lease.chat_id == chat_id and (outcome is None or f.outcome is outcome)
        ]

    @property
    def finish_event(self) -> trio.Event:
        """Set when the next final transition is recorded (take it before checking)."""
        return self._finish_event

    async def wait_finished(
        self, chat_id: uuid.UUID, count: int = 1, *, outcome: TurnOutcome | None = None
    ) -> FinishResult:
        """Wait until `count` final transitions of the chat (of `outcome`, if given) have
        run; the last one."""
        return (await self.wait_finish(chat_id, count, outcome=outcome)).result

    async def wait_finish(
        self, chat_id: uuid.UUID, count: int = 1, *, outcome: TurnOutcome | None = None
    ) -> Finished:
        """As `wait_finished`, with the lease and outcome the turn finished with."""
        with trio.fail_after(WAIT):
            while True:
                mine = self.finishes(chat_id, outcome)
                if len(mine) >= count:
                    return mine[count - 1]
                await self._finish_event.wait()


class ObservedServer(Server):
    """A Server that records how each of its turns ended (`ended`, in order).

    A turn that lost its chat ends without a final transition (it writes nothing),
    so the store never hears of that end: `wait_ended` waits for it here.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ended: list[tuple[uuid.UUID, TurnOutcome]] = []
        self._ended_event = trio.Event()
        # The supervisor's end-of-turn hook, observed (it is idempotent: record once).
        supervisor = self._supervisor
        turn_done = supervisor._turn_done

        def observed(
            chat_id: uuid.UUID, control: TurnControl, outcome: TurnOutcome, generation: int
        ) -> None:
            first = control in supervisor.controls
            turn_done(chat_id, control, outcome, generation)
            if first:
                self.ended.append((chat_id, outcome))
                self._ended_event.set()
                self._ended_event = trio.Event()

        supervisor._turn_done = observed  # type: ignore[method-assign]

    async def wait_ended(
        self, chat_id: uuid.UUID, count: int = 1, *, outcome: TurnOutcome | None = None
    ) -> TurnOutcome:
        """Wait until `count` turns of the chat (ending in `outcome`, if given) have ended
        here; the last one's outcome."""
        with trio.fail_after(WAIT):
            while True:
                mine = [
                    o for c, o in self.ended if c == chat_id and (outcome is None or o is outcome)
                ]
                if len(mine) >= count:
                    return mine[count - 1]
                await self._ended_event.wait()


async def until_statuses(
    sub: StreamSubscription,
    statuses: Iterable[ChatStatus],
    *,
    seen: list[StreamEvent] | None = None,
) -> list[StreamEvent]:
    """Receive until the statuses have been seen in this order (other events between)."""
    wanted = list(statuses)
    events: list[StreamEvent] = [] if seen is None else seen
    with trio.fail_after(WAIT):
        while wanted:
            event = await sub.receive()
            events.append(event)
            if isinstance(event, StatusEvent) and event.status is wanted[0]:
                wanted.pop(0)
    return events


async def until_part(sub: StreamSubscription) -> MessagePartEvent:
    """Receive until the first streamed delta of the running step."""
    with trio.fail_after(WAIT):
        while True:
            event = await sub.receive()
            if isinstance(event, MessagePartEvent):
                return event


def status_events(events: Iterable[StreamEvent]) -> list[StatusEvent]:
    return [e for e in events if isinstance(e, StatusEvent)]


# -- the replica process ------------------------------------------------------------


def crash_step(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
    """`quick...` is answered at once. Otherwise the first step of a turn is one tool
    call, and after the tool result the next step hangs mid-stream."""
    if prompt and prompt[-1].role is Role.TOOL:
        return hang_step()
    text = _last_user_text(prompt) or ""
    if text.startswith("quick"):
        return text_step(f"re: {text}")
    return tool_step([("echo", {"n": index})], call_id_prefix=f"crash{index}")


CRASH_CONFIG = Config(
    acquire=AcquireConfig(acquire_interval=0.2, heartbeat_interval=0.5, stale_after=2.0)
)


@asynccontextmanager
async def _opened(dsn: str) -> AsyncIterator[tuple[Any, Any]]:
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore

    async with PostgresStore.open(dsn) as store, PostgresPubSub.open(dsn) as pubsub:
        yield store, pubsub


async def _replica_main(dsn: str, worker_id: uuid.UUID) -> None:
    async with _opened(dsn) as (store, pubsub):
        model = ScriptedModel(crash_step)
        async with Server(
            store, pubsub, model, CRASH_CONFIG, tools=registry(), worker_id=worker_id
        ):
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(_replica_main, sys.argv[1], uuid.UUID(sys.argv[2]))
