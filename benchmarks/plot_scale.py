"""Plot the scale benchmarks (docs/benchmarks/ scale, scale_loaded, tools_parallel, subagent_wake).

    python benchmarks/plot_scale.py      # writes docs/benchmarks/scale.png

Each JSON file is either the script's output or a wrapper holding it under "output".
The figure is drawn for the documentation's page width (about 700 px): three small
panels above one wide panel, large type, one short title per panel, horizontal bars
where the labels are long, and every bar labelled with its value. Needs matplotlib.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
COLORS = {"optimised": "tab:green", "baseline": "tab:red"}
# Steady-state counters per turn, with the label shown for each.
STEADY = (
    ("round_trips", "database round trips"),
    ("statements", "statements"),
    ("latest_build_agent_lookups", "latest-build lookups"),
    ("dials", "agent dials"),
    ("stream_db_reads_same_replica", "stream reads, same replica"),
    ("stream_db_reads_cross_replica", "stream reads, other replica"),
)
# Drawn at 10 x 8.5 inches and 100 dpi (1000 px), then shown about 0.7x as large on the page.
FIGSIZE = (10.0, 8.5)
DPI = 100
FONT = {
    "font.size": 13,
    "axes.titlesize": 14,
    "axes.labelsize": 13,
    "xtick.labelsize": 12,
    "ytick.labelsize": 12,
    "legend.fontsize": 12,
}


def load(name: str) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    out: dict[str, Any] = raw.get("output", raw)
    return out


def _pair(ax: Any, labels: list[str], values: list[float], unit: str, fmt: str) -> None:
    """Two vertical bars (the optimised path in green, its alternative in red), labelled."""
    _bars(ax, labels, values, [COLORS["optimised"], COLORS["baseline"]], unit, fmt)


def _bars(
    ax: Any, labels: list[str], values: list[float], colors: list[str], unit: str, fmt: str
) -> None:
    bars = ax.bar(labels, values, color=colors, width=0.6)
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=3)
    ax.set_ylabel(unit)
    ax.set_ylim(0, max(values) * 1.2)
    ax.grid(axis="y", alpha=0.3)


def main() -> None:
    scale = load("scale")
    tools = load("tools_parallel")
    wake = load("subagent_wake")
    # The raw SQL floor is measured in the same run as the scale test (benchmarks/scale.py);
    # the baseline comes from the run that has one (`scale_loaded.json` when the last
    # recording skipped it).
    floor = scale["raw_floor"]
    opt = scale["optimised"]
    base = scale["baseline"] if "baseline" in scale else load("scale_loaded")["baseline"]
    plt.rcParams.update(FONT)
    # Constrained layout per subfigure: the wide panel's long labels do not shift the row above.
    fig = plt.figure(figsize=FIGSIZE, layout="constrained")
    top, bottom = fig.subfigures(2, 1, hspace=0.05)
    thr, par, sub = top.subplots(1, 3, gridspec_kw={"wspace": 0.1})
    steady = bottom.subplots()

    floor_value = floor["floor_turns_per_s"]
    # The whole run, its steady turns (what the floor replays), and the floor.
    _bars(
        thr,
        ["run", "steady", "raw SQL"],
        [opt["turns_per_s"], opt["steady_turns_per_s"], floor_value],
        ["tab:olive", COLORS["optimised"], COLORS["baseline"]],
        "turns/s",
        "{:.0f}",
    )
    thr.set_title("Throughput, one run")
    thr.set_xlabel(f"{opt['chats']} chats x {opt['turns']} turns")

    _pair(
        par,
        ["parallel", "sequential"],
        [tools["parallel"]["turn_median_s"], tools["sequential"]["turn_median_s"]],
        "seconds per turn",
        "{:.2f} s",
    )
    par.set_title("Tools in one step")
    par.set_xlabel(f"{tools['tools']} tools of {tools['tool_sleep_s']} s")

    _pair(
        sub,
        ["pubsub", "polling"],
        [wake["pubsub"]["wake_p50_ms"], wake["polling"]["wake_p50_ms"]],
        "ms (median)",
        "{:.0f} ms",
    )
    sub.set_title("Subagent wake-up")
    sub.set_xlabel("PostgreSQL")

    ys = range(len(STEADY))
    height = 0.38
    for offset, (name, row) in (
        (-height / 2, ("optimised", opt)),
        (height / 2, ("baseline", base)),
    ):
        values = [row["steady_per_turn"].get(key, 0.0) for key, _ in STEADY]
        bars = steady.barh([y + offset for y in ys], values, height, label=name, color=COLORS[name])
        steady.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=3, fontsize=11)
    steady.set_yticks(list(ys), [label for _, label in STEADY])
    steady.invert_yaxis()
    steady.set_xlim(
        0, max(row["steady_per_turn"].get(k, 0.0) for row in (opt, base) for k, _ in STEADY) * 1.15
    )
    steady.set_xlabel(f"count per steady turn (turns 2 to {opt['turns']})")
    steady.set_title("Work per steady turn")
    steady.legend(loc="lower right")
    steady.grid(axis="x", alpha=0.3)

    out = RESULTS / "scale.png"
    # No software/date metadata: re-plotting the same JSON gives the same bytes.
    fig.savefig(out, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    print(out)


if __name__ == "__main__":
    main()
