"""The PubSub contract, run against every adapter (memory and PostgreSQL LISTEN/NOTIFY).

Deliveries are awaited under a generous `fail_after` guard only so that a broken
adapter fails instead of hanging; nothing here waits on time for synchronisation.
Payloads are sealed (chatd_trio.pubsub.auth): a subscription receives what was
published, and nothing of what arrives on its channel without opening under the
deployment's key, which is counted instead.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import psycopg
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd_trio.config import NotifyAuthConfig, PubSubConfig
from chatd_trio.errors import DecodeError, PayloadTooLarge, PubSubError
from chatd_trio.pubsub.auth import PREFIX, NotifyAuth, parse_keys, sealed_size
from chatd_trio.pubsub.base import Delivery, HandlerDelivery, PubSub, Resync, Subscription
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.pubsub.postgres import PostgresPubSub

KINDS = ["memory", pytest.param("postgres", marks=pytest.mark.postgres)]
# Guard against a hang only (real sockets, real clock); never reached when things work.
GUARD = 15.0
END = "--end--"
# The deployment key of this module's PostgreSQL adapters (a test run draws its own).
AUTH = NotifyAuth.generate()


@asynccontextmanager
async def open_pubsub(
    kind: str, dsn: str | None, auth: NotifyAuth | None = None
) -> AsyncIterator[MemoryPubSub | PostgresPubSub]:
    """A fresh adapter; PostgreSQL reconnects fast so the kill test stays quick.

    Memory draws a key of its own unless `auth` is given; PostgreSQL uses `auth` or AUTH.
    """
    if kind == "memory":
        yield MemoryPubSub(auth=auth)
        return
    assert dsn is not None
    async with PostgresPubSub.open(
        dsn, reconnect_backoff_initial=0.01, reconnect_backoff_max=0.2, auth=auth or AUTH
    ) as ps:
        yield ps


@pytest.fixture(params=KINDS)
def pubsub_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pubsub_dsn(pubsub_kind: str, request: pytest.FixtureRequest) -> str | None:
    if pubsub_kind == "postgres":
        return str(request.getfixturevalue("pg_dsn"))
    return None


@pytest.fixture
async def pubsub(
    pubsub_kind: str, pubsub_dsn: str | None
) -> AsyncIterator[MemoryPubSub | PostgresPubSub]:
    async with open_pubsub(pubsub_kind, pubsub_dsn) as ps:
        yield ps


def new_channel() -> str:
    """A channel shaped like the real ones (':' needs identifier quoting), unique per test."""
    return f"chat:stream:{uuid.uuid4()}"


async def recv(sub: Subscription) -> Delivery:
    with trio.fail_after(GUARD):
        return await sub.receive()


async def recv_until_end(sub: Subscription) -> list[Delivery]:
    """Everything received before the END marker."""
    got: list[Delivery] = []
    while (item := await recv(sub)) != END:
        got.append(item)
    return got


# -- every payload once, in order --------------------------------------------------------

CHANNELS = 3
payload_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    max_size=40,
)


@dataclass(frozen=True)
class Scenario:
    """Publisher tasks (each a list of (channel index, text)) and subscribers per channel."""

    publishers: list[list[tuple[int, str]]]
    subscribers: list[int]


def scenarios(max_ops: int) -> st.SearchStrategy[Scenario]:
    op = st.tuples(st.integers(0, CHANNELS - 1), payload_text)
    return st.builds(
        Scenario,
        publishers=st.lists(st.lists(op, max_size=max_ops), min_size=1, max_size=3),
        subscribers=st.lists(st.integers(0, 2), min_size=CHANNELS, max_size=CHANNELS),
    )


async def check_delivery(ps: PubSub, scenario: Scenario) -> None:
    """Invariant: every subscriber of channel c receives each payload published on c
    while it was subscribed exactly once, payloads of one publisher in publish order,
    nothing published on another channel, and no Resync (the connection stayed up).

    Publishers run concurrently, so channels interleave in any order the scheduler
    (Hypothesis-managed) picks; an END marker per channel closes each stream so extra
    or duplicate deliveries before it are caught.
    """
    channels = [new_channel() for _ in range(CHANNELS)]
    bystander = new_channel()
    async with AsyncExitStack() as stack:
        subs = {
            c: [await stack.enter_async_context(ps.subscribe(c)) for _ in range(n)]
            for c, n in zip(channels, scenario.subscribers, strict=True)
        }
        quiet = await stack.enter_async_context(ps.subscribe(bystander))
        expected: dict[str, list[str]] = {c: [] for c in channels}

        async def publisher(p: int, ops: list[tuple[int, str]]) -> None:
            for i, (ci, text) in enumerate(ops):
                payload = f"{p}:{i}:{text}"
                expected[channels[ci]].append(payload)
                await ps.publish(channels[ci], payload)

        async with trio.open_nursery() as nursery:
            for p, ops in enumerate(scenario.publishers):
                nursery.start_soon(publisher, p, ops)
        for c in [*channels, bystander]:
            await ps.publish(c, END)

        assert await recv_until_end(quiet) == []
        for c in channels:
            for sub in subs[c]:
                got = await recv_until_end(sub)
                assert all(isinstance(g, str) for g in got)
                assert Counter(got) == Counter(expected[c])
                for p in range(len(scenario.publishers)):
                    mine = [g for g in got if isinstance(g, str) and g.startswith(f"{p}:")]
                    assert mine == [e for e in expected[c] if e.startswith(f"{p}:")]


@settings(max_examples=60, deadline=None)
@given(scenario=scenarios(max_ops=25))
async def test_memory_every_payload_once_in_order(scenario: Scenario) -> None:
    await check_delivery(MemoryPubSub(), scenario)


@pytest.mark.postgres
@settings(
    max_examples=20,
    deadline=None,
    # pg_dsn is session-scoped; the adapter itself is opened inside each example.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenario=scenarios(max_ops=12))
async def test_postgres_every_payload_once_in_order(pg_dsn: str, scenario: Scenario) -> None:
    async with open_pubsub("postgres", pg_dsn) as ps:
        await check_delivery(ps, scenario)


# -- contract, both adapters -------------------------------------------------------------


async def test_implements_the_port(pubsub: PubSub) -> None:
    assert isinstance(pubsub, PubSub)
    async with pubsub.subscribe(new_channel()) as sub:
        assert isinstance(sub, Subscription)


async def test_other_channels_get_nothing(pubsub: PubSub) -> None:
    a, b = new_channel(), new_channel()
    async with pubsub.subscribe(a) as sub_a, pubsub.subscribe(b) as sub_b:
        for i in range(5):
            await pubsub.publish(a, f"a{i}")
        await pubsub.publish(b, END)
        assert await recv_until_end(sub_b) == []
        await pubsub.publish(a, END)
        assert await recv_until_end(sub_a) == [f"a{i}" for i in range(5)]


async def test_two_subscribers_both_get_everything(pubsub: PubSub) -> None:
    ch = new_channel()
    async with pubsub.subscribe(ch) as one, pubsub.subscribe(ch) as two:
        for i in range(20):
            await pubsub.publish(ch, str(i))
        await pubsub.publish(ch, END)
        expected = [str(i) for i in range(20)]
        assert await recv_until_end(one) == expected
        assert await recv_until_end(two) == expected


async def test_live_reader_sees_concurrent_publishes_in_order(pubsub: PubSub) -> None:
    ch = new_channel()
    got: list[Delivery] = []
    async with pubsub.subscribe(ch) as sub:

        async def reader() -> None:
            got.extend(await recv_until_end(sub))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(100):
                await pubsub.publish(ch, str(i))
            await pubsub.publish(ch, END)
    assert got == [str(i) for i in range(100)]


async def test_subscription_churn_loses_nothing(pubsub: PubSub) -> None:
    """Subscribing and leaving other channels (LISTEN/UNLISTEN, which interrupt the
    PostgreSQL listener's wait) while a channel streams never drops or reorders it."""
    ch = new_channel()
    count = 300
    got: list[Delivery] = []
    async with pubsub.subscribe(ch) as sub:

        async def reader() -> None:
            got.extend(await recv_until_end(sub))

        async def churn(done: trio.Event) -> None:
            while not done.is_set():
                other = new_channel()
                async with pubsub.subscribe(other) as o:
                    await pubsub.publish(other, "ping")
                    assert await recv(o) == "ping"

        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(churn, done)
            for i in range(count):
                await pubsub.publish(ch, str(i))
            await pubsub.publish(ch, END)
            done.set()
    assert got == [str(i) for i in range(count)]
    # The churn really ran alongside the stream (it subscribed at least once more).
    assert pubsub.statistics().published > count + 1


async def test_unsubscribe_stops_delivery(pubsub: MemoryPubSub | PostgresPubSub) -> None:
    ch = new_channel()
    async with pubsub.subscribe(ch) as stays:
        async with pubsub.subscribe(ch) as leaves:
            await pubsub.publish(ch, "both")
            assert await recv(leaves) == "both"
        await pubsub.publish(ch, "one")
        await pubsub.publish(ch, END)
        assert await recv_until_end(stays) == ["both", "one"]
        # The subscription that left receives nothing more: it is closed.
        with pytest.raises(PubSubError):
            await leaves.receive()
        if isinstance(pubsub, PostgresPubSub):
            # One LISTEN served both subscribers, and the channel is still listened.
            await pubsub.settle()
            assert ch in pubsub.listening_channels
            assert pubsub.statistics().listens == 1
    if isinstance(pubsub, PostgresPubSub):
        await pubsub.settle()
        assert ch not in pubsub.listening_channels
        assert pubsub.statistics().unlistens == 1
    assert pubsub.statistics().subscriptions == 0
    # Subscribing again works (LISTEN again for PostgreSQL).
    async with pubsub.subscribe(ch) as again:
        await pubsub.publish(ch, "again")
        assert await recv(again) == "again"
    if isinstance(pubsub, PostgresPubSub):
        assert pubsub.statistics().listens == 2


async def test_payload_limit(pubsub: PubSub) -> None:
    """`payload_limit` is the largest payload whose sealed form PostgreSQL's NOTIFY
    takes (7999 bytes); both adapters share it, and one byte more is refused before
    anything is sent."""
    limit = pubsub.payload_limit
    wire_limit = PubSubConfig().payload_limit
    assert wire_limit == 7999
    assert sealed_size(limit) <= wire_limit < sealed_size(limit + 1)
    assert limit == 5923
    ch = new_channel()
    two_byte = "é" * (limit // 2)
    at_limit = two_byte + "x" * (limit - len(two_byte.encode()))
    assert len(at_limit.encode()) == limit
    async with pubsub.subscribe(ch) as sub:
        await pubsub.publish(ch, at_limit)
        with pytest.raises(PayloadTooLarge) as info:
            await pubsub.publish(ch, at_limit + "x")
        assert info.value.field == "payload"
        # Measured in UTF-8 bytes, not characters.
        with pytest.raises(PayloadTooLarge):
            await pubsub.publish(ch, "é" * (limit // 2 + 1))
        await pubsub.publish(ch, END)
        assert await recv_until_end(sub) == [at_limit]


async def test_bad_channel_or_payload_is_refused(pubsub: PubSub) -> None:
    for bad in ["", "x" * 64, "a\x00b"]:
        with pytest.raises(DecodeError) as info:
            await pubsub.publish(bad, "p")
        assert info.value.field == "channel"
        with pytest.raises(DecodeError):
            async with pubsub.subscribe(bad):
                pass  # pragma: no cover
    for bad_payload in ["nul\x00", "\ud800"]:
        with pytest.raises(DecodeError) as info:
            await pubsub.publish(new_channel(), bad_payload)
        assert info.value.field == "payload"
    # 63 bytes is the longest channel name PostgreSQL keeps intact.
    longest = "c" * 63
    async with pubsub.subscribe(longest) as sub:
        await pubsub.publish(longest, "ok")
        assert await recv(sub) == "ok"


# -- forged notifies ---------------------------------------------------------------------


def _notify_as_a_login(dsn: str, notifies: list[tuple[str, str]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for channel, payload in notifies:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def raw_notify(ps: PubSub, dsn: str | None, notifies: list[tuple[str, str]]) -> None:
    """Send payloads exactly as given, as any login of the database can with NOTIFY
    (memory: `publish_nowait`, the store's raw path)."""
    if isinstance(ps, MemoryPubSub):
        for channel, payload in notifies:
            ps.publish_nowait(channel, payload)
        await trio.lowlevel.checkpoint()
    else:
        assert dsn is not None
        await trio.to_thread.run_sync(_notify_as_a_login, dsn, notifies)


def _shifted(auth: NotifyAuth, seconds: float) -> NotifyAuth:
    """The same keys on a clock `seconds` off."""
    keys = parse_keys(auth.key_text().split(","), source="test")
    return NotifyAuth(keys, clock=lambda: time.time() + seconds)


@dataclass(frozen=True)
class Forgery:
    """One payload a login without the key can send: `kind` says how it is made."""

    kind: str
    text: str = ""
    data: bytes = b""
    at: int = 0

    def build(self, channel: str, auth: NotifyAuth) -> str:
        """The forged wire text for `channel`, where `auth` holds the deployment key."""
        if self.kind == "text":
            return self.text
        if self.kind == "bytes":
            # Arbitrary bytes, each as one character (NOTIFY carries text only).
            return self.data.replace(b"\x00", b"").decode("latin-1")
        if self.kind == "envelope":
            return PREFIX + base64.urlsafe_b64encode(self.data).rstrip(b"=").decode()
        if self.kind == "other_key":
            return NotifyAuth.generate().seal(channel, self.text)
        if self.kind == "other_channel":
            return auth.seal(new_channel(), self.text)
        if self.kind == "expired":
            return _shifted(auth, -2 * NotifyAuthConfig().max_age).seal(channel, self.text)
        if self.kind == "future":
            return _shifted(auth, 2 * NotifyAuthConfig().max_age).seal(channel, self.text)
        genuine = auth.seal(channel, self.text)
        if self.kind == "truncated":
            return genuine[: self.at % len(genuine)]
        if self.kind == "extended":
            return genuine + (self.text or "A")
        assert self.kind == "tampered"
        i = len(PREFIX) + self.at % (len(genuine) - len(PREFIX))
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        swap = alphabet[(alphabet.index(genuine[i]) + 1 + self.at % 63) % 64]
        return genuine[:i] + swap + genuine[i + 1 :]


_forged_json = st.builds(
    lambda after, text: json.dumps(
        {
            "after_message_id": after,
            "message": {"id": after + 1, "role": "assistant", "parts": [{"text": text}]},
            "status": "error",
            "error": text,
        }
    ),
    st.integers(0, 10**15),
    payload_text,
)
forgeries = st.one_of(
    st.builds(Forgery, st.just("text"), st.one_of(payload_text, _forged_json)),
    st.builds(Forgery, st.just("bytes"), data=st.binary(max_size=300)),
    st.builds(Forgery, st.just("envelope"), data=st.binary(max_size=300)),
    st.builds(
        Forgery,
        st.sampled_from(
            ["other_key", "other_channel", "expired", "future", "truncated", "extended", "tampered"]
        ),
        payload_text,
        at=st.integers(0, 10_000),
    ),
)


async def check_forgeries_dropped(ps: PubSub, dsn: str | None, forged: list[Forgery]) -> None:
    """Invariant: no payload that does not open under the deployment key for this
    channel is ever delivered, and each is counted once in `rejected`; a genuine
    publish after them is delivered first (so none was delivered before it)."""
    ch = new_channel()
    async with ps.subscribe(ch) as sub:
        before = ps.statistics().rejected
        await raw_notify(ps, dsn, [(ch, f.build(ch, AUTH)) for f in forged])
        await ps.publish(ch, END)
        assert await recv(sub) == END
        assert ps.statistics().rejected - before == len(forged)


@settings(max_examples=150, deadline=None)
@given(forged=st.lists(forgeries, min_size=1, max_size=8))
async def test_memory_forged_payloads_are_dropped_and_counted(forged: list[Forgery]) -> None:
    await check_forgeries_dropped(MemoryPubSub(auth=AUTH), None, forged)


@pytest.mark.postgres
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(forged=st.lists(forgeries, min_size=1, max_size=8))
async def test_postgres_forged_payloads_are_dropped_and_counted(
    pg_dsn: str, forged: list[Forgery]
) -> None:
    async with open_pubsub("postgres", pg_dsn) as ps:
        await check_forgeries_dropped(ps, pg_dsn, forged)


async def test_sealed_payload_opens_only_on_its_own_channel(
    pubsub_kind: str, pubsub_dsn: str | None
) -> None:
    """A genuine sealed payload copied to another chat's channel is dropped; on its own
    channel it is accepted again within `max_age` (a replay: docs/security.md)."""
    async with open_pubsub(pubsub_kind, pubsub_dsn, auth=AUTH) as ps:
        a, b = new_channel(), new_channel()
        async with ps.subscribe(a) as sub_a, ps.subscribe(b) as sub_b:
            captured = ps.seal(a, "for a only")
            await raw_notify(ps, pubsub_dsn, [(b, captured), (a, captured)])
            await ps.publish(b, END)
            assert await recv_until_end(sub_b) == []
            assert await recv(sub_a) == "for a only"
            assert ps.statistics().rejected == 1


async def test_seal_and_publish_refuse_alike(pubsub: PubSub) -> None:
    """`seal` (the store's path) refuses what `publish` refuses, before anything is sent."""
    ch = new_channel()
    with pytest.raises(PayloadTooLarge):
        pubsub.seal(ch, "x" * (pubsub.payload_limit + 1))
    with pytest.raises(DecodeError):
        pubsub.seal("", "p")
    with pytest.raises(DecodeError):
        pubsub.seal(ch, "nul\x00")
    assert len(pubsub.seal(ch, "x" * pubsub.payload_limit)) <= PubSubConfig().payload_limit


# -- memory adapter ----------------------------------------------------------------------


async def test_memory_publish_never_blocks() -> None:
    ps = MemoryPubSub()
    ch = new_channel()
    async with ps.subscribe(ch) as sub:
        with trio.CancelScope() as scope:
            scope.deadline = trio.current_time() + GUARD
            for i in range(5000):
                await ps.publish(ch, str(i))
        assert not scope.cancelled_caught
        stats = ps.statistics()
        assert (stats.published, stats.delivered) == (5000, 5000)
        assert [await recv(sub) for _ in range(5000)] == [str(i) for i in range(5000)]


async def test_memory_cancelled_publish_delivers_nothing() -> None:
    ps = MemoryPubSub()
    ch = new_channel()
    async with ps.subscribe(ch) as sub:
        with trio.CancelScope() as scope:
            scope.cancel()
            await ps.publish(ch, "lost")
        assert scope.cancelled_caught
        await ps.publish(ch, END)
        assert await recv_until_end(sub) == []


async def test_memory_force_resync_reaches_every_subscription() -> None:
    ps = MemoryPubSub()
    a, b = new_channel(), new_channel()
    async with ps.subscribe(a) as s1, ps.subscribe(a) as s2, ps.subscribe(b) as s3:
        await ps.publish(a, "before")
        assert ps.force_resync("test") == 3
        await ps.publish(a, "after")
        assert [await recv(s1), await recv(s1), await recv(s1)] == [
            "before",
            Resync("test"),
            "after",
        ]
        assert [await recv(s2), await recv(s2)] == ["before", Resync("test")]
        assert await recv(s3) == Resync("test")
        assert ps.statistics().resyncs == 3


async def test_memory_broken_subscription_raises_after_draining() -> None:
    ps = MemoryPubSub()
    a, b = new_channel(), new_channel()
    async with ps.subscribe(a) as sa, ps.subscribe(b) as sb:
        await ps.publish(a, "queued")
        assert ps.break_subscriptions(a) == 1
        assert await recv(sa) == "queued"
        with pytest.raises(PubSubError):
            await sa.receive()
        await ps.publish(b, "fine")
        assert await recv(sb) == "fine"


# -- PostgreSQL adapter --------------------------------------------------------------------


def _listener_pid(dsn: str, application_name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchone()
    assert row is not None, "listener session not found in pg_stat_activity"
    return int(row[0])


def _terminate(dsn: str, pid: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    return bool(row and row[0])


@pytest.mark.postgres
async def test_postgres_two_replicas_see_each_other(pg_dsn: str) -> None:
    ch = new_channel()
    async with AsyncExitStack() as stack:
        one = await stack.enter_async_context(open_pubsub("postgres", pg_dsn))
        two = await stack.enter_async_context(open_pubsub("postgres", pg_dsn))
        sub1 = await stack.enter_async_context(one.subscribe(ch))
        sub2 = await stack.enter_async_context(two.subscribe(ch))
        await one.publish(ch, "from one")
        await two.publish(ch, "from two")
        await one.publish(ch, END)
        assert await recv_until_end(sub1) == ["from one", "from two"]
        assert await recv_until_end(sub2) == ["from one", "from two"]


@pytest.mark.postgres
async def test_postgres_killed_listener_resyncs_and_recovers(pg_dsn: str) -> None:
    a, b = new_channel(), new_channel()
    async with open_pubsub("postgres", pg_dsn) as ps:
        assert isinstance(ps, PostgresPubSub)
        async with ps.subscribe(a) as s1, ps.subscribe(a) as s2, ps.subscribe(b) as s3:
            old_pid = ps.listener_pid
            pid = await trio.to_thread.run_sync(_listener_pid, pg_dsn, ps.listener_application_name)
            assert pid == old_pid
            assert await trio.to_thread.run_sync(_terminate, pg_dsn, pid)
            for sub in (s1, s2, s3):
                assert await recv(sub) == Resync()
            # The Resync comes after the re-LISTEN: the new session serves every channel.
            assert ps.connected
            assert ps.listener_pid not in (None, old_pid)
            assert ps.listening_channels == {a, b}
            await ps.publish(a, "after")
            await ps.publish(b, "after b")
            assert await recv(s1) == "after"
            assert await recv(s2) == "after"
            assert await recv(s3) == "after b"
            stats = ps.statistics()
            assert (stats.reconnects, stats.resyncs) == (1, 3)


@pytest.mark.postgres
async def test_postgres_close_ends_subscriptions(pg_dsn: str) -> None:
    ch = new_channel()
    async with AsyncExitStack() as outer:
        async with open_pubsub("postgres", pg_dsn) as ps:
            sub = await outer.enter_async_context(ps.subscribe(ch))
            await ps.publish(ch, "last")
            assert await recv(sub) == "last"
        with pytest.raises(PubSubError):
            await sub.receive()
        with pytest.raises(PubSubError):
            await ps.publish(ch, "too late")
        with pytest.raises(PubSubError):
            async with ps.subscribe(ch):
                pass  # pragma: no cover


@pytest.mark.postgres
async def test_postgres_unreachable_database_raises_pubsub_error() -> None:
    with pytest.raises(PubSubError):
        async with PostgresPubSub.open("postgresql://postgres@127.0.0.1:1/postgres"):
            pass  # pragma: no cover


@pytest.mark.postgres
async def test_postgres_body_error_propagates_unwrapped(pg_dsn: str) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with open_pubsub("postgres", pg_dsn) as ps, ps.subscribe(new_channel()):
            raise Boom


class Handled:
    """What a handler subscription was handed, and how it ended."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.got: list[Delivery] = []
        self.ended: list[PubSubError] = []
        self.fail_on = fail_on
        self.changed = trio.Event()

    def handler(self, delivery: Delivery) -> None:
        if delivery == self.fail_on:
            raise RuntimeError("handler broke")
        self.got.append(delivery)
        self.changed.set()

    def on_end(self, error: PubSubError) -> None:
        self.ended.append(error)
        self.changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(GUARD):
            while not done():
                self.changed = trio.Event()
                await self.changed.wait()


@pytest.mark.postgres
async def test_postgres_handler_subscription_is_handed_what_a_queue_would_receive(
    pg_dsn: str,
) -> None:
    """In publish order, a Resync after the listener's reconnect; a handler that raises
    ends its own subscription only; closing the pubsub ends the others, once each;
    leaving the context ends nothing (no `on_end`)."""
    ch = new_channel()
    left, kept, broken = Handled(), Handled(), Handled(fail_on="two")
    async with AsyncExitStack() as outer:
        async with open_pubsub("postgres", pg_dsn) as ps:
            assert isinstance(ps, PostgresPubSub) and isinstance(ps, HandlerDelivery)
            await outer.enter_async_context(ps.subscribe_handler(ch, kept.handler, kept.on_end))
            await outer.enter_async_context(ps.subscribe_handler(ch, broken.handler, broken.on_end))
            async with ps.subscribe_handler(ch, left.handler, left.on_end):
                await ps.publish(ch, "one")
                await left.until(lambda: left.got == ["one"])
            for payload in ("two", "three"):
                await ps.publish(ch, payload)
            await kept.until(lambda: kept.got == ["one", "two", "three"])
            assert broken.got == ["one"]
            assert [str(e) for e in broken.ended] == [
                f"the handler of {ch!r} failed: RuntimeError('handler broke')"
            ]
            assert left.got == ["one"] and left.ended == []
            pid = ps.listener_pid
            assert pid is not None
            assert await trio.to_thread.run_sync(_terminate, pg_dsn, pid)
            await kept.until(lambda: kept.got[-1:] == [Resync()])
            await ps.publish(ch, "after")
            await kept.until(lambda: kept.got[-1:] == ["after"])
            assert kept.ended == []
        # The pubsub closed under its subscriptions.
        assert [str(e) for e in kept.ended] == ["the pubsub is closed"]
        assert broken.got == ["one"] and len(broken.ended) == 1
    assert left.ended == [] and len(kept.ended) == 1
