"""The rooms of the code (`chatd_trio._layers`): every module sits in one, every import
points into its own room or down, and the diagram of docs/architecture.md is drawn from
the same table and the imports as they are."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatd_trio import _docgen, _layers
from chatd_trio._layers import ROOMS, Room, Violation

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "architecture.md"


def test_every_module_sits_in_one_room() -> None:
    """A new module must be placed in a room before the rule covers it."""
    unplaced = []
    for module in _layers.modules():
        try:
            _layers.room_of(module)
        except LookupError as exc:
            unplaced.append(str(exc))
    assert unplaced == []


def test_every_member_of_the_table_names_a_module() -> None:
    """No stale entry: each member matches a module that exists."""
    modules = set(_layers.modules())
    stale = [
        member
        for room in ROOMS
        for member in room.members
        if not any(_layers._specificity(member, module) is not None for module in modules)
    ]
    assert stale == []


def test_no_import_points_up_or_sideways() -> None:
    found = _layers.edges()
    assert len(found) > 100, "the walk found too few imports to be reading the code"
    assert [str(v) for v in _layers.violations(found)] == []


def test_every_allowed_exception_is_still_needed() -> None:
    """An allowance whose import is gone, or no longer against the ranks, goes too."""
    found = _layers.edges()
    for importer, imported in _layers.ALLOWED:
        assert (importer, imported) in found, f"{importer} no longer imports {imported}"
        assert _layers.violations([(importer, imported)], allowed={}), (
            f"{importer} -> {imported} points down: it needs no allowance"
        )


def test_the_walk_sees_every_spelling_of_an_import() -> None:
    """What the rule exists to catch, however it is written: relative imports, imports in
    functions and under TYPE_CHECKING, a name imported from a package, a dotted module."""
    known = {
        "chatd_trio",
        "chatd_trio.config",
        "chatd_trio.domain",
        "chatd_trio.domain.records",
        "chatd_trio.server",
        "chatd_trio.server.replica",
        "chatd_trio.server.env",
        "chatd_trio.store.memory",
    }
    source = (
        "from typing import TYPE_CHECKING\n"
        "import trio\n"
        "from chatd_trio.config import Config\n"
        "from . import replica\n"
        "from ..domain import Chat\n"
        "import chatd_trio.store.memory.helpers\n"
        "if TYPE_CHECKING:\n"
        "    from chatd_trio.domain.records import Message\n"
        "def later():\n"
        "    from chatd_trio.server import env\n"
    )
    assert _layers.imports_in(source, "chatd_trio.server.stats", known) == {
        "chatd_trio.config",
        "chatd_trio.server.replica",
        "chatd_trio.domain",
        "chatd_trio.store.memory",
        "chatd_trio.domain.records",
        "chatd_trio.server.env",
    }
    # In a package's __init__, `from . import x` is the package's own module.
    assert _layers.imports_in(
        "from . import replica\n", "chatd_trio.server", known, package=True
    ) == {"chatd_trio.server.replica"}


def test_the_rule_refuses_an_import_up_and_one_sideways() -> None:
    found = [
        ("chatd_trio.domain.records", "chatd_trio.server.replica"),  # foundation -> runtime
        ("chatd_trio.workspace", "chatd_trio.agent.client"),  # runtime -> adapters
        ("chatd_trio.store.memory", "chatd_trio.loop.turn"),  # adapters -> runtime
        ("chatd_trio.server.replica", "chatd_trio.domain.records"),  # down: allowed
        ("chatd_trio.loop.turn", "chatd_trio.loop.step"),  # its own room: allowed
    ]
    assert _layers.violations(found, allowed={}) == [
        Violation(
            "chatd_trio.domain.records", "chatd_trio.server.replica", "foundation", "runtime"
        ),
        Violation("chatd_trio.store.memory", "chatd_trio.loop.turn", "adapters", "runtime"),
        Violation("chatd_trio.workspace", "chatd_trio.agent.client", "runtime", "adapters"),
    ]
    allowed = {("chatd_trio.workspace", "chatd_trio.agent.client"): "a reason"}
    assert len(_layers.violations(found, allowed=allowed)) == 2


def test_the_closest_member_decides_a_room_and_a_tie_is_refused() -> None:
    rooms = (
        Room("a", 1, "", ("pkg.*", "pkg.port")),
        Room("b", 0, "", ("pkg.sub.*",)),
        Room("c", 0, "", ("pkg.sub.*",)),
    )
    assert _layers.room_of("pkg.port", rooms).name == "a"
    assert _layers.room_of("pkg.other", rooms).name == "a"
    with pytest.raises(LookupError, match="claimed by"):
        _layers.room_of("pkg.sub.x", rooms)
    with pytest.raises(LookupError, match="in no room"):
        _layers.room_of("elsewhere", rooms)


def test_the_diagram_in_the_architecture_page_is_current() -> None:
    page = PAGE.read_text("utf-8")
    assert _layers.replace_generated(page, _layers.render()) == page, (
        "docs/architecture.md: the layer diagram is stale: run `python -m chatd_trio._docgen`"
    )


def test_the_diagram_names_every_room_and_what_the_code_imports() -> None:
    generated = _layers.render()
    for room in ROOMS:
        assert f"| {room.name.upper()}" in generated
    # The table is the code's: an import between two rooms not linked yet shows.
    found = _layers.edges()
    extra = ("chatd_trio", "chatd_trio.lifecycle")
    assert not any(
        _layers.room_of(a).name == "public surface" and _layers.room_of(b).name == "deciding"
        for a, b in found
    ), "pick two rooms the code does not link"
    assert "| public surface |" in generated
    assert _layers.render(found | {extra}) != generated


def test_docgen_check_fails_on_a_stale_diagram_and_writing_mends_it(tmp_path: Path) -> None:
    reference = tmp_path / "configuration.md"
    reference.write_text((ROOT / "docs" / "configuration.md").read_text("utf-8"), "utf-8")
    page = tmp_path / "architecture.md"
    current = PAGE.read_text("utf-8")
    args = ["--output", str(reference), "--architecture", str(page)]

    page.write_text(current, "utf-8")
    assert _docgen.main(["--check", *args]) == 0
    # An edit inside the generated part (a room moved by hand) is stale ...
    page.write_text(current.replace("| RUNTIME", "| DRIVERS", 1), "utf-8")
    assert _docgen.main(["--check", *args]) == 1
    # ... and writing draws it again, leaving the hand-written rest as it was.
    assert _docgen.main(args) == 0
    assert page.read_text("utf-8") == current
    # A page without the markers can hold no diagram: stale, and not written.
    page.write_text("# Architecture\n", "utf-8")
    assert _docgen.main(["--check", *args]) == 1
    assert _docgen.main(args) == 2
    assert page.read_text("utf-8") == "# Architecture\n"
