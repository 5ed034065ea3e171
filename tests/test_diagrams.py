"""The committed diagrams are what the code renders; `--check` catches drift; guards show."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from statemachine import Event, State

from chatd_trio.apps.cli import main as cli_main
from statecharts.base import Step, TracedChart, transitions_of
from statecharts.registry import CHARTS, ChartEntry
from statecharts.render import (
    CHARTS_DIR,
    LABEL_SIZE,
    MARKDOWN,
    default_out,
    dot_of,
    label_lines,
    main,
    markdown_of,
    mermaid_of,
    rows_of,
    stale_files,
    text_outputs,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs"
needs_graphviz = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` missing")

# Material for MkDocs' content column at its widest (61rem grid at 20 px, minus both
# sidebars and padding): an SVG wider than this is scaled down to it.
PAGE_WIDTH_PX = 690
MIN_LABEL_PX = 10


class _Gate(TracedChart):
    closed = State("closed", initial=True)
    opened = State("opened")
    jammed = State("jammed", final=True)
    push = Event(
        closed.to(opened, cond="door_unlocked", unless="door_blocked") | closed.to(jammed),
        name="push",
    )
    shut = Event(opened.to(closed), name="shut")

    def door_unlocked(self) -> bool:
        return True

    def door_blocked(self) -> bool:
        return False


class _Toggle(TracedChart):
    off = State("off", initial=True)
    on = State("on")
    flip = Event(off.to(on) | on.to(off), name="flip")


class _Ends(TracedChart):
    """Seven working states, seven ends; three events most states take alike."""

    s1 = State("s1", initial=True)
    s2 = State("s2")
    s3 = State("s3")
    s4 = State("s4")
    s5 = State("s5")
    s6 = State("s6")
    s7 = State("s7")
    done = State("done", final=True)
    halted = State("halted", final=True)
    failed = State("failed", final=True)
    lost = State("lost", final=True)
    skipped = State("skipped", final=True)
    early = State("early", final=True)
    late = State("late", final=True)
    step = Event(s1.to(s2) | s2.to(s3) | s3.to(s4) | s4.to(s5) | s5.to(s6) | s6.to(s7), name="step")
    finish = Event(s7.to(done), name="finish")
    halt = Event(
        s1.to(halted)
        | s2.to(halted)
        | s3.to(halted)
        | s4.to(halted)
        | s5.to(halted)
        | s6.to(halted)
        | s7.to(halted),
        name="halt",
    )
    fail = Event(
        s1.to(failed)
        | s2.to(failed)
        | s3.to(failed)
        | s4.to(failed)
        | s5.to(failed)
        | s6.to(failed),
        name="fail",
    )
    lose = Event(s2.to(lost) | s3.to(lost) | s4.to(lost), name="lose")
    skip = Event(s6.to(skipped), name="skip")
    quit = Event(s1.to(early), name="quit")
    expire = Event(s7.to(late), name="expire")


def _parse_label(label: str) -> tuple[str, str]:
    """(event, guard) of a Mermaid label `event (n) [guard]`; `else` is no guard."""
    match = re.fullmatch(r"(\w+)(?: \((\d+)\))?(?: \[(.+)\])?", label)
    assert match, label
    guard = match.group(3) or ""
    return match.group(1), "" if guard == "else" else guard


def test_committed_diagrams_match_the_code() -> None:
    # Exact comparison of every Mermaid, DOT and Markdown file; SVGs carry every label.
    assert stale_files(DOCS) == [], "run `chatd-trio diagrams` and commit the result"


def test_mermaid_lists_every_transition_with_its_guard() -> None:
    edge = re.compile(r"^    (\w+) --> (\w+) : (.+)$")
    for entry in (*CHARTS, ChartEntry("gate", _Gate, ""), ChartEntry("ends", _Ends, "")):
        drawn = []
        for line in mermaid_of(entry.chart).splitlines():
            match = edge.match(line)
            if match:
                source, target, label = match.groups()
                event, guard = _parse_label(label)
                drawn.append(Step(source, event, target, guard))
        assert len(drawn) == len(set(drawn)), entry.name
        assert set(drawn) == transitions_of(entry.chart), entry.name


def test_guards_and_their_order_appear_in_every_output() -> None:
    rows = rows_of(_Gate)
    assert [(r.label, r.order, r.alternatives) for r in rows] == [
        ("push (1) [door_unlocked and not door_blocked]", 1, 2),
        ("push (2) [else]", 2, 2),
        ("shut", 1, 1),
    ]
    assert transitions_of(_Gate) == {
        Step("closed", "push", "opened", "door_unlocked and not door_blocked"),
        Step("closed", "push", "jammed", ""),
        Step("opened", "shut", "closed", ""),
    }
    mermaid = mermaid_of(_Gate)
    assert "    closed --> opened : push (1) [door_unlocked and not door_blocked]" in mermaid
    dot = dot_of(_Gate)
    assert 'label="push (1)\\l[door_unlocked and\\lnot door_blocked]\\l"' in dot
    assert 'label="push (2)\\l[else]\\l"' in dot
    table = markdown_of((ChartEntry("gate", _Gate, "A gate."),))
    guarded = "| `closed` | `push` | 1 of 2 | `door_unlocked and not door_blocked` | `opened` |"
    assert guarded in table
    assert "| `closed` | `push` | 2 of 2 | else | `jammed` |" in table


def test_every_guarded_branch_of_the_registry_is_labelled() -> None:
    for entry in CHARTS:
        dot = dot_of(entry.chart)
        table = markdown_of((entry,))
        for row in rows_of(entry.chart):
            assert all(line in dot for line in label_lines(row)), (entry.name, row)
            if row.guard:
                assert f"| `{row.guard}` |" in table, (entry.name, row)


def test_long_guards_wrap_at_and() -> None:
    (row,) = [r for r in rows_of(_Gate) if r.guard]
    assert label_lines(row) == ["push (1)", "[door_unlocked and", "not door_blocked]"]


def test_dot_source_is_stable_across_renders() -> None:
    for entry in CHARTS:
        first = dot_of(entry.chart)
        assert first == dot_of(entry.chart)
        assert not re.search(r"_\d{6,}", first), "an object id leaked into the DOT source"


def test_an_event_every_waiting_state_takes_is_drawn_once() -> None:
    dot = dot_of(next(e.chart for e in CHARTS if e.name == "dial"))
    assert dot.count("cancel\\l") == 1
    assert 'ltail="cluster_cancel"' in dot
    # ... while the table and the Mermaid source still list each transition.
    assert mermaid_of(next(e.chart for e in CHARTS if e.name == "dial")).count(": cancel") == 6


def test_common_ends_are_drawn_once_each_saying_which_states_take_them() -> None:
    dot = dot_of(_Ends)
    cluster = re.search(r'subgraph "cluster_halt" \{[^}]*\}', dot)
    assert cluster, dot
    assert re.findall(r'"(s\d)";', cluster.group(0)) == [f"s{i}" for i in range(1, 8)]
    assert "every non-final state" in cluster.group(0)
    for label in ["halt\\l", "fail\\l(not in s7)\\l", "lose\\l(only in s2, s3, s4)\\l"]:
        assert dot.count(f'label="{label}", ltail="cluster_halt"') == 1, label
    # Drawn once: no per-state edge of a folded event is left.
    assert dot.count("halt\\l") == dot.count("fail\\l") == dot.count("lose\\l") == 1
    assert 'label="skip\\l"' in dot  # taken from one state only: an ordinary edge
    # The folded labels reach the SVG's check as their first line (the event).
    assert ["halt"] in [label_lines(row) for row in rows_of(_Ends) if row.event == "halt"]


def test_many_ends_are_drawn_as_one_column_nearest_first() -> None:
    dot = dot_of(_Ends)
    chain = re.findall(r'    "(\w+)" -> "(\w+)" \[style=invis\];', dot)
    column = [chain[0][0], *(b for _, b in chain)]
    # By distance from the start over ordinary transitions (ties in declaration order),
    # then the ends reached only by folded events.
    assert column == ["early", "skipped", "done", "late", "halted", "failed", "lost"]
    assert 'subgraph "cluster_ends" { style=invis;' in dot
    # Fewer ends: side by side, as Graphviz places them.
    for chart in (_Gate, *(entry.chart for entry in CHARTS if entry.name == "dial")):
        assert "style=invis" not in dot_of(chart)


def test_markdown_embeds_each_chart_without_mermaid() -> None:
    text = markdown_of(CHARTS)
    assert "```mermaid" not in text  # the page must not need a script from a CDN
    for entry in CHARTS:
        assert f"](statecharts/{entry.name}.svg)" in text
        assert f"](statecharts/{entry.name}.mmd)" in text
        assert entry.description.strip() in text
    assert "`validated(agent)`" in text


def test_committed_svgs_are_readable_at_page_width() -> None:
    for entry in CHARTS:
        svg = (DOCS / CHARTS_DIR / f"{entry.name}.svg").read_text()
        match = re.search(r'<svg width="(\d+)pt"', svg)
        assert match, entry.name
        # Graphviz scales the drawing itself when asked to fit a size: count that too.
        drawn = re.search(r'transform="scale\(([\d.]+) ([\d.]+)\)', svg)
        assert drawn, entry.name
        width_px = int(match.group(1)) * 96 / 72
        scale = min(1.0, PAGE_WIDTH_PX / width_px) * float(drawn.group(1))
        label_px = LABEL_SIZE * 96 / 72 * scale
        assert label_px >= MIN_LABEL_PX, (entry.name, round(label_px, 1))
        assert f'font-size="{LABEL_SIZE:.2f}"' in svg, entry.name


@needs_graphviz
def test_check_names_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "docs"
    assert main(["--out", str(out)]) == 0
    assert main(["--out", str(out), "--check"]) == 0
    for entry in CHARTS:
        assert (out / CHARTS_DIR / f"{entry.name}.svg").read_bytes().startswith(b"<?xml")
    assert sorted(p.name for p in out.iterdir()) == ["statecharts", "statecharts.md"]
    capsys.readouterr()

    mermaid = out / CHARTS_DIR / "dial.mmd"
    mermaid.write_text(mermaid.read_text() + "    %% hand edit\n")
    (out / CHARTS_DIR / "lifecycle.svg").unlink()
    svg = out / CHARTS_DIR / "compaction.svg"
    svg.write_text(svg.read_text().replace("[crossed_threshold]", "[renamed]"))
    assert main(["--out", str(out), "--check"]) == 1
    printed = capsys.readouterr().out
    assert f"stale: {out / CHARTS_DIR / 'dial.mmd'}" in printed
    assert f"stale: {out / CHARTS_DIR / 'lifecycle.svg'}" in printed
    assert f"stale: {out / CHARTS_DIR / 'compaction.svg'}" in printed
    assert "lifecycle.mmd" not in printed


def test_check_on_an_empty_tree_names_every_output(tmp_path: Path) -> None:
    stale = stale_files(tmp_path)
    assert set(text_outputs()) <= set(stale)
    assert MARKDOWN in stale


def test_without_graphviz_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "docs"
    assert main(["--out", str(out)]) == 1
    assert not out.exists()
    assert "apt-get install graphviz" in capsys.readouterr().err


@needs_graphviz
def test_a_failing_graphviz_leaves_the_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "docs"
    assert main(["--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / MARKDOWN).write_text("old")
    before[out / MARKDOWN] = b"old"
    # A `dot` that rejects its input: the real one, fed through a shell that fails.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dot").write_text("#!/bin/sh\necho 'syntax error in line 1' >&2\nexit 1\n")
    (bin_dir / "dot").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert main(["--out", str(out)]) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_out_is_required_outside_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["diagrams"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert default_out(tmp_path) is None
    assert default_out(REPO_ROOT) == DOCS
    assert default_out(REPO_ROOT / "tests") == DOCS


@needs_graphviz
def test_cli_diagrams_writes_into_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["diagrams", "--out", "site-docs"]) == 0
    assert stale_files(tmp_path / "site-docs") == []
    assert cli_main(["diagrams", "--out", "site-docs", "--check"]) == 0


def test_adding_a_chart_is_one_registry_entry() -> None:
    charts = (*CHARTS, ChartEntry("toggle", _Toggle, "Flips."))
    outputs = text_outputs(charts)
    assert outputs[CHARTS_DIR / "toggle.mmd"] == (
        "stateDiagram-v2\n"
        "    direction TB\n"
        "    [*] --> off\n"
        "    off --> on : flip\n"
        "    on --> off : flip\n"
    )
    assert "## _Toggle (`tests.test_diagrams`)" in outputs[MARKDOWN]
