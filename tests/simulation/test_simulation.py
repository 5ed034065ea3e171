"""Deterministic simulation: random scenarios with faults, checked after settling.

Replay a failure with the command printed in its message
(`python -m tests.simulation --scenario '<json>'` or `--replay SEED`).
"""

from __future__ import annotations

import inspect
import logging
import random
import uuid
from collections.abc import Iterator

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd_trio.store.base import Store
from tests.simulation import test_planted_bugs
from tests.simulation.harness import (
    _REPLICA,
    Faults,
    Hooks,
    Op,
    Scenario,
    SimStore,
    WitnessStore,
    assert_ok,
    generate,
    run_scenario,
    scenario_from_seed,
)

# Store methods the SimStore passes through untouched: reads, and writes the
# simulation never makes (delete_queued) or that change no chat's status.
PASSED_THROUGH = {
    "get_chat",
    "list_chats",
    "prompt_messages",
    "cached_prompt",
    "latest_assistant_text",
    "list_queued",
    "delete_queued",
    "create_workspace",
    "get_workspace",
    "create_build",
    "create_agent",
    "latest_build_agents",
    "agent_by_id",
    "child_chats",
    "parent_of",
    "statement_counts",
}


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    return generate(lambda lo, hi: draw(st.integers(lo, hi)))


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    # Faults make replicas log warnings by design; restore logging for later tests.
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _protocol_methods() -> set[str]:
    return {n for n in dir(Store) if not n.startswith("_") and callable(getattr(Store, n))}


def test_sim_store_wraps_the_store_protocol_with_its_exact_signatures() -> None:
    """Every Store method the harness (or a planted bug) wraps has the protocol's exact
    signature, and every other one is a deliberate pass-through: a changed or new store
    method fails here instead of as a TypeError deep inside a simulated turn."""
    protocol = _protocol_methods()
    wrappers = [SimStore] + [
        cls
        for cls in vars(test_planted_bugs).values()
        if isinstance(cls, type) and issubclass(cls, SimStore) and cls is not SimStore
    ]
    assert len(wrappers) > 1
    for cls in wrappers:
        for name in protocol & set(vars(cls)):
            wrapped = inspect.signature(getattr(cls, name))
            declared = inspect.signature(getattr(Store, name))
            assert str(wrapped) == str(declared), f"{cls.__name__}.{name}"
    assert protocol - set(vars(SimStore)) == PASSED_THROUGH


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(scenario=scenarios(), _r=st.random_module())
def test_scenarios_hold_every_invariant(scenario: Scenario, _r: object) -> None:
    assert_ok(run_scenario(scenario))


def test_same_scenario_replays_identically() -> None:
    sc = scenario_from_seed(7)
    a, b = run_scenario(sc), run_scenario(sc)
    assert (a.steps, a.chats, a.injected) == (b.steps, b.chats, b.injected)
    assert a.steps > 0


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(scenario=scenarios(), _r=st.random_module())
def test_long_exploration(scenario: Scenario, _r: object) -> None:
    assert_ok(run_scenario(scenario))


def test_two_hundred_seeded_scenarios_with_faults_hold_every_invariant() -> None:
    """200 seeded scenarios (fault rates 0-30 % per kind, fault windows): no invariant is
    violated, and the run really injected faults of every kind (a fault-free run proves
    little), turn writes lost both before and after they landed, replicas paused past
    stale_after and briefly, store outages, failing heartbeats; runs lost their chat
    (fenced) and handed it back when the store stayed away (unavailable); both ways of
    sending message notifies (with the insert, after it) really ran."""
    injected: dict[str, int] = {}
    finished: dict[str, int] = {}
    in_tx = {True: 0, False: 0}
    for seed in range(200):
        result = run_scenario(scenario_from_seed(seed))
        assert_ok(result)
        for name, count in result.injected.items():
            injected[name] = injected.get(name, 0) + count
        for outcome, count in result.turns_finished.items():
            finished[outcome] = finished.get(outcome, 0) + count
        if result.scenario.notify_in_transaction:
            in_tx[True] += result.notified_in_transaction
        else:
            assert result.notified_in_transaction == 0
            in_tx[False] += 1
    kinds = {name.split("_")[0] for name, count in injected.items() if count}
    assert sum(injected.values()) > 200, injected
    assert {"store", "notify", "model", "dial"} <= kinds, injected
    # A turn's writes failed both before reaching the store and after landing.
    for lost in ("store_unavailable_", "store_lost_ack_"):
        assert any(name.startswith(lost) and n for name, n in injected.items()), injected
    windows = ("pause_long", "pause_short", "outage", "heartbeat_fail")
    calls = ("store_outage_call", "notify_outage", "heartbeat_fail_call")
    for name in windows + calls + ("store_lost_ack_finish_turn",):
        assert injected.get(name, 0) > 0, (name, injected)
    assert finished.get("lost", 0) > 10 and finished.get("unavailable", 0) > 0, finished
    assert in_tx[True] > 100 and in_tx[False] > 50, in_tx


class PauseWitness(SimStore):
    """Notes which replica each store call comes from, and any call that gets past the
    gate while its replica is paused."""

    def __init__(self, inner: WitnessStore, rng: random.Random, faults: Faults) -> None:
        super().__init__(inner, rng, faults)
        self.callers: list[tuple[float, int]] = []
        self.while_paused: list[str] = []

    async def _gate(self, op: str, *workers: uuid.UUID) -> None:
        await super()._gate(op, *workers)
        at = _REPLICA.get()
        if at is not None:
            pauses, index = at
            self.callers.append((trio.current_time(), index))
            if index in pauses:
                self.while_paused.append(op)


def test_a_paused_replica_calls_nothing_until_it_resumes_then_its_run_is_fenced() -> None:
    """Replica 1 runs a slow answer and is paused (from t=1) past stale_after: replica 0
    recovers the chat and answers it. Replica 1 makes no store call while paused, calls
    again once resumed, and its run ends fenced; every invariant holds."""
    sc = Scenario(
        seed=1,
        replicas=2,
        ops=(Op("create", 0, 2, gap=1.0), Op("pause", 0, 1, 1)),
        faults=Faults(),
    )
    stores: list[PauseWitness] = []

    def witness(inner: WitnessStore, rng: random.Random, faults: Faults) -> SimStore:
        stores.append(PauseWitness(inner, rng, faults))
        return stores[-1]

    result = run_scenario(sc, hooks=Hooks(store=witness))

    assert_ok(result)
    (store,) = stores
    assert result.injected == {"pause_long": 1}
    assert store.while_paused == []
    after = [t for t, index in store.callers if index == 1 and t > 1.0]
    resumed_at = 1.0 + 7.0
    assert after and min(after) >= resumed_at
    assert any(index == 0 and 1.0 < t < resumed_at for t, index in store.callers)
    assert result.turns_finished == {"lost": 1, "done": 1}
