"""The replica's counters, and the `ServerStats` that `Server.stats()` reports them in."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

from chatd_trio.domain import JSON
from chatd_trio.store.base import TurnOutcome
from chatd_trio.subagents import SubagentStatistics
from chatd_trio.workspace import WorkspaceStatistics

__all__ = ["Counters", "ServerStats", "ServerStreamStats"]


@dataclass
class Counters:
    """The replica's own counters, incremented where each thing happens.

    Fields, not names in a dict: a misspelt counter fails type checking instead of
    reading as 0.
    """

    turns_started: int = 0
    acquired: int = 0
    acquire_statements: int = 0
    acquire_skipped_full: int = 0
    released_on_close: int = 0
    heartbeats_lost: int = 0
    stale_recovered: int = 0
    interrupts: int = 0
    retries: int = 0
    compactions: int = 0
    reentries: int = 0
    steps: int = 0
    fenced: int = 0
    late_tool_results_dropped: int = 0
    store_retries: int = 0


@dataclass(frozen=True)
class ServerStreamStats:
    """The stream counters `ServerStats` carries (`ChatStreams.statistics()` has them all)."""

    # Parts dropped because a turn's in-flight buffer was full, and events dropped
    # because a subscriber's queue was full (docs/spec.md §4).
    dropped_buffer: int
    dropped_subscriber: int
    db_catchup_reads: int
    cache_hits: int
    carried_hits: int
    snapshot_reads: int
    # Received notifies that did not open (forged, altered, expired): dropped.
    notifies_rejected: int


@dataclass(frozen=True)
class ServerStats:
    """Counters of one replica since it started (docs/spec.md §7: statements by name).

    `as_dict()` gives the same counters as JSON data, for health endpoints and reports.
    """

    worker_id: uuid.UUID
    statements: dict[str, int]
    turns_started: int
    turns_finished: dict[TurnOutcome, int]
    running: int
    acquired: int
    acquire_statements: int
    released_on_close: int
    heartbeats_lost: int
    stale_recovered: int
    interrupts: int
    retries: int
    compactions: int
    reentries: int
    steps: int
    workspace: WorkspaceStatistics
    subagents: SubagentStatistics
    streams: ServerStreamStats
    # Turns that ended because their run no longer held the chat (a write or the finish
    # was refused: fenced by a newer ownership token, or edited).
    fenced: int = 0
    # Tool results that arrived after their turn stopped waiting (dropped).
    late_tool_results_dropped: int = 0
    # Turn writes retried through a transient store fault.
    store_retries: int = 0
    # Acquisitions not tried because the replica ran `AcquireConfig.max_running_turns`.
    acquire_skipped_full: int = 0

    def as_dict(self) -> dict[str, JSON]:
        """The counters as JSON data: the fields by name, nested records as objects."""
        data: dict[str, JSON] = dataclasses.asdict(self)
        data["worker_id"] = str(self.worker_id)
        data["turns_finished"] = {o.value: n for o, n in self.turns_finished.items()}
        return data
