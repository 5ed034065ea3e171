"""One replica's subscribers and drivers (`ReplicaRunner`): in the coordinator's process
for `--store memory`, in each worker process for `--store postgres`."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

import trio

from chatd_trio.apps.scaletest.answers import StoredMessage, answer_counts
from chatd_trio.apps.scaletest.plan import FaultConfig, Plan, backoff
from chatd_trio.config import (
    ScaleTestConfig,
)
from chatd_trio.domain import (
    ChatStatus,
    ErrorEvent,
    Message,
    MessageEvent,
    Role,
    StatusEvent,
)
from chatd_trio.errors import PubSubError, StoreError
from chatd_trio.server import Server
from chatd_trio.streams import CATCHUP_ERROR, PUBSUB_ERROR, SNAPSHOT_ERROR, StreamSubscription

__all__ = [
    "TRANSIENT",
    "Counters",
    "ReplicaRunner",
    "RunnerEvents",
    "RunnerStats",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


# Store errors a driver rides out; anything else is a bug of the run and ends it.
TRANSIENT = (StoreError, PubSubError)


class RunnerEvents(Protocol):
    """Where a replica's drivers report progress (the coordinator)."""

    def on_turn(self, chat_id: str, turn: int, outcome: str) -> None: ...

    def on_chat_done(self, chat_id: str, last_id: int) -> None: ...


class _Resubscribe(Exception):
    """The subscription ended on an error: open a new one from the cursor."""


@dataclass
class _ChatView:
    """What one replica's subscribers know about one chat."""

    running_worker: str | None = None
    attributed_reads: int = 0


@dataclass
class _SubState:
    chat_id: uuid.UUID
    driver: bool
    received: list[int] = field(default_factory=list)
    # Id of the last durable message received: a re-subscription starts after it.
    cursor: int = 0
    users: int = 0
    # Number (1-based) of the latest user message seen answered.
    answered_user: int = 0
    # `answered_user` when `waiting` was last seen; `users` when `waiting`/`error` was.
    waited: int = -1
    ended_user: int = 0
    ended_seq: int = 0
    final_id: int | None = None
    # Subscriptions whose snapshot arrived.
    opened: int = 0
    ready: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)
    saw_first: bool = False
    done: bool = False
    # The last status streamed was `pending`: the chat waits for a free replica.
    pending: bool = False


@dataclass
class RunnerStats:
    """What one replica's drivers and subscribers rode out."""

    send_retries: int = 0
    read_retries: int = 0
    resubscribes: int = 0
    # Turn `error` events seen by the drivers' subscriptions (one subscription per chat).
    error_events: int = 0
    # Turns whose end (`waiting`/`error`) the driver found in the database because its
    # subscription stayed silent for `FaultConfig.confirm_after_s`: status events
    # delayed that long, or lost.
    turn_ends_from_database: int = 0


@dataclass
class Counters:
    """One replica's counters at one moment."""

    statements: dict[str, int]
    flat: dict[str, int]


class ReplicaRunner:
    """Subscribers, drivers and counters of one replica (`Server`)."""

    def __init__(
        self,
        server: Server,
        index: int,
        plan: Plan,
        events: RunnerEvents,
        *,
        st: ScaleTestConfig | None = None,
        fc: FaultConfig | None = None,
        count_statements: bool = True,
        count_publishes: bool = True,
    ) -> None:
        self.server = server
        self.index = index
        self.plan = plan
        self.events = events
        self._st = st or ScaleTestConfig()
        self._fc = fc or FaultConfig()
        self._count_statements = count_statements
        self._count_publishes = count_publishes
        self.owner_id = uuid.UUID(plan.owner_id)
        self.subs: list[_SubState] = []
        self.by_chat: dict[str, list[_SubState]] = {}
        self.views: dict[uuid.UUID, _ChatView] = {}
        self.stats = RunnerStats()
        self.reads_same = 0
        self.reads_cross = 0
        # The drivers' own reads (a turn's end confirmed in the database, a send checked
        # after a failure, the final read): one statement and one round trip each, the
        # harness's cost and not a turn's.
        self.driver_reads = 0
        self.latency_local: list[float] = []
        self.latency_cross: list[float] = []
        self.phase1 = trio.Event()
        self.go = trio.Event()
        self.done = trio.Event()
        self.steady_start: Counters | None = None
        # This process's CPU seconds when the steady phase started and when it was done.
        self.cpu_steady_start: float | None = None
        self.write_waits_at_go = 0
        self.cpu_done: float | None = None
        # The same two moments in wall time: the window the CPU was spent in.
        self.wall_steady_start: float | None = None
        self.wall_done: float | None = None
        self._first_count = 0
        self._done_count = 0
        for i, raw in enumerate(plan.chat_ids):
            chat_id = uuid.UUID(raw)
            for j in range(plan.subscribers_per_chat):
                if (i + j) % plan.replicas == index:
                    sub = _SubState(chat_id, driver=(j == 0))
                    self.subs.append(sub)
                    self.by_chat.setdefault(raw, []).append(sub)
                    self.views.setdefault(chat_id, _ChatView())

    def counters(self) -> Counters:
        """Statement counts and per-turn counters of this replica now."""
        stats = self.server.stats()
        workspace = stats.workspace
        flat = {
            "latest_build_agent_lookups": workspace.latest_build_lookups,
            "agent_lookups": workspace.agent_lookups,
            "dials": workspace.dials,
            "validations": workspace.validations,
            "stream_db_reads_same_replica": self.reads_same,
            "stream_db_reads_cross_replica": self.reads_cross,
            "driver_reads": self.driver_reads,
            "parts_dropped": stats.streams.dropped_buffer + stats.streams.dropped_subscriber,
        }
        # NOTIFYs sent through the pubsub (status, queue, owner and, unless sent in the
        # inserting transaction, message notifies): round trips the statements miss.
        # A pubsub shared by in-process replicas is counted by one of them.
        statistics = getattr(self.server.pubsub, "statistics", None)
        if self._count_publishes and statistics is not None:
            flat["notify_publishes"] = int(statistics().published)
        # Counted at the connections (PostgreSQL only): the store's pool and the pubsub's
        # publishes and LISTEN commands.
        round_trips = getattr(self.server.store, "round_trips", None)
        if callable(round_trips) and round_trips() is not None:
            trips = int(round_trips())
            if statistics is not None and statistics().round_trips is not None:
                trips += int(statistics().round_trips)
            flat["round_trips"] = trips
        statements = dict(stats.statements) if self._count_statements else {}
        return Counters(statements, flat)

    async def run(self) -> None:
        """Subscribe everything, drive home chats; returns once `done` (all received)."""
        self._check_done()
        if not self.subs:
            self.phase1.set()
        async with trio.open_nursery() as nursery:
            for sub in self.subs:
                nursery.start_soon(self._subscriber, sub)
                if sub.driver:
                    nursery.start_soon(self._driver, sub)
            await self.done.wait()
            nursery.cancel_scope.cancel()

    def set_final(self, chat_id: str, last_id: int) -> None:
        """The chat's driver is through: its subscribers finish at message `last_id`."""
        for sub in self.by_chat.get(chat_id, ()):
            if sub.final_id is None:
                sub.final_id = last_id
                self._changed(sub)

    # -- subscribers ----------------------------------------------------------------
    async def _subscriber(self, sub: _SubState) -> None:
        attempt = 0
        while True:
            opened = sub.opened
            try:
                async with self.server.subscribe(self.owner_id, sub.chat_id, sub.cursor) as stream:
                    await self._consume(sub, stream)
            except _Resubscribe:
                pass
            except TRANSIENT as exc:
                # The owner check before subscribing reads the store.
                logger.debug("subscribe failed", extra={"chat_id": str(sub.chat_id), "error": exc})
            self.stats.resubscribes += 1
            # Back off only while subscribing keeps failing before the snapshot.
            attempt = 0 if sub.opened > opened else attempt + 1
            await trio.sleep(backoff(attempt, self._fc))

    async def _consume(self, sub: _SubState, stream: StreamSubscription) -> None:
        """Apply the snapshot, then live events; raises _Resubscribe when it ends."""
        view = self.views[sub.chat_id]
        # The snapshot's status precedes its messages, but describes the chat after them.
        status: StatusEvent | None = None
        while True:
            try:
                event = stream.receive_nowait()
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                raise _Resubscribe from None
            if isinstance(event, StatusEvent):
                status = event
            else:
                self._apply(sub, view, event)
        if status is not None:
            self._apply(sub, view, status)
        sub.opened += 1
        sub.ready.set()
        self._changed(sub)
        async for event in stream:
            self._attribute_reads(sub.chat_id)
            if self._apply(sub, view, event):
                self._changed(sub)
        raise _Resubscribe

    def _attribute_reads(self, chat_id: uuid.UUID) -> None:
        reads = self.server.streams.catchup_reads(chat_id)
        if reads is None:
            return
        view = self.views[chat_id]
        new = reads - view.attributed_reads
        view.attributed_reads = reads
        if new <= 0:
            return
        if view.running_worker == str(self.server.worker_id):
            self.reads_same += new
        else:
            self.reads_cross += new

    def _apply(self, sub: _SubState, view: _ChatView, event: object) -> bool:
        if isinstance(event, StatusEvent):
            sub.pending = event.status is ChatStatus.PENDING
            if event.status is ChatStatus.WAITING:
                sub.waited = sub.answered_user
            if event.status in (ChatStatus.WAITING, ChatStatus.ERROR):
                sub.ended_user = sub.users
                sub.ended_seq += 1
            elif event.status is ChatStatus.RUNNING and event.worker_id is not None:
                view.running_worker = str(event.worker_id)
            return True
        if isinstance(event, MessageEvent):
            self._received(sub, view, event.message)
            return True
        if isinstance(event, ErrorEvent):
            message = event.error.message
            if message in (SNAPSHOT_ERROR, CATCHUP_ERROR) or message.startswith(PUBSUB_ERROR):
                raise _Resubscribe
            if sub.driver:
                self.stats.error_events += 1
            return True
        return False

    def _received(self, sub: _SubState, view: _ChatView, message: Message) -> None:
        sub.received.append(message.id)
        sub.cursor = max(sub.cursor, message.id)
        stored = StoredMessage.from_message(message)
        if stored.is_user_message:
            sub.users += 1
            return
        if message.role is not Role.ASSISTANT:
            return
        if self.go.is_set():
            latency = (time.time() - message.created_at.timestamp()) * 1000.0
            local = view.running_worker == str(self.server.worker_id)
            (self.latency_local if local else self.latency_cross).append(latency)
        if stored.is_answer:
            sub.answered_user = sub.users

    def _changed(self, sub: _SubState) -> None:
        sub.changed.set()
        sub.changed = trio.Event()
        if not sub.saw_first and (
            self._answered(sub, 1) or sub.ended_user >= 1 or sub.final_id is not None
        ):
            sub.saw_first = True
            self._first_count += 1
            if self._first_count == len(self.subs):
                self.phase1.set()
        if not sub.done and sub.final_id is not None and sub.cursor >= sub.final_id:
            sub.done = True
            self._done_count += 1
        self._check_done()

    def _check_done(self) -> None:
        if self._done_count == len(self.subs):
            if not self.done.is_set():
                self.cpu_done = time.process_time()
                self.wall_done = time.perf_counter()
            self.done.set()

    @staticmethod
    def _answered(sub: _SubState, turn: int) -> bool:
        return sub.answered_user >= turn and sub.waited >= turn

    # -- drivers -------------------------------------------------------------------
    async def _driver(self, sub: _SubState) -> None:
        await sub.ready.wait()
        chat = str(sub.chat_id)
        while True:
            turn = sub.users
            self.events.on_turn(chat, turn, await self._turn_over(sub, turn))
            if turn >= self.plan.turns:
                break
            await self.go.wait()
            await self._send(sub, turn + 1)
            while sub.users <= turn:
                await sub.changed.wait()
        messages = await self._read(lambda: self.server.store.messages_after(sub.chat_id, 0))
        self.events.on_chat_done(chat, max((m.id for m in messages), default=0))

    async def _turn_over(self, sub: _SubState, turn: int) -> str:
        """Wait until user message `turn` is answered and the chat `waiting`, or the chat
        stopped otherwise: "answered", "error" or "unanswered"."""
        checked = -1
        while True:
            if self._answered(sub, turn):
                return "answered"
            if sub.users == turn and sub.ended_user >= turn and sub.ended_seq != checked:
                checked = sub.ended_seq
                verdict = await self._confirm_stopped(sub, turn)
                if verdict is not None:
                    return verdict
                continue
            # A chat streamed `pending` waits for a free replica: quiet is expected there.
            fc = self._fc
            quiet_for = fc.confirm_pending_after_s if sub.pending else fc.confirm_after_s
            with trio.move_on_after(quiet_for) as quiet:
                await sub.changed.wait()
            if quiet.cancelled_caught and sub.users == turn:
                # Nothing streamed for a while: a status published after its commit is
                # lost when its replica dies in between, or late after a LISTEN
                # reconnect. The database tells.
                verdict = await self._confirm_stopped(sub, turn)
                if verdict is not None:
                    self.stats.turn_ends_from_database += 1
                    return verdict

    async def _confirm_stopped(self, sub: _SubState, turn: int) -> str | None:
        # A `waiting` published after a commit can arrive late: the database decides.
        chat = await self._read(lambda: self.server.store.get_chat(sub.chat_id))
        if chat.status not in (ChatStatus.WAITING, ChatStatus.ERROR):
            return None
        messages = await self._read(lambda: self.server.store.messages_after(sub.chat_id, 0))
        counts = answer_counts(StoredMessage.from_message(m) for m in messages)
        if counts.users != turn:
            return None
        if chat.status is ChatStatus.ERROR:
            return "error"
        return "answered" if counts.last_answered else "unanswered"

    async def _send(self, sub: _SubState, target: int) -> None:
        """Send user message number `target`, once, whatever the store does meanwhile."""
        attempt = 0
        while True:
            try:
                await self.server.send_message(self.owner_id, sub.chat_id, self._st.user_text)
                return
            except TRANSIENT as exc:
                self.stats.send_retries += 1
                logger.debug("send failed", extra={"chat_id": str(sub.chat_id), "error": exc})
            await trio.sleep(backoff(attempt, self._fc))
            attempt += 1
            # The failed call may have committed: sent (inserted or queued) counts once.
            if await self._sent_count(sub) >= target:
                return

    async def _sent_count(self, sub: _SubState) -> int:
        store = self.server.store
        messages = await self._read(lambda: store.messages_after(sub.chat_id, 0))
        queued = await self._read(lambda: store.list_queued(sub.chat_id))
        users = answer_counts(StoredMessage.from_message(m) for m in messages).users
        return users + len(queued)

    async def _read(self, read: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            self.driver_reads += 1
            try:
                return await read()
            except TRANSIENT as exc:
                self.stats.read_retries += 1
                logger.debug("read failed", extra={"error": exc})
            await trio.sleep(backoff(attempt, self._fc))
            attempt += 1

    # -- phases and the report -----------------------------------------------------
    def start_steady(self) -> None:
        """Snapshot the counters and let the drivers send turn 2."""
        if not self.go.is_set():
            self.steady_start = self.counters()
            self.cpu_steady_start = time.process_time()
            self.wall_steady_start = time.perf_counter()
            reset = getattr(self.server.store, "reset_pool_high_water", None)
            if callable(reset):
                reset()
                self.write_waits_at_go = int(self._pool_stats().get("write_waits", 0))
            self.go.set()

    def _pool_stats(self) -> dict[str, float]:
        pool_stats = getattr(self.server.store, "pool_stats", None)
        return dict(pool_stats()) if callable(pool_stats) else {}

    def report(self) -> dict[str, Any]:
        """Everything the coordinator needs, JSON-ready."""
        end = self.counters()
        start = self.steady_start or Counters({}, {})
        pool = self._pool_stats()
        return {
            "end": asdict(end),
            "steady_start": asdict(start),
            "received": {f"{s.chat_id}/{k}": s.received for k, s in enumerate(self.subs)},
            "latency_local": self.latency_local,
            "latency_cross": self.latency_cross,
            # The high-water mark since the steady phase started (the whole run when the
            # replica was started after it).
            "pool": {
                "size": pool.get("max_size", 0),
                "max_in_use": pool.get("max_in_use", 0),
                "mean_in_use": round(pool.get("mean_in_use", 0.0), 2),
                "p99_in_use": pool.get("p99_in_use", 0),
                "share_at_half_or_more": pool.get("share_at_half_or_more", 0.0),
                # Writes that waited for one of the pool's write slots since the `go`.
                "write_waits": pool.get("write_waits", 0) - self.write_waits_at_go,
                "write_wait_ms": pool.get("write_wait_ms", 0),
                "write_slots_free": pool.get("write_slots_free", 0),
                "in_use_at_end": pool.get("in_use", 0),
                "max_writing": pool.get("max_writing", 0),
                # The whole run: connections the pool opened and retired.
                "connections_opened": pool.get("connections_num", 0),
                "connections_retired": pool.get("connections_retired", 0),
                # The whole run: answers read within the answer wait, and waits that
                # parked the task (PostgresConfig.answer_wait).
                "answers_in_time": pool.get("answers_in_time", 0),
                "answers_parked": pool.get("answers_parked", 0),
            },
            "pid": os.getpid(),
            # CPU seconds of this replica process (the server, its drivers and subscribers)
            # from the steady phase's start to this replica's last subscriber done.
            "steady_cpu_s": (
                round(self.cpu_done - self.cpu_steady_start, 3)
                if self.cpu_done is not None and self.cpu_steady_start is not None
                else None
            ),
            "steady_cpu_window_s": (
                round(self.wall_done - self.wall_steady_start, 3)
                if self.wall_done is not None and self.wall_steady_start is not None
                else None
            ),
            "worker_id": str(self.server.worker_id),
            "turns_finished": self.server.stats().turns_finished,
            "driver": asdict(self.stats),
        }
