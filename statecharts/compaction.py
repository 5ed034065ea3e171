"""The agent loop's step budget, compaction and re-entry (docs/spec.md §3 and §3.1) as a statechart.

Every decision of a turn's control flow lives in this file, as data. The driver
(`chatd_trio.loop`) runs the activity the current state names (`ACTIVITIES`),
reports facts as events, and reads the next state. A turn is one or more
*passes*; a pass steps until the model stops (no tool calls) or the shared
`max_steps` budget runs out, then runs the post-run check:

- loading -loaded-> stepping (or answered, see below).
- stepping -step_persisted-> stepping while the model calls tools and steps remain;
  -> compacting when the step's context crossed the threshold (inline compaction);
  -> checking when the model stopped or the budget ran out.
- compacting -summary_ok-> reloading (the model called tools: continue on the
  reloaded history) or checking (the model had stopped: "compacted on the final
  step"); -summary_failed-> as if below the threshold: the turn goes on uncompacted.
- reloading -reloaded-> stepping.
- checking -post_run_check-> safety_compacting (nothing compacted in this pass and
  the last step's usage crosses the threshold: the post-run safety net), or
  reentering (compacted on the model's final step, re-entries left), or exhausted
  (same, but `max_reentries` used up), or done.
- safety_compacting -summary_ok-> reentering / exhausted when the model had
  stopped, else done; -summary_failed-> done.
- reentering -reloaded-> stepping (a new pass) or, with no step left, checking
  (the new pass runs only its post-run check).
- stepping -context_exceeded-> overflow_compacting when the model refused the
  prompt as too long for its context window and the step has a context-length
  retry left (`max_overflow_retries`, 1 by default): the failed attempt gives its
  step back. overflow_compacting -summary_ok-> reloading, and the step runs again on
  the compacted history; -summary_failed-> failed. Without a retry left (the
  compacted history is still too long) -context_exceeded-> failed.

Pinned consequence: with `max_steps=1` and one above-threshold text step the path
is loading, stepping, compacting, checking, reentering, checking, safety_compacting,
done:
the model streams once and compaction persists twice.

Every end of a turn is a final state, so the driver reads a turn's outcome from
the chart alone: `done`, `exhausted` (re-entry limit), `step_limit` (the budget ran
out while the model still called tools), `answered` (a recovered turn whose final
answer was already stored: `loading -loaded-> answered`, the model is not called),
and the events of the working states: `model_failed` -> `failed`, `interrupt` ->
`interrupted`, `shutdown` -> `shut_down`, `write_refused` -> `fenced` (a write was
refused: the run no longer holds the chat), `fence` -> `fenced` (the caller learned
the run lost the chat: a heartbeat refused, the chat acquired again),
`store_unavailable` -> `unavailable` (the store stayed down past the write retry
budget). Each is declared only where its driver can observe it: `checking` runs no
I/O and never waits (its activity is a synchronous measurement), so it takes none of
them; only a state whose activity writes (`stepping` writes the step before,
`compacting` and `safety_compacting` the step and the compaction) can see a write
refused - the reloads read, since the step they build on was written before its
compaction; a stop from the caller (`interrupt`, `shutdown`, `fence`) lands in any
state that waits. A strict chart then refuses, loudly, an event its driver should
never send.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from statemachine import State

from statecharts.base import TracedChart


class Activity(enum.Enum):
    """What the driver does while the chart is in a state, then reports as an event."""

    LOAD = "load"
    """Load the prompt history; report `loaded(answered=...)`."""
    STEP = "step"
    """Stream one model step, run its tools, persist it; report `step_persisted`."""
    COMPACT = "compact"
    """Summarise and persist the compaction; report `summary_ok` or `summary_failed`."""
    RELOAD = "reload"
    """Reload the prompt history from the store; report `reloaded`."""
    CHECK = "check"
    """Measure the last step's usage against the threshold; report `post_run_check`."""
    COMPACT_OVERFLOW = "compact_overflow"
    """Summarise after the model refused the prompt as too long (the summary prompt may
    itself need shortening); report `summary_ok` or `summary_failed`."""


def usage_percent(context_tokens: int, context_limit: int) -> float:
    """Context usage in percent of the limit (0 when the limit is unknown)."""
    if context_limit <= 0:
        return 0.0
    return context_tokens / context_limit * 100


def over_threshold(context_tokens: int, context_limit: int, threshold_percent: int) -> bool:
    """docs/spec.md §3.1: `tokens / limit x 100 >= threshold`; 100 % (or more) disables compaction,
    and a step without usage never triggers it."""
    if threshold_percent >= 100 or context_tokens <= 0 or context_limit <= 0:
        return False
    return usage_percent(context_tokens, context_limit) >= threshold_percent


class CompactionChart(TracedChart):
    """Decides a turn's next move: step, compact, reload, re-enter or finish.

    Events carry facts as keyword arguments: `step_persisted(tool_calls=...,
    over_threshold=...)` and `post_run_check(over_threshold=...)`. Counters:
    `steps_used` (steps started, shared across passes), `reentries`, `compactions`,
    `overflow_retries` (context-length retries of the current step).
    """

    # An event the table does not allow is a driver bug: fail loudly.
    allow_event_without_transition = False
    catch_errors_as_events = False

    loading = State("loading", initial=True)
    stepping = State("stepping")
    compacting = State("compacting")
    reloading = State("reloading")
    checking = State("checking")
    safety_compacting = State("safety_compacting")
    overflow_compacting = State("overflow_compacting")
    reentering = State("reentering")
    done = State("done", final=True)
    exhausted = State("exhausted", final=True)
    step_limit = State("step_limit", final=True)
    answered = State("answered", final=True)
    failed = State("failed", final=True)
    interrupted = State("interrupted", final=True)
    shut_down = State("shut_down", final=True)
    fenced = State("fenced", final=True)
    unavailable = State("unavailable", final=True)

    # Recovery of a turn whose answer was stored but whose finish was not: the history
    # after the last user message ends in a final answer, so the model is not called.
    loaded = loading.to(answered, cond="already_answered") | loading.to(stepping)
    step_persisted = (
        stepping.to(compacting, cond="crossed_threshold")
        | stepping.to(stepping, cond=["tool_calls", "budget_left"], on="continue_with_tools")
        | stepping.to(checking, cond="tool_calls", on="stop_at_budget")
        | stepping.to(checking, on="stop_by_model")
    )
    summary_ok = (
        overflow_compacting.to(reloading)
        | compacting.to(reloading, cond=["last_had_tools", "budget_left"], on="continue_with_tools")
        | compacting.to(checking, cond="last_had_tools", on="stop_at_budget")
        | compacting.to(checking, on="compacted_final_step")
        | safety_compacting.to(reentering, cond=["stopped_by_model", "reentry_left"])
        | safety_compacting.to(exhausted, cond="stopped_by_model")
        | safety_compacting.to(step_limit, cond="out_of_steps")
        | safety_compacting.to(done)
    )
    summary_failed = (
        overflow_compacting.to(failed)
        | compacting.to(stepping, cond=["last_had_tools", "budget_left"], on="continue_with_tools")
        | compacting.to(checking, cond="last_had_tools", on="stop_at_budget")
        | compacting.to(checking, on="stop_by_model")
        | safety_compacting.to(step_limit, cond="out_of_steps")
        | safety_compacting.to(done)
    )
    reloaded = (
        reloading.to(stepping)
        | reentering.to(stepping, cond="budget_left", on="begin_pass")
        | reentering.to(checking, on="begin_pass")
    )
    post_run_check = (
        checking.to(safety_compacting, cond="safety_net_due")
        | checking.to(reentering, cond=["reentry_due", "reentry_left"])
        | checking.to(exhausted, cond="reentry_due")
        | checking.to(step_limit, cond="out_of_steps")
        | checking.to(done)
    )
    # Every other end of a turn is an event too (docs/spec.md §3): the driver reads the
    # outcome from the final state, never from an exception path the chart does not know.
    model_failed = stepping.to(failed)
    # The prompt does not fit the model's context window: compact, then run the step again,
    # once; a step still too long after that ends the turn (asking again cannot help).
    context_exceeded = stepping.to(
        overflow_compacting, cond="overflow_retry_left", on="retry_after_compaction"
    ) | stepping.to(failed)
    # Not from `checking`: its activity never waits, so no stop and no store fault lands there.
    interrupt = (
        loading.to(interrupted)
        | stepping.to(interrupted)
        | compacting.to(interrupted)
        | overflow_compacting.to(interrupted)
        | reloading.to(interrupted)
        | safety_compacting.to(interrupted)
        | reentering.to(interrupted)
    )
    shutdown = (
        loading.to(shut_down)
        | stepping.to(shut_down)
        | compacting.to(shut_down)
        | overflow_compacting.to(shut_down)
        | reloading.to(shut_down)
        | safety_compacting.to(shut_down)
        | reentering.to(shut_down)
    )
    # A write carried a token the chat no longer has (or an edit made it pending); only
    # these states' activities write.
    write_refused = (
        stepping.to(fenced)
        | compacting.to(fenced)
        | overflow_compacting.to(fenced)
        | safety_compacting.to(fenced)
    )
    # The caller stops the turn because its run lost the chat (`TurnControl.fence`): like
    # a stop, it lands wherever the turn waits; nothing more is written.
    fence = (
        loading.to(fenced)
        | stepping.to(fenced)
        | compacting.to(fenced)
        | overflow_compacting.to(fenced)
        | reloading.to(fenced)
        | safety_compacting.to(fenced)
        | reentering.to(fenced)
    )
    # The store stayed unavailable past the write retry budget: hand the chat back.
    store_unavailable = (
        loading.to(unavailable)
        | stepping.to(unavailable)
        | compacting.to(unavailable)
        | overflow_compacting.to(unavailable)
        | reloading.to(unavailable)
        | safety_compacting.to(unavailable)
        | reentering.to(unavailable)
    )

    def __init__(self, max_steps: int, max_reentries: int, max_overflow_retries: int = 1) -> None:
        self.max_steps = max(1, max_steps)
        self.max_reentries = max(0, max_reentries)
        self.max_overflow_retries = max(0, max_overflow_retries)
        self.overflow_retries = 0
        self.steps_used = 0
        self.reentries = 0
        self.compactions = 0
        self.last_had_tools = False
        # Per pass (docs/spec.md §3.1): did this pass compact, did the model stop by itself,
        # and did the compaction happen on the model's final step.
        self.compacted_this_pass = False
        self.stopped_by_model = False
        self.compacted_on_final_step = False
        self.stopped_at_budget = False
        super().__init__()

    # -- guards ---------------------------------------------------------------
    def crossed_threshold(self, over_threshold: bool = False) -> bool:
        return over_threshold

    def tool_calls(self, tool_calls: bool = False) -> bool:
        return tool_calls

    def budget_left(self) -> bool:
        return self.steps_used < self.max_steps

    def reentry_left(self) -> bool:
        return self.reentries < self.max_reentries

    def reentry_due(self) -> bool:
        return self.compacted_on_final_step and self.stopped_by_model

    def safety_net_due(self, over_threshold: bool = False) -> bool:
        return not self.compacted_this_pass and over_threshold

    def already_answered(self, answered: bool = False) -> bool:
        return answered

    def out_of_steps(self) -> bool:
        return self.stopped_at_budget

    def overflow_retry_left(self) -> bool:
        return self.overflow_retries < self.max_overflow_retries

    # -- actions (bookkeeping only) ---------------------------------------------
    def on_enter_stepping(self) -> None:
        self.steps_used += 1

    def before_step_persisted(self, tool_calls: bool = False) -> None:
        self.last_had_tools = tool_calls
        # The retry limit is per step: the next step may overflow and compact again.
        self.overflow_retries = 0

    def retry_after_compaction(self) -> None:
        self.overflow_retries += 1
        # The refused attempt produced nothing: its retry runs as the same step.
        self.steps_used -= 1

    def before_summary_ok(self) -> None:
        self.compactions += 1
        self.compacted_this_pass = True

    def continue_with_tools(self) -> None:
        # A continuing step consumes any compacted context: no re-entry needed for it.
        self.compacted_on_final_step = False

    def stop_at_budget(self) -> None:
        self.stopped_by_model = False
        self.compacted_on_final_step = False
        self.stopped_at_budget = True

    def stop_by_model(self) -> None:
        self.stopped_by_model = True

    def compacted_final_step(self) -> None:
        self.stopped_by_model = True
        self.compacted_on_final_step = True

    def begin_pass(self) -> None:
        self.reentries += 1
        self.compacted_this_pass = False
        self.stopped_by_model = False
        self.compacted_on_final_step = False
        self.stopped_at_budget = False

    # -- reading --------------------------------------------------------------
    @property
    def activity(self) -> Activity | None:
        """What the driver must do now; None in a final state."""
        return ACTIVITIES.get(self.state_id)


ACTIVITIES: Mapping[str, Activity] = {
    "loading": Activity.LOAD,
    "stepping": Activity.STEP,
    "compacting": Activity.COMPACT,
    "overflow_compacting": Activity.COMPACT_OVERFLOW,
    "safety_compacting": Activity.COMPACT,
    "reloading": Activity.RELOAD,
    "reentering": Activity.RELOAD,
    "checking": Activity.CHECK,
}

FINAL_STATES: frozenset[str] = frozenset(
    {
        "done",
        "exhausted",
        "step_limit",
        "answered",
        "failed",
        "interrupted",
        "shut_down",
        "fenced",
        "unavailable",
    }
)

DESCRIPTION: Mapping[str, str] = {
    "loading": "load the history; a stored final answer means the turn is over",
    "stepping": "stream a step, run its tools, persist it",
    "compacting": "inline compaction after a persisted step",
    "overflow_compacting": "the prompt outgrew the context window: compact, retry the step",
    "reloading": "reload the compacted history, keep stepping",
    "checking": "post-run check: safety-net compaction or re-entry",
    "safety_compacting": "post-run safety-net compaction",
    "reentering": "reload and re-enter the step loop with the summary",
    "done": "turn finished",
    "exhausted": "re-entry limit reached",
    "step_limit": "max_steps used while the model still called tools",
    "answered": "recovered turn whose answer was already stored",
    "failed": "the model failed (not retryable, retries exhausted, or still too long)",
    "interrupted": "the user stopped the turn (or it lost the chat to a takeover)",
    "shut_down": "the replica is closing; another one runs the chat",
    "fenced": "a write was refused: the run no longer holds the chat",
    "unavailable": "the store stayed unavailable past the write retry budget",
}
