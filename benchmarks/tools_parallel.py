"""Parallel vs sequential tool calls through the agent loop. Never run by the tests.

    python benchmarks/tools_parallel.py [--tools 5] [--sleep 0.2] [--turns 3]

One in-memory replica with a real local agent (LocalProvisioner + dial_agent). Every
turn asks for `--tools` calls of `execute` running `sleep <--sleep>` in one step,
then answers. Measures each turn from sending the user message to `waiting`, with
the step's calls concurrent (the default) and sequential (`ToolCalls.SEQUENTIAL`,
chatd_trio.strategies). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

import trio

from chatd_trio.agent import dial_agent
from chatd_trio.agent.local import LocalProvisioner
from chatd_trio.config import AcquireConfig, Config
from chatd_trio.domain import ChatStatus, StatusEvent
from chatd_trio.models.scripted import ScriptedModel, ToolsThenAnswer
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.server import Server
from chatd_trio.store.memory import MemoryStore
from chatd_trio.strategies import Strategies, ToolCalls


async def one_variant(parallel: bool, tools: int, sleep_s: float, turns: int) -> dict[str, Any]:
    config = Config(acquire=AcquireConfig(acquire_interval=0.05))
    strategies = Strategies(tool_calls=ToolCalls.CONCURRENT if parallel else ToolCalls.SEQUENTIAL)
    model = ScriptedModel(
        ToolsThenAnswer(calls=tools, tool_name="execute", arguments={"command": f"sleep {sleep_s}"})
    )
    store = MemoryStore()
    durations: list[float] = []
    with tempfile.TemporaryDirectory(prefix="chatd-tools-") as tmp:
        async with trio.open_nursery() as agents:
            provisioner = LocalProvisioner(store, agents, Path(tmp), config=config)
            owner = uuid.uuid4()
            ws = await provisioner.create(owner, "bench")
            async with Server(
                store, MemoryPubSub(), model, config, dialer=dial_agent, strategies=strategies
            ) as server:
                chat = await server.create_chat(owner, "warm up", workspace_id=ws.id)
                async with server.subscribe(owner, chat.id) as sub:
                    for turn in range(turns + 1):
                        started = trio.current_time()
                        if turn:
                            await server.send_message(owner, chat.id, "go")
                        seen_running = False
                        async for event in sub:
                            if isinstance(event, StatusEvent):
                                if event.status is ChatStatus.RUNNING:
                                    seen_running = True
                                elif event.status is ChatStatus.WAITING and seen_running:
                                    break
                        if turn:  # turn 0 also dials, reads instructions, binds
                            durations.append(trio.current_time() - started)
            await provisioner.aclose()
            agents.cancel_scope.cancel()
    return {
        "parallel_tools": parallel,
        "turn_s": [round(d, 3) for d in durations],
        "turn_median_s": round(statistics.median(durations), 3),
    }


async def main_async(args: argparse.Namespace) -> None:
    parallel = await one_variant(True, args.tools, args.sleep, args.turns)
    sequential = await one_variant(False, args.tools, args.sleep, args.turns)
    print(
        json.dumps(
            {
                "tools": args.tools,
                "tool_sleep_s": args.sleep,
                "parallel": parallel,
                "sequential": sequential,
                "speedup": round(sequential["turn_median_s"] / parallel["turn_median_s"], 2),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tools", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.2)
    parser.add_argument("--turns", type=int, default=3)
    trio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
