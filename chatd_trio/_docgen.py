"""Generate the configuration reference (docs/configuration.md) from `chatd_trio.config`,
and the layer diagram of docs/architecture.md from `chatd_trio._layers`.

``python -m chatd_trio._docgen [--check] [--output PATH] [--architecture PATH]``

Walks the frozen dataclasses of `Config` (and the sections that live outside it,
such as `PostgresConfig`), in source order: every field with its dotted path,
type, default, and the ``#`` comment lines written directly above it, which is
where config.py records *why* a default has its value. Properties are listed as
derived values with their docstring. Sections outside `Config` name the package
modules that use them.

The layer diagram is the part of the architecture page between its
``<!-- layers: begin -->`` and ``<!-- layers: end -->`` markers: the rooms of the
code, ranked, and the imports between them as the code has them
(`chatd_trio._layers.render`); the rest of the page is written by hand.

``--check`` writes nothing and exits 1 when either file is stale; the test suite
runs the same comparisons.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from chatd_trio import _layers

__all__ = ["FieldDoc", "SectionDoc", "collect", "main", "render"]

OUTPUT = Path("docs") / "configuration.md"
ARCHITECTURE = Path("docs") / "architecture.md"
COMMAND = "python -m chatd_trio._docgen"


@dataclass(frozen=True)
class FieldDoc:
    """One documented field (or derived property) of a configuration section."""

    path: str
    type: str
    default: str
    comment: str
    derived: bool = False


@dataclass(frozen=True)
class SectionDoc:
    """One configuration dataclass: where it sits and what it holds."""

    path: str
    cls_name: str
    doc: str
    fields: tuple[FieldDoc, ...]
    # Outside the root: its fields are spelled `ClassName.field`; `used_by` names its users.
    standalone: bool = False
    used_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class _SourceInfo:
    comment: str
    expr: str | None


def _comment_block(lines: Sequence[str], index: int) -> str:
    """The contiguous ``#`` lines right above source line `index` (0-based), joined."""
    found: list[str] = []
    i = index - 1
    while i >= 0 and lines[i].strip().startswith("#"):
        found.append(lines[i].strip().lstrip("#:").strip())
        i -= 1
    return " ".join(reversed(found))


def _telling(value: ast.expr, source: str) -> bool:
    """Whether the source spelling says more than the value (64 * 1024, 0x...)."""
    if isinstance(value, ast.BinOp):
        return True
    if isinstance(value, ast.Constant) and isinstance(value.value, int):
        segment = ast.get_source_segment(source, value) or ""
        return segment.lower().startswith(("0x", "0o", "0b"))
    return False


def _source_info(cls: type) -> dict[str, _SourceInfo]:
    """Per annotated field of `cls`: its comment and its default's source expression."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.ClassDef)
    info: dict[str, _SourceInfo] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        comment = _comment_block(lines, stmt.lineno - 1)
        expr = None
        if stmt.value is not None and _telling(stmt.value, source):
            expr = ast.get_source_segment(source, stmt.value)
        info[stmt.target.id] = _SourceInfo(comment, expr)
    return info


def _nested_type(f: dataclasses.Field[Any]) -> type | None:
    """The dataclass a field holds through `default_factory`, if any."""
    factory = f.default_factory
    if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
        assert isinstance(factory, type)
        return factory
    return None


def _format_value(value: object) -> str:
    if isinstance(value, frozenset | set):
        inner = ", ".join(repr(v) for v in sorted(value, key=repr))
        return f"{type(value).__name__}({{{inner}}})"
    return repr(value)


def _default(f: dataclasses.Field[Any], expr: str | None) -> str:
    nested = _nested_type(f)
    if nested is not None:
        return f"{nested.__name__}()"
    if f.default is not dataclasses.MISSING:
        value = _format_value(f.default)
    elif f.default_factory is not dataclasses.MISSING:
        value = _format_value(f.default_factory())
    else:
        return "(required)"
    # Keep the author's spelling (64 * 1024, 0x...) next to the value it evaluates to.
    if expr is not None:
        return f"{expr} = {value}"
    return value


def _properties(cls: type, prefix: str) -> Iterator[FieldDoc]:
    for name, member in vars(cls).items():
        if isinstance(member, property) and not name.startswith("_"):
            doc = inspect.getdoc(member) or ""
            ret = inspect.signature(member.fget).return_annotation if member.fget else ""
            yield FieldDoc(f"{prefix}{name}", str(ret), "", doc, derived=True)


def _rule_text(cls: type, name: str) -> str:
    """What the field accepts, when its module says (a `field_rule(cls, name)` function)."""
    rule = getattr(sys.modules.get(cls.__module__), "field_rule", None)
    text = rule(cls, name) if callable(rule) else ""
    if not text:
        return ""
    return "Any value." if text == "any" else f"Must be {text}."


def _section(
    cls: type, path: str, *, standalone: bool = False, used_by: tuple[str, ...] = ()
) -> Iterator[SectionDoc]:
    info = _source_info(cls)
    prefix = f"{path}." if path else ""
    docs: list[FieldDoc] = []
    nested: list[tuple[type, str]] = []
    for f in dataclasses.fields(cls):
        sub = _nested_type(f)
        if sub is not None:
            nested.append((sub, f"{prefix}{f.name}"))
        src = info.get(f.name, _SourceInfo("", None))
        comment = " ".join(filter(None, [src.comment, _rule_text(cls, f.name)]))
        if sub is not None:
            comment = " ".join(filter(None, [comment, f"Section `{prefix}{f.name}` below."]))
        docs.append(FieldDoc(f"{prefix}{f.name}", str(f.type), _default(f, src.expr), comment))
    docs.extend(_properties(cls, prefix))
    doc = inspect.getdoc(cls) or ""
    yield SectionDoc(path, cls.__name__, doc, tuple(docs), standalone, used_by)
    for sub, sub_path in nested:
        yield from _section(sub, sub_path)


def _users(name: str, package_root: Path, module_name: str) -> tuple[str, ...]:
    """Modules of the package (other than the config module) that mention `name`."""
    found: list[str] = []
    for file in sorted(package_root.rglob("*.py")):
        dotted = ".".join(file.relative_to(package_root.parent).with_suffix("").parts)
        dotted = dotted.removesuffix(".__init__")
        if dotted == module_name or file.resolve() == Path(__file__).resolve():
            continue
        if file == package_root / "__init__.py":
            continue  # the package root re-exports every section: that is not a use
        text = file.read_text("utf-8")
        if any(tok == name for tok in _identifiers(text)):
            found.append(dotted)
    return tuple(found)


def _identifiers(text: str) -> Iterator[str]:
    word: list[str] = []
    for ch in text + " ":
        if ch.isalnum() or ch == "_":
            word.append(ch)
        elif word:
            yield "".join(word)
            word = []


def collect(module: ModuleType, root: str = "Config") -> list[SectionDoc]:
    """Every configuration section of `module`: `root` and what it nests first, then the
    dataclasses of the module that `root` does not reach, in source order."""
    root_cls = getattr(module, root)
    sections = list(_section(root_cls, ""))
    reached = {s.cls_name for s in sections}
    classes = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and obj.__module__ == module.__name__
        and obj.__name__ not in reached
    ]
    classes.sort(key=lambda c: inspect.getsourcelines(c)[1])
    module_file = inspect.getsourcefile(module)
    package_root = Path(module_file).parent if module_file else None
    for cls in classes:
        users: tuple[str, ...] = ()
        if package_root is not None and (package_root / "__init__.py").exists():
            users = _users(cls.__name__, package_root, module.__name__)
        sections.extend(_section(cls, cls.__name__, standalone=True, used_by=users))
    return sections


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def _table(section: SectionDoc) -> list[str]:
    out = ["| Setting | Type | Default | Why |", "|---|---|---|---|"]
    for f in section.fields:
        why = f.comment
        if f.derived:
            why = f"Derived (read-only). {why}".strip()
        out.append(f"| {_code(f.path)} | {_code(f.type)} | {_code(f.default)} | {_cell(why)} |")
    return out


def render(module: ModuleType, root: str = "Config") -> str:
    """The Markdown configuration reference of `module`."""
    sections = collect(module, root)
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from `{module.__name__}`: do not edit. -->",
        "",
        f"Every constant lives in a frozen dataclass of `{module.__name__}`. A replica takes "
        f"one `{root}`; its sections nest as the dotted paths below show. Change a value by "
        "replacing a section:",
        "",
        "```python",
        "import dataclasses",
        "from chatd_trio.config import AcquireConfig, Config",
        "",
        "config = Config().replace(acquire=AcquireConfig(heartbeat_interval=10.0))",
        "config = config.replace(",
        "    loop=dataclasses.replace(config.loop, max_steps=50),",
        ")",
        "```",
        "",
        "The *Why* column is the comment written above the field in the source. "
        "Sections listed after `Config`'s own are not part of it: the adapter that uses "
        "them takes them directly.",
        "",
    ]
    for section in sections:
        where = f"`{section.path}`: " if section.path and not section.standalone else ""
        out += [f"## {where}{section.cls_name}", ""]
        if section.doc:
            out += [section.doc, ""]
        if section.standalone:
            used = ", ".join(f"`{u}`" for u in section.used_by) or "nothing in the package yet"
            out += [f"Not part of `{root}`. Used by {used}.", ""]
        out += [*_table(section), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _architecture(page: Path) -> tuple[str | None, str]:
    """The architecture page as it is (None when missing) and as it should be."""
    current = page.read_text("utf-8") if page.exists() else None
    try:
        expected = _layers.replace_generated(current or "", _layers.render())
    except ValueError:
        # No markers: nothing to put the diagram in, so the page cannot be current.
        expected = f"{_layers.BEGIN} ... {_layers.END} (missing from {page})"
    return current, expected


def main(argv: Sequence[str] | None = None) -> int:
    """Write the reference and the layer diagram, or with ``--check`` report whether
    either is stale."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT}")
    parser.add_argument(
        "--architecture",
        type=Path,
        default=ARCHITECTURE,
        help=f"the page holding the layer diagram (default: {ARCHITECTURE})",
    )
    args = parser.parse_args(argv)

    from chatd_trio import config

    text = render(config)
    output: Path = args.output
    architecture: Path = args.architecture
    page, expected_page = _architecture(architecture)
    if args.check:
        stale = False
        current = output.read_text("utf-8") if output.exists() else None
        if current != text:
            sys.stderr.write(f"{output} is stale: run `{COMMAND}`\n")
            stale = True
        if page != expected_page:
            sys.stderr.write(f"{architecture}: the layer diagram is stale: run `{COMMAND}`\n")
            stale = True
        return 1 if stale else 0
    if page is None or _layers.BEGIN not in page or _layers.END not in page:
        sys.stderr.write(
            f"{architecture} has no {_layers.BEGIN} ... {_layers.END} part to write the "
            "layer diagram into\n"
        )
        return 2
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, "utf-8")
    architecture.write_text(expected_page, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
