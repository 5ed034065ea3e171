"""The replica processes of a PostgreSQL run: start them (`python -m
chatd_trio.apps.scaletest worker`), talk to them over the worker channel, replace one
that dies, stop and reap them all."""

from __future__ import annotations

import functools
import logging
import math
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import psycopg
import trio

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio.apps.channel import (
    JsonLines,
    encode,
    worker_command,
)
from chatd_trio.apps.scaletest.database import Database
from chatd_trio.apps.scaletest.facts import wait_for_database
from chatd_trio.apps.scaletest.plan import FaultConfig, Plan, ScaleTestError
from chatd_trio.apps.scaletest.progress import Progress, finish_unfinished
from chatd_trio.pubsub.auth import new_key_text

__all__ = [
    "ReplicaProcesses",
    "WorkerProcess",
]

logger = logging.getLogger(__name__)


@dataclass
class WorkerProcess:
    index: int
    proc: trio.Process
    outbox: trio.MemorySendChannel[bytes]
    worker_id: str = ""
    report: dict[str, Any] | None = None
    phase1: bool = False
    done: bool = False
    fault: str = ""
    # Killed or stopped by the coordinator: not a crash.
    expected_exit: bool = False
    crashed: bool = False
    ready: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def send(self, message: Mapping[str, Any]) -> None:
        # Queued, never blocking: a SIGSTOPped worker must not stall the coordinator.
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self.outbox.send_nowait(encode(message))

    def summary(self) -> dict[str, Any]:
        return {
            "replica": self.index,
            "pid": self.proc.pid,
            "exit_code": self.proc.returncode,
            "reported": self.report is not None,
            "turns_finished": self.report["turns_finished"] if self.report else None,
            **({"fault": self.fault} if self.fault else {}),
            **({"crashed": True} if self.crashed else {}),
        }


class ReplicaProcesses:
    """The replica processes: start, talk, replace, fault, stop, reap."""

    def __init__(
        self,
        plan: Plan,
        progress: Progress,
        nursery: trio.Nursery,
        db: Database,
        fc: FaultConfig,
    ) -> None:
        self.plan = plan
        self.progress = progress
        self.nursery = nursery
        self.db = db
        self.fc = fc
        self.current: dict[int, WorkerProcess] = {}
        self.all: list[WorkerProcess] = []
        self.go_sent = False
        self.stopping = False
        self.crashes: list[dict[str, Any]] = []
        # The run's notify key, shared by its replicas (in the hello, over stdin: never
        # in the plan, which reports repeat).
        self.notify_key = new_key_text()

    # -- processes ----------------------------------------------------------------------
    async def spawn(self, index: int) -> WorkerProcess:
        cmd = worker_command("scaletest")
        proc: trio.Process = await self.nursery.start(
            functools.partial(
                trio.run_process, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False
            )
        )
        send, receive = trio.open_memory_channel[bytes](math.inf)
        worker = WorkerProcess(index, proc, send)
        self.current[index] = worker
        self.all.append(worker)
        # Registered before the hello is queued: every later `final` follows the hello.
        worker.send(
            {
                "index": index,
                "plan": self.plan.to_json(),
                "go": self.go_sent,
                "finals": dict(self.progress.finals),
                "notify_key": self.notify_key,
            }
        )
        self.nursery.start_soon(self._writer, worker, receive)
        self.nursery.start_soon(self._reader, worker)
        with trio.move_on_after(self.fc.start_timeout_s):
            while not (worker.ready.is_set() or worker.exited.is_set()):
                await self.progress.changed.wait()
        if not worker.ready.is_set():
            raise ScaleTestError(
                f"replica {index} (pid {proc.pid}) did not start"
                + (f": exit code {proc.returncode}" if proc.returncode is not None else "")
            )
        return worker

    async def _writer(
        self, worker: WorkerProcess, receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        assert worker.proc.stdin is not None
        async with receive:
            async for data in receive:
                try:
                    await worker.proc.stdin.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

    async def _reader(self, worker: WorkerProcess) -> None:
        assert worker.proc.stdout is not None
        lines = JsonLines(worker.proc.stdout)
        try:
            while True:
                self._handle(worker, await lines.receive())
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with bounded_cleanup(self.fc.cleanup_timeout_s):
                await worker.proc.wait()
            worker.exited.set()
            worker.outbox.close()
            if worker.ready.is_set() and not (worker.expected_exit or self.stopping):
                self._crashed(worker)
            self.progress.bump()

    def _crashed(self, worker: WorkerProcess) -> None:
        """A replica died on its own: recorded, and replaced as a process manager would
        (at most `max_respawns` times per run)."""
        worker.crashed = True
        record: dict[str, Any] = {
            "replica": worker.index,
            "pid": worker.proc.pid,
            "exit_code": worker.proc.returncode,
            "at_s": round(time.monotonic() - self.progress.started, 3),
        }
        self.crashes.append(record)
        logger.warning("replica crashed", extra={"crash": record})
        if len(self.crashes) <= self.fc.max_respawns:
            self.nursery.start_soon(self._respawn, worker.index, record)

    async def _respawn(self, index: int, record: dict[str, Any]) -> None:
        try:
            record["replacement_pid"] = (await self.spawn(index)).proc.pid
        except ScaleTestError as exc:
            record["respawn_failed"] = str(exc)

    def _handle(self, worker: WorkerProcess, msg: dict[str, Any]) -> None:
        kind = msg["kind"]
        if kind == "ready":
            worker.worker_id = msg["worker_id"]
            worker.ready.set()
        elif kind == "turn":
            self.progress.turn(msg["chat"], int(msg["turn"]), msg["outcome"])
            return
        elif kind == "chat_done":
            if self.progress.final(msg["chat"], int(msg["last_id"])):
                self.broadcast({"kind": "final", "chat": msg["chat"], "last_id": msg["last_id"]})
            return
        elif kind == "phase1":
            worker.phase1 = True
        elif kind == "done":
            worker.done = True
        elif kind == "report":
            worker.report = msg["report"]
        self.progress.bump()

    def broadcast(self, message: Mapping[str, Any]) -> None:
        for worker in self.current.values():
            worker.send(message)

    def all_done(self) -> bool:
        return all(w.done for w in self.current.values())

    async def go_after_phase1(self) -> None:
        """`go` once every replica's subscribers saw turn 1 over; or, should a status
        never reach some subscriber, `confirm_after_s` after every driver had it over."""
        chats = self.plan.chat_ids
        while not all(w.phase1 for w in self.current.values()):
            first_over = all((c, 1) in self.progress.turns for c in chats)
            with trio.move_on_after(self.fc.confirm_after_s if first_over else math.inf) as quiet:
                await self.progress.changed.wait()
            if quiet.cancelled_caught:
                logger.warning("phase 1 not seen by every subscriber: going on")
                break
        self.go_sent = True
        self.progress.went()
        self.broadcast({"kind": "go"})

    async def stop_all(self) -> None:
        """SIGTERM every live replica (a clean close hands its chats back), wait for its
        report and exit; kill what does not exit in time. Every process is reaped."""
        self.stopping = True
        for worker in self.current.values():
            if worker.alive:
                worker.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.fc.stop_timeout_s):
            for worker in self.current.values():
                await worker.exited.wait()
        for worker in self.current.values():
            if worker.alive:
                logger.warning("replica did not stop: killed", extra={"pid": worker.proc.pid})
                worker.proc.kill()
                await worker.exited.wait()

    async def finish_unfinished(self) -> None:
        def last_ids_sync(chats: Sequence[str]) -> dict[str, int]:
            with psycopg.connect(self.db.dsn, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT chat_id, max(id) FROM chat_messages"
                    " WHERE chat_id = ANY(%s) AND NOT deleted AND visibility <> 'model'"
                    " GROUP BY chat_id",
                    ([uuid.UUID(c) for c in chats],),
                ).fetchall()
            found = {str(r[0]): int(r[1]) for r in rows}
            return {c: found.get(c, 0) for c in chats}

        async def last_ids(chats: Sequence[str]) -> dict[str, int]:
            return await wait_for_database(functools.partial(last_ids_sync, chats), self.fc)

        def deliver(chat_id: str, last_id: int) -> None:
            self.broadcast({"kind": "final", "chat": chat_id, "last_id": last_id})

        await finish_unfinished(self.plan, self.progress, last_ids, deliver)
