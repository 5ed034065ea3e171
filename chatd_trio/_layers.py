"""The rooms of the code and the direction of its imports, in one table.

Every module of `chatd_trio`, `statecharts` and `benchmarks` sits in one room of
`ROOMS`; rooms are ranked, and an import may only point into the importer's own
room or into a room of a lower rank (never up, never sideways into the other
room of the same rank). The few imports the architecture needs against that rule
are listed in `ALLOWED`, each with its reason.

tests/test_layers.py holds the code to the rule (`violations()`), and
``python -m chatd_trio._docgen`` draws the diagram of docs/architecture.md from
the same table and the imports as they are (`render()`), so the page cannot tell
another story than the code: a stale diagram fails ``--check``.

Imports are read from the source (``ast``), wherever they stand: in functions
and under ``TYPE_CHECKING`` too, since a type is a dependency as much as a call.
``from package import name`` counts as an import of the module ``package.name``
when there is one, else of ``package``. Running a package's ``__init__`` on the
way to one of its modules is Python's doing, not the importer's: it is not an
edge.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ALLOWED",
    "PACKAGES",
    "ROOMS",
    "Room",
    "Violation",
    "edges",
    "imports_in",
    "modules",
    "render",
    "room_of",
    "violations",
]

# The checkout this module lives in: the walked packages are its folders.
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("chatd_trio", "statecharts", "benchmarks")


@dataclass(frozen=True)
class Room:
    """One room of the code: what its modules are for and which they are.

    `members` are module names; ``name.*`` stands for every module below the
    package `name` (not the package itself). The most specific member decides a
    module's room: an exact name before a ``.*``, a longer ``.*`` before a shorter.
    """

    name: str
    rank: int
    role: str
    members: tuple[str, ...]


ROOMS: tuple[Room, ...] = (
    Room(
        "applications",
        5,
        "run the library: the command line, the demo, the scale test, the benchmarks, "
        "the generators of the docs",
        (
            "chatd_trio.apps",
            "chatd_trio.apps.*",
            "chatd_trio._docgen",
            "chatd_trio._layers",
            "statecharts.render",
            "benchmarks.*",
        ),
    ),
    Room(
        "public surface",
        4,
        "re-exports what an embedding application uses (docs/api.md)",
        ("chatd_trio",),
    ),
    Room(
        "runtime",
        3,
        "does: the Trio drivers of a replica, its turns, streams and workspaces",
        (
            "chatd_trio.server",
            "chatd_trio.server.*",
            "chatd_trio.loop",
            "chatd_trio.loop.*",
            "chatd_trio.streams",
            "chatd_trio.streams.*",
            "chatd_trio.turns",
            "chatd_trio.subagents",
            "chatd_trio.workspace",
            "chatd_trio.workspace_tools",
            "chatd_trio.dial",
        ),
    ),
    Room(
        "adapters",
        3,
        "talk to the outside: PostgreSQL, memory, model providers, workspace agents",
        (
            "chatd_trio.store.*",
            "chatd_trio.pubsub.*",
            "chatd_trio.models.*",
            "chatd_trio.agent",
            "chatd_trio.agent.*",
            "chatd_trio._pgtrio",
            "chatd_trio._pgtrace",
            "chatd_trio._pg",
        ),
    ),
    Room(
        "ports",
        2,
        "what the runtime asks of the outside: the protocols the adapters implement",
        (
            "chatd_trio.store",
            "chatd_trio.store.base",
            "chatd_trio.pubsub",
            "chatd_trio.pubsub.base",
            "chatd_trio.pubsub.auth",
            "chatd_trio.models",
            "chatd_trio.models.base",
            "chatd_trio.agent.base",
            "chatd_trio.tools",
        ),
    ),
    Room(
        "deciding",
        1,
        "decides: the statecharts, the chat lifecycle, the table of model failures; "
        "pure, no I/O, no clock",
        (
            "statecharts",
            "statecharts.*",
            "chatd_trio.lifecycle",
            "chatd_trio.models.classify",
        ),
    ),
    Room(
        "foundation",
        0,
        "records and rules every room uses: domain records and their codecs, errors, "
        "configuration, validation, the storable-value gate, strategies, cleanup",
        (
            "chatd_trio.domain",
            "chatd_trio.domain.*",
            "chatd_trio.errors",
            "chatd_trio.config",
            "chatd_trio.validation",
            "chatd_trio.storable",
            "chatd_trio.strategies",
            "chatd_trio._cleanup",
            "chatd_trio._groups",
            "chatd_trio._closing",
        ),
    ),
)

# (importer, imported) -> why the architecture needs an import the ranks forbid.
ALLOWED: Mapping[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Violation:
    """An import pointing up, or sideways into another room of the same rank."""

    importer: str
    imported: str
    importer_room: str
    imported_room: str

    def __str__(self) -> str:
        return (
            f"{self.importer} ({self.importer_room}) imports {self.imported} ({self.imported_room})"
        )


def _module_name(file: Path, root: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the walked packages under `root`, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            found[_module_name(file, root)] = file
    return found


def imports_in(
    source: str, module: str, known: Iterable[str], *, package: bool = False
) -> set[str]:
    """The modules among `known` that the source of `module` imports (see the module
    docstring); `package` when the source is a package's ``__init__``."""
    known = set(known)
    anchor = module if package else module.rpartition(".")[0]

    def resolve(name: str) -> str | None:
        # `import a.b.c` where only `a.b` is walked (c a name, or outside the walk).
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found: set[str | None] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = anchor.rsplit(".", node.level - 1)[0] if node.level > 1 else anchor
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else resolve(base))
    return {name for name in found if name is not None and name != module}


def edges(root: Path = ROOT) -> set[tuple[str, str]]:
    """(importer, imported) for every import between walked modules."""
    found = modules(root)
    out: set[tuple[str, str]] = set()
    for name, file in found.items():
        package = file.name == "__init__.py"
        for target in imports_in(file.read_text("utf-8"), name, found, package=package):
            out.add((name, target))
    return out


def _specificity(member: str, module: str) -> int | None:
    """How closely `member` names `module` (higher is closer), or None."""
    if member == module:
        return 10_000
    if member.endswith(".*") and module.startswith(member[:-1]):
        return len(member)
    return None


def room_of(module: str, rooms: Iterable[Room] = ROOMS) -> Room:
    """The room of `module`; `LookupError` when no room, or two equally close, claim it."""
    best: list[tuple[int, Room]] = []
    for room in rooms:
        for member in room.members:
            score = _specificity(member, module)
            if score is not None:
                best.append((score, room))
    if not best:
        raise LookupError(f"{module} is in no room of chatd_trio._layers.ROOMS")
    best.sort(key=lambda pair: -pair[0])
    if len(best) > 1 and best[0][0] == best[1][0] and best[0][1] != best[1][1]:
        raise LookupError(f"{module} is claimed by {best[0][1].name} and {best[1][1].name}")
    return best[0][1]


def violations(
    found: Iterable[tuple[str, str]],
    rooms: Iterable[Room] = ROOMS,
    allowed: Mapping[tuple[str, str], str] = ALLOWED,
) -> list[Violation]:
    """The imports among `found` that point up or sideways and are not `allowed`."""
    rooms = tuple(rooms)
    out: list[Violation] = []
    for importer, imported in sorted(found):
        source, target = room_of(importer, rooms), room_of(imported, rooms)
        if source == target or target.rank < source.rank:
            continue
        if (importer, imported) not in allowed:
            out.append(Violation(importer, imported, source.name, target.name))
    return out


# -- the diagram ----------------------------------------------------------------------

BEGIN = "<!-- layers: begin -->"
END = "<!-- layers: end -->"
WIDTH = 100


def _short(module: str) -> str:
    return module.removeprefix("chatd_trio.")


@dataclass
class _Node:
    """A module name's place in a room's listing: whether it is itself in the room."""

    member: bool = False
    children: dict[str, _Node] = field(default_factory=dict)


def _folded(name: str, node: _Node) -> str:
    if not node.children:
        return name
    inner = ", ".join(_folded(child, node.children[child]) for child in sorted(node.children))
    if node.member:
        return f"{name}/{{{inner}}}"
    if len(node.children) == 1:
        return f"{name}.{inner}"
    return f"{name}.{{{inner}}}"


def _listing(names: Iterable[str]) -> str:
    """Module names, folded: ``pkg/{a, b}`` is the package and its modules ``a`` and
    ``b``, ``pkg.{a, b}`` those modules alone."""
    root = _Node()
    for name in names:
        node = root
        for part in _short(name).split("."):
            node = node.children.setdefault(part, _Node())
        node.member = True
    return ", ".join(_folded(name, root.children[name]) for name in sorted(root.children))


def _boxes(rooms: list[Room], members: Mapping[str, list[str]]) -> list[str]:
    """One rank: its rooms as boxes side by side."""
    gap = 2
    inner = (WIDTH - gap * (len(rooms) - 1)) // len(rooms) - 4
    columns = [
        [
            room.name.upper(),
            *_words(room.role, inner),
            "",
            *_words(_listing(members[room.name]), inner),
        ]
        for room in rooms
    ]
    height = max(len(c) for c in columns)
    edge = (" " * gap).join("+" + "-" * (inner + 2) + "+" for _ in rooms)
    out = [edge]
    for row in range(height):
        cells = [c[row] if row < len(c) else "" for c in columns]
        out.append((" " * gap).join(f"| {cell:<{inner}} |" for cell in cells))
    out.append(edge)
    return out


def _words(text: str, width: int) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def render(found: set[tuple[str, str]] | None = None, root: Path = ROOT) -> str:
    """The generated part of docs/architecture.md: the rooms by rank, the imports
    between them as the code has them, and the allowed exceptions."""
    every = modules(root)
    found = edges(root) if found is None else found
    members: dict[str, list[str]] = {room.name: [] for room in ROOMS}
    for name in every:
        members[room_of(name).name].append(name)
    ranks = sorted({room.rank for room in ROOMS}, reverse=True)
    diagram: list[str] = []
    for rank in ranks:
        if diagram:
            arrow = " " * (WIDTH // 2)
            diagram += [f"{arrow}|", f"{arrow}v"]
        diagram += _boxes([r for r in ROOMS if r.rank == rank], members)
    # Which rooms each room imports, not how many imports: the page goes stale when the
    # architecture changes (a new room-to-room import), not with every import.
    imported = {(room_of(a).name, room_of(b).name) for a, b in found}
    order = [room.name for room in ROOMS]
    table = ["| Room | imports from |", "|---|---|"]
    for name in order:
        targets = [t for t in order if (name, t) in imported]
        table.append(f"| {name} | {', '.join(targets) or 'nothing'} |")
    exceptions = [f"- `{a}` imports `{b}`: {why}" for (a, b), why in sorted(ALLOWED.items())]
    out = [
        BEGIN,
        "<!-- Generated by `python -m chatd_trio._docgen` from `chatd_trio/_layers.py` and "
        "the imports of the code: do not edit. -->",
        "",
        "```text",
        *(line.rstrip() for line in diagram),
        "```",
        "",
        "The rooms whose modules each room's modules import, as the code has it: every "
        "import points into its own room or down.",
        "",
        *table,
        "",
        *(
            ["Imports the ranks forbid and the architecture needs:", "", *exceptions, ""]
            if exceptions
            else ["No import points up or sideways.", ""]
        ),
        END,
    ]
    return "\n".join(out) + "\n"


def replace_generated(page: str, generated: str) -> str:
    """`page` with its generated layers part (between `BEGIN` and `END`) replaced;
    `ValueError` when the markers are missing."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page has no {BEGIN} ... {END} part")
    return page[:start] + generated + page[end + len(END) :].removeprefix("\n")
