"""The `chatd-trio scaletest` command: its flags, the plan they make, and the run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any

import trio

from chatd_trio._groups import leaves
from chatd_trio.apps.scaletest.coordinator import run
from chatd_trio.apps.scaletest.plan import CLUSTERS, FAULTS, Plan, ScaleTestError
from chatd_trio.apps.scaletest.worker import worker_main
from chatd_trio.config import (
    AcquireConfig,
    ScaleTestConfig,
)

__all__ = [
    "DSN_FROM_ENV",
    "add_scaletest_command",
    "plan_from_args",
    "run_scaletest_command",
]


# The --dsn default, shown as such in --help and resolved when the plan is made.
DSN_FROM_ENV = "$CHATD_DSN"


def add_scaletest_command(sub: Any) -> None:
    """Register `scaletest` on the `chatd-trio` subcommand parser."""
    p = sub.add_parser(
        "scaletest",
        help="run many chats over several replicas, optionally through a fault",
        description=(
            "Run N chats x M turns over R replicas and print a JSON summary: throughput, "
            "statements per turn, delivery, and a `reliability` section (turns errored, "
            "duplicate answers, stale-token writes, chats left running, faults). On "
            "PostgreSQL the run works in a database of its own, dropped at the end."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--store", choices=("memory", "postgres"), default="memory", help="where chats live"
    )
    p.add_argument(
        "--dsn",
        # Read when the run starts, not shown: --help must not print a password.
        default=DSN_FROM_ENV,
        help="PostgreSQL server the run creates its own database on (CREATEDB needed); "
        "an empty DSN is libpq's defaults (PGHOST, PGUSER, or the local socket, as psql "
        "does), as is an unset $CHATD_DSN",
    )
    p.add_argument("--replicas", type=int, default=2, help="replicas (processes on PostgreSQL)")
    p.add_argument("--chats", type=int, default=10, help="chats")
    p.add_argument("--turns", type=int, default=3, help="user messages per chat (>= 2)")
    p.add_argument("--tools-per-turn", type=int, default=2, help="tool calls in a turn's step")
    p.add_argument("--subscribers-per-chat", type=int, default=2, help="subscribers of each chat")
    p.add_argument(
        "--model-latency-ms", type=float, default=0.0, help="scripted model delay per delta"
    )
    p.add_argument(
        "--tool",
        choices=("list_dir", "execute"),
        default=ScaleTestConfig.tool_name,
        help="workspace tool the model calls",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress bar")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="run the replicas the plain ways the optimisations are measured against "
        "(chatd_trio.strategies)",
    )
    p.add_argument(
        "--fault",
        choices=FAULTS,
        default=None,
        help="inject this fault once a third of the turns are over (needs --store postgres)",
    )
    p.add_argument(
        "--stale-after",
        type=float,
        default=AcquireConfig.stale_after,
        help="replicas' AcquireConfig.stale_after, seconds",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=AcquireConfig.heartbeat_interval,
        help="replicas' AcquireConfig.heartbeat_interval, seconds",
    )
    p.add_argument(
        "--outage-seconds",
        type=float,
        default=Plan.outage_s,
        help="how long --fault outage keeps PostgreSQL stopped",
    )
    p.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="auto",
        help="throwaway: initdb a temporary cluster on a free port (removed at the end); "
        "dsn: the --dsn server; auto: throwaway with --fault, else dsn",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the run's database (and throwaway cluster) and print its DSN",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=Plan.deadline_s,
        help="seconds after which the run stops waiting for turns",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=0.0,
        help="seconds without any turn ending after which the run stops waiting; "
        "0: 2 x --stale-after + 30 (+ --outage-seconds with --fault outage)",
    )
    p.add_argument(
        "--max-writing",
        type=int,
        default=0,
        help="replicas' PostgresConfig.max_writing: connections writes may hold at once; "
        "0: the default, half the pool",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The run's plan from parsed `scaletest` arguments."""
    return Plan(
        store=args.store,
        dsn=os.environ.get("CHATD_DSN", "") if args.dsn == DSN_FROM_ENV else args.dsn,
        replicas=args.replicas,
        chats=args.chats,
        turns=args.turns,
        tools_per_turn=args.tools_per_turn,
        subscribers_per_chat=args.subscribers_per_chat,
        model_latency_ms=args.model_latency_ms,
        baseline=args.baseline,
        tool=args.tool,
        stale_after=args.stale_after,
        heartbeat=args.heartbeat,
        fault=args.fault or "",
        outage_s=args.outage_seconds,
        cluster=args.cluster,
        keep=args.keep,
        deadline_s=args.deadline,
        stall_s=args.stall_timeout,
        max_writing=args.max_writing,
    )


async def _run_until_terminated(plan: Plan, progress: bool) -> dict[str, Any] | int:
    """`run`, or the signal number when SIGTERM or SIGINT cancelled it: the replicas are
    then stopped and reaped, the run's database dropped and its cluster removed (the
    cleanups are shielded)."""
    outcome: dict[str, Any] | int = 0
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def main() -> None:
                nonlocal outcome
                outcome = await run(plan, progress=progress)
                nursery.cancel_scope.cancel()

            nursery.start_soon(main)
            async for signum in signals:
                outcome = signum
                nursery.cancel_scope.cancel()
                break
    return outcome


def run_scaletest_command(args: argparse.Namespace) -> int:
    """`chatd-trio scaletest ...`."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.worker:
        trio.run(worker_main)
        return 0
    refused = False
    try:
        plan = plan_from_args(args)
        plan.validate()
        summary = trio.run(_run_until_terminated, plan, not args.json)
    except* ScaleTestError as group:
        # Bare (a bad flag) or in the groups of the nurseries it left: every one is
        # printed. Any other failure beside them propagates with its traceback.
        for error in leaves(group):
            print(f"chatd-trio scaletest: error: {error}", file=sys.stderr)
        refused = True
    if refused:
        return 2
    if isinstance(summary, int):
        print(f"chatd-trio scaletest: stopped by {signal.Signals(summary).name}", file=sys.stderr)
        return 128 + summary
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=2))
    return 0
