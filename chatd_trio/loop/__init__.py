"""The agent loop: one turn of a chat (docs/spec.md §3 and §3.1).

Modules: `turn` (`run_turn`, the chart's driver), `control` (what the caller holds:
callbacks, `TurnControl`, `TurnResult`), `step` (a model step's parts, accumulated),
`tool_calls` (running a step's tools), `retries` (backoff and the store-retry loop)
and `history` (pure decisions about the history). Every name is importable from here.

`run_turn` is a Trio driver of `statecharts.compaction.CompactionChart`: the chart
decides what comes next (load, step, compact, reload, re-enter, finish) and how the
turn ended; this module does it: streams model steps with retries, runs each
step's tools concurrently, persists every step in one guarded store write (under
the run's `Lease`), compacts the history and publishes every delta, message,
retry and non-fatal error through the caller's callbacks. The turn's outcome is
the chart's final state (`TurnResult.final_state`), mapped to a `TurnOutcome`.

Stopping is cancellation. The caller holds a `TurnControl`: `interrupt()` ends the
turn as INTERRUPTED after a write of what the step produced so far; `shutdown()`
lets `trio.Cancelled` propagate out of `run_turn` (the server hands the chat back
as pending) after recording the outcome on the control (`TurnControl.result`).

Exactly once (docs/spec.md §1):
- A completed step is written when the chart's next move needs it written (a
  compaction, a reload, another step). A step after which the chart ends the turn
  is not written here: it is `TurnResult.final_messages`, which the caller writes
  together with the finish, in one transaction. A stored answer therefore always
  has its finish, and a recovered turn whose answer is stored ends in `answered`
  without calling the model (`already_answered`).
- Every write of a step carries an operation id; an attempt retried after an
  ambiguous failure, or the interrupted write of a step whose complete write was
  cut off, lands at most once.
- A transient store fault (`StoreUnavailable`) is retried with backoff within
  `LoopConfig.store_retry`; past that budget the turn ends `unavailable` and the
  chat is handed back as pending. A refused write (the run lost the chat, or an
  edit made it pending) ends it `fenced`: nothing more is written.
- Tools run in tasks of the caller's `tool_nursery` when given: an interrupted
  turn stops waiting for a tool that ignores cancellation, and that tool's late
  result is dropped and counted (`TurnCallbacks.on_late_tool_result`).

Decisions where the specification is silent:
- Backoff: the n-th retry (n from 0) waits `min(base * 2^n, max_delay)`; a
  provider's `retry_after` raises that when larger, whatever `max_delay` says.
  A step stops retrying after `max_attempts` attempts (the first included) or
  when the next wait would end past `max_elapsed` seconds since its first
  attempt (`unreachable_elapsed` while no attempt has reached the server): a
  Retry-After is honoured up to that budget, never beyond it.
- A failed summary call (error, timeout) is handled like an empty summary: an
  error tool result is published, `on_error` is told, the turn goes on.
- A step the model refuses as too long for its context window (kind
  `context_length`) is not retried as it stands: the chart compacts the history and
  runs the step again, at most `compaction.context_length_retries` times per step
  (a `retry` event with no delay first tells subscribers to drop the refused
  attempt's parts). A summary prompt refused as too long loses the older half of
  the history (`shortened_for_summary`) until it fits.
- `on_message` receives the user-visible persisted messages (the hidden summary
  is model-only); the caller clears its stream buffer there.
- `on_error` receives non-fatal errors only; a fatal one is in `TurnResult.error`.
"""

# Each module's `__all__` says what it exports.
from chatd_trio.loop import control, history, retries, turn
from chatd_trio.loop.control import *  # noqa: F403
from chatd_trio.loop.history import *  # noqa: F403
from chatd_trio.loop.retries import *  # noqa: F403
from chatd_trio.loop.turn import *  # noqa: F403

__all__ = []
__all__ += turn.__all__
__all__ += control.__all__
__all__ += retries.__all__
__all__ += history.__all__
