"""Plot the scale benchmarks (docs/benchmarks/{scale,tools_parallel,subagent_wake,raw_floor}.json).

    python benchmarks/plot_scale.py      # writes docs/benchmarks/scale.png

Each JSON file is either the script's output or a wrapper holding it under "output".
Needs matplotlib.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def load(name: str) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    out: dict[str, Any] = raw.get("output", raw)
    return out


def main() -> None:
    scale = load("scale")
    tools = load("tools_parallel")
    wake = load("subagent_wake")
    floor = load("raw_floor")
    opt, base = scale["optimised"], scale["baseline"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    labels = ["optimised", "baseline"]
    colors = ["tab:green", "tab:red"]

    ax = axes[0]
    ax.bar(labels, [opt["turns_per_s"], base["turns_per_s"]], color=colors)
    ax.axhline(floor["floor_turns_per_s"], color="k", ls="--", label="raw SQL floor")
    ax.set_title(
        f"throughput, {opt['chats']} chats x {opt['turns']} turns, {opt['replicas']} replicas"
    )
    ax.set_ylabel("turns/s")
    ax.legend()

    ax = axes[1]
    keys = [
        "statements",
        "latest_build_agent_lookups",
        "dials",
        "stream_db_reads_same_replica",
        "stream_db_reads_cross_replica",
    ]
    xs = range(len(keys))
    ax.bar(
        [x - 0.2 for x in xs],
        [opt["steady_per_turn"][k] for k in keys],
        0.4,
        label="optimised",
        color=colors[0],
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [base["steady_per_turn"][k] for k in keys],
        0.4,
        label="baseline",
        color=colors[1],
    )
    ax.set_xticks(list(xs))
    ax.set_xticklabels(["stmts", "latest build", "dials", "reads same", "reads cross"], rotation=20)
    ax.set_title("steady state, per turn")
    ax.legend()

    ax = axes[2]
    ax.bar(
        ["parallel", "sequential"],
        [tools["parallel"]["turn_median_s"], tools["sequential"]["turn_median_s"]],
        color=colors,
    )
    ax.set_title(f"{tools['tools']} tools of {tools['tool_sleep_s']} s: turn time")
    ax.set_ylabel("s")

    ax = axes[3]
    ax.bar(
        ["pubsub", "polling"],
        [wake["pubsub"]["wake_p50_ms"], wake["polling"]["wake_p50_ms"]],
        color=colors,
    )
    ax.set_title("subagent wake-up p50 (PostgreSQL)")
    ax.set_ylabel("ms")

    fig.tight_layout()
    out = RESULTS / "scale.png"
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
