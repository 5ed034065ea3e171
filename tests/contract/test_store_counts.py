"""Store contract: statement accounting. Both adapters run one fixed sequence and must
report exactly the same counts per canonical statement name."""

from __future__ import annotations

import uuid

import pytest

from chatd_trio.domain import NewMessage, Role, TextPart
from chatd_trio.errors import MessageNotFound, PersistRefused
from chatd_trio.store.base import STATEMENTS, Store, TurnOutcome
from tests.contract.conftest import MAX_QUEUED, text

W1 = uuid.UUID(int=1)

EXPECTED = {
    "InsertWorkspace": 1,
    "InsertWorkspaceBuild": 1,
    "InsertWorkspaceAgent": 1,
    "GetWorkspaceAgentsInLatestBuild": 1,
    "InsertChat": 2,
    "InsertChatMessages": 8,
    "GetChatByID": 2,
    "AcquireChats": 2,
    "HeartbeatChat": 1,
    "LockChatForUpdate": 14,
    "GetQueuedMessages": 8,
    "InsertQueuedMessage": 3,
    "PopQueuedMessage": 2,
    "UpdateChatStatus": 6,
    "GetChatMessagesAfter": 1,
    "GetPromptMessages": 1,
    "GetChatsByOwner": 1,
    "GetChatMessageByID": 2,
    "SoftDeleteMessagesFrom": 1,
    "DeleteQueuedMessages": 1,
    "GetLatestAssistantText": 1,
    "RecoverStaleChats": 1,
    "ReleaseChats": 1,
    "UpdateChatBinding": 1,
    "GetWorkspaceAgentByID": 1,
    "GetWorkspaceByID": 1,
    "GetChildChats": 1,
    "GetChatParent": 1,
    "DeleteQueuedMessage": 2,
}


def test_expected_names_are_canonical() -> None:
    assert set(EXPECTED) <= set(STATEMENTS)


async def test_fixed_sequence_counts(store: Store) -> None:
    assert store.statement_counts() == {} or not any(store.statement_counts().values())
    owner = uuid.uuid4()
    ws = await store.create_workspace(owner, "w")
    build = await store.create_build(ws.id)
    agent = await store.create_agent(build.id, "main", "127.0.0.1:1", "tok")
    await store.latest_build_agents(ws.id)
    root, first = await store.create_chat(owner, "root", text("u1"), system_prompt="sys")
    child, _ = await store.create_chat(owner, "child", text("c1"), parent_chat_id=root.id)
    await store.acquire(W1, 1)
    await store.heartbeat(root.id, W1)
    await store.send_message(root.id, text("queued"), max_queued=MAX_QUEUED)
    await store.persist_step(root.id, W1, [NewMessage(Role.ASSISTANT, (TextPart("a1"),))])
    await store.finish_turn(root.id, W1, TurnOutcome.DONE)  # promotes "queued"
    assert len(await store.acquire(W1, 10)) == 2
    await store.finish_turn(root.id, W1, TurnOutcome.DONE)  # nothing queued: waiting
    await store.send_message(root.id, text("u2"), max_queued=MAX_QUEUED)  # inserted
    await store.messages_after(root.id, 0)
    await store.prompt_messages(root.id)
    await store.get_chat(root.id)
    await store.list_chats(owner)
    await store.interrupt(child.id)
    await store.edit_message(root.id, first.id, text("u1 edited"))
    await store.persist_step(child.id, W1, [NewMessage(Role.ASSISTANT, (TextPart("r"),))])
    await store.latest_assistant_text(child.id)
    await store.recover_stale(3600)
    await store.release(W1, [root.id])
    await store.update_binding(root.id, ws.id, build.id, agent.id)
    await store.agent_by_id(agent.id)
    await store.get_workspace(ws.id)
    await store.child_chats(root.id)
    await store.parent_of(child.id)
    q = (await store.send_message(root.id, text("q1"), max_queued=MAX_QUEUED)).queued
    assert q is not None
    await store.delete_queued(root.id, q.id)
    q = (await store.send_message(root.id, text("q2"), max_queued=MAX_QUEUED)).queued
    assert q is not None
    await store.promote_queued(root.id, q.id)  # root is pending, not running: inserted
    await store.list_queued(root.id)
    with pytest.raises(MessageNotFound):
        await store.edit_message(root.id, 10**9, text("x"))
    with pytest.raises(PersistRefused):
        await store.persist_step(root.id, W1, [NewMessage(Role.ASSISTANT, (TextPart("x"),))])
    assert not (await store.finish_turn(root.id, W1, TurnOutcome.DONE)).changed

    counts = {name: n for name, n in store.statement_counts().items() if n}
    assert counts == EXPECTED
