"""The summary of a run: throughput, statements per turn, delivery, latency, the pool,
and the `reliability` section, from the replicas' reports and the database's facts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from chatd_trio.apps.scaletest.answers import AnswerCounts, answer_counts
from chatd_trio.apps.scaletest.facts import Facts
from chatd_trio.apps.scaletest.plan import Plan
from chatd_trio.apps.scaletest.progress import Progress
from chatd_trio.domain import (
    ChatStatus,
)

__all__ = [
    "PER_TURN_KEYS",
    "diff",
    "durable_counts",
    "percentile",
    "reliability",
    "sum_dicts",
    "summarise",
]


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


def percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, math.ceil(p / 100.0 * len(ordered)) - 1)
    return round(ordered[k], 3)


def sum_dicts(dicts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def diff(end: dict[str, int], start: dict[str, int]) -> dict[str, int]:
    return {k: v - start.get(k, 0) for k, v in end.items() if v - start.get(k, 0)}


def durable_counts(
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


def reliability(
    plan: Plan,
    facts: Facts,
    counts: Mapping[str, AnswerCounts],
    durable: Mapping[str, int],
    progress: Progress,
    outcome: str,
    workers: Sequence[dict[str, Any]],
    reports: Sequence[dict[str, Any]],
    faults: Sequence[dict[str, Any]],
    crashes: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    statuses = list(facts.statuses.values())
    driver = sum_dicts(r["driver"] for r in reports)
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


def summarise(
    plan: Plan,
    facts: Facts,
    progress: Progress,
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
    durable = durable_counts(facts, progress.finals, reports)
    end_flat = sum_dicts(r["end"]["flat"] for r in reports)
    start_flat = sum_dicts(r["steady_start"]["flat"] for r in reports)
    total_turns = plan.chats * plan.turns
    steady_turns = plan.chats * (plan.turns - 1)
    steady_answered, steady_wall = progress.steady()

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
        # Turns 2.. alone, from the `go` to the last turn over: what the raw floor
        # replays (no process start, no first turn, no wait for the slowest first turn).
        "steady_wall_s": round(steady_wall, 3),
        "steady_turns_per_s": round(steady_answered / steady_wall, 3) if steady_wall > 0 else 0.0,
        # Replica processes' CPU (server, drivers, subscribers) per steady turn.
        "steady_replica_cpu_ms_per_turn": _cpu_per_turn(reports, steady_turns),
        # Per replica: its process, the CPU seconds it spent in the steady phase and the
        # wall seconds of that window.
        "steady_cpu_per_replica": [
            {k: r.get(k) for k in ("pid", "steady_cpu_s", "steady_cpu_window_s")} for r in reports
        ],
        "statements": statements_end,
        "steady_statements": statements_steady,
        "per_turn": per_turn(statements_end, end_flat, total_turns),
        "steady_per_turn": per_turn(statements_steady, steady_flat, steady_turns),
        "events": {
            **{k: v for k, v in durable.items() if k != "writes_after_finish"},
            "parts_dropped": end_flat.get("parts_dropped", 0),
        },
        "latency_ms": {
            "local_fanout_p50": percentile(local, 50),
            "local_fanout_p99": percentile(local, 99),
            "cross_replica_fanout_p50": percentile(cross, 50),
            "cross_replica_fanout_p99": percentile(cross, 99),
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
            # How many connections writes may hold at once (PostgresConfig.max_writing) and
            # how many writes waited for one of them, per replica, in the steady phase.
            "max_writing_per_replica": [r["pool"].get("max_writing", 0) for r in reports],
            "steady_write_waits_per_replica": [r["pool"].get("write_waits", 0) for r in reports],
            "write_wait_ms_per_replica": [r["pool"].get("write_wait_ms", 0) for r in reports],
            "end_write_slots_free_per_replica": [
                r["pool"].get("write_slots_free", 0) for r in reports
            ],
            "end_in_use_per_replica": [r["pool"].get("in_use_at_end", 0) for r in reports],
            # The whole run, per replica: connections the pool opened and retired.
            "connections_opened_per_replica": [
                r["pool"].get("connections_opened", 0) for r in reports
            ],
            "connections_retired_per_replica": [
                r["pool"].get("connections_retired", 0) for r in reports
            ],
            # The whole run, per replica: the share of the waits for an answer that the
            # answer wait served without parking the task.
            "answers_in_time_share_per_replica": [_in_time_share(r["pool"]) for r in reports],
        },
        "reliability": reliability(
            plan, facts, counts, durable, progress, outcome, workers, reports, faults, crashes
        ),
    }


def _cpu_per_turn(reports: Sequence[dict[str, Any]], turns: int) -> float | None:
    spent: dict[int, float] = {}
    for r in reports:
        if r.get("steady_cpu_s") is None:
            return None  # a replica started after the steady phase, or stopped before its end
        # Replicas in one process (the memory store) each measured that process: count it
        # once, over the longest window.
        spent[r["pid"]] = max(spent.get(r["pid"], 0.0), r["steady_cpu_s"])
    if not turns or not spent:
        return None
    return round(sum(spent.values()) / turns * 1000, 3)


def _in_time_share(pool: dict[str, Any]) -> float | None:
    waited = pool.get("answers_in_time", 0) + pool.get("answers_parked", 0)
    return round(pool.get("answers_in_time", 0) / waited, 4) if waited else None
