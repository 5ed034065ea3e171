"""Store contract: workspaces, builds, agents, chat binding, and the subagent tree
(docs/spec.md §5 and §6)."""

from __future__ import annotations

import uuid

import pytest

from chatd_trio.errors import ChatNotFound, NotFound
from chatd_trio.store.base import Store
from tests.contract.conftest import new_chat


async def test_workspace_roundtrip(store: Store) -> None:
    owner = uuid.uuid4()
    ws = await store.create_workspace(owner, "dev box")
    assert (ws.owner_id, ws.name) == (owner, "dev box")
    assert await store.get_workspace(ws.id) == ws
    assert await store.get_workspace(uuid.uuid4()) is None


async def test_build_numbers_increase_per_workspace(store: Store) -> None:
    ws = await store.create_workspace(uuid.uuid4(), "a")
    other = await store.create_workspace(uuid.uuid4(), "b")
    b1 = await store.create_build(ws.id)
    b2 = await store.create_build(ws.id)
    o1 = await store.create_build(other.id)
    assert (b1.build_number, b2.build_number, o1.build_number) == (1, 2, 1)
    assert b1.workspace_id == ws.id


async def test_build_or_agent_for_unknown_parent_raises(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.create_build(uuid.uuid4())
    with pytest.raises(NotFound):
        await store.create_agent(uuid.uuid4(), "main", "127.0.0.1:1", "tok")


async def test_latest_build_agents_returns_only_the_newest_build(store: Store) -> None:
    ws = await store.create_workspace(uuid.uuid4(), "w")
    assert await store.latest_build_agents(ws.id) == []  # no build at all
    old = await store.create_build(ws.id)
    await store.create_agent(old.id, "old", "127.0.0.1:1", "t0")
    new = await store.create_build(ws.id)
    assert await store.latest_build_agents(ws.id) == []  # newest build has no agents: stopped
    a1 = await store.create_agent(new.id, "first", "127.0.0.1:2", "t1", "/home")
    a2 = await store.create_agent(new.id, "second", "127.0.0.1:3", "t2")
    assert await store.latest_build_agents(ws.id) == [a1, a2]
    assert (a1.build_id, a1.workspace_id, a1.directory, a1.token) == (new.id, ws.id, "/home", "t1")
    assert await store.agent_by_id(a1.id) == a1
    assert await store.agent_by_id(uuid.uuid4()) is None
    assert await store.latest_build_agents(uuid.uuid4()) == []


async def test_update_binding(store: Store) -> None:
    ws = await store.create_workspace(uuid.uuid4(), "w")
    build = await store.create_build(ws.id)
    agent = await store.create_agent(build.id, "main", "127.0.0.1:1", "tok")
    chat, _ = await new_chat(store)
    assert (chat.workspace_id, chat.build_id, chat.agent_id) == (None, None, None)
    await store.update_binding(chat.id, ws.id, build.id, agent.id)
    got = await store.get_chat(chat.id)
    assert (got.workspace_id, got.build_id, got.agent_id) == (ws.id, build.id, agent.id)
    assert got.status is chat.status
    await store.update_binding(chat.id, ws.id, None, None)
    got = await store.get_chat(chat.id)
    assert (got.workspace_id, got.build_id, got.agent_id) == (ws.id, None, None)
    with pytest.raises(ChatNotFound):
        await store.update_binding(uuid.uuid4(), None, None, None)


async def test_create_chat_with_binding(store: Store) -> None:
    ws = await store.create_workspace(uuid.uuid4(), "w")
    build = await store.create_build(ws.id)
    agent = await store.create_agent(build.id, "main", "127.0.0.1:1", "tok")
    chat, _ = await new_chat(store, workspace_id=ws.id, build_id=build.id, agent_id=agent.id)
    got = await store.get_chat(chat.id)
    assert (got.workspace_id, got.build_id, got.agent_id) == (ws.id, build.id, agent.id)


async def test_child_chats_and_parent_of(store: Store) -> None:
    owner = uuid.uuid4()
    root, _ = await new_chat(store, owner)
    c1, _ = await new_chat(store, owner, parent_chat_id=root.id)
    c2, _ = await new_chat(store, owner, parent_chat_id=root.id)
    grandchild, _ = await new_chat(store, owner, parent_chat_id=c1.id)
    assert (c1.parent_chat_id, c1.root_chat_id) == (root.id, root.id)
    assert (grandchild.parent_chat_id, grandchild.root_chat_id) == (c1.id, root.id)
    assert [c.id for c in await store.child_chats(root.id)] == [c1.id, c2.id]
    assert [c.id for c in await store.child_chats(c1.id)] == [grandchild.id]
    assert await store.child_chats(c2.id) == []
    assert await store.parent_of(grandchild.id) == c1.id
    assert await store.parent_of(c1.id) == root.id
    assert await store.parent_of(root.id) is None
    with pytest.raises(ChatNotFound):
        await store.parent_of(uuid.uuid4())


async def test_child_of_unknown_parent_is_refused(store: Store) -> None:
    with pytest.raises(ChatNotFound):
        await new_chat(store, parent_chat_id=uuid.uuid4())
    assert await store.acquire(uuid.uuid4(), 10) == []
