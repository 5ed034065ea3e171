"""Shielded work with a deadline: the one way chatd_trio shields anything.

Some work must finish even when its task is being cancelled: a turn's final
transition, closing a pool or a response, releasing a connection, completing a frame
already half sent. Shielding it from cancellation is not enough on its own: a dead
database or a wedged socket would then hang the shutdown that cancelled it. So every
shield in the package comes from `bounded_cleanup`, and each call names its deadline
(a configuration value, or a sum of them).
"""

from __future__ import annotations

import math

import trio


def bounded_cleanup(seconds: float) -> trio.CancelScope:
    """A cancel scope shielded from outside cancellation that cancels itself after
    `seconds`: ``with bounded_cleanup(cfg.close_timeout): await conn.close()``.

    The same as ``trio.move_on_after(seconds, shield=True)``: the deadline counts from
    entering the scope, and a cleanup cut off by it ends quietly at the end of the
    block (check the scope's `cancelled_caught` to report it). A cancellation of the
    surrounding task is delivered at its next checkpoint after the block.

    `seconds` must be finite and >= 0: an unbounded shield is what this exists to
    prevent. Raises ValueError otherwise.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a shielded cleanup needs a finite deadline >= 0 s, got {seconds!r}")
    return trio.move_on_after(seconds, shield=True)
