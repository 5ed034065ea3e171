"""The benchmark scripts that replay the store's SQL keep up with its schema."""

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
