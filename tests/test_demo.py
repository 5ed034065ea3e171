"""`chatd-trio demo` end to end: real Server, real local workspace agents, real clock.

Each run takes about two seconds (one-second parallel commands, ~2 s of throttled
retries running alongside); assertions are on the demo's own checks and output. On
PostgreSQL the second replica is a separate process (`python -m chatd_trio.apps.demo worker`).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rich.console import Console

from chatd_trio.apps import cli
from chatd_trio.apps.demo import (
    SCENARIOS,
    ChatRow,
    DemoOptions,
    DemoReport,
    Display,
    _replica_processes,
    run_demo,
    scratch_database,
)
from chatd_trio.config import DemoConfig
from chatd_trio.domain import ChatStatus, TextPart
from chatd_trio.errors import StoreError, StoreUnavailable
from chatd_trio.store.postgres import PostgresStore
from tests.pgcluster import create_database, drop_database

NAMES = [name for name, _ in SCENARIOS]
PREFIX = DemoConfig().database_prefix


def database_state(dsn: str) -> dict[str, int]:
    """Every table of the database's current schema with its row count."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            ).fetchall()
        ]
        state: dict[str, int] = {}
        for table in tables:
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            ).fetchone()
            assert row is not None
            state[table] = int(row[0])
        return state


def demo_databases(dsn: str) -> set[str]:
    """Names of the demo's databases on the server of `dsn`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (PREFIX,)
        ).fetchall()
    return {r[0] for r in rows}


@pytest.fixture
def given_dsn(pg_dsn: str) -> Iterator[str]:
    """The database a user hands the demo: its own chatd schema and one chat of its own."""
    name = f"chatd_given_{uuid.uuid4().hex[:12]}"
    dsn = create_database(pg_dsn, name)

    async def seed() -> None:
        async with PostgresStore.open(dsn) as store:
            await store.create_chat(uuid.uuid4(), "the user's own chat", (TextPart("hi"),))

    trio.run(seed)
    try:
        yield dsn
    finally:
        drop_database(pg_dsn, name)


def assert_all_passed(report: DemoReport, output: str) -> None:
    assert [r.name for r in report.results] == NAMES
    failed = [(r.name, r.detail) for r in report.results if not r.passed]
    assert failed == [], output
    assert report.passed
    for name in NAMES:
        assert f"PASS {name}:" in output
    assert output.rstrip().endswith("DEMO PASS")


async def test_demo_on_memory_passes_every_scenario() -> None:
    out = io.StringIO()
    report = await run_demo(DemoOptions(plain=True), out)
    output = out.getvalue()
    assert_all_passed(report, output)
    summary = dict(report.summary)
    assert summary["compactions / re-entries"] == "1 / 1"
    assert summary["retries"] == str(DemoConfig().throttle_errors)
    assert summary["stream drops"] == "0"
    # The event log shows real events: the throttled retries and the rebuilt workspace.
    assert output.count("retry #") == DemoConfig().throttle_errors
    assert "workspace rebuilt: new agent" in output


async def test_demo_on_postgres_leaves_the_given_database_as_it_found_it(given_dsn: str) -> None:
    before = await trio.to_thread.run_sync(database_state, given_dsn)
    demos_before = await trio.to_thread.run_sync(demo_databases, given_dsn)
    assert before["chats"] == 1 and before["chat_messages"] == 1
    out = io.StringIO()
    report = await run_demo(DemoOptions(dsn=given_dsn, replicas=2, plain=True), out)
    output = out.getvalue()
    assert_all_passed(report, output)
    # The demo (and its replica process) worked in a database of its own...
    assert report.database is not None
    assert report.database.name.startswith(PREFIX)
    assert f"demo database: {report.database.name}" in output
    # ... which is gone, and the given database holds exactly what it held before.
    assert await trio.to_thread.run_sync(demo_databases, given_dsn) == demos_before
    assert await trio.to_thread.run_sync(database_state, given_dsn) == before
    summary = dict(report.summary)
    assert summary["replicas"] == "2"
    # Replica 0 is this process, replica 1 the worker process: both ran turns.
    local, worker = (int(n) for n in summary["turns per replica"].split(" / "))
    assert local > 0 and worker > 0
    # Summed over the processes: one compaction, every throttled attempt retried once.
    assert summary["compactions / re-entries"] == "1 / 1"
    assert summary["retries"] == str(DemoConfig().throttle_errors)


@pytest.mark.parametrize("ending", ["error", "cancel"])
async def test_replica_processes_end_with_the_demo(pg_dsn: str, ending: str) -> None:
    procs: list[trio.Process] = []
    with pytest.raises(RuntimeError) if ending == "error" else trio.CancelScope() as scope:
        async with _replica_processes(pg_dsn, 1, DemoConfig()) as workers:
            procs = [w.proc for w in workers]
            snapshot = await workers[0].request("stats")
            assert snapshot["stats"]["turns_started"] == 0
            if ending == "error":
                raise RuntimeError("the demo failed")
            # Ctrl-C inside trio.run arrives as a cancellation of the demo's tasks.
            assert isinstance(scope, trio.CancelScope)
            scope.cancel()
            await trio.sleep_forever()
    assert len(procs) == 1
    assert procs[0].returncode is not None


async def test_a_missed_expectation_is_reported_as_fail() -> None:
    # No wall time can be under 0 % of the summed time: the parallel check must fail.
    out = io.StringIO()
    report = await run_demo(DemoOptions(plain=True), out, DemoConfig(parallel_max_wall_ratio=0.0))
    verdicts = {r.name: r.passed for r in report.results}
    assert verdicts.pop("parallel tools") is False
    assert all(verdicts.values())
    assert not report.passed
    assert out.getvalue().rstrip().endswith("DEMO FAIL")


def test_cli_demo_exits_zero_in_plain_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--plain"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("DEMO PASS")


async def test_keep_leaves_the_demo_database_and_prints_its_dsn(given_dsn: str) -> None:
    before = await trio.to_thread.run_sync(database_state, given_dsn)
    out = io.StringIO()
    report = await run_demo(DemoOptions(dsn=given_dsn, plain=True, keep=True), out)
    assert report.passed, out.getvalue()
    db = report.database
    assert db is not None
    try:
        assert f"demo database kept: {db.shown}" in out.getvalue()
        # The printed DSN reaches the kept database, which holds the demo's chats.
        kept = await trio.to_thread.run_sync(database_state, db.shown)
        assert kept["chats"] >= len(NAMES)
        assert await trio.to_thread.run_sync(database_state, given_dsn) == before
    finally:
        await trio.to_thread.run_sync(drop_database, given_dsn, db.name)


async def test_scratch_database_is_dropped_on_failure_despite_open_connections(
    pg_dsn: str,
) -> None:
    with pytest.raises(RuntimeError, match="scenario crashed"):
        async with scratch_database(pg_dsn, DemoConfig()) as db:
            # A replica process killed mid-way can leave its session behind: the drop
            # must not wait for it (nor fail on it).
            lingering = await trio.to_thread.run_sync(psycopg.connect, db.dsn)
            try:
                assert db.name in await trio.to_thread.run_sync(demo_databases, pg_dsn)
                raise RuntimeError("scenario crashed")
            finally:
                names_while_open = await trio.to_thread.run_sync(demo_databases, pg_dsn)
                assert db.name in names_while_open
    assert db.name not in await trio.to_thread.run_sync(demo_databases, pg_dsn)
    # The drop ended the lingering session.
    with pytest.raises(psycopg.OperationalError):
        await trio.to_thread.run_sync(lingering.execute, "SELECT 1")
    lingering.close()


async def test_scratch_database_is_dropped_when_the_demo_is_cancelled(pg_dsn: str) -> None:
    names: list[str] = []
    with trio.CancelScope() as scope:
        async with scratch_database(pg_dsn, DemoConfig()) as db:
            names.append(db.name)
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert names and names[0] not in await trio.to_thread.run_sync(demo_databases, pg_dsn)


@pytest.fixture
def role_without_createdb(pg_dsn: str) -> Iterator[str]:
    """A DSN for a login role that may not create databases."""
    role = f"chatd_nocreatedb_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOCREATEDB").format(sql.Identifier(role)))
    params = {k: str(v) for k, v in conninfo_to_dict(pg_dsn).items() if v is not None}
    params["user"] = role
    try:
        yield make_conninfo("", **params)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_a_role_without_createdb_gets_a_clear_error_and_nothing_is_written(
    role_without_createdb: str, pg_dsn: str
) -> None:
    before = await trio.to_thread.run_sync(database_state, pg_dsn)
    demos_before = await trio.to_thread.run_sync(demo_databases, pg_dsn)
    with pytest.raises(StoreError, match="CREATEDB") as raised:
        await run_demo(DemoOptions(dsn=role_without_createdb, plain=True), io.StringIO())
    assert "permission denied" in str(raised.value)
    assert await trio.to_thread.run_sync(demo_databases, pg_dsn) == demos_before
    assert await trio.to_thread.run_sync(database_state, pg_dsn) == before


def test_cli_demo_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1 on the loopback refuses at once: nothing listens there.
    dsn = "postgresql://postgres@127.0.0.1:1/postgres"
    assert cli.main(["demo", "--plain", "--dsn", dsn]) == 2
    err = capsys.readouterr().err
    assert "cannot reach 127.0.0.1:1/postgres" in err
    assert StoreUnavailable.__name__ not in err  # a message for people, not a traceback


def test_cli_demo_reports_a_malformed_dsn(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--plain", "--dsn", "nonsense=1"]) == 2
    assert "invalid dsn" in capsys.readouterr().err


def test_cli_keep_needs_a_dsn(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--plain", "--keep"]) == 2
    assert "--keep needs --dsn" in capsys.readouterr().err


# -- the live view at 80x24 ----------------------------------------------------------------------

TITLES = (
    "parallel tools",
    "workspace rebuild",
    "stopped workspace",
    "compaction",
    "subagent (root)",
    "what is six times seven?",
    "retry storm",
    "subscriber catch-up",
)
LONG = 'call execute({"command": "s=$(date +%s%3N); sleep 1.0; echo a $s $(date +%s%3N)"})'


def rendered(display: Display, width: int = 80, height: int = 24) -> list[str]:
    console = Console(width=width, height=height, record=True, file=io.StringIO())
    console.print(display._render())
    return console.export_text().splitlines()


def busy_display(log_lines: int = 40) -> Display:
    """Eight chats with long last events and more log lines than any screen holds."""
    display = Display(io.StringIO(), DemoConfig(), plain=False)
    statuses = list(ChatStatus)
    for i, title in enumerate(TITLES):
        status = statuses[i % len(statuses)].value
        display.rows.append(
            ChatRow(uuid.uuid4(), title, status, steps=i + 1, tool_calls=10 * i, last_event=LONG)
        )
    for i in range(log_lines):
        display.line(f"[parallel tools] event {i:02d}: #{i} assistant: {LONG}")
    return display


def test_the_live_view_at_80x24_shows_every_status_and_count() -> None:
    display = busy_display()
    lines = rendered(display)
    assert len(lines) <= 24
    assert all(len(line) <= 80 for line in lines)
    for row in display.rows:
        line = next(line for line in lines if row.title[:10] in line)
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        assert cells[1] == row.status
        assert cells[2:4] == [str(row.steps), str(row.tool_calls)]
        assert cells[4].startswith("call execute(")


def test_the_event_log_at_80x24_shows_its_latest_lines_one_line_each() -> None:
    lines = rendered(busy_display(log_lines=40))
    events = [line for line in lines if "[parallel tools] event" in line]
    # As many as fit under the table (8 rows + 5 lines of table, 2 of panel), newest last.
    assert len(events) == 24 - (8 + 5) - 2
    numbers = [int(line.split("event ")[1][:2]) for line in events]
    assert numbers == list(range(40 - len(events), 40))
    # Cut with an ellipsis, never wrapped onto a second line.
    assert all(line.rstrip().endswith("… │") for line in events)
    assert lines[-1].startswith("╰")


def test_a_roomy_terminal_shows_the_configured_log_length_and_full_titles() -> None:
    lines = rendered(busy_display(log_lines=40), width=160, height=60)
    events = [line for line in lines if "[parallel tools] event" in line]
    assert len(events) == DemoConfig().event_log_lines
    assert any("what is six times seven?" in line for line in lines)
