"""Subagent wake-up: pubsub notify vs polling, on PostgreSQL. Never run by the tests.

    python benchmarks/subagent_wake.py [--dsn DSN] [--rounds 10] [--child-latency-ms 300]

One replica (PostgresStore + PostgresPubSub). Each round, a root chat spawns a
subagent and waits for it (`spawn_agent`, then `wait_agent`); the child answers after
`--child-latency-ms`. The wake latency is the time from the child's final answer
(its `created_at`) to the parent's `wait_agent` result (its `created_at`), both
PostgreSQL timestamps. `use_pubsub=False` (`SubagentWake.POLL`, chatd_trio.strategies)
polls every `SubagentConfig.poll_interval_no_pubsub`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import uuid
from collections.abc import Sequence
from typing import Any

import trio

from chatd_trio.config import AcquireConfig, Config, SubagentConfig
from chatd_trio.domain import Chat, ChatStatus, Role, ToolResultPart, text_of
from chatd_trio.models.base import PromptMessage
from chatd_trio.models.scripted import ScriptedModel, ScriptStep, text_step, tool_step
from chatd_trio.pubsub.auth import NotifyAuth
from chatd_trio.pubsub.postgres import PostgresPubSub
from chatd_trio.server import Server
from chatd_trio.store.postgres import PostgresStore
from chatd_trio.strategies import Strategies, SubagentWake

DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PARENT_PROMPT = "delegate"
CHILD_ANSWER = "child report"


def parent_step(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
    last = prompt[-1]
    if last.role is Role.TOOL:
        part = last.parts[0]
        assert isinstance(part, ToolResultPart)
        if part.name == "spawn_agent" and isinstance(part.result, dict):
            child = str(part.result["chat_id"])
            return tool_step([("wait_agent", {"chat_id": child})], call_id_prefix=f"w{index}")
        return text_step("parent done")
    return tool_step([("spawn_agent", {"prompt": "child task"})], call_id_prefix=f"s{index}")


async def one_variant(dsn: str, use_pubsub: bool, rounds: int, child_latency: float) -> Any:
    config = Config(acquire=AcquireConfig(acquire_interval=0.05))
    strategies = Strategies(subagent_wake=SubagentWake.NOTIFY if use_pubsub else SubagentWake.POLL)
    parent_model = ScriptedModel(parent_step)
    child_model = ScriptedModel(lambda p, i: text_step(CHILD_ANSWER, latency=child_latency))

    def model_for(chat: Chat) -> ScriptedModel:
        return child_model if chat.parent_chat_id is not None else parent_model

    wakes: list[float] = []
    async with (
        PostgresStore.open(dsn) as store,
        # One replica in this process: a notify key of this run.
        PostgresPubSub.open(dsn, auth=NotifyAuth.generate()) as pubsub,
        Server(store, pubsub, model_for, config, strategies=strategies) as server,
    ):
        owner = uuid.uuid4()
        for _ in range(rounds):
            chat = await server.create_chat(owner, PARENT_PROMPT)
            async with server.subscribe(owner, chat.id) as sub:
                with trio.fail_after(60):
                    async for event in sub:
                        status = getattr(event, "status", None)
                        if status is ChatStatus.WAITING:
                            break
            messages = await store.messages_after(chat.id, 0)
            wait_result = next(
                m
                for m in messages
                if m.role is Role.TOOL
                and isinstance(m.parts[0], ToolResultPart)
                and m.parts[0].name == "wait_agent"
            )
            (child,) = await store.child_chats(chat.id)
            child_final = [
                m
                for m in await store.messages_after(child.id, 0)
                if m.role is Role.ASSISTANT and text_of(m.parts) == CHILD_ANSWER
            ][-1]
            wakes.append((wait_result.created_at - child_final.created_at).total_seconds() * 1e3)
        stats = server.stats().subagents
    return {
        "use_pubsub": use_pubsub,
        "rounds": rounds,
        "wake_ms": [round(w, 3) for w in wakes],
        "wake_p50_ms": round(statistics.median(wakes), 3),
        "wake_max_ms": round(max(wakes), 3),
        "notify_wakes": stats.notify_wakes,
        "poll_wakes": stats.poll_wakes,
    }


async def main_async(args: argparse.Namespace) -> None:
    latency = args.child_latency_ms / 1000.0
    pubsub = await one_variant(args.dsn, True, args.rounds, latency)
    polling = await one_variant(args.dsn, False, args.rounds, latency)
    print(
        json.dumps(
            {
                "pubsub": pubsub,
                "polling": polling,
                "poll_interval_s": SubagentConfig().poll_interval_no_pubsub,
                "speedup_p50": round(polling["wake_p50_ms"] / max(pubsub["wake_p50_ms"], 1e-3), 2),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default=DSN)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--child-latency-ms", type=float, default=300.0)
    trio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
