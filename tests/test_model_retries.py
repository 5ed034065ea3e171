"""Retries users can live with (docs/providers.md "Errors and retries"): attempts and a
time budget per step, Retry-After honoured up to the budget, a short budget for a
server nobody reached, a WARNING per retry and a final error that says retries ran out.

Every wait runs on Trio's MockClock, so the elapsed times asserted are exact.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from chatd_trio.config import LoopConfig, RetryConfig
from chatd_trio.loop import format_elapsed, run_turn
from chatd_trio.models.classify import UNREACHABLE
from chatd_trio.models.openai import OpenAIChatModel
from chatd_trio.models.scripted import ScriptedModel, error_step, model_error, text_step
from chatd_trio.store.base import TurnOutcome
from chatd_trio.store.memory import MemoryStore
from tests.fake_openai import unused_port
from tests.test_loop import Recorder, start_chat


def unreachable() -> Exception:
    return model_error(0, kind=UNREACHABLE, message="unreachable: ConnectError: refused")


async def test_retry_after_beyond_max_delay_is_honoured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    lease = await start_chat(store)
    model = ScriptedModel([error_step(model_error(429, retry_after=120.0)), text_step("ok")])
    rec = Recorder()
    start = trio.current_time()

    result = await run_turn(store, lease, model, callbacks=rec.callbacks())

    assert result.outcome is TurnOutcome.DONE
    # max_delay is 60 s; the provider asked for 120 s and got them.
    assert [r.delay_s for r in rec.retries] == [120.0]
    assert trio.current_time() - start == pytest.approx(120.0)


async def test_retry_after_beyond_the_budget_gives_up_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    lease = await start_chat(store)
    model = ScriptedModel(
        [error_step(model_error(429, retry_after=3600.0, message="HTTP 429 rate limited: x"))]
    )
    config = LoopConfig(retry=RetryConfig(max_elapsed=600.0))
    start = trio.current_time()

    result = await run_turn(store, lease, model, config=config)

    assert result.outcome is TurnOutcome.ERROR
    assert model.stream_count == 1
    assert trio.current_time() == start
    assert result.error is not None
    assert result.error.message == "gave up after 1 attempt over 0s: HTTP 429 rate limited: x"


async def test_the_time_budget_ends_a_step_and_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    lease = await start_chat(store)
    busy = model_error(503, kind="server_error", message="HTTP 503 server error: busy")
    model = ScriptedModel([error_step(busy)] * 100)
    config = LoopConfig(retry=RetryConfig(max_attempts=100, max_elapsed=300.0))
    rec = Recorder()
    start = trio.current_time()

    result = await run_turn(store, lease, model, config=config, callbacks=rec.callbacks())

    # Attempts at 0, 1, 3, 7, 15, 31, 63, 123, 183, 243 s; the next would start at 303 s.
    assert result.outcome is TurnOutcome.ERROR
    assert model.stream_count == 10
    assert trio.current_time() - start == pytest.approx(243.0)
    assert result.error is not None
    assert (
        result.error.message == "gave up after 10 attempts over 4m03s: HTTP 503 server error: busy"
    )
    assert (result.error.kind, result.error.status_code) == ("server_error", 503)
    assert len(rec.retries) == 9


async def test_max_attempts_still_bounds_a_step(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    lease = await start_chat(store)
    model = ScriptedModel([error_step(model_error(429))] * 3 + [text_step("late")])
    config = LoopConfig(retry=RetryConfig(max_attempts=3))

    result = await run_turn(store, lease, model, config=config)

    assert model.stream_count == 3
    assert result.error is not None
    assert result.error.message == "gave up after 3 attempts over 3s: HTTP 429"


async def test_a_server_nobody_reached_fails_within_a_minute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    lease = await start_chat(store)
    model = ScriptedModel([error_step(unreachable())] * 30)
    start = trio.current_time()

    result = await run_turn(store, lease, model)  # the default RetryConfig

    # Attempts at 0, 1, 3, 7, 15, 31 s; the next would start at 63 s > 60 s.
    assert result.outcome is TurnOutcome.ERROR
    assert model.stream_count == 6
    assert trio.current_time() - start == pytest.approx(31.0)
    assert result.error is not None
    assert result.error.message.startswith("gave up after 6 attempts over 31s: unreachable")


async def test_once_the_server_answered_the_whole_budget_applies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    lease = await start_chat(store)
    # A 503 first (the server is there), then it drops off the network for a while.
    script = [error_step(model_error(503, kind="server_error"))]
    script += [error_step(unreachable())] * 8 + [text_step("back")]
    model = ScriptedModel(script)

    result = await run_turn(store, lease, model)

    assert result.outcome is TurnOutcome.DONE
    assert model.stream_count == 10


async def test_each_retry_is_a_warning_with_chat_attempt_and_cause(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    lease = await start_chat(store)
    busy = model_error(503, kind="server_error", message="HTTP 503 server error: busy")
    model = ScriptedModel([error_step(busy), error_step(busy), text_step("ok")])

    with caplog.at_level(logging.WARNING, logger="chatd_trio.loop"):
        result = await run_turn(store, lease, model)

    assert result.outcome is TurnOutcome.DONE
    retries = [r for r in caplog.records if r.getMessage().startswith("model call failed")]
    assert [r.levelno for r in retries] == [logging.WARNING] * 2
    assert [r.__dict__["attempt"] for r in retries] == [1, 2]
    assert {r.__dict__["chat_id"] for r in retries} == {str(lease.chat_id)}
    assert {r.__dict__["kind"] for r in retries} == {"server_error"}
    assert all("HTTP 503 server error: busy" in r.getMessage() for r in retries)


async def test_wrong_base_url_through_the_real_adapter(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens on the port: the turn ends in error within a minute of (virtual)
    retrying, with every retry logged, instead of ~20 minutes of silent "running"."""
    store = MemoryStore()
    lease = await start_chat(store)
    start = trio.current_time()
    with caplog.at_level(logging.WARNING, logger="chatd_trio.loop"):
        async with OpenAIChatModel(f"http://127.0.0.1:{unused_port()}/v1", "k", "m") as model:
            result = await run_turn(store, lease, model)

    assert result.outcome is TurnOutcome.ERROR
    assert result.error is not None
    assert result.error.message.startswith("gave up after 6 attempts over 31s: unreachable: ")
    assert trio.current_time() - start < 60
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) >= 5


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (312, "5m12s"), (3720, "1h02m")],
)
def test_format_elapsed(seconds: float, text: str) -> None:
    assert format_elapsed(seconds) == text
