"""Record benchmark results into docs/benchmarks/ and plot them. Never run by the tests.

    python benchmarks/plot.py record store_ops [-- --ops 500]   # run, wrap, write JSON
    python benchmarks/plot.py record streams
    python benchmarks/plot.py                                     # JSON -> PNG plots

`record NAME` runs ``benchmarks/NAME.py`` with this interpreter and writes
``docs/benchmarks/NAME.json``: the exact command, when and where it ran, and the
script's JSON output under ``"output"``. Plotting reads those files (a file
holding the bare output works too) and writes ``docs/benchmarks/NAME.png``.
Needs matplotlib (the `docs` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks"
BENCHMARKS = ROOT / "benchmarks"
STORES = ("memory", "postgres")
STORE_OPS = ("acquire", "persist_step", "messages_after")
STREAM_CONFIGS = ("optimised", "baseline")
# Two panels side by side at 10 x 4.8 inches and 100 dpi (1000 px): the documentation
# shows them about 0.7x as large, so the type is set large enough to read there.
FIGSIZE = (10.0, 4.8)
FONT = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 11,
}


def record(name: str, extra_args: list[str]) -> Path:
    """Run one benchmark script and write its wrapped JSON result; return the file."""
    script = BENCHMARKS / f"{name}.py"
    if not script.is_file():
        raise SystemExit(f"no benchmark named {name!r} ({script} does not exist)")
    argv = [sys.executable, str(script), *extra_args]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
    shown = ["python", str(script.relative_to(ROOT)), *extra_args]
    wrapped = {
        "command": shlex.join(shown),
        "recorded_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
            "cpus": os.cpu_count(),
        },
        "output": json.loads(done.stdout),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(wrapped, indent=2) + "\n", "utf-8")
    return path


def load(name: str) -> tuple[dict[str, Any], str]:
    """A result's output and the command that produced it ("" when not recorded)."""
    data = json.loads((RESULTS / f"{name}.json").read_text("utf-8"))
    if "output" in data:
        return data["output"], str(data.get("command", ""))
    return data, ""


def plot_store_ops(out: Path) -> None:
    """Median latency and concurrent throughput per operation, memory vs PostgreSQL."""
    import matplotlib.pyplot as plt

    data, command = load("store_ops")
    stores = [s for s in STORES if s in data]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=FIGSIZE)
    width = 0.8 / max(1, len(stores))
    xs = range(len(STORE_OPS))
    for i, store in enumerate(stores):
        pos = [x + (i - (len(stores) - 1) / 2) * width for x in xs]
        lat.bar(pos, [data[store][op]["median_us"] for op in STORE_OPS], width, label=store)
        thr.bar(pos, [data[store][op]["ops_per_s"] for op in STORE_OPS], width, label=store)
    lat.set_title("median latency, sequential calls")
    lat.set_ylabel("µs (log)")
    thr.set_title(f"throughput, {data.get('concurrency', '?')} concurrent tasks")
    thr.set_ylabel("ops/s (log)")
    for ax in (lat, thr):
        ax.set_yscale("log")
        ax.set_xticks(list(xs), STORE_OPS)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    _finish(fig, f"Store operations ({data.get('ops', '?')} calls each)", command, out)


def plot_streams(out: Path) -> None:
    """Cross-replica delivery latency and database reads per durable message."""
    import matplotlib.pyplot as plt

    data, command = load("streams")
    backends = [b for b in STORES if isinstance(data.get(b), dict) and "optimised" in data[b]]
    subs = [str(n) for n in data.get("subscribers", (1, 10, 100))]
    counts = [int(n) for n in subs]
    fig, (lat, reads) = plt.subplots(1, 2, figsize=FIGSIZE)
    # Colour says the configuration (as in every plot here), marker and line the backend.
    colors = {"optimised": "tab:green", "baseline": "tab:red"}
    backend_looks = {"memory": {"marker": "s", "ls": ":"}, "postgres": {"marker": "o", "ls": "-"}}
    for backend in backends:
        for config in STREAM_CONFIGS:
            rows = data[backend][config]["cross"]
            lat.plot(
                counts,
                [rows[n]["p50_ms"] for n in subs],
                color=colors[config],
                label=f"{backend}, {config}",
                **backend_looks[backend],
            )
    lat.set_title("delivery to another replica (p50)")
    lat.set_ylabel("ms (log)")
    reads_backend = "postgres" if "postgres" in backends else (backends or ["memory"])[0]
    # Local and cross-replica reads are often equal, so their lines would cover each
    # other: each "where" gets its own marker, line style and a small sideways offset
    # (log x axis: a factor), the hollow local markers drawn over the filled cross ones.
    shift = {"local": 0.93, "cross": 1.07}
    looks = {
        "local": {"marker": "o", "ls": "-", "ms": 11, "mfc": "none", "mew": 2, "zorder": 3},
        "cross": {"marker": "s", "ls": ":", "ms": 6, "zorder": 2},
    }
    for config in STREAM_CONFIGS:
        if reads_backend not in data or config not in data[reads_backend]:
            continue
        for where in ("local", "cross"):
            rows = data[reads_backend][config][where]
            reads.plot(
                [c * shift[where] for c in counts],
                [rows[n]["db_reads_per_message"] for n in subs],
                color=colors[config],
                label=f"{config}, {where}",
                **looks[where],
            )
    reads.set_title(f"catch-up reads per message ({reads_backend})")
    reads.set_ylabel("database reads (symlog)")
    lat.set_yscale("log")
    # symlog: the optimised path's zero reads stay visible on a log-like axis.
    reads.set_yscale("symlog", linthresh=1)
    for ax in (lat, reads):
        ax.set_xscale("log")
        ax.set_xlabel("subscribers")
        ax.set_xticks(counts, subs)
        ax.legend()
        ax.grid(alpha=0.3)
    per = data.get("messages_per_scenario", "?")
    _finish(fig, f"Chat stream fan-out ({per} messages per scenario)", command, out)


def _finish(fig: Any, title: str, command: str, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    if command:
        fig.text(0.01, 0.01, command, fontsize="x-small", family="monospace", alpha=0.7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    # No software/date metadata: re-plotting the same JSON gives the same bytes.
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


PLOTS: dict[str, Callable[[Path], None]] = {"store_ops": plot_store_ops, "streams": plot_streams}


def plot_all() -> list[Path]:
    """Plot every recorded result that has a plot; return the PNG files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(FONT)
    written = []
    for name, fn in PLOTS.items():
        if (RESULTS / f"{name}.json").exists():
            out = RESULTS / f"{name}.png"
            fn(out)
            written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="run a benchmark and write docs/benchmarks/NAME.json")
    rec.add_argument("name", help="a script in benchmarks/, without .py")
    rec.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    args = parser.parse_args(argv)
    if args.command == "record":
        extra = [a for a in args.args if a != "--"]
        print(record(args.name, extra).relative_to(ROOT))
        return 0
    for path in plot_all():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
