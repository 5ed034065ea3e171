"""What one scale-test run does (`Plan`), its timings (`FaultConfig`), and how its
replicas are configured: their `Config`, strategies (`BASELINE` for `--baseline`) and
scripted model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from chatd_trio.config import (
    AcquireConfig,
    Config,
    ScaleTestConfig,
    StreamConfig,
)
from chatd_trio.domain import (
    JSON,
)
from chatd_trio.errors import ChatdError
from chatd_trio.models.scripted import ScriptedModel, ToolsThenAnswer
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

__all__ = [
    "BASELINE",
    "CLUSTERS",
    "CLUSTER_FAULTS",
    "FAULTS",
    "FaultConfig",
    "Plan",
    "ScaleTestError",
    "backoff",
    "pubsub_application_name",
    "replica_config",
    "replica_server",
    "replica_strategies",
    "scripted_model",
    "stall_timeout",
    "store_application_name",
]


FAULTS = (
    "sigkill",
    "sigstop",
    "pg_restart",
    "pool_kill",
    "listen_kill",
    "outage",
    "commit_stall",
)
# Faults that stop or restart PostgreSQL itself: never on a server the command did not start.
CLUSTER_FAULTS = frozenset({"pg_restart", "outage"})
CLUSTERS = ("auto", "throwaway", "dsn")


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
    # ...unless the last status it streamed was `pending`: a chat queued for a free
    # replica is quiet for as long as the queue ahead of it (several seconds at 600 chats
    # and 100 running turns per replica), so it asks after 30 s.
    confirm_pending_after_s: float = 30.0
    # Driver retries: 50 ms doubling to 2 s, so a 15 s outage costs ~12 attempts per chat.
    retry_initial_s: float = 0.05
    retry_max_s: float = 2.0
    # SIGSTOP lasts 1.5 x stale_after + one heartbeat: past the stale threshold plus at
    # least two recovery passes of the other replica (every stale_after / 5).
    pause_factor: float = 1.5
    # `commit_stall` holds every chat row locked this long: no write commits meanwhile,
    # as when the server's WAL flush stalls (measured stalls: up to ~0.4 s).
    commit_stall_s: float = 1.0
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
    # The replicas' PostgresConfig.max_writing (0: the store's default, half the pool).
    max_writing: int = 0
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
        if not 0 <= self.max_writing <= ScaleTestConfig.pool_max_size:
            raise ScaleTestError(
                f"--max-writing must be between 0 and the pool size"
                f" ({ScaleTestConfig.pool_max_size})"
            )
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


def replica_server(
    plan: Plan, store: Store, pubsub: PubSub, config: Config, st: ScaleTestConfig
) -> Server:
    """One replica of the run: the scripted model, dialling the run's real agent, with
    the run's strategies (enter it to run it)."""
    from chatd_trio.agent import dial_agent

    return Server(
        store,
        pubsub,
        scripted_model(plan, st),
        config,
        dialer=dial_agent,
        strategies=replica_strategies(plan),
    )


def backoff(attempt: int, fc: FaultConfig) -> float:
    """A driver's wait before retry `attempt` (from 0) of a send or a read."""
    return float(min(fc.retry_initial_s * 2**attempt, fc.retry_max_s))
