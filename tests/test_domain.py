"""The domain JSON codec: round trips, and strict decoding that only ever raises DecodeError."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd_trio import domain as d
from chatd_trio.config import RequestOptions
from chatd_trio.errors import DecodeError, PayloadTooLarge

# -- strategies ------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
texts = st.text(max_size=30)
offsets = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)
moments = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=offsets
)
small_ints = st.integers(min_value=0, max_value=2**31)

parts: st.SearchStrategy[d.Part] = st.one_of(
    st.builds(d.TextPart, texts),
    st.builds(d.ReasoningPart, texts),
    st.builds(d.ToolCallPart, texts, texts, texts),
    st.builds(d.ToolResultPart, texts, texts, json_values, st.booleans()),
    st.builds(d.ContextFilePart, st.uuids(), texts, texts),
)
part_tuples = st.lists(parts, max_size=4).map(tuple)
usages = st.builds(d.Usage, small_ints, small_ints, small_ints, small_ints, small_ints)
messages = st.builds(
    d.Message,
    id=st.integers(min_value=1, max_value=2**62),
    chat_id=st.uuids(),
    role=st.sampled_from(d.Role),
    parts=part_tuples,
    visibility=st.sampled_from(d.Visibility),
    usage=st.none() | usages,
    context_limit=st.none() | small_ints,
    compressed=st.booleans(),
    deleted=st.booleans(),
    created_at=moments,
)
queued = st.builds(
    d.QueuedMessage, st.integers(min_value=1, max_value=2**62), st.uuids(), part_tuples, moments
)
opt_uuids = st.none() | st.uuids()
json_objects = st.dictionaries(texts, json_values, max_size=3)
finite = st.floats(allow_nan=False, allow_infinity=False)
request_options = st.builds(
    RequestOptions,
    temperature=st.none() | finite,
    top_k=st.none() | small_ints,
    max_tokens=st.none() | small_ints,
    stop=st.none() | st.lists(texts, max_size=3).map(tuple),
    tool_choice=st.none() | texts | json_objects,
    parallel_tool_calls=st.none() | st.booleans(),
    reasoning_effort=st.none() | texts,
    response_format=st.none() | json_objects,
    extra_headers=st.dictionaries(texts, texts, max_size=2),
    extra_body=json_objects,
)
chats = st.builds(
    d.Chat,
    id=st.uuids(),
    owner_id=st.uuids(),
    title=texts,
    status=st.sampled_from(d.ChatStatus),
    created_at=moments,
    updated_at=moments,
    worker_id=opt_uuids,
    started_at=st.none() | moments,
    heartbeat_at=st.none() | moments,
    parent_chat_id=opt_uuids,
    root_chat_id=opt_uuids,
    workspace_id=opt_uuids,
    build_id=opt_uuids,
    agent_id=opt_uuids,
    last_error=st.none() | texts,
    mcp_servers=st.lists(texts, max_size=3).map(tuple),
    model_options=st.none() | request_options,
)
error_payloads = st.builds(
    d.ErrorPayload, texts, texts, texts, st.booleans(), st.none() | st.integers(100, 599)
)
retry_payloads = st.builds(
    d.RetryPayload,
    st.integers(0, 100),
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    texts,
    texts,
    st.none() | st.integers(100, 599),
    st.none() | moments,
)
events: st.SearchStrategy[d.StreamEvent] = st.one_of(
    st.builds(d.MessagePartEvent, st.uuids(), st.sampled_from(d.Role), parts),
    st.builds(d.MessageEvent, st.uuids(), messages),
    st.builds(d.StatusEvent, st.uuids(), st.sampled_from(d.ChatStatus), opt_uuids),
    st.builds(d.ErrorEvent, st.uuids(), error_payloads),
    st.builds(d.RetryEvent, st.uuids(), retry_payloads),
    st.builds(d.QueueUpdateEvent, st.uuids(), st.lists(queued, max_size=3).map(tuple)),
    st.builds(d.SnapshotEndEvent, st.uuids(), small_ints),
)
notifies = st.builds(
    d.NotifyPayload,
    after_message_id=st.none() | small_ints,
    full_refresh=st.booleans(),
    status=st.none() | st.sampled_from(d.ChatStatus),
    worker_id=opt_uuids,
    retry=st.none() | retry_payloads,
    error_payload=st.none() | error_payloads,
    error=st.none() | texts,
    queue_update=st.none() | st.lists(queued, max_size=2).map(tuple),
    message=st.none() | messages,
    resync=st.booleans(),
)


def through_text(data: Any) -> Any:
    """What a receiver sees: the JSON text, parsed again."""
    return d.loads(d.dumps(data))


# -- round trips -----------------------------------------------------------------------------


@given(part=parts)
def test_part_round_trip(part: d.Part) -> None:
    assert d.part_from_json(through_text(part.to_json())) == part


@given(ps=part_tuples)
def test_parts_round_trip(ps: tuple[d.Part, ...]) -> None:
    assert d.parts_from_json(through_text(d.parts_to_json(ps))) == ps


@given(usage=usages)
def test_usage_round_trip(usage: d.Usage) -> None:
    assert d.Usage.from_json(through_text(usage.to_json())) == usage


@given(message=messages)
def test_message_round_trip(message: d.Message) -> None:
    assert d.Message.from_json(through_text(message.to_json())) == message


@given(q=queued)
def test_queued_message_round_trip(q: d.QueuedMessage) -> None:
    assert d.QueuedMessage.from_json(through_text(q.to_json())) == q


@given(chat=chats)
def test_chat_round_trip(chat: d.Chat) -> None:
    assert d.Chat.from_json(through_text(chat.to_json())) == chat


@given(err=error_payloads)
def test_error_payload_round_trip(err: d.ErrorPayload) -> None:
    assert d.ErrorPayload.from_json(through_text(err.to_json())) == err


@given(retry=retry_payloads)
def test_retry_payload_round_trip(retry: d.RetryPayload) -> None:
    assert d.RetryPayload.from_json(through_text(retry.to_json())) == retry


@given(event=events)
def test_event_round_trip(event: d.StreamEvent) -> None:
    decoded = d.event_from_json(through_text(event.to_json()))
    assert decoded == event
    assert type(decoded) is type(event)


@given(notify=notifies)
def test_notify_round_trip(notify: d.NotifyPayload) -> None:
    assert d.NotifyPayload.decode(notify.encode()) == notify
    assert d.NotifyPayload.from_json(notify.to_json()) == notify


@given(notify=notifies)
def test_a_payload_with_a_status_may_hold_one(notify: d.NotifyPayload) -> None:
    """Invariant: the cheap test never rules out a status an encoded payload holds."""
    if notify.status is not None:
        assert d.NotifyPayload.may_hold_status(notify.encode())


def test_a_message_payload_holds_no_status() -> None:
    message = d.Message(1, uuid.uuid4(), d.Role.ASSISTANT, (d.TextPart("done"),))
    assert not d.NotifyPayload.may_hold_status(d.NotifyPayload(message=message).encode())
    assert not d.NotifyPayload.may_hold_status('{"\\u0073tatus":"running"}')


def test_notify_omits_unset_fields() -> None:
    assert d.NotifyPayload().to_json() == {}
    assert d.NotifyPayload.decode("{}") == d.NotifyPayload()
    encoded = d.NotifyPayload(after_message_id=4, status=d.ChatStatus.RUNNING).encode()
    assert json.loads(encoded) == {"after_message_id": 4, "status": "running"}


def test_text_of_joins_only_text_parts() -> None:
    parts = (d.TextPart("one"), d.ReasoningPart("thought"), d.TextPart("two"))
    assert d.text_of(parts) == "onetwo"


def test_text_of_skips_a_text_that_is_not_a_string() -> None:
    # An untyped caller's part reaches the store's check (which names the field) intact.
    parts: tuple[Any, ...] = (d.TextPart("ok"), d.TextPart(5))  # type: ignore[arg-type]
    assert d.text_of(parts) == "ok"


def test_naive_timestamp_is_read_as_utc() -> None:
    chat_id = uuid.uuid4()
    raw = {"id": 1, "chat_id": str(chat_id), "parts": [], "created_at": "2024-01-02T03:04:05"}
    assert d.QueuedMessage.from_json(raw).created_at == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


# -- malformed input names the field -------------------------------------------------------

CHAT_ID = str(uuid.uuid4())
NOW = "2024-01-02T03:04:05+00:00"


def good_message() -> dict[str, Any]:
    return {
        "id": 7,
        "chat_id": CHAT_ID,
        "role": "user",
        "parts": [{"type": "text", "text": "hi"}, {"type": "reasoning", "text": "hm"}],
        "visibility": "both",
        "usage": None,
        "context_limit": None,
        "compressed": False,
        "deleted": False,
        "created_at": NOW,
    }


def good_notify() -> dict[str, Any]:
    return {
        "after_message_id": 3,
        "status": "running",
        "worker_id": str(uuid.uuid4()),
        "retry": {"attempt": 1, "delay_s": 2.0, "error": "slow"},
        "queue_update": [{"id": 1, "chat_id": CHAT_ID, "parts": [], "created_at": NOW}],
        "message": good_message(),
    }


def without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


MESSAGE_CASES: list[tuple[dict[str, Any], str]] = [
    (without(good_message(), "role"), "message.role"),
    ({**good_message(), "role": "wizard"}, "message.role"),
    ({**good_message(), "role": 3}, "message.role"),
    ({**good_message(), "chat_id": "not-a-uuid"}, "message.chat_id"),
    ({**good_message(), "chat_id": 12}, "message.chat_id"),
    ({**good_message(), "id": "7"}, "message.id"),
    ({**good_message(), "id": True}, "message.id"),
    (without(good_message(), "id"), "message.id"),
    ({**good_message(), "parts": {"type": "text"}}, "message.parts"),
    (
        {**good_message(), "parts": [{"type": "text", "text": "a"}, {"type": "?"}]},
        "message.parts[1].type",
    ),
    ({**good_message(), "parts": [{"type": "text", "text": 5}]}, "message.parts[0].text"),
    ({**good_message(), "parts": ["text"]}, "message.parts[0]"),
    ({**good_message(), "visibility": "everyone"}, "message.visibility"),
    ({**good_message(), "usage": {"input_tokens": "1"}}, "message.usage.input_tokens"),
    ({**good_message(), "usage": []}, "message.usage"),
    ({**good_message(), "compressed": "yes"}, "message.compressed"),
    ({**good_message(), "created_at": "yesterday"}, "message.created_at"),
    ({**good_message(), "created_at": None}, "message.created_at"),
]


@pytest.mark.parametrize(("raw", "field"), MESSAGE_CASES)
def test_malformed_message_names_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(DecodeError) as info:
        d.Message.from_json(raw)
    assert info.value.field == field


NOTIFY_CASES: list[tuple[dict[str, Any], str]] = [
    ({**good_notify(), "status": "sleeping"}, "notify.status"),
    ({**good_notify(), "worker_id": 5}, "notify.worker_id"),
    ({**good_notify(), "worker_id": "0000"}, "notify.worker_id"),
    ({**good_notify(), "after_message_id": 1.5}, "notify.after_message_id"),
    ({**good_notify(), "full_refresh": 1}, "notify.full_refresh"),
    ({**good_notify(), "resync": "yes"}, "notify.resync"),
    (
        {**good_notify(), "retry": {"attempt": "1", "delay_s": 1, "error": "x"}},
        "notify.retry.attempt",
    ),
    (
        {**good_notify(), "retry": {"attempt": 1, "delay_s": "1", "error": "x"}},
        "notify.retry.delay_s",
    ),
    (
        {**good_notify(), "retry": {"attempt": 1, "delay_s": 10**400, "error": "x"}},
        "notify.retry.delay_s",
    ),
    ({**good_notify(), "retry": {"attempt": 1, "delay_s": 1}}, "notify.retry.error"),
    ({**good_notify(), "error_payload": {"kind": "x"}}, "notify.error_payload.message"),
    ({**good_notify(), "error_payload": "boom"}, "notify.error_payload"),
    ({**good_notify(), "error": ["boom"]}, "notify.error"),
    ({**good_notify(), "queue_update": {"id": 1}}, "notify.queue_update"),
    (
        {
            **good_notify(),
            "queue_update": [{"id": 1, "chat_id": "x", "parts": [], "created_at": NOW}],
        },
        "notify.queue_update[0].chat_id",
    ),
    ({**good_notify(), "message": {**good_message(), "role": "bot"}}, "notify.message.role"),
]


@pytest.mark.parametrize(("raw", "field"), NOTIFY_CASES)
def test_malformed_notify_names_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(DecodeError) as info:
        d.NotifyPayload.from_json(raw)
    assert info.value.field == field
    with pytest.raises(DecodeError) as info:
        d.NotifyPayload.decode(json.dumps(raw))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"type": "status", "chat_id": CHAT_ID, "status": "??"}, "event.status"),
        ({"type": "nope", "chat_id": CHAT_ID}, "event.type"),
        ({"type": "status", "status": "running"}, "event.chat_id"),
        ({"type": "message_part", "chat_id": CHAT_ID, "role": "user"}, "event.part"),
        ({"type": "queue_update", "chat_id": CHAT_ID, "queued": None}, "event.queued"),
        ({"type": "error", "chat_id": CHAT_ID}, "event.message"),
        ({"type": "retry", "chat_id": CHAT_ID, "attempt": 1, "error": "x"}, "event.delay_s"),
        ([], "event"),
    ],
)
def test_malformed_event_names_the_field(raw: Any, field: str) -> None:
    with pytest.raises(DecodeError) as info:
        d.event_from_json(raw)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"id": CHAT_ID, "owner_id": CHAT_ID, "title": "t", "status": "idle"}, "chat.status"),
        ({"id": CHAT_ID, "owner_id": "zz", "title": "t", "status": "waiting"}, "chat.owner_id"),
        (
            {
                "id": CHAT_ID,
                "owner_id": CHAT_ID,
                "title": "t",
                "status": "waiting",
                "created_at": NOW,
                "updated_at": NOW,
                "mcp_servers": [1],
            },
            "chat.mcp_servers",
        ),
        *[
            (
                {
                    "id": CHAT_ID,
                    "owner_id": CHAT_ID,
                    "title": "t",
                    "status": "waiting",
                    "created_at": NOW,
                    "updated_at": NOW,
                    "model_options": options,
                },
                field,
            )
            for options, field in [
                ([], "chat.model_options"),
                ({"temperature": "hot"}, "chat.model_options.temperature"),
                ({"max_tokens": 1.5}, "chat.model_options.max_tokens"),
                ({"max_tokens": True}, "chat.model_options.max_tokens"),
                ({"stop": "END"}, "chat.model_options.stop"),
                ({"extra_headers": {"x": 1}}, "chat.model_options.extra_headers"),
                ({"temprature": 0.2}, "chat.model_options.temprature"),
            ]
        ],
    ],
)
def test_malformed_chat_names_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(DecodeError) as info:
        d.Chat.from_json(raw)
    assert info.value.field == field


@pytest.mark.parametrize(
    "raw",
    ["{", "", "nul", b"\xff\xfe\x00", "[" * 100_000, "\ud800", '{"a": 1} trailing'],
)
def test_malformed_json_text_raises_decode_error(raw: str | bytes) -> None:
    with pytest.raises(DecodeError) as info:
        d.NotifyPayload.decode(raw)
    assert info.value.field == "notify"


def test_oversized_payload_refused_before_parsing() -> None:
    raw = json.dumps({"error": "x" * 100})
    with pytest.raises(PayloadTooLarge) as info:
        d.NotifyPayload.decode(raw, limit=50)
    assert info.value.field == "notify"
    assert d.NotifyPayload.decode(raw, limit=len(raw)).error == "x" * 100
    # The limit counts UTF-8 bytes, not characters.
    wide = json.dumps({"error": "é" * 30}, ensure_ascii=False)
    with pytest.raises(PayloadTooLarge):
        d.NotifyPayload.decode(wide, limit=len(wide))


@pytest.mark.parametrize("value", [None, 12, "nope", "1234", ["x"]])
def test_parse_uuid_names_the_path(value: object) -> None:
    with pytest.raises(DecodeError) as info:
        d.parse_uuid(value, "owner")
    assert info.value.field == "owner"


# -- only DecodeError ever escapes -----------------------------------------------------------

DECODERS: dict[str, Callable[[Any], object]] = {
    "part": d.part_from_json,
    "parts": d.parts_from_json,
    "usage": d.Usage.from_json,
    "message": d.Message.from_json,
    "queued_message": d.QueuedMessage.from_json,
    "chat": d.Chat.from_json,
    "error_payload": d.ErrorPayload.from_json,
    "retry": d.RetryPayload.from_json,
    "event": d.event_from_json,
    "notify": d.NotifyPayload.from_json,
}


def decodes_or_refuses(root: str, data: Any) -> None:
    """Decoding either succeeds or raises DecodeError naming a field under `root`."""
    try:
        DECODERS[root](data)
    except DecodeError as exc:
        assert exc.field.startswith(root), (exc.field, root)


@settings(max_examples=300)
@given(root=st.sampled_from(sorted(DECODERS)), data=json_values)
def test_arbitrary_json_only_raises_decode_error(root: str, data: Any) -> None:
    decodes_or_refuses(root, data)


@settings(max_examples=300)
@given(
    root=st.sampled_from(sorted(DECODERS)), keys=st.dictionaries(st.text(max_size=12), json_values)
)
def test_arbitrary_objects_only_raise_decode_error(root: str, keys: dict[str, Any]) -> None:
    # Objects carrying the decoder's real keys get past the first field checks.
    decodes_or_refuses(root, keys)


def paths_of(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested JSON (not the root)."""
    out: list[tuple[Any, ...]] = []
    if isinstance(data, dict):
        items: list[tuple[Any, Any]] = list(data.items())
    elif isinstance(data, list):
        items = list(enumerate(data))
    else:
        return out
    for key, value in items:
        out.append((*prefix, key))
        out.extend(paths_of(value, (*prefix, key)))
    return out


VALID: dict[str, st.SearchStrategy[Any]] = {
    "part": parts.map(lambda p: p.to_json()),
    "parts": part_tuples.map(d.parts_to_json),
    "usage": usages.map(lambda u: u.to_json()),
    "message": messages.map(lambda m: m.to_json()),
    "queued_message": queued.map(lambda q: q.to_json()),
    "chat": chats.map(lambda c: c.to_json()),
    "error_payload": error_payloads.map(lambda e: e.to_json()),
    "retry": retry_payloads.map(lambda r: r.to_json()),
    "event": events.map(lambda e: e.to_json()),
    "notify": notifies.map(lambda n: n.to_json()),
}


@settings(max_examples=400)
@given(data=st.data(), root=st.sampled_from(sorted(VALID)))
def test_mutated_records_only_raise_decode_error(data: st.DataObject, root: str) -> None:
    """Take a valid record, then replace or delete one nested value with arbitrary JSON."""
    doc = copy.deepcopy(through_text(data.draw(VALID[root])))
    paths = paths_of(doc)
    if not paths:
        decodes_or_refuses(root, data.draw(json_values))
        return
    path = data.draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values)
    decodes_or_refuses(root, doc)


@settings(max_examples=300)
@given(raw=st.text() | st.binary())
def test_arbitrary_text_only_raises_decode_error(raw: str | bytes) -> None:
    try:
        d.NotifyPayload.decode(raw)
    except DecodeError as exc:
        assert exc.field.startswith("notify")
