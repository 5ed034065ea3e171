"""Untrusted input through the real Server and loop, on both stores (docs/spec.md §7, §8).

Tool output and model output that PostgreSQL cannot store never fail a turn: a bad
tool return value becomes an error result and the turn ends `done`, with what is
stored the same on both stores. API callers get one clear library error for blank,
oversized, malformed or non-JSON input, with `Config.limits` as the limit, and
nothing is stored.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from chatd_trio.config import AcquireConfig, Config, LimitsConfig
from chatd_trio.domain import (
    JSON,
    ChatStatus,
    Message,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    text_of,
)
from chatd_trio.errors import ChatNotFound, DecodeError, PayloadTooLarge
from chatd_trio.models.scripted import ScriptedModel, text_step, tool_step
from chatd_trio.pubsub.base import PubSub
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.server import Server
from chatd_trio.storable import MAX_RESULT_BYTES
from chatd_trio.store.base import Store, TurnOutcome
from chatd_trio.store.memory import MemoryStore
from chatd_trio.tools import ErrorResult, ToolContext, ToolRegistry, tool
from tests.server_replica import MEMORY_CONFIG, WAIT, ObservedServer, trio_clock

OWNER = uuid.UUID(int=1)
# Real clock on PostgreSQL: quick acquisition, and a stale_after no loaded machine reaches
# (a turn taken over as stale would end `lost`, not what these tests look at).
POSTGRES_CONFIG = Config(
    acquire=AcquireConfig(acquire_interval=0.2, heartbeat_interval=0.5, stale_after=60.0)
)


@dataclass
class Env:
    kind: str
    store: Store
    pubsub: PubSub
    config: Config


@pytest.fixture(params=["memory", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock(kind: str) -> trio.testing.MockClock | None:
    return trio.testing.MockClock(autojump_threshold=0) if kind == "memory" else None


@pytest.fixture
async def env(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    if kind == "memory":
        pubsub = MemoryPubSub()
        yield Env(kind, MemoryStore(clock=trio_clock, pubsub=pubsub), pubsub, MEMORY_CONFIG)
        return
    dsn = str(request.getfixturevalue("pg_dsn"))
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore
    from tests.pgcluster import truncate_all

    async with PostgresStore.open(dsn) as store:
        await trio.to_thread.run_sync(truncate_all, dsn)
        async with PostgresPubSub.open(dsn) as pubsub:
            yield Env(kind, store, pubsub, POSTGRES_CONFIG)


def returning(name: str, value: object) -> Any:
    @tool(name, f"Returns a {name} value.", {"type": "object"})
    async def run(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        await trio.lowlevel.checkpoint()
        return value

    return run


def deep(depth: int) -> object:
    value: object = "bottom"
    for _ in range(depth):
        value = [value]
    return value


BAD_TOOLS = {
    "nul": "a\x00b",
    "nan": float("nan"),
    "infinity": {"x": float("inf")},
    "a_set": {1, 2, 3},
    "raw_bytes": b"\x00\xff",
    "surrogate": {"name": "caf\udce9.txt"},
    "deep": deep(1000),
    "huge": "x" * (MAX_RESULT_BYTES + 1),
}


async def wait_status(server: Server, chat_id: uuid.UUID, *statuses: ChatStatus) -> None:
    with trio.fail_after(WAIT):
        async with server.subscribe(OWNER, chat_id) as sub:
            while (await server.get_chat(OWNER, chat_id)).status not in statuses:
                await sub.receive()


async def tool_results(store: Store, chat_id: uuid.UUID) -> dict[str, ToolResultPart]:
    out: dict[str, ToolResultPart] = {}
    for m in await store.messages_after(chat_id, 0):
        for p in m.parts:
            if isinstance(p, ToolResultPart):
                out[p.name] = p
    return out


async def test_tool_results_that_cannot_be_stored_become_error_results_and_the_turn_is_done(
    env: Env, clock: Any
) -> None:
    tools = ToolRegistry(
        [
            *(returning(name, value) for name, value in BAD_TOOLS.items()),
            returning("error_with_nan", ErrorResult({"why": float("nan")})),
        ]
    )
    model = ScriptedModel(
        [
            tool_step([(name, {}) for name in [*BAD_TOOLS, "error_with_nan"]]),
            text_step("finished"),
        ]
    )
    async with Server(env.store, env.pubsub, model, env.config, tools=tools) as server:
        chat = await server.create_chat(OWNER, "run the tools", title="t")
        await wait_status(server, chat.id, ChatStatus.WAITING, ChatStatus.ERROR)
        stored = await server.get_chat(OWNER, chat.id)
        assert (stored.status, stored.last_error) == (ChatStatus.WAITING, None)
        assert server.stats().turns_finished == {"done": 1}
    results = await tool_results(env.store, chat.id)
    # NUL and a lone surrogate are replaced; the result is kept.
    assert (results["nul"].result, results["nul"].is_error) == ("a\ufffdb", False)
    assert results["surrogate"].result == {"name": "caf\ufffd.txt"}
    assert not results["surrogate"].is_error
    # What is not JSON becomes an error result that says why.
    for name, reason in [
        ("nan", "nan is not a JSON number"),
        ("infinity", "inf is not a JSON number"),
        ("a_set", "not JSON: set"),
        ("raw_bytes", "not JSON: bytes"),
        ("deep", "nested deeper than 128 levels"),
        ("huge", f"exceeds the limit of {MAX_RESULT_BYTES}"),
        ("error_with_nan", "nan is not a JSON number"),
    ]:
        assert results[name].is_error, name
        assert results[name].result["error"].startswith("the tool's result cannot be stored")
        assert reason in results[name].result["error"], name
    history = await env.store.messages_after(chat.id, 0)
    assert text_of(history[-1].parts) == "finished"


async def test_model_output_with_nul_and_lone_surrogates_is_stored_replaced(
    env: Env, clock: Any
) -> None:
    model = ScriptedModel(
        [
            tool_step([("echo", '{"text": "x\x00y"}')], text="calling\x00", reasoning="r\ud800"),
            text_step("a\x00b\udfff end"),
        ]
    )

    @tool("echo", "Echo.", {"type": "object"})
    async def echo(args: dict[str, JSON], ctx: ToolContext) -> JSON:
        await trio.lowlevel.checkpoint()
        return args

    async with ObservedServer(
        env.store, env.pubsub, model, env.config, tools=ToolRegistry([echo])
    ) as server:
        chat = await server.create_chat(OWNER, "go", title="t")
        async with server.subscribe(OWNER, chat.id) as sub:
            streamed: list[str] = []
            with trio.fail_after(WAIT):
                while (await server.get_chat(OWNER, chat.id)).status is not ChatStatus.WAITING:
                    event = await sub.receive()
                    part = getattr(event, "part", None)
                    if isinstance(part, TextPart):
                        streamed.append(part.text)
        # `waiting` is committed just before the server counts the turn as ended.
        assert await server.wait_ended(chat.id) is TurnOutcome.DONE
        assert server.stats().turns_finished == {"done": 1}
    history: list[Message] = await env.store.messages_after(chat.id, 0)
    step = history[1]
    assert step.role is Role.ASSISTANT
    calls = [p for p in step.parts if isinstance(p, ToolCallPart)]
    assert calls[0].arguments == '{"text": "x\ufffdy"}'
    assert text_of(step.parts) == "calling\ufffd"
    assert (await tool_results(env.store, chat.id))["echo"].result == {"text": "x\ufffdy"}
    assert text_of(history[-1].parts) == "a\ufffdb\ufffd end"
    # What subscribers saw streamed is what was stored.
    assert all("\x00" not in t for t in streamed)


# -- API callers ------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "   ", "\n\t ", [], [TextPart(" "), TextPart("")]])
async def test_blank_content_is_refused_by_create_send_and_edit_and_nothing_is_stored(
    env: Env, clock: Any, content: Any
) -> None:
    model = ScriptedModel([text_step("ok")])
    async with Server(env.store, env.pubsub, model, env.config) as server:
        with pytest.raises(DecodeError, match="blank"):
            await server.create_chat(OWNER, content, title="t")
        assert await server.store.list_chats(OWNER) == []
        chat = await server.create_chat(OWNER, "hello", title="t")
        await wait_status(server, chat.id, ChatStatus.WAITING)
        (first, reply) = await server.messages(OWNER, chat.id)
        with pytest.raises(DecodeError, match="blank"):
            await server.send_message(OWNER, chat.id, content)
        with pytest.raises(DecodeError, match="blank"):
            await server.edit_message(OWNER, chat.id, first.id, content)
        assert await server.messages(OWNER, chat.id) == [first, reply]
        assert await server.store.list_queued(chat.id) == []
        assert (await server.get_chat(OWNER, chat.id)).status is ChatStatus.WAITING


async def test_message_limits_come_from_config_on_every_path(env: Env, clock: Any) -> None:
    small = env.config.replace(limits=LimitsConfig(max_message_bytes=1024, max_title_chars=10))
    model = ScriptedModel([text_step("ok")] * 3)
    async with Server(env.store, env.pubsub, model, small) as server:
        with pytest.raises(PayloadTooLarge, match="exceeds the limit of 1024"):
            await server.create_chat(OWNER, "x" * 4096, title="t")
        with pytest.raises(DecodeError, match="title"):
            await server.create_chat(OWNER, "hi", title="t" * 11)
        chat = await server.create_chat(OWNER, "hi", title="t")
        await wait_status(server, chat.id, ChatStatus.WAITING)
        (first, _) = await server.messages(OWNER, chat.id)
        with pytest.raises(PayloadTooLarge):
            await server.send_message(OWNER, chat.id, "x" * 4096)
        with pytest.raises(PayloadTooLarge):
            await server.edit_message(OWNER, chat.id, first.id, "x" * 4096)
        assert len(await server.messages(OWNER, chat.id)) == 2
    # A limit above the store's own default is honoured too (1 MiB > 256 KiB).
    large = env.config.replace(limits=LimitsConfig(max_message_bytes=2 * 1024 * 1024))
    async with Server(env.store, env.pubsub, ScriptedModel([text_step("ok")]), large) as server:
        big = await server.send_message(OWNER, chat.id, "y" * (1024 * 1024))
        assert big.message is not None and text_of(big.message.parts) == "y" * (1024 * 1024)


async def test_the_limit_counts_stored_utf8_bytes(env: Env, clock: Any) -> None:
    model = ScriptedModel([text_step("ok")])
    async with Server(env.store, env.pubsub, model, env.config) as server:
        # 240 KB as UTF-8 (720 KB as escaped JSON) fits the default 256 KiB.
        chat = await server.create_chat(OWNER, "é" * 120_000, title="t")
        (first, *_) = await server.messages(OWNER, chat.id)
        assert text_of(first.parts) == "é" * 120_000


async def test_malformed_ids_are_the_same_library_error_on_both_stores(
    env: Env, clock: Any
) -> None:
    async with Server(env.store, env.pubsub, ScriptedModel([text_step("ok")]), env.config) as s:
        chat = await s.create_chat(OWNER, "hi", title="t")
        await wait_status(s, chat.id, ChatStatus.WAITING)
        calls = [
            lambda: s.get_chat(OWNER, "not-a-uuid"),  # type: ignore[arg-type]
            lambda: s.messages(OWNER, "not-a-uuid"),  # type: ignore[arg-type]
            lambda: s.send_message(OWNER, "x", "hello"),  # type: ignore[arg-type]
            lambda: s.interrupt(OWNER, 42),  # type: ignore[arg-type]
            lambda: s.get_chat("me", chat.id),  # type: ignore[arg-type]
            lambda: s.edit_message(OWNER, chat.id, "1", "new"),  # type: ignore[arg-type]
            lambda: s.promote_queued(OWNER, chat.id, None),  # type: ignore[arg-type]
            lambda: s.messages(OWNER, chat.id, "0"),  # type: ignore[arg-type]
        ]
        for call in calls:
            with pytest.raises(DecodeError):
                await call()
        # A UUID's text is the chat on both stores; an unknown one is ChatNotFound.
        assert (await s.get_chat(OWNER, str(chat.id))).id == chat.id  # type: ignore[arg-type]
        with pytest.raises(ChatNotFound):
            await s.get_chat(OWNER, str(uuid.uuid4()))  # type: ignore[arg-type]


async def test_non_json_or_non_part_content_is_a_library_error_not_a_type_error(
    env: Env, clock: Any
) -> None:
    async with Server(env.store, env.pubsub, ScriptedModel([text_step("ok")]), env.config) as s:
        for content, field in [
            ([ToolResultPart("c", "t", {1, 2})], "parts[0].result"),
            ([ToolResultPart("c", "t", {"v": float("nan")})], "parts[0].result.v"),
            ([{"type": "text", "text": "hi"}], "parts[0]"),
            (b"bytes", "content"),
            (42, "content"),
            ([TextPart(b"x")], "parts[0].text"),  # type: ignore[arg-type]
        ]:
            with pytest.raises(DecodeError) as info:
                await s.create_chat(OWNER, content, title="t")
            assert info.value.field == field
        assert await s.store.list_chats(OWNER) == []
        # NUL and lone surrogates from a caller are stored replaced, not refused.
        chat = await s.create_chat(OWNER, "a\x00b\ud800", title="t\x00")
        (first, *_) = await s.messages(OWNER, chat.id)
        assert text_of(first.parts) == "a\ufffdb\ufffd"
        assert (await s.get_chat(OWNER, chat.id)).title == "t\ufffd"
