"""Store contract: every inserted message reports its visible predecessor (`prev_id`).

Ids are global and differ between adapters, so the scenario records each
predecessor by the text of the message it names ("-" for none, None for an
unknown/model-only one) and both adapters must produce the same literal list.
"""

from __future__ import annotations

import uuid

from chatd_trio.domain import Message, NewMessage, Role, TextPart, Visibility, text_of
from chatd_trio.store.base import Lease, Store, TurnOutcome
from tests.contract.conftest import MAX_QUEUED, text

W1 = uuid.UUID(int=1)


def _new(role: Role, s: str, visibility: Visibility = Visibility.BOTH) -> NewMessage:
    return NewMessage(role, (TextPart(s),), visibility)


async def test_inserted_messages_report_their_visible_predecessor(store: Store) -> None:
    by_id: dict[int, str] = {}
    seen: list[tuple[str, str | None]] = []

    def record(*messages: Message) -> None:
        for m in messages:
            by_id[m.id] = text_of(m.parts)
            if m.prev_id is None:
                label = None
            elif m.prev_id == 0:
                label = "-"
            else:
                label = by_id[m.prev_id]
            seen.append((text_of(m.parts), label))

    owner = uuid.uuid4()
    chat, first = await store.create_chat(owner, "t", text("u1"), system_prompt="sys")
    record(first)
    # Another chat's inserts interleave, so a predecessor is rarely id - 1.
    other, x1 = await store.create_chat(owner, "other", text("x1"))
    record(x1)
    # The other chat is pending too: acquire both, work on ours.
    leases = {c.id: Lease.of(c) for c in await store.acquire(W1, 2)}
    assert set(leases) == {chat.id, other.id}
    step = await store.persist_step(
        leases[chat.id],
        [
            _new(Role.ASSISTANT, "a1"),
            _new(Role.ASSISTANT, "model-only", Visibility.MODEL),
            _new(Role.TOOL, "t1", Visibility.USER),
        ],
    )
    record(*step)
    await store.persist_step(leases[other.id], [_new(Role.ASSISTANT, "x2")])
    sent = await store.send_message(chat.id, text("u2"), max_queued=MAX_QUEUED)
    assert sent.message is None and sent.queued is not None
    done = await store.finish_turn(leases[chat.id], TurnOutcome.DONE)
    assert done.promoted is not None
    record(done.promoted)
    (again,) = await store.acquire(W1, 1)
    assert again.id == chat.id
    compaction = await store.persist_compaction(
        Lease.of(again),
        [
            _new(Role.ASSISTANT, "c-call", Visibility.USER),
            _new(Role.TOOL, "c-result", Visibility.USER),
            NewMessage(Role.USER, (TextPart("summary"),), Visibility.MODEL, compressed=True),
        ],
    )
    record(*compaction)
    assert (await store.finish_turn(Lease.of(again), TurnOutcome.DONE)).promoted is None
    sent = await store.send_message(chat.id, text("u3"), max_queued=MAX_QUEUED)
    assert sent.message is not None
    record(sent.message)
    # The replacement follows the visible message before the edited one.
    edited = await store.edit_message(chat.id, done.promoted.id, text("u2-edited"))
    record(edited.message)
    queued = await store.send_message(chat.id, text("u4"), max_queued=MAX_QUEUED)
    assert queued.queued is not None
    promoted = await store.promote_queued(chat.id, queued.queued.id)
    assert promoted.message is not None
    record(promoted.message)

    assert seen == [
        ("u1", "-"),
        ("x1", "-"),
        ("a1", "u1"),
        ("model-only", None),
        ("t1", "a1"),
        ("u2", "t1"),
        ("c-call", "u2"),
        ("c-result", "c-call"),
        ("summary", None),
        ("u3", "c-result"),
        ("u2-edited", "t1"),
        ("u4", "u2-edited"),
    ]


async def test_prev_id_is_the_latest_visible_message_in_history(store: Store) -> None:
    chat, first = await store.create_chat(uuid.uuid4(), "t", text("u1"))
    (running,) = await store.acquire(W1, 1)
    lease = Lease.of(running)
    step = await store.persist_step(lease, [_new(Role.ASSISTANT, "a"), _new(Role.ASSISTANT, "b")])
    await store.finish_turn(lease, TurnOutcome.DONE)
    sent = await store.send_message(chat.id, text("u2"), max_queued=MAX_QUEUED)
    assert sent.message is not None
    history = await store.messages_after(chat.id, 0)
    assert [m.id for m in history] == [first.id, *(m.id for m in step), sent.message.id]
    inserted = [first, *step, sent.message]
    assert [m.prev_id for m in inserted] == [0, *(m.id for m in history[:-1])]
    # Reads need not know the predecessor; equality ignores it.
    assert history == inserted


def test_prev_id_json_round_trip_and_old_payloads() -> None:
    m = Message(1, uuid.uuid4(), Role.USER, (TextPart("hi"),), prev_id=0)
    data = m.to_json()
    assert data["prev_id"] == 0
    assert Message.from_json(data).prev_id == 0
    unknown = Message(2, m.chat_id, Role.USER, (TextPart("hi"),))
    old = unknown.to_json()
    assert "prev_id" not in old
    assert Message.from_json(old).prev_id is None
