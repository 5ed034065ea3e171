"""Import rules of the ports and adapters: no adapter reaches another adapter, and
importing the package does not import psycopg."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "chatd_trio"

# Every module of the two port packages is one or the other: a new module must be
# classified here before the rule covers it (checked below).
ADAPTERS = frozenset(
    {
        "chatd_trio.store.memory",
        "chatd_trio.store.postgres",
        "chatd_trio.pubsub.memory",
        "chatd_trio.pubsub.postgres",
    }
)
PORTS_AND_SHARED = frozenset(
    {
        "chatd_trio.store",
        "chatd_trio.store.base",
        "chatd_trio.store.ops",
        "chatd_trio.pubsub",
        "chatd_trio.pubsub.base",
        "chatd_trio.pubsub.auth",
        "chatd_trio.pubsub._shared",
    }
)


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_file(name: str) -> Path | None:
    """The file of package module `name`, or None (a class, a function, another package)."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports_in(source: str, module: str, *, package: bool = False) -> set[str]:
    """The package modules the source of `module` names in its imports, wherever they
    stand (functions, TYPE_CHECKING blocks included); relative imports resolved."""
    anchor = module if package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = anchor.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if _module_file(name) is not None}


def _imported_modules(file: Path) -> set[str]:
    return _imports_in(
        file.read_text("utf-8"), _module_name(file), package=file.name == "__init__.py"
    )


def _reached(start: str) -> set[str]:
    """Every package module `start` imports, directly or through the modules it imports.

    The root package is not followed: it is the façade that re-exports every adapter,
    and an adapter importing it is reported as reaching all of them.
    """
    seen: set[str] = set()
    todo = [start]
    while todo:
        file = _module_file(todo.pop())
        assert file is not None
        for name in _imported_modules(file):
            if name in seen:
                continue
            seen.add(name)
            if name == "chatd_trio":
                seen |= ADAPTERS
            else:
                todo.append(name)
    return seen - {start}


def test_every_port_package_module_is_classified() -> None:
    found = {
        _module_name(file)
        for folder in ("store", "pubsub")
        for file in (PACKAGE / folder).glob("*.py")
    }
    assert found == ADAPTERS | PORTS_AND_SHARED


def test_no_adapter_imports_another_adapter() -> None:
    """Adapters share code through ports and shared modules only: announcing goes through
    a capability of the pubsub port (`DatabaseChannels`, `InlineDelivery`)."""
    offenders = {
        adapter: sorted(reached & (ADAPTERS - {adapter}))
        for adapter in sorted(ADAPTERS)
        if (reached := _reached(adapter)) & (ADAPTERS - {adapter})
    }
    assert offenders == {}


def test_no_port_or_shared_module_imports_an_adapter() -> None:
    offenders = {
        module: sorted(reached & ADAPTERS)
        for module in sorted(PORTS_AND_SHARED)
        if (reached := _reached(module)) & ADAPTERS
    }
    assert offenders == {}


def test_the_walk_sees_deferred_and_relative_imports() -> None:
    """What the rule exists to catch, however it is spelled."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from chatd_trio.config import PubSubConfig\n"
        "from . import memory\n"
        "from ..store.postgres import PostgresStore\n"
        "if TYPE_CHECKING:\n"
        "    import chatd_trio.store.memory\n"
        "def later():\n"
        "    from chatd_trio.pubsub.memory import check_publish\n"
    )
    assert _imports_in(source, "chatd_trio.pubsub.postgres") == {
        "chatd_trio.config",
        "chatd_trio.pubsub",
        "chatd_trio.pubsub.memory",
        "chatd_trio.store.memory",
        "chatd_trio.store.postgres",
    }


def _run(code: str) -> None:
    # A fresh interpreter: this test session has imported psycopg long ago.
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_importing_the_package_does_not_import_psycopg() -> None:
    _run(
        "import sys, chatd_trio\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'psycopg', 'psycopg_pool'})\n"
        "assert not loaded, loaded\n"
    )


def test_the_postgresql_root_names_load_on_first_use() -> None:
    _run(
        "import sys, chatd_trio\n"
        "assert 'PostgresStore' in dir(chatd_trio) and 'PostgresStore' in chatd_trio.__all__\n"
        "from chatd_trio import PostgresPubSub, PostgresStore\n"
        "from chatd_trio.pubsub.postgres import PostgresPubSub as pubsub\n"
        "from chatd_trio.store.postgres import PostgresStore as store\n"
        "assert (PostgresStore, PostgresPubSub) == (store, pubsub)\n"
        "assert 'psycopg' in sys.modules\n"
        "try:\n"
        "    chatd_trio.NoSuchName\n"
        "except AttributeError as exc:\n"
        "    assert 'NoSuchName' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
