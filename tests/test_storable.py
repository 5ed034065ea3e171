"""The storable-value gate (docs/spec.md §7), alone and in front of both stores.

The property test holds the two stores to one verdict: whatever value a user
message or a turn's tool result carries, both stores refuse it or both store the
same thing, and a refused write leaves both as they were.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd_trio import storable
from chatd_trio.config import LimitsConfig
from chatd_trio.domain import (
    ContextFilePart,
    Message,
    NewMessage,
    Part,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Usage,
    Visibility,
    dumps,
    parts_to_json,
)
from chatd_trio.errors import ChatdError, DecodeError, PayloadTooLarge
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.storable import (
    MAX_DEPTH,
    storable_json,
    storable_message,
    storable_part,
    storable_parts,
    storable_text,
    storable_tool_result,
    stored_size,
)
from chatd_trio.store.base import Lease, Store, check_user_parts
from chatd_trio.store.memory import MemoryStore
from tests.contract.conftest import open_store

W = uuid.UUID(int=7)


def nested(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


# -- text ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stored", "replaced"),
    [
        ("plain", "plain", 0),
        ("a\x00b", "a\ufffdb", 1),
        ("\x00\x00", "\ufffd\ufffd", 2),
        ("é\ud800", "é\ufffd", 1),
        ("\udfffx\ud83d", "\ufffdx\ufffd", 2),
        # A pair spelled as two code points is the character a JSON reader makes of it.
        ("\ud83d\ude00", "😀", 0),
        ("\ud83d\ude00\ude00\x00", "😀\ufffd\ufffd", 2),
    ],
)
def test_nul_and_lone_surrogates_become_replacement_characters_and_are_counted(
    raw: str, stored: str, replaced: int
) -> None:
    cleaned = storable_text(raw)
    assert (cleaned.value, cleaned.replaced) == (stored, replaced)
    cleaned.value.encode("utf-8")  # storable: encodes strictly


def test_text_that_is_not_a_string_is_refused_naming_the_field() -> None:
    with pytest.raises(DecodeError, match="invalid title: expected a string, got bytes"):
        storable_text(b"x", "title")


# -- JSON values --------------------------------------------------------------------------


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "where", "reason"),
    [
        (float("nan"), "result", "nan is not a JSON number"),
        ({"a": [1, float("inf")]}, "result.a[1]", "inf is not a JSON number"),
        ({"a": {1, 2}}, "result.a", "not JSON: set"),
        ([b"raw"], "result[0]", "not JSON: bytes"),
        ({"k": Opaque()}, "result.k", "not JSON: Opaque"),
        ({1: "one"}, "result", "an object key is not a string: int"),
        (10**4300, "result", "more than 4300 digits"),
        (nested(1, MAX_DEPTH + 1), "result[0][0][0][0]...[0][0][0][0]", "deeper than 128"),
    ],
    ids=["nan", "inf", "set", "bytes", "object", "int-key", "huge-int", "too-deep"],
)
def test_what_is_not_storable_json_is_refused_naming_where(
    value: object, where: str, reason: str
) -> None:
    with pytest.raises(DecodeError) as info:
        storable_json(value, "result")
    assert info.value.field == where
    assert reason in info.value.reason


def test_json_comes_back_in_the_form_postgresql_returns() -> None:
    cleaned = storable_json(
        {"t": (1, 2), "f": [1e16, -0.0, 0.5, 2.5e-5], "s": "a\x00", "k\x00": True}
    )
    assert cleaned.value == {
        "t": [1, 2],
        "f": [10**16, 0.0, 0.5, 2.5e-5],
        "s": "a\ufffd",
        "k\ufffd": True,
    }
    assert type(cleaned.value["f"][0]) is int
    assert math.copysign(1, cleaned.value["f"][1]) == 1
    assert cleaned.replaced == 2


def test_nesting_up_to_the_cap_is_kept() -> None:
    value = nested("x", MAX_DEPTH)
    assert storable_json(value).value == value


def test_every_part_kind_passes_and_is_cleaned() -> None:
    agent = uuid.uuid4()
    parts: list[Part] = [
        TextPart("a\x00"),
        ToolCallPart("c\x00", "n", '{"x": "\ud800"}'),
        ToolResultPart("c", "n", {"out": "\x00"}),
        ContextFilePart(agent, "p", "bin\x00ary"),
    ]
    cleaned = storable_parts(parts)
    assert cleaned.replaced == 5
    assert "\\u0000" not in dumps(parts_to_json(cleaned.value))
    assert cleaned.value[3] == ContextFilePart(agent, "p", "bin\ufffdary")


def test_anything_but_a_part_is_refused_naming_its_index() -> None:
    with pytest.raises(DecodeError, match=r"invalid parts\[1\]: expected a message part, got dict"):
        storable_parts([TextPart("ok"), {"type": "text", "text": "no"}])
    with pytest.raises(DecodeError, match="expected a sequence of message parts, got str"):
        storable_parts("text")
    with pytest.raises(DecodeError, match=r"invalid part\.text: expected a string, got int"):
        storable_part(TextPart(5))  # type: ignore[arg-type]


def test_an_unstorable_tool_result_becomes_an_error_result_saying_why() -> None:
    part = ToolResultPart("call_1", "t", {"values": {1, 2}})
    result = storable_tool_result(part).value
    assert (result.call_id, result.name, result.is_error) == ("call_1", "t", True)
    assert result.result == {
        "error": "the tool's result cannot be stored: not JSON: set",
    }
    with pytest.raises(DecodeError):
        storable_parts([part])
    assert storable_parts([part], tool_results="error").value == (result,)


def test_a_tool_result_beyond_the_size_cap_becomes_an_error_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storable, "MAX_RESULT_BYTES", 100)
    fits = ToolResultPart("c", "t", {"out": "é" * 44})  # 88 bytes + {"out":""} = 98
    assert storable_tool_result(fits).value == fits
    result = storable_tool_result(ToolResultPart("c", "t", {"out": "é" * 46})).value
    assert result.is_error
    assert result.result["error"].endswith("102 bytes exceeds the limit of 100")


def test_usage_beyond_bigint_is_clamped_not_refused() -> None:
    huge = Usage(input_tokens=10**30, output_tokens=-(10**30))
    message = NewMessage(Role.ASSISTANT, (TextPart("x"),), usage=huge, context_limit=10**40)
    cleaned = storable_message(message).value
    assert cleaned.usage is not None
    assert (cleaned.usage.input_tokens, cleaned.usage.output_tokens) == (2**63 - 1, -(2**63))
    assert cleaned.context_limit == 2**63 - 1


# -- user messages: blank, size in stored bytes -------------------------------------------


@pytest.mark.parametrize("parts", [(), (TextPart(""),), (TextPart(" \n\t"), TextPart("\u3000"))])
def test_blank_user_messages_are_refused(parts: tuple[Part, ...]) -> None:
    with pytest.raises(DecodeError, match="blank"):
        check_user_parts(parts, LimitsConfig())


def test_message_size_is_counted_in_stored_utf8_bytes_not_json_escapes() -> None:
    # 240 KB of "é" is 120 000 characters: 720 KB JSON-escaped (\u00e9), 240 KB stored.
    text = "é" * 120_000
    parts = (TextPart(text),)
    assert stored_size(parts) == 240_000 + len('[{"text":"","type":"text"}]')
    assert len(dumps(parts_to_json(parts)).encode()) > 700_000
    check_user_parts(parts, LimitsConfig())
    with pytest.raises(PayloadTooLarge, match="240027 bytes exceeds the limit of 240000"):
        check_user_parts(parts, LimitsConfig(max_message_bytes=240_000))
    # Newlines and quotes are stored as themselves, not as two-byte escapes.
    assert stored_size((TextPart('\n"' * 10),)) == 20 + len('[{"text":"","type":"text"}]')


# -- both stores: one verdict, nothing partial ------------------------------------------


SPECIAL = st.sampled_from(
    ["\x00", "\ud800", "\udfff", "\ud83d", "\ude00", "é", "😀", "\n", '"', "\\", "\x01", " "]
)
texts = st.lists(SPECIAL | st.characters(), max_size=10).map("".join)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**63, -(2**63) - 1, 10**20])
    | st.floats()
    | texts
    | st.binary(max_size=3)
    | st.builds(Opaque)
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(texts, inner, max_size=4)
        | st.dictionaries(st.integers(), inner, min_size=1, max_size=2)
        | st.frozensets(st.integers(), max_size=3)
    )


json_like = st.recursive(leaves, _containers, max_leaves=16)
deep = st.builds(
    nested, json_like, st.sampled_from([MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 1000])
)
anything = json_like | deep


async def _snapshot(store: Store, owner: uuid.UUID, chat_id: uuid.UUID) -> tuple[Any, ...]:
    """What a refused write must not change: the owner's chats and one chat's history."""
    chats = sorted(c.title for c in await store.list_chats(owner))
    history = [m.parts for m in await store.messages_after(chat_id, 0)]
    return (chats, history)


async def _verdict(store: Store, owner: uuid.UUID, value: object) -> tuple[str, Any]:
    """Create a chat whose first message carries `value`: ("refused", field) or
    ("stored", the parts read back)."""
    parts: list[Part] = [ToolResultPart("c", "t", value)]
    if isinstance(value, str):
        parts.append(TextPart(value))
    try:
        _, message = await store.create_chat(owner, "v", parts)
    except DecodeError as exc:
        return ("refused", exc.field)
    (stored,) = [m for m in await store.messages_after(message.chat_id, 0) if m.id == message.id]
    return ("stored", stored.parts)


async def _turn_result(store: Store, lease: Lease, value: object) -> Message:
    """Persist a turn's tool result carrying `value`; the stored message."""
    step = [NewMessage(Role.TOOL, (ToolResultPart("c", "t", value),), Visibility.BOTH)]
    (inserted,) = await store.persist_step(lease, step)
    (stored,) = [m for m in await store.messages_after(lease.chat_id, 0) if m.id == inserted.id]
    return stored


async def _check_same_verdicts(pg_dsn: str, values: list[object]) -> None:
    """Every value through both stores: one verdict, nothing written when refused."""
    owner = uuid.uuid4()
    async with open_store("postgres", pg_dsn) as pg:
        stores: list[Store] = [MemoryStore(), pg]
        leases = []
        for store in stores:
            await store.create_chat(owner, "turn", (TextPart("go"),))
            (chat,) = await store.acquire(W, 1)
            leases.append(Lease.of(chat))
        pairs = list(zip(stores, leases, strict=True))
        for value in values:
            before = [await _snapshot(s, owner, lease.chat_id) for s, lease in pairs]
            verdicts = [await _verdict(s, owner, value) for s in stores]
            assert verdicts[0] == verdicts[1]
            if verdicts[0][0] == "refused":
                assert [await _snapshot(s, owner, lease.chat_id) for s, lease in pairs] == before
            results = [await _turn_result(s, lease, value) for s, lease in pairs]
            assert results[0].parts == results[1].parts
            (part,) = results[0].parts
            assert isinstance(part, ToolResultPart)
            try:
                expected = storable_json(value).value
            except DecodeError:
                assert part.is_error
                assert "cannot be stored" in part.result["error"]
            else:
                assert not part.is_error and part.result == expected


def _same_verdicts_property(pg_dsn: str, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(values=st.lists(anything, min_size=1, max_size=6))
    def check(values: list[object]) -> None:
        trio.run(_check_same_verdicts, pg_dsn, values)

    check()


def test_both_stores_give_every_value_the_same_verdict_and_write_nothing_when_refusing(
    pg_dsn: str,
) -> None:
    """Invariant: for any value (JSON or not, with NUL or lone surrogates, NaN, sets,
    bytes, nesting around the cap and far beyond), a user message carrying it is
    refused by both stores or stored identically by both, and a refused message
    changes neither store; a turn's tool result carrying it is always stored,
    identically by both, as the gate's form of it or as an error result saying why."""
    _same_verdicts_property(pg_dsn, 120)


@pytest.mark.slow
def test_both_stores_give_every_value_the_same_verdict_soak(pg_dsn: str) -> None:
    """The same invariant over many more values (`pytest -m slow`)."""
    _same_verdicts_property(pg_dsn, 2000)


async def test_both_stores_agree_at_the_edges(pg_dsn: str) -> None:
    """The same invariant on the values at each limit (Hypothesis cannot print the
    largest integers)."""
    await _check_same_verdicts(
        pg_dsn,
        [
            10**4300 - 1,
            -(10**4300 - 1),
            10**4300,
            nested({"k": "v"}, MAX_DEPTH - 1),
            nested({"k": "v"}, MAX_DEPTH),
            nested(0, 1000),
            1.7976931348623157e308,
            5e-324,
            -0.0,
            "\ud83d\ude00",
            {"\x00": 1, "\ufffd": 2},
        ],
    )


@pytest.mark.parametrize("kind", ["memory", "postgres"])
async def test_a_write_whose_notify_cannot_be_sent_writes_nothing(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """The memory store checks the notifies it built before its first change, as a
    PostgreSQL transaction whose NOTIFY fails rolls back."""
    pubsub = MemoryPubSub()
    dsn = str(request.getfixturevalue("pg_dsn")) if kind == "postgres" else None

    class Broken:
        def __call__(self, messages: Any, *, refresh: bool = False) -> list[tuple[str, str]]:
            return [("chat:stream:x", "a\x00b")]

        def changes(self, event: Any, applied: Any) -> list[tuple[str, str]]:
            return []

    broken = Broken()

    async def run(store: Store) -> None:
        chat, _ = await store.create_chat(uuid.uuid4(), "t", (TextPart("hi"),))
        (running,) = await store.acquire(W, 1)
        with pytest.raises(ChatdError):
            await store.persist_step(
                Lease.of(running), [NewMessage(Role.ASSISTANT, (TextPart("x"),))], announce=broken
            )
        assert [m.parts for m in await store.messages_after(chat.id, 0)] == [(TextPart("hi"),)]
        # Nothing half-written stands in the way of the next write.
        await store.persist_step(Lease.of(running), [NewMessage(Role.ASSISTANT, (TextPart("y"),))])
        history = [m.parts for m in await store.messages_after(chat.id, 0)]
        assert history == [(TextPart("hi"),), (TextPart("y"),)]

    if kind == "memory":
        await run(MemoryStore(pubsub=pubsub))
    else:
        async with open_store("postgres", dsn) as pg:
            await run(pg)
