"""docs/configuration.md is generated from chatd_trio/config.py and must be current."""

from __future__ import annotations

import importlib
import textwrap
import uuid
from pathlib import Path

import pytest

from chatd_trio import _docgen, config

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "configuration.md"


def test_committed_reference_is_current() -> None:
    expected = _docgen.render(config)
    current = COMMITTED.read_text("utf-8") if COMMITTED.exists() else ""
    assert current == expected, (
        f"{COMMITTED.relative_to(ROOT)} is stale: run `python -m chatd_trio._docgen` "
        "from the project root and commit the result"
    )


def test_every_config_field_is_in_the_reference() -> None:
    text = COMMITTED.read_text("utf-8")
    for section in _docgen.collect(config):
        cls = getattr(config, section.cls_name)
        for name in cls.__dataclass_fields__:
            path = f"{section.path}.{name}" if section.path else name
            assert f"| `{path}` |" in text, path
    assert "| `PostgresConfig.max_lifetime` |" in text


FAKE_CONFIG = '''
"""A fake config module."""
from __future__ import annotations
from dataclasses import dataclass, field


@dataclass(frozen=True)
class InnerConfig:
    """The inner section."""

    # Two lines of why,
    # joined into one.
    limit: int = 64 * 1024

    plain: str = "x|y"

    @property
    def half(self) -> int:
        """Half the limit."""
        return self.limit // 2


@dataclass(frozen=True)
class Config:
    """The root."""

    # Nested on purpose.
    inner: InnerConfig = field(default_factory=InnerConfig)
    codes: frozenset[int] = frozenset({503, 429})


@dataclass(frozen=True)
class SideConfig:
    """Outside the root."""

    timeout: float = 1.5
'''

FAKE_USER = """
from {pkg}.config import SideConfig

DEFAULT = SideConfig()
"""


@pytest.fixture
def fake_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    pkg = f"docgen_fake_{uuid.uuid4().hex[:8]}"
    root = tmp_path / pkg
    root.mkdir()
    (root / "__init__.py").write_text("", "utf-8")
    (root / "config.py").write_text(textwrap.dedent(FAKE_CONFIG), "utf-8")
    (root / "user.py").write_text(FAKE_USER.format(pkg=pkg), "utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(f"{pkg}.config")


def test_generator_reads_comments_defaults_nesting_and_users(fake_config: object) -> None:
    sections = _docgen.collect(fake_config)  # type: ignore[arg-type]
    assert [(s.path, s.cls_name) for s in sections] == [
        ("", "Config"),
        ("inner", "InnerConfig"),
        ("SideConfig", "SideConfig"),
    ]
    root, inner, side = sections
    fields = {f.path: f for s in sections for f in s.fields}
    assert fields["inner.limit"].comment == "Two lines of why, joined into one."
    assert fields["inner.limit"].default == "64 * 1024 = 65536"
    assert fields["inner.plain"].comment == ""  # a blank line separates it from the comment
    assert fields["inner.half"].derived and fields["inner.half"].comment == "Half the limit."
    assert fields["inner"].default == "InnerConfig()"
    assert fields["codes"].default == "frozenset({429, 503})"
    assert not root.standalone and not inner.standalone and side.standalone
    assert root.used_by == () and inner.used_by == ()
    assert fields["SideConfig.timeout"].default == "1.5"
    assert side.used_by == (f"{fake_config.__name__.rsplit('.', 1)[0]}.user",)  # type: ignore[attr-defined]

    text = _docgen.render(fake_config)  # type: ignore[arg-type]
    assert "| `inner.limit` | `int` | `64 * 1024 = 65536` | Two lines of why, joined" in text
    assert "`'x\\|y'`" in text  # a pipe cannot break the table
    assert "## `inner`: InnerConfig" in text
    assert "## SideConfig\n" in text
    assert "Not part of `Config`. Used by `" in text


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    out = tmp_path / "configuration.md"
    # The architecture page is the other file the command writes: a copy, current.
    page = tmp_path / "architecture.md"
    page.write_text((ROOT / "docs" / "architecture.md").read_text("utf-8"), "utf-8")
    args = ["--output", str(out), "--architecture", str(page)]
    assert _docgen.main(["--check", *args]) == 1
    assert not out.exists()
    assert _docgen.main(args) == 0
    assert _docgen.main(["--check", *args]) == 0
    out.write_text(out.read_text("utf-8") + "edited\n", "utf-8")
    assert _docgen.main(["--check", *args]) == 1
