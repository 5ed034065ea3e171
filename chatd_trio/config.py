"""Every constant of the specification, as frozen configuration records.

Each default cites the reason for its value; business code reads these fields
and never hard-codes a number.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from chatd_trio.errors import ConfigError

# What a numeric field accepts (`Checked.rules`); a field not listed there must be > 0.
POSITIVE = "> 0"
NON_NEGATIVE = ">= 0"
ANY = "any"


class Checked:
    """Validation of a configuration section when it is built (`__post_init__`).

    Every field is checked against its annotation: `int` fields hold an int (not a
    bool), `float` fields a finite number, `bool` and `str` fields their type, a
    section field its section. Numbers must be > 0 unless `rules` says `>= 0` or any
    value; `ordered` pairs must not decrease (`(a, b)`: a <= b). A value out of range
    raises `ConfigError` naming the section and the field.
    """

    rules: ClassVar[Mapping[str, str]] = {}
    ordered: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __post_init__(self) -> None:
        _check_section(self)


def field_rule(cls: type, name: str) -> str:
    """What a numeric field of a section accepts, for the configuration reference
    ("" for fields that are not numbers)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None or f.type not in ("int", "float"):
        return ""
    rules: Mapping[str, str] = getattr(cls, "rules", {})
    rule = rules.get(name, POSITIVE)
    ordered: tuple[tuple[str, str], ...] = getattr(cls, "ordered", ())
    bounds = [f"<= {high}" for low, high in ordered if low == name]
    bounds += [f">= {low}" for low, high in ordered if high == name]
    return " and ".join([rule, *bounds]) if bounds and rule != ANY else rule


def _fail(obj: object, name: str, reason: str) -> ConfigError:
    return ConfigError(f"{type(obj).__name__}.{name}", reason)


def _check_number(obj: object, name: str, kind: str, value: object, rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(
            obj,
            name,
            f"expected {'an integer' if kind == 'int' else 'a number'}, got {type(value).__name__}",
        )
    if kind == "int" and not isinstance(value, int):
        raise _fail(obj, name, f"expected an integer, got {value!r}")
    if isinstance(value, float) and math.isnan(value):
        raise _fail(obj, name, "must be a number, got nan")
    if rule == POSITIVE and not value > 0:
        raise _fail(obj, name, f"must be > 0, got {value!r}")
    if rule == NON_NEGATIVE and not value >= 0:
        raise _fail(obj, name, f"must be >= 0, got {value!r}")


def _check_section(obj: Any) -> None:
    rules: Mapping[str, str] = type(obj).rules
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = f.type
        section = f.default_factory
        if kind in ("int", "float"):
            _check_number(obj, f.name, kind, value, rules.get(f.name, POSITIVE))
        elif kind == "bool" and not isinstance(value, bool):
            raise _fail(obj, f.name, f"expected a boolean, got {type(value).__name__}")
        elif kind == "str" and not isinstance(value, str):
            raise _fail(obj, f.name, f"expected a string, got {type(value).__name__}")
        elif kind == "tuple[str, ...]" and not (
            isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        ):
            raise _fail(obj, f.name, "expected a tuple of strings")
        elif kind == "frozenset[int]" and not (
            isinstance(value, frozenset)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise _fail(obj, f.name, "expected a frozenset of integers")
        elif (
            isinstance(section, type)
            and issubclass(section, Checked)
            and not isinstance(value, section)
        ):
            raise _fail(obj, f.name, f"expected {section.__name__}, got {type(value).__name__}")
    for low, high in type(obj).ordered:
        if getattr(obj, low) > getattr(obj, high):
            raise _fail(
                obj, low, f"must not exceed {high} ({getattr(obj, low)!r} > {getattr(obj, high)!r})"
            )


@dataclass(frozen=True)
class AcquireConfig(Checked):
    """Acquisition, heartbeats and stale recovery (docs/spec.md §2)."""

    # A heartbeat slower than stale_after would have every running chat recovered as stale.
    ordered = (("heartbeat_interval", "stale_after"),)

    # 1 s poll keeps idle latency low; a local "work available" signal wakes the loop sooner.
    acquire_interval: float = 1.0
    # One statement claims up to 10 chats: fewer round trips under load, bounded per tick.
    max_chats_per_acquire: int = 10
    # At most 100 turns run at once on one replica (LangGraph's worker pool has the same
    # knob): past that its CPU, its connection pool and the model quota only queue them.
    # A replica claims no more than its free capacity, leaving pending chats to its peers.
    max_running_turns: int = 100
    # 30 s heartbeat, stale after 5 min: ten missed beats before another replica takes over.
    heartbeat_interval: float = 30.0
    stale_after: float = 300.0

    @property
    def stale_recovery_interval(self) -> float:
        """Stale recovery runs every `stale_after / 5`."""
        return self.stale_after / 5


@dataclass(frozen=True)
class RetryConfig(Checked):
    """Model retry policy (docs/spec.md §3, docs/providers.md "Errors and retries")."""

    rules = {
        "base_delay": NON_NEGATIVE,
        "max_delay": NON_NEGATIVE,
        "unreachable_elapsed": NON_NEGATIVE,
    }

    # Backoff min(1 s * 2^n, 60 s) between attempts of one step.
    base_delay: float = 1.0
    max_delay: float = 60.0
    # At most 12 attempts and 10 minutes per step, whichever ends first: rides out a
    # provider's throttling or a short outage without leaving a chat "running" for long.
    max_attempts: int = 12
    max_elapsed: float = 600.0
    # While no attempt of a step has reached the server (connection refused, DNS failure,
    # connect timeout) the step gives up after 60 s: a wrong base_url fails within a
    # minute, not after the whole budget.
    unreachable_elapsed: float = 60.0
    retryable_status_codes: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class CompactionConfig(Checked):
    """Context compaction (docs/spec.md §3.1)."""

    rules = {
        "threshold_percent": ANY,
        "max_compaction_retries": NON_NEGATIVE,
        "context_length_retries": NON_NEGATIVE,
    }

    # 70 % leaves room for the summary request itself and the next step's output. A value
    # outside 1..100 falls back to 70 (`effective_threshold`); 100 disables compaction.
    threshold_percent: int = 70
    # Used when the provider reports no context limit.
    context_limit: int = 200_000
    # A summary is one non-streaming call; 90 s bounds a stuck provider.
    summary_timeout: float = 90.0
    # Re-entry after a final-step compaction, at most 3 times: no compaction ping-pong.
    max_compaction_retries: int = 3
    # A step the model refused as too long for its context window runs again after a
    # compaction, at most once: a summary makes room when the history outgrew the window;
    # a prompt still too long after one will not fit by asking again.
    context_length_retries: int = 1
    summary_prompt: str = (
        "Summarise the conversation so far so that you can continue the task from the summary "
        "alone: goals, decisions, files touched, open questions and next steps."
    )
    summary_prefix: str = "Summary of the conversation so far:\n"
    # The visible tool call/result pair that shows "summarising..." and the summary to users.
    tool_name: str = "chat_summarized"
    summary_source: str = "automatic"

    @property
    def effective_threshold(self) -> int:
        """Out-of-range thresholds fall back to the default 70."""
        if 0 < self.threshold_percent <= 100:
            return self.threshold_percent
        return 70


@dataclass(frozen=True)
class StoreRetryConfig(Checked):
    """Retrying a turn's writes through a transient store fault (docs/spec.md §1)."""

    rules = {
        "base_delay": NON_NEGATIVE,
        "max_delay": NON_NEGATIVE,
        "budget": NON_NEGATIVE,
    }

    # A lost connection, a restart or a failover is over in seconds: back off from 0.2 s
    # up to 5 s between attempts.
    base_delay: float = 0.2
    max_delay: float = 5.0
    # Give up after 60 s and hand the chat back as pending (any replica may take it):
    # well past a restart, well short of the 5 min after which stale recovery would.
    budget: float = 60.0


@dataclass(frozen=True)
class LoopConfig(Checked):
    """The agent loop (docs/spec.md §3)."""

    max_steps: int = 1200
    retry: RetryConfig = field(default_factory=RetryConfig)
    store_retry: StoreRetryConfig = field(default_factory=StoreRetryConfig)
    compaction: CompactionConfig = field(default_factory=CompactionConfig)
    # The interrupted-step write is shielded; this deadline keeps a dead store from hanging it.
    cleanup_timeout: float = 10.0
    # The synthetic result of a tool call cut short by an interrupt (docs/spec.md §3).
    interrupted_tool_result: str = "tool call was interrupted before it produced a result"

    @property
    def close_timeout(self) -> float:
        """Closing a replica waits this long for its turns, `3 * cleanup_timeout`: a turn
        shut down runs its cleanups, then its final write's retries, then that write,
        each bounded by `cleanup_timeout`."""
        return 3 * self.cleanup_timeout


@dataclass(frozen=True)
class StreamConfig(Checked):
    """Per-chat streams (docs/spec.md §4)."""

    rules = {
        "drop_warn_interval": NON_NEGATIVE,
        "durable_cache_size": NON_NEGATIVE,
    }

    buffer_limit: int = 10_000
    subscriber_queue_size: int = 128
    # At most one drop WARN per chat and kind per 10 s: a storm must not flood the logs.
    drop_warn_interval: float = 10.0
    durable_cache_size: int = 256
    # PostgreSQL's NOTIFY payload limit is 8000 bytes.
    notify_payload_limit: int = 8000
    # Carry small messages inside the notify so other replicas skip the database read.
    notify_carries_messages: bool = True


@dataclass(frozen=True)
class QueueConfig(Checked):
    """User message queue (docs/spec.md §1)."""

    rules = {"max_queued": NON_NEGATIVE}

    # 20 queued messages is far beyond a human typing ahead; more is a runaway client.
    max_queued: int = 20


@dataclass(frozen=True)
class WorkspaceConfig(Checked):
    """Workspace binding and dialing (docs/spec.md §5)."""

    rules = {"dial_validation_delay": NON_NEGATIVE}

    # Validate the binding only when a dial has not finished within 5 s.
    dial_validation_delay: float = 5.0
    # Releasing an unwanted connection runs shielded; 10 s keeps a dead agent from hanging it.
    dial_release_timeout: float = 10.0
    instruction_timeout: float = 5.0
    mcp_discovery_timeout: float = 5.0
    instruction_file_max_bytes: int = 64 * 1024
    # The `execute` tool's command limit when the model gives none: long enough for a build
    # step, short enough that a hung command does not stall the turn for an hour.
    default_exec_timeout: float = 120.0
    # MCP tools are offered as `<server>__<tool>`: unique across servers, legal in tool names.
    mcp_tool_separator: str = "__"
    # OpenAI-compatible APIs refuse a request whose tool names exceed 64 characters or use
    # anything but [A-Za-z0-9_-]; such MCP tools are left out rather than break the turn.
    tool_name_max_chars: int = 64
    # Replica-level caches (MCP tools and rows per agent, which chats hold an agent's
    # instruction files) are LRU-bounded so a long-lived replica's memory stays flat.
    mcp_cache_max_agents: int = 4096
    instruction_ledger_max_entries: int = 100_000
    # LocalProvisioner: in-process agents for the demo and tests, one per workspace.
    local_agent_host: str = "127.0.0.1"
    local_agent_name: str = "main"
    # 32 random bytes (256 bits): an agent token that cannot be guessed.
    local_agent_token_bytes: int = 32
    # Stopping an in-process agent waits this long for its server (and MCP children) to exit.
    local_agent_stop_timeout: float = 10.0


@dataclass(frozen=True)
class SubagentConfig(Checked):
    """Subagents (docs/spec.md §6)."""

    await_timeout: float = 300.0
    poll_interval_pubsub: float = 5.0
    poll_interval_no_pubsub: float = 0.2
    title_words: int = 6
    title_max_chars: int = 80
    # The title of a chat whose prompt has no words.
    fallback_title: str = "New Chat"


@dataclass(frozen=True)
class LimitsConfig(Checked):
    """Input limits: bad input gets a clear error."""

    max_message_bytes: int = 256 * 1024
    max_title_chars: int = 200


@dataclass(frozen=True)
class PostgresConfig(Checked):
    """The PostgreSQL store: connection pool, timeouts, migrations (docs/spec.md §7)."""

    rules = {
        "min_size": NON_NEGATIVE,
        "answer_wait": NON_NEGATIVE,
        "connect_timeout": NON_NEGATIVE,
        "close_timeout": NON_NEGATIVE,
        "migration_lock_key": ANY,
        "max_writing": NON_NEGATIVE,
    }
    ordered = (("min_size", "max_size"), ("max_writing", "max_size"))

    # One idle connection keeps a quiet replica cheap; 10 bounds what one replica takes
    # from the server's max_connections when many turns persist at once.
    min_size: int = 1
    max_size: int = 10
    # Writes hold at most this many of the connections at once (0: half of max_size, at
    # least 1); reads may use the rest. Every commit waits for the server's WAL flush,
    # and PostgreSQL commits the transactions that NOTIFY one at a time (a lock held
    # through the flush), so more writes in flight add waiting connections, not commits:
    # when a flush stalls, the writes past this bound wait in the replica and reads
    # (catch-up, history, the API's) still find a connection.
    max_writing: int = 0
    # A store operation waits up to 10 ms on its socket for the server's answer before
    # parking its task: on a busy replica a parked task resumes only after a whole
    # scheduling round, holding its connection meanwhile (docs/architecture.md). Most
    # answers take well under 1 ms; 10 ms also rides out the server's short stalls (a
    # commit waiting for the WAL), which otherwise pile borrowers up. 0 parks at once; it
    # stops trying by itself while answers come late or its waits take the loop's time.
    answer_wait: float = 0.010
    # Recycle idle connections after 5 min and every connection after 30 min, before a
    # managed database's idle or lifetime limit kills one silently.
    max_idle: float = 300.0
    max_lifetime: float = 1800.0
    # Waiting 10 s for a pooled connection means the database is gone or saturated:
    # fail the operation (StoreUnavailable) instead of hanging the caller.
    pool_timeout: float = 10.0
    # libpq connect_timeout (whole seconds): an unreachable host fails a connect on its own.
    connect_timeout: int = 5
    # Opening the store (migrations, then min_size connections) gives up after 30 s.
    open_timeout: float = 30.0
    # Closing the pool waits this long for borrowed connections and its workers (shielded).
    close_timeout: float = 5.0
    # Tags the store's sessions in pg_stat_activity (operators and tests find them by it).
    application_name: str = "chatd_trio-store"
    # pg_advisory_xact_lock key serialising migrations across replicas ("chatdmig").
    migration_lock_key: int = 0x63686174646D6967
    # The prompts of the last 1000 chats this replica ran stay in memory (a few MB): the
    # next turn of one of them reads only what the user wrote since (PromptCache).
    prompt_cache_chats: int = 1000
    # Count every network round trip of the pool's connections (`PostgresStore.round_trips`):
    # for benchmarks and tests; off, a connection pays nothing for it.
    count_round_trips: bool = False

    @property
    def write_slots(self) -> int:
        """How many pooled connections writes may hold at once (`max_writing`, or half
        of `max_size` when it is 0)."""
        return self.max_writing or max(1, self.max_size // 2)


@dataclass(frozen=True)
class ModelHTTPConfig(Checked):
    """HTTP model adapters (OpenAI-compatible Chat Completions, Anthropic Messages)."""

    rules = {"close_timeout": NON_NEGATIVE}

    # 10 s to open TCP+TLS: a provider that cannot by then is down; the retry policy takes over.
    connect_timeout: float = 10.0
    # 600 s between two bytes (the OpenAI SDK's default): reasoning models may think for
    # minutes before their first token, so a shorter gap would cut healthy streams.
    read_timeout: float = 600.0
    write_timeout: float = 60.0
    pool_timeout: float = 60.0
    # An SSE line beyond 4 MiB is a broken stream, not a chunk: refuse it before it eats memory.
    max_sse_line_chars: int = 4 * 1024 * 1024
    # Provider error messages end up in events and logs: keep them readable.
    max_error_message_chars: int = 2000
    # An error body is read up to 64 KiB: enough for any JSON error, bounded for HTML pages.
    max_error_body_bytes: int = 64 * 1024
    # Closing a response is shielded from cancellation; 5 s bounds a wedged socket.
    close_timeout: float = 5.0
    # The Messages API requires max_tokens; 8192 fits every current Claude model's output
    # limit. `RequestOptions.max_tokens` overrides it.
    anthropic_max_tokens: int = 8192
    # The `anthropic-version` header the adapter speaks (the event stream it parses).
    anthropic_version: str = "2023-06-01"


@dataclass(frozen=True)
class RequestOptions:
    """Options of a model request, passed to the provider unchanged (docs/providers.md).

    Every field defaults to None (not sent: the provider's default applies). Set them
    per model (`OpenAIChatModel(options=...)`) and override them per chat
    (`Server.create_chat(model_options=...)`, kept with the chat and inherited by its
    subagents; `model.with_options(...)` does the merge). Fields a provider has no
    equivalent for are not sent there: docs/providers.md lists which adapter sends what.
    """

    temperature: float | None = None
    top_p: float | None = None
    # Anthropic only (Chat Completions has no top_k; use extra_body for vLLM's).
    top_k: int | None = None
    max_tokens: int | None = None
    # OpenAI's reasoning models take max_completion_tokens instead of max_tokens.
    max_completion_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    # "auto", "none", "required" or a provider-shaped object naming one tool.
    tool_choice: str | Mapping[str, object] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    response_format: Mapping[str, object] | None = None
    # An end-user id for the provider's abuse monitoring (Anthropic: metadata.user_id).
    user: str | None = None
    # Anthropic extended thinking: the token budget of the thinking blocks.
    thinking_budget_tokens: int | None = None
    # stream_options.include_usage: None sends it and drops it for good when the server
    # refuses it (some OpenAI-compatible servers reject unknown fields); False never sends it.
    include_usage: bool | None = None
    # The escape hatch: headers added to, and keys merged into, every request.
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    extra_body: Mapping[str, object] = field(default_factory=dict)

    def merged(self, override: RequestOptions) -> RequestOptions:
        """These options with every field `override` sets replacing ours (headers and
        body keys merged, `override` winning)."""
        changes: dict[str, object] = {
            f.name: getattr(override, f.name)
            for f in dataclasses.fields(override)
            if f.name not in ("extra_headers", "extra_body")
            and getattr(override, f.name) is not None
        }
        changes["extra_headers"] = {**self.extra_headers, **override.extra_headers}
        changes["extra_body"] = {**self.extra_body, **override.extra_body}
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        """The fields that are set, as JSON values (how a chat's options are stored)."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name in ("extra_headers", "extra_body") and not value):
                continue
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: object, path: str = "model_options") -> RequestOptions:
        """Strictly decode `to_json`'s form; raises `DecodeError` naming the bad field
        (an unknown option included: a misspelt one would otherwise do nothing)."""
        from chatd_trio.errors import DecodeError

        if not isinstance(data, Mapping):
            raise DecodeError(path, "expected an object")
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for key, value in data.items():
            where = f"{path}.{key}"
            if key not in known:
                raise DecodeError(where, "unknown request option")
            if value is None:
                continue
            if not _OPTION_CHECKS[key](value):
                raise DecodeError(where, _OPTION_TYPES[key])
            if key == "stop":
                value = tuple(value)
            values[key] = value
        return cls(**values)  # type: ignore[arg-type]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value: object) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)


_OPTION_TYPES: dict[str, str] = {
    **dict.fromkeys(("temperature", "top_p"), "expected a number"),
    **dict.fromkeys(
        ("top_k", "max_tokens", "max_completion_tokens", "seed", "thinking_budget_tokens"),
        "expected an integer",
    ),
    "stop": "expected a list of strings",
    "tool_choice": "expected a string or an object",
    **dict.fromkeys(("parallel_tool_calls", "include_usage"), "expected a boolean"),
    **dict.fromkeys(("reasoning_effort", "user"), "expected a string"),
    **dict.fromkeys(("response_format", "extra_body"), "expected an object"),
    "extra_headers": "expected an object of strings",
}
_OPTION_CHECKS: dict[str, Callable[[object], bool]] = {
    "temperature": _number,
    "top_p": _number,
    "top_k": _integer,
    "max_tokens": _integer,
    "max_completion_tokens": _integer,
    "seed": _integer,
    "thinking_budget_tokens": _integer,
    "stop": lambda v: isinstance(v, list | tuple) and all(isinstance(s, str) for s in v),
    "tool_choice": lambda v: isinstance(v, str) or _object(v),
    "parallel_tool_calls": lambda v: isinstance(v, bool),
    "include_usage": lambda v: isinstance(v, bool),
    "reasoning_effort": lambda v: isinstance(v, str),
    "user": lambda v: isinstance(v, str),
    "response_format": _object,
    "extra_body": _object,
    "extra_headers": lambda v: _object(v) and all(isinstance(x, str) for x in v.values()),  # type: ignore[attr-defined]
}


@dataclass(frozen=True)
class AgentConfig(Checked):
    """The workspace agent: its TCP server and the connection to it (docs/spec.md §5)."""

    rules = {
        "kill_grace": NON_NEGATIVE,
        "mcp_restart_backoff_initial": NON_NEGATIVE,
        "mcp_restart_backoff_max": NON_NEGATIVE,
    }
    ordered = (("default_output_limit", "max_output_limit"),)

    # A dead address must fail a dial on its own; the dial driver's 5 s validation runs alongside.
    connect_timeout: float = 10.0
    # The first frame must carry the token within 10 s of the connect, however slowly its
    # bytes trickle in; a silent or dawdling unauthenticated socket is dropped.
    auth_timeout: float = 10.0
    # Before authentication only the auth frame is read: ~100 bytes with a 256-bit token.
    # 4 KiB is generous for any token and bounds what an unauthenticated peer makes the agent
    # hold; a larger header is refused at once and the connection closed, its body dropped
    # as it arrives, never buffered.
    max_auth_frame_bytes: int = 4096
    # 8 MiB per frame holds a 1 MiB file even with worst-case JSON escaping (6x).
    max_frame_bytes: int = 8 * 1024 * 1024
    # Requests nest 3 levels and real tool arguments a handful; 128 makes a deeper frame a
    # clear error instead of a RecursionError whose depth depends on the stack at hand.
    max_frame_depth: int = 128
    read_chunk_bytes: int = 64 * 1024
    # Connections served at once. Beyond it the agent stops accepting and new connections
    # wait in the kernel's listen backlog (a burst of dials is delayed, not refused). 1024
    # covers hundreds of concurrent turns on one workspace while bounding pre-auth memory
    # to ~1024 x max_auth_frame_bytes.
    max_connections: int = 1024
    # Wrong tokens per peer host: a burst of 10, then one per second; beyond that the
    # host's auth attempts are refused unchecked. A 256-bit token cannot be guessed anyway:
    # this keeps a scanner (3600 guesses/s measured without it) from costing CPU and logs.
    auth_failure_burst: int = 10
    # The bucket's refill, per second: a host that keeps failing gets one attempt a second.
    auth_failure_rate: float = 1.0
    # Hosts whose failures are remembered (least recently failing forgotten first): bounds
    # the limiter's memory when failures come from many addresses.
    auth_failure_max_hosts: int = 4096
    # Frames are small; a peer that does not read for 30 s is treated as gone.
    send_timeout: float = 30.0
    # Requests served concurrently on one connection (parallel tools share it).
    max_inflight_per_connection: int = 64
    # read_file returns at most 1 MiB (flagged truncated), write_file accepts at most 1 MiB.
    max_file_bytes: int = 1024 * 1024
    max_dir_entries: int = 10_000
    # 64 KiB of command output by default is plenty for a model; callers may ask up to 1 MiB.
    default_output_limit: int = 64 * 1024
    max_output_limit: int = 1024 * 1024
    max_exec_timeout: float = 3600.0
    # After a timeout kill, a command's pipes must close within this grace (orphaned daemons).
    kill_grace: float = 5.0
    instruction_file_name: str = "AGENTS.md"
    # Spawning an MCP server and its initialize handshake; npx-style servers can be slow.
    mcp_start_timeout: float = 30.0
    mcp_call_timeout: float = 300.0
    # A crashed MCP server is restarted by the next call at once; if it fails again before
    # a call succeeds, each further restart waits 1 s, doubling up to 60 s (calls in the
    # wait fail fast), so a server that dies on start does not turn every call into a spawn.
    mcp_restart_backoff_initial: float = 1.0
    # The backoff's ceiling: a server that is broken for good is tried once a minute.
    mcp_restart_backoff_max: float = 60.0


@dataclass(frozen=True)
class NotifyAuthConfig(Checked):
    """Authenticated, encrypted notifies (docs/security.md, "A database login role").

    Every payload a pubsub publishes, and every notify the store sends for it, is
    sealed: encrypted with ChaCha20-Poly1305 and authenticated with HMAC-SHA256 under
    a per-deployment key, bound to its channel and to the time it was sealed. A
    received payload that does not open under one of the keys is dropped and counted
    (`PubSubStatistics.rejected`), never delivered.

    A key is the standard or URL-safe base64 of at least `min_key_bytes` random bytes;
    ``python -m chatd_trio.pubsub.auth`` prints a fresh one. Several keys (comma-
    separated in the environment variable) rotate: the first seals, every one
    verifies. Rotate by adding the new key second on every replica, then moving it
    first, then dropping the old one.

    `PostgresPubSub` takes `keys`, else the variable named by `key_env`; with neither
    it refuses to start, unless `allow_unauthenticated` says every login of the
    database is trusted. `MemoryPubSub` takes `keys` or draws a random key of its own
    (nothing outside the process can reach it); it never reads the environment.
    """

    rules = {"reject_warn_interval": NON_NEGATIVE}

    # Key material stays out of reprs and logs; normally left empty in favour of `key_env`.
    keys: tuple[str, ...] = field(default=(), repr=False)
    # Comma-separated base64 keys, the first one sealing.
    key_env: str = "CHATD_NOTIFY_KEY"
    # Any role that can log in to the database can NOTIFY and LISTEN on every channel:
    # without a key a PostgresPubSub refuses to start unless this says that is acceptable
    # (payloads then travel unsealed, readable and forgeable by such a role).
    allow_unauthenticated: bool = False
    # 256-bit keys: a MAC under them cannot be forged by guessing.
    min_key_bytes: int = 32
    # A sealed payload is accepted for 5 minutes either side of its sealing time: room for
    # clock skew between replicas; a captured payload can be replayed within it only.
    max_age: float = 300.0
    # At most one WARN per 10 s about rejected payloads: a flood of forged notifies must
    # not flood the logs (each is still counted).
    reject_warn_interval: float = 10.0


@dataclass(frozen=True)
class PubSubConfig(Checked):
    """PubSub adapters: in-memory and PostgreSQL LISTEN/NOTIFY (docs/spec.md §4)."""

    rules = {
        "reconnect_backoff_initial": NON_NEGATIVE,
        "reconnect_backoff_max": NON_NEGATIVE,
        "connect_timeout": NON_NEGATIVE,
        "publish_pool_min_size": NON_NEGATIVE,
        "close_timeout": NON_NEGATIVE,
    }
    ordered = (("publish_pool_min_size", "publish_pool_max_size"),)

    # NOTIFY refuses payloads of 8000 bytes or more, so the largest accepted is 7999 bytes;
    # the memory adapter uses the same limit so both behave identically. This bounds the
    # sealed payload: an adapter's `payload_limit` property is what fits before sealing.
    payload_limit: int = 7999
    # Channel names are PostgreSQL identifiers: longer ones would be silently truncated.
    max_channel_bytes: int = 63
    # Reconnect the LISTEN connection after 0.1 s, doubling up to 5 s: quick after a blip,
    # gentle with a database that is down.
    reconnect_backoff_initial: float = 0.1
    reconnect_backoff_max: float = 5.0
    # Entering subscribe() waits for its LISTEN; 10 s means the listener is wedged.
    subscribe_timeout: float = 10.0
    # libpq connect_timeout (whole seconds) for the listener and publisher connections.
    connect_timeout: int = 5
    # Publishing uses its own small pool so it never waits behind the listener.
    publish_pool_min_size: int = 1
    publish_pool_max_size: int = 4
    # A publish (pool wait + pg_notify) taking 10 s means the database is gone or saturated.
    publish_timeout: float = 10.0
    # Closing connections is shielded from cancellation; 5 s bounds a wedged socket.
    close_timeout: float = 5.0
    # Prefix of the sessions' application_name (operators and tests find them by it).
    application_name: str = "chatd_trio-pubsub"
    # TCP keepalives detect a silently dead LISTEN connection within ~1 min (30 + 3 x 10 s).
    keepalives_idle: int = 30
    keepalives_interval: int = 10
    keepalives_count: int = 3
    # Sealing of every payload: key, rotation, replay window.
    auth: NotifyAuthConfig = field(default_factory=NotifyAuthConfig)
    # Count the round trips of the publish pool and of the LISTEN connection's commands
    # (`PubSubStatistics.round_trips`): for benchmarks and tests.
    count_round_trips: bool = False


@dataclass(frozen=True)
class Config(Checked):
    """All configuration of one replica.

    Every section checks its values when it is built (also by `replace` and
    `dataclasses.replace`): a value of the wrong type, NaN, or out of the range the
    *Why* column gives ("Must be > 0") raises `chatd_trio.errors.ConfigError` naming
    the section and the field, so a bad value fails at start-up, not in a loop.
    """

    acquire: AcquireConfig = field(default_factory=AcquireConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    streams: StreamConfig = field(default_factory=StreamConfig)
    pubsub: PubSubConfig = field(default_factory=PubSubConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    workspace: WorkspaceConfig = field(default_factory=WorkspaceConfig)
    subagents: SubagentConfig = field(default_factory=SubagentConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)

    def replace(self, **changes: object) -> Config:
        """A copy with some sections replaced."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DemoConfig(Checked):
    """`chatd-trio demo`: timings of the scenarios and the display."""

    rules = {
        "parallel_max_wall_ratio": NON_NEGATIVE,
        "catchup_missed_turns": NON_NEGATIVE,
    }

    # Four one-second commands: parallel tools finish in ~1 s instead of ~4 s.
    parallel_tools: int = 4
    parallel_sleep_s: float = 1.0
    # Parallel passes when the step's wall time stays under 60 % of the tools' summed time.
    parallel_max_wall_ratio: float = 0.6
    # A context limit of 1000 tokens and a 900-token step: over the 70 % threshold.
    context_limit: int = 1000
    over_threshold_tokens: int = 900
    under_threshold_tokens: int = 100
    # Three 429s with retry_after 0.5 s on a 0.2 s base delay: ~2 s of backoff.
    throttle_errors: int = 3
    throttle_retry_after_s: float = 0.5
    retry_base_delay_s: float = 0.2
    # A stopped workspace must fail over to the "no agent" error well before 5 s.
    dial_validation_delay_s: float = 0.5
    # Quick acquisition so the demo keeps moving; heartbeats are irrelevant at this length.
    acquire_interval_s: float = 0.2
    # Bound of every scenario: a broken one fails instead of hanging the demo.
    scenario_timeout_s: float = 30.0
    # Lines of the event log kept under the live table.
    event_log_lines: int = 14
    # Characters of message text shown per event line.
    preview_chars: int = 60
    # Live table refreshes per second.
    refresh_per_second: float = 8.0
    # The catch-up scenario's messages after the subscriber left.
    catchup_missed_turns: int = 2
    # Replica processes (`--dsn` with `--replicas N`): bound of their start (imports,
    # connecting) and of their exit before they are killed.
    worker_start_timeout_s: float = 30.0
    worker_stop_timeout_s: float = 5.0
    # `--dsn`: the demo works in a database of its own, `<prefix><12 hex digits>`, created
    # and dropped through the given DSN; those two statements give up after these bounds
    # (libpq's connect_timeout is whole seconds) instead of hanging the demo.
    database_prefix: str = "chatd_demo_"
    database_connect_timeout_s: int = 10
    database_statement_timeout_s: float = 60.0


@dataclass(frozen=True)
class ScaleTestConfig(Checked):
    """`chatd-trio scaletest`: the replicas' timings and the scripted turn."""

    # Replicas wake each other only by polling: 0.1 s keeps a chat woken on another
    # replica (a takeover) from idling long, at ~10 acquire statements/s per replica.
    acquire_interval_s: float = 0.1
    # list_dir is a real agent round trip without spawning a process; `execute` forks a
    # shell per call (~8 % fewer turns/s on memory, 50 chats: docs/benchmarks/scale.md).
    tool_name: str = "list_dir"
    execute_command: str = "true"
    final_text: str = "done"
    user_text: str = "next"
    # Bound of the whole run: a broken replica fails the run instead of hanging it.
    run_timeout_s: float = 3600.0
    # Connections per replica store: every running turn holds at most one at a time.
    pool_max_size: int = 10
    workspace_name: str = "scaletest"
