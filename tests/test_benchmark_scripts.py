"""The benchmark scripts keep up with what they replay: the store's schema, the charts' events."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_raw_floor_replays_turns_on_the_current_schema(pg_dsn: str) -> None:
    """The floor inserts rows with the store's own SQL texts: a column added to the store
    (as `model_options` was) must not break it unnoticed."""
    sizes = ["--chats", "4", "--turns", "2", "--concurrency", "2"]
    done = subprocess.run(
        [sys.executable, "benchmarks/raw_floor.py", "--dsn", pg_dsn, *sizes],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["turns_done"] == 8
    assert result["round_trips_per_turn"] > 0
    assert result["client_cpu_ms_per_turn"] > 0


def test_chart_benchmark_drives_each_chart_as_a_turn_does() -> None:
    """The chart benchmark sends each chart a turn's events with their data: a chart that
    gains an event or a guard's argument (as the turn's `loaded` did) must not break it
    unnoticed."""
    done = subprocess.run(
        [sys.executable, "benchmarks/charts.py", "--turns", "2", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    charts = json.loads(done.stdout)["charts"]
    assert {name: chart["events"] for name, chart in charts.items()} == {
        "dial": 1,
        "dial_switch": 3,
        "compaction": 4,
        "lifecycle": 3,
    }
