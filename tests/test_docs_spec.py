"""The behaviour contract lives in the repository: docs/spec.md.

Docstrings, comments, tests and pages cite it by section ("docs/spec.md §5.1"); every
such citation must name a section the page has, and nothing may cite notes that are
not in the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "spec.md"
SOURCES = ("chatd_trio", "statecharts", "tests", "docs", "benchmarks", "scripts")
SUFFIXES = {".py", ".md", ".sql", ".yml", ".toml"}
# "docs/spec.md §1", "docs/spec.md §1 and §2", "docs/spec.md §5, 5.1, 5.2", "§3 and §3.1".
CITATION = re.compile(r"docs/spec\.md\s+§(\d+(?:\.\d+)?)((?:(?:,|\s+and)\s+§?\d+(?:\.\d+)?)*)")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
HEADING = re.compile(r"^#{2,3} §(\d+(?:\.\d+)?) ", re.MULTILINE)
# Team notes that are not part of the repository (built from pieces so this file
# does not cite them itself).
FOREIGN = ("SPEC" + ".md", "DESIGN" + ".md", "../" + "shared")


def repository_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "mkdocs.yml", ROOT / "pyproject.toml"]
    for top in SOURCES:
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return files


def cited_sections(text: str) -> set[str]:
    """Every section number cited as docs/spec.md §N in `text`."""
    cited: set[str] = set()
    for match in CITATION.finditer(text):
        cited.add(match.group(1))
        cited.update(NUMBER.findall(match.group(2)))
    return cited


def test_citation_parser_reads_every_form() -> None:
    text = "docs/spec.md §1 and §2; docs/spec.md §5, 5.1, 5.2; (docs/spec.md §3.1)."
    assert cited_sections(text) == {"1", "2", "5", "5.1", "5.2", "3.1"}


def test_spec_has_the_numbered_sections_the_code_cites() -> None:
    sections = set(HEADING.findall(SPEC.read_text("utf-8")))
    assert {"1", "2", "3", "3.1", "4", "5", "5.1", "5.2", "6", "7"} <= sections
    missing: dict[str, set[str]] = {}
    for path in repository_files():
        unknown = cited_sections(path.read_text("utf-8")) - sections
        if unknown:
            missing[str(path.relative_to(ROOT))] = unknown
    assert missing == {}


def test_the_code_cites_the_spec() -> None:
    # The citations this test checks exist (a regex that never matches would pass).
    citing = [p for p in repository_files() if cited_sections(p.read_text("utf-8"))]
    assert len(citing) >= 20


def test_nothing_cites_notes_outside_the_repository() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in repository_files()
        if any(name in path.read_text("utf-8") for name in FOREIGN)
    ]
    assert offenders == []


def test_every_section_names_tests_that_exist() -> None:
    text = SPEC.read_text("utf-8")
    sections = re.split(r"^#{2,3} §", text, flags=re.MULTILINE)[1:]
    assert len(sections) >= 11
    for section in sections:
        held = [line for line in section.splitlines() if line.startswith("Held by ")]
        assert len(held) == 1, section.splitlines()[0]
    named = set(re.findall(r"`(tests/[\w/.]+)`", text))
    assert len(named) >= 15
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


def test_spec_is_in_the_site_and_linked_from_the_front_pages() -> None:
    assert "spec.md" in (ROOT / "mkdocs.yml").read_text("utf-8")
    assert "(spec.md)" in (ROOT / "docs" / "index.md").read_text("utf-8")
    assert "docs/spec.md" in (ROOT / "README.md").read_text("utf-8")
