"""Store contract: an acquisition loads the prompt of each chat it claims
(`acquire(prompts=True)`, then `cached_prompt(lease)`), reading only what the user
wrote since the replica's own last turn of the chat, and the whole history when
anything else happened in between. Whatever the path, the prompt is exactly what
`prompt_messages` returns.
"""

from __future__ import annotations

import uuid

from chatd_trio.domain import Message, NewMessage, Role, TextPart, ToolCallPart, Visibility
from chatd_trio.store.base import Lease, Store, TurnOutcome
from tests.contract.conftest import MAX_QUEUED, text, texts
from tests.contract.test_store_chats import _compaction

W1 = uuid.UUID(int=1)
OWNER = uuid.UUID(int=7)


def say(s: str, visibility: Visibility = Visibility.BOTH) -> list[NewMessage]:
    return [NewMessage(Role.ASSISTANT, (TextPart(s),), visibility)]


async def claim(store: Store) -> tuple[Lease, list[Message], dict[str, int]]:
    """Acquire the one pending chat with its prompt: its lease, the prompt, and the
    prompt statements that cost."""
    before = store.statement_counts()
    (chat,) = await store.acquire(W1, 1, prompts=True)
    after = store.statement_counts()
    spent = {
        name: after.get(name, 0) - before.get(name, 0)
        for name in ("GetPromptTails", "GetPromptMessages")
    }
    lease = Lease.of(chat)
    prompt = store.cached_prompt(lease)
    assert prompt is not None
    assert prompt == await store.prompt_messages(chat.id)
    return lease, prompt, {k: v for k, v in spent.items() if v}


async def turn(store: Store, lease: Lease, answer: str) -> None:
    """One turn's writes: a tool step, then the answer with the finish."""
    step = [
        NewMessage(Role.ASSISTANT, (ToolCallPart("c", "t", "{}"),), Visibility.BOTH),
        NewMessage(Role.SYSTEM, (TextPart("model only"),), Visibility.MODEL),
    ]
    await store.persist_step(lease, step)
    fin = await store.finish_turn(lease, TurnOutcome.DONE, messages=say(answer))
    assert fin.changed


async def test_a_steady_turn_reads_only_the_new_message(store: Store) -> None:
    chat, _ = await store.create_chat(OWNER, "t", text("u1"), system_prompt="sys")
    lease, prompt, spent = await claim(store)
    # Nothing written by a run yet: the tail is the whole history, no second read.
    assert texts(prompt) == ["sys", "u1"] and spent == {"GetPromptTails": 1}
    await turn(store, lease, "a1")
    await store.send_message(chat.id, text("u2"), max_queued=MAX_QUEUED, owner_id=OWNER)
    lease, prompt, spent = await claim(store)
    assert texts(prompt) == ["sys", "u1", "", "model only", "a1", "u2"]
    assert spent == {"GetPromptTails": 1}
    # The run's writes extend it: the turn's first load needs no read either.
    await store.persist_step(lease, say("a2"))
    cached = store.cached_prompt(lease)
    assert cached == await store.prompt_messages(chat.id)
    assert texts(cached or [])[-1] == "a2"


async def test_a_prompt_is_only_for_the_run_that_acquired_it(store: Store) -> None:
    await store.create_chat(OWNER, "t", text("u1"))
    lease, _, _ = await claim(store)
    assert store.cached_prompt(Lease(lease.chat_id, lease.worker_id, lease.token + 1)) is None
    assert store.cached_prompt(Lease(uuid.uuid4(), lease.worker_id, lease.token)) is None


async def test_an_edit_makes_the_next_acquisition_read_the_whole_prompt(store: Store) -> None:
    chat, first = await store.create_chat(OWNER, "t", text("u1"))
    lease, _, _ = await claim(store)
    await turn(store, lease, "a1")
    sent = await store.send_message(chat.id, text("u2"), max_queued=MAX_QUEUED)
    assert sent.message is not None
    lease, _, _ = await claim(store)
    await turn(store, lease, "a2")
    await store.edit_message(chat.id, sent.message.id, text("u2 edited"), owner_id=OWNER)
    _, prompt, spent = await claim(store)
    assert texts(prompt) == ["u1", "", "model only", "a1", "u2 edited"]
    assert spent == {"GetPromptTails": 1, "GetPromptMessages": 1}
    # An edit of the first message leaves nothing a run wrote: the tail is all there is.
    await store.edit_message(chat.id, first.id, text("u1 edited"), owner_id=OWNER)
    _, prompt, spent = await claim(store)
    assert texts(prompt) == ["u1 edited"] and spent == {"GetPromptTails": 1}


async def test_a_compaction_makes_the_next_acquisition_read_the_whole_prompt(
    store: Store,
) -> None:
    chat, _ = await store.create_chat(OWNER, "t", text("u1"), system_prompt="sys")
    lease, _, _ = await claim(store)
    await store.persist_step(lease, say("a1"))
    await store.persist_compaction(lease, _compaction("summary"))
    assert store.cached_prompt(lease) is None
    await store.finish_turn(lease, TurnOutcome.DONE, messages=say("a2"))
    await store.send_message(chat.id, text("u2"), max_queued=MAX_QUEUED)
    _, prompt, spent = await claim(store)
    assert texts(prompt) == ["sys", "summary", "a2", "u2"]
    assert spent == {"GetPromptTails": 1, "GetPromptMessages": 1}


async def test_a_promoted_message_is_part_of_the_cached_prompt(store: Store) -> None:
    chat, _ = await store.create_chat(OWNER, "t", text("u1"))
    lease, _, _ = await claim(store)
    await store.send_message(chat.id, text("queued"), max_queued=MAX_QUEUED)
    fin = await store.finish_turn(lease, TurnOutcome.DONE, messages=say("a1"))
    assert fin.promoted is not None
    _, prompt, _ = await claim(store)
    assert texts(prompt) == ["u1", "a1", "queued"]


async def test_prompts_of_several_claims_are_read_together(store: Store) -> None:
    a, _ = await store.create_chat(OWNER, "a", text("a1"))
    b, _ = await store.create_chat(OWNER, "b", text("b1"))
    before = store.statement_counts()
    claimed = await store.acquire(W1, 10, prompts=True)
    after = store.statement_counts()
    assert {c.id for c in claimed} == {a.id, b.id}
    for chat in claimed:
        assert store.cached_prompt(Lease.of(chat)) == await store.prompt_messages(chat.id)
    assert after["GetPromptTails"] - before.get("GetPromptTails", 0) == 1
    assert await store.acquire(W1, 10, prompts=True) == []
