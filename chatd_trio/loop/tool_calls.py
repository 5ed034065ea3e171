"""Running a step's tool calls: concurrently (in the turn's own nursery, or in the
caller's so that a stopped turn need not wait for a tool that ignores cancellation),
or one after the other (`chatd_trio.strategies.ToolCalls`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import trio

from chatd_trio.domain import (
    ToolCallPart,
    ToolResultPart,
)
from chatd_trio.strategies import ToolCalls
from chatd_trio.tools import ToolContext, ToolRegistry

__all__ = ["run_tool_calls"]

logger = logging.getLogger(__name__)


async def run_tool_calls(
    tools: ToolRegistry,
    calls: Sequence[ToolCallPart],
    results: list[ToolResultPart | None],
    context: ToolContext,
    *,
    mode: ToolCalls,
    nursery: trio.Nursery | None = None,
    on_late: Callable[[ToolCallPart], None] | None = None,
    log_extra: Mapping[str, str] | None = None,
) -> None:
    """Run `calls`, each result into its slot of `results` as it arrives.

    With `nursery` (and concurrent calls) the tools run there and this waits for them:
    cancelled, it stops waiting at once, and a tool that ignores the cancellation (a
    blocking thread) finishes in that nursery; its late result is dropped, logged and
    told to `on_late`.
    """

    async def run_one(index: int, call: ToolCallPart) -> None:
        results[index] = await tools.invoke(call, context)

    if mode is ToolCalls.SEQUENTIAL:
        for index, call in enumerate(calls):
            await run_one(index, call)
        return
    if nursery is None:
        async with trio.open_nursery() as own:
            for index, call in enumerate(calls):
                own.start_soon(run_one, index, call)
        return
    await _run_detachable(tools, calls, results, context, nursery, on_late, log_extra or {})


async def _run_detachable(
    tools: ToolRegistry,
    calls: Sequence[ToolCallPart],
    results: list[ToolResultPart | None],
    context: ToolContext,
    nursery: trio.Nursery,
    on_late: Callable[[ToolCallPart], None] | None,
    log_extra: Mapping[str, str],
) -> None:
    remaining = len(calls)
    all_done = trio.Event()
    scopes = [trio.CancelScope() for _ in calls]
    abandoned = False

    async def run_one(index: int, call: ToolCallPart, scope: trio.CancelScope) -> None:
        nonlocal remaining
        result: ToolResultPart | None = None
        with scope:
            result = await tools.invoke(call, context)
        if abandoned:
            if result is not None:
                logger.warning(
                    "late tool result dropped",
                    extra={**log_extra, "tool": call.name, "call_id": call.call_id},
                )
                if on_late is not None:
                    on_late(call)
            return
        results[index] = result
        remaining -= 1
        if remaining == 0:
            all_done.set()

    for index, call in enumerate(calls):
        nursery.start_soon(run_one, index, call, scopes[index])
    try:
        await all_done.wait()
    except BaseException:
        abandoned = True
        for scope in scopes:
            scope.cancel()
        raise
