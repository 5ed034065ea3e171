"""Scale test, optimised vs `--baseline`, on PostgreSQL. Never run by the tests.

    python benchmarks/scale.py [--chats 600 --turns 10 --replicas 2 --admin-dsn DSN]

Each variant runs `chatd-trio scaletest --store postgres --json` against a freshly
created database (dropped afterwards) and the script prints one JSON object with
both summaries, the exact commands and the optimised/baseline ratios.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import uuid
from typing import Any

import psycopg

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _dsn_for(admin: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(admin)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def run_variant(args: argparse.Namespace, baseline: bool) -> dict[str, Any]:
    name = f"chatd_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        argv = [
            sys.executable, "-m", "chatd_trio.cli", "scaletest", "--store", "postgres",
            "--dsn", _dsn_for(args.admin_dsn, name), "--replicas", str(args.replicas),
            "--chats", str(args.chats), "--turns", str(args.turns),
            "--tools-per-turn", str(args.tools_per_turn),
            "--subscribers-per-chat", str(args.subscribers_per_chat),
            "--model-latency-ms", str(args.model_latency_ms), "--json",
        ]  # fmt: skip
        if baseline:
            argv.append("--baseline")
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        result: dict[str, Any] = json.loads(done.stdout)
        shown = ["chatd-trio", *argv[3:]]
        shown[shown.index("--dsn") + 1] = "DSN"
        result["command"] = shlex.join(shown)
        return result
    finally:
        with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin-dsn", default=ADMIN_DSN)
    parser.add_argument("--chats", type=int, default=600)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tools-per-turn", type=int, default=2)
    parser.add_argument("--subscribers-per-chat", type=int, default=2)
    parser.add_argument("--model-latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    optimised = run_variant(args, baseline=False)
    baseline = run_variant(args, baseline=True)
    ratios = {
        "turns_per_s": round(optimised["turns_per_s"] / baseline["turns_per_s"], 3),
        "steady_statements_per_turn": round(
            optimised["steady_per_turn"]["statements"] / baseline["steady_per_turn"]["statements"],
            3,
        ),
    }
    print(json.dumps({"optimised": optimised, "baseline": baseline, "ratios": ratios}))


if __name__ == "__main__":
    main()
