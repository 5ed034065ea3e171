"""Every constant of the specification, as frozen configuration records.

Each default cites the reason for its value; business code reads these fields
and never hard-codes a number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AcquireConfig:
    """Acquisition, heartbeats and stale recovery (SPEC section 2)."""

    # 1 s poll keeps idle latency low; a local "work available" signal wakes the loop sooner.
    acquire_interval: float = 1.0
    # One statement claims up to 10 chats: fewer round trips under load, bounded per tick.
    max_chats_per_acquire: int = 10
    # 30 s heartbeat, stale after 5 min: ten missed beats before another replica takes over.
    heartbeat_interval: float = 30.0
    stale_after: float = 300.0

    @property
    def stale_recovery_interval(self) -> float:
        """Stale recovery runs every `stale_after / 5`."""
        return self.stale_after / 5


@dataclass(frozen=True)
class RetryConfig:
    """Model retry policy (SPEC section 3)."""

    # Backoff min(1 s * 2^n, 60 s), at most 25 attempts: rides out ~20 min of throttling.
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_attempts: int = 25
    retryable_status_codes: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class CompactionConfig:
    """Context compaction (SPEC section 3.1)."""

    # 70 % leaves room for the summary request itself and the next step's output.
    threshold_percent: int = 70
    # Used when the provider reports no context limit.
    context_limit: int = 200_000
    # A summary is one non-streaming call; 90 s bounds a stuck provider.
    summary_timeout: float = 90.0
    # Re-entry after a final-step compaction, at most 3 times: no compaction ping-pong.
    max_compaction_retries: int = 3
    summary_prompt: str = (
        "Summarise the conversation so far so that you can continue the task from the summary "
        "alone: goals, decisions, files touched, open questions and next steps."
    )
    summary_prefix: str = "Summary of the conversation so far:\n"

    @property
    def effective_threshold(self) -> int:
        """Out-of-range thresholds fall back to the default 70."""
        if 0 < self.threshold_percent <= 100:
            return self.threshold_percent
        return 70


@dataclass(frozen=True)
class LoopConfig:
    """The agent loop (SPEC section 3)."""

    max_steps: int = 1200
    retry: RetryConfig = field(default_factory=RetryConfig)
    compaction: CompactionConfig = field(default_factory=CompactionConfig)
    # Run a step's tools concurrently; False only for the baseline benchmark.
    parallel_tools: bool = True
    # The interrupted-step write is shielded; this deadline keeps a dead store from hanging it.
    cleanup_timeout: float = 10.0


@dataclass(frozen=True)
class StreamConfig:
    """Per-chat streams (SPEC section 4)."""

    buffer_limit: int = 10_000
    subscriber_queue_size: int = 128
    # At most one drop WARN per chat and kind per 10 s: a storm must not flood the logs.
    drop_warn_interval: float = 10.0
    durable_cache_size: int = 256
    # PostgreSQL's NOTIFY payload limit is 8000 bytes.
    notify_payload_limit: int = 8000
    # Carry small messages inside the notify so other replicas skip the database read.
    notify_carries_messages: bool = True
    # Serve same-replica catch-up from the durable cache; False only for the baseline.
    durable_cache_enabled: bool = True


@dataclass(frozen=True)
class QueueConfig:
    """User message queue (SPEC section 1)."""

    # 20 queued messages is far beyond a human typing ahead; more is a runaway client.
    max_queued: int = 20


@dataclass(frozen=True)
class WorkspaceConfig:
    """Workspace binding and dialing (SPEC section 5)."""

    # Validate the binding only when a dial has not finished within 5 s.
    dial_validation_delay: float = 5.0
    instruction_timeout: float = 5.0
    mcp_discovery_timeout: float = 5.0
    instruction_file_max_bytes: int = 64 * 1024
    # Persisted binding + turn-local context; False only for the baseline benchmark.
    use_binding: bool = True


@dataclass(frozen=True)
class SubagentConfig:
    """Subagents (SPEC section 6)."""

    await_timeout: float = 300.0
    poll_interval_pubsub: float = 5.0
    poll_interval_no_pubsub: float = 0.2
    title_words: int = 6
    title_max_chars: int = 80
    # Wake on the child's notify; False polls only (baseline benchmark).
    use_pubsub: bool = True


@dataclass(frozen=True)
class LimitsConfig:
    """Input limits: bad input gets a clear error."""

    max_message_bytes: int = 256 * 1024
    max_title_chars: int = 200


@dataclass(frozen=True)
class Config:
    """All configuration of one replica."""

    acquire: AcquireConfig = field(default_factory=AcquireConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    streams: StreamConfig = field(default_factory=StreamConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    workspace: WorkspaceConfig = field(default_factory=WorkspaceConfig)
    subagents: SubagentConfig = field(default_factory=SubagentConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def replace(self, **changes: object) -> Config:
        """A copy with some sections replaced."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
