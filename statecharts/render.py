"""Draw every chart of the registry: `python -m statecharts.render [--check] [--out DIR]`.

Writes, under the docs directory `DIR`: `statecharts/<name>.mmd` (Mermaid),
`statecharts/<name>.dot` (Graphviz), `statecharts/<name>.svg` (the DOT drawn by
Graphviz `dot`, laid out top to bottom) and `statecharts.md` (prose, the SVG and
the transition table), all generated here from the chart classes. Every
transition shows its guard and, where one event leaves a state by several
transitions, the order python-statemachine tries them in (the first whose guard
holds is taken; an unguarded last one reads `else`).

Without `--out`, `DIR` is the `docs/` directory of the source checkout this
package lives in, when the command runs inside that checkout; elsewhere `--out`
is required. Everything is rendered into a temporary directory first and moved
into place only when all of it succeeded, so a failure (Graphviz missing) writes
nothing. `--check` writes nothing either: it exits 1 and names the stale files
when the committed Mermaid, DOT or Markdown differ from what the code renders,
or an SVG is missing or lacks a transition label (SVG bytes vary with the
Graphviz version, so they are not compared whole).
"""

from __future__ import annotations

import argparse
import html
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from statemachine import StateChart

from statecharts.base import event_data_of, guard_of
from statecharts.registry import CHARTS, ChartEntry

CHARTS_DIR = Path("statecharts")
MARKDOWN = Path("statecharts.md")

# The source checkout this package lives in (an editable install), if any.
_CHECKOUT = Path(__file__).resolve().parent.parent

FONT_SIZE = 14
"""Point size of state names in the SVGs."""
LABEL_SIZE = 13
"""Point size of transition labels in the SVGs."""


class RenderError(RuntimeError):
    """A diagram could not be drawn (Graphviz `dot` missing or failing)."""


class Row(NamedTuple):
    """One transition for one of its events, as the docs show it."""

    source: str
    event: str
    target: str
    guard: str
    order: int
    """1-based position among the transitions `event` may take from `source`."""
    alternatives: int
    """How many transitions `event` may take from `source`."""

    @property
    def condition(self) -> str:
        """The guard, `else` for an unguarded fallback, "" when there is no choice."""
        if self.guard:
            return self.guard
        return "else" if self.alternatives > 1 else ""

    @property
    def label(self) -> str:
        """`event`, `event [guard]` or, with alternatives, `event (2) [guard]`."""
        text = self.event
        if self.alternatives > 1:
            text += f" ({self.order})"
        if self.condition:
            text += f" [{self.condition}]"
        return text


def rows_of(chart: type[StateChart[Any]]) -> list[Row]:
    """Every transition per event, in declaration order, with guard and evaluation order."""
    raw: list[tuple[str, str, str, str]] = []
    for state in chart.states_map.values():
        for transition in state.transitions:
            if transition.initial:
                continue
            target = transition.target.id if transition.target is not None else state.id
            for event in transition.events:
                raw.append((state.id, str(event), target, guard_of(transition)))
    counts: dict[tuple[str, str], int] = {}
    for source, event, _, _ in raw:
        counts[(source, event)] = counts.get((source, event), 0) + 1
    seen: dict[tuple[str, str], int] = {}
    rows: list[Row] = []
    for source, event, target, guard in raw:
        order = seen[(source, event)] = seen.get((source, event), 0) + 1
        rows.append(Row(source, event, target, guard, order, counts[(source, event)]))
    return rows


def _edges(chart: type[StateChart[Any]]) -> dict[tuple[str, str], list[Row]]:
    """Rows grouped by (source, target), in first-appearance order."""
    edges: dict[tuple[str, str], list[Row]] = {}
    for row in rows_of(chart):
        edges.setdefault((row.source, row.target), []).append(row)
    return edges


def mermaid_of(chart: type[StateChart[Any]]) -> str:
    """Mermaid `stateDiagram-v2` source of a chart class, one line per transition."""
    lines = ["stateDiagram-v2", "    direction TB"]
    lines += [f"    [*] --> {state.id}" for state in chart.states if state.initial]
    lines += [f"    {row.source} --> {row.target} : {row.label}" for row in rows_of(chart)]
    lines += [f"    {state.id} --> [*]" for state in chart.states if state.final]
    return "\n".join(lines) + "\n"


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


GUARD_WIDTH = 24
"""Characters per guard line in the SVGs: long guards wrap at `and` to keep diagrams narrow."""


def label_lines(row: Row) -> list[str]:
    """A transition's label as the SVG draws it: `event (order)`, then `[guard]` wrapped."""
    head = row.event + (f" ({row.order})" if row.alternatives > 1 else "")
    if not row.condition:
        return [head]
    lines: list[str] = []
    current = ""
    for term in row.condition.split(" and "):
        joined = f"{current} and {term}" if current else term
        if current and len(joined) > GUARD_WIDTH:
            lines.append(current + " and")
            current = term
        else:
            current = joined
    lines.append(current)
    lines[0] = "[" + lines[0]
    lines[-1] += "]"
    return [head, *lines]


def _folded_event(chart: type[StateChart[Any]]) -> tuple[str, str, list[str]] | None:
    """An event every non-final state takes, unguarded, to one target: drawn once.

    Returns (event, target, sources) for the event with the most sources, if any:
    the diagram draws its sources as one dashed group with a single edge.
    """
    waiting = [state.id for state in chart.states_map.values() if not state.final]
    by_event: dict[str, list[Row]] = {}
    for row in rows_of(chart):
        by_event.setdefault(row.event, []).append(row)
    best: tuple[str, str, list[str]] | None = None
    for event, rows in by_event.items():
        targets = {row.target for row in rows}
        sources = [row.source for row in rows]
        if (
            len(targets) == 1
            and all(row.alternatives == 1 and not row.guard for row in rows)
            and sorted(sources) == sorted(waiting)
            and len(sources) >= 3
            and rows[0].target not in sources
            and (best is None or len(sources) > len(best[2]))
        ):
            best = (event, rows[0].target, sources)
    return best


def dot_of(chart: type[StateChart[Any]]) -> str:
    """Graphviz DOT source of a chart class: top to bottom, one edge per pair of states."""
    name = chart.__name__
    folded = _folded_event(chart)
    lines = [
        f"digraph {_dot_string(name)} {{",
        f"    graph [rankdir=TB, label={_dot_string(name)}, labelloc=t, fontname=Helvetica,"
        f" fontsize={FONT_SIZE + 2}, nodesep=0.15, ranksep=0.6, compound=true];",
        f'    node [shape=box, style="rounded,filled", fillcolor=white, fontname=Helvetica,'
        f' fontsize={FONT_SIZE}, margin="0.12,0.06"];',
        f"    edge [fontname=Helvetica, fontsize={LABEL_SIZE}];",
        '    "__start" [shape=point, width=0.15, label=""];',
    ]
    states = list(chart.states_map.values())
    if folded:
        lines.append(
            f'    subgraph "cluster_{folded[0]}" {{ label="every non-final state";'
            f' style="rounded,dashed"; fontname=Helvetica; fontsize={LABEL_SIZE};'
            " labeljust=l;"
        )
        lines += [f"        {_dot_string(s.id)};" for s in states if s.id in folded[2]]
        lines.append("    }")
    for state in states:
        extra = ", peripheries=2" if state.final else ""
        lines.append(f"    {_dot_string(state.id)} [label={_dot_string(state.id)}{extra}];")
    lines += [f'    "__start" -> {_dot_string(s.id)};' for s in chart.states if s.initial]
    for (source, target), rows in _edges(chart).items():
        rows = [row for row in rows if not (folded and row.event == folded[0])]
        if not rows:
            continue
        # `\l` ends a left-aligned line of a multi-line label.
        label = "".join(_escape(line) + "\\l" for row in rows for line in label_lines(row))
        lines.append(f'    {_dot_string(source)} -> {_dot_string(target)} [label="{label}"];')
    if folded:
        event, target, sources = folded
        lines.append(
            f"    {_dot_string(sources[-1])} -> {_dot_string(target)}"
            f' [label="{_escape(event)}\\l", ltail="cluster_{event}"];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def svg_of(dot: str) -> bytes:
    """Draw DOT source as SVG with Graphviz `dot`."""
    executable = shutil.which("dot")
    if executable is None:
        raise RenderError("Graphviz `dot` not found: install graphviz (apt-get install graphviz)")
    done = subprocess.run(
        [executable, "-Tsvg"], input=dot.encode(), capture_output=True, check=False
    )
    if done.returncode != 0:
        raise RenderError(f"dot failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def transitions_table(chart: type[StateChart[Any]]) -> str:
    """A Markdown table of every transition: from, event, order, guard, to."""
    rows = ["| from | event | order | guard | to |", "|---|---|---|---|---|"]
    for row in rows_of(chart):
        order = f"{row.order} of {row.alternatives}" if row.alternatives > 1 else ""
        guard = f"`{_cell(row.guard)}`" if row.guard else row.condition
        rows.append(f"| `{row.source}` | `{row.event}` | {order} | {guard} | `{row.target}` |")
    return "\n".join(rows)


def event_data_line(chart: type[StateChart[Any]]) -> str:
    """The keyword data each event requires (`statecharts.base.event_data_of`)."""
    parts = []
    for event, data in event_data_of(chart).items():
        if data is None:
            parts.append(f"`{event}(**kwargs)`")
        elif data:
            parts.append(f"`{event}({', '.join(sorted(data))})`")
    if not parts:
        return "No event carries data."
    return "Events that carry data (keyword arguments, all required): " + ", ".join(parts) + "."


def markdown_of(charts: Sequence[ChartEntry]) -> str:
    """`statecharts.md`: each chart's prose, diagram, event data and transition table."""
    parts = [
        "# Statecharts",
        "",
        "<!-- Generated by `chatd-trio diagrams` (python -m statecharts.render): do not edit. -->",
        "",
        "The house rule: statecharts decide, Trio drivers do. Each chart below is",
        "a python-statemachine `StateChart` in `statecharts/`: pure, synchronous, traced and",
        "strict (a failing guard or action, or missing event data, raises from `send`).",
        "Tests assert that every transition drawn here is reached, each guarded branch",
        "on its own.",
        "",
        "Reading the diagrams: a label is `event [guard]`. When one event may leave a",
        "state by several transitions, their guards are tried in the order shown,",
        "`event (1) [...]`, `event (2) [...]`, and the first that holds is taken; an",
        "unguarded last transition reads `else`. Each diagram has a Mermaid source",
        "next to it (`statecharts/<name>.mmd`).",
    ]
    for entry in charts:
        name = entry.chart.__name__
        parts += [
            "",
            f"## {name} (`{entry.chart.__module__}`)",
            "",
            entry.description.strip(),
            "",
            f"![{name}](statecharts/{entry.name}.svg)",
            "",
            f"Mermaid source: [`statecharts/{entry.name}.mmd`](statecharts/{entry.name}.mmd).",
            "",
            event_data_line(entry.chart),
            "",
            transitions_table(entry.chart),
        ]
    return "\n".join(parts) + "\n"


def text_outputs(charts: Sequence[ChartEntry] = CHARTS) -> dict[Path, str]:
    """Every compared output, by path relative to the docs directory."""
    out: dict[Path, str] = {}
    for entry in charts:
        out[CHARTS_DIR / f"{entry.name}.mmd"] = mermaid_of(entry.chart)
        out[CHARTS_DIR / f"{entry.name}.dot"] = dot_of(entry.chart)
    out[MARKDOWN] = markdown_of(charts)
    return out


def _svg_is_current(svg: Path, chart: type[StateChart[Any]]) -> bool:
    if not svg.is_file():
        return False
    text = svg.read_text(encoding="utf-8", errors="replace")
    # Graphviz writes each label line as one escaped text element.
    return all(
        f">{html.escape(line, quote=False)}</text>" in text
        for row in rows_of(chart)
        for line in label_lines(row)
    )


def stale_files(out: Path, charts: Sequence[ChartEntry] = CHARTS) -> list[Path]:
    """Outputs missing under the docs directory `out` or differing from what the code renders."""
    stale = [
        path
        for path, text in text_outputs(charts).items()
        if not (out / path).is_file() or (out / path).read_text(encoding="utf-8") != text
    ]
    stale += [
        CHARTS_DIR / f"{entry.name}.svg"
        for entry in charts
        if not _svg_is_current(out / CHARTS_DIR / f"{entry.name}.svg", entry.chart)
    ]
    return stale


def render_all(out: Path, charts: Sequence[ChartEntry] = CHARTS) -> list[Path]:
    """Render every output into the docs directory `out`; returns the paths written.

    Nothing is written, not even `out` created, unless every output rendered:
    they are drawn into a temporary directory, then moved into place.
    """
    with tempfile.TemporaryDirectory(prefix="chatd-statecharts-") as tmp:
        staging = Path(tmp)
        (staging / CHARTS_DIR).mkdir()
        written: list[Path] = []
        for path, text in text_outputs(charts).items():
            (staging / path).write_text(text, encoding="utf-8")
            written.append(path)
        for entry in charts:
            svg = CHARTS_DIR / f"{entry.name}.svg"
            (staging / svg).write_bytes(svg_of(dot_of(entry.chart)))
            written.append(svg)
        (out / CHARTS_DIR).mkdir(parents=True, exist_ok=True)
        for path in written:
            shutil.move(staging / path, out / path)
    return written


def default_out(cwd: Path | None = None) -> Path | None:
    """The checkout's `docs/` when this package is a source checkout containing `cwd`."""
    cwd = (cwd or Path.cwd()).resolve()
    is_checkout = (_CHECKOUT / "mkdocs.yml").is_file() and (_CHECKOUT / "docs").is_dir()
    if is_checkout and (cwd == _CHECKOUT or _CHECKOUT in cwd.parents):
        return _CHECKOUT / "docs"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: write the diagrams, or `--check` that they are current."""
    parser = argparse.ArgumentParser(
        prog="python -m statecharts.render",
        description="Render the statechart diagrams and docs/statecharts.md.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--out` and `--check` options (shared with `chatd-trio diagrams`)."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="docs directory to write statecharts.md and statecharts/ into (default: docs/ "
        "of the source checkout, when run inside it; required elsewhere)",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 naming stale files"
    )


def run(args: argparse.Namespace) -> int:
    """Carry out parsed `add_arguments` options; returns the exit status."""
    out: Path | None = args.out if args.out is not None else default_out()
    if out is None:
        print(
            "error: --out DIR is required outside the chatd_trio source checkout",
            file=sys.stderr,
        )
        return 2
    if args.check:
        stale = stale_files(out)
        for path in stale:
            print(f"stale: {out / path}")
        if stale:
            print("run `chatd-trio diagrams` and commit the result", file=sys.stderr)
            return 1
        print(f"{len(CHARTS)} charts up to date in {out}")
        return 0
    try:
        written = render_all(out)
    except (RenderError, OSError) as exc:
        print(f"error: {exc} (nothing written)", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {out / path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
