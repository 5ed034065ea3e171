"""`chatd-trio scaletest`: many chats, many turns, several replicas, real agents.

Layout. The coordinator (the parent) creates one workspace with a real local agent
(`LocalProvisioner`, running in the coordinator) and N chats bound to the workspace
only (the first turn binds the agent lazily). Each chat's first user message makes it
`pending`, so turn 1 starts at once. Replicas are `Server`s: for `--store memory`
R of them in this process sharing one MemoryStore/MemoryPubSub, for `--store postgres`
R worker processes (`python -m chatd_trio.scaletest worker`) sharing the database.

Chat i has a home replica i % R; subscriber j of chat i lives on replica
(i + j) % R, so with S >= 2 every chat has subscribers on the replica that runs it
and on others. Subscriber 0 (home) drives the chat: when it has seen the chat
`waiting` with as many final answers as user messages sent, it sends the next user
message through its own replica (which wakes that replica's acquire loop).

Phases. Every replica reports when all its subscribers saw turn 1 complete; once all
have, the coordinator tells them to go on, and each replica snapshots its counters
just before sending turn 2: `steady_per_turn` is the difference between the end and
that snapshot, divided by the turns 2..M. Workers talk to the coordinator with JSON
lines on stdin/stdout (`phase1`, `turn`, `done`, `report`; `go`, `stop`).

Stream database reads are attributed per replica and chat: a catch-up read counted
by the replica's `ChatStreams` is "same replica" when the latest `running` status its
subscribers saw names this replica, else "cross replica". Fan-out latency is the time
from a message's `created_at` (store clock, same machine) to its delivery to a
subscriber, for assistant messages of turns 2..M. Lost and duplicated messages come
from comparing what every subscriber received with `messages_after(chat, 0)`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from chatd_trio.config import (
    AcquireConfig,
    Config,
    LoopConfig,
    ScaleTestConfig,
    StreamConfig,
    SubagentConfig,
    WorkspaceConfig,
)
from chatd_trio.domain import (
    JSON,
    ChatStatus,
    MessageEvent,
    Role,
    StatusEvent,
    TextPart,
    text_of,
)
from chatd_trio.models.scripted import ScriptedModel, ToolsThenAnswer
from chatd_trio.pubsub.base import PubSub
from chatd_trio.server import Server
from chatd_trio.store.base import Store

logger = logging.getLogger(__name__)

PER_TURN_KEYS = (
    "statements",
    "latest_build_agent_lookups",
    "agent_lookups",
    "stream_db_reads_same_replica",
    "stream_db_reads_cross_replica",
    "dials",
    "validations",
    "notify_publishes",
)


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

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw = json.loads(text)
        raw["chat_ids"] = tuple(raw["chat_ids"])
        return cls(**raw)


def replica_config(plan: Plan, st: ScaleTestConfig | None = None) -> Config:
    """The replicas' configuration; `--baseline` switches the optimisations off."""
    st = st or ScaleTestConfig()
    config = Config(acquire=AcquireConfig(acquire_interval=st.acquire_interval_s))
    if not plan.baseline:
        return config
    return config.replace(
        streams=StreamConfig(
            durable_cache_enabled=False,
            notify_carries_messages=False,
            notify_in_transaction=False,
        ),
        workspace=WorkspaceConfig(use_binding=False),
        subagents=SubagentConfig(use_pubsub=False),
        loop=LoopConfig(parallel_tools=False),
    )


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


# -- one replica's subscribers and drivers ------------------------------------------


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
    # The number of final answers seen when `waiting` was last seen.
    waited_for: int = -1
    finals: int = 0
    sent: int = 1
    changed: trio.Event = field(default_factory=trio.Event)
    # Counted once into the runner's phase counters.
    saw_first: bool = False
    saw_all: bool = False


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
        *,
        st: ScaleTestConfig | None = None,
        on_turn: Callable[[], None] | None = None,
        count_statements: bool = True,
        count_publishes: bool = True,
    ) -> None:
        self.server = server
        self.index = index
        self.plan = plan
        self._st = st or ScaleTestConfig()
        self._on_turn = on_turn
        self._count_statements = count_statements
        self._count_publishes = count_publishes
        self.owner_id = uuid.UUID(plan.owner_id)
        self.subs: list[_SubState] = []
        self.views: dict[uuid.UUID, _ChatView] = {}
        self.reads_same = 0
        self.reads_cross = 0
        self.latency_local: list[float] = []
        self.latency_cross: list[float] = []
        self.phase1 = trio.Event()
        self.go = trio.Event()
        self.done = trio.Event()
        self.steady_start: Counters | None = None
        self._first_count = 0
        self._all_count = 0
        for i, raw in enumerate(plan.chat_ids):
            chat_id = uuid.UUID(raw)
            for j in range(plan.subscribers_per_chat):
                if (i + j) % plan.replicas == index:
                    self.subs.append(_SubState(chat_id, driver=(j == 0)))
                    self.views.setdefault(chat_id, _ChatView())

    def counters(self) -> Counters:
        """Statement counts and per-turn counters of this replica now."""
        stats = self.server.stats()
        extra = stats.extra
        flat = {
            "latest_build_agent_lookups": extra.get("latest_build_lookups", 0),
            "agent_lookups": extra.get("agent_lookups", 0),
            "dials": extra.get("dials", 0),
            "validations": extra.get("validations", 0),
            "stream_db_reads_same_replica": self.reads_same,
            "stream_db_reads_cross_replica": self.reads_cross,
            "parts_dropped": stats.streams["dropped_buffer"] + stats.streams["dropped_subscriber"],
        }
        # NOTIFYs sent through the pubsub (status, queue, owner and, unless sent in the
        # inserting transaction, message notifies): round trips the statements miss.
        # A pubsub shared by in-process replicas is counted by one of them.
        statistics = getattr(self.server.pubsub, "statistics", None)
        if self._count_publishes and statistics is not None:
            flat["notify_publishes"] = int(statistics().published)
        statements = dict(stats.statements) if self._count_statements else {}
        return Counters(statements, flat)

    async def run(self) -> None:
        """Subscribe everything, drive home chats; returns once `done` (all turns seen)."""
        if not self.subs:
            self.phase1.set()
            self.done.set()
        async with trio.open_nursery() as nursery:
            for sub in self.subs:
                nursery.start_soon(self._subscriber, sub)
                if sub.driver:
                    nursery.start_soon(self._driver, sub)
            await self.done.wait()
            nursery.cancel_scope.cancel()

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

    async def _subscriber(self, sub: _SubState) -> None:
        view = self.views[sub.chat_id]
        async with self.server.subscribe(self.owner_id, sub.chat_id) as stream:
            # The snapshot is ready on entry; its status precedes its messages, so a
            # `waiting` in it covers the finals it lists.
            snapshot_waiting = False
            while True:
                try:
                    event = stream.receive_nowait()
                except trio.WouldBlock:
                    break
                if isinstance(event, StatusEvent):
                    snapshot_waiting = event.status is ChatStatus.WAITING
                self._apply(sub, view, event)
            if snapshot_waiting:
                sub.waited_for = sub.finals
            self._changed(sub)
            async for event in stream:
                self._attribute_reads(sub.chat_id)
                if self._apply(sub, view, event):
                    self._changed(sub)

    def _apply(self, sub: _SubState, view: _ChatView, event: object) -> bool:
        if isinstance(event, StatusEvent):
            # Notifies from different replicas may arrive out of order (a sender's
            # `pending` after the runner's `waiting`): a turn counts as finished once
            # `waiting` was seen after its final answer, whatever comes later.
            if event.status is ChatStatus.WAITING:
                sub.waited_for = sub.finals
            elif event.status is ChatStatus.RUNNING and event.worker_id is not None:
                view.running_worker = str(event.worker_id)
            return True
        if isinstance(event, MessageEvent):
            self._received(sub, view, event)
            return True
        return False

    def _changed(self, sub: _SubState) -> None:
        sub.changed.set()
        sub.changed = trio.Event()
        self._check_phases(sub)

    def _received(self, sub: _SubState, view: _ChatView, event: MessageEvent) -> None:
        message = event.message
        sub.received.append(message.id)
        if message.role is not Role.ASSISTANT:
            return
        if self.go.is_set():
            latency = (time.time() - message.created_at.timestamp()) * 1000.0
            local = view.running_worker == str(self.server.worker_id)
            (self.latency_local if local else self.latency_cross).append(latency)
        if text_of(message.parts) == self._st.final_text:
            sub.finals += 1
            if sub.driver and self._on_turn is not None:
                self._on_turn()

    def _finished(self, sub: _SubState, turns: int) -> bool:
        return sub.finals >= turns and sub.waited_for >= turns

    def _check_phases(self, sub: _SubState) -> None:
        if not sub.saw_first and self._finished(sub, 1):
            sub.saw_first = True
            self._first_count += 1
        if not sub.saw_all and self._finished(sub, self.plan.turns):
            sub.saw_all = True
            self._all_count += 1
        if self._first_count == len(self.subs):
            self.phase1.set()
        if self._all_count == len(self.subs):
            self.done.set()

    async def _driver(self, sub: _SubState) -> None:
        while sub.sent < self.plan.turns:
            while not (self._finished(sub, sub.sent) and sub.finals == sub.sent):
                await sub.changed.wait()
            if sub.sent == 1:
                await self.go.wait()
            sub.sent += 1
            await self.server.send_message(self.owner_id, sub.chat_id, self._st.user_text)

    def start_steady(self) -> None:
        """Snapshot the counters and let the drivers send turn 2."""
        self.steady_start = self.counters()
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
            "pool": {"size": pool.get("size", 0), "max_in_use": pool.get("max_in_use", 0)},
        }


# -- the coordinator -------------------------------------------------------------------


async def _setup(store: Store, plan: Plan, provisioner: Any, st: ScaleTestConfig) -> Plan:
    owner = uuid.uuid4()
    ws = await provisioner.create(owner, st.workspace_name)
    ids = []
    for i in range(plan.chats):
        chat, _ = await store.create_chat(
            owner, f"scale {i}", (TextPart(st.user_text),), workspace_id=ws.id
        )
        ids.append(str(chat.id))
    return Plan(**{**asdict(plan), "owner_id": str(owner), "chat_ids": tuple(ids)})


def _percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, math.ceil(p / 100.0 * len(ordered)) - 1)
    return round(ordered[k], 3)


def _sum_dicts(dicts: Sequence[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


async def _summarise(
    store: Store,
    plan: Plan,
    reports: Sequence[dict[str, Any]],
    wall_s: float,
    statements_end: dict[str, int],
    statements_steady: dict[str, int],
) -> dict[str, Any]:
    st = ScaleTestConfig()
    expected: dict[str, list[int]] = {}
    turns_completed = 0
    for raw in plan.chat_ids:
        messages = await store.messages_after(uuid.UUID(raw), 0)
        expected[raw] = [m.id for m in messages]
        turns_completed += sum(
            1 for m in messages if m.role is Role.ASSISTANT and text_of(m.parts) == st.final_text
        )
    published = delivered = lost = duplicated = 0
    for report in reports:
        for key, ids in report["received"].items():
            want = expected[key.split("/")[0]]
            published += len(want)
            delivered += len(set(ids))
            lost += len(set(want) - set(ids))
            duplicated += len(ids) - len(set(ids))
    end_flat = _sum_dicts([r["end"]["flat"] for r in reports])
    start_flat = _sum_dicts([r["steady_start"]["flat"] for r in reports])
    total_turns = plan.chats * plan.turns
    steady_turns = plan.chats * (plan.turns - 1)

    def per_turn(statements: dict[str, int], flat: dict[str, int], turns: int) -> dict[str, float]:
        out = {"statements": sum(statements.values())}
        out.update({k: flat.get(k, 0) for k in PER_TURN_KEYS if k != "statements"})
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
            "durable_published": published,
            "durable_delivered": delivered,
            "durable_lost": lost,
            "durable_duplicated": duplicated,
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
        },
    }


@asynccontextmanager
async def _progress(total: int, enabled: bool) -> AsyncIterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("turns", total=total)
        yield lambda: progress.advance(task)


async def run_memory(plan: Plan, *, progress: bool = False) -> dict[str, Any]:
    """R in-process replicas sharing one MemoryStore/MemoryPubSub."""
    from chatd_trio.agent import dial_agent
    from chatd_trio.pubsub.memory import MemoryPubSub
    from chatd_trio.store.memory import MemoryStore
    from chatd_trio.workspace import LocalProvisioner

    st = ScaleTestConfig()
    pubsub = MemoryPubSub()
    store = MemoryStore(pubsub=pubsub)
    config = replica_config(plan, st)
    with tempfile.TemporaryDirectory(prefix="chatd-scale-") as tmp:
        async with trio.open_nursery() as agents:
            provisioner = LocalProvisioner(store, agents, Path(tmp), config=config)
            plan = await _setup(store, plan, provisioner, st)
            base = store.statement_counts()
            started = time.monotonic()
            async with (
                _progress(plan.chats * plan.turns, progress) as tick,
                AsyncExitStack() as stack,
            ):
                runners = []
                for index in range(plan.replicas):
                    server = await stack.enter_async_context(
                        Server(store, pubsub, scripted_model(plan, st), config, dialer=dial_agent)
                    )
                    # One shared store: its statement counts are taken once, below.
                    runners.append(
                        ReplicaRunner(
                            server,
                            index,
                            plan,
                            st=st,
                            on_turn=tick,
                            count_statements=False,
                            count_publishes=index == 0,
                        )
                    )
                with trio.fail_after(st.run_timeout_s):
                    async with trio.open_nursery() as nursery:
                        for r in runners:
                            nursery.start_soon(r.run)
                        for r in runners:
                            await r.phase1.wait()
                        steady_base = store.statement_counts()
                        for r in runners:
                            r.start_steady()
                wall = time.monotonic() - started
                end = store.statement_counts()
                reports = [r.report() for r in runners]
            await provisioner.aclose()
            agents.cancel_scope.cancel()
    statements_end = _diff(end, base)
    statements_steady = _diff(end, steady_base)
    return await _summarise(store, plan, reports, wall, statements_end, statements_steady)


def _diff(end: dict[str, int], start: dict[str, int]) -> dict[str, int]:
    return {k: v - start.get(k, 0) for k, v in end.items() if v - start.get(k, 0)}


class _Lines:
    """Newline-delimited reads from a Trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def readline(self) -> str:
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise EOFError("stream closed")
            self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line.decode()


async def run_postgres(plan: Plan, *, progress: bool = False) -> dict[str, Any]:
    """R worker processes sharing the database; this process runs the agent."""
    from chatd_trio.store.postgres import PostgresStore
    from chatd_trio.workspace import LocalProvisioner

    st = ScaleTestConfig()
    config = replica_config(plan, st)
    with tempfile.TemporaryDirectory(prefix="chatd-scale-") as tmp:
        async with PostgresStore.open(plan.dsn) as store, trio.open_nursery() as agents:
            provisioner = LocalProvisioner(store, agents, Path(tmp), config=config)
            plan = await _setup(store, plan, provisioner, st)
            started = time.monotonic()
            async with _progress(plan.chats * plan.turns, progress) as tick:
                with trio.fail_after(st.run_timeout_s):
                    reports = await _run_workers(plan, tick)
            wall = time.monotonic() - started
            end = _sum_dicts([r["end"]["statements"] for r in reports])
            steady = _sum_dicts([r["steady_start"]["statements"] for r in reports])
            summary = await _summarise(store, plan, reports, wall, end, _diff(end, steady))
            await provisioner.aclose()
            agents.cancel_scope.cancel()
    return summary


async def _run_workers(plan: Plan, tick: Callable[[], None]) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "chatd_trio.scaletest", "worker"]
    reports: list[dict[str, Any] | None] = [None] * plan.replicas
    phase1 = [trio.Event() for _ in range(plan.replicas)]
    done = [trio.Event() for _ in range(plan.replicas)]
    procs: list[trio.Process] = []

    async def talk(index: int, proc: trio.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        lines = _Lines(proc.stdout)
        await proc.stdin.send_all(
            (json.dumps({"index": index, "plan": plan.to_json()}) + "\n").encode()
        )
        while True:
            msg = json.loads(await lines.readline())
            kind = msg["kind"]
            if kind == "turn":
                tick()
            elif kind == "phase1":
                phase1[index].set()
            elif kind == "done":
                done[index].set()
            elif kind == "report":
                reports[index] = msg["report"]
                return

    async with trio.open_nursery() as nursery:
        for index in range(plan.replicas):
            proc = await nursery.start(
                functools.partial(
                    trio.run_process, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
            )
            procs.append(proc)
            nursery.start_soon(talk, index, proc)
        for event in phase1:
            await event.wait()
        for proc in procs:
            assert proc.stdin is not None
            await proc.stdin.send_all(b'{"kind": "go"}\n')
        for event in done:
            await event.wait()
        for proc in procs:
            assert proc.stdin is not None
            await proc.stdin.send_all(b'{"kind": "stop"}\n')
    return [r for r in reports if r is not None]


# -- the worker process ----------------------------------------------------------------


def _emit(kind: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"kind": kind, **fields}) + "\n")
    sys.stdout.flush()


async def worker_main() -> None:
    """One replica process: read the plan from stdin, serve, report on stdout."""
    from chatd_trio.agent import dial_agent
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore

    st = ScaleTestConfig()
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    lines = _Lines(stdin)
    hello = json.loads(await lines.readline())
    plan = Plan.from_json(hello["plan"])
    index = int(hello["index"])
    config = replica_config(plan, st)
    async with (
        PostgresStore.open(plan.dsn, max_size=st.pool_max_size) as store,
        PostgresPubSub.open(plan.dsn) as pubsub,
    ):
        pubsub_port: PubSub = pubsub
        async with Server(
            store, pubsub_port, scripted_model(plan, st), config, dialer=dial_agent
        ) as server:
            runner = ReplicaRunner(server, index, plan, st=st, on_turn=lambda: _emit("turn"))

            async def control() -> None:
                await runner.phase1.wait()
                _emit("phase1")
                while json.loads(await lines.readline())["kind"] != "go":
                    pass
                runner.start_steady()
                await runner.done.wait()
                _emit("done")
                while json.loads(await lines.readline())["kind"] != "stop":
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(runner.run)
                await control()
            report = runner.report()
    _emit("report", report=report)


# -- command line ----------------------------------------------------------------------


def add_scaletest_command(sub: Any) -> None:
    """Register `scaletest` on the `chatd-trio` subcommand parser."""
    p = sub.add_parser("scaletest", help="run many chats over several replicas")
    p.add_argument("--store", choices=("memory", "postgres"), default="memory")
    p.add_argument(
        "--dsn",
        default=os.environ.get("CHATD_DSN", ""),
        help="PostgreSQL DSN (default: $CHATD_DSN, else libpq's defaults: PGHOST, PGUSER, "
        "PGDATABASE or the local socket, as psql does)",
    )
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--chats", type=int, default=10)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--tools-per-turn", type=int, default=2)
    p.add_argument("--subscribers-per-chat", type=int, default=2)
    p.add_argument("--model-latency-ms", type=float, default=0.0)
    p.add_argument("--tool", choices=("list_dir", "execute"), default=ScaleTestConfig.tool_name)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--baseline", action="store_true", help="switch the optimisations off")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The run's plan from parsed `scaletest` arguments."""
    return Plan(
        store=args.store,
        dsn=args.dsn,
        replicas=args.replicas,
        chats=args.chats,
        turns=args.turns,
        tools_per_turn=args.tools_per_turn,
        subscribers_per_chat=args.subscribers_per_chat,
        model_latency_ms=args.model_latency_ms,
        baseline=args.baseline,
        tool=args.tool,
    )


async def run(plan: Plan, *, progress: bool = False) -> dict[str, Any]:
    """Run a scale test; the summary (see the module docstring)."""
    if plan.turns < 2 or plan.replicas < 1 or plan.chats < 1:
        raise ValueError("a scale test needs turns >= 2, replicas >= 1 and chats >= 1")
    if plan.store == "postgres":
        # An empty DSN is libpq's defaults (environment, then the local socket).
        return await run_postgres(plan, progress=progress)
    return await run_memory(plan, progress=progress)


def run_scaletest_command(args: argparse.Namespace) -> int:
    """`chatd-trio scaletest ...`."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.worker:
        trio.run(worker_main)
        return 0
    summary = trio.run(lambda: run(plan_from_args(args), progress=not args.json))
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        trio.run(worker_main)
    else:
        parser = argparse.ArgumentParser(prog="python -m chatd_trio.scaletest")
        add_scaletest_command(parser.add_subparsers(dest="command", required=True))
        sys.exit(run_scaletest_command(parser.parse_args(["scaletest", *sys.argv[1:]])))
