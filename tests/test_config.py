"""Every configuration value is checked when its section is built (chatd_trio.config)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest

from chatd_trio import config
from chatd_trio.config import (
    ANY,
    NON_NEGATIVE,
    AcquireConfig,
    AgentConfig,
    Checked,
    Config,
    LimitsConfig,
    LoopConfig,
    PostgresConfig,
    StreamConfig,
    field_rule,
)
from chatd_trio.errors import ConfigError, DecodeError


def sections() -> list[type[Checked]]:
    return [
        obj
        for obj in vars(config).values()
        if isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and obj.__module__ == config.__name__
        and issubclass(obj, Checked)
    ]


def numeric_fields() -> Iterator[tuple[type[Checked], str, str]]:
    for cls in sections():
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float"):
                yield cls, f.name, f.type


NUMERIC = list(numeric_fields())


def test_every_section_of_the_module_is_checked_and_its_defaults_pass() -> None:
    checked = {cls.__name__ for cls in sections()}
    every = {
        obj.__name__
        for obj in vars(config).values()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj)
    }
    # Request options go to the provider unchanged: the provider judges them.
    assert every - checked == {"RequestOptions"}
    for cls in sections():
        cls()


def test_zero_chats_per_acquire_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        AcquireConfig(max_chats_per_acquire=0)
    assert info.value.field == "AcquireConfig.max_chats_per_acquire"
    assert str(info.value) == "invalid AcquireConfig.max_chats_per_acquire: must be > 0, got 0"
    assert isinstance(info.value, DecodeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("cls", "name", "kind"), NUMERIC, ids=[f"{c.__name__}.{n}" for c, n, _ in NUMERIC]
)
def test_every_number_is_range_checked(cls: type[Checked], name: str, kind: str) -> None:
    """Negative numbers are refused unless the field takes any value; zero is refused
    unless it takes >= 0."""
    rule = field_rule(cls, name)
    negative, zero = (-1, 0) if kind == "int" else (-0.5, 0.0)
    if rule == ANY:
        cls(**{name: negative})
        return
    with pytest.raises(ConfigError) as info:
        cls(**{name: negative})
    assert info.value.field == f"{cls.__name__}.{name}"
    if rule.startswith(NON_NEGATIVE):
        cls(**{name: zero})
    else:
        with pytest.raises(ConfigError, match=f"{name}: must be > 0"):
            cls(**{name: zero})


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: AgentConfig(auth_timeout=float("nan")), "AgentConfig.auth_timeout"),
        (lambda: LimitsConfig(max_message_bytes="1024"), "LimitsConfig.max_message_bytes"),
        (lambda: LimitsConfig(max_message_bytes=1.5), "LimitsConfig.max_message_bytes"),
        (lambda: LimitsConfig(max_title_chars=True), "LimitsConfig.max_title_chars"),
        (lambda: StreamConfig(notify_carries_messages=1), "StreamConfig.notify_carries_messages"),
        (lambda: LoopConfig(interrupted_tool_result=None), "LoopConfig.interrupted_tool_result"),
        (lambda: Config(limits=None), "Config.limits"),
        (lambda: Config(acquire=LimitsConfig()), "Config.acquire"),
        (lambda: AcquireConfig(heartbeat_interval=600.0), "AcquireConfig.heartbeat_interval"),
        (lambda: PostgresConfig(min_size=5, max_size=2), "PostgresConfig.min_size"),
        (lambda: AgentConfig(default_output_limit=10**9), "AgentConfig.default_output_limit"),
        (
            lambda: config.RetryConfig(retryable_status_codes=frozenset({"429"})),
            "RetryConfig.retryable_status_codes",
        ),
        (lambda: config.NotifyAuthConfig(keys=("k", 1)), "NotifyAuthConfig.keys"),
    ],
)
def test_wrong_types_nan_and_broken_orderings_are_refused(build: object, field: str) -> None:
    assert callable(build)
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.field == field


def test_replacing_a_value_checks_it_too() -> None:
    with pytest.raises(ConfigError, match=r"Config\.limits"):
        Config().replace(limits="small")
    with pytest.raises(ConfigError, match=r"LoopConfig\.cleanup_timeout: must be > 0"):
        dataclasses.replace(LoopConfig(), cleanup_timeout=-1.0)


def test_infinite_waits_are_allowed_where_positive() -> None:
    assert math.isinf(config.SubagentConfig(await_timeout=math.inf).await_timeout)
