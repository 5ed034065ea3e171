"""Store contract: statement accounting. Both adapters run one fixed sequence and must
report exactly the same counts per canonical statement name."""

from __future__ import annotations

import uuid

import pytest

from chatd_trio.domain import NewMessage, Role, TextPart
from chatd_trio.errors import MessageNotFound, OwnershipLost, PermissionDenied, PersistRefused
from chatd_trio.store.base import STATEMENTS, Lease, Store, TurnOutcome
from tests.contract.conftest import MAX_QUEUED, text

W1 = uuid.UUID(int=1)

EXPECTED = {
    "InsertWorkspace": 1,
    "InsertWorkspaceBuild": 1,
    "InsertWorkspaceAgent": 1,
    "GetWorkspaceAgentsInLatestBuild": 1,
    "InsertChat": 2,
    # Was 8: a pipelined write sends its effects with its guard read, gated on the guard
    # (docs/architecture.md): a guard miss, a replay or a refusal runs them as no-ops.
    "InsertChatMessages": 13,
    "GetChatByID": 2,
    "AcquireChats": 2,
    # HeartbeatChat (was 1) is gone: a heartbeat is a guarded write (lock, read, UpdateChat).
    "LockChatForUpdate": 23,  # was 14: +1 heartbeat, +8 guard misses ("miss" below)
    "GetChatForWrite": 23,  # new: every guarded write reads the locked row and queue length
    # Was 8: the guard reads the queue length with the row; a send that inserts reads no queue.
    "GetQueuedMessages": 7,
    "InsertQueuedMessage": 3,
    # Was 2: only a finish that finds a queue pops (the old one popped on every done finish).
    "PopQueuedMessage": 1,
    # Was UpdateChatStatus 6: +1 heartbeat, -2 pending edit/promote keep the row; then
    # 5 -> 10: the no-op updates of pipelined writes whose guard missed.
    "UpdateChat": 10,
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
    assert set(EXPECTED) | set(EXPECTED_FENCED) <= set(STATEMENTS)


async def test_fixed_sequence_counts(store: Store) -> None:
    assert store.statement_counts() == {} or not any(store.statement_counts().values())
    owner = uuid.uuid4()
    ws = await store.create_workspace(owner, "w")
    build = await store.create_build(ws.id)
    agent = await store.create_agent(build.id, "main", "127.0.0.1:1", "tok")
    await store.latest_build_agents(ws.id)
    root, first = await store.create_chat(owner, "root", text("u1"), system_prompt="sys")
    child, _ = await store.create_chat(owner, "child", text("c1"), parent_chat_id=root.id)
    (running,) = await store.acquire(W1, 1)
    lease = Lease.of(running)
    await store.heartbeat(lease)
    await store.send_message(root.id, text("queued"), max_queued=MAX_QUEUED)  # miss: running
    await store.persist_step(lease, [NewMessage(Role.ASSISTANT, (TextPart("a1"),))])
    await store.finish_turn(lease, TurnOutcome.DONE)  # miss: a queue; promotes "queued"
    leases = {c.id: Lease.of(c) for c in await store.acquire(W1, 10)}
    assert set(leases) == {root.id, child.id}
    await store.finish_turn(leases[root.id], TurnOutcome.DONE)  # nothing queued: waiting
    await store.send_message(root.id, text("u2"), max_queued=MAX_QUEUED)  # inserted
    await store.messages_after(root.id, 0)
    await store.prompt_messages(root.id)
    await store.get_chat(root.id)
    await store.list_chats(owner)
    await store.interrupt(child.id)
    await store.edit_message(root.id, first.id, text("u1 edited"))  # miss: pending
    # The child was interrupted: its run still writes the interrupted partial (miss: waiting).
    await store.persist_step(leases[child.id], [NewMessage(Role.ASSISTANT, (TextPart("r"),))])
    await store.latest_assistant_text(child.id)
    await store.recover_stale(3600)
    await store.release([leases[root.id]])  # root's run finished: a stale lease, no change
    await store.update_binding(root.id, ws.id, build.id, agent.id)
    await store.agent_by_id(agent.id)
    await store.get_workspace(ws.id)
    await store.child_chats(root.id)
    await store.parent_of(child.id)
    q = (await store.send_message(root.id, text("q1"), max_queued=MAX_QUEUED)).queued  # miss
    assert q is not None
    await store.delete_queued(root.id, q.id)
    q = (await store.send_message(root.id, text("q2"), max_queued=MAX_QUEUED)).queued  # miss
    assert q is not None
    await store.promote_queued(root.id, q.id)  # miss; root is pending, not running: inserted
    await store.list_queued(root.id)
    with pytest.raises(MessageNotFound):
        await store.edit_message(root.id, 10**9, text("x"))  # miss, then not found
    with pytest.raises(PersistRefused):
        await store.persist_step(leases[root.id], [NewMessage(Role.ASSISTANT, (TextPart("x"),))])
    assert not (await store.finish_turn(leases[root.id], TurnOutcome.DONE)).changed

    counts = {name: n for name, n in store.statement_counts().items() if n}
    assert counts == EXPECTED


# What fencing, replays and completed turns cost, per statement (docs/spec.md §1).
EXPECTED_FENCED = {
    "InsertChat": 1,
    # The first message, the step, the answer with its finish, u2; and the no-op inserts
    # of the replays, the refused step and finish, the late finish and a refused send.
    "InsertChatMessages": 9,
    "AcquireChats": 1,
    "LockChatForUpdate": 14,  # one per guarded write attempt, refused or replayed ones too
    "GetChatForWrite": 14,
    "GetChatMessagesByOp": 3,  # the replayed step, the replayed finish, the late finish
    # Heartbeat, guarded binding, finish, the send; interrupting a pending chat writes
    # nothing; plus the no-op updates of the writes that were refused or replayed.
    "UpdateChat": 9,
    "RecoverStaleChats": 1,
}


async def test_fenced_sequence_counts(store: Store) -> None:
    owner = uuid.uuid4()
    chat, _ = await store.create_chat(owner, "t", text("u1"))
    (running,) = await store.acquire(W1, 1)
    lease = Lease.of(running)
    assert await store.heartbeat(lease)  # 1 attempt
    op = uuid.uuid4()
    step = [NewMessage(Role.ASSISTANT, (TextPart("a1"),))]
    first = await store.persist_step(lease, step, op_id=op)  # 1
    assert await store.persist_step(lease, step, op_id=op) == first  # 1, replayed
    await store.update_binding(chat.id, None, None, None, lease=lease)  # 1, guarded
    with pytest.raises(ValueError):
        await store.finish_turn(lease, TurnOutcome.LOST)  # refused before any statement
    answer = [NewMessage(Role.ASSISTANT, (TextPart("answer"),))]
    fin_op = uuid.uuid4()
    fin = await store.finish_turn(lease, TurnOutcome.DONE, messages=answer, op_id=fin_op)  # 1
    again = await store.finish_turn(lease, TurnOutcome.DONE, messages=answer, op_id=fin_op)  # 1
    assert again.inserted == fin.inserted
    # The finished run is fenced: each write misses once, then the decision refuses it.
    assert not await store.heartbeat(lease)  # 1
    with pytest.raises(OwnershipLost):
        await store.persist_step(lease, step)  # 1
    with pytest.raises(OwnershipLost):
        await store.update_binding(chat.id, None, None, None, lease=lease)  # 1
    assert not (await store.finish_turn(lease, TurnOutcome.DONE, messages=answer)).changed  # 1
    # Decided on the caller's view of the row: no presumption to miss.
    sent = await store.send_message(chat.id, text("u2"), max_queued=MAX_QUEUED, view=fin.chat)
    assert sent.message is not None  # 1
    with pytest.raises(PermissionDenied):
        await store.interrupt(chat.id, owner_id=uuid.uuid4(), view=sent.chat)  # 1
    assert await store.interrupt(chat.id, owner_id=owner, view=sent.chat) == sent.chat  # 1
    assert await store.recover_stale(0) == []
    # A late retry of the finish, after the user wrote: still recognised by its messages.
    late = await store.finish_turn(lease, TurnOutcome.DONE, messages=answer, op_id=fin_op)  # 1
    assert late.changed and late.inserted == fin.inserted

    counts = {name: n for name, n in store.statement_counts().items() if n}
    assert counts == EXPECTED_FENCED
