"""The public surface is explicit, importable from the package root, and documented."""

from __future__ import annotations

import re
from pathlib import Path

import chatd_trio
from chatd_trio import config, domain, errors, models

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"

# Type aliases (unions) cannot carry a docstring of their own; the API page documents them.
ALIAS_HOMES = {
    "Delta": "chatd_trio.models.base",
    "Part": "chatd_trio.domain.records",
    "StreamEvent": "chatd_trio.domain.events",
}
ALIASES = set(ALIAS_HOMES)


def test_every_exported_name_exists_and_has_a_docstring() -> None:
    assert len(set(chatd_trio.__all__)) == len(chatd_trio.__all__)
    for name in chatd_trio.__all__:
        obj = getattr(chatd_trio, name)
        assert name in ALIASES or obj.__doc__, f"{name} has no docstring"


def test_every_event_config_section_error_and_step_builder_is_at_the_root() -> None:
    exported = set(chatd_trio.__all__)
    events = {
        name
        for name in dir(domain)
        if name.endswith("Event") and isinstance(getattr(domain, name), type)
    }
    sections = {
        name
        for name, obj in vars(config).items()
        if name.endswith("Config")
        and isinstance(obj, type)
        and obj.__module__ == config.__name__
        # The commands' own settings, not the library's.
        and name not in {"DemoConfig", "ScaleTestConfig"}
    }
    failures = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, errors.ChatdError)
    }
    steps = {"ScriptStep", "text_step", "tool_step", "error_step", "model_error", "usage_of"}
    for group in (events, sections, failures, steps):
        missing = group - exported
        assert not missing, f"not exported from chatd_trio: {sorted(missing)}"
    assert len(events) == 7 and "SnapshotEndEvent" in events
    assert {"LoopConfig", "RetryConfig", "CompactionConfig", "StreamConfig"} <= sections
    assert {"Model"} <= exported and models.Model is chatd_trio.Model


def test_the_api_reference_covers_every_exported_name() -> None:
    """docs/api.md names each export (in its tables) and renders the modules holding them."""
    page = API.read_text("utf-8")
    named = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", page))
    missing = set(chatd_trio.__all__) - named
    assert not missing, f"docs/api.md does not mention: {sorted(missing)}"
    rendered = set(re.findall(r"^::: (chatd_trio[\w.]*)", page, flags=re.MULTILINE))
    for name in chatd_trio.__all__:
        home = ALIAS_HOMES.get(name) or getattr(chatd_trio, name).__module__
        assert home in rendered or f"{home}.{name}" in rendered, (
            f"docs/api.md renders neither {home} nor {home}.{name}"
        )
