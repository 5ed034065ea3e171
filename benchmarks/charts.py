"""What the statecharts cost per turn, and their share of a replica's CPU. Never run by the tests.

    python benchmarks/charts.py [--turns 300] [--repeats 15]
    python benchmarks/charts.py spy [--dsn DSN] [--chats 200] [--turns 6] [--source DIR]

The first form builds and drives each chart the way one turn does, `--turns` times per
batch, `--repeats` batches, and prints microseconds per turn (median and best batch,
CPU time of this process): `before` builds each chart with its constructor,
`after` takes it from the pool (`TracedChart.fresh`) and releases it, its events
replayed from the chart's memo of its decisions, and `pool_only` is `after` with
the memo off (python-statemachine runs every event). `build_us` /
`fresh_us` is that part alone; `options` measures other ways of getting a chart
that were considered.

`spy` runs `chatd-trio scaletest --store postgres --replicas 1` and samples its replica
process (the `python -m chatd_trio.apps.scaletest worker` child) with py-spy (`pip install
py-spy`; Linux: the child is found through /proc), then prints the share of CPU samples
spent in chart construction, reset and dispatch (`--source DIR` runs another source
tree, e.g. an older commit unpacked with `git archive`; `--raw FILE` keeps the
samples). py-spy runs `--nonblocking`: in its
default mode it stops the sampled process for every sample, and the replica under test
did not survive that.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from statecharts.base import TracedChart
from statecharts.compaction import CompactionChart
from statecharts.dial import DialChart
from statecharts.lifecycle import ChatLifecycleChart

BOUND = uuid.UUID(int=1)
OTHER = uuid.UUID(int=2)

Events = list[tuple[str, dict[str, Any]]]

# One turn per chart, as the drivers send it.
TURNS: dict[str, tuple[type[TracedChart], tuple[Any, ...], Events]] = {
    # Every tool call of a turn dials the workspace agent; almost always the bound one answers.
    "dial": (DialChart, (BOUND,), [("dial_ok", {})]),
    "dial_switch": (
        DialChart,
        (BOUND,),
        [
            ("dial_failed", {"cause": OSError("refused")}),
            ("validated", {"agent": OTHER}),
            ("dial_ok", {}),
        ],
    ),
    # The scale test's turn: the prompt loaded, one step calling tools, the final answer,
    # the post-run check.
    "compaction": (
        CompactionChart,
        (50, 3),
        [
            ("loaded", {"answered": False}),
            ("step_persisted", {"tool_calls": True, "over_threshold": False}),
            ("step_persisted", {"tool_calls": False, "over_threshold": False}),
            ("post_run_check", {"over_threshold": False}),
        ],
    ),
    "lifecycle": (
        ChatLifecycleChart,
        (),
        [("create", {}), ("acquire", {}), ("finish_done", {"queued": 0, "token_matches": True})],
    ),
}


def _per_turn_us(turn: Callable[[], object], turns: int, repeats: int) -> dict[str, float]:
    batches = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(turns):
            turn()
        batches.append((time.process_time() - started) / turns * 1e6)
    return {"median": round(statistics.median(batches), 1), "best": round(min(batches), 1)}


def _drive(chart: TracedChart, events: Events) -> None:
    for event, data in events:
        chart.send(event, **data)


def _build(cls: type[TracedChart], args: tuple[Any, ...], events: Events) -> None:
    cls(*args)


def _before(cls: type[TracedChart], args: tuple[Any, ...], events: Events) -> None:
    _drive(cls(*args), events)


def _fresh(cls: type[TracedChart], args: tuple[Any, ...], events: Events) -> None:
    cls.fresh(*args).release()


def _after(cls: type[TracedChart], args: tuple[Any, ...], events: Events) -> None:
    chart = cls.fresh(*args)
    _drive(chart, events)
    chart.release()


def _asking(cls: type[TracedChart]) -> type[TracedChart]:
    """`cls` with nothing remembered (`TracedChart.memo_size` 0)."""
    return type(f"Asking{cls.__name__}", (cls,), {"memo_size": 0})


def _per_chart_turn_us(
    cls: type[TracedChart],
    args: tuple[Any, ...],
    events: Events,
    turns: int,
    repeats: int,
    how: Callable[[type[TracedChart], tuple[Any, ...], Events], None],
) -> dict[str, float]:
    return _per_turn_us(functools.partial(how, cls, args, events), turns, repeats)


def measure(turns: int, repeats: int) -> dict[str, Any]:
    """Microseconds per turn for every chart: before (constructor), after (pool and
    memo), pool only (memo off)."""
    out: dict[str, Any] = {"turns_per_batch": turns, "repeats": repeats, "charts": {}}
    for name, (cls, args, events) in TURNS.items():
        per_turn = functools.partial(_per_chart_turn_us, cls, args, events, turns, repeats)
        _fresh(cls, args, events)  # the pool holds one released chart from here on
        asking = _asking(cls)
        _fresh(asking, args, events)
        result: dict[str, Any] = {
            "events": len(events),
            "before": {"build_us": per_turn(_build), "turn_us": per_turn(_before)},
            "after": {"fresh_us": per_turn(_fresh), "turn_us": per_turn(_after)},
            # The pool without the memo: python-statemachine runs every event.
            "pool_only": {
                "turn_us": _per_turn_us(
                    functools.partial(_after, asking, args, events), turns, repeats
                )
            },
        }
        result["speedup"] = round(
            result["before"]["turn_us"]["median"] / result["after"]["turn_us"]["median"], 2
        )
        out["charts"][name] = result
    out["options"] = options(turns, repeats)
    return out


def options(turns: int, repeats: int) -> dict[str, Any]:
    """Other ways of getting a CompactionChart in its start state, per chart (us)."""
    prototype = CompactionChart(50, 3)

    def copied() -> None:
        # A copy re-registers every callback on the new instance (__setstate__).
        copy.copy(prototype)

    def fresh_dial() -> None:
        DialChart.fresh(BOUND).release()

    return {
        "construct_compaction_us": _per_turn_us(lambda: CompactionChart(50, 3), turns, repeats),
        "copy_of_a_built_compaction_chart_us": _per_turn_us(copied, turns, repeats),
        # The library enters `stepping` and runs its entry action (a new engine first).
        "fresh_compaction_us": _per_turn_us(
            lambda: CompactionChart.fresh(50, 3).release(), turns, repeats
        ),
        # `dialing` has no callbacks: fresh() assigns it after building a new engine.
        "fresh_dial_us": _per_turn_us(fresh_dial, turns, repeats),
    }


# -- the py-spy share in the scale test -------------------------------------------------------

PARTS = {
    "construct": ("StateChart.__init__",),
    "reset": ("TracedChart._restart", "TracedChart.fresh", "TracedChart.release"),
    "dispatch": ("TracedChart.send", "StateChart.send"),
}


def classify(raw: Path) -> dict[str, Any]:
    """Samples of a `py-spy record --format raw` file, split by what the charts were doing."""
    total = 0
    parts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n  # a sample py-spy could not unwind still used the CPU
        frames = stack.split(";")
        if not any("(statemachine/" in f or "(statecharts/" in f for f in frames):
            continue
        names = [f.split(" (")[0] for f in frames]
        for part, markers in PARTS.items():
            if any(name in markers for name in names):
                parts[part] += n
                break
        else:
            parts["other chart code"] += n
    charted = sum(parts.values())
    core = charted - parts["other chart code"]
    return {
        "samples": total,
        "chart_samples": charted,
        "construct_reset_dispatch_percent": round(100 * core / total, 2) if total else None,
        "any_chart_frame_percent": round(100 * charted / total, 2) if total else None,
        "by_part_percent": {k: round(100 * v / total, 2) for k, v in sorted(parts.items())},
    }


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _replica_pid(main: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if main.poll() is not None:
            raise SystemExit(f"scaletest exited with {main.returncode} before its replica started")
        for child in _children(main.pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"chatd_trio.apps.scaletest" in cmdline and b"worker" in cmdline:
                return child
        time.sleep(0.05)
    raise SystemExit("no replica process appeared")


def spy(args: argparse.Namespace) -> dict[str, Any]:
    """Run the scale test, sample its replica with py-spy, return the chart share."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    scaletest = [sys.executable, "-m", "chatd_trio.apps.cli", "scaletest"]
    scaletest += ["--store", "postgres", "--replicas", "1"]
    scaletest += ["--chats", str(args.chats), "--turns", str(args.turns), "--json"]
    if args.dsn:
        scaletest += ["--dsn", args.dsn]
    raw = Path(args.raw) if args.raw else Path(tempfile.mkstemp(suffix=".txt")[1])
    env = dict(os.environ)
    if args.source:
        # Another tree's code (e.g. an older commit): the replica process inherits the path.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.source, env.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as out:
        main = subprocess.Popen(scaletest, stdout=out, env=env, cwd=args.source or None)
        try:
            replica = _replica_pid(main, timeout=60)
            sampler = [py_spy, "record", "--nonblocking", "--format", "raw"]
            sampler += ["--rate", str(args.rate), "--pid", str(replica), "-o", str(raw)]
            subprocess.run(sampler, check=True, capture_output=True)
        finally:
            main.wait()
        out.seek(0)
        summary = json.loads(out.read())
    if main.returncode != 0:
        raise SystemExit(f"scaletest failed ({main.returncode})")
    return {
        "command": shlex.join(["python", "benchmarks/charts.py", *sys.argv[1:]]),
        "recorded_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
            "cpus": os.cpu_count(),
        },
        "output": {
            "scaletest": "chatd-trio " + shlex.join(scaletest[3:]),
            "source": args.source or "this checkout",
            "sampler": f"py-spy record --nonblocking --format raw --rate {args.rate}"
            " --pid <replica>",
            "turns_completed": summary.get("turns_completed"),
            "turns_per_s": summary.get("turns_per_s"),
            **classify(raw),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=300, help="turns per batch (default 300)")
    parser.add_argument("--repeats", type=int, default=15, help="batches (default 15)")
    sub = parser.add_subparsers(dest="command")
    spying = sub.add_parser("spy", help="the chart share of a replica's CPU in the scale test")
    spying.add_argument("--dsn", default="", help="PostgreSQL DSN (default: the scaletest's)")
    spying.add_argument("--chats", type=int, default=200, help="chats (default 200)")
    spying.add_argument("--turns", type=int, default=6, help="turns per chat (default 6)")
    spying.add_argument("--rate", type=int, default=100, help="samples per second (default 100)")
    spying.add_argument("--raw", default="", help="keep py-spy's raw samples in this file")
    spying.add_argument(
        "--source", default="", help="run the scale test on the chatd_trio source tree in DIR"
    )
    share = sub.add_parser("share", help="classify an existing `py-spy --format raw` file")
    share.add_argument("raw", type=Path)
    args = parser.parse_args()
    if args.command == "spy":
        result = spy(args)
    elif args.command == "share":
        result = classify(args.raw)
    else:
        result = measure(args.turns, args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
