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
import itertools
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


END_COLUMN = 7
"""A chart with at least this many final states draws them as one column, top to bottom."""

GUARD_WIDTH = 24
"""Characters per guard line in the SVGs: long guards wrap at `and` to keep diagrams narrow."""


def label_lines(row: Row) -> list[str]:
    """A transition's label as the SVG draws it: `event (order)`, then `[guard]` wrapped."""
    head = row.event + (f" ({row.order})" if row.alternatives > 1 else "")
    if not row.condition:
        return [head]
    return [head, *_wrapped(row.condition.split(" and "), " and ", "[", "]")]


def _wrapped(items: Sequence[str], joiner: str, opening: str, closing: str) -> list[str]:
    """`items` joined by `joiner` between `opening` and `closing`, a new line after a
    joiner once a line would pass GUARD_WIDTH."""
    lines: list[str] = []
    current = ""
    for item in items:
        joined = f"{current}{joiner}{item}" if current else item
        if current and len(joined) > GUARD_WIDTH:
            lines.append(current + joiner.rstrip())
            current = item
        else:
            current = joined
    lines.append(current)
    lines[0] = opening + lines[0]
    lines[-1] += closing
    return lines


class _Folded(NamedTuple):
    """An event several non-final states take alike: drawn once, from their dashed group."""

    event: str
    target: str
    sources: list[str]
    waiting: list[str]
    """Every non-final state."""

    def label_lines(self) -> list[str]:
        """`event`, then which states take it, wrapped like a guard, unless all do:
        `(not in a, b)` or, when fewer take it than not, `(only in c, d, e)`."""
        missing = [s for s in self.waiting if s not in self.sources]
        if not missing:
            return [self.event]
        if len(self.sources) < len(missing):
            return [self.event, *_wrapped(self.sources, ", ", "(only in ", ")")]
        return [self.event, *_wrapped(missing, ", ", "(not in ", ")")]


def _folded(chart: type[StateChart[Any]]) -> list[_Folded]:
    """Events drawn once from the group of every non-final state, in declaration order.

    An event is folded when it leaves at least three non-final states, unguarded and
    without alternatives, for one final state; its label says which states take it
    when not all do. Such events are a chart's common ends (a stop, a failure): folded,
    they do not cross the whole drawing once per state.
    """
    waiting = [state.id for state in chart.states_map.values() if not state.final]
    final = {state.id for state in chart.states_map.values() if state.final}
    by_event: dict[str, list[Row]] = {}
    for row in rows_of(chart):
        by_event.setdefault(row.event, []).append(row)
    folded: list[_Folded] = []
    for event, rows in by_event.items():
        sources = [row.source for row in rows]
        if (
            len({row.target for row in rows}) == 1
            and rows[0].target in final
            and all(row.alternatives == 1 and not row.guard for row in rows)
            and len(sources) >= 3
        ):
            folded.append(_Folded(event, rows[0].target, sources, waiting))
    return folded


def _ends_in_order(chart: type[StateChart[Any]], folded: set[str]) -> list[str]:
    """Final states, nearest to the start first (by transitions other than `folded`
    events, ties in declaration order), then those reached only by folded events."""
    distance: dict[str, int] = {s.id: 0 for s in chart.states if s.initial}
    frontier = list(distance)
    rows = [row for row in rows_of(chart) if row.event not in folded]
    while frontier:
        reached = [r.target for r in rows if r.source in frontier and r.target not in distance]
        for target in reached:
            distance[target] = distance[frontier[0]] + 1
        frontier = list(dict.fromkeys(reached))
    finals = [state.id for state in chart.states if state.final]
    return sorted(finals, key=lambda s: distance.get(s, len(distance) + 1))


def dot_of(chart: type[StateChart[Any]]) -> str:
    """Graphviz DOT source of a chart class: top to bottom, one edge per pair of states."""
    name = chart.__name__
    folded = _folded(chart)
    by_fold = {fold.event for fold in folded}
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
    waiting = [s.id for s in states if not s.final]
    cluster = f"cluster_{folded[0].event}" if folded else ""
    if folded:
        lines.append(
            f'    subgraph {_dot_string(cluster)} {{ label="every non-final state";'
            f' style="rounded,dashed"; fontname=Helvetica; fontsize={LABEL_SIZE};'
            " labeljust=l;"
        )
        lines += [f"        {_dot_string(s)};" for s in waiting]
        lines.append("    }")
    for state in states:
        extra = ", peripheries=2" if state.final else ""
        lines.append(f"    {_dot_string(state.id)} [label={_dot_string(state.id)}{extra}];")
    finals = _ends_in_order(chart, by_fold)
    if len(finals) >= END_COLUMN:
        # Many ends as one column (an invisible chain, one rank each): side by side,
        # they and their labelled edges spread the drawing far wider than the page.
        lines.append('    subgraph "cluster_ends" { style=invis;')
        lines += [f"        {_dot_string(s)};" for s in finals]
        lines.append("    }")
        lines += [
            f"    {_dot_string(a)} -> {_dot_string(b)} [style=invis];"
            for a, b in itertools.pairwise(finals)
        ]
    lines += [f'    "__start" -> {_dot_string(s.id)};' for s in chart.states if s.initial]
    for (source, target), rows in _edges(chart).items():
        rows = [row for row in rows if row.event not in by_fold]
        if not rows:
            continue
        # `\l` ends a left-aligned line of a multi-line label.
        label = "".join(_escape(line) + "\\l" for row in rows for line in label_lines(row))
        lines.append(f'    {_dot_string(source)} -> {_dot_string(target)} [label="{label}"];')
    for fold in folded:
        label = "".join(_escape(line) + "\\l" for line in fold.label_lines())
        lines.append(
            f"    {_dot_string(waiting[-1])} -> {_dot_string(fold.target)}"
            f' [label="{label}", ltail="{cluster}"];'
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
        "on its own. A chart remembers what the library decided for a configuration (state,",
        "event data, the chart's counters) and replays it when the same event meets the same",
        "configuration again; a property test holds the replay equal to the library's answer",
        '(docs/benchmarks.md, "Statechart engine cost").',
        "",
        "Reading the diagrams: a label is `event [guard]`. When one event may leave a",
        "state by several transitions, their guards are tried in the order shown,",
        "`event (1) [...]`, `event (2) [...]`, and the first that holds is taken; an",
        "unguarded last transition reads `else`. An edge leaving the dashed group of",
        "every non-final state stands for that transition from each state in it, or",
        "from those its label names (`not in ...`, `only in ...`). Each diagram has a",
        "Mermaid source next to it (`statecharts/<name>.mmd`), listing every transition.",
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
