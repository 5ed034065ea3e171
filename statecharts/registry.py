"""Every chart the docs describe: name (file stem), class, and prose.

`python -m statecharts.render` draws each entry into `docs/statecharts/` and
`docs/statecharts.md`. Adding a chart is one line in `CHARTS`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from statemachine import StateChart

from statecharts.compaction import CompactionChart
from statecharts.dial import DialChart
from statecharts.lifecycle import ChatLifecycleChart


class ChartEntry(NamedTuple):
    """One documented chart."""

    name: str
    chart: type[StateChart[Any]]
    description: str


DIAL_PROSE = """\
Decides the lazy-validation dial of docs/spec.md §5.1; `chatd_trio.dial` drives it.

The chart starts in `dialing`: the bound agent is dialled and the validation delay
(5 s by default) is running. A dial that connects first ends in `connected` and no
validation ever runs. A dial that fails first asks the workspace for its current
agent (`validating_after_failure`). The answer is the event `validated(agent=...)`
and the chart's `same_agent` guard compares it with the bound agent: the same
agent is dialled once more (`redialing_same`), another agent is dialled instead
(`dialing_other`, ending in `switched`). No agent ends in `no_agent` (the caller
gets `NoWorkspaceAgent`, unwrapped) and a validation error ends in `failed`.

When the delay passes first, the bound dial keeps going while the binding is
checked (`validating_while_dialing`). If the dial finishes during the check it
decides the outcome (a failure then waits for the validation's answer, as above).
If the validation answers first, the same agent or a validation error keeps
waiting for the bound dial (`awaiting_bound`); no agent or another agent abandons
the bound dial at once - it is cancelled and, if it ignores that, finishes in the
background where a late connection is released.

Each state lists the activities the driver keeps running (`ACTIVITIES`): entering
a state starts what it lists, leaving it cancels what the next state drops. Every
waiting state has a `cancel` transition: the caller was cancelled. `failed` wraps
the deciding error as "dial with lazy validation: <error>".
"""

LIFECYCLE_PROSE = """\
The statuses of one chat (docs/spec.md §1) and every change between them. This
chart decides: `chatd_trio.lifecycle.decide` asks it what an event does in a
chat's status, given what the deciding actor knows (the queue's length and bound,
whether it holds the row's ownership token), and both store adapters execute the
answer as one guarded write. Tests also replay observed status sequences through it
(`statecharts.lifecycle.check_status_path`).

A chat is created `pending` with its first message. A replica acquires it
(`running`, with a new ownership token). A run that finishes goes back to
`waiting`, or to `pending` when a queued message is promoted; a failed run goes to
`error`; a run that shuts down, or whose store stayed unavailable, hands the chat
back `pending`. Every finish ends the run's token. A user interrupt sets `waiting`
without changing the token, so the stopped run can still write what it produced and
its finish, which then ends like the interrupt. Stale recovery puts the chat back to
`pending` with a new token: the old run can never write into it again.

A message sent to a `waiting` or `error` chat with an empty queue makes it
`pending`; otherwise it is queued while the queue has room. An edit always leaves
the chat `pending`, even mid-run: the run's next write is refused.
"""

COMPACTION_PROSE = """\
Decides a turn's control flow in the agent loop (docs/spec.md §3 and §3.1):
load, step, compact, reload, re-enter or finish, and how the turn ended;
`chatd_trio.loop` drives it.

A turn starts in `loading`: the history is loaded, and a recovered turn whose answer
is already stored ends in `answered` without calling the model. In `stepping` one
model step is streamed and its tools run. The model calling tools keeps the loop in
`stepping` while the shared `max_steps` budget lasts. A step whose context tokens
reach the threshold (70 % of the context limit by default) goes to `compacting`:
the summary is generated and persisted. After a tool-calling step the loop then
`reloading`s the compacted history and steps on; after the model's final step (no
tool calls) it goes to `checking` remembering that it compacted on the final step.
A failed summary is reported and the turn goes on uncompacted.

A model that refuses the step's prompt as too long for its context window sends the
chart to `overflow_compacting`: the history is summarised (the summary prompt loses
its older half while the model refuses it too), reloaded, and the step runs again.
Once per step: a step refused again after that, or a summary that fails there, ends
the turn in `failed` with an error that says so.

`checking` is the post-run check of one pass: if nothing was compacted in the
pass and the last step's usage crosses the threshold, the safety net compacts once
(`safety_compacting`). Compacting on the model's final step re-enters the step
loop with the summarised context (`reentering`), at most three times; then the
chart ends in `exhausted` instead of `done`; a budget spent while the model still
called tools ends in `step_limit`. A re-entry with no step left runs only the
post-run check, which is why `max_steps = 1` with one above-threshold text step
streams once and compacts twice.

Every other end of a turn is a final state too, reached from the states whose
activity can observe it: a model failure (`failed`), a user interrupt
(`interrupted`), a replica shutdown (`shut_down`), a write refused because the run
lost the chat or the replica learning that it did (`fenced`: `write_refused` where
the activity writes, `fence` wherever the turn waits) and a store unavailable past
the retry budget (`unavailable`). `checking` waits for nothing, so none of them
lands there.
"""


CHARTS: tuple[ChartEntry, ...] = (
    ChartEntry("dial", DialChart, DIAL_PROSE),
    ChartEntry("lifecycle", ChatLifecycleChart, LIFECYCLE_PROSE),
    ChartEntry("compaction", CompactionChart, COMPACTION_PROSE),
)
"""The charts to render, in documentation order."""
