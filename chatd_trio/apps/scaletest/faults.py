"""Fault injection (`--fault`, PostgreSQL only): kill, pause or cut off a replica,
restart or stop PostgreSQL, or stall every write, once a third of the turns are over."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import trio

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio.apps.scaletest.plan import FaultConfig, store_application_name
from chatd_trio.apps.scaletest.replicas import ReplicaProcesses, WorkerProcess

__all__ = [
    "FaultInjector",
]

logger = logging.getLogger(__name__)


class FaultInjector:
    """`plan.fault`, injected once into a PostgreSQL run: its replica processes or its
    database (the module docstring of `chatd_trio.apps.scaletest` says what each does).
    `records` says what was injected, when, and what it did."""

    def __init__(self, replicas: ReplicaProcesses) -> None:
        self._replicas = replicas
        self.plan = replicas.plan
        self.progress = replicas.progress
        self.fc = replicas.fc
        self.db = replicas.db
        self.records: list[dict[str, Any]] = []

    async def inject(self, started: trio.Event) -> None:
        """Wait for a third of the turns, inject `plan.fault` once, record what it did."""
        total = self.plan.chats * self.plan.turns
        await self.progress.wait_turns(math.ceil(total * self.fc.inject_at_fraction))
        started.set()
        record: dict[str, Any] = {
            "kind": self.plan.fault,
            "at_s": round(time.monotonic() - self.progress.started, 3),
            "at_turns": len(self.progress.turns),
        }
        self.records.append(record)
        began = time.monotonic()
        inject = getattr(self, f"_fault_{self.plan.fault}")
        record.update(await inject())
        record["took_s"] = round(time.monotonic() - began, 3)
        logger.info("fault injected", extra={"fault": record})

    def _sql(self, query: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db.dsn, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    async def _victim(self) -> tuple[WorkerProcess, int]:
        """The live replica owning the most running chats now (the lowest index on a tie)."""
        rows = await trio.to_thread.run_sync(
            self._sql,
            "SELECT worker_id::text, count(*) FROM chats WHERE status = 'running'"
            " GROUP BY worker_id",
        )
        running = {str(r[0]): int(r[1]) for r in rows}
        live = [w for w in self._replicas.current.values() if w.alive]
        worker = max(live, key=lambda w: (running.get(w.worker_id, 0), -w.index))
        return worker, running.get(worker.worker_id, 0)

    async def _fault_sigkill(self) -> dict[str, Any]:
        worker, running = await self._victim()
        worker.fault = "sigkill"
        worker.expected_exit = True
        worker.proc.kill()
        await worker.exited.wait()
        replacement = await self._replicas.spawn(worker.index)
        return {
            "replica": worker.index,
            "pid": worker.proc.pid,
            "running_chats": running,
            "exit_code": worker.proc.returncode,
            "replacement_pid": replacement.proc.pid,
        }

    async def _fault_sigstop(self) -> dict[str, Any]:
        worker, running = await self._victim()
        worker.fault = "sigstop"
        pause = self.fc.pause_factor * self.plan.stale_after + self.plan.heartbeat
        worker.proc.send_signal(signal.SIGSTOP)
        try:
            await trio.sleep(pause)
        finally:
            worker.proc.send_signal(signal.SIGCONT)
        return {
            "replica": worker.index,
            "pid": worker.proc.pid,
            "running_chats": running,
            "paused_s": pause,
        }

    async def _fault_pool_kill(self) -> dict[str, Any]:
        worker, running = await self._victim()
        worker.fault = "pool_kill"
        rows = await trio.to_thread.run_sync(
            self._sql,
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (store_application_name(self.plan, worker.index),),
        )
        return {
            "replica": worker.index,
            "pid": worker.proc.pid,
            "running_chats": running,
            "terminated": sum(1 for r in rows if r[1]),
        }

    async def _fault_listen_kill(self) -> dict[str, Any]:
        rows = await trio.to_thread.run_sync(
            self._sql,
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE starts_with(application_name, %s)"
            " AND strpos(application_name, '-pubsub-listen-') > 0",
            (f"{FaultConfig.application_prefix}-{self.plan.run_id}-",),
        )
        return {"terminated": sum(1 for r in rows if r[1])}

    async def _fault_commit_stall(self) -> dict[str, Any]:
        return await trio.to_thread.run_sync(self._lock_every_chat, self.fc.commit_stall_s)

    def _lock_every_chat(self, seconds: float) -> dict[str, Any]:
        """Hold every chat row locked for `seconds` (in a thread): each write waits."""
        with psycopg.connect(self.db.dsn) as conn:
            locked = len(conn.execute("SELECT id FROM chats FOR UPDATE").fetchall())
            began = time.monotonic()
            # The stall is the fault itself: its length is wall time, not synchronisation.
            time.sleep(seconds)
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            ).fetchone()
            conn.rollback()
            return {
                "locked_chats": locked,
                "held_s": round(time.monotonic() - began, 3),
                "writes_waiting_at_end": int(waiting[0]) if waiting else 0,
            }

    async def _fault_pg_restart(self) -> dict[str, Any]:
        began = time.monotonic()
        await trio.to_thread.run_sync(self.db.cluster.restart)
        return {"down_s": round(time.monotonic() - began, 3)}

    async def _fault_outage(self) -> dict[str, Any]:
        began = time.monotonic()
        await trio.to_thread.run_sync(self.db.cluster.stop)
        try:
            await trio.sleep(self.plan.outage_s)
        finally:
            with bounded_cleanup(self.fc.cleanup_timeout_s):
                await trio.to_thread.run_sync(self.db.cluster.start)
        return {"down_s": round(time.monotonic() - began, 3)}
