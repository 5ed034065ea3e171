"""`chatd-trio demo` end to end: real Server, real local workspace agents, real clock.

Each run takes about two seconds (one-second parallel commands, ~2 s of throttled
retries running alongside); assertions are on the demo's own checks and output.
"""

from __future__ import annotations

import io

import pytest

from chatd_trio import cli
from chatd_trio.config import DemoConfig
from chatd_trio.demo import SCENARIOS, DemoOptions, DemoReport, run_demo

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


async def test_demo_on_postgres_with_two_replicas(pg_dsn: str) -> None:
    out = io.StringIO()
    report = await run_demo(DemoOptions(dsn=pg_dsn, replicas=2, plain=True), out)
    assert_all_passed(report, out.getvalue())
    assert dict(report.summary)["replicas"] == "2"


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
