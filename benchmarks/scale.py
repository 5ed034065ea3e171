"""Scale test on PostgreSQL: optimised vs baseline, or the fault table. Never run by the tests.

    python benchmarks/scale.py [--chats 600 --turns 10 --replicas 2 --admin-dsn DSN]
    python benchmarks/scale.py --faults [--chats 200 --turns 8 --stale-after 6 --heartbeat 1]

Without `--faults`, each variant runs `chatd-trio scaletest --store postgres --json`
against the `--admin-dsn` server (the command creates its own database there and drops
it); right after the optimised one, `benchmarks/raw_floor.py` replays the same number
of turns raw, with as many connections as the replicas' pools (`--no-floor` skips it).
The script prints one JSON object with the summaries, the exact commands, the
framework's share of the floor and the optimised/baseline ratios (`--no-baseline`
runs the optimised variant only).

With `--faults`, it runs the scale test once per fault kind (each on a throwaway
cluster the command starts itself) and prints one JSON object: the rows of the
reliability table in docs/reliability.md, each with its exact command and the full
`reliability` section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

from chatd_trio.apps.scaletest.plan import FAULTS as SCALETEST_FAULTS
from chatd_trio.config import ScaleTestConfig

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
FAULTS = ("none", *SCALETEST_FAULTS)


def _scaletest(argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "chatd_trio.apps.cli", "scaletest", *argv, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    shown = ["chatd-trio", "scaletest", *argv, "--json"]
    if "--dsn" in shown:
        shown[shown.index("--dsn") + 1] = "DSN"
    result["command"] = shlex.join(shown)
    return result


def _workload(args: argparse.Namespace) -> list[str]:
    return [
        "--store", "postgres", "--replicas", str(args.replicas),
        "--chats", str(args.chats), "--turns", str(args.turns),
        "--tools-per-turn", str(args.tools_per_turn),
        "--subscribers-per-chat", str(args.subscribers_per_chat),
        "--model-latency-ms", str(args.model_latency_ms),
    ] + (["--max-writing", str(args.max_writing)] if args.max_writing else [])  # fmt: skip


def run_variant(args: argparse.Namespace, baseline: bool) -> dict[str, Any]:
    workload = _workload(args)
    argv = [*workload[:2], "--dsn", args.admin_dsn, *workload[2:]]
    return _scaletest([*argv, "--baseline"] if baseline else argv)


def run_fault(args: argparse.Namespace, fault: str) -> dict[str, Any]:
    argv = [
        *_workload(args),
        "--stale-after", str(args.stale_after), "--heartbeat", str(args.heartbeat),
        "--cluster", "throwaway",
    ]  # fmt: skip
    if fault != "none":
        argv += ["--fault", fault]
    if fault == "outage":
        argv += ["--outage-seconds", str(args.outage_seconds)]
    result = _scaletest(argv)
    rel = result["reliability"]
    return {
        "fault": fault,
        "command": result["command"],
        "turns": args.chats * args.turns,
        "turns_completed": result["turns_completed"],
        "wall_s": result["wall_s"],
        "durable_lost": rel["durable_lost"],
        "durable_duplicated": rel["durable_duplicated"],
        "duplicate_answers": rel["duplicate_answers"],
        "stale_token_writes": rel["stale_token_writes"],
        "turns_errored": rel["turns_errored"],
        "turns_unanswered": rel["turns_unanswered"],
        "chats_left_running": rel["chats_left_running"],
        "replica_crashes": len(rel["replica_crashes"]),
        "turn_ends_from_database": rel["turn_ends_from_database"],
        "writes_after_finish": rel["writes_after_finish"],
        "pool_high_water": result["db_pool"]["steady_max_in_use_per_replica"],
        "write_waits": result["db_pool"]["steady_write_waits_per_replica"],
        "reliability": rel,
    }


def run_floor(args: argparse.Namespace) -> dict[str, Any]:
    concurrency = args.replicas * ScaleTestConfig().pool_max_size
    argv = [
        "--chats", str(args.chats), "--turns", str(args.turns),
        "--concurrency", str(concurrency),
    ]  # fmt: skip
    cmd = [sys.executable, "benchmarks/raw_floor.py", "--dsn", args.admin_dsn, *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    result["command"] = shlex.join(["python", "benchmarks/raw_floor.py", "--dsn", "DSN", *argv])
    return result


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


def _machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--admin-dsn", default=ADMIN_DSN, help=f"server (default {ADMIN_DSN})")
    parser.add_argument("--faults", action="store_true", help="run the fault table instead")
    parser.add_argument("--only", choices=FAULTS, nargs="*", help="with --faults: these rows")
    parser.add_argument("--chats", type=int, default=None, help="600, or 200 with --faults")
    parser.add_argument("--turns", type=int, default=None, help="10, or 8 with --faults")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tools-per-turn", type=int, default=2)
    parser.add_argument("--subscribers-per-chat", type=int, default=2)
    parser.add_argument("--model-latency-ms", type=float, default=0.0)
    parser.add_argument("--stale-after", type=float, default=6.0)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--outage-seconds", type=float, default=15.0)
    parser.add_argument(
        "--max-writing", type=int, default=0, help="replicas' max_writing (0: half the pool)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="the optimised variant only")
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the raw SQL floor (benchmarks/raw_floor.py)"
    )
    args = parser.parse_args()
    if args.faults:
        args.chats = args.chats or 200
        args.turns = args.turns or 8
        rows = []
        for fault in args.only or FAULTS:
            print(f"fault {fault} ...", file=sys.stderr)
            rows.append(run_fault(args, fault))
        print(json.dumps({"commit": _commit(), "machine": _machine(), "rows": rows}))
        return
    args.chats = args.chats or 600
    args.turns = args.turns or 10
    optimised = run_variant(args, baseline=False)
    out: dict[str, Any] = {"optimised": optimised}
    if not args.no_floor:
        # In the same run: the same steady turns replayed raw, with as many connections
        # as the replicas' pools together.
        floor = run_floor(args)
        out["raw_floor"] = floor
        out["framework_over_floor"] = round(
            optimised["turns_per_s"] / floor["floor_turns_per_s"], 3
        )
        # Steady turns against steady turns: the floor replays turn 2 onwards only.
        out["steady_framework_over_floor"] = round(
            optimised["steady_turns_per_s"] / floor["floor_turns_per_s"], 3
        )
    if not args.no_baseline:
        baseline = run_variant(args, baseline=True)
        out["baseline"] = baseline
        out["ratios"] = {
            "turns_per_s": round(optimised["turns_per_s"] / baseline["turns_per_s"], 3),
            "steady_statements_per_turn": round(
                optimised["steady_per_turn"]["statements"]
                / baseline["steady_per_turn"]["statements"],
                3,
            ),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
