"""Deterministic simulation harness: N replicas in one `trio.run` on a MockClock.

A `Scenario` (plain data, generated from any integer source: Hypothesis draws or
a seeded `random.Random`) lists user operations and fault rates. `run_scenario`
plays it: replicas (`Server`) share one `MemoryStore` whose timestamps follow the
virtual clock and one `MemoryPubSub`; every port is wrapped so faults can be
injected and behaviour observed without touching the code under test. After the
operations, faults stop, virtual time advances until the system settles, every
subscriber catches up, the servers close, and `check` returns the violations of
the invariants in `INVARIANTS`.

Store faults: transient errors of the replica's background calls (acquire,
heartbeat, stale recovery) and of stream reads; and for a turn's writes
(persist_step, persist_compaction, finish_turn) a lost connection
(`StoreUnavailable`) either before the write or after it landed, the
acknowledgement lost: the run retries under the same operation id and must not
write twice.

Fault windows (scenario operations): a replica paused past `stale_after` and
resumed (SIGSTOP / SIGCONT: see `hold`), a store outage (every store call of
every replica fails, publishes fail, listeners resync when it ends), and one
replica's heartbeats failing while its turns go on.

Replay: `python -m tests.simulation --replay SEED` (scenario generated from the
seed) or `--scenario JSON` (a scenario printed by a failing test).
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import inspect
import json
import logging
import math
import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import trio
import trio.testing

from chatd_trio._groups import leaves
from chatd_trio.config import (
    AcquireConfig,
    Config,
    LimitsConfig,
    LoopConfig,
    RequestOptions,
    StoreRetryConfig,
    StreamConfig,
)
from chatd_trio.domain import (
    JSON,
    Chat,
    ChatStatus,
    ErrorEvent,
    Message,
    MessageEvent,
    NewMessage,
    Part,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    WorkspaceAgent,
    text_of,
)
from chatd_trio.errors import ChatdError, PubSubError, StoreError, StoreUnavailable
from chatd_trio.lifecycle import Effect, Plan
from chatd_trio.models.base import Delta, Finish, PromptMessage, TextDelta, ToolSpec
from chatd_trio.models.scripted import (
    ScriptedModel,
    ScriptStep,
    error_step,
    model_error,
    text_step,
    tool_step,
)
from chatd_trio.pubsub.base import PubSub
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.server import Server
from chatd_trio.store.base import (
    Announcer,
    Applied,
    EditResult,
    FinishResult,
    Lease,
    SendResult,
    Store,
    TurnOutcome,
    Write,
)
from chatd_trio.store.memory import MemoryStore
from chatd_trio.streams import StreamSubscription
from chatd_trio.tools import ToolContext, ToolRegistry, tool
from statecharts.lifecycle import InvalidStatusPath, check_status_path

EPOCH = datetime(2030, 1, 1, tzinfo=UTC)

INVARIANTS = {
    "terminal_status": "every chat ends waiting or error (none stuck running/pending)",
    "stream_exactly_once": "every live durable message reaches every subscriber once, ids "
    "strictly increasing within an edit epoch",
    "single_owner": "no chat owned under two leases at once: no write of one acquisition "
    "(worker, ownership token) lands after the next acquisition of the chat",
    "tool_results": "every tool call in the history has exactly one result",
    "queue_promotion": "every queued message promoted at most once, in queue order, and none lost",
    "connections_released": "every workspace connection dialed was released exactly once",
    "status_path": "each chat's status path is valid per the lifecycle statechart",
    "turn_crashes": "no turn of a live replica ends by an exception it did not expect "
    "(the server's 'turn crashed')",
    "stale_token_write": "no write of a turn lands unless it carries the ownership token the "
    "chat row holds at that moment, issued to that worker by an acquisition",
    "answered_once": "every user message is answered at most once: at most one final "
    "assistant answer between two user messages (a compaction's re-entry answer aside)",
    "no_transient_error": "no turn ends in error because of an injected store fault: every "
    "error finish carries the model's error (or a crash turn_crashes reports)",
    "no_orphan_running": "no chat stays running without a live owner past stale_after "
    "(plus one recovery interval) while a replica that could recover it runs",
}

PROMPT_KINDS = ("plain", "tools", "slow", "ws", "spawn", "fail")
OP_KINDS = (
    "create",
    "send",
    "edit",
    "interrupt",
    "subscribe",
    "lag",
    "disconnect",
    "rejoin",
    "crash",
    "resync",
    "rebuild",
    "stop_ws",
    "pause",
    "outage",
    "hb_fail",
)

# What every error the simulated model raises says: a turn ended in error by the model.
MODEL_ERROR = "sim model:"


@dataclass(frozen=True)
class SimConfig:
    """Knobs of the simulation (virtual seconds)."""

    server: Config = field(
        default_factory=lambda: Config(
            acquire=AcquireConfig(acquire_interval=0.5, heartbeat_interval=1.0, stale_after=6.0),
            streams=StreamConfig(subscriber_queue_size=4),
            # Shorter than the longest outage: some turns spend the budget and hand back.
            loop=LoopConfig(store_retry=StoreRetryConfig(budget=8.0)),
        )
    )
    max_replicas: int = 3
    max_ops: int = 14
    max_gap: float = 4.0
    max_crashes: int = 2
    slow_chunks: int = 4
    slow_latency: float = 1.5
    lag_time: float = 3.0
    max_pubsub_delay: float = 2.0
    dial_hang_time: float = 20.0
    # Settling: faults off, then advance time until every chat is terminal.
    settle_step: float = 1.0
    settle_limit: float = 400.0
    catchup_limit: float = 60.0
    # Fault rates are percentages.
    max_rate: int = 30
    # Fault windows, by the operation's `a` (0-7) and `c` (0-1): a pause is short
    # (0.5-4 s) or past stale_after (stale_after + heartbeat + a * stale_after / 4);
    # an outage lasts (a + 1) * outage_unit; heartbeats fail for (a + 2) / 4 stale_after.
    short_pause_unit: float = 0.5
    outage_unit: float = 2.0
    # The orphan check samples every chat this often.
    check_interval: float = 1.0


SIM = SimConfig()


@dataclass(frozen=True)
class Op:
    kind: str
    a: int = 0
    b: int = 0
    c: int = 0
    gap: float = 0.0


@dataclass(frozen=True)
class Faults:
    """Fault rates in percent, drawn per scenario."""

    store_error: int = 0
    notify_lost: int = 0
    notify_delay: int = 0
    model_throttle: int = 0
    model_cut: int = 0
    dial_fail: int = 0
    dial_hang: int = 0


@dataclass(frozen=True)
class Scenario:
    seed: int
    replicas: int
    ops: tuple[Op, ...]
    faults: Faults
    # Message notifies sent by the store with the insert (the store is linked to the
    # shared MemoryPubSub), as PostgreSQL does with NOTIFY inside the transaction.
    notify_in_transaction: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        d = json.loads(text)
        return cls(
            seed=d["seed"],
            replicas=d["replicas"],
            ops=tuple(Op(**o) for o in d["ops"]),
            faults=Faults(**d["faults"]),
            notify_in_transaction=bool(d.get("notify_in_transaction", False)),
        )


# An integer source: (low, high) inclusive -> int. Hypothesis draws or random.randint.
IntSource = Callable[[int, int], int]


def generate(draw: IntSource, sim: SimConfig = SIM) -> Scenario:
    """A scenario from an integer source (shrinks well under Hypothesis: small is simple)."""
    seed = draw(0, 2**31 - 1)
    replicas = draw(1, sim.max_replicas)
    faults = Faults(*(draw(0, sim.max_rate) for _ in range(7)))
    n_ops = draw(1, sim.max_ops)
    ops = [Op("create", draw(0, 1), draw(0, len(PROMPT_KINDS) - 1))]
    for _ in range(n_ops):
        kind = OP_KINDS[draw(0, len(OP_KINDS) - 1)]
        ops.append(Op(kind, draw(0, 7), draw(0, 7), draw(0, 1), draw(0, 8) * sim.max_gap / 8))
    return Scenario(seed, replicas, tuple(ops), faults, notify_in_transaction=draw(0, 1) == 1)


def scenario_from_seed(seed: int, sim: SimConfig = SIM) -> Scenario:
    rng = random.Random(seed)
    return generate(rng.randint, sim)


# -- observations ------------------------------------------------------------------


@dataclass
class Interval:
    """One acquisition of a chat (one lease: worker and ownership token), from the claim
    to the last write accepted under it (a replayed write landed earlier: not counted)."""

    worker: uuid.UUID
    chat: uuid.UUID
    token: int
    start: int
    end: int


@dataclass
class Observations:
    seq: int = 0
    statuses: dict[uuid.UUID, list[str]] = field(default_factory=dict)
    intervals: list[Interval] = field(default_factory=list)
    open_interval: dict[Lease, Interval] = field(default_factory=dict)
    queued: dict[uuid.UUID, list[str]] = field(default_factory=dict)
    edits: dict[uuid.UUID, int] = field(default_factory=dict)
    queue_cleared_after: dict[uuid.UUID, int] = field(default_factory=dict)
    injected: dict[str, int] = field(default_factory=dict)
    # Every lease an acquisition issued, and each worker's latest token per chat.
    leases: set[Lease] = field(default_factory=set)
    acquired_by: dict[tuple[uuid.UUID, uuid.UUID], int] = field(default_factory=dict)
    # Writes that landed under a token the chat row did not hold (or never issued).
    stale_writes: list[str] = field(default_factory=list)
    # (chat, last_error) of every finish into `error` a live replica attempted.
    error_finishes: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    # When a stale recovery last failed (it may be what keeps a chat orphaned).
    recovery_failed_at: float = -math.inf

    def bump(self, name: str) -> None:
        self.injected[name] = self.injected.get(name, 0) + 1


# The replica a task belongs to (set in its server's task and in the sessions of its
# subscribers; tasks inherit it), with the world's pause events by replica index.
_REPLICA: contextvars.ContextVar[tuple[dict[int, trio.Event], int] | None] = contextvars.ContextVar(
    "sim_replica", default=None
)


async def hold() -> None:
    """Wait while the current task's replica is paused (SIGSTOP until SIGCONT).

    Everything a replica does outside itself goes through here first: store calls
    (and their answers: a call in flight may land while the process is stopped, its
    caller sees it after the resume), publishes, model reads, tools and dials. Its
    timers still expire in virtual time, as a stopped process' clock runs on; what
    they start waits here. Not a checkpoint unless the replica is paused.
    """
    at = _REPLICA.get()
    if at is None:
        return
    pauses, index = at
    resumed = pauses.get(index)
    if resumed is not None:
        await resumed.wait()


def token_of(parts: Sequence[Any]) -> str:
    return text_of(tuple(parts)).split(" ")[-1]


# -- the store wrapper ----------------------------------------------------------------


class WitnessStore(MemoryStore):
    """The memory store, noting for each write it applies the ownership token the chat
    row held when the write landed (a final transition raises it as it lands)."""

    def __init__(self, clock: Callable[[], datetime], *, pubsub: MemoryPubSub | None) -> None:
        super().__init__(clock, pubsub=pubsub)
        self.found_token: dict[uuid.UUID, int] = {}

    async def apply(
        self,
        chat_id: uuid.UUID,
        plan: Plan,
        write: Write,
        *,
        announce: Announcer | None = None,
    ) -> Applied:
        out = await super().apply(chat_id, plan, write, announce=announce)
        if out.applied and not out.replayed:
            self.found_token[chat_id] = out.chat.owner_token - plan.has(Effect.NEW_TOKEN)
        return out


class SimStore:
    """Wraps the shared MemoryStore: transient faults, crashed workers, observation.

    Every method of the `Store` protocol that writes is wrapped here with the
    protocol's exact signature (test_simulation.py checks it, planted bugs too);
    reads pass through, behind the same pause and outage gates. A write carrying a
    lease of a crashed replica never reaches the store.

    The stale-token witness (`_witness`) looks at every write of a turn that the
    store accepted, right after it landed (the memory store's operations run
    synchronously after one checkpoint: nothing ran in between): the lease it
    carried must be one an acquisition issued, and the row must have held its token
    when the write landed (`WitnessStore.found_token`).
    """

    FAULTY = frozenset({"acquire", "heartbeat", "recover_stale", "messages_after"})
    # A turn's writes see the faults of a lost connection (`StoreUnavailable`): before
    # the write, or after it landed (the connection died around COMMIT; the caller
    # retries under the same operation id and must not write twice).
    UNAVAILABLE = frozenset({"persist_step", "persist_compaction", "finish_turn"})

    def __init__(self, inner: WitnessStore, rng: random.Random, faults: Faults) -> None:
        self.inner = inner
        self.rng = rng
        self.faults = faults
        self.faults_on = True
        self.dead: set[uuid.UUID] = set()
        self.obs = Observations()
        # Fault windows (virtual time): every call fails until `outage_until`; a
        # worker's heartbeats fail until its `heartbeat_fails_until`.
        self.outage_until = -math.inf
        self.heartbeat_fails_until: dict[uuid.UUID, float] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def gated(*args: Any, **kwargs: Any) -> Any:
            await self._gate(name)
            out = await attr(*args, **kwargs)
            await hold()
            return out

        return gated

    def announces_to(self, pubsub: object) -> bool:
        # Every replica's SimPubSub wraps the one MemoryPubSub the store may be linked to.
        return isinstance(pubsub, SimPubSub) and self.inner.announces_to(pubsub.inner)

    @property
    def in_outage(self) -> bool:
        return trio.current_time() < self.outage_until

    # fault and liveness gates
    async def _gate(self, op: str, *workers: uuid.UUID) -> None:
        """Before a call reaches the store: a paused caller waits, an outage fails it,
        a crashed worker's write never arrives, a transient fault may hit it."""
        await hold()
        if any(worker in self.dead for worker in workers):
            await trio.lowlevel.checkpoint()
            raise StoreError("replica crashed: its writes never reach the database")
        if self.in_outage:
            self.obs.bump("store_outage_call")
            await trio.lowlevel.checkpoint()
            raise StoreUnavailable(f"injected outage: {op} cannot reach the database")
        if (
            self.faults_on
            and op in self.FAULTY
            and self.rng.randrange(100) < self.faults.store_error
        ):
            self.obs.bump(f"store_error_{op}")
            await trio.lowlevel.checkpoint()
            raise StoreError(f"injected transient failure in {op}")

    async def _unavailable(self, op: str) -> bool:
        """Maybe fail `op` as a lost connection would: raises before the write, or
        returns True when the write is to land and then be reported lost."""
        if not (
            self.faults_on
            and op in self.UNAVAILABLE
            and self.rng.randrange(100) < self.faults.store_error
        ):
            return False
        if self.rng.randrange(2):
            self.obs.bump(f"store_unavailable_{op}")
            await trio.lowlevel.checkpoint()
            raise StoreUnavailable(f"injected connection loss before {op}")
        self.obs.bump(f"store_lost_ack_{op}")
        return True

    def _lost_ack(self, op: str) -> StoreUnavailable:
        return StoreUnavailable(f"injected connection loss after {op} committed")

    def _observe(self) -> int:
        """Record every status change since the last call; the sequence number of now."""
        self.obs.seq += 1
        for chat in self.inner._chats.values():
            path = self.obs.statuses.setdefault(chat.id, ["new"])
            if path[-1] != chat.status.value:
                path.append(chat.status.value)
        return self.obs.seq

    def _acquired(self, chats: Sequence[Chat], seq: int) -> None:
        """Open an interval for each chat just claimed, under the lease it was claimed with."""
        for chat in chats:
            lease = Lease.of(chat)
            iv = Interval(lease.worker_id, chat.id, lease.token, seq, seq)
            self.obs.intervals.append(iv)
            self.obs.open_interval[lease] = iv
            self.obs.leases.add(lease)
            self.obs.acquired_by[lease.worker_id, chat.id] = lease.token

    def _landed_before(self, chat_id: uuid.UUID, op_id: uuid.UUID | None) -> bool:
        """Whether a write with this operation id already landed: the store then reports
        the earlier landing again, which writes nothing now."""
        if op_id is None:
            return False
        inner = self.inner
        return inner._last_op.get(chat_id) == op_id or (chat_id, op_id) in inner._op_messages

    def _accepted(self, lease: Lease, seq: int) -> None:
        """A write under `lease` landed at `seq`: its acquisition lasts at least until then."""
        iv = self.obs.open_interval.get(lease)
        if iv is not None:
            iv.end = seq

    def _witness(self, lease: Lease, op: str) -> None:
        """A write under `lease` was just accepted: it must carry the row's token, as
        issued to this worker (call with no checkpoint since the write landed)."""
        found = self.inner.found_token.get(lease.chat_id)
        if found != lease.token or lease not in self.obs.leases:
            issued = "issued" if lease in self.obs.leases else "never issued"
            self.obs.stale_writes.append(
                f"chat {lease.chat_id}: {op} by worker {lease.worker_id} under token "
                f"{lease.token} ({issued}) landed on the row holding token {found}"
            )

    # the primitive
    async def apply(
        self,
        chat_id: uuid.UUID,
        plan: Plan,
        write: Write,
        *,
        announce: Announcer | None = None,
    ) -> Applied:
        await self._gate("apply")
        out = await self.inner.apply(chat_id, plan, write, announce=announce)
        self._observe()
        await hold()
        return out

    # chats and messages
    async def create_chat(
        self,
        owner_id: uuid.UUID,
        title: str,
        parts: Sequence[Part],
        *,
        workspace_id: uuid.UUID | None = None,
        build_id: uuid.UUID | None = None,
        agent_id: uuid.UUID | None = None,
        parent_chat_id: uuid.UUID | None = None,
        mcp_servers: Sequence[str] = (),
        system_prompt: str | None = None,
        model_options: RequestOptions | None = None,
        limits: LimitsConfig | None = None,
        announce: Announcer | None = None,
    ) -> tuple[Chat, Message]:
        await self._gate("create_chat")
        out = await self.inner.create_chat(
            owner_id,
            title,
            parts,
            workspace_id=workspace_id,
            build_id=build_id,
            agent_id=agent_id,
            parent_chat_id=parent_chat_id,
            mcp_servers=mcp_servers,
            system_prompt=system_prompt,
            model_options=model_options,
            limits=limits,
            announce=announce,
        )
        self._observe()
        await hold()
        return out

    async def send_message(
        self,
        chat_id: uuid.UUID,
        parts: Sequence[Part],
        *,
        max_queued: int,
        announce: Announcer | None = None,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
        limits: LimitsConfig | None = None,
    ) -> SendResult:
        await self._gate("send_message")
        out = await self.inner.send_message(
            chat_id,
            parts,
            max_queued=max_queued,
            announce=announce,
            owner_id=owner_id,
            view=view,
            limits=limits,
        )
        self._observe()
        if out.queued is not None:
            self.obs.queued.setdefault(chat_id, []).append(token_of(parts))
        await hold()
        return out

    async def edit_message(
        self,
        chat_id: uuid.UUID,
        message_id: int,
        parts: Sequence[Part],
        *,
        announce: Announcer | None = None,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
        limits: LimitsConfig | None = None,
    ) -> EditResult:
        await self._gate("edit_message")
        out = await self.inner.edit_message(
            chat_id,
            message_id,
            parts,
            announce=announce,
            owner_id=owner_id,
            view=view,
            limits=limits,
        )
        self.obs.edits[chat_id] = self.obs.edits.get(chat_id, 0) + 1
        self.obs.queue_cleared_after[chat_id] = len(self.obs.queued.get(chat_id, []))
        self._observe()
        await hold()
        return out

    async def interrupt(
        self,
        chat_id: uuid.UUID,
        *,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
        announce: Announcer | None = None,
    ) -> Chat:
        await self._gate("interrupt")
        out = await self.inner.interrupt(chat_id, owner_id=owner_id, view=view, announce=announce)
        self._observe()
        await hold()
        return out

    async def messages_after(self, chat_id: uuid.UUID, after_id: int) -> list[Message]:
        await self._gate("messages_after")
        out = await self.inner.messages_after(chat_id, after_id)
        await hold()
        return out

    # the queue
    async def promote_queued(
        self,
        chat_id: uuid.UUID,
        queued_id: int,
        *,
        announce: Announcer | None = None,
        owner_id: uuid.UUID | None = None,
        view: Chat | None = None,
    ) -> SendResult:
        await self._gate("promote_queued")
        out = await self.inner.promote_queued(
            chat_id, queued_id, announce=announce, owner_id=owner_id, view=view
        )
        self._observe()
        await hold()
        return out

    # ownership
    async def acquire(
        self,
        worker_id: uuid.UUID,
        limit: int,
        *,
        announce: Announcer | None = None,
        prompts: bool = False,
    ) -> list[Chat]:
        await self._gate("acquire", worker_id)
        chats = await self.inner.acquire(worker_id, limit, announce=announce, prompts=prompts)
        self._acquired(chats, self._observe())
        await hold()
        return chats

    async def release(self, leases: Sequence[Lease]) -> None:
        await self._gate("release", *(lease.worker_id for lease in leases))
        await self.inner.release(leases)
        self._observe()
        await hold()

    async def heartbeat(self, lease: Lease) -> bool:
        await self._gate("heartbeat", lease.worker_id)
        if trio.current_time() < self.heartbeat_fails_until.get(lease.worker_id, -math.inf):
            self.obs.bump("heartbeat_fail_call")
            await trio.lowlevel.checkpoint()
            raise StoreUnavailable("injected heartbeat failure")
        owned = await self.inner.heartbeat(lease)
        if owned:
            self._witness(lease, "heartbeat")
        seq = self._observe()
        if owned:
            self._accepted(lease, seq)
        await hold()
        return owned

    async def recover_stale(
        self, stale_after: float, *, announce: Announcer | None = None
    ) -> list[uuid.UUID]:
        try:
            await self._gate("recover_stale")
        except ChatdError:
            self.obs.recovery_failed_at = trio.current_time()
            raise
        ids = await self.inner.recover_stale(stale_after, announce=announce)
        self._observe()
        await hold()
        return ids

    async def persist_step(
        self,
        lease: Lease,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
        op_id: uuid.UUID | None = None,
    ) -> list[Message]:
        await self._gate("persist_step", lease.worker_id)
        lost_ack = await self._unavailable("persist_step")
        replay = self._landed_before(lease.chat_id, op_id)
        # Refused (PersistRefused, OwnershipLost): nothing landed, the interval ends earlier.
        out = await self.inner.persist_step(lease, messages, announce=announce, op_id=op_id)
        if not replay:
            self._witness(lease, "persist_step")
        seq = self._observe()
        if not replay:
            self._accepted(lease, seq)
        await hold()
        if lost_ack:
            raise self._lost_ack("persist_step")
        return out

    async def persist_compaction(
        self,
        lease: Lease,
        messages: Sequence[NewMessage],
        *,
        announce: Announcer | None = None,
        op_id: uuid.UUID | None = None,
    ) -> list[Message]:
        await self._gate("persist_compaction", lease.worker_id)
        lost_ack = await self._unavailable("persist_compaction")
        replay = self._landed_before(lease.chat_id, op_id)
        out = await self.inner.persist_compaction(lease, messages, announce=announce, op_id=op_id)
        if not replay:
            self._witness(lease, "persist_compaction")
        seq = self._observe()
        if not replay:
            self._accepted(lease, seq)
        await hold()
        if lost_ack:
            raise self._lost_ack("persist_compaction")
        return out

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
        if outcome is TurnOutcome.ERROR and lease.worker_id not in self.dead:
            self.obs.error_finishes.append((lease.chat_id, last_error or ""))
        await self._gate("finish_turn", lease.worker_id)
        lost_ack = await self._unavailable("finish_turn")
        replay = self._landed_before(lease.chat_id, op_id)
        out = await self.inner.finish_turn(
            lease, outcome, last_error, messages=messages, announce=announce, op_id=op_id
        )
        if out.changed and not replay:
            self._witness(lease, "finish_turn")
        seq = self._observe()
        if out.changed and not replay:
            self._accepted(lease, seq)
        await hold()
        if lost_ack:
            raise self._lost_ack("finish_turn")
        return out

    # workspaces
    async def update_binding(
        self,
        chat_id: uuid.UUID,
        workspace_id: uuid.UUID | None,
        build_id: uuid.UUID | None,
        agent_id: uuid.UUID | None,
        *,
        lease: Lease | None = None,
    ) -> None:
        if lease is None:
            await self._gate("update_binding")
            await self.inner.update_binding(chat_id, workspace_id, build_id, agent_id)
            await hold()
            return
        await self._gate("update_binding", lease.worker_id)
        await self.inner.update_binding(chat_id, workspace_id, build_id, agent_id, lease=lease)
        self._witness(lease, "update_binding")
        self._accepted(lease, self._observe())
        await hold()

    def as_store(self) -> Store:
        return cast(Store, self)


# -- the pubsub wrapper ---------------------------------------------------------------


class SimPubSub:
    """One replica's view of the shared MemoryPubSub: lost / delayed notifies, death.

    A lost notify is what a dropped LISTEN connection does: the notify is gone and
    every subscription gets a resync. Delays keep per-channel order (a port promise)
    but reorder across channels.
    """

    def __init__(
        self,
        inner: MemoryPubSub,
        rng: random.Random,
        faults: Faults,
        nursery: trio.Nursery,
        sim: SimConfig,
        obs: Observations,
        shared: dict[str, Any],
        store: SimStore,
    ) -> None:
        self.inner = inner
        self.store = store
        self.rng = rng
        self.faults = faults
        self.nursery = nursery
        self.sim = sim
        self.obs = obs
        self.alive = True
        # Shared across replicas: per-channel FIFO of delayed publishes, and the switch.
        self.shared = shared

    @property
    def payload_limit(self) -> int:
        return self.inner.payload_limit

    def subscribe(self, channel: str) -> Any:
        return self.inner.subscribe(channel)

    def seal(self, channel: str, payload: str) -> str:
        return self.inner.seal(channel, payload)

    def statistics(self) -> Any:
        return self.inner.statistics()

    async def publish(self, channel: str, payload: str) -> None:
        await hold()
        if not self.alive:
            await trio.lowlevel.checkpoint()
            return
        if self.store.in_outage:
            # NOTIFY goes through the same database: it fails with it.
            self.obs.bump("notify_outage")
            await trio.lowlevel.checkpoint()
            raise PubSubError("injected outage: publish cannot reach the database")
        queues: dict[str, list[str]] = self.shared.setdefault("queues", {})
        faults_on = bool(self.shared.get("faults_on", True))
        if faults_on and self.rng.randrange(100) < self.faults.notify_lost:
            self.obs.bump("notify_lost")
            await trio.lowlevel.checkpoint()
            self.inner.force_resync("injected notify loss")
            return
        if channel in queues or (faults_on and self.rng.randrange(100) < self.faults.notify_delay):
            self.obs.bump("notify_delayed")
            if channel not in queues:
                queues[channel] = []
                delay = self.rng.uniform(0.0, self.sim.max_pubsub_delay)
                self.nursery.start_soon(self._drain, channel, delay)
            queues[channel].append(payload)
            await trio.lowlevel.checkpoint()
            return
        await self.inner.publish(channel, payload)

    async def _drain(self, channel: str, delay: float) -> None:
        await trio.sleep(delay)
        queues: dict[str, list[str]] = self.shared["queues"]
        while queues[channel]:
            payload = queues[channel].pop(0)
            await self.inner.publish(channel, payload)
        del queues[channel]

    def as_pubsub(self) -> PubSub:
        return cast(PubSub, self)


# -- the fake workspace agent ---------------------------------------------------------


class FakeConn:
    """An in-process workspace agent connection (a fake of the external agent)."""

    async def execute(
        self,
        command: str,
        timeout: float,  # noqa: ASYNC109 - protocol signature
        *,
        output_limit: int | None = None,
    ) -> Any:
        from chatd_trio.agent import ExecResult

        await hold()
        await trio.lowlevel.checkpoint()
        return ExecResult(0, f"ran {command}", False, False)

    async def read_file(self, path: str) -> Any:
        from chatd_trio.agent import FileContent

        await hold()
        await trio.lowlevel.checkpoint()
        return FileContent(path, "", 0, False)

    async def write_file(self, path: str, content: str) -> int:
        await hold()
        await trio.lowlevel.checkpoint()
        return len(content)

    async def list_dir(self, path: str = ".") -> list[Any]:
        await hold()
        await trio.lowlevel.checkpoint()
        return []

    async def instruction_files(self) -> list[Any]:
        await hold()
        await trio.lowlevel.checkpoint()
        return []

    async def mcp_list_tools(self) -> list[Any]:
        await hold()
        await trio.lowlevel.checkpoint()
        return []

    async def mcp_call_tool(self, server: str, tool: str, arguments: dict[str, Any]) -> Any:
        await hold()
        await trio.lowlevel.checkpoint()
        raise ChatdError("no MCP servers in the simulation")


class FakeDialer:
    """Dials FakeConns; can hang or fail; counts every release."""

    def __init__(self, rng: random.Random, faults: Faults, sim: SimConfig) -> None:
        self.rng = rng
        self.faults = faults
        self.sim = sim
        self.faults_on = True
        self.dialed = 0
        self.released: dict[int, int] = {}
        # Where injected faults are counted (the world points it at its observations).
        self.obs: Observations | None = None

    async def __call__(self, agent: WorkspaceAgent) -> tuple[Any, Callable[[], Any]]:
        await hold()
        if self.faults_on and self.rng.randrange(100) < self.faults.dial_hang:
            if self.obs is not None:
                self.obs.bump("dial_hang")
            await trio.sleep(self.sim.dial_hang_time)
        if self.faults_on and self.rng.randrange(100) < self.faults.dial_fail:
            if self.obs is not None:
                self.obs.bump("dial_fail")
            await trio.lowlevel.checkpoint()
            from chatd_trio.errors import DialError

            raise DialError(ConnectionError("injected dial failure"))
        await trio.lowlevel.checkpoint()
        self.dialed += 1
        n = self.dialed
        self.released[n] = 0

        async def release() -> None:
            await trio.lowlevel.checkpoint()
            self.released[n] += 1

        return FakeConn(), release


# -- the model ------------------------------------------------------------------------


@tool("echo", "Echo the arguments.", {"type": "object"})
async def echo(args: dict[str, JSON], ctx: ToolContext) -> JSON:
    await hold()
    await trio.lowlevel.checkpoint()
    return {"echo": args}


class SimModel(ScriptedModel):
    """The scripted model as a paused replica sees it: nothing is read from the stream
    while the replica is paused (the provider's deltas wait in the connection)."""

    @contextlib.asynccontextmanager
    async def stream(
        self, messages: Sequence[PromptMessage], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[AsyncIterator[Delta]]:
        await hold()
        async with super().stream(messages, tools) as deltas:
            held = self._held(deltas)
            try:
                yield held
            finally:
                await held.aclose()

    @staticmethod
    async def _held(deltas: AsyncIterator[Delta]) -> AsyncGenerator[Delta, None]:
        async for delta in deltas:
            await hold()
            yield delta


def _kind_of(text: str) -> str:
    return text.split(" ")[0] if text else "plain"


def model_for(
    replica: int,
    rng: random.Random,
    faults: Faults,
    state: dict[str, bool],
    sim: SimConfig,
    obs: Observations | None = None,
) -> ScriptedModel:
    """A model reacting to the prompt: the user's latest message names what to do."""

    def step(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
        prefix = f"r{replica}s{index}"
        if state["faults_on"]:
            if rng.randrange(100) < faults.model_throttle:
                if obs is not None:
                    obs.bump("model_throttle")
                return error_step(
                    model_error(429, retry_after=1.0, message=f"{MODEL_ERROR} throttled")
                )
            if rng.randrange(100) < faults.model_cut:
                if obs is not None:
                    obs.bump("model_cut")
                return ScriptStep(
                    (TextDelta("cut"), TextDelta("off"), Finish(_usage(), "stop")),
                    error=model_error(503, kind="stream_cut", message=f"{MODEL_ERROR} stream cut"),
                    cut_after=1,
                )
        last = prompt[-1] if prompt else None
        if last is not None and last.role is Role.TOOL:
            spawned = [p for p in last.parts if isinstance(p, ToolResultPart)]
            if spawned and spawned[0].name == "spawn_agent" and isinstance(spawned[0].result, dict):
                child = spawned[0].result.get("chat_id")
                if isinstance(child, str):
                    return tool_step([("wait_agent", {"chat_id": child})], call_id_prefix=prefix)
            return text_step("done", chunks=2)
        user = [m for m in prompt if m.role is Role.USER]
        kind = _kind_of(text_of(user[-1].parts)) if user else "plain"
        if kind == "tools":
            return tool_step([("echo", {"n": 1}), ("echo", {"n": 2})], call_id_prefix=prefix)
        if kind == "slow":
            return text_step("slowly answering", chunks=sim.slow_chunks, latency=sim.slow_latency)
        if kind == "ws":
            return tool_step([("execute", {"command": "ls"})], call_id_prefix=prefix)
        if kind == "spawn":
            return tool_step([("spawn_agent", {"prompt": "plain sub"})], call_id_prefix=prefix)
        if kind == "fail":
            return error_step(
                model_error(400, retryable=False, kind="bad_request", message=f"{MODEL_ERROR} no")
            )
        return text_step("answer", chunks=2)

    return SimModel(step)


def _usage() -> Any:
    from chatd_trio.domain import Usage

    return Usage()


# -- subscribers ----------------------------------------------------------------------


@dataclass
class Client:
    """A user's view of one chat across subscription sessions (rejoins resume the cursor)."""

    chat: int
    ids: list[int] = field(default_factory=list)
    scope: trio.CancelScope | None = None
    replica: int = 0
    lag_until: float = 0.0
    handle: StreamSubscription | None = None
    ended: bool = False

    @property
    def last(self) -> int:
        return self.ids[-1] if self.ids else 0


SubscribeWrap = Callable[[StreamSubscription], Any]


# -- the world ------------------------------------------------------------------------


@dataclass
class Replica:
    server: Server
    pubsub: SimPubSub
    scope: trio.CancelScope
    alive: bool = True


@dataclass
class Hooks:
    """Planted-bug hooks: replace a fake or wrapper with a deliberately broken one."""

    store: Callable[[WitnessStore, random.Random, Faults], SimStore] = SimStore
    dialer: Callable[[random.Random, Faults, SimConfig], FakeDialer] = FakeDialer
    # Wraps each subscription's receive: returns the events to record for one event.
    deliver: Callable[[MessageEvent], list[MessageEvent]] = lambda ev: [ev]


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str


class Unreachable(ChatdError):
    """A user's request finds no replica to serve it (every one is paused)."""


@dataclass
class Result:
    scenario: Scenario
    violations: list[Violation]
    chats: int
    steps: int
    injected: dict[str, int]
    # Store operations that sent message notifies with their insert.
    notified_in_transaction: int = 0
    # How the replicas' turns ended (`ServerStats.turns_finished`, summed).
    turns_finished: dict[str, int] = field(default_factory=dict)


class World:
    def __init__(self, scenario: Scenario, sim: SimConfig, hooks: Hooks) -> None:
        self.sc = scenario
        self.sim = sim
        self.hooks = hooks
        self.rng = random.Random(scenario.seed)
        self.memps = MemoryPubSub()
        self.inner = WitnessStore(
            clock=lambda: EPOCH + timedelta(seconds=trio.current_time()),
            pubsub=self.memps if scenario.notify_in_transaction else None,
        )
        self.store = hooks.store(self.inner, random.Random(self.rng.random()), scenario.faults)
        self.dialer = hooks.dialer(random.Random(self.rng.random()), scenario.faults, sim)
        self.dialer.obs = self.store.obs
        self.shared: dict[str, Any] = {"faults_on": True}
        self.model_state = {"faults_on": True}
        self.replicas: list[Replica] = []
        self.chats: list[uuid.UUID] = []
        self.owners = [uuid.uuid4(), uuid.uuid4()]
        self.clients: list[Client] = []
        self.crashes = 0
        self.workspace: uuid.UUID | None = None
        self.build_n = 0
        self.tokens = 0
        # The server's turn crash reports (see `crash_log`), set after the run.
        self.turn_crashes: list[str] = []
        # Messages of crashes by exceptions no fault injects (turn_crashes' business).
        self.crash_messages: set[str] = set()
        # Paused replicas (by index): set when they resume. Open fault windows.
        self.pauses: dict[int, trio.Event] = {}
        self.windows = 0
        # Running chats without a live owner: (token, seconds a replica could have
        # recovered them), and the violations found while sampling.
        self.orphans: dict[uuid.UUID, tuple[int, float]] = {}
        self.orphan_violations: list[Violation] = []

    # replicas
    async def start_replica(self, nursery: trio.Nursery) -> None:
        index = len(self.replicas)
        ps = SimPubSub(
            self.memps,
            random.Random(self.rng.random()),
            self.sc.faults,
            nursery,
            self.sim,
            self.store.obs,
            self.shared,
            self.store,
        )
        model = model_for(
            index,
            random.Random(self.rng.random()),
            self.sc.faults,
            self.model_state,
            self.sim,
            self.store.obs,
        )
        server = Server(
            self.store.as_store(),
            ps.as_pubsub(),
            model,
            self.sim.server,
            tools=ToolRegistry([echo]),
            worker_id=uuid.UUID(int=self.rng.getrandbits(128), version=4),
            dialer=self.dialer,
        )
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
            # Every task of this server inherits it: a pause of this replica holds them.
            _REPLICA.set((self.pauses, index))
            with scope:
                await server.run(task_status=task_status)

        await nursery.start(run)
        self.replicas.append(Replica(server, ps, scope))

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def reachable(self) -> list[Replica]:
        """Live replicas that are not paused: the ones a user's request can reach."""
        return [r for i, r in enumerate(self.replicas) if r.alive and i not in self.pauses]

    def pick(self, n: int) -> Replica:
        reachable = self.reachable()
        if not reachable:
            raise Unreachable("every replica is paused")
        return reachable[n % len(reachable)]

    def crash(self, rep: Replica) -> None:
        """Kill a replica: its writes and publishes stop reaching anything, tasks end."""
        rep.alive = False
        self.store.dead.add(rep.server.worker_id)
        rep.pubsub.alive = False
        rep.scope.cancel()
        for client in self.clients:
            if client.replica == self.replicas.index(rep) and client.scope is not None:
                client.scope.cancel()

    # workspace
    async def ensure_workspace(self) -> uuid.UUID:
        if self.workspace is None:
            ws = await self.inner.create_workspace(self.owners[0], "sim")
            self.workspace = ws.id
            await self.rebuild(agents=True)
        return self.workspace

    async def rebuild(self, *, agents: bool) -> None:
        assert self.workspace is not None
        build = await self.inner.create_build(self.workspace)
        self.build_n += 1
        if agents:
            await self.inner.create_agent(build.id, "main", f"sim:{self.build_n}", "token")

    def text(self, kind_index: int) -> str:
        self.tokens += 1
        return f"{PROMPT_KINDS[kind_index % len(PROMPT_KINDS)]} t{self.tokens}"

    # subscribers
    async def client_session(self, client: Client, rep_index: int, scope: trio.CancelScope) -> None:
        """Subscribe from the client's last id; a retryable stream error or an ended
        subscription makes the client re-subscribe (as a real client does)."""
        # The session is served by that replica: a pause of it holds the session too.
        _REPLICA.set((self.pauses, rep_index))
        rep = self.replicas[rep_index]
        client.replica = rep_index
        chat_id = self.chats[client.chat]
        owner = self.inner._chats[chat_id].owner_id
        with scope:
            while True:
                # A subscription that cannot start (the store is unreachable) is retried.
                with contextlib.suppress(ChatdError):
                    async with rep.server.subscribe(owner, chat_id, client.last) as sub:
                        client.handle = sub
                        try:
                            async for ev in sub:
                                if client.lag_until > trio.current_time():
                                    await trio.sleep_until(client.lag_until)
                                if isinstance(ev, MessageEvent):
                                    for got in self.hooks.deliver(ev):
                                        client.ids.append(got.message.id)
                                elif isinstance(ev, ErrorEvent) and ev.error.kind == "snapshot":
                                    break
                        finally:
                            client.handle = None
                await trio.sleep(self.sim.settle_step)
        if client.scope is scope:
            client.scope = None

    def start_client(self, nursery: trio.Nursery, client: Client, rep_index: int) -> None:
        # Set before the task runs: a rejoin right after must not start a second session.
        client.scope = trio.CancelScope()
        nursery.start_soon(self.client_session, client, rep_index, client.scope)

    # operations
    async def apply(self, op: Op, nursery: trio.Nursery) -> None:
        if op.kind == "create" or not self.chats:
            rep = self.pick(op.a)
            kind = op.b % len(PROMPT_KINDS)
            ws = await self.ensure_workspace() if PROMPT_KINDS[kind] == "ws" else None
            chat = await rep.server.create_chat(
                self.owners[op.a % 2], self.text(kind), workspace_id=ws
            )
            self.chats.append(chat.id)
            return
        chat_id = self.chats[op.a % len(self.chats)]
        owner = self.inner._chats[chat_id].owner_id
        rep = self.pick(op.b)
        if op.kind == "send":
            await rep.server.send_message(
                owner, chat_id, self.text(op.b), busy_behavior="interrupt" if op.c else "queue"
            )
        elif op.kind == "edit":
            users = [
                self.inner._messages[i]
                for i in self.inner._chat_message_ids.get(chat_id, [])
                if self.inner._messages[i].role is Role.USER and not self.inner._messages[i].deleted
            ]
            if users:
                target = users[-1 if op.c else 0]
                await rep.server.edit_message(owner, chat_id, target.id, self.text(op.b))
        elif op.kind == "interrupt":
            await rep.server.interrupt(owner, chat_id)
        elif op.kind == "subscribe":
            client = Client(op.a % len(self.chats))
            self.clients.append(client)
            self.start_client(nursery, client, self.replicas.index(rep))
        elif op.kind in ("lag", "disconnect", "rejoin") and self.clients:
            client = self.clients[op.a % len(self.clients)]
            if op.kind == "lag":
                client.lag_until = trio.current_time() + self.sim.lag_time
            elif op.kind == "disconnect" and client.scope is not None:
                client.scope.cancel()
            elif op.kind == "rejoin" and client.scope is None:
                self.start_client(nursery, client, self.replicas.index(rep))
        elif op.kind == "crash" and self.crashes < self.sim.max_crashes:
            self.crashes += 1
            self.crash(rep)
            await self.start_replica(nursery)
        elif op.kind == "resync":
            self.memps.force_resync("injected connection drop")
        elif op.kind in ("rebuild", "stop_ws") and self.workspace is not None:
            await self.rebuild(agents=op.kind == "rebuild")
        elif op.kind == "pause":
            acq = self.sim.server.acquire
            long = acq.stale_after + acq.heartbeat_interval + op.a * acq.stale_after / 4
            short = (op.a + 1) * self.sim.short_pause_unit
            self.pause(nursery, rep, long if op.c else short)
        elif op.kind == "outage":
            self.outage(nursery, (op.a + 1) * self.sim.outage_unit)
        elif op.kind == "hb_fail":
            self.heartbeats_fail(nursery, rep, (op.a + 2) * self.sim.server.acquire.stale_after / 4)

    # fault windows
    def open_window(self, nursery: trio.Nursery, duration: float, end: Callable[[], None]) -> None:
        """A fault window that `end` closes after `duration` (or when the world ends)."""
        self.windows += 1

        async def close() -> None:
            try:
                await trio.sleep(duration)
            finally:
                end()
                self.windows -= 1

        nursery.start_soon(close)

    def pause(self, nursery: trio.Nursery, rep: Replica, duration: float) -> None:
        """SIGSTOP the replica for `duration`, then SIGCONT (see `hold`)."""
        index = self.replicas.index(rep)
        resumed = trio.Event()
        self.pauses[index] = resumed
        past_stale = duration > self.sim.server.acquire.stale_after
        self.store.obs.bump("pause_long" if past_stale else "pause_short")
        until = trio.current_time() + duration
        for client in self.clients:
            if client.replica == index:
                # Its subscribers hear nothing from it until it resumes.
                client.lag_until = max(client.lag_until, until)

        def end() -> None:
            del self.pauses[index]
            resumed.set()
            # Its turns own their chats again, if only until the next sample.
            self.forget_owned_orphans()

        self.open_window(nursery, duration, end)

    def outage(self, nursery: trio.Nursery, duration: float) -> None:
        """The database is gone for `duration`: every store call and publish fails; when
        it is back, every LISTEN reconnects (subscriptions resync)."""
        self.store.obs.bump("outage")
        self.store.outage_until = max(self.store.outage_until, trio.current_time() + duration)

        def end() -> None:
            if not self.store.in_outage:
                self.memps.force_resync("injected outage over")

        self.open_window(nursery, duration, end)

    def heartbeats_fail(self, nursery: trio.Nursery, rep: Replica, duration: float) -> None:
        """Every heartbeat of the replica fails for `duration`; its turns go on."""
        worker = rep.server.worker_id
        self.store.obs.bump("heartbeat_fail")
        until = trio.current_time() + duration
        fails = self.store.heartbeat_fails_until
        fails[worker] = max(fails.get(worker, -math.inf), until)
        self.open_window(nursery, duration, lambda: None)

    # the orphan check
    def owned_live(self, chat: Chat, reachable: Sequence[Replica]) -> bool:
        """Whether a running replica has a turn holding the chat under the row's token."""
        acquired = self.store.obs.acquired_by
        return any(
            r.server.worker_id == chat.worker_id
            and chat.id in r.server.running_chats
            and acquired.get((r.server.worker_id, chat.id)) == chat.owner_token
            for r in reachable
        )

    def forget_owned_orphans(self) -> None:
        """Drop the orphans whose owner runs them now (a resumed replica): the time
        without a live owner starts again at their next loss."""
        reachable = self.reachable()
        for chat_id in list(self.orphans):
            if self.owned_live(self.inner._chats[chat_id], reachable):
                del self.orphans[chat_id]

    def check_orphans(self, dt: float) -> None:
        """One sample: age every running chat without a live owner by `dt` when some
        replica could have recovered it meanwhile (one is running and not paused, the
        store is reachable, no stale recovery failed lately); report one older than
        `stale_after` plus one recovery interval (and the sampling's slack)."""
        acq = self.sim.server.acquire
        now = trio.current_time()
        reachable = self.reachable()
        could_recover = (
            bool(reachable)
            and not self.store.in_outage
            and now - self.store.obs.recovery_failed_at > acq.stale_recovery_interval + dt
        )
        bound = acq.stale_after + acq.stale_recovery_interval + 2 * self.sim.check_interval
        running: set[uuid.UUID] = set()
        for chat in self.inner._chats.values():
            if chat.status is not ChatStatus.RUNNING:
                continue
            running.add(chat.id)
            if self.owned_live(chat, reachable):
                self.orphans.pop(chat.id, None)
                continue
            token, age = self.orphans.get(chat.id, (chat.owner_token, 0.0))
            if token != chat.owner_token:
                age = 0.0
            reported = age > bound
            age += dt if could_recover else 0.0
            self.orphans[chat.id] = (chat.owner_token, age)
            if age > bound and not reported:
                self.orphan_violations.append(
                    Violation(
                        "no_orphan_running",
                        f"chat {chat.id} running under token {chat.owner_token} (worker "
                        f"{chat.worker_id}) without a live owner for {age:.1f} s that a "
                        f"replica could have recovered it (bound {bound:.1f} s)",
                    )
                )
        for gone in set(self.orphans) - running:
            del self.orphans[gone]

    async def watch_orphans(self) -> None:
        while True:
            await trio.sleep(self.sim.check_interval)
            self.check_orphans(self.sim.check_interval)

    def faults_off(self) -> None:
        self.store.faults_on = False
        self.shared["faults_on"] = False
        self.model_state["faults_on"] = False
        self.dialer.faults_on = False

    def settled(self) -> bool:
        if self.shared.get("queues"):
            return False
        # A turn still finishing may promote a queued message: not settled yet.
        if any(r.server.running_chats for r in self.live()):
            return False
        return all(
            c.status in (ChatStatus.WAITING, ChatStatus.ERROR) for c in self.inner._chats.values()
        )

    def live_ids(self, chat_id: uuid.UUID) -> list[int]:
        return [
            m.id
            for i in self.inner._chat_message_ids.get(chat_id, [])
            if not (m := self.inner._messages[i]).deleted and m.visibility.value != "model"
        ]

    def caught_up(self, client: Client) -> bool:
        live = self.live_ids(self.chats[client.chat])
        target = live[-1] if live else 0
        return client.handle is not None and client.last == target and client.handle.backlog == 0

    async def play(self) -> list[Violation]:
        violations: list[Violation] = []
        async with trio.open_nursery() as nursery:
            for _ in range(self.sc.replicas):
                await self.start_replica(nursery)
            watch = trio.CancelScope()

            async def watching() -> None:
                with watch:
                    await self.watch_orphans()

            nursery.start_soon(watching)
            for op in self.sc.ops:
                # Refused user operations (queue full, edit refused) are fine.
                with contextlib.suppress(ChatdError):
                    await self.apply(op, nursery)
                await trio.sleep(op.gap)
            self.faults_off()
            deadline = trio.current_time() + self.sim.settle_limit
            # Open fault windows (a pause, an outage) run to their end first.
            while (self.windows or not self.settled()) and trio.current_time() < deadline:  # noqa: ASYNC110 - polls a settling world on virtual time
                await trio.sleep(self.sim.settle_step)
            # The end of the scenario is a checkpoint too.
            self.check_orphans(0.0)
            if not self.settled():
                stuck = {
                    str(c.id)[:8]: c.status.value
                    for c in self.inner._chats.values()
                    if c.status not in (ChatStatus.WAITING, ChatStatus.ERROR)
                }
                violations.append(Violation("terminal_status", f"stuck chats: {stuck}"))
            live_reps = [self.replicas.index(r) for r in self.live()]
            for i, client in enumerate(self.clients):
                client.lag_until = 0.0
                if client.scope is None or client.scope.cancel_called:
                    self.start_client(nursery, client, live_reps[i % len(live_reps)])
            deadline = trio.current_time() + self.sim.catchup_limit
            while (  # noqa: ASYNC110 - polls a settling world on virtual time
                not all(self.caught_up(c) for c in self.clients) and trio.current_time() < deadline
            ):
                await trio.sleep(self.sim.settle_step)
            for client in self.clients:
                if client.scope is not None:
                    client.scope.cancel()
            watch.cancel()
            with trio.CancelScope(shield=True):
                for rep in self.live():
                    await rep.server.close()
            nursery.cancel_scope.cancel()
        return violations


# -- the checker ----------------------------------------------------------------------


def epochs(ids: Sequence[int]) -> list[list[int]]:
    """Split delivered ids where they go back (a full refresh starts a new epoch)."""
    out: list[list[int]] = [[]]
    last = 0
    for i in ids:
        if i <= last:
            out.append([])
        out[-1].append(i)
        last = i
    return out


def check(world: World) -> list[Violation]:
    """Every invariant of INVARIANTS on the final state and the observations."""
    v: list[Violation] = []
    inner, obs = world.inner, world.store.obs
    for chat in inner._chats.values():
        if chat.status not in (ChatStatus.WAITING, ChatStatus.ERROR):
            v.append(Violation("terminal_status", f"chat {chat.id} ends {chat.status.value}"))
    # streams
    for n, client in enumerate(world.clients):
        chat_id = world.chats[client.chat]
        live = world.live_ids(chat_id)
        parts = epochs(client.ids)
        edits = obs.edits.get(chat_id, 0)
        if len(parts) - 1 > edits:
            v.append(
                Violation(
                    "stream_exactly_once",
                    f"client {n}: {len(parts)} epochs with {edits} edits: {parts}",
                )
            )
        live_set = set(live)
        got = [i for i in parts[-1] if i in live_set]
        if got != live:
            v.append(Violation("stream_exactly_once", f"client {n}: got {got}, live {live}"))
    # ownership
    ivs = sorted(obs.intervals, key=lambda iv: iv.start)
    for i, a in enumerate(ivs):
        for b in ivs[i + 1 :]:
            if b.start > a.end:
                break
            if a.chat == b.chat and (a.worker, a.token) != (b.worker, b.token):
                v.append(
                    Violation(
                        "single_owner",
                        f"chat {a.chat}: {a.worker} token {a.token} [{a.start},{a.end}] "
                        f"overlaps {b.worker} token {b.token} [{b.start},{b.end}]",
                    )
                )
    # tool calls and queue
    for chat_id, ids in inner._chat_message_ids.items():
        msgs = [inner._messages[i] for i in ids]
        live_msgs = [m for m in msgs if not m.deleted]
        calls = [p.call_id for m in live_msgs for p in m.parts if isinstance(p, ToolCallPart)]
        results = [p.call_id for m in live_msgs for p in m.parts if isinstance(p, ToolResultPart)]
        for call in set(calls) | set(results):
            if calls.count(call) != 1 or results.count(call) != 1:
                v.append(
                    Violation(
                        "tool_results",
                        f"chat {chat_id}: call {call} x{calls.count(call)}, "
                        f"results x{results.count(call)}",
                    )
                )
        queued = obs.queued.get(chat_id, [])
        user_tokens = [
            token_of(m.parts)
            for m in msgs
            if m.role is Role.USER and any(isinstance(p, TextPart) for p in m.parts)
        ]
        promoted = [t for t in user_tokens if t in set(queued)]
        if len(promoted) != len(set(promoted)):
            v.append(Violation("queue_promotion", f"chat {chat_id}: promoted twice {promoted}"))
        if promoted != [t for t in queued if t in set(promoted)]:
            v.append(Violation("queue_promotion", f"chat {chat_id}: order {promoted} vs {queued}"))
        remaining = {token_of(q.parts) for q in inner._queues.get(chat_id, [])}
        cleared = obs.queue_cleared_after.get(chat_id, 0)
        for pos, tok in enumerate(queued):
            if tok not in promoted and tok not in remaining and pos >= cleared:
                v.append(Violation("queue_promotion", f"chat {chat_id}: {tok} lost"))
    # connections
    for n, count in world.dialer.released.items():
        if count != 1:
            v.append(Violation("connections_released", f"connection {n} released {count} times"))
    # crashes
    for crash in world.turn_crashes:
        v.append(Violation("turn_crashes", crash))
    # status paths
    for chat_id, path in obs.statuses.items():
        try:
            check_status_path(path)
        except InvalidStatusPath as exc:
            v.append(Violation("status_path", f"chat {chat_id}: {path}: {exc}"))
    # fencing
    for stale in obs.stale_writes:
        v.append(Violation("stale_token_write", stale))
    # answers
    for chat_id, ids in inner._chat_message_ids.items():
        live_msgs = [m for i in ids if not (m := inner._messages[i]).deleted]
        for user, count in answers_per_user_message(live_msgs):
            if count > 1:
                v.append(
                    Violation(
                        "answered_once",
                        f"chat {chat_id}: user message {user} answered {count} times",
                    )
                )
    # errors
    for chat_id, message in obs.error_finishes:
        if MODEL_ERROR in message or message in world.crash_messages:
            continue
        v.append(
            Violation("no_transient_error", f"chat {chat_id}: turn ended in error: {message!r}")
        )
    v.extend(world.orphan_violations)
    return v


def is_answer(m: Message) -> bool:
    """A final answer: an assistant message with text and no tool call (not a compaction's)."""
    return (
        m.role is Role.ASSISTANT
        and not m.compressed
        and not any(isinstance(p, ToolCallPart) for p in m.parts)
        and bool(text_of(m.parts).strip())
    )


def answers_per_user_message(messages: Sequence[Message]) -> list[tuple[int, int]]:
    """(user message id, answers before the next user message) for a chat's live
    messages in id order. A compaction (its compressed messages) starts the count
    again: the loop's re-entry answers after it."""
    out: list[tuple[int, int]] = []
    count = 0
    for m in messages:
        if m.role is Role.USER and not m.compressed:
            out.append((m.id, 0))
            count = 0
        elif m.compressed:
            count = 0
        elif out and is_answer(m):
            count += 1
            out[-1] = (out[-1][0], max(out[-1][1], count))
    return out


# -- running ----------------------------------------------------------------------------


class CrashLog(logging.Handler):
    """The turns the server reports as crashed ('turn crashed', logged with the
    exception), but for those of a replica the simulation had crashed already (its
    writes fail on purpose)."""

    def __init__(self, dead: set[uuid.UUID]) -> None:
        super().__init__(logging.ERROR)
        self.dead = dead
        self.crashes: list[str] = []
        # What the server records as the error of each turn that crashed by an exception
        # no fault injects (a crash by a store fault is a transient error too).
        self.messages: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() != "turn crashed":
            return
        worker = str(getattr(record, "worker_id", ""))
        if worker in {str(w) for w in self.dead}:
            return
        exc = record.exc_info[1] if record.exc_info else None
        # Every failure of the crash (a group's leaves); the message is the one the
        # server records, which names them all.
        failures = leaves(exc) if exc is not None else []
        chat = getattr(record, "chat_id", "?")
        self.crashes.extend(f"chat {chat}: {leaf!r}" for leaf in failures or [None])
        if failures and not any(isinstance(leaf, StoreError) for leaf in failures):
            self.messages.add("; ".join(str(leaf) or type(leaf).__name__ for leaf in failures))


@contextlib.contextmanager
def crash_log(dead: set[uuid.UUID]) -> Iterator[CrashLog]:
    """Collect the server's crash reports while a scenario plays, whatever the logging
    configuration (the level is raised to ERROR for the run if it is above it)."""
    log = logging.getLogger("chatd_trio.server")
    handler = CrashLog(dead)
    level = log.level
    if not log.isEnabledFor(logging.ERROR):
        log.setLevel(logging.ERROR)
    if not log.isEnabledFor(logging.ERROR):
        raise RuntimeError("logging.disable() hides the server's crash reports from the checker")
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def replay_command(scenario: Scenario, seed: int | None = None) -> str:
    if seed is not None:
        return f"python -m tests.simulation --replay {seed}"
    return f"python -m tests.simulation --scenario '{scenario.to_json()}'"


@contextlib.contextmanager
def deadlines_in_registration_order() -> Iterator[None]:
    """Trio expires equal deadlines in the order of their cancel scopes' id(), i.e.
    memory layout, which the scenarios run before in the same process change: a
    failure seen in a long run often did not replay alone. Ties go to the scope that
    registered a deadline first instead (sets of objects, iterated by id, remain)."""
    from trio._core import _run as trio_run_module

    deadlines = trio_run_module.Deadlines
    original = deadlines.add
    order: dict[trio.CancelScope, int] = {}

    def add(self: Any, deadline: float, cancel_scope: trio.CancelScope) -> None:
        tiebreak = order.setdefault(cancel_scope, len(order))
        heapq.heappush(self._heap, (deadline, tiebreak, cancel_scope))
        self._active += 1

    deadlines.add = add  # type: ignore[method-assign]
    try:
        yield
    finally:
        deadlines.add = original  # type: ignore[method-assign]


def run_scenario(scenario: Scenario, *, sim: SimConfig = SIM, hooks: Hooks | None = None) -> Result:
    """Play one scenario deterministically (scheduling and ids seeded) and check it."""
    from trio._core import _run as trio_run_module

    trio_run_module._r.seed(scenario.seed)
    world = World(scenario, sim, hooks or Hooks())
    ids = random.Random(scenario.seed ^ 0x5EED)
    original = uuid.uuid4
    uuid.uuid4 = lambda: uuid.UUID(int=ids.getrandbits(128), version=4)
    try:
        with crash_log(world.store.dead) as crashes, deadlines_in_registration_order():
            early = trio.run(world.play, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        uuid.uuid4 = original
    world.turn_crashes = crashes.crashes
    world.crash_messages = crashes.messages
    violations = early + [x for x in check(world) if x not in early]
    stats = [r.server.stats() for r in world.replicas]
    finished: dict[str, int] = {}
    for st in stats:
        for outcome, n in st.turns_finished.items():
            finished[outcome] = finished.get(outcome, 0) + n
    return Result(
        scenario,
        violations,
        len(world.inner._chats),
        sum(st.steps for st in stats),
        dict(world.store.obs.injected),
        world.inner.statement_counts().get("NotifyInTransaction", 0),
        finished,
    )


class SimulationFailure(AssertionError):
    pass


def assert_ok(result: Result, seed: int | None = None) -> None:
    if result.violations:
        lines = [f"{x.invariant}: {x.detail}" for x in result.violations[:10]]
        raise SimulationFailure(
            "invariants violated:\n  "
            + "\n  ".join(lines)
            + f"\nreplay with: {replay_command(result.scenario, seed)}"
        )
