"""`bounded_cleanup`: the one shield of the package, and always with a deadline."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import trio
import trio.testing

from chatd_trio._cleanup import bounded_cleanup

PACKAGE = Path(__file__).resolve().parent.parent / "chatd_trio"


async def test_the_cleanup_outlives_the_cancellation_of_its_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelled from outside mid-cleanup: the cleanup still runs to its end."""
    done: list[float] = []
    cancelled = trio.Event()

    async def task() -> None:
        with bounded_cleanup(10.0):
            await cancelled.wait()
            await trio.sleep(3.0)
            done.append(trio.current_time())

    with trio.CancelScope() as outer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(task)
            await trio.testing.wait_all_tasks_blocked()
            outer.cancel()
            cancelled.set()
    # Cancelled before its cleanup went on, the task still slept its three seconds.
    assert done == [3.0]


async def test_a_cleanup_past_its_deadline_ends_quietly_and_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The deadline cuts the shielded block; the outer cancellation then arrives at the
    next checkpoint."""
    ended = -1.0
    with trio.CancelScope() as outer:
        outer.cancel()
        with bounded_cleanup(5.0) as scope:
            await trio.sleep_forever()
        ended = trio.current_time()
        await trio.lowlevel.checkpoint()
        pytest.fail("the outer cancellation is delivered after the block")  # pragma: no cover
    assert outer.cancelled_caught and scope.cancelled_caught
    assert ended == 5.0


async def test_the_deadline_counts_from_entering_the_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scope = bounded_cleanup(2.0)
    await trio.sleep(10.0)
    with scope:
        await trio.sleep_forever()
    assert trio.current_time() == 12.0


@pytest.mark.parametrize("seconds", [math.inf, math.nan, -1.0])
def test_an_unbounded_or_negative_deadline_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="finite deadline"):
        bounded_cleanup(seconds)


def _shields(path: Path) -> list[str]:
    """Every place in `path` that shields by hand: a `shield=` argument or an assignment
    to a `.shield` attribute."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and any(k.arg == "shield" for k in node.keywords):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and target.attr == "shield":
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_every_shield_in_the_package_is_a_bounded_cleanup() -> None:
    """A shield without a deadline could hang a shutdown: only `bounded_cleanup` shields,
    and it always takes one."""
    shields = [
        where
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "_cleanup.py"
        for where in _shields(path)
    ]
    assert shields == []


def test_the_check_sees_a_shield() -> None:
    """`bounded_cleanup` itself shields by hand: the check must find that one."""
    (where,) = _shields(PACKAGE / "_cleanup.py")
    assert where.startswith("chatd_trio/_cleanup.py:")
