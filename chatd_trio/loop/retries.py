"""Retries: the backoff of a model step and of a turn's store writes, and how a model
error is reported (`chatd_trio.loop`'s docstring has the rules)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from chatd_trio.config import RetryConfig, StoreRetryConfig
from chatd_trio.domain import (
    ErrorPayload,
)
from chatd_trio.errors import ModelError, StoreUnavailable

__all__ = ["backoff", "error_payload", "format_elapsed", "retry_delay", "with_store_retries"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def backoff(base_delay: float, max_delay: float, index: int) -> float:
    """`min(base * 2^index, max_delay)`: the wait before retry number `index` (from 0)."""
    # 2^62 s already exceeds any ceiling; cap the exponent so huge indices cannot overflow.
    return min(base_delay * 2.0 ** min(index, 62), max_delay)


def retry_delay(config: RetryConfig, retry_index: int, retry_after: float | None) -> float:
    """Backoff before retry number `retry_index` (from 0) of a model step; a provider's
    `retry_after` raises it when larger (`chatd_trio.loop`'s docstring)."""
    delay = backoff(config.base_delay, config.max_delay, retry_index)
    if retry_after is not None and retry_after > 0:
        # Not capped by max_delay: the step's time budget bounds it (turn.py,
        # `_Turn._stream_with_retries`).
        return max(delay, retry_after)
    return delay


def format_elapsed(seconds: float) -> str:
    """A duration for people: "45s", "5m12s", "1h02m"."""
    whole = max(round(seconds), 0)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def error_payload(exc: ModelError, provider: str) -> ErrorPayload:
    """The structured, user-facing form of a model error."""
    return ErrorPayload(
        message=exc.message,
        kind=exc.kind,
        provider=exc.provider or provider,
        retryable=exc.retryable,
        status_code=exc.status_code,
    )


async def with_store_retries(
    call: Callable[[], Awaitable[T]],
    config: StoreRetryConfig,
    *,
    what: str,
    on_retry: Callable[[str, BaseException], None] | None = None,
    log_extra: dict[str, str] | None = None,
) -> T:
    """Run `call`, retrying `StoreUnavailable` with backoff until `config.budget` runs out.

    The last `StoreUnavailable` propagates when the next attempt would start after the
    budget. `call` must be idempotent (turn writes carry an operation id).
    """
    deadline = trio.current_time() + config.budget
    attempt = 0
    while True:
        try:
            return await call()
        except StoreUnavailable as exc:
            delay = backoff(config.base_delay, config.max_delay, attempt)
            attempt += 1
            if trio.current_time() + delay > deadline:
                raise
            logger.warning(
                "store unavailable during %s, retrying in %.1f s",
                what,
                delay,
                extra={**(log_extra or {}), "attempt": attempt, "error": str(exc)},
            )
            if on_retry is not None:
                on_retry(what, exc)
            await trio.sleep(delay)
