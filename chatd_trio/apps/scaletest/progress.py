"""The coordinator's bookkeeping: turns over and chats through, as the drivers report
them (`Progress`), and the progress bar on stderr."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from chatd_trio.apps.scaletest.plan import Plan

__all__ = [
    "Progress",
    "finish_unfinished",
    "progress_bar",
    "stderr_console",
]


class Progress:
    """Turns over and chats through, as the drivers report them (deduplicated: a
    replacement replica's drivers report again what its predecessor reported)."""

    def __init__(self, plan: Plan, tick: Callable[[], None]) -> None:
        self.plan = plan
        self._tick = tick
        self.turns: dict[tuple[str, int], str] = {}
        self.finals: dict[str, int] = {}
        # Chats whose final id came from the end of the run, not from their driver.
        self.forced: set[str] = set()
        self.changed = trio.Event()
        self.last_progress = trio.current_time()
        self.started = time.monotonic()
        # The steady phase on the wall clock: from the `go` to the last turn reported
        # over (None until then).
        self.go_at: float | None = None
        self.last_turn_at: float | None = None

    def bump(self) -> None:
        self.last_progress = trio.current_time()
        self.changed.set()
        self.changed = trio.Event()

    def turn(self, chat_id: str, turn: int, outcome: str) -> None:
        if (chat_id, turn) in self.turns:
            return
        self.turns[(chat_id, turn)] = outcome
        self.last_turn_at = time.monotonic()
        self._tick()
        self.bump()

    def final(self, chat_id: str, last_id: int) -> bool:
        """Record the chat's last message id; False when it was already known."""
        if chat_id in self.finals:
            return False
        self.finals[chat_id] = last_id
        self.bump()
        return True

    def went(self) -> None:
        """The replicas were told to go on to turn 2: the steady phase starts."""
        if self.go_at is None:
            self.go_at = time.monotonic()

    def steady(self) -> tuple[int, float]:
        """Turns 2.. reported answered and the seconds from the `go` to the last turn
        reported over."""
        turns = sum(1 for (_, t), outcome in self.turns.items() if t >= 2 and outcome == "answered")
        if self.go_at is None or self.last_turn_at is None:
            return turns, 0.0
        return turns, max(0.0, self.last_turn_at - self.go_at)

    async def wait_turns(self, count: int) -> None:
        while len(self.turns) < count:
            await self.changed.wait()

    async def watch(self, all_done: Callable[[], bool], stall_s: float, deadline: float) -> str:
        """ "done", or "stalled" (nothing for `stall_s`), or "deadline" (trio time)."""
        while not all_done():
            now = trio.current_time()
            if now >= deadline:
                return "deadline"
            if now - self.last_progress >= stall_s:
                return "stalled"
            with trio.move_on_at(min(deadline, self.last_progress + stall_s)):
                await self.changed.wait()
        return "done"


async def finish_unfinished(
    plan: Plan,
    progress: Progress,
    last_ids: Callable[[Sequence[str]], Awaitable[dict[str, int]]],
    deliver: Callable[[str, int], None],
) -> None:
    """The run ended before some drivers were through: their chats end at the last
    message stored now, and the subscribers get that far."""
    missing = [c for c in plan.chat_ids if c not in progress.finals]
    if not missing:
        return
    for chat_id, last_id in (await last_ids(missing)).items():
        progress.forced.add(chat_id)
        if progress.final(chat_id, last_id):
            deliver(chat_id, last_id)


@asynccontextmanager
async def progress_bar(total: int, enabled: bool) -> AsyncIterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True, console=stderr_console()) as progress:
        task = progress.add_task("turns", total=total)
        yield lambda: progress.advance(task)


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
