"""Store contract: chats, messages, the queue, edits and interrupts (docs/spec.md §1, 3.1)."""

from __future__ import annotations

import uuid

import pytest

from chatd_trio.config import RequestOptions
from chatd_trio.domain import (
    ChatStatus,
    NewMessage,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Visibility,
)
from chatd_trio.errors import (
    ChatNotFound,
    DecodeError,
    EditRefused,
    MessageNotFound,
    PayloadTooLarge,
    QueuedMessageNotFound,
    QueueFull,
)
from chatd_trio.store.base import Lease, Store, TurnOutcome
from chatd_trio.store.memory import MemoryStore
from tests.contract.conftest import MAX_QUEUED, new_chat, running_chat, text, texts

W1 = uuid.UUID(int=1)
W2 = uuid.UUID(int=2)


def test_memory_store_implements_the_port() -> None:
    store: Store = MemoryStore()
    assert isinstance(store, Store)


# -- create, get, list ----------------------------------------------------------


async def test_create_chat_starts_pending_with_first_user_message(store: Store) -> None:
    owner = uuid.uuid4()
    chat, msg = await store.create_chat(owner, "title", text("hi"), mcp_servers=["fs"])
    assert chat.status is ChatStatus.PENDING
    assert (chat.owner_id, chat.title, chat.mcp_servers) == (owner, "title", ("fs",))
    assert chat.worker_id is None and chat.parent_chat_id is None and chat.root_chat_id is None
    assert (msg.chat_id, msg.role, msg.parts, msg.deleted) == (
        chat.id,
        Role.USER,
        text("hi"),
        False,
    )
    assert await store.get_chat(chat.id) == chat
    assert await store.messages_after(chat.id, 0) == [msg]


async def test_system_prompt_is_model_only_and_first(store: Store) -> None:
    chat, msg = await new_chat(store, system_prompt="be brief")
    prompt = await store.prompt_messages(chat.id)
    assert [m.role for m in prompt] == [Role.SYSTEM, Role.USER]
    assert texts(prompt) == ["be brief", "hello"]
    assert prompt[0].id < msg.id
    assert await store.messages_after(chat.id, 0) == [msg]


async def test_model_options_are_kept_with_the_chat(store: Store) -> None:
    options = RequestOptions(
        temperature=0.2,
        max_tokens=512,
        stop=("END",),
        tool_choice={"type": "function", "function": {"name": "ls"}},
        reasoning_effort="high",
        extra_headers={"x-team": "a"},
        extra_body={"top_k": 20, "nested": [1, {"a": True}]},
    )
    chat, _ = await new_chat(store, model_options=options)
    assert chat.model_options == options
    assert (await store.get_chat(chat.id)).model_options == options
    (listed,) = await store.list_chats(chat.owner_id)
    assert listed.model_options == options
    (acquired,) = await store.acquire(W1, 10)
    assert acquired.model_options == options
    # None, and options that set nothing, are no options.
    plain, _ = await new_chat(store, model_options=RequestOptions())
    assert plain.model_options is None
    assert (await store.get_chat(plain.id)).model_options is None


async def test_model_options_that_are_not_json_are_refused(store: Store) -> None:
    owner = uuid.uuid4()
    with pytest.raises(DecodeError) as info:
        await store.create_chat(
            owner, "t", text("hi"), model_options=RequestOptions(extra_body={"x": {1, 2}})
        )
    assert info.value.field == "model_options"
    assert await store.list_chats(owner) == []


async def test_get_chat_unknown_raises(store: Store) -> None:
    with pytest.raises(ChatNotFound):
        await store.get_chat(uuid.uuid4())


async def test_list_chats_newest_first_and_only_the_owners(store: Store) -> None:
    owner = uuid.uuid4()
    first, _ = await new_chat(store, owner)
    await new_chat(store)  # someone else's
    second, _ = await new_chat(store, owner)
    assert [c.id for c in await store.list_chats(owner)] == [second.id, first.id]
    assert await store.list_chats(uuid.uuid4()) == []


async def test_message_ids_increase(store: Store) -> None:
    _, a = await new_chat(store)
    _, b = await new_chat(store)
    assert b.id > a.id


# -- send_message and the queue -------------------------------------------------------


async def test_send_to_waiting_chat_inserts_and_sets_pending(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.finish_turn(Lease.of(chat), TurnOutcome.DONE)
    res = await store.send_message(chat.id, text("again"), max_queued=MAX_QUEUED)
    assert res.queued is None and res.queue == ()
    assert res.message is not None and res.message.role is Role.USER
    assert res.chat.status is ChatStatus.PENDING
    assert texts(await store.messages_after(chat.id, 0)) == ["hello", "again"]


async def test_send_to_errored_chat_clears_the_error(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.finish_turn(Lease.of(chat), TurnOutcome.ERROR, "model exploded")
    res = await store.send_message(chat.id, text("retry"), max_queued=MAX_QUEUED)
    got = await store.get_chat(chat.id)
    assert res.message is not None
    assert got.status is ChatStatus.PENDING
    assert (got.last_error, got.worker_id, got.started_at, got.heartbeat_at) == (
        None,
        None,
        None,
        None,
    )


async def test_send_while_running_is_queued(store: Store) -> None:
    chat = await running_chat(store, W1)
    res = await store.send_message(chat.id, text("later"), max_queued=MAX_QUEUED)
    assert res.message is None and res.queued is not None
    assert res.queue == (res.queued,)
    assert res.chat.status is ChatStatus.RUNNING
    assert texts(await store.messages_after(chat.id, 0)) == ["hello"]
    assert await store.list_queued(chat.id) == [res.queued]


async def test_send_while_pending_is_queued(store: Store) -> None:
    chat, _ = await new_chat(store)
    res = await store.send_message(chat.id, text("later"), max_queued=MAX_QUEUED)
    assert res.message is None and res.queued is not None
    assert (await store.get_chat(chat.id)).status is ChatStatus.PENDING


async def test_send_is_queued_when_a_backlog_exists_even_if_waiting(store: Store) -> None:
    chat = await running_chat(store, W1)
    first = await store.send_message(chat.id, text("q1"), max_queued=MAX_QUEUED)
    await store.interrupt(chat.id)  # waiting, but the queue is still there
    assert (await store.get_chat(chat.id)).status is ChatStatus.WAITING
    res = await store.send_message(chat.id, text("q2"), max_queued=MAX_QUEUED)
    assert res.message is None and res.queued is not None
    assert [q.id for q in res.queue] == [first.queued.id, res.queued.id]  # type: ignore[union-attr]
    assert res.chat.status is ChatStatus.WAITING


async def test_queue_refuses_beyond_max_queued(store: Store) -> None:
    chat = await running_chat(store, W1)
    for i in range(MAX_QUEUED):
        await store.send_message(chat.id, text(f"q{i}"), max_queued=MAX_QUEUED)
    with pytest.raises(QueueFull):
        await store.send_message(chat.id, text("one too many"), max_queued=MAX_QUEUED)
    queue = await store.list_queued(chat.id)
    assert [q.parts for q in queue] == [text(f"q{i}") for i in range(MAX_QUEUED)]


async def test_send_to_unknown_chat_raises(store: Store) -> None:
    with pytest.raises(ChatNotFound):
        await store.send_message(uuid.uuid4(), text("x"), max_queued=MAX_QUEUED)


async def test_oversized_message_is_refused(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.finish_turn(Lease.of(chat), TurnOutcome.DONE)
    with pytest.raises(PayloadTooLarge):
        await store.send_message(chat.id, text("x" * (1024 * 1024)), max_queued=MAX_QUEUED)
    assert texts(await store.messages_after(chat.id, 0)) == ["hello"]


async def test_overlong_title_is_refused(store: Store) -> None:
    with pytest.raises(DecodeError):
        await store.create_chat(uuid.uuid4(), "t" * 10_000, text("hi"))
    assert await store.acquire(W1, 10) == []


async def test_promote_queued_when_not_running_inserts_now(store: Store) -> None:
    chat = await running_chat(store, W1)
    q1 = (await store.send_message(chat.id, text("q1"), max_queued=MAX_QUEUED)).queued
    q2 = (await store.send_message(chat.id, text("q2"), max_queued=MAX_QUEUED)).queued
    assert q1 is not None and q2 is not None
    await store.interrupt(chat.id)
    res = await store.promote_queued(chat.id, q2.id)
    assert res.message is not None and res.message.parts == text("q2")
    assert res.chat.status is ChatStatus.PENDING
    assert [q.id for q in res.queue] == [q1.id]
    assert [q.id for q in await store.list_queued(chat.id)] == [q1.id]


async def test_promote_queued_while_running_moves_it_to_the_front(store: Store) -> None:
    chat = await running_chat(store, W1)
    q1 = (await store.send_message(chat.id, text("q1"), max_queued=MAX_QUEUED)).queued
    q2 = (await store.send_message(chat.id, text("q2"), max_queued=MAX_QUEUED)).queued
    assert q1 is not None and q2 is not None
    res = await store.promote_queued(chat.id, q2.id)
    assert res.message is None
    assert [q.parts for q in res.queue] == [text("q2"), text("q1")]
    assert [q.parts for q in await store.list_queued(chat.id)] == [text("q2"), text("q1")]
    assert texts(await store.messages_after(chat.id, 0)) == ["hello"]
    fin = await store.finish_turn(Lease.of(chat), TurnOutcome.DONE)
    assert fin.promoted is not None and fin.promoted.parts == text("q2")


async def test_promote_or_delete_unknown_queued_message_raises(store: Store) -> None:
    chat, _ = await new_chat(store)
    with pytest.raises(QueuedMessageNotFound):
        await store.promote_queued(chat.id, 999_999)
    with pytest.raises(QueuedMessageNotFound):
        await store.delete_queued(chat.id, 999_999)


async def test_delete_queued_returns_the_rest(store: Store) -> None:
    chat = await running_chat(store, W1)
    q1 = (await store.send_message(chat.id, text("q1"), max_queued=MAX_QUEUED)).queued
    q2 = (await store.send_message(chat.id, text("q2"), max_queued=MAX_QUEUED)).queued
    assert q1 is not None and q2 is not None
    assert await store.delete_queued(chat.id, q1.id) == [q2]
    assert await store.list_queued(chat.id) == [q2]


async def test_queued_message_of_another_chat_cannot_be_deleted(store: Store) -> None:
    chat = await running_chat(store, W1)
    other, _ = await new_chat(store)
    q1 = (await store.send_message(chat.id, text("q1"), max_queued=MAX_QUEUED)).queued
    assert q1 is not None
    with pytest.raises(QueuedMessageNotFound):
        await store.delete_queued(other.id, q1.id)
    assert await store.list_queued(chat.id) == [q1]


# -- edit --------------------------------------------------------------------------


async def _chat_with_history(store: Store) -> tuple[uuid.UUID, list[int]]:
    """A running chat: user "u1", assistant "a1", user "u2" (queued → promoted), assistant "a2"."""
    chat = await running_chat(store, W1, first="u1")
    await store.persist_step(
        Lease.of(chat), [NewMessage(Role.ASSISTANT, (TextPart("a1"),), Visibility.BOTH)]
    )
    await store.send_message(chat.id, text("u2"), max_queued=MAX_QUEUED)
    await store.finish_turn(Lease.of(chat), TurnOutcome.DONE)
    (again,) = await store.acquire(W1, 1)
    await store.persist_step(
        Lease.of(again), [NewMessage(Role.ASSISTANT, (TextPart("a2"),), Visibility.BOTH)]
    )
    ids = [m.id for m in await store.messages_after(chat.id, 0)]
    assert texts(await store.messages_after(chat.id, 0)) == ["u1", "a1", "u2", "a2"]
    return chat.id, ids


async def test_edit_truncates_clears_queue_and_sets_pending(store: Store) -> None:
    chat_id, ids = await _chat_with_history(store)
    await store.send_message(chat_id, text("queued"), max_queued=MAX_QUEUED)
    res = await store.edit_message(chat_id, ids[2], text("u2 edited"))
    assert res.message.id > ids[-1] and res.message.role is Role.USER
    assert texts(await store.messages_after(chat_id, 0)) == ["u1", "a1", "u2 edited"]
    assert await store.list_queued(chat_id) == []
    got = await store.get_chat(chat_id)
    assert got.status is ChatStatus.PENDING and got.worker_id is None
    assert res.chat == got
    assert texts(await store.prompt_messages(chat_id)) == ["u1", "a1", "u2 edited"]


async def test_edit_of_first_message_replaces_everything(store: Store) -> None:
    chat_id, ids = await _chat_with_history(store)
    await store.edit_message(chat_id, ids[0], text("fresh start"))
    assert texts(await store.messages_after(chat_id, 0)) == ["fresh start"]


async def _snapshot(store: Store, chat_id: uuid.UUID) -> object:
    return (
        await store.get_chat(chat_id),
        await store.messages_after(chat_id, 0),
        await store.list_queued(chat_id),
    )


async def test_edit_of_missing_message_refused_and_changes_nothing(store: Store) -> None:
    chat_id, ids = await _chat_with_history(store)
    await store.send_message(chat_id, text("queued"), max_queued=MAX_QUEUED)
    before = await _snapshot(store, chat_id)
    with pytest.raises(MessageNotFound):
        await store.edit_message(chat_id, ids[-1] + 1000, text("nope"))
    assert await _snapshot(store, chat_id) == before


async def test_edit_of_assistant_message_refused_and_changes_nothing(store: Store) -> None:
    chat_id, ids = await _chat_with_history(store)
    before = await _snapshot(store, chat_id)
    with pytest.raises(EditRefused):
        await store.edit_message(chat_id, ids[1], text("nope"))
    assert await _snapshot(store, chat_id) == before


async def test_edit_of_other_chats_message_refused_and_changes_nothing(store: Store) -> None:
    chat_id, _ = await _chat_with_history(store)
    other, other_msg = await new_chat(store)
    before = await _snapshot(store, chat_id)
    before_other = await _snapshot(store, other.id)
    with pytest.raises(EditRefused):
        await store.edit_message(chat_id, other_msg.id, text("nope"))
    assert await _snapshot(store, chat_id) == before
    assert await _snapshot(store, other.id) == before_other


async def test_edit_of_deleted_message_refused(store: Store) -> None:
    chat_id, ids = await _chat_with_history(store)
    await store.edit_message(chat_id, ids[0], text("fresh start"))
    before = await _snapshot(store, chat_id)
    with pytest.raises(EditRefused):
        await store.edit_message(chat_id, ids[2], text("nope"))
    assert await _snapshot(store, chat_id) == before


async def test_edit_in_unknown_chat_raises(store: Store) -> None:
    with pytest.raises(ChatNotFound):
        await store.edit_message(uuid.uuid4(), 1, text("x"))


# -- interrupt ---------------------------------------------------------------------


async def test_interrupt_running_sets_waiting_and_clears_worker(store: Store) -> None:
    chat = await running_chat(store, W1)
    got = await store.interrupt(chat.id)
    assert got.status is ChatStatus.WAITING
    assert (got.worker_id, got.started_at, got.heartbeat_at) == (None, None, None)
    assert await store.get_chat(chat.id) == got


async def test_interrupt_pending_changes_nothing(store: Store) -> None:
    chat, _ = await new_chat(store)
    got = await store.interrupt(chat.id)
    assert got.status is ChatStatus.PENDING
    assert await store.get_chat(chat.id) == chat


async def test_interrupt_keeps_the_queue(store: Store) -> None:
    chat = await running_chat(store, W1)
    queued = (await store.send_message(chat.id, text("q"), max_queued=MAX_QUEUED)).queued
    await store.interrupt(chat.id)
    assert await store.list_queued(chat.id) == [queued]


async def test_interrupt_of_errored_chat_sets_waiting_and_clears_the_error(store: Store) -> None:
    chat = await running_chat(store, W1)
    await store.finish_turn(Lease.of(chat), TurnOutcome.ERROR, "boom")
    got = await store.interrupt(chat.id)
    assert (got.status, got.last_error) == (ChatStatus.WAITING, None)


async def test_interrupt_unknown_chat_raises(store: Store) -> None:
    with pytest.raises(ChatNotFound):
        await store.interrupt(uuid.uuid4())


# -- reads: messages_after, prompt_messages, latest_assistant_text ----------------------


async def test_messages_after_filters_visibility_deleted_and_cursor(store: Store) -> None:
    chat = await running_chat(store, W1, first="u1")
    user_only, model_only, both = await store.persist_step(
        Lease.of(chat),
        [
            NewMessage(Role.ASSISTANT, (TextPart("for the user"),), Visibility.USER),
            NewMessage(Role.ASSISTANT, (TextPart("for the model"),), Visibility.MODEL),
            NewMessage(Role.ASSISTANT, (TextPart("for both"),), Visibility.BOTH),
        ],
    )
    assert [m.id for m in await store.messages_after(chat.id, 0)][1:] == [user_only.id, both.id]
    assert await store.messages_after(chat.id, user_only.id) == [both]
    assert await store.messages_after(chat.id, both.id) == []
    assert model_only not in await store.messages_after(chat.id, 0)
    assert [m.id for m in await store.prompt_messages(chat.id)][1:] == [model_only.id, both.id]


async def test_messages_after_of_unknown_chat_is_empty(store: Store) -> None:
    assert await store.messages_after(uuid.uuid4(), 0) == []


def _compaction(summary: str) -> list[NewMessage]:
    return [
        NewMessage(Role.USER, (TextPart(summary),), Visibility.MODEL, compressed=True),
        NewMessage(
            Role.ASSISTANT,
            (ToolCallPart("c", "chat_summarized", "{}"),),
            Visibility.USER,
            compressed=True,
        ),
        NewMessage(
            Role.TOOL,
            (ToolResultPart("c", "chat_summarized", {"summary": summary}),),
            Visibility.USER,
            compressed=True,
        ),
    ]


async def test_prompt_messages_starts_at_the_latest_summary(store: Store) -> None:
    chat, _ = await new_chat(store, first="u1", system_prompt="sys")
    (chat,) = await store.acquire(W1, 1)
    step = [NewMessage(Role.ASSISTANT, (TextPart("a1"),))]
    await store.persist_step(Lease.of(chat), step)
    await store.persist_compaction(Lease.of(chat), _compaction("summary one"))
    await store.persist_step(Lease.of(chat), [NewMessage(Role.ASSISTANT, (TextPart("a2"),))])
    assert texts(await store.prompt_messages(chat.id)) == ["sys", "summary one", "a2"]

    await store.persist_compaction(Lease.of(chat), _compaction("summary two"))
    await store.persist_step(Lease.of(chat), [NewMessage(Role.ASSISTANT, (TextPart("a3"),))])
    prompt = await store.prompt_messages(chat.id)
    assert texts(prompt) == ["sys", "summary two", "a3"]
    assert [m.compressed for m in prompt] == [False, True, False]

    visible = await store.messages_after(chat.id, 0)
    assert "summary one" not in texts(visible)  # the hidden summary is model-only
    assert sum(1 for m in visible if m.compressed) == 4  # two visible call/result pairs


async def test_prompt_messages_without_compaction_is_the_model_visible_history(
    store: Store,
) -> None:
    chat_id, _ = await _chat_with_history(store)
    assert texts(await store.prompt_messages(chat_id)) == ["u1", "a1", "u2", "a2"]


async def test_latest_assistant_text_skips_blank_and_hidden(store: Store) -> None:
    chat = await running_chat(store, W1)
    assert await store.latest_assistant_text(chat.id) is None
    await store.persist_step(
        Lease.of(chat),
        [
            NewMessage(Role.ASSISTANT, (TextPart("the report"),)),
            NewMessage(Role.ASSISTANT, (TextPart("  \n"),)),
            NewMessage(Role.ASSISTANT, (TextPart("model only"),), Visibility.MODEL),
            NewMessage(Role.ASSISTANT, (ToolCallPart("c", "t", "{}"),)),
            NewMessage(Role.USER, (TextPart("user text"),)),
        ],
    )
    assert await store.latest_assistant_text(chat.id) == "the report"


async def test_edit_of_a_pending_chat_returns_the_row_with_its_queue_cleared(store: Store) -> None:
    chat, first = await new_chat(store)
    for s in ("q1", "q2"):
        await store.send_message(chat.id, text(s), max_queued=MAX_QUEUED)
    assert (await store.get_chat(chat.id)).queued == 2
    res = await store.edit_message(chat.id, first.id, text("edited"))
    assert res.chat.status is ChatStatus.PENDING and res.chat.queued == 0
    assert res.chat == await store.get_chat(chat.id)


# -- ids from an untyped caller ------------------------------------------------------------

_MALFORMED_IDS: list[object] = ["not-a-uuid", "", 7, None, b"\x00" * 16, "12345678-1234"]


@pytest.mark.parametrize("bad", _MALFORMED_IDS, ids=repr)
async def test_malformed_chat_id_is_a_decode_error_on_every_store(
    store: Store, bad: object
) -> None:
    """A malformed id is the same `DecodeError` naming the field on both stores (not
    `ChatNotFound` on one and a database error on the other), and nothing is written."""
    chat, _ = await new_chat(store)
    before = await store.messages_after(chat.id, 0)
    calls = {
        "get_chat": lambda: store.get_chat(bad),  # type: ignore[arg-type]
        "messages_after": lambda: store.messages_after(bad, 0),  # type: ignore[arg-type]
        "send_message": lambda: store.send_message(bad, text("x"), max_queued=MAX_QUEUED),  # type: ignore[arg-type]
        "interrupt": lambda: store.interrupt(bad),  # type: ignore[arg-type]
        "list_queued": lambda: store.list_queued(bad),  # type: ignore[arg-type]
        "list_chats": lambda: store.list_chats(bad),  # type: ignore[arg-type]
    }
    for name, call in calls.items():
        with pytest.raises(DecodeError) as info:
            await call()
        assert info.value.field in ("chat_id", "owner_id"), name
    with pytest.raises(DecodeError) as row:
        await store.messages_after(chat.id, "1")  # type: ignore[arg-type]
    assert row.value.field == "after_id"
    assert await store.messages_after(chat.id, 0) == before


async def test_a_chat_id_given_as_text_finds_the_chat_on_every_store(store: Store) -> None:
    chat, msg = await new_chat(store)
    assert await store.get_chat(str(chat.id)) == chat  # type: ignore[arg-type]
    assert await store.messages_after(str(chat.id), 0) == [msg]  # type: ignore[arg-type]
    with pytest.raises(ChatNotFound):
        await store.get_chat(str(uuid.uuid4()))  # type: ignore[arg-type]
