"""Sealing of notify payloads (chatd_trio.pubsub.auth) and where the key comes from.

The delivery side (both adapters drop and count what does not open) is in
tests/contract/test_pubsub_contract.py; a forgery from a real database login is in
tests/test_notify_forgery.py.
"""

from __future__ import annotations

import base64
import logging
import subprocess
import sys
import uuid

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd_trio.config import NotifyAuthConfig, PubSubConfig
from chatd_trio.errors import NotifyKeyError, PubSubError
from chatd_trio.pubsub.auth import (
    OVERHEAD,
    PREFIX,
    NotifyAuth,
    NotifyRejected,
    new_key_text,
    parse_keys,
    sealed_size,
)
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.pubsub.postgres import PostgresPubSub

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
GUARD = 15.0

channels = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    min_size=1,
    max_size=63,
)
any_text = st.text(max_size=300)
storable_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=300
)


class Clock:
    """Wall-clock seconds the test sets."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- seal and open -----------------------------------------------------------------------


@settings(max_examples=300)
@given(channel=channels, payload=storable_text)
def test_open_returns_exactly_what_was_sealed_on_that_channel(channel: str, payload: str) -> None:
    """Round trip: open(seal(c, p)) == p, and the sealed form has the predicted length."""
    auth = NotifyAuth([KEY_A])
    wire = auth.seal(channel, payload)
    assert wire.startswith(PREFIX) and wire.isascii()
    assert len(wire) == sealed_size(len(payload.encode()))
    # Another replica opens it with the cipher; this one remembers what it sealed.
    assert NotifyAuth([KEY_A]).open(channel, wire) == payload
    assert auth.open(channel, wire) == payload


@settings(max_examples=300)
@given(channel=channels, wire=any_text)
def test_open_raises_only_notify_rejected_on_any_text(channel: str, wire: str) -> None:
    """Invariant: whatever text arrives (lone surrogates included), open either returns
    a payload sealed under the key or raises NotifyRejected, never anything else."""
    with pytest.raises(NotifyRejected):
        NotifyAuth([KEY_A]).open(channel, wire)


@settings(max_examples=200)
@given(
    channel=channels,
    payload=storable_text,
    at=st.integers(min_value=0),
    shift=st.integers(1, 63),
)
def test_any_changed_character_is_rejected(channel: str, payload: str, at: int, shift: int) -> None:
    """Invariant: replacing any one character of a sealed payload (header, salt,
    ciphertext or MAC) makes it fail to open."""
    auth = NotifyAuth([KEY_A])
    wire = auth.seal(channel, payload)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    i = len(PREFIX) + at % (len(wire) - len(PREFIX))
    changed = wire[:i] + alphabet[(alphabet.index(wire[i]) + shift) % 64] + wire[i + 1 :]
    with pytest.raises(NotifyRejected):
        auth.open(channel, changed)


def test_a_payload_is_bound_to_its_channel() -> None:
    auth = NotifyAuth([KEY_A])
    a, b = f"chat:stream:{uuid.uuid4()}", f"chat:stream:{uuid.uuid4()}"
    wire = auth.seal(a, "hello")
    with pytest.raises(NotifyRejected, match="MAC"):
        auth.open(b, wire)
    # A channel that is a prefix of another, or differs only in length, is another channel.
    with pytest.raises(NotifyRejected):
        auth.open(a + "x", wire)
    assert auth.open(a, wire) == "hello"


def test_the_payload_is_not_readable_in_the_sealed_form() -> None:
    secret = "the launch code is 0000"
    wire = NotifyAuth([KEY_A]).seal("c", secret)
    raw = base64.urlsafe_b64decode(wire[len(PREFIX) :] + "==")
    assert secret.encode() not in raw and secret not in wire
    # Two seals of one payload differ (a fresh salt, hence a fresh subkey, each time).
    assert NotifyAuth([KEY_A]).seal("c", secret) != wire


def test_sealing_time_window() -> None:
    clock = Clock()
    auth = NotifyAuth([KEY_A], max_age=300.0, clock=clock)
    other = NotifyAuth([KEY_A], max_age=300.0, clock=clock)
    wire = auth.seal("c", "p")
    clock.now += 300.0
    # The sealer (remembering the payload) and another replica (opening it) alike.
    assert auth.open("c", wire) == "p" == other.open("c", wire)
    clock.now += 1.5
    with pytest.raises(NotifyRejected, match="ago"):
        auth.open("c", wire)
    with pytest.raises(NotifyRejected, match="ago"):
        other.open("c", wire)
    # Sealed by a replica whose clock runs ahead: accepted within max_age, not beyond.
    ahead = NotifyAuth([KEY_A], max_age=300.0, clock=Clock(clock.now + 299.0))
    assert auth.open("c", ahead.seal("c", "p")) == "p"
    further = NotifyAuth([KEY_A], max_age=300.0, clock=Clock(clock.now + 302.0))
    with pytest.raises(NotifyRejected, match="future"):
        auth.open("c", further.seal("c", "p"))


def test_the_echo_of_an_own_payload_opens_without_the_cipher() -> None:
    """A replica hears its own notifies back through LISTEN: the exact wire it sealed, on
    the channel it sealed it for, gives the payload back from memory; anything else
    (another channel, one changed character, a wire forgotten) goes through the cipher."""

    class Small(NotifyAuth):
        remembered = 2

    auth = Small([KEY_A])
    wires = [auth.seal("c", f"p{i}") for i in range(3)]
    assert auth.open("c", wires[2]) == "p2"
    assert auth.opened_from_memory == 1
    with pytest.raises(NotifyRejected, match="MAC"):
        auth.open("d", wires[2])
    assert auth.open("c", wires[0]) == "p0"  # forgotten (oldest of three): opened
    assert auth.opened_from_memory == 1
    assert auth.open("c", wires[1]) == "p1"
    assert auth.opened_from_memory == 2
    assert NotifyAuth.unauthenticated().open("c", "plain") == "plain"


def test_rotation_first_key_seals_every_key_opens() -> None:
    old, new, both = NotifyAuth([KEY_A]), NotifyAuth([KEY_B]), NotifyAuth([KEY_B, KEY_A])
    # Step 1 of a rotation: replicas still sealing with the old key are opened by all.
    assert both.open("c", old.seal("c", "from old")) == "from old"
    # Step 2: `both` seals with the new key; replicas that still only know the old key
    # drop it (hence: add the new key everywhere before any replica seals with it).
    assert new.open("c", both.seal("c", "from both")) == "from both"
    with pytest.raises(NotifyRejected):
        old.open("c", both.seal("c", "from both"))


def test_max_payload_is_the_largest_that_fits() -> None:
    auth = NotifyAuth([KEY_A])
    for limit in (0, 1, 76, 100, 101, 102, 103, 7999, 8000):
        n = auth.max_payload(limit)
        if n > 0:
            assert sealed_size(n) <= limit
            assert len(auth.seal("c", "x" * n)) <= limit
        assert sealed_size(n + 1) > limit
    assert auth.max_payload(7999) == 5923
    assert sealed_size(0) == len(PREFIX) + (4 * OVERHEAD + 2) // 3


def test_unauthenticated_passes_everything_through() -> None:
    auth = NotifyAuth.unauthenticated()
    assert not auth.authenticated
    assert auth.seal("c", "plain") == "plain"
    assert auth.open("c", "anything at all") == "anything at all"
    assert auth.max_payload(7999) == 7999


# -- keys --------------------------------------------------------------------------------


def test_key_text_round_trips_and_both_base64_alphabets_are_accepted() -> None:
    auth = NotifyAuth([KEY_A, KEY_B])
    again = NotifyAuth.from_key_text(auth.key_text())
    assert again.open("c", auth.seal("c", "p")) == "p"
    urlsafe = base64.urlsafe_b64encode(b"\xff" * 32).decode().rstrip("=")
    assert parse_keys([urlsafe], source="x") == [b"\xff" * 32]
    assert len(parse_keys([new_key_text()], source="x")[0]) == 32


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("not base64 at all!", "not base64"),
        (base64.b64encode(b"short").decode(), "has 5 bytes"),
        (new_key_text() + ",", "key 2 is empty"),
    ],
)
def test_bad_keys_are_refused_naming_the_source_never_echoing_the_key(
    text: str, match: str
) -> None:
    with pytest.raises(NotifyKeyError, match=match) as info:
        NotifyAuth.from_config(NotifyAuthConfig(), environ={"CHATD_NOTIFY_KEY": text or " ,"})
    message = str(info.value)
    assert "CHATD_NOTIFY_KEY" in message
    for piece in text.split(","):
        if len(piece) > 4:
            assert piece not in message


def test_key_source_precedence() -> None:
    env = {"CHATD_NOTIFY_KEY": base64.b64encode(KEY_B).decode()}
    configured = NotifyAuthConfig(keys=(base64.b64encode(KEY_A).decode(),))
    sealed_a = NotifyAuth([KEY_A]).seal("c", "a")
    # Configured keys win over the environment.
    assert NotifyAuth.from_config(configured, environ=env).open("c", sealed_a) == "a"
    from_env = NotifyAuth.from_config(NotifyAuthConfig(), environ=env)
    assert from_env.open("c", NotifyAuth([KEY_B]).seal("c", "b")) == "b"
    # The variable's name is configurable.
    renamed = NotifyAuthConfig(key_env="MY_KEY")
    assert NotifyAuth.from_config(renamed, environ={"MY_KEY": env["CHATD_NOTIFY_KEY"]})
    with pytest.raises(NotifyKeyError, match="MY_KEY"):
        NotifyAuth.from_config(renamed, environ=env)
    # Neither: an error naming the variable, unless unauthenticated is accepted explicitly.
    with pytest.raises(NotifyKeyError, match="CHATD_NOTIFY_KEY"):
        NotifyAuth.from_config(NotifyAuthConfig(), environ={})
    opted_out = NotifyAuth.from_config(NotifyAuthConfig(allow_unauthenticated=True), environ={})
    assert not opted_out.authenticated


def test_keys_stay_out_of_reprs() -> None:
    text = new_key_text()
    assert text not in repr(NotifyAuthConfig(keys=(text,)))
    assert text not in repr(PubSubConfig(auth=NotifyAuthConfig(keys=(text,))))
    assert text not in repr(NotifyAuth.from_key_text(text))


def test_the_module_prints_a_fresh_key() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "chatd_trio.pubsub.auth"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert len(parse_keys([done.stdout.strip()], source="stdout")[0]) == 32


# -- the adapters' key -----------------------------------------------------------------


async def test_postgres_pubsub_refuses_to_start_without_a_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before connecting (the address is unreachable: a connection attempt would
    raise PubSubError instead), with the variable named."""
    monkeypatch.delenv("CHATD_NOTIFY_KEY", raising=False)
    with pytest.raises(NotifyKeyError, match="CHATD_NOTIFY_KEY"):
        async with PostgresPubSub.open("postgresql://postgres@127.0.0.1:1/postgres"):
            pass  # pragma: no cover
    monkeypatch.setenv("CHATD_NOTIFY_KEY", "too short")
    with pytest.raises(NotifyKeyError, match="CHATD_NOTIFY_KEY: key 1"):
        async with PostgresPubSub.open("postgresql://postgres@127.0.0.1:1/postgres"):
            pass  # pragma: no cover
    # With a key, the same call gets as far as connecting.
    monkeypatch.setenv("CHATD_NOTIFY_KEY", new_key_text())
    with pytest.raises(PubSubError):
        async with PostgresPubSub.open("postgresql://postgres@127.0.0.1:1/postgres"):
            pass  # pragma: no cover


@pytest.mark.postgres
async def test_postgres_opted_out_pubsub_is_plain_and_says_so(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("CHATD_NOTIFY_KEY", raising=False)
    caplog.set_level(logging.WARNING, logger="chatd_trio.pubsub.postgres")
    config = PubSubConfig(auth=NotifyAuthConfig(allow_unauthenticated=True))
    async with PostgresPubSub.open(pg_dsn, config=config) as ps:
        assert ps.payload_limit == 7999
        assert ps.seal("c", "plain") == "plain"
        channel = f"chat:stream:{uuid.uuid4()}"
        async with ps.subscribe(channel) as sub:
            await ps.publish(channel, "plain")
            with trio.fail_after(GUARD):
                assert await sub.receive() == "plain"
    assert any("not authenticated" in r.getMessage() for r in caplog.records)


def test_memory_pubsub_draws_its_own_key_and_ignores_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATD_NOTIFY_KEY", "malformed")
    ps = MemoryPubSub()
    assert ps.seal("c", "p").startswith(PREFIX)
    assert ps.payload_limit == 5923
    key = new_key_text()
    configured = MemoryPubSub(PubSubConfig(auth=NotifyAuthConfig(keys=(key,))))
    assert NotifyAuth.from_key_text(key).open("c", configured.seal("c", "p")) == "p"


async def test_memory_pubsub_instances_do_not_open_each_others_payloads() -> None:
    one, two = MemoryPubSub(), MemoryPubSub()
    async with two.subscribe("c") as sub:
        two.publish_nowait("c", one.seal("c", "from one"))
        two.publish_nowait("c", two.seal("c", "from two"))
        with trio.fail_after(GUARD):
            assert await sub.receive() == "from two"
    assert two.statistics().rejected == 1


def test_rejections_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="chatd_trio.pubsub.auth")
    ps = MemoryPubSub(PubSubConfig(auth=NotifyAuthConfig(reject_warn_interval=3600.0)))

    async def main() -> None:
        async with ps.subscribe("c"):
            for i in range(500):
                ps.publish_nowait("c", f"forged {i}")

    trio.run(main)
    assert ps.statistics().rejected == 500
    warnings = [r for r in caplog.records if "notify dropped" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].reason == "not sealed"  # type: ignore[attr-defined]
