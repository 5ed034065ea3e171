"""`chatd-trio scaletest`: many chats, many turns, several replicas, real agents, faults.

Layout. The coordinator (the parent) creates one workspace with a real local agent
(`LocalProvisioner`, running in the coordinator) and N chats bound to the workspace
only (the first turn binds the agent lazily). Each chat's first user message makes it
`pending`, so turn 1 starts at once. Replicas are `Server`s: for `--store memory`
R of them in this process sharing one MemoryStore/MemoryPubSub, for `--store postgres`
R worker processes (`python -m chatd_trio.apps.scaletest worker`) sharing the database.

Data. The command touches only what it creates: on PostgreSQL it works in a database
of its own (`chatd_scale_<random>`, created on the given server and dropped at the
end unless `--keep`), and fault runs use a throwaway cluster (initdb into a temporary
directory, a free port, removed at the end: `chatd_trio.apps._pgcluster`).

Chat i has a home replica i % R; subscriber j of chat i lives on replica
(i + j) % R, so with S >= 2 every chat has subscribers on the replica that runs it
and on others. Subscriber 0 (home) drives the chat. Turn k is over when the driver
has seen user message k answered (an assistant message with text and no tool call)
and `waiting` after that answer, or, when it saw `waiting`/`error` with no answer,
once the database confirms the chat stopped without one. The driver then sends the
next user message through its own replica. Sends and reads that fail on a store error
are retried with backoff (a failed send is checked in the database before it is sent
again) and counted; a subscription that ends on an error is re-opened from its
cursor, so no message is delivered twice. When a chat's last turn is over, its
driver reads the chat's last message id; every subscriber of the chat is finished
once it has received that id.

Phases. Every replica reports when all its subscribers saw turn 1 over; once all
have, the coordinator tells them to go on, and each replica snapshots its counters
just before its drivers send turn 2: `steady_per_turn` is the difference between the
end and that snapshot, divided by the turns 2..M. Workers talk to the coordinator over
the worker channel (`chatd_trio.apps.channel`: `ready`, `turn`, `chat_done`, `phase1`,
`done`, `report`; `go`, `final`, `stop`). A worker stops on SIGTERM (or `stop`, or
EOF): it closes its `Server`, which hands running chats back as `pending`, and reports.

Faults (`--fault`, PostgreSQL only) are injected once, when a third of the turns are
over: `sigkill` kills the replica running the most chats (a process manager would
restart it: the coordinator starts a replacement at once), `sigstop` pauses it past
`stale_after` and resumes it, `pool_kill` terminates its store pool's sessions (found
by `application_name`: each replica has its own), `listen_kill` terminates every
replica's LISTEN session, `pg_restart` restarts the cluster, `outage` stops it for
`--outage-seconds`. The run ends when every chat's last turn is over, or when no turn
ended for `--stall-timeout` seconds, or at `--deadline`; then the workers stop and the
counts are read from the database (`reliability`): turns errored, duplicate answers
(`answer_counts`), writes by a stale ownership token (a trigger installed in the
run's own database: `install_witness`), chats left running, and what each fault did.

Stream database reads are attributed per replica and chat: a catch-up read counted
by the replica's `ChatStreams` is "same replica" when the latest `running` status its
subscribers saw names this replica, else "cross replica". Fan-out latency is the time
from a message's `created_at` (store clock, same machine) to its delivery to a
subscriber, for assistant messages of turns 2..M. Lost and duplicated messages come
from comparing what every subscriber received with the chat's user-visible messages
up to the id its driver read at the end; messages written after that are
`writes_after_finish`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
import trio
from psycopg import sql
from psycopg.conninfo import make_conninfo

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio._groups import leaves
from chatd_trio.apps.channel import (
    WORKER,
    JsonLines,
    emit,
    encode,
    replica_process_settings,
    stdin_lines,
    worker_command,
)
from chatd_trio.config import (
    AcquireConfig,
    Config,
    PostgresConfig,
    PubSubConfig,
    ScaleTestConfig,
    StreamConfig,
)
from chatd_trio.domain import (
    JSON,
    ChatStatus,
    ErrorEvent,
    Message,
    MessageEvent,
    Role,
    StatusEvent,
    TextPart,
    ToolCallPart,
    text_of,
)
from chatd_trio.errors import ChatdError, PubSubError, StoreError
from chatd_trio.models.scripted import ScriptedModel, ToolsThenAnswer
from chatd_trio.pubsub.auth import NotifyAuth, new_key_text
from chatd_trio.pubsub.base import PubSub
from chatd_trio.server import Server
from chatd_trio.store.base import Store
from chatd_trio.strategies import (
    AgentResolution,
    Announce,
    CatchUp,
    Strategies,
    SubagentWake,
    ToolCalls,
)
from chatd_trio.streams import CATCHUP_ERROR, PUBSUB_ERROR, SNAPSHOT_ERROR, StreamSubscription

logger = logging.getLogger(__name__)

T = TypeVar("T")

PER_TURN_KEYS = (
    "statements",
    "round_trips",
    "latest_build_agent_lookups",
    "agent_lookups",
    "stream_db_reads_same_replica",
    "stream_db_reads_cross_replica",
    "dials",
    "validations",
    "notify_publishes",
    "driver_reads",
)

FAULTS = ("sigkill", "sigstop", "pg_restart", "pool_kill", "listen_kill", "outage")
# Faults that stop or restart PostgreSQL itself: never on a server the command did not start.
CLUSTER_FAULTS = frozenset({"pg_restart", "outage"})
CLUSTERS = ("auto", "throwaway", "dsn")
# Store errors a driver rides out; anything else is a bug of the run and ends it.
TRANSIENT = (StoreError, PubSubError)


class ScaleTestError(ChatdError):
    """A scale test cannot run as asked (bad flags, a replica that does not start)."""


@dataclass(frozen=True)
class FaultConfig:
    """Timings of the scale test's fault runs and of its store-error-tolerant driver."""

    # Injected once a third of the turns are over: warmed up, two thirds left to recover.
    inject_at_fraction: float = 1 / 3
    # A driver whose chat streamed nothing for 5 s asks the database whether the turn
    # ended (healthy turns here take milliseconds; a lost status notify never arrives).
    confirm_after_s: float = 5.0
    # Driver retries: 50 ms doubling to 2 s, so a 15 s outage costs ~12 attempts per chat.
    retry_initial_s: float = 0.05
    retry_max_s: float = 2.0
    # SIGSTOP lasts 1.5 x stale_after + one heartbeat: past the stale threshold plus at
    # least two recovery passes of the other replica (every stale_after / 5).
    pause_factor: float = 1.5
    # The default stall timeout: 2 x stale_after + 30 s (+ the outage): a killed
    # replica's chats are recovered after stale_after, plus slack for the turn itself.
    stall_factor: float = 2.0
    stall_slack_s: float = 30.0
    # Subscribers get this long to receive every message once the drivers are through.
    drain_timeout_s: float = 60.0
    # A worker imports, connects and serves within this, else the run fails.
    start_timeout_s: float = 60.0
    # A replica that dies on its own is replaced, at most this often per run.
    max_respawns: int = 5
    # After SIGTERM a worker closes its Server (each turn's final write is bounded by
    # LoopConfig.cleanup_timeout, 10 s) and reports; killed after this.
    stop_timeout_s: float = 30.0
    # Final reads and the database drop wait this long for PostgreSQL (after an outage).
    db_ready_timeout_s: float = 60.0
    # Shielded cleanups (stopping the replicas, reaping one, restarting PostgreSQL after
    # an outage, dropping the database, removing the cluster) give up after this: twice
    # the longest of them (stop_timeout_s, db_ready_timeout_s), so a stopped run ends.
    cleanup_timeout_s: float = 120.0
    db_ready_interval_s: float = 0.2
    # Names: application_name prefix of the replicas' sessions, database name prefix,
    # and the side table of the stale-token witness.
    application_prefix: str = "chatd_scale"
    database_prefix: str = "chatd_scale_"
    witness_table: str = "scaletest_stale_writes"


@dataclass(frozen=True)
class Plan:
    """What one run does (shared by the coordinator and every replica)."""

    store: str
    dsn: str
    replicas: int
    chats: int
    turns: int
    tools_per_turn: int
    subscribers_per_chat: int
    model_latency_ms: float = 0.0
    baseline: bool = False
    tool: str = ScaleTestConfig.tool_name
    owner_id: str = ""
    chat_ids: tuple[str, ...] = ()
    stale_after: float = AcquireConfig.stale_after
    heartbeat: float = AcquireConfig.heartbeat_interval
    fault: str = ""
    outage_s: float = 15.0
    cluster: str = "auto"
    keep: bool = False
    deadline_s: float = ScaleTestConfig.run_timeout_s
    # 0: the default, `stall_timeout(plan)`.
    stall_s: float = 0.0
    # Names this run's sessions (application_name) so faults find one replica's.
    run_id: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw = json.loads(text)
        raw["chat_ids"] = tuple(raw["chat_ids"])
        return cls(**raw)

    @property
    def throwaway(self) -> bool:
        """True when the run starts its own PostgreSQL cluster."""
        return self.cluster == "throwaway" or (self.cluster == "auto" and bool(self.fault))

    def validate(self) -> None:
        """Raise ScaleTestError on a plan that cannot run."""
        if self.turns < 2 or self.replicas < 1 or self.chats < 1:
            raise ScaleTestError("a scale test needs turns >= 2, replicas >= 1 and chats >= 1")
        if self.subscribers_per_chat < 1 or self.tools_per_turn < 0:
            raise ScaleTestError("a scale test needs subscribers >= 1 and tools >= 0")
        if not (0 < self.heartbeat < self.stale_after):
            raise ScaleTestError("--heartbeat must be positive and below --stale-after")
        if self.cluster not in CLUSTERS:
            raise ScaleTestError(f"--cluster must be one of {', '.join(CLUSTERS)}")
        if self.fault and self.fault not in FAULTS:
            raise ScaleTestError(f"--fault must be one of {', '.join(FAULTS)}")
        if self.fault and self.store != "postgres":
            raise ScaleTestError("--fault needs --store postgres")
        if self.fault in CLUSTER_FAULTS and not self.throwaway:
            raise ScaleTestError(
                f"--fault {self.fault} stops PostgreSQL: it runs on a throwaway cluster only"
            )
        if self.throwaway and self.store != "postgres":
            raise ScaleTestError("--cluster throwaway needs --store postgres")
        if self.outage_s <= 0 or self.deadline_s <= 0 or self.stall_s < 0:
            raise ScaleTestError(
                "--outage-seconds and --deadline must be > 0, --stall-timeout >= 0"
            )


def stall_timeout(plan: Plan, fc: FaultConfig | None = None) -> float:
    """Seconds without any turn ending after which the run gives up waiting."""
    if plan.stall_s:
        return plan.stall_s
    fc = fc or FaultConfig()
    outage = plan.outage_s if plan.fault == "outage" else 0.0
    return fc.stall_factor * plan.stale_after + fc.stall_slack_s + outage


def store_application_name(plan: Plan, index: int) -> str:
    """The `application_name` of replica `index`'s store pool sessions."""
    return f"{FaultConfig.application_prefix}-{plan.run_id}-r{index}"


def pubsub_application_name(plan: Plan, index: int) -> str:
    """The prefix of replica `index`'s pubsub sessions (`...-listen-*`, `...-publish-*`)."""
    return f"{store_application_name(plan, index)}-pubsub"


#: `--baseline`: every plain way (`chatd_trio.strategies`), what the optimisations are
#: measured against.
BASELINE = Strategies(
    tool_calls=ToolCalls.SEQUENTIAL,
    catch_up=CatchUp.DATABASE,
    announce=Announce.AFTER_COMMIT,
    agent_resolution=AgentResolution.PER_CALL,
    subagent_wake=SubagentWake.POLL,
)


def replica_strategies(plan: Plan) -> Strategies:
    """The replicas' strategies: the optimised defaults, or with `--baseline` `BASELINE`."""
    return BASELINE if plan.baseline else Strategies()


def replica_config(plan: Plan, st: ScaleTestConfig | None = None) -> Config:
    """The replicas' configuration; with `--baseline` notifies carry no message either."""
    st = st or ScaleTestConfig()
    config = Config(
        acquire=AcquireConfig(
            acquire_interval=st.acquire_interval_s,
            heartbeat_interval=plan.heartbeat,
            stale_after=plan.stale_after,
        )
    )
    if not plan.baseline:
        return config
    # A deployment may choose this one (docs/security.md): configuration, not a strategy.
    return config.replace(streams=StreamConfig(notify_carries_messages=False))


def scripted_model(plan: Plan, st: ScaleTestConfig | None = None) -> ScriptedModel:
    """Every turn: K calls of the chosen workspace tool in one step, then the answer."""
    st = st or ScaleTestConfig()
    arguments: JSON = {"command": st.execute_command} if plan.tool == "execute" else {}
    return ScriptedModel(
        ToolsThenAnswer(
            calls=plan.tools_per_turn,
            tool_name=plan.tool,
            arguments=arguments,
            text=st.final_text,
            latency=plan.model_latency_ms / 1000.0,
        )
    )


def _backoff(attempt: int, fc: FaultConfig) -> float:
    return float(min(fc.retry_initial_s * 2**attempt, fc.retry_max_s))


# -- answers: what counts as one, twice, or none ---------------------------------------


@dataclass(frozen=True)
class StoredMessage:
    """The fields of a stored message the reliability counts look at."""

    id: int
    role: str
    part_types: tuple[str, ...]
    text: str
    compressed: bool
    user_visible: bool

    @classmethod
    def from_message(cls, m: Message) -> StoredMessage:
        return cls(
            m.id,
            m.role.value,
            tuple(p.type for p in m.parts),
            text_of(m.parts),
            m.compressed,
            m.user_visible,
        )

    @classmethod
    def from_row(
        cls, id_: int, role: str, content: Any, visibility: str, compressed: bool
    ) -> StoredMessage:
        parts = content if isinstance(content, list) else []
        types = tuple(str(p.get("type")) for p in parts if isinstance(p, dict))
        text = "".join(
            str(p.get("text", ""))
            for p in parts
            if isinstance(p, dict) and p.get("type") == TextPart.type
        )
        return cls(id_, role, types, text, compressed, visibility in ("user", "both"))

    @property
    def is_answer(self) -> bool:
        """An assistant message without tool calls and with non-blank text."""
        return (
            self.role == Role.ASSISTANT.value
            and not self.compressed
            and ToolCallPart.type not in self.part_types
            and bool(self.text.strip())
        )

    @property
    def is_user_message(self) -> bool:
        """A user's message (the compaction summary, stored as a compressed user
        message, is not one)."""
        return self.role == Role.USER.value and not self.compressed


@dataclass(frozen=True)
class AnswerCounts:
    """Answers to the user messages of one chat."""

    users: int = 0
    answered: int = 0
    unanswered: int = 0
    duplicates: int = 0
    last_answered: bool = False


def answer_counts(messages: Iterable[StoredMessage]) -> AnswerCounts:
    """Count answers per user message in one chat's non-deleted messages (id order).

    A user message is answered by the answers (`StoredMessage.is_answer`) before the
    next user message. Each answer after the first is a duplicate, except the first
    answer after a compaction (any compressed message): that is the loop's re-entry.
    """
    users = answered = unanswered = duplicates = 0
    in_turn = turn_answered = False
    since_boundary = 0
    for m in messages:
        if m.is_user_message:
            if in_turn:
                answered += turn_answered
                unanswered += not turn_answered
            users += 1
            in_turn, turn_answered, since_boundary = True, False, 0
        elif m.compressed:
            since_boundary = 0
        elif m.is_answer and in_turn:
            if since_boundary >= 1:
                duplicates += 1
            since_boundary += 1
            turn_answered = True
    if in_turn:
        answered += turn_answered
        unanswered += not turn_answered
    return AnswerCounts(users, answered, unanswered, duplicates, in_turn and turn_answered)


# -- one replica's subscribers and drivers ------------------------------------------


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
            await trio.sleep(_backoff(attempt, self._fc))

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
        chat_stats = self.server.streams.chat_statistics(chat_id)
        view = self.views[chat_id]
        if chat_stats is None:
            return
        new = chat_stats.db_catchup_reads - view.attributed_reads
        view.attributed_reads = chat_stats.db_catchup_reads
        if new <= 0:
            return
        if view.running_worker == str(self.server.worker_id):
            self.reads_same += new
        else:
            self.reads_cross += new

    def _apply(self, sub: _SubState, view: _ChatView, event: object) -> bool:
        if isinstance(event, StatusEvent):
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
            with trio.move_on_after(self._fc.confirm_after_s) as quiet:
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
            await trio.sleep(_backoff(attempt, self._fc))
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
            await trio.sleep(_backoff(attempt, self._fc))
            attempt += 1

    # -- phases and the report -----------------------------------------------------
    def start_steady(self) -> None:
        """Snapshot the counters and let the drivers send turn 2."""
        if not self.go.is_set():
            self.steady_start = self.counters()
            reset = getattr(self.server.store, "reset_pool_high_water", None)
            if callable(reset):
                reset()
            self.go.set()

    def report(self) -> dict[str, Any]:
        """Everything the coordinator needs, JSON-ready."""
        end = self.counters()
        start = self.steady_start or Counters({}, {})
        pool: dict[str, float] = {}
        pool_stats = getattr(self.server.store, "pool_stats", None)
        if callable(pool_stats):
            pool = dict(pool_stats())
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
            },
            "pid": os.getpid(),
            "worker_id": str(self.server.worker_id),
            "turns_finished": self.server.stats().turns_finished,
            "driver": asdict(self.stats),
        }


# -- the coordinator's bookkeeping ------------------------------------------------------


class _Progress:
    """Turns over and chats through, as the drivers report them (deduplicated: a
    replacement replica's drivers report again what its predecessor reported)."""

    def __init__(self, plan: Plan, tick: Callable[[], None]) -> None:
        self.plan = plan
        self._tick = tick
        self.turns: dict[tuple[str, int], str] = {}
        self.finals: dict[str, int] = {}
        # Chats whose final id came from the end of the run, not from their driver.
        self.forced: set[str] = set()
        self.changed = trio.Event()
        self.last_progress = trio.current_time()
        self.started = time.monotonic()

    def bump(self) -> None:
        self.last_progress = trio.current_time()
        self.changed.set()
        self.changed = trio.Event()

    def turn(self, chat_id: str, turn: int, outcome: str) -> None:
        if (chat_id, turn) in self.turns:
            return
        self.turns[(chat_id, turn)] = outcome
        self._tick()
        self.bump()

    def final(self, chat_id: str, last_id: int) -> bool:
        """Record the chat's last message id; False when it was already known."""
        if chat_id in self.finals:
            return False
        self.finals[chat_id] = last_id
        self.bump()
        return True

    async def wait_turns(self, count: int) -> None:
        while len(self.turns) < count:
            await self.changed.wait()

    async def watch(self, all_done: Callable[[], bool], stall_s: float, deadline: float) -> str:
        """ "done", or "stalled" (nothing for `stall_s`), or "deadline" (trio time)."""
        while not all_done():
            now = trio.current_time()
            if now >= deadline:
                return "deadline"
            if now - self.last_progress >= stall_s:
                return "stalled"
            with trio.move_on_at(min(deadline, self.last_progress + stall_s)):
                await self.changed.wait()
        return "done"


async def _setup(store: Store, plan: Plan, provisioner: Any, st: ScaleTestConfig) -> Plan:
    owner = uuid.uuid4()
    ws = await provisioner.create(owner, st.workspace_name)
    ids = []
    for i in range(plan.chats):
        chat, _ = await store.create_chat(
            owner, f"scale {i}", (TextPart(st.user_text),), workspace_id=ws.id
        )
        ids.append(str(chat.id))
    return dataclasses.replace(plan, owner_id=str(owner), chat_ids=tuple(ids))


def _percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, math.ceil(p / 100.0 * len(ordered)) - 1)
    return round(ordered[k], 3)


def _sum_dicts(dicts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def _diff(end: dict[str, int], start: dict[str, int]) -> dict[str, int]:
    return {k: v - start.get(k, 0) for k, v in end.items() if v - start.get(k, 0)}


# -- what the database holds at the end -----------------------------------------------


@dataclass
class Facts:
    """The run's chats as stored at the end (non-deleted messages in id order)."""

    statuses: dict[str, str]
    messages: dict[str, list[StoredMessage]]
    stale_writes: int | None = None
    witness: str = "unavailable: the memory store has no ownership tokens"


async def memory_facts(store: Store, chat_ids: Sequence[str]) -> Facts:
    """`Facts` read through the store (the memory store has no SQL)."""
    statuses: dict[str, str] = {}
    messages: dict[str, list[StoredMessage]] = {}
    for raw in chat_ids:
        chat_id = uuid.UUID(raw)
        statuses[raw] = (await store.get_chat(chat_id)).status.value
        rows = await store.messages_after(chat_id, 0)
        messages[raw] = [StoredMessage.from_message(m) for m in rows]
    return Facts(statuses, messages)


_WITNESS_COLUMNS = """
SELECT count(*) FROM information_schema.columns
 WHERE table_schema = current_schema() AND column_name = 'owner_token'
   AND table_name IN ('chats', 'chat_messages')
"""

# Every insert into chat_messages carrying an ownership token other than the chat row's
# current one is recorded: the library's own guard is what is being checked, so the
# witness reads the row itself, after the insert, in the inserting transaction.
_WITNESS_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    id             bigserial PRIMARY KEY,
    chat_id        uuid NOT NULL,
    message_id     bigint NOT NULL,
    role           text NOT NULL,
    message_token  bigint NOT NULL,
    chat_token     bigint,
    at             timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    current_token bigint;
BEGIN
    IF NEW.owner_token IS NOT NULL THEN
        SELECT owner_token INTO current_token FROM chats WHERE id = NEW.chat_id;
        IF current_token IS DISTINCT FROM NEW.owner_token THEN
            INSERT INTO {table} (chat_id, message_id, role, message_token, chat_token)
            VALUES (NEW.chat_id, NEW.id, NEW.role, NEW.owner_token, current_token);
        END IF;
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS {trigger} ON chat_messages;
CREATE TRIGGER {trigger} AFTER INSERT ON chat_messages
    FOR EACH ROW EXECUTE FUNCTION {function}();
"""


def install_witness(dsn: str, fc: FaultConfig | None = None) -> str:
    """Install the stale-token witness in the database at `dsn` (the run's own).

    Only when both `chats.owner_token` and `chat_messages.owner_token` exist: a trigger
    naming a missing column would fail every insert. Returns "installed" or why not.
    Idempotent. Synchronous: run it in a thread.
    """
    fc = fc or FaultConfig()
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(_WITNESS_COLUMNS).fetchone()
        if row is None or row[0] < 2:
            return "unavailable: the schema has no chats/chat_messages.owner_token"
        names = {
            "table": sql.Identifier(fc.witness_table),
            "function": sql.Identifier(f"{fc.witness_table}_record"),
            "trigger": sql.Identifier(f"{fc.witness_table}_witness"),
        }
        with conn.transaction():
            conn.execute(sql.SQL(_WITNESS_DDL).format(**names))
    return "installed"


def postgres_facts(dsn: str, chat_ids: Sequence[str], fc: FaultConfig | None = None) -> Facts:
    """`Facts` read with SQL from the database at `dsn` (synchronous: run in a thread)."""
    fc = fc or FaultConfig()
    ids = [uuid.UUID(c) for c in chat_ids]
    with psycopg.connect(dsn, autocommit=True) as conn:
        statuses = {
            str(r[0]): str(r[1])
            for r in conn.execute("SELECT id, status FROM chats WHERE id = ANY(%s)", (ids,))
        }
        messages: dict[str, list[StoredMessage]] = {c: [] for c in chat_ids}
        rows = conn.execute(
            "SELECT chat_id, id, role, content, visibility, compressed FROM chat_messages"
            " WHERE chat_id = ANY(%s) AND NOT deleted ORDER BY chat_id, id",
            (ids,),
        )
        for chat_id, id_, role, content, visibility, compressed in rows:
            messages[str(chat_id)].append(
                StoredMessage.from_row(id_, role, content, visibility, compressed)
            )
        table = conn.execute("SELECT to_regclass(%s)", (fc.witness_table,)).fetchone()
        if table is None or table[0] is None:
            return Facts(statuses, messages, None, "unavailable: witness not installed")
        stale = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE chat_id = ANY(%s)").format(
                sql.Identifier(fc.witness_table)
            ),
            (ids,),
        ).fetchone()
        return Facts(statuses, messages, int(stale[0]) if stale else 0, "installed")


async def _wait_for(call: Callable[[], T], fc: FaultConfig) -> T:
    """Run a synchronous database call in a thread, retrying while PostgreSQL is down."""
    deadline = trio.current_time() + fc.db_ready_timeout_s
    while True:
        try:
            return await trio.to_thread.run_sync(call)
        except psycopg.OperationalError:
            if trio.current_time() >= deadline:
                raise
        await trio.sleep(fc.db_ready_interval_s)


# -- the summary --------------------------------------------------------------------------


def _durable(
    facts: Facts, finals: Mapping[str, int], reports: Sequence[dict[str, Any]]
) -> dict[str, int]:
    want: dict[str, list[int]] = {}
    late = 0
    for raw, stored in facts.messages.items():
        visible = [m.id for m in stored if m.user_visible]
        final = finals.get(raw)
        want[raw] = [i for i in visible if final is None or i <= final]
        late += len(visible) - len(want[raw])
    published = delivered = lost = duplicated = 0
    for report in reports:
        for key, ids in report["received"].items():
            expected = want[key.split("/")[0]]
            published += len(expected)
            delivered += len(set(ids) & set(expected))
            lost += len(set(expected) - set(ids))
            duplicated += len(ids) - len(set(ids))
    return {
        "durable_published": published,
        "durable_delivered": delivered,
        "durable_lost": lost,
        "durable_duplicated": duplicated,
        "writes_after_finish": late,
    }


def _reliability(
    plan: Plan,
    facts: Facts,
    counts: Mapping[str, AnswerCounts],
    durable: Mapping[str, int],
    progress: _Progress,
    outcome: str,
    workers: Sequence[dict[str, Any]],
    reports: Sequence[dict[str, Any]],
    faults: Sequence[dict[str, Any]],
    crashes: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    statuses = list(facts.statuses.values())
    driver = _sum_dicts(r["driver"] for r in reports)
    by_source = {
        "chats_in_error": statuses.count(ChatStatus.ERROR.value),
        "workers_turns_finished_error": sum(
            int(r["turns_finished"].get("error", 0)) for r in reports
        ),
        "error_events_seen": driver.get("error_events", 0),
        "drivers_saw_error": sum(1 for o in progress.turns.values() if o == "error"),
    }
    return {
        "fault": plan.fault or None,
        "faults": list(faults),
        "outcome": outcome,
        # Each source misses some (a killed worker's counters, a dropped subscription,
        # a later turn clearing the chat's error): the largest is a lower bound.
        "turns_errored": max(by_source.values()),
        "turns_errored_by_source": by_source,
        "turns_unanswered": sum(c.unanswered for c in counts.values()),
        "duplicate_answers": sum(c.duplicates for c in counts.values()),
        "stale_token_writes": facts.stale_writes,
        "stale_token_witness": facts.witness,
        "chats_left_running": statuses.count(ChatStatus.RUNNING.value),
        # Replicas that died on their own (each replaced by the coordinator).
        "replica_crashes": list(crashes),
        "chat_status": {s: statuses.count(s) for s in sorted(set(statuses))},
        "durable_lost": durable["durable_lost"],
        "durable_duplicated": durable["durable_duplicated"],
        "writes_after_finish": durable["writes_after_finish"],
        "chats_unfinished": len(progress.forced),
        "turn_ends_from_database": driver.get("turn_ends_from_database", 0),
        "driver": {k: driver.get(k, 0) for k in ("send_retries", "read_retries", "resubscribes")},
        "stale_after_s": plan.stale_after,
        "heartbeat_s": plan.heartbeat,
        "workers": list(workers),
    }


def _summarise(
    plan: Plan,
    facts: Facts,
    progress: _Progress,
    outcome: str,
    reports: Sequence[dict[str, Any]],
    wall_s: float,
    statements_end: dict[str, int],
    statements_steady: dict[str, int],
    *,
    workers: Sequence[dict[str, Any]],
    faults: Sequence[dict[str, Any]] = (),
    crashes: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    counts = {raw: answer_counts(stored) for raw, stored in facts.messages.items()}
    turns_completed = sum(c.answered for c in counts.values())
    durable = _durable(facts, progress.finals, reports)
    end_flat = _sum_dicts(r["end"]["flat"] for r in reports)
    start_flat = _sum_dicts(r["steady_start"]["flat"] for r in reports)
    total_turns = plan.chats * plan.turns
    steady_turns = plan.chats * (plan.turns - 1)

    def per_turn(statements: dict[str, int], flat: dict[str, int], turns: int) -> dict[str, float]:
        out = {"statements": sum(statements.values())}
        out.update({k: flat.get(k, 0) for k in PER_TURN_KEYS if k != "statements"})
        if "round_trips" in flat:
            # What the turns cost on the wire, the drivers' own reads set apart.
            out["turn_round_trips"] = flat["round_trips"] - flat.get("driver_reads", 0)
        return {k: round(v / turns, 3) if turns else 0.0 for k, v in out.items()}

    steady_flat = {k: end_flat.get(k, 0) - start_flat.get(k, 0) for k in end_flat}
    local = [x for r in reports for x in r["latency_local"]]
    cross = [x for r in reports for x in r["latency_cross"]]
    return {
        "store": plan.store,
        "baseline": plan.baseline,
        "chats": plan.chats,
        "turns": plan.turns,
        "replicas": plan.replicas,
        "tools_per_turn": plan.tools_per_turn,
        "tool": plan.tool,
        "subscribers_per_chat": plan.subscribers_per_chat,
        "model_latency_ms": plan.model_latency_ms,
        "turns_completed": turns_completed,
        "wall_s": round(wall_s, 3),
        "turns_per_s": round(turns_completed / wall_s, 3) if wall_s > 0 else 0.0,
        "statements": statements_end,
        "steady_statements": statements_steady,
        "per_turn": per_turn(statements_end, end_flat, total_turns),
        "steady_per_turn": per_turn(statements_steady, steady_flat, steady_turns),
        "events": {
            **{k: v for k, v in durable.items() if k != "writes_after_finish"},
            "parts_dropped": end_flat.get("parts_dropped", 0),
        },
        "latency_ms": {
            "local_fanout_p50": _percentile(local, 50),
            "local_fanout_p99": _percentile(local, 99),
            "cross_replica_fanout_p50": _percentile(cross, 50),
            "cross_replica_fanout_p99": _percentile(cross, 99),
            # Subagents are not part of this workload: see benchmarks/subagent_wake.py.
            "subagent_wake_p50": None,
        },
        "db_pool": {
            "size": max((r["pool"]["size"] for r in reports), default=0),
            "max_in_use": max((r["pool"]["max_in_use"] for r in reports), default=0),
            # Per replica, during the steady phase (turns 2..M): the high-water mark, the
            # time-weighted mean and 99th percentile of the connections in use, and the
            # share of the time with half the pool or more in use.
            "steady_max_in_use_per_replica": [r["pool"]["max_in_use"] for r in reports],
            "steady_mean_in_use_per_replica": [r["pool"].get("mean_in_use", 0.0) for r in reports],
            "steady_p99_in_use_per_replica": [r["pool"].get("p99_in_use", 0) for r in reports],
            "steady_share_at_half_or_more_per_replica": [
                r["pool"].get("share_at_half_or_more", 0.0) for r in reports
            ],
        },
        "reliability": _reliability(
            plan, facts, counts, durable, progress, outcome, workers, reports, faults, crashes
        ),
    }


@asynccontextmanager
async def _progress_bar(total: int, enabled: bool) -> AsyncIterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True, console=_stderr_console()) as progress:
        task = progress.add_task("turns", total=total)
        yield lambda: progress.advance(task)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


# -- memory: in-process replicas ------------------------------------------------------------


class _MemoryEvents:
    def __init__(self, progress: _Progress) -> None:
        self.progress = progress
        self.runners: list[ReplicaRunner] = []

    def on_turn(self, chat_id: str, turn: int, outcome: str) -> None:
        self.progress.turn(chat_id, turn, outcome)

    def on_chat_done(self, chat_id: str, last_id: int) -> None:
        if self.progress.final(chat_id, last_id):
            for runner in self.runners:
                runner.set_final(chat_id, last_id)


async def _finish_unfinished(
    plan: Plan,
    progress: _Progress,
    last_ids: Callable[[Sequence[str]], Awaitable[dict[str, int]]],
    deliver: Callable[[str, int], None],
) -> None:
    """The run ended before some drivers were through: their chats end at the last
    message stored now, and the subscribers get that far."""
    missing = [c for c in plan.chat_ids if c not in progress.finals]
    if not missing:
        return
    for chat_id, last_id in (await last_ids(missing)).items():
        progress.forced.add(chat_id)
        if progress.final(chat_id, last_id):
            deliver(chat_id, last_id)


async def run_memory(plan: Plan, *, progress: bool = False) -> dict[str, Any]:
    """R in-process replicas sharing one MemoryStore/MemoryPubSub."""
    from chatd_trio.agent import dial_agent
    from chatd_trio.agent.local import LocalProvisioner
    from chatd_trio.pubsub.memory import MemoryPubSub
    from chatd_trio.store.memory import MemoryStore

    st = ScaleTestConfig()
    fc = FaultConfig()
    pubsub = MemoryPubSub()
    store = MemoryStore(pubsub=pubsub)
    config = replica_config(plan, st)
    with tempfile.TemporaryDirectory(prefix="chatd-scale-") as tmp:
        async with trio.open_nursery() as agents:
            provisioner = LocalProvisioner(store, agents, Path(tmp), config=config)
            plan = await _setup(store, plan, provisioner, st)
            base = store.statement_counts()
            steady_base = base
            started = time.monotonic()
            async with (
                _progress_bar(plan.chats * plan.turns, progress) as tick,
                AsyncExitStack() as stack,
            ):
                tracker = _Progress(plan, tick)
                events = _MemoryEvents(tracker)
                for index in range(plan.replicas):
                    server = await stack.enter_async_context(
                        Server(
                            store,
                            pubsub,
                            scripted_model(plan, st),
                            config,
                            dialer=dial_agent,
                            strategies=replica_strategies(plan),
                        )
                    )
                    # One shared store: its statement counts are taken once, below.
                    events.runners.append(
                        ReplicaRunner(
                            server,
                            index,
                            plan,
                            events,
                            st=st,
                            fc=fc,
                            count_statements=False,
                            count_publishes=index == 0,
                        )
                    )
                runners = events.runners

                async def phases() -> None:
                    nonlocal steady_base
                    for r in runners:
                        await r.phase1.wait()
                    steady_base = store.statement_counts()
                    for r in runners:
                        r.start_steady()

                async def bump_when_done(r: ReplicaRunner) -> None:
                    await r.done.wait()
                    tracker.bump()

                async def last_ids(chats: Sequence[str]) -> dict[str, int]:
                    out = {}
                    for c in chats:
                        rows = await store.messages_after(uuid.UUID(c), 0)
                        out[c] = max((m.id for m in rows), default=0)
                    return out

                def deliver(chat_id: str, last_id: int) -> None:
                    for r in runners:
                        r.set_final(chat_id, last_id)

                def all_done() -> bool:
                    return all(r.done.is_set() for r in runners)

                deadline = trio.current_time() + plan.deadline_s
                async with trio.open_nursery() as nursery:
                    for r in runners:
                        nursery.start_soon(r.run)
                        nursery.start_soon(bump_when_done, r)
                    nursery.start_soon(phases)
                    outcome = await tracker.watch(all_done, stall_timeout(plan, fc), deadline)
                    if outcome != "done":
                        await _finish_unfinished(plan, tracker, last_ids, deliver)
                        tracker.bump()
                        await tracker.watch(all_done, fc.drain_timeout_s, math.inf)
                    nursery.cancel_scope.cancel()
                wall = time.monotonic() - started
                end = store.statement_counts()
            # The servers are closed: running turns were handed back.
            reports = [r.report() for r in runners]
            workers = [
                {"replica": r.index, "pid": os.getpid(), "exit_code": None, "reported": True}
                for r in runners
            ]
            await provisioner.aclose()
            agents.cancel_scope.cancel()
    facts = await memory_facts(store, plan.chat_ids)
    return _summarise(
        plan,
        facts,
        tracker,
        outcome,
        reports,
        wall,
        _diff(end, base),
        _diff(end, steady_base),
        workers=workers,
    )


# -- PostgreSQL: the run's database, worker processes, faults -----------------------------


@dataclass
class _Database:
    admin_dsn: str
    dsn: str
    name: str
    cluster: Any  # chatd_trio.apps._pgcluster.Cluster | None


def _create_database(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(admin_dsn, dbname=name)


def _drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@asynccontextmanager
async def _database(plan: Plan, fc: FaultConfig) -> AsyncIterator[_Database]:
    """A database of the run's own: on a throwaway cluster or on the `--dsn` server.
    Dropped (and the cluster removed) at the end unless `plan.keep`."""
    from chatd_trio.apps._pgcluster import Cluster, ClusterError

    cluster: Cluster | None = None
    admin = plan.dsn
    if plan.throwaway:
        try:
            cluster = await trio.to_thread.run_sync(Cluster.create)
        except ClusterError as exc:
            raise ScaleTestError(f"cannot start a throwaway PostgreSQL cluster: {exc}") from exc
        admin = cluster.dsn
    try:
        name = f"{fc.database_prefix}{uuid.uuid4().hex[:10]}"
        try:
            dsn = await trio.to_thread.run_sync(_create_database, admin, name)
        except psycopg.Error as exc:
            raise ScaleTestError(f"cannot create the run's database {name}: {exc}") from exc
        try:
            yield _Database(admin, dsn, name, cluster)
        finally:
            if plan.keep:
                print(f"kept database: {dsn}", file=sys.stderr)
            else:
                with bounded_cleanup(fc.cleanup_timeout_s):
                    await _wait_for(functools.partial(_drop_database, admin, name), fc)
    finally:
        if cluster is not None:
            if plan.keep:
                print(
                    f"kept cluster: {cluster.datadir} (stop it with: "
                    f"{' '.join(cluster.as_postgres)} {cluster.bindir}/pg_ctl "
                    f"-D {cluster.datadir} stop; then remove the directory)",
                    file=sys.stderr,
                )
            else:
                with bounded_cleanup(fc.cleanup_timeout_s):
                    await trio.to_thread.run_sync(cluster.remove)


@dataclass
class _Worker:
    index: int
    proc: trio.Process
    outbox: trio.MemorySendChannel[bytes]
    worker_id: str = ""
    report: dict[str, Any] | None = None
    phase1: bool = False
    done: bool = False
    fault: str = ""
    # Killed or stopped by the coordinator: not a crash.
    expected_exit: bool = False
    crashed: bool = False
    ready: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def send(self, message: Mapping[str, Any]) -> None:
        # Queued, never blocking: a SIGSTOPped worker must not stall the coordinator.
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self.outbox.send_nowait(encode(message))

    def summary(self) -> dict[str, Any]:
        return {
            "replica": self.index,
            "pid": self.proc.pid,
            "exit_code": self.proc.returncode,
            "reported": self.report is not None,
            "turns_finished": self.report["turns_finished"] if self.report else None,
            **({"fault": self.fault} if self.fault else {}),
            **({"crashed": True} if self.crashed else {}),
        }


class _Supervisor:
    """The replica processes: start, talk, replace, fault, stop, reap."""

    def __init__(
        self,
        plan: Plan,
        progress: _Progress,
        nursery: trio.Nursery,
        db: _Database,
        fc: FaultConfig,
    ) -> None:
        self.plan = plan
        self.progress = progress
        self.nursery = nursery
        self.db = db
        self.fc = fc
        self.current: dict[int, _Worker] = {}
        self.all: list[_Worker] = []
        self.go_sent = False
        self.stopping = False
        self.faults: list[dict[str, Any]] = []
        self.crashes: list[dict[str, Any]] = []
        # The run's notify key, shared by its replicas (in the hello, over stdin: never
        # in the plan, which reports repeat).
        self.notify_key = new_key_text()

    # -- processes ----------------------------------------------------------------------
    async def spawn(self, index: int) -> _Worker:
        cmd = worker_command("scaletest")
        proc: trio.Process = await self.nursery.start(
            functools.partial(
                trio.run_process, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False
            )
        )
        send, receive = trio.open_memory_channel[bytes](math.inf)
        worker = _Worker(index, proc, send)
        self.current[index] = worker
        self.all.append(worker)
        # Registered before the hello is queued: every later `final` follows the hello.
        worker.send(
            {
                "index": index,
                "plan": self.plan.to_json(),
                "go": self.go_sent,
                "finals": dict(self.progress.finals),
                "notify_key": self.notify_key,
            }
        )
        self.nursery.start_soon(self._writer, worker, receive)
        self.nursery.start_soon(self._reader, worker)
        with trio.move_on_after(self.fc.start_timeout_s):
            while not (worker.ready.is_set() or worker.exited.is_set()):
                await self.progress.changed.wait()
        if not worker.ready.is_set():
            raise ScaleTestError(
                f"replica {index} (pid {proc.pid}) did not start"
                + (f": exit code {proc.returncode}" if proc.returncode is not None else "")
            )
        return worker

    async def _writer(self, worker: _Worker, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        assert worker.proc.stdin is not None
        async with receive:
            async for data in receive:
                try:
                    await worker.proc.stdin.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

    async def _reader(self, worker: _Worker) -> None:
        assert worker.proc.stdout is not None
        lines = JsonLines(worker.proc.stdout)
        try:
            while True:
                self._handle(worker, await lines.receive())
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with bounded_cleanup(self.fc.cleanup_timeout_s):
                await worker.proc.wait()
            worker.exited.set()
            worker.outbox.close()
            if worker.ready.is_set() and not (worker.expected_exit or self.stopping):
                self._crashed(worker)
            self.progress.bump()

    def _crashed(self, worker: _Worker) -> None:
        """A replica died on its own: recorded, and replaced as a process manager would
        (at most `max_respawns` times per run)."""
        worker.crashed = True
        record: dict[str, Any] = {
            "replica": worker.index,
            "pid": worker.proc.pid,
            "exit_code": worker.proc.returncode,
            "at_s": round(time.monotonic() - self.progress.started, 3),
        }
        self.crashes.append(record)
        logger.warning("replica crashed", extra={"crash": record})
        if len(self.crashes) <= self.fc.max_respawns:
            self.nursery.start_soon(self._respawn, worker.index, record)

    async def _respawn(self, index: int, record: dict[str, Any]) -> None:
        try:
            record["replacement_pid"] = (await self.spawn(index)).proc.pid
        except ScaleTestError as exc:
            record["respawn_failed"] = str(exc)

    def _handle(self, worker: _Worker, msg: dict[str, Any]) -> None:
        kind = msg["kind"]
        if kind == "ready":
            worker.worker_id = msg["worker_id"]
            worker.ready.set()
        elif kind == "turn":
            self.progress.turn(msg["chat"], int(msg["turn"]), msg["outcome"])
            return
        elif kind == "chat_done":
            if self.progress.final(msg["chat"], int(msg["last_id"])):
                self.broadcast({"kind": "final", "chat": msg["chat"], "last_id": msg["last_id"]})
            return
        elif kind == "phase1":
            worker.phase1 = True
        elif kind == "done":
            worker.done = True
        elif kind == "report":
            worker.report = msg["report"]
        self.progress.bump()

    def broadcast(self, message: Mapping[str, Any]) -> None:
        for worker in self.current.values():
            worker.send(message)

    def all_done(self) -> bool:
        return all(w.done for w in self.current.values())

    async def go_after_phase1(self) -> None:
        """`go` once every replica's subscribers saw turn 1 over; or, should a status
        never reach some subscriber, `confirm_after_s` after every driver had it over."""
        chats = self.plan.chat_ids
        while not all(w.phase1 for w in self.current.values()):
            first_over = all((c, 1) in self.progress.turns for c in chats)
            with trio.move_on_after(self.fc.confirm_after_s if first_over else math.inf) as quiet:
                await self.progress.changed.wait()
            if quiet.cancelled_caught:
                logger.warning("phase 1 not seen by every subscriber: going on")
                break
        self.go_sent = True
        self.broadcast({"kind": "go"})

    async def stop_all(self) -> None:
        """SIGTERM every live replica (a clean close hands its chats back), wait for its
        report and exit; kill what does not exit in time. Every process is reaped."""
        self.stopping = True
        for worker in self.current.values():
            if worker.alive:
                worker.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.fc.stop_timeout_s):
            for worker in self.current.values():
                await worker.exited.wait()
        for worker in self.current.values():
            if worker.alive:
                logger.warning("replica did not stop: killed", extra={"pid": worker.proc.pid})
                worker.proc.kill()
                await worker.exited.wait()

    async def finish_unfinished(self) -> None:
        def last_ids_sync(chats: Sequence[str]) -> dict[str, int]:
            with psycopg.connect(self.db.dsn, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT chat_id, max(id) FROM chat_messages"
                    " WHERE chat_id = ANY(%s) AND NOT deleted AND visibility <> 'model'"
                    " GROUP BY chat_id",
                    ([uuid.UUID(c) for c in chats],),
                ).fetchall()
            found = {str(r[0]): int(r[1]) for r in rows}
            return {c: found.get(c, 0) for c in chats}

        async def last_ids(chats: Sequence[str]) -> dict[str, int]:
            return await _wait_for(functools.partial(last_ids_sync, chats), self.fc)

        def deliver(chat_id: str, last_id: int) -> None:
            self.broadcast({"kind": "final", "chat": chat_id, "last_id": last_id})

        await _finish_unfinished(self.plan, self.progress, last_ids, deliver)

    # -- faults --------------------------------------------------------------------------
    async def inject(self, started: trio.Event) -> None:
        """Wait for a third of the turns, inject `plan.fault` once, record what it did."""
        total = self.plan.chats * self.plan.turns
        await self.progress.wait_turns(math.ceil(total * self.fc.inject_at_fraction))
        started.set()
        record: dict[str, Any] = {
            "kind": self.plan.fault,
            "at_s": round(time.monotonic() - self.progress.started, 3),
            "at_turns": len(self.progress.turns),
        }
        self.faults.append(record)
        began = time.monotonic()
        inject = getattr(self, f"_fault_{self.plan.fault}")
        record.update(await inject())
        record["took_s"] = round(time.monotonic() - began, 3)
        logger.info("fault injected", extra={"fault": record})

    def _sql(self, query: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db.dsn, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    async def _victim(self) -> tuple[_Worker, int]:
        """The live replica owning the most running chats now (the lowest index on a tie)."""
        rows = await trio.to_thread.run_sync(
            self._sql,
            "SELECT worker_id::text, count(*) FROM chats WHERE status = 'running'"
            " GROUP BY worker_id",
        )
        running = {str(r[0]): int(r[1]) for r in rows}
        live = [w for w in self.current.values() if w.alive]
        worker = max(live, key=lambda w: (running.get(w.worker_id, 0), -w.index))
        return worker, running.get(worker.worker_id, 0)

    async def _fault_sigkill(self) -> dict[str, Any]:
        worker, running = await self._victim()
        worker.fault = "sigkill"
        worker.expected_exit = True
        worker.proc.kill()
        await worker.exited.wait()
        replacement = await self.spawn(worker.index)
        return {
            "replica": worker.index,
            "pid": worker.proc.pid,
            "running_chats": running,
            "exit_code": worker.proc.returncode,
            "replacement_pid": replacement.proc.pid,
        }

    async def _fault_sigstop(self) -> dict[str, Any]:
        worker, running = await self._victim()
        worker.fault = "sigstop"
        pause = self.fc.pause_factor * self.plan.stale_after + self.plan.heartbeat
        worker.proc.send_signal(signal.SIGSTOP)
        try:
            await trio.sleep(pause)
        finally:
            worker.proc.send_signal(signal.SIGCONT)
        return {
            "replica": worker.index,
            "pid": worker.proc.pid,
            "running_chats": running,
            "paused_s": pause,
        }

    async def _fault_pool_kill(self) -> dict[str, Any]:
        worker, running = await self._victim()
        worker.fault = "pool_kill"
        rows = await trio.to_thread.run_sync(
            self._sql,
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (store_application_name(self.plan, worker.index),),
        )
        return {
            "replica": worker.index,
            "pid": worker.proc.pid,
            "running_chats": running,
            "terminated": sum(1 for r in rows if r[1]),
        }

    async def _fault_listen_kill(self) -> dict[str, Any]:
        rows = await trio.to_thread.run_sync(
            self._sql,
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE starts_with(application_name, %s)"
            " AND strpos(application_name, '-pubsub-listen-') > 0",
            (f"{FaultConfig.application_prefix}-{self.plan.run_id}-",),
        )
        return {"terminated": sum(1 for r in rows if r[1])}

    async def _fault_pg_restart(self) -> dict[str, Any]:
        began = time.monotonic()
        await trio.to_thread.run_sync(self.db.cluster.restart)
        return {"down_s": round(time.monotonic() - began, 3)}

    async def _fault_outage(self) -> dict[str, Any]:
        began = time.monotonic()
        await trio.to_thread.run_sync(self.db.cluster.stop)
        try:
            await trio.sleep(self.plan.outage_s)
        finally:
            with bounded_cleanup(self.fc.cleanup_timeout_s):
                await trio.to_thread.run_sync(self.db.cluster.start)
        return {"down_s": round(time.monotonic() - began, 3)}


async def run_postgres(plan: Plan, *, progress: bool = False) -> dict[str, Any]:
    """R worker processes sharing the run's own database; this process runs the agent."""
    from chatd_trio.agent.local import LocalProvisioner
    from chatd_trio.store.postgres import PostgresStore

    st = ScaleTestConfig()
    fc = FaultConfig()
    config = replica_config(plan, st)
    plan = dataclasses.replace(plan, run_id=plan.run_id or uuid.uuid4().hex[:8])
    async with _database(plan, fc) as db:
        plan = dataclasses.replace(plan, dsn=db.dsn)
        with tempfile.TemporaryDirectory(prefix="chatd-scale-") as tmp:
            async with trio.open_nursery() as agents:
                # The coordinator's store serves the setup only: the agents it starts do
                # not use it, so a fault cannot reach the coordinator.
                async with PostgresStore.open(plan.dsn) as store:
                    provisioner = LocalProvisioner(store, agents, Path(tmp), config=config)
                    plan = await _setup(store, plan, provisioner, st)
                witness = await trio.to_thread.run_sync(install_witness, plan.dsn, fc)
                started = time.monotonic()
                async with _progress_bar(plan.chats * plan.turns, progress) as tick:
                    tracker = _Progress(plan, tick)
                    outcome, workers, faults, crashes = await _run_workers(plan, tracker, db, fc)
                wall = time.monotonic() - started
                await provisioner.aclose()
                agents.cancel_scope.cancel()
        facts = await _wait_for(functools.partial(postgres_facts, plan.dsn, plan.chat_ids, fc), fc)
        if facts.stale_writes is None:
            facts.witness = witness
    reports = [w["report"] for w in workers if w["report"] is not None]
    end = _sum_dicts(r["end"]["statements"] for r in reports)
    steady = _sum_dicts(r["steady_start"]["statements"] for r in reports)
    summary = _summarise(
        plan,
        facts,
        tracker,
        outcome,
        reports,
        wall,
        end,
        _diff(end, steady),
        workers=[{k: v for k, v in w.items() if k != "report"} for w in workers],
        faults=faults,
        crashes=crashes,
    )
    summary["database"] = {
        "name": db.name,
        "kept": plan.keep,
        "throwaway_cluster": db.cluster is not None,
        **({"dsn": db.dsn} if plan.keep else {}),
    }
    return summary


async def _run_workers(
    plan: Plan, tracker: _Progress, db: _Database, fc: FaultConfig
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Start the replicas, inject the fault, wait for the end, stop and reap them all.
    A failure (a replica that does not start: ScaleTestError) leaves in the nursery's
    exception group."""
    outcome = "failed"
    async with trio.open_nursery() as nursery:
        sup = _Supervisor(plan, tracker, nursery, db, fc)
        try:
            for index in range(plan.replicas):
                await sup.spawn(index)
            nursery.start_soon(sup.go_after_phase1)
            fault_started = trio.Event()
            fault_done = trio.Event()
            fault_scope = trio.CancelScope()

            async def fault() -> None:
                with fault_scope:
                    await sup.inject(fault_started)
                fault_done.set()

            if plan.fault:
                nursery.start_soon(fault)
            else:
                fault_done.set()
            deadline = trio.current_time() + plan.deadline_s
            outcome = await tracker.watch(sup.all_done, stall_timeout(plan, fc), deadline)
            # A fault under way (a pause, an outage) always completes: SIGCONT, restart.
            if not fault_started.is_set():
                fault_scope.cancel()
            await fault_done.wait()
            if outcome != "done":
                await sup.finish_unfinished()
                tracker.bump()
                await tracker.watch(sup.all_done, fc.drain_timeout_s, math.inf)
        finally:
            with bounded_cleanup(fc.cleanup_timeout_s):
                await sup.stop_all()
        nursery.cancel_scope.cancel()
    if plan.fault and not sup.faults:
        sup.faults.append({"kind": plan.fault, "injected": False})
    workers = [{**w.summary(), "report": w.report} for w in sup.all]
    return outcome, workers, sup.faults, sup.crashes


# -- the worker process ----------------------------------------------------------------


def _emit(kind: str, **fields: Any) -> None:
    emit({"kind": kind, **fields})


class _EmitEvents:
    def on_turn(self, chat_id: str, turn: int, outcome: str) -> None:
        _emit("turn", chat=chat_id, turn=turn, outcome=outcome)

    def on_chat_done(self, chat_id: str, last_id: int) -> None:
        _emit("chat_done", chat=chat_id, last_id=last_id)


async def worker_main() -> None:
    """One replica process: read the plan from stdin, serve, report on stdout.

    Stops on SIGTERM/SIGINT, `stop` or EOF on stdin: the Server closes (running chats
    go back to `pending`) and the report is written before the process exits.
    """
    from chatd_trio.agent import dial_agent
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore

    st = ScaleTestConfig()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        lines = stdin_lines()
        hello = await lines.receive()
        plan = Plan.from_json(hello["plan"])
        index = int(hello["index"])
        config = replica_config(plan, st)
        async with (
            PostgresStore.open(
                plan.dsn,
                max_size=st.pool_max_size,
                config=PostgresConfig(
                    application_name=store_application_name(plan, index), count_round_trips=True
                ),
            ) as store,
            PostgresPubSub.open(
                plan.dsn,
                config=PubSubConfig(
                    application_name=pubsub_application_name(plan, index), count_round_trips=True
                ),
                auth=NotifyAuth.from_key_text(hello["notify_key"]),
            ) as pubsub,
        ):
            pubsub_port: PubSub = pubsub
            async with Server(
                store,
                pubsub_port,
                scripted_model(plan, st),
                config,
                dialer=dial_agent,
                strategies=replica_strategies(plan),
            ) as server:
                runner = ReplicaRunner(server, index, plan, _EmitEvents(), st=st)
                for chat_id, last_id in hello["finals"].items():
                    runner.set_final(chat_id, int(last_id))
                if hello["go"]:
                    runner.start_steady()
                _emit("ready", worker_id=str(server.worker_id), pid=os.getpid())

                async def control(stop: trio.CancelScope) -> None:
                    try:
                        while True:
                            msg = await lines.receive()
                            if msg["kind"] == "go":
                                runner.start_steady()
                            elif msg["kind"] == "final":
                                runner.set_final(msg["chat"], int(msg["last_id"]))
                            elif msg["kind"] == "stop":
                                break
                    except EOFError:
                        pass
                    stop.cancel()

                async def announce() -> None:
                    await runner.phase1.wait()
                    _emit("phase1")
                    await runner.done.wait()
                    _emit("done")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(runner.run)
                    nursery.start_soon(control, nursery.cancel_scope)
                    nursery.start_soon(announce)
                    async for _ in signals:
                        break
                    nursery.cancel_scope.cancel()
            # Leaving the Server closed it: turns shut down, chats handed back.
            report = runner.report()
    _emit("report", report=report)


# -- command line ----------------------------------------------------------------------


# The --dsn default, shown as such in --help and resolved when the plan is made.
DSN_FROM_ENV = "$CHATD_DSN"


def add_scaletest_command(sub: Any) -> None:
    """Register `scaletest` on the `chatd-trio` subcommand parser."""
    p = sub.add_parser(
        "scaletest",
        help="run many chats over several replicas, optionally through a fault",
        description=(
            "Run N chats x M turns over R replicas and print a JSON summary: throughput, "
            "statements per turn, delivery, and a `reliability` section (turns errored, "
            "duplicate answers, stale-token writes, chats left running, faults). On "
            "PostgreSQL the run works in a database of its own, dropped at the end."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--store", choices=("memory", "postgres"), default="memory", help="where chats live"
    )
    p.add_argument(
        "--dsn",
        # Read when the run starts, not shown: --help must not print a password.
        default=DSN_FROM_ENV,
        help="PostgreSQL server the run creates its own database on (CREATEDB needed); "
        "an empty DSN is libpq's defaults (PGHOST, PGUSER, or the local socket, as psql "
        "does), as is an unset $CHATD_DSN",
    )
    p.add_argument("--replicas", type=int, default=2, help="replicas (processes on PostgreSQL)")
    p.add_argument("--chats", type=int, default=10, help="chats")
    p.add_argument("--turns", type=int, default=3, help="user messages per chat (>= 2)")
    p.add_argument("--tools-per-turn", type=int, default=2, help="tool calls in a turn's step")
    p.add_argument("--subscribers-per-chat", type=int, default=2, help="subscribers of each chat")
    p.add_argument(
        "--model-latency-ms", type=float, default=0.0, help="scripted model delay per delta"
    )
    p.add_argument(
        "--tool",
        choices=("list_dir", "execute"),
        default=ScaleTestConfig.tool_name,
        help="workspace tool the model calls",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress bar")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="run the replicas the plain ways the optimisations are measured against "
        "(chatd_trio.strategies)",
    )
    p.add_argument(
        "--fault",
        choices=FAULTS,
        default=None,
        help="inject this fault once a third of the turns are over (needs --store postgres)",
    )
    p.add_argument(
        "--stale-after",
        type=float,
        default=AcquireConfig.stale_after,
        help="replicas' AcquireConfig.stale_after, seconds",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=AcquireConfig.heartbeat_interval,
        help="replicas' AcquireConfig.heartbeat_interval, seconds",
    )
    p.add_argument(
        "--outage-seconds",
        type=float,
        default=Plan.outage_s,
        help="how long --fault outage keeps PostgreSQL stopped",
    )
    p.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="auto",
        help="throwaway: initdb a temporary cluster on a free port (removed at the end); "
        "dsn: the --dsn server; auto: throwaway with --fault, else dsn",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the run's database (and throwaway cluster) and print its DSN",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=Plan.deadline_s,
        help="seconds after which the run stops waiting for turns",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=0.0,
        help="seconds without any turn ending after which the run stops waiting; "
        "0: 2 x --stale-after + 30 (+ --outage-seconds with --fault outage)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The run's plan from parsed `scaletest` arguments."""
    return Plan(
        store=args.store,
        dsn=os.environ.get("CHATD_DSN", "") if args.dsn == DSN_FROM_ENV else args.dsn,
        replicas=args.replicas,
        chats=args.chats,
        turns=args.turns,
        tools_per_turn=args.tools_per_turn,
        subscribers_per_chat=args.subscribers_per_chat,
        model_latency_ms=args.model_latency_ms,
        baseline=args.baseline,
        tool=args.tool,
        stale_after=args.stale_after,
        heartbeat=args.heartbeat,
        fault=args.fault or "",
        outage_s=args.outage_seconds,
        cluster=args.cluster,
        keep=args.keep,
        deadline_s=args.deadline,
        stall_s=args.stall_timeout,
    )


async def run(plan: Plan, *, progress: bool = False) -> dict[str, Any]:
    """Run a scale test; the summary (see the module docstring)."""
    plan.validate()
    if plan.store == "postgres":
        # An empty DSN is libpq's defaults (environment, then the local socket).
        return await run_postgres(plan, progress=progress)
    return await run_memory(plan, progress=progress)


async def _run_until_terminated(plan: Plan, progress: bool) -> dict[str, Any] | int:
    """`run`, or the signal number when SIGTERM or SIGINT cancelled it: the replicas are
    then stopped and reaped, the run's database dropped and its cluster removed (the
    cleanups are shielded)."""
    outcome: dict[str, Any] | int = 0
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def main() -> None:
                nonlocal outcome
                outcome = await run(plan, progress=progress)
                nursery.cancel_scope.cancel()

            nursery.start_soon(main)
            async for signum in signals:
                outcome = signum
                nursery.cancel_scope.cancel()
                break
    return outcome


def run_scaletest_command(args: argparse.Namespace) -> int:
    """`chatd-trio scaletest ...`."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.worker:
        trio.run(worker_main)
        return 0
    refused = False
    try:
        plan = plan_from_args(args)
        plan.validate()
        summary = trio.run(_run_until_terminated, plan, not args.json)
    except* ScaleTestError as group:
        # Bare (a bad flag) or in the groups of the nurseries it left: every one is
        # printed. Any other failure beside them propagates with its traceback.
        for error in leaves(group):
            print(f"chatd-trio scaletest: error: {error}", file=sys.stderr)
        refused = True
    if refused:
        return 2
    if isinstance(summary, int):
        print(f"chatd-trio scaletest: stopped by {signal.Signals(summary).name}", file=sys.stderr)
        return 128 + summary
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == [WORKER]:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        replica_process_settings()
        trio.run(worker_main)
    else:
        parser = argparse.ArgumentParser(prog="python -m chatd_trio.apps.scaletest")
        add_scaletest_command(parser.add_subparsers(dest="command", required=True))
        sys.exit(run_scaletest_command(parser.parse_args(["scaletest", *sys.argv[1:]])))
