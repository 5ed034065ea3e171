"""The worker process of a PostgreSQL run (`python -m chatd_trio.apps.scaletest worker`):
one replica, its subscribers and drivers, talking to the coordinator over the worker
channel (`chatd_trio.apps.channel`)."""

from __future__ import annotations

import os
import signal
from typing import Any

import trio

from chatd_trio.apps.channel import (
    emit,
    flush_every,
    stdin_lines,
)
from chatd_trio.apps.scaletest.plan import (
    Plan,
    pubsub_application_name,
    replica_config,
    replica_server,
    store_application_name,
)
from chatd_trio.apps.scaletest.runner import ReplicaRunner
from chatd_trio.config import (
    PostgresConfig,
    PubSubConfig,
    ScaleTestConfig,
)
from chatd_trio.pubsub.auth import NotifyAuth
from chatd_trio.pubsub.base import PubSub

__all__ = [
    "EmitEvents",
    "emit_event",
    "worker_main",
]


#: How long a progress event (a turn over, a chat done) may wait in the worker's buffer:
#: flushing each one woke the coordinator about a hundred times a second per replica, CPU
#: taken from the replicas under test. The steady wall time ends at most this much late.
PROGRESS_FLUSH_S = 0.02


def emit_event(kind: str, *, flush: bool = True, **fields: Any) -> None:
    emit({"kind": kind, **fields}, flush=flush)


class EmitEvents:
    def on_turn(self, chat_id: str, turn: int, outcome: str) -> None:
        emit_event("turn", flush=False, chat=chat_id, turn=turn, outcome=outcome)

    def on_chat_done(self, chat_id: str, last_id: int) -> None:
        emit_event("chat_done", flush=False, chat=chat_id, last_id=last_id)


async def worker_main() -> None:
    """One replica process: read the plan from stdin, serve, report on stdout.

    Stops on SIGTERM/SIGINT, `stop` or EOF on stdin: the Server closes (running chats
    go back to `pending`) and the report is written before the process exits.
    """
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore

    st = ScaleTestConfig()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        lines = stdin_lines()
        hello = await lines.receive()
        plan = Plan.from_json(hello["plan"])
        index = int(hello["index"])
        config = replica_config(plan, st)
        async with (
            PostgresStore.open(
                plan.dsn,
                max_size=st.pool_max_size,
                config=PostgresConfig(
                    application_name=store_application_name(plan, index),
                    count_round_trips=True,
                    max_writing=plan.max_writing,
                ),
            ) as store,
            PostgresPubSub.open(
                plan.dsn,
                config=PubSubConfig(
                    application_name=pubsub_application_name(plan, index), count_round_trips=True
                ),
                auth=NotifyAuth.from_key_text(hello["notify_key"]),
            ) as pubsub,
        ):
            pubsub_port: PubSub = pubsub
            async with replica_server(plan, store, pubsub_port, config, st) as server:
                runner = ReplicaRunner(server, index, plan, EmitEvents(), st=st)
                for chat_id, last_id in hello["finals"].items():
                    runner.set_final(chat_id, int(last_id))
                if hello["go"]:
                    runner.start_steady()
                emit_event("ready", worker_id=str(server.worker_id), pid=os.getpid())

                async def control(stop: trio.CancelScope) -> None:
                    try:
                        while True:
                            msg = await lines.receive()
                            if msg["kind"] == "go":
                                runner.start_steady()
                            elif msg["kind"] == "final":
                                runner.set_final(msg["chat"], int(msg["last_id"]))
                            elif msg["kind"] == "stop":
                                break
                    except EOFError:
                        pass
                    stop.cancel()

                async def announce() -> None:
                    await runner.phase1.wait()
                    emit_event("phase1")
                    await runner.done.wait()
                    emit_event("done")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(flush_every, PROGRESS_FLUSH_S)
                    nursery.start_soon(runner.run)
                    nursery.start_soon(control, nursery.cancel_scope)
                    nursery.start_soon(announce)
                    async for _ in signals:
                        break
                    nursery.cancel_scope.cancel()
            # Leaving the Server closed it: turns shut down, chats handed back.
            report = runner.report()
    emit_event("report", report=report)
