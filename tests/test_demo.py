"""`chatd-trio demo` end to end: real Server, real local workspace agents, real clock.

Each run takes about two seconds (one-second parallel commands, ~2 s of throttled
retries running alongside); assertions are on the demo's own checks and output. On
PostgreSQL the second replica is a separate process (`--replica-worker`).
"""

from __future__ import annotations

import io

import pytest
import trio

from chatd_trio import cli
from chatd_trio.config import DemoConfig
from chatd_trio.demo import SCENARIOS, DemoOptions, DemoReport, _replica_processes, run_demo

NAMES = [name for name, _ in SCENARIOS]


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


async def test_demo_on_postgres_runs_a_replica_process(pg_dsn: str) -> None:
    out = io.StringIO()
    report = await run_demo(DemoOptions(dsn=pg_dsn, replicas=2, plain=True), out)
    assert_all_passed(report, out.getvalue())
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
