"""The Server end to end with real workspace agents and with subagents (docs/spec.md §5 and §6).

A chat runs `execute` in a real agent; the workspace is rebuilt between turns
(new agent process, new build row) and the next turn switches to it and
persists the binding; the workspace is stopped and the turn ends without
hanging, the model seeing the NoWorkspaceAgent tool error. A root chat spawns
a subagent and waits for its report.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from chatd_trio.agent import dial_agent
from chatd_trio.agent.local import LocalProvisioner
from chatd_trio.config import AcquireConfig, Config, WorkspaceConfig
from chatd_trio.domain import ChatStatus, Role, ToolResultPart, stream_channel, text_of
from chatd_trio.models.base import PromptMessage
from chatd_trio.models.scripted import ScriptedModel, ScriptStep, text_step, tool_step
from chatd_trio.pubsub.memory import MemoryPubSub, QueueSubscription
from chatd_trio.server import Server
from chatd_trio.store.memory import MemoryStore
from chatd_trio.strategies import Strategies, SubagentWake
from tests.server_replica import until_statuses

OWNER = uuid.UUID(int=7)
CONFIG = Config(
    acquire=AcquireConfig(acquire_interval=0.2, heartbeat_interval=0.5, stale_after=30.0),
    workspace=WorkspaceConfig(dial_validation_delay=0.5),
)


def _last(prompt: Sequence[PromptMessage]) -> PromptMessage:
    return prompt[-1]


def execute_then_answer(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
    """Each user message asks for one `execute`; after its result the model answers."""
    last = _last(prompt)
    if last.role is Role.TOOL:
        (result,) = [p for p in last.parts if isinstance(p, ToolResultPart)]
        return text_step(f"saw: {json.dumps(result.result)}")
    # The latest user message (instruction files may follow it as system messages).
    command = next(text_of(m.parts) for m in reversed(prompt) if m.role is Role.USER)
    return tool_step([("execute", {"command": command})], call_id_prefix=f"c{index}")


def tool_results(messages: Sequence[object]) -> list[ToolResultPart]:
    out: list[ToolResultPart] = []
    for m in messages:
        out.extend(p for p in getattr(m, "parts", ()) if isinstance(p, ToolResultPart))
    return out


async def test_turns_execute_switch_after_rebuild_and_survive_a_stopped_workspace(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    model = ScriptedModel(execute_then_answer)
    async with trio.open_nursery() as nursery:
        provisioner = LocalProvisioner(store, nursery, tmp_path, config=CONFIG)
        ws = await provisioner.create(OWNER, "ws")
        first_agent = provisioner.running_agent(ws.id)
        assert first_agent is not None
        async with Server(
            store, MemoryPubSub(), model, CONFIG, dialer=dial_agent, provisioner=provisioner
        ) as server:
            chat = await server.create_chat(
                OWNER, "echo hello > f.txt && cat f.txt", title="ws chat", workspace_id=ws.id
            )
            async with server.subscribe(OWNER, chat.id) as sub:
                await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
            (first,) = tool_results(await store.messages_after(chat.id, 0))
            assert not first.is_error and first.result["exit_code"] == 0
            assert first.result["output"].strip() == "hello"
            bound = await store.get_chat(chat.id)
            assert bound.agent_id == first_agent.id  # lazily bound on the first turn

            # Rebuild: a new agent process and build; the old binding is stale.
            second_agent = await provisioner.start(ws.id)
            async with server.subscribe(OWNER, chat.id) as sub:
                await server.send_message(OWNER, chat.id, "cat f.txt")
                await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
            results = tool_results(await store.messages_after(chat.id, 0))
            assert not results[-1].is_error
            assert results[-1].result["output"].strip() == "hello"  # same directory
            rebound = await store.get_chat(chat.id)
            assert rebound.agent_id == second_agent.id
            ws_stats = server.stats().workspace
            # Turn 1: one dial, lazy bind. Turn 2: the stale dial fails fast, one
            # validation finds the new agent, one more dial, the binding is repaired.
            assert (ws_stats.dials, ws_stats.validations, ws_stats.switches) == (3, 1, 1)
            assert ws_stats.binding_updates == 2

            # A steady turn: the bound agent's row is known to the replica, none is read.
            lookups = server.stats().statements.get("GetWorkspaceAgentByID", 0)
            async with server.subscribe(OWNER, chat.id) as sub:
                await server.send_message(OWNER, chat.id, "cat f.txt")
                await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
            assert tool_results(await store.messages_after(chat.id, 0))[-1].result["exit_code"] == 0
            assert server.stats().statements.get("GetWorkspaceAgentByID", 0) == lookups
            assert server.stats().workspace.dials == 4

            # Stop: agent rows exist, nothing answers; the turn must not hang.
            await provisioner.stop(ws.id)
            async with server.subscribe(OWNER, chat.id) as sub:
                await server.send_message(OWNER, chat.id, "true")
                with trio.fail_after(15):
                    await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
            last = tool_results(await store.messages_after(chat.id, 0))[-1]
            assert last.is_error
            assert last.result["kind"] == "no_workspace_agent"
        await provisioner.aclose()


def parent_and_child(prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
    """The root spawns a child and waits; the child answers its prompt."""
    first_user = next(text_of(m.parts) for m in prompt if m.role is Role.USER)
    last = _last(prompt)
    if first_user.startswith("child:"):
        return text_step(f"report for {first_user[6:].strip()}")
    if last.role is not Role.TOOL:
        return tool_step([("spawn_agent", {"prompt": "child: task 42"})], call_id_prefix="s")
    (result,) = [p for p in last.parts if isinstance(p, ToolResultPart)]
    if result.name == "spawn_agent":
        return tool_step(
            [("wait_agent", {"chat_id": result.result["chat_id"]})], call_id_prefix="w"
        )
    return text_step(f"child said: {json.dumps(result.result)}")


async def test_a_root_chat_spawns_a_subagent_and_receives_its_report() -> None:
    store = MemoryStore()
    pubsub = MemoryPubSub()
    async with Server(store, pubsub, ScriptedModel(parent_and_child), CONFIG) as server:
        root = await server.create_chat(OWNER, "delegate please", title="root")
        async with server.subscribe(OWNER, root.id) as sub:
            await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
        (child,) = await store.child_chats(root.id)
        assert child.parent_chat_id == root.id and child.status is ChatStatus.WAITING
        results = tool_results(await store.messages_after(root.id, 0))
        wait = next(r for r in results if r.name == "wait_agent")
        assert not wait.is_error
        assert "report for task 42" in json.dumps(wait.result)
        stats = server.stats().subagents
        assert stats.spawned == 1
        assert stats.completed == 1
        # Woken by the child's notify, not by the 5 s fallback poll (or the child was
        # done at the wait's first check: no wake at all).
        assert stats.poll_wakes == 0
        assert stats.notify_wakes >= 1 or stats.checks == 1


class RecordingPubSub(MemoryPubSub):
    """A MemoryPubSub that remembers every channel subscribed to, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.channels: list[str] = []

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[QueueSubscription]:
        self.channels.append(channel)
        async with super().subscribe(channel) as sub:
            yield sub


async def test_with_the_poll_strategy_a_subagent_wait_never_listens_to_the_child() -> None:
    """`SubagentWake.POLL` (the baseline): the Server hands its subagent tools no pubsub,
    so the wait polls although the replica has one."""
    store = MemoryStore()
    pubsub = RecordingPubSub()
    strategies = Strategies(subagent_wake=SubagentWake.POLL)
    model = ScriptedModel(parent_and_child)
    async with Server(store, pubsub, model, CONFIG, strategies=strategies) as server:
        root = await server.create_chat(OWNER, "delegate please", title="root")
        async with server.subscribe(OWNER, root.id) as sub:
            await until_statuses(sub, [ChatStatus.RUNNING, ChatStatus.WAITING])
        (child,) = await store.child_chats(root.id)
        wait = next(
            r
            for r in tool_results(await store.messages_after(root.id, 0))
            if r.name == "wait_agent"
        )
        assert not wait.is_error
        assert "report for task 42" in json.dumps(wait.result)
        stats = server.stats().subagents
    assert stats.completed == 1
    assert stats.notify_wakes == stats.resync_wakes == 0
    # Only the child's own turn listened on its channel (its control listener).
    assert pubsub.channels.count(stream_channel(child.id)) == 1
