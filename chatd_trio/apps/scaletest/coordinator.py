"""The coordinator: sets a run up, runs its replicas (in this process on memory, as
worker processes on PostgreSQL), waits for the end, and summarises."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio.apps.scaletest.database import Database, run_database
from chatd_trio.apps.scaletest.facts import (
    install_witness,
    memory_facts,
    postgres_facts,
    wait_for_database,
)
from chatd_trio.apps.scaletest.faults import FaultInjector
from chatd_trio.apps.scaletest.plan import (
    FaultConfig,
    Plan,
    replica_config,
    replica_server,
    stall_timeout,
)
from chatd_trio.apps.scaletest.progress import Progress, finish_unfinished, progress_bar
from chatd_trio.apps.scaletest.replicas import ReplicaProcesses
from chatd_trio.apps.scaletest.report import diff, sum_dicts, summarise
from chatd_trio.apps.scaletest.runner import ReplicaRunner
from chatd_trio.config import (
    ScaleTestConfig,
)
from chatd_trio.domain import (
    TextPart,
)
from chatd_trio.store.base import Store

__all__ = [
    "run",
    "run_memory",
    "run_postgres",
    "run_workers",
    "setup",
]


async def run(plan: Plan, *, progress: bool = False) -> dict[str, Any]:
    """Run a scale test; the summary (see the module docstring)."""
    plan.validate()
    if plan.store == "postgres":
        # An empty DSN is libpq's defaults (environment, then the local socket).
        return await run_postgres(plan, progress=progress)
    return await run_memory(plan, progress=progress)


async def setup(store: Store, plan: Plan, provisioner: Any, st: ScaleTestConfig) -> Plan:
    owner = uuid.uuid4()
    ws = await provisioner.create(owner, st.workspace_name)
    ids = []
    for i in range(plan.chats):
        chat, _ = await store.create_chat(
            owner, f"scale {i}", (TextPart(st.user_text),), workspace_id=ws.id
        )
        ids.append(str(chat.id))
    return dataclasses.replace(plan, owner_id=str(owner), chat_ids=tuple(ids))


# -- memory: in-process replicas


class MemoryEvents:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.runners: list[ReplicaRunner] = []

    def on_turn(self, chat_id: str, turn: int, outcome: str) -> None:
        self.progress.turn(chat_id, turn, outcome)

    def on_chat_done(self, chat_id: str, last_id: int) -> None:
        if self.progress.final(chat_id, last_id):
            for runner in self.runners:
                runner.set_final(chat_id, last_id)


async def run_memory(plan: Plan, *, progress: bool = False) -> dict[str, Any]:
    """R in-process replicas sharing one MemoryStore/MemoryPubSub."""
    from chatd_trio.agent.local import LocalProvisioner
    from chatd_trio.pubsub.memory import MemoryPubSub
    from chatd_trio.store.memory import MemoryStore

    st = ScaleTestConfig()
    fc = FaultConfig()
    pubsub = MemoryPubSub()
    store = MemoryStore(pubsub=pubsub)
    config = replica_config(plan, st)
    with tempfile.TemporaryDirectory(prefix="chatd-scale-") as tmp:
        async with trio.open_nursery() as agents:
            provisioner = LocalProvisioner(store, agents, Path(tmp), config=config)
            plan = await setup(store, plan, provisioner, st)
            base = store.statement_counts()
            steady_base = base
            started = time.monotonic()
            async with (
                progress_bar(plan.chats * plan.turns, progress) as tick,
                AsyncExitStack() as stack,
            ):
                tracker = Progress(plan, tick)
                events = MemoryEvents(tracker)
                for index in range(plan.replicas):
                    server = await stack.enter_async_context(
                        replica_server(plan, store, pubsub, config, st)
                    )
                    # One shared store: its statement counts are taken once, below.
                    events.runners.append(
                        ReplicaRunner(
                            server,
                            index,
                            plan,
                            events,
                            st=st,
                            fc=fc,
                            count_statements=False,
                            count_publishes=index == 0,
                        )
                    )
                runners = events.runners

                async def phases() -> None:
                    nonlocal steady_base
                    for r in runners:
                        await r.phase1.wait()
                    steady_base = store.statement_counts()
                    tracker.went()
                    for r in runners:
                        r.start_steady()

                async def bump_when_done(r: ReplicaRunner) -> None:
                    await r.done.wait()
                    tracker.bump()

                async def last_ids(chats: Sequence[str]) -> dict[str, int]:
                    out = {}
                    for c in chats:
                        rows = await store.messages_after(uuid.UUID(c), 0)
                        out[c] = max((m.id for m in rows), default=0)
                    return out

                def deliver(chat_id: str, last_id: int) -> None:
                    for r in runners:
                        r.set_final(chat_id, last_id)

                def all_done() -> bool:
                    return all(r.done.is_set() for r in runners)

                deadline = trio.current_time() + plan.deadline_s
                async with trio.open_nursery() as nursery:
                    for r in runners:
                        nursery.start_soon(r.run)
                        nursery.start_soon(bump_when_done, r)
                    nursery.start_soon(phases)
                    outcome = await tracker.watch(all_done, stall_timeout(plan, fc), deadline)
                    if outcome != "done":
                        await finish_unfinished(plan, tracker, last_ids, deliver)
                        tracker.bump()
                        await tracker.watch(all_done, fc.drain_timeout_s, math.inf)
                    nursery.cancel_scope.cancel()
                wall = time.monotonic() - started
                end = store.statement_counts()
            # The servers are closed: running turns were handed back.
            reports = [r.report() for r in runners]
            workers = [
                {"replica": r.index, "pid": os.getpid(), "exit_code": None, "reported": True}
                for r in runners
            ]
            await provisioner.aclose()
            agents.cancel_scope.cancel()
    facts = await memory_facts(store, plan.chat_ids)
    return summarise(
        plan,
        facts,
        tracker,
        outcome,
        reports,
        wall,
        diff(end, base),
        diff(end, steady_base),
        workers=workers,
    )


# -- PostgreSQL: the run's database, worker processes, faults


async def run_postgres(plan: Plan, *, progress: bool = False) -> dict[str, Any]:
    """R worker processes sharing the run's own database; this process runs the agent."""
    from chatd_trio.agent.local import LocalProvisioner
    from chatd_trio.store.postgres import PostgresStore

    st = ScaleTestConfig()
    fc = FaultConfig()
    config = replica_config(plan, st)
    plan = dataclasses.replace(plan, run_id=plan.run_id or uuid.uuid4().hex[:8])
    async with run_database(plan, fc) as db:
        plan = dataclasses.replace(plan, dsn=db.dsn)
        with tempfile.TemporaryDirectory(prefix="chatd-scale-") as tmp:
            async with trio.open_nursery() as agents:
                # The coordinator's store serves the setup only: the agents it starts do
                # not use it, so a fault cannot reach the coordinator.
                async with PostgresStore.open(plan.dsn) as store:
                    provisioner = LocalProvisioner(store, agents, Path(tmp), config=config)
                    plan = await setup(store, plan, provisioner, st)
                witness = await trio.to_thread.run_sync(install_witness, plan.dsn, fc)
                started = time.monotonic()
                async with progress_bar(plan.chats * plan.turns, progress) as tick:
                    tracker = Progress(plan, tick)
                    outcome, workers, faults, crashes = await run_workers(plan, tracker, db, fc)
                wall = time.monotonic() - started
                await provisioner.aclose()
                agents.cancel_scope.cancel()
        facts = await wait_for_database(
            functools.partial(postgres_facts, plan.dsn, plan.chat_ids, fc), fc
        )
        if facts.stale_writes is None:
            facts.witness = witness
    reports = [w["report"] for w in workers if w["report"] is not None]
    end = sum_dicts(r["end"]["statements"] for r in reports)
    steady = sum_dicts(r["steady_start"]["statements"] for r in reports)
    summary = summarise(
        plan,
        facts,
        tracker,
        outcome,
        reports,
        wall,
        end,
        diff(end, steady),
        workers=[{k: v for k, v in w.items() if k != "report"} for w in workers],
        faults=faults,
        crashes=crashes,
    )
    summary["database"] = {
        "name": db.name,
        "kept": plan.keep,
        "throwaway_cluster": db.cluster is not None,
        **({"dsn": db.dsn} if plan.keep else {}),
    }
    return summary


async def run_workers(
    plan: Plan, tracker: Progress, db: Database, fc: FaultConfig
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Start the replicas, inject the fault, wait for the end, stop and reap them all.
    A failure (a replica that does not start: ScaleTestError) leaves in the nursery's
    exception group."""
    outcome = "failed"
    async with trio.open_nursery() as nursery:
        sup = ReplicaProcesses(plan, tracker, nursery, db, fc)
        faults = FaultInjector(sup)
        try:
            for index in range(plan.replicas):
                await sup.spawn(index)
            nursery.start_soon(sup.go_after_phase1)
            fault_started = trio.Event()
            fault_done = trio.Event()
            fault_scope = trio.CancelScope()

            async def fault() -> None:
                with fault_scope:
                    await faults.inject(fault_started)
                fault_done.set()

            if plan.fault:
                nursery.start_soon(fault)
            else:
                fault_done.set()
            deadline = trio.current_time() + plan.deadline_s
            outcome = await tracker.watch(sup.all_done, stall_timeout(plan, fc), deadline)
            # A fault under way (a pause, an outage) always completes: SIGCONT, restart.
            if not fault_started.is_set():
                fault_scope.cancel()
            await fault_done.wait()
            if outcome != "done":
                await sup.finish_unfinished()
                tracker.bump()
                await tracker.watch(sup.all_done, fc.drain_timeout_s, math.inf)
        finally:
            with bounded_cleanup(fc.cleanup_timeout_s):
                await sup.stop_all()
        nursery.cancel_scope.cancel()
    if plan.fault and not faults.records:
        faults.records.append({"kind": plan.fault, "injected": False})
    workers = [{**w.summary(), "report": w.report} for w in sup.all]
    return outcome, workers, faults.records, sup.crashes
