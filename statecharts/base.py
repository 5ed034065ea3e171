"""Shared machinery of the charts: strict dispatch, a recorded trace, the
transition universe, and a pool of reusable instances.

A chart answers "given this event in this state, what next?" and records the
path it took, so property tests can measure transition coverage and check
that a run's path is valid. python-statemachine runs every chart: events go
through `send`, guards and actions run in the library.

Strict: an error in a guard or an action raises from `send` (it is not turned
into an `error.execution` event), an event the current state does not accept
raises `TransitionNotAllowed`, and an event's keyword data must be exactly the
parameters its guards and actions take (`event_data_of`), so a missing or
misspelt argument raises `EventDataError` before anything runs.

Cheap: building a python-statemachine instance resolves every callback of the
class (hundreds of microseconds); `TracedChart.fresh` hands out a released
instance instead, re-initialised through the library, and `release` (or leaving
a `with` block) gives it back. An event costs python-statemachine about a hundred
microseconds too, so a chart remembers its own answers: the first time an event
meets a configuration (state, the event's data, every per-run attribute) the
library runs it; what it did (the target, the attributes after, the steps) is
kept and replayed the next time the same configuration meets the same event
(`TracedChart.memo_size`). Only plain immutable values take part (booleans,
numbers, strings, None, UUIDs, enums); an event whose data or chart holds
anything else, a chart with listeners, and an event that raised always go
through the library.
"""

from __future__ import annotations

import enum
import inspect
import logging
import re
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, MutableSet
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, Self

from statemachine import StateChart
from statemachine.engines.base import logger as _engine_logger
from statemachine.engines.sync import SyncEngine
from statemachine.exceptions import TransitionNotAllowed
from statemachine.invoke import InvokeManager

__all__ = [
    "ChartError",
    "ChartUnusable",
    "EventDataError",
    "MemoStats",
    "Step",
    "TracedChart",
    "event_data_of",
    "guard_of",
    "memo_stats",
    "transitions_of",
]


class Step(NamedTuple):
    """One transition: source state id, event name, target state id, and its guard.

    `guard` is the transition's `cond`/`unless` conditions as text (`guard_of`),
    empty for an unguarded transition. Two transitions of one event between the
    same states differ by their guard, so coverage counts each guarded branch.
    """

    source: str
    event: str
    target: str
    guard: str = ""


class ChartError(Exception):
    """A chart was used against its contract (a driver bug, not a runtime condition)."""


class EventDataError(ChartError, TypeError):
    """An event was sent with other keyword data than its guards and actions take."""


class ChartUnusable(ChartError, RuntimeError):
    """The chart was released to its pool, or an earlier `send` raised inside it."""


_CONDITION_WORDS = frozenset({"and", "or", "not", "True", "False", "None"})
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")

# What python-statemachine passes every callback by name; never event data.
_INJECTED = frozenset(
    {"event_data", "machine", "model", "event", "transition", "state", "source", "target"}
)


def _condition_text(name: str, expected: object) -> str:
    text = f"({name})" if not name.isidentifier() else name
    return f"not {text}" if expected is False else text


def guard_of(transition: Any) -> str:
    """A transition's guard as text: its `cond` and `unless` conditions, in evaluation order.

    `cond=["a", "b"], unless="c"` reads `a and b and not c`; "" when unguarded.
    """
    return " and ".join(
        _condition_text(str(spec.attr_name), spec.expected_value) for spec in transition.cond
    )


def _parameters(func: Any) -> frozenset[str] | None:
    """Keyword parameters a callback takes; None when it takes `**kwargs` (any data)."""
    if isinstance(func, staticmethod | classmethod):
        func = func.__func__
    if isinstance(func, property) or not callable(func):
        return frozenset()
    params = list(inspect.signature(func).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    names: set[str] = set()
    for param in params:
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if param.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.add(param.name)
    return frozenset(names - _INJECTED)


def _spec_parameters(chart: type[StateChart[Any]], spec: Any) -> frozenset[str] | None:
    func = spec.func
    if not isinstance(func, str):
        return _parameters(func)
    # A name, or a boolean expression over names ("a and not b").
    names = [n for n in _IDENTIFIER.findall(func) if n not in _CONDITION_WORDS]
    out: set[str] = set()
    for name in names:
        params = _parameters(inspect.getattr_static(chart, name, None))
        if params is None:
            return None
        out |= params
    return frozenset(out)


def _other_event_conventions(transition: Any, event: str) -> set[str]:
    others = [str(e) for e in transition.events if str(e) != event]
    return {f"{prefix}_{other}" for other in others for prefix in ("before", "on", "after")}


def _event_parameters(
    chart: type[StateChart[Any]], transitions: Iterable[Any], event: str
) -> frozenset[str] | None:
    out: set[str] = set()
    for transition in transitions:
        skip = _other_event_conventions(transition, event)
        groups = [
            transition.validators,
            transition.cond,
            transition.before,
            transition.on,
            transition.after,
            transition.source.exit,
            *(target.enter for target in transition.targets),
        ]
        for group in groups:
            for spec in group:
                if spec.is_convention and spec.attr_name in skip:
                    continue
                params = _spec_parameters(chart, spec)
                if params is None:
                    return None
                out |= params
    return frozenset(out)


@dataclass
class _ChartInfo:
    """What one chart class computes once: steps per transition, event data, the pool."""

    steps: dict[tuple[int, str], Step]
    event_data: dict[str, frozenset[str] | None]
    has_eventless: bool
    pool: list[Any] = field(default_factory=list)
    # Per start state value: entering it runs no callback at all (see `_quiet_start`).
    quiet_start: dict[Any, bool] = field(default_factory=dict)
    # The per-run attributes a subclass sets before `TracedChart.__init__` (the chart's
    # own state beside its configuration), and the decisions remembered (`_Decision`).
    fields: tuple[str, ...] | None = None
    memo: OrderedDict[tuple[Any, ...], _Decision] = field(default_factory=OrderedDict)
    hits: int = 0
    misses: int = 0


class _Decision(NamedTuple):
    """What one event did to a chart: replayed on the same configuration and event."""

    state: Any
    values: tuple[Any, ...]
    running: bool
    steps: tuple[Step, ...]
    result: Any
    # The library answers a list of the callbacks' results for some events: a fresh copy each time.
    result_is_list: bool


# Immutable values whose equality is their identity for a chart: safe in a memo key.
_PLAIN: set[type] = {bool, int, float, str, type(None), uuid.UUID}


def _plain_types(types: Iterable[type]) -> bool:
    if _PLAIN.issuperset(types):
        return True
    for kind in types:
        if kind not in _PLAIN:
            if not issubclass(kind, enum.Enum):
                return False
            _PLAIN.add(kind)  # an enum member is immutable and hashable too
    return True


def _plain(values: Iterable[Any]) -> bool:
    return _plain_types([type(v) for v in values])


_INFO: dict[type[StateChart[Any]], _ChartInfo] = {}


def _info(chart: type[StateChart[Any]]) -> _ChartInfo:
    info = _INFO.get(chart)
    if info is None:
        steps: dict[tuple[int, str], Step] = {}
        by_event: dict[str, list[Any]] = {}
        for state in chart.states_map.values():
            for transition in state.transitions:
                target = transition.target.id if transition.target is not None else state.id
                for event in transition.events:
                    name = str(event)
                    steps[(id(transition), name)] = Step(
                        state.id, name, target, guard_of(transition)
                    )
                    by_event.setdefault(name, []).append(transition)
        event_data = {
            name: _event_parameters(chart, transitions, name)
            for name, transitions in by_event.items()
        }
        has_eventless = any(
            transition.is_eventless and not transition.initial
            for state in chart.states_map.values()
            for transition in state.transitions
        )
        info = _INFO[chart] = _ChartInfo(steps, event_data, has_eventless)
    return info


def transitions_of(chart: type[StateChart[Any]]) -> set[Step]:
    """Every (source, event, target, guard) a chart class declares: the coverage universe."""
    return set(_info(chart).steps.values())


class MemoStats(NamedTuple):
    """A chart class's remembered decisions: events replayed, events the library ran and
    remembered, and how many decisions are kept now (see `TracedChart.memo_size`)."""

    hits: int
    misses: int
    entries: int


def memo_stats(chart: type[StateChart[Any]]) -> MemoStats:
    """How often `chart`'s events were replayed from its memo, in this process."""
    info = _info(chart)
    return MemoStats(info.hits, info.misses, len(info.memo))


def event_data_of(chart: type[StateChart[Any]]) -> dict[str, frozenset[str] | None]:
    """Per event, the keyword data `send` requires: every parameter of the event's guards,
    actions and entry/exit callbacks (None: some callback takes `**kwargs`, anything goes)."""
    return dict(_info(chart).event_data)


class _PoolEngine(SyncEngine):
    """python-statemachine's SyncEngine, made cheap to reuse for a pooled chart.

    Two exact shortcuts, nothing else changed: the initial pseudo-transition the library
    builds on every activation (a new `State` and `Transition`, never mutated) is built
    once per chart class and start; and `reset` puts a used engine back as its
    constructor leaves it, reusing its queues and lock. `reset` knows every attribute
    the installed library's engine has; on a library whose engine has others it
    refuses, and the chart gets a new engine instead.
    """

    # BaseEngine.__init__'s attributes, and how reset() treats each.
    _KEPT = frozenset({"sm", "external_queue", "internal_queue", "_sentinel", "_processing"})
    _RESET = frozenset(
        {
            "running",
            "_cache",
            "_invoke_manager",
            "_macrostep_count",
            "_microstep_count",
            "_log_id",
            "_debug",
            "_root_parallel_final_pending",
        }
    )
    _initial: ClassVar[dict[tuple[type[StateChart[Any]], tuple[Any, ...]], Any]] = {}

    def _initial_transitions(self, trigger_data: Any) -> Any:
        key = (type(self.sm), tuple(self.sm.start_configuration_values))
        transitions = self._initial.get(key)
        if transitions is None:
            transitions = super()._initial_transitions(trigger_data)  # type: ignore[no-untyped-call]
            self._initial[key] = transitions
        return transitions

    def reset(self) -> bool:
        """Back to the just-constructed state; False when this engine cannot be reused."""
        if set(vars(self)) != self._KEPT | self._RESET or self._processing.locked():
            return False
        self.running = True
        self.clear()  # type: ignore[no-untyped-call]
        self.clear_cache()  # type: ignore[no-untyped-call]
        self._invoke_manager = InvokeManager(self)
        self._macrostep_count = 0
        self._microstep_count = 0
        self._log_id = f"[{type(self.sm).__name__}]"
        debug = _engine_logger.isEnabledFor(logging.DEBUG)
        self._debug = _engine_logger.debug if debug else _no_debug
        self._root_parallel_final_pending = None
        return True


def _no_debug(*args: Any, **kwargs: Any) -> None:
    pass


class TracedChart(StateChart[Any]):
    """A strict StateChart that records every transition it takes in `trace`.

    Reuse instead of construction: `DialChart.fresh(agent_id)` takes the same
    arguments as `DialChart(agent_id)` and returns an equivalent chart, taken
    from the class's pool when one was released there. `chart.release()` (or
    `with DialChart.fresh(...) as chart:`) returns it; `fresh(..., owner=obj)`
    returns it when `obj` is garbage-collected; a chart never released is
    simply garbage-collected. A chart may be released in any state, also
    half-way through a run that was cancelled: `fresh` starts it over through
    the library (a new engine, the start state entered with its entry actions,
    an empty trace). A released chart refuses `send` until it is handed out
    again, so keep no reference to it.

    Subclasses set every per-run attribute in `__init__` before calling
    `super().__init__(...)`: `fresh` runs `__init__` again on a pooled
    instance and skips only the library's construction.
    """

    # Strict (see the module docstring): an unexpected event or a failing callback raises.
    allow_event_without_transition = False
    catch_errors_as_events = False

    pool_size: ClassVar[int] = 256
    """Released instances kept per class; more are left to the garbage collector."""

    memo_size: ClassVar[int] = 4096
    """Decisions remembered per class, least recently used dropped first (0: none)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        info = _info(type(self))
        if info.fields is None and "_engine" not in vars(self):
            # First construction: what the subclass set so far is its per-run state.
            info.fields = tuple(vars(self))
        self.trace: list[Step] = []
        self._released = False
        # Counts the hand-outs, so an owner's late finaliser never releases a later lease.
        self._lease = getattr(self, "_lease", -1) + 1
        self._broken: BaseException | None = None
        if "_engine" in vars(self):
            self._restart(*args, **kwargs)
        else:
            super().__init__(*args, **kwargs)
            self._listener_count = len(self._listeners)

    def _restart(
        self,
        model: Any = None,
        state_field: str | None = None,
        start_value: Any = None,
        listeners: list[object] | None = None,
        **kwargs: Any,
    ) -> None:
        if model is not None or listeners or state_field not in (None, self.state_field):
            raise ChartError(
                f"{type(self).__name__}.fresh keeps the chart's own model and listeners; "
                "construct the chart to pass others"
            )
        default_start = type(self).start_configuration_values
        self.start_configuration_values = (
            [start_value] if start_value is not None else list(default_start)
        )
        self.history_values = {}
        # An engine as new: nothing queued, running, counters at zero, whatever the last
        # run did (an exception or a cancellation may have left it anywhere).
        engine = self._engine
        if not (isinstance(engine, _PoolEngine) and engine.reset()):
            new_engine: Callable[[], Any] = self._get_engine
            self._engine = new_engine()
        self.current_state_value = None
        initial = type(self).initial_state
        values = self.start_configuration_values or [initial.value if initial else None]
        start = self.states_map.get(values[0]) if len(values) == 1 else None
        if start is not None and self._quiet_start(start):
            # Entering this state runs no callback and enables nothing: the library's
            # activation would only set the configuration, so set it directly.
            self.current_state_value = start.value
        else:
            # As the constructor does: enter the start state, running its entry actions.
            self._engine.start(**kwargs)

    def _get_engine(self) -> Any:
        # As StateChart._get_engine, with the reusable variant of the synchronous engine.
        if self._callbacks.has_async_callbacks:
            return super()._get_engine()  # type: ignore[no-untyped-call]
        return _PoolEngine(self)

    def _quiet_start(self, state: Any) -> bool:
        info = _info(type(self))
        quiet = info.quiet_start.get(state.value)
        if quiet is None:
            registry = self._callbacks
            quiet = info.quiet_start[state.value] = (
                not info.has_eventless
                and not registry.has_async_callbacks
                and state.parent is None
                and state.is_atomic
                and not state.final
                and not any(True for _ in registry[state.enter.key])
                and state.invoke.key not in registry
            )
        return quiet

    @classmethod
    def fresh(cls, *args: Any, owner: object | None = None, **kwargs: Any) -> Self:
        """A chart in its start state, as `cls(*args, **kwargs)` builds it, from the pool if any.

        Accepts the constructor's arguments, including `start_value=`; not `model=` or
        `listeners=` (construct the chart for those). With `owner`, the chart goes back
        to the pool once `owner` is garbage-collected (unless released before): for an
        object that holds the chart for its whole life and lets no reference escape.
        """
        chart: Self
        try:
            chart = _info(cls).pool.pop()
        except IndexError:
            chart = cls(*args, **kwargs)
        else:
            try:
                cls.__init__(chart, *args, **kwargs)
            except BaseException:
                chart._released = True  # dropped: the garbage collector takes it
                raise
        if owner is not None:
            finaliser = weakref.finalize(owner, _release_lease, chart, chart._lease)
            finaliser.atexit = False
        return chart

    def release(self) -> None:
        """Give the chart back to its class's pool; it refuses `send` until handed out again."""
        if self._released:
            raise ChartUnusable(f"{type(self).__name__} released twice")
        self._released = True
        reusable = not self._class_listeners and len(self._listeners) == self._listener_count
        pool = _info(type(self)).pool
        if reusable and len(pool) < self.pool_size:
            pool.append(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._released:
            self.release()

    def send(
        self,
        event: str,
        *args: Any,
        delay: float | None = None,
        send_id: str | None = None,
        internal: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Send `event` with its keyword data; raises what a guard or action raised.

        Raises `EventDataError` when the data are not exactly what the event's
        callbacks take (`event_data_of`), `TransitionNotAllowed` when the current
        state has no transition for it, and `ChartUnusable` on a released chart or
        one whose earlier `send` raised from a callback.
        """
        if self._released:
            raise ChartUnusable(f"{type(self).__name__} was released: take one with fresh()")
        if self._broken is not None:
            raise ChartUnusable(
                f"{type(self).__name__} is unusable: an earlier send raised {self._broken!r}"
            ) from self._broken
        if args:
            raise EventDataError(f"{event}: event data are keyword arguments, got {args!r}")
        self._check_event_data(event, kwargs)
        key = None
        if delay is None and send_id is None and internal is None:
            key = self._memo_key(event, kwargs)
            if key is not None:
                decision = _info(type(self)).memo.get(key)
                if decision is not None:
                    return self._replay(key, decision)
        seen = len(self.trace)
        try:
            result = super().send(event, delay=delay, send_id=send_id, internal=internal, **kwargs)
        except TransitionNotAllowed:
            raise
        except BaseException as exc:
            # A callback failed half-way: counters and configuration may disagree.
            self._broken = exc
            raise
        if key is not None:
            self._remember(key, seen, result)
        return result

    def _memo_key(self, event: str, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        info = _info(type(self))
        fields = info.fields
        if fields is None or not self.memo_size or self._class_listeners or self._listeners:
            return None  # a listener sees every callback: the library must run them
        attrs = vars(self)
        values = tuple([attrs[name] for name in fields])
        data = tuple(sorted(kwargs.items())) if len(kwargs) > 1 else tuple(kwargs.items())
        state = self.current_state_value
        # Types in the key too: 1 and True are equal, yet an attribute keeps its type.
        types = (type(state), *map(type, values), *[type(v) for _, v in data])
        if not _plain_types(types):
            return None
        return (state, event, data, values, types)

    def _replay(self, key: tuple[Any, ...], decision: _Decision) -> Any:
        info = _info(type(self))
        info.hits += 1
        info.memo.move_to_end(key)
        self.current_state_value = decision.state
        attrs = vars(self)
        for name, value in zip(info.fields or (), decision.values, strict=True):
            attrs[name] = value
        self._engine.running = decision.running
        self.trace.extend(decision.steps)
        return list(decision.result) if decision.result_is_list else decision.result

    def _remember(self, key: tuple[Any, ...], seen: int, result: Any) -> None:
        info = _info(type(self))
        attrs = vars(self)
        values = tuple(attrs[name] for name in info.fields or ())
        state = self.current_state_value
        is_list = type(result) is list
        if is_list:
            result = tuple(result)
        if not (_plain(values) and _plain((state,)) and _plain(result if is_list else (result,))):
            return
        info.misses += 1
        memo = info.memo
        steps = tuple(self.trace[seen:])
        memo[key] = _Decision(state, values, self._engine.running, steps, result, is_list)
        if len(memo) > self.memo_size:
            memo.popitem(last=False)

    def _check_event_data(self, event: str, kwargs: dict[str, Any]) -> None:
        data = _info(type(self)).event_data
        if event not in data:
            return  # not an event of this chart: the library refuses it
        expected = data[event]
        given = kwargs.keys()
        if expected is None or given == expected:
            return
        missing = sorted(expected - given)
        unexpected = sorted(given - expected)
        if missing or unexpected:
            raise EventDataError(
                f"{type(self).__name__}.{event} takes {sorted(expected)}: "
                f"missing {missing}, unexpected {unexpected}"
            )

    def after_transition(self, event: Any, transition: Any) -> None:
        self.trace.append(_info(type(self)).steps[(id(transition), str(event))])

    @property
    def is_released(self) -> bool:
        """Whether the chart is back in its pool (it then refuses `send`)."""
        return self._released

    @property
    def state_id(self) -> str:
        """The id of the (single, non-compound) active state."""
        value = self.current_state_value
        if value is not None and not isinstance(value, MutableSet):
            # One active state: its value (drivers read this after every event).
            state_id: str = self.states_map[value].id
            return state_id
        ids = [s.id for s in self.configuration]
        return ids[-1]


def _release_lease(chart: TracedChart, lease: int) -> None:
    if chart._lease == lease and not chart.is_released:
        chart.release()
