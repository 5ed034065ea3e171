"""`chatd-trio scaletest`: small runs on memory (in-process replicas) and PostgreSQL
(replica processes), checked for lossless delivery, the steady-state counters, the
run's own database, and the reliability counts (planted faults are found)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import uuid
from typing import Any

import psycopg
import pytest

from chatd_trio.apps.cli import main as cli_main
from chatd_trio.apps.scaletest import (
    Plan,
    StoredMessage,
    add_scaletest_command,
    answer_counts,
    install_witness,
    plan_from_args,
    postgres_facts,
    run,
)
from chatd_trio.strategies import Strategies
from tests.pgcluster import create_database, drop_database


def plan(
    store: str,
    *,
    chats: int,
    turns: int,
    dsn: str = "",
    baseline: bool = False,
    **more: Any,
) -> Plan:
    return Plan(
        store=store,
        dsn=dsn,
        replicas=2,
        chats=chats,
        turns=turns,
        tools_per_turn=2,
        subscribers_per_chat=2,
        baseline=baseline,
        **more,
    )


def check_lossless(result: dict[str, Any], chats: int, turns: int) -> None:
    assert result["turns_completed"] == chats * turns
    events = result["events"]
    assert events["durable_lost"] == 0
    assert events["durable_duplicated"] == 0
    # Every subscriber got every user-visible message: 2 subscribers per chat.
    assert events["durable_delivered"] == events["durable_published"]
    assert events["durable_published"] >= chats * 2 * turns * 5


def check_clean(result: dict[str, Any]) -> None:
    """No fault: every reliability count is zero and every replica stopped cleanly."""
    rel = result["reliability"]
    assert rel["outcome"] == "done"
    assert rel["turns_errored"] == 0
    assert rel["turns_unanswered"] == 0
    assert rel["duplicate_answers"] == 0
    assert rel["chats_left_running"] == 0
    assert rel["chats_unfinished"] == 0
    assert rel["writes_after_finish"] == 0
    assert rel["replica_crashes"] == []
    assert rel["faults"] == []
    assert all(w["reported"] for w in rel["workers"])


def check_steady_throughput(result: dict[str, Any], chats: int, turns: int) -> None:
    """The steady throughput counts turns 2.. over the time from the `go` to the last
    of them, a part of the run's wall time."""
    assert 0 < result["steady_wall_s"] < result["wall_s"]
    steady_turns = result["steady_turns_per_s"] * result["steady_wall_s"]
    assert steady_turns == pytest.approx(chats * (turns - 1), rel=0.02)  # both rounded
    # The replicas' CPU over the steady phase: each replica's no more than the wall time
    # of its window (a process cannot spend more than it ran, give or take a thread),
    # and per steady turn the sum over the processes, each counted once.
    windows = result["steady_cpu_per_replica"]
    for w in windows:
        assert 0 < w["steady_cpu_s"] <= w["steady_cpu_window_s"] * 1.05 + 0.002
    per_process: dict[int, float] = {}
    for w in windows:
        per_process[w["pid"]] = max(per_process.get(w["pid"], 0.0), w["steady_cpu_s"])
    cpu_ms = result["steady_replica_cpu_ms_per_turn"]
    assert cpu_ms * chats * (turns - 1) == pytest.approx(
        sum(per_process.values()) * 1000, rel=0.01, abs=0.5
    )


async def test_memory_optimised_vs_baseline() -> None:
    fast = await run(plan("memory", chats=5, turns=3))
    slow = await run(plan("memory", chats=5, turns=3, baseline=True))
    for result in (fast, slow):
        check_lossless(result, 5, 3)
        check_clean(result)
        assert result["reliability"]["stale_token_writes"] is None
        check_steady_throughput(result, 5, 3)
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
    assert fast["db_pool"]["size"] == fast["db_pool"]["max_in_use"] == 0


def _tables(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname NOT IN "
            "('pg_catalog', 'information_schema')"
        ).fetchall()
    return [r[0] for r in rows]


def _database_exists(dsn: str, name: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


def _owner_token_columns(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE column_name = 'owner_token' AND table_name IN ('chats', 'chat_messages')"
        ).fetchone()
    return row is not None and row[0] == 2


async def test_postgres_two_replica_processes_in_a_database_of_their_own(pg_dsn: str) -> None:
    # The server's database the command is pointed at stays as it was: empty.
    given_name = f"chatd_given_{uuid.uuid4().hex[:8]}"
    given = create_database(pg_dsn, given_name)
    try:
        result = await run(plan("postgres", chats=6, turns=3, dsn=given))
        assert _tables(given) == []
    finally:
        drop_database(pg_dsn, given_name)
    database = result["database"]
    assert database["name"].startswith("chatd_scale_")
    assert database["kept"] is False and database["throwaway_cluster"] is False
    assert "dsn" not in database
    assert not _database_exists(pg_dsn, database["name"])
    check_lossless(result, 6, 3)
    check_clean(result)
    check_steady_throughput(result, 6, 3)
    # Stopped by SIGTERM: each replica closed its Server and reported before exiting 0.
    assert [w["exit_code"] for w in result["reliability"]["workers"]] == [0, 0]
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
    steady_pool = result["db_pool"]["steady_max_in_use_per_replica"]
    assert len(steady_pool) == 2
    assert all(0 < n <= result["db_pool"]["size"] for n in steady_pool)
    # Writes hold half the pool at most, and every connection and write slot came back.
    assert result["db_pool"]["max_writing_per_replica"] == [5, 5]
    assert result["db_pool"]["end_write_slots_free_per_replica"] == [5, 5]
    assert result["db_pool"]["end_in_use_per_replica"] == [0, 0]
    # Round trips are counted at the connections of both workers.
    assert result["steady_per_turn"]["round_trips"] > 0
    assert result["latency_ms"]["cross_replica_fanout_p50"] is not None


def _message(
    id_: int, role: str, *parts: dict[str, Any], compressed: bool = False
) -> StoredMessage:
    return StoredMessage.from_row(id_, role, list(parts), "both", compressed)


TEXT = {"type": "text", "text": "done"}
CALL = {"type": "tool_call", "call_id": "c1", "name": "list_dir", "arguments": "{}"}
RESULT = {"type": "tool_result", "call_id": "c1", "name": "list_dir", "result": {}}


def test_answer_counts_one_answer_per_user_message() -> None:
    user, answer = _message(1, "user", TEXT), _message(4, "assistant", TEXT)
    step = [_message(2, "assistant", CALL, TEXT), _message(3, "tool", RESULT)]
    assert answer_counts([user, *step, answer]) == answer_counts([user, answer])
    counts = answer_counts([user, *step, answer])
    assert (counts.users, counts.answered, counts.duplicates, counts.last_answered) == (
        1,
        1,
        0,
        True,
    )
    # A second answer before the next user message is a duplicate; blank text is not
    # an answer, nor is a step that calls a tool (even with text).
    blank = _message(5, "assistant", {"type": "text", "text": "  "})
    again = _message(6, "assistant", TEXT)
    assert answer_counts([user, answer, blank]).duplicates == 0
    assert answer_counts([user, answer, *step]).duplicates == 0
    assert answer_counts([user, answer, again]).duplicates == 1
    assert answer_counts([user, answer, again, again]).duplicates == 2
    # The next user message starts a new count; one left unanswered is counted.
    second = _message(7, "user", TEXT)
    counts = answer_counts([user, answer, second])
    assert (counts.users, counts.answered, counts.unanswered, counts.last_answered) == (
        2,
        1,
        1,
        False,
    )
    assert answer_counts([user, answer, second, again]).duplicates == 0


def test_answer_counts_a_reentry_after_compaction_is_not_a_duplicate() -> None:
    user, answer = _message(1, "user", TEXT), _message(2, "assistant", TEXT)
    summary = _message(3, "user", {"type": "text", "text": "Summary"}, compressed=True)
    call = _message(4, "assistant", CALL, compressed=True)
    result = _message(5, "tool", RESULT, compressed=True)
    reentry = _message(6, "assistant", TEXT)
    counts = answer_counts([user, answer, summary, call, result, reentry])
    # The compaction summary is no user message; the re-entry's answer is no duplicate.
    assert (counts.users, counts.answered, counts.duplicates) == (1, 1, 0)
    assert answer_counts([user, answer, summary, call, result, reentry, reentry]).duplicates == 1


async def test_kept_database_counts_planted_duplicates_and_stale_token_writes(
    pg_dsn: str,
) -> None:
    result = await run(plan("postgres", chats=2, turns=2, dsn=pg_dsn, keep=True))
    database = result["database"]
    dsn = database["dsn"]
    assert database["kept"] is True
    try:
        assert _tables(dsn)
        installed = _owner_token_columns(dsn)
        witness = result["reliability"]["stale_token_witness"]
        assert (witness == "installed") is installed
        with psycopg.connect(dsn, autocommit=True) as conn:
            chat_ids = [str(r[0]) for r in conn.execute("SELECT id FROM chats ORDER BY title")]
            chat = chat_ids[0]
            facts = postgres_facts(dsn, chat_ids)
            assert sum(answer_counts(m).duplicates for m in facts.messages.values()) == 0
            # A second final answer to the last user message, written behind the
            # library's back, is a duplicate answer.
            conn.execute(
                "INSERT INTO chat_messages (chat_id, role, content) VALUES (%s, 'assistant', %s)",
                (chat, json.dumps([TEXT])),
            )
            facts = postgres_facts(dsn, chat_ids)
            assert answer_counts(facts.messages[chat]).duplicates == 1
            assert answer_counts(facts.messages[chat_ids[1]]).duplicates == 0
            # The schema of fenced ownership (added here when the migrations lack it).
            conn.execute(
                "ALTER TABLE chats ADD COLUMN IF NOT EXISTS owner_token bigint NOT NULL DEFAULT 0"
            )
            conn.execute("ALTER TABLE chat_messages ADD COLUMN IF NOT EXISTS owner_token bigint")
            assert install_witness(dsn) == "installed"
            token = conn.execute("SELECT owner_token FROM chats WHERE id = %s", (chat,)).fetchone()
            assert token is not None
            insert = (
                "INSERT INTO chat_messages (chat_id, role, content, owner_token)"
                " VALUES (%s, 'tool', '[]', %s)"
            )
            before = postgres_facts(dsn, chat_ids).stale_writes
            # The current token and no token (an API write) are not stale ...
            conn.execute(insert, (chat, token[0]))
            conn.execute(insert, (chat, None))
            assert postgres_facts(dsn, chat_ids).stale_writes == before
            # ... an older one is, whoever writes it.
            conn.execute(insert, (chat, token[0] - 1))
            after = postgres_facts(dsn, chat_ids)
            assert after.stale_writes == (before or 0) + 1
            assert after.witness == "installed"
    finally:
        drop_database(pg_dsn, database["name"])


def test_witness_is_unavailable_without_the_token_columns(pg_dsn: str) -> None:
    name = f"chatd_witness_{uuid.uuid4().hex[:8]}"
    dsn = create_database(pg_dsn, name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE chats (id uuid PRIMARY KEY)")
            conn.execute("CREATE TABLE chat_messages (id bigserial, chat_id uuid)")
        assert install_witness(dsn).startswith("unavailable")
        # Nothing was installed: inserts still work and nothing is recorded.
        with psycopg.connect(dsn, autocommit=True) as conn:
            chat = uuid.uuid4()
            conn.execute("INSERT INTO chats VALUES (%s)", (chat,))
            conn.execute("INSERT INTO chat_messages (chat_id) VALUES (%s)", (chat,))
            table = conn.execute("SELECT to_regclass('scaletest_stale_writes')").fetchone()
        assert table == (None,)
    finally:
        drop_database(pg_dsn, name)


def test_cli_json_prints_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["scaletest", "--store", "memory", "--chats", "2", "--turns", "2", "--json"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["turns_completed"] == 4
    assert set(out["per_turn"]) == set(out["steady_per_turn"])
    assert out["reliability"]["duplicate_answers"] == 0


def test_every_flag_has_help_with_its_default() -> None:
    parser = argparse.ArgumentParser(prog="chatd-trio")
    sub = parser.add_subparsers(dest="command")
    add_scaletest_command(sub)
    scaletest = sub.choices["scaletest"]
    text = scaletest.format_help()
    flags = [
        a
        for a in scaletest._actions
        if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help"
    ]
    names = {a.option_strings[0] for a in flags}
    assert {"--fault", "--stale-after", "--heartbeat", "--outage-seconds", "--keep"} <= names
    formatter = argparse.ArgumentDefaultsHelpFormatter("chatd-trio")
    for action in flags:
        assert action.help, action.dest
        assert "%(default)" in formatter._get_help_string(action), action.dest
        assert action.option_strings[0] in text
    assert text.count("(default:") >= len(flags)
    assert "--worker" not in text


def test_the_dsn_default_comes_from_the_environment_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "postgresql://chatd:s3cret@db.internal/chatd"
    monkeypatch.setenv("CHATD_DSN", secret)
    parser = argparse.ArgumentParser(prog="chatd-trio")
    sub = parser.add_subparsers(dest="command")
    add_scaletest_command(sub)
    assert secret not in sub.choices["scaletest"].format_help()
    assert "(default: $CHATD_DSN)" in " ".join(sub.choices["scaletest"].format_help().split())
    assert plan_from_args(parser.parse_args(["scaletest"])).dsn == secret
    given = parser.parse_args(["scaletest", "--dsn", "host=elsewhere"])
    assert plan_from_args(given).dsn == "host=elsewhere"
    monkeypatch.delenv("CHATD_DSN")
    assert plan_from_args(parser.parse_args(["scaletest"])).dsn == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fault", "sigkill"], "--fault needs --store postgres"),
        (["--store", "postgres", "--fault", "outage", "--cluster", "dsn"], "throwaway"),
        (["--turns", "1"], "turns >= 2"),
        (["--heartbeat", "400"], "--heartbeat"),
        (["--max-writing", "11"], "--max-writing"),
    ],
)
def test_bad_flags_are_refused_before_anything_runs(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["scaletest", *argv]) == 2
    assert message in capsys.readouterr().err


def test_an_error_inside_the_run_is_printed_from_its_exception_group(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A ScaleTestError raised in the run leaves through its nurseries in exception
    groups; the command matches it there (``except*``) and prints it like a bad flag."""
    dsn = "postgresql://postgres@127.0.0.1:1/postgres"
    argv = ["scaletest", "--store", "postgres", "--cluster", "dsn", "--dsn", dsn, "--json"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "chatd-trio scaletest: error: cannot create the run's database" in err


def check_every_turn_ended(result: dict[str, Any], chats: int, turns: int) -> None:
    """Through a fault the run still ends each turn (answered, errored or confirmed
    stopped) and reads consistent counts back."""
    rel = result["reliability"]
    shown = json.dumps({**rel, "events": result["events"]})
    assert rel["outcome"] == "done", shown
    assert rel["chats_unfinished"] == 0, shown
    assert result["turns_completed"] + rel["turns_unanswered"] == chats * turns, shown
    assert rel["turns_errored"] == max(rel["turns_errored_by_source"].values())
    assert rel["chats_left_running"] == 0, shown
    assert result["events"]["durable_lost"] == 0, shown
    assert result["events"]["durable_duplicated"] == 0, shown
    assert result["database"]["throwaway_cluster"] is True


FAULT_RUN = {"stale_after": 2.0, "heartbeat": 0.5, "fault": ""}


async def test_pool_kill_terminates_one_replicas_pool_and_the_run_goes_on() -> None:
    result = await run(plan("postgres", chats=6, turns=4, **{**FAULT_RUN, "fault": "pool_kill"}))
    check_every_turn_ended(result, 6, 4)
    rel = result["reliability"]
    (fault,) = rel["faults"]
    assert fault["kind"] == "pool_kill"
    assert fault["terminated"] >= 1
    assert fault["at_turns"] >= 8
    victim = [w for w in rel["workers"] if w.get("fault") == "pool_kill"]
    assert [w["replica"] for w in victim] == [fault["replica"]]
    assert all(w["exit_code"] == 0 and w["reported"] for w in rel["workers"])


async def test_sigkill_replaces_the_replica_and_its_chats_are_recovered() -> None:
    result = await run(plan("postgres", chats=6, turns=4, **{**FAULT_RUN, "fault": "sigkill"}))
    check_every_turn_ended(result, 6, 4)
    rel = result["reliability"]
    (fault,) = rel["faults"]
    assert fault["kind"] == "sigkill"
    assert fault["exit_code"] == -signal.SIGKILL
    killed = [w for w in rel["workers"] if w["pid"] == fault["pid"]]
    assert killed == [
        {
            "replica": fault["replica"],
            "pid": fault["pid"],
            "exit_code": -signal.SIGKILL,
            "reported": False,
            "turns_finished": None,
            "fault": "sigkill",
        }
    ]
    replacement = [w for w in rel["workers"] if w["pid"] == fault["replacement_pid"]]
    assert [(w["replica"], w["exit_code"], w["reported"]) for w in replacement] == [
        (fault["replica"], 0, True)
    ]
    assert rel["replica_crashes"] == []


async def test_commit_stall_holds_every_chat_and_writes_wait_for_their_slots() -> None:
    """Every chat row locked for a second: the writes of both replicas stall; with one
    write slot per replica the writers past it wait in the replica, and every turn
    still ends once the stall does."""
    stall = {**FAULT_RUN, "fault": "commit_stall", "max_writing": 1}
    result = await run(plan("postgres", chats=6, turns=4, **stall))
    check_every_turn_ended(result, 6, 4)
    assert result["turns_completed"] == 24
    (fault,) = result["reliability"]["faults"]
    assert fault["kind"] == "commit_stall"
    assert fault["locked_chats"] == 6
    assert fault["held_s"] >= 1.0
    # The replicas' writes queued on the row locks while they were held.
    assert fault["writes_waiting_at_end"] >= 1
    pool = result["db_pool"]
    assert pool["max_writing_per_replica"] == [1, 1]
    assert sum(pool["steady_write_waits_per_replica"]) >= 1
    assert pool["end_write_slots_free_per_replica"] == [1, 1]


def test_baseline_flag_reaches_the_strategies_and_the_configuration() -> None:
    from chatd_trio.apps.scaletest import BASELINE, replica_config, replica_strategies

    baseline = plan("memory", chats=1, turns=2, baseline=True)
    optimised = plan("memory", chats=1, turns=2)
    assert replica_strategies(baseline) == BASELINE
    assert replica_strategies(optimised) == Strategies()
    # Every strategy takes its plain way.
    assert all(
        getattr(BASELINE, f.name) != getattr(Strategies(), f.name)
        for f in dataclasses.fields(Strategies)
    )
    assert not replica_config(baseline).streams.notify_carries_messages
    assert replica_config(optimised).streams.notify_carries_messages


def test_stale_after_and_heartbeat_reach_the_replicas() -> None:
    from chatd_trio.apps.scaletest import replica_config

    config = replica_config(plan("postgres", chats=1, turns=2, stale_after=7.0, heartbeat=1.5))
    assert (config.acquire.stale_after, config.acquire.heartbeat_interval) == (7.0, 1.5)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigstop", "listen_kill", "pg_restart", "outage"])
async def test_each_other_fault_is_injected_once_and_the_run_ends(fault: str) -> None:
    result = await run(
        plan("postgres", chats=6, turns=4, **{**FAULT_RUN, "fault": fault, "outage_s": 2.0})
    )
    check_every_turn_ended(result, 6, 4)
    (record,) = result["reliability"]["faults"]
    assert record["kind"] == fault
    if fault == "sigstop":
        assert record["paused_s"] > FAULT_RUN["stale_after"]
    elif fault == "listen_kill":
        # One LISTEN session per replica.
        assert record["terminated"] == 2
    elif fault == "outage":
        assert record["down_s"] >= 2.0
    else:
        assert record["down_s"] > 0
