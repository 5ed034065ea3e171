"""The committed diagrams are what the code renders; `--check` catches drift."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from statemachine import Event, State

from chatd_trio.cli import main as cli_main
from statecharts.base import TracedChart, transitions_of
from statecharts.registry import CHARTS, ChartEntry
from statecharts.render import (
    CHARTS_DIR,
    MARKDOWN,
    dot_of,
    main,
    markdown_of,
    mermaid_of,
    stale_files,
    text_outputs,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
needs_graphviz = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` missing")


def test_committed_diagrams_match_the_code() -> None:
    # Exact comparison of every Mermaid, DOT and Markdown file; SVGs must exist.
    assert stale_files(REPO_ROOT) == [], "run `chatd-trio diagrams` and commit the result"


def test_mermaid_lists_every_transition_of_every_chart() -> None:
    edge = re.compile(r"^    (\w+) --> (\w+) : (.+)$")
    for entry in CHARTS:
        drawn = set()
        for line in mermaid_of(entry.chart).splitlines():
            match = edge.match(line)
            if match:
                source, target, events = match.groups()
                drawn |= {(source, event, target) for event in events.split(", ")}
        assert drawn == {tuple(step) for step in transitions_of(entry.chart)}, entry.name


def test_dot_source_is_stable_across_renders() -> None:
    for entry in CHARTS:
        first = dot_of(entry.chart)
        assert first == dot_of(entry.chart)
        assert not re.search(r"_\d{6,}", first), "an object id leaked into the DOT source"


def test_markdown_embeds_each_chart() -> None:
    text = markdown_of(CHARTS)
    for entry in CHARTS:
        assert f"](statecharts/{entry.name}.svg)" in text
        assert mermaid_of(entry.chart).rstrip("\n") in text
        assert entry.description.strip() in text


@needs_graphviz
def test_check_names_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path)]) == 0
    assert main(["--root", str(tmp_path), "--check"]) == 0
    for entry in CHARTS:
        assert (tmp_path / CHARTS_DIR / f"{entry.name}.svg").read_bytes().startswith(b"<?xml")
    capsys.readouterr()

    mermaid = tmp_path / CHARTS_DIR / "dial.mmd"
    mermaid.write_text(mermaid.read_text() + "    %% hand edit\n")
    (tmp_path / CHARTS_DIR / "lifecycle.svg").unlink()
    assert main(["--root", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"stale: {CHARTS_DIR / 'dial.mmd'}" in out
    assert f"stale: {CHARTS_DIR / 'lifecycle.svg'}" in out
    assert "lifecycle.mmd" not in out


def test_check_on_an_empty_tree_names_every_output(tmp_path: Path) -> None:
    stale = stale_files(tmp_path)
    assert set(text_outputs()) <= set(stale)
    assert MARKDOWN in stale


@needs_graphviz
def test_cli_diagrams_writes_into_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["diagrams"]) == 0
    assert stale_files(tmp_path) == []


class _Toggle(TracedChart):
    off = State("off", initial=True)
    on = State("on")
    flip = Event(off.to(on) | on.to(off), name="flip")


def test_adding_a_chart_is_one_registry_entry() -> None:
    charts = (*CHARTS, ChartEntry("toggle", _Toggle, "Flips."))
    outputs = text_outputs(charts)
    assert outputs[CHARTS_DIR / "toggle.mmd"] == (
        "stateDiagram-v2\n"
        "    direction LR\n"
        "    [*] --> off\n"
        "    off --> on : flip\n"
        "    on --> off : flip\n"
    )
    assert "## _Toggle (`tests.test_diagrams`)" in outputs[MARKDOWN]
