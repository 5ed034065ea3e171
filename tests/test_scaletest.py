"""`chatd-trio scaletest`: small runs on memory (in-process replicas) and PostgreSQL
(replica processes), checked for lossless delivery and the steady-state counters."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatd_trio.cli import main as cli_main
from chatd_trio.scaletest import Plan, run


def plan(store: str, *, chats: int, turns: int, dsn: str = "", baseline: bool = False) -> Plan:
    return Plan(
        store=store,
        dsn=dsn,
        replicas=2,
        chats=chats,
        turns=turns,
        tools_per_turn=2,
        subscribers_per_chat=2,
        baseline=baseline,
    )


def check_lossless(result: dict[str, Any], chats: int, turns: int) -> None:
    assert result["turns_completed"] == chats * turns
    events = result["events"]
    assert events["durable_lost"] == 0
    assert events["durable_duplicated"] == 0
    # Every subscriber got every user-visible message: 2 subscribers per chat.
    assert events["durable_delivered"] == events["durable_published"]
    assert events["durable_published"] >= chats * 2 * turns * 5


async def test_memory_optimised_vs_baseline() -> None:
    fast = await run(plan("memory", chats=5, turns=3))
    slow = await run(plan("memory", chats=5, turns=3, baseline=True))
    for result in (fast, slow):
        check_lossless(result, 5, 3)
    steady, base = fast["steady_per_turn"], slow["steady_per_turn"]
    # The persisted binding: no latest-build lookup and one dial per steady turn.
    assert steady["latest_build_agent_lookups"] == 0
    assert steady["dials"] == 1
    assert base["latest_build_agent_lookups"] > 0
    assert base["dials"] > steady["dials"]
    # The durable cache and carried messages spare reads on both kinds of replica; with
    # the store telling each message's predecessor the same replica never reads.
    assert steady["stream_db_reads_same_replica"] == 0
    assert base["stream_db_reads_same_replica"] > 0
    assert steady["stream_db_reads_cross_replica"] == 0
    assert base["stream_db_reads_cross_replica"] > 0
    assert steady["statements"] < base["statements"]
    # Message notifies ride in the inserting operations: fewer separate publishes, and
    # fewer round trips in all even counting those notifies as statements.
    assert steady["notify_publishes"] < base["notify_publishes"]
    assert (
        steady["statements"] + steady["notify_publishes"]
        < base["statements"] + base["notify_publishes"]
    )
    assert fast["statements"]["NotifyInTransaction"] > 0
    assert "NotifyInTransaction" not in slow["statements"]
    assert fast["latency_ms"]["local_fanout_p50"] is not None
    assert fast["db_pool"] == {"size": 0, "max_in_use": 0}


async def test_postgres_two_replica_processes(pg_dsn: str) -> None:
    result = await run(plan("postgres", chats=6, turns=3, dsn=pg_dsn))
    check_lossless(result, 6, 3)
    steady = result["steady_per_turn"]
    assert steady["latest_build_agent_lookups"] == 0
    assert steady["dials"] == 1
    assert steady["validations"] == 0
    assert steady["stream_db_reads_same_replica"] == 0
    assert steady["stream_db_reads_cross_replica"] == 0
    # Statements were counted in both worker processes.
    assert result["statements"]["AcquireChats"] >= 2
    assert sum(result["statements"].values()) == pytest.approx(
        result["per_turn"]["statements"] * 18, abs=1
    )
    assert 0 < result["db_pool"]["max_in_use"] <= result["db_pool"]["size"]
    assert result["latency_ms"]["cross_replica_fanout_p50"] is not None


def test_cli_json_prints_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["scaletest", "--store", "memory", "--chats", "2", "--turns", "2", "--json"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["turns_completed"] == 4
    assert set(out["per_turn"]) == set(out["steady_per_turn"])


def test_baseline_flag_reaches_the_configuration() -> None:
    from chatd_trio.scaletest import replica_config

    config = replica_config(plan("memory", chats=1, turns=2, baseline=True))
    assert not config.streams.durable_cache_enabled
    assert not config.streams.notify_carries_messages
    assert not config.workspace.use_binding
    assert not config.subagents.use_pubsub
    assert not config.loop.parallel_tools
    assert replica_config(plan("memory", chats=1, turns=2)).loop.parallel_tools
