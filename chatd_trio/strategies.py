"""How a replica does five things it has an optimised way and a plain way of doing.

The optimised ways are the defaults and the only ones a deployment wants. The plain
ways are what the optimisations are measured against: the benchmarks inject them
(`chatd-trio scaletest --baseline` passes `chatd_trio.apps.scaletest.BASELINE`, every
plain way at once; `benchmarks/streams.py`, `benchmarks/tools_parallel.py` and
`benchmarks/subagent_wake.py` one each). They are not configuration, so `Config`
does not hold them: a `Server` takes them as `strategies=` and hands each component
(`run_turn`, `ChatStreams`, `WorkspaceContext`, the subagent tools) what it uses.

Every plain way keeps the behaviour contract (docs/spec.md); only the cost differs:
more statements, dials or database reads, or a longer wait.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "AgentResolution",
    "Announce",
    "CatchUp",
    "Strategies",
    "SubagentWake",
    "ToolCalls",
]


class ToolCalls(enum.Enum):
    """How the tool calls of one model step run."""

    #: One task per call: the step takes as long as its slowest call.
    CONCURRENT = "concurrent"
    #: One call after the other: the step takes as long as all its calls together.
    SEQUENTIAL = "sequential"


class CatchUp(enum.Enum):
    """Where a subscriber that a notify says is behind reads the messages it missed."""

    #: The replica's durable message cache first (messages this replica published);
    #: the database only when the cache does not reach back far enough.
    CACHE_FIRST = "cache_first"
    #: The message the notify carries, if any (`StreamConfig.notify_carries_messages`),
    #: else the database.
    DATABASE = "database"


class Announce(enum.Enum):
    """Who sends the notify of an inserted message, and when."""

    #: The store, inside the inserting transaction, when it reaches the replica's pubsub
    #: (`Store.announces_to`): notifies arrive in commit order, so no subscriber sees a
    #: gap it must read from the database. Otherwise as `AFTER_COMMIT`.
    IN_TRANSACTION = "in_transaction"
    #: The streams, after the commit.
    AFTER_COMMIT = "after_commit"


class AgentResolution(enum.Enum):
    """How a turn finds and reaches its workspace agent."""

    #: The chat's persisted binding, resolved once per turn (the latest build only when
    #: the bound agent is gone), dialed once, the connection kept for the turn.
    BOUND = "bound"
    #: Every operation resolves the workspace's latest build and dials anew, releasing
    #: the connection after the call.
    PER_CALL = "per_call"


class SubagentWake(enum.Enum):
    """How a parent waiting for a child chat learns that the child is done."""

    #: The child's stream notifies, with a slow fallback poll
    #: (`SubagentConfig.poll_interval_pubsub`) in case a notify is lost.
    NOTIFY = "notify"
    #: Polling only, every `SubagentConfig.poll_interval_no_pubsub`, as without a pubsub.
    POLL = "poll"


@dataclass(frozen=True)
class Strategies:
    """The replica's choice for each of the five; the defaults are the optimised ways."""

    tool_calls: ToolCalls = ToolCalls.CONCURRENT
    catch_up: CatchUp = CatchUp.CACHE_FIRST
    announce: Announce = Announce.IN_TRANSACTION
    agent_resolution: AgentResolution = AgentResolution.BOUND
    subagent_wake: SubagentWake = SubagentWake.NOTIFY
